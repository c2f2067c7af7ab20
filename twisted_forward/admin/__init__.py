"""
The admin page and its JSON API at ``/_admin/``, on when ADMIN_KEY is set.

- :mod:`.auth`: the admin key check (constant time, never logged).
- :mod:`.api`: usage from the ledger, keys and their health, recent chat
  records.
- :mod:`.live`: live figures sampled on the reactor's clock, sent as
  server-sent events.
- :mod:`.exchanges`: reading the newest chat records, off the reactor thread.
- :mod:`.assets`: the page (plain HTML, JS, CSS in ``static/``), served from
  the package: no CDN, nothing to build.
- :mod:`.resource`: the ``/_admin/`` resource: headers, auth, dispatch.
- :mod:`.service`: starts and stops the sampling and the event streams.

See ``docs/admin.md``.
"""
