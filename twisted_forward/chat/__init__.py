"""
Chat records: every exchange on an ``openai`` route as one JSON line.

- :mod:`.sse`: the incremental server-sent-events decoder;
- :mod:`.record`: what a request and its answer say, assembled into a record;
- :mod:`.recorder`: the interface the exchange feeds, and the recorder;
- :mod:`.files`: the logger observer that writes the records to disk;
- :mod:`.export`: ``python -m twisted_forward.chat export``.
"""
