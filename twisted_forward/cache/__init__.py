"""
The response cache: openai-forward's ``CACHE_*`` settings, partitioned by
credential, with streamed answers replayed as the same SSE events.

- :mod:`.settings`: the settings (openai-forward's names and ours).
- :mod:`.key`: which requests are cacheable and their canonical key.
- :mod:`.entry`: the stored form of an answer, and the tap that collects one.
- :mod:`.interfaces`: :class:`~.interfaces.ICacheStore` (the backends) and
  :class:`~.interfaces.IExchangeCache` (what the exchange calls).
- :mod:`.memory`, :mod:`.lmdb_store`, :mod:`.redis_store`: the backends.
- :mod:`.replay`: writes a stored answer to a client.
- :mod:`.hook`: :class:`~.hook.ResponseCache`, the exchange's side of it.

docs/cache.md says how it behaves and why.
"""
