"""
Per-key policies: model levels, request and token limits, quotas.

- :mod:`.store`: the store interface (memory, ``--workers`` supervisor, Redis);
- :mod:`.memory`: the in-memory store.
"""
