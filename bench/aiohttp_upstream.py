"""
A fake OpenAI upstream on aiohttp, like a real Python API server:
``python -m bench.aiohttp_upstream``.

The same answers as :mod:`bench.fake_upstream` (the raw one), served by
aiohttp's web framework, so the bench can also measure against an upstream
with a framework's per-request cost (closer to what users proxy to):

- ``POST /v1/chat/completions``: the small JSON chat answer; ``"stream":
  true`` streams ``bench.events`` SSE events ``bench.interval_ms`` apart,
  holding ``bench.hold_s`` after the first.
- ``POST /v1/files``, ``/upload``, ``/v1/audio/transcriptions``: reads the
  body in pieces without keeping it, answers ``{"received": n}``.
- ``GET /big/<n>``: ``n`` bytes, written with flow control.
- ``GET /healthz``: ``ok``.

aiohttp is a bench-only dependency (``pip install aiohttp``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Optional

from aiohttp import web

from .fake_upstream import _PIECE, chat_answer, sse_events

_CHAT = chat_answer()


async def chat(request: web.Request) -> web.StreamResponse:
    """Chat completions, whole or streamed."""
    body = await request.read()
    payload: dict = {}
    if b'"stream"' in body:
        try:
            payload = json.loads(body)
        except ValueError:
            payload = {}
    if not payload.get("stream"):
        return web.Response(body=_CHAT, content_type="application/json",
                            headers={"x-request-id": "req-bench"})
    options = {"events": 20, "interval_ms": 50.0, "hold_s": 0.0}
    options.update(payload.get("bench") or {})
    events = sse_events(int(options["events"]), str(payload.get("model", "m")))
    interval = float(options["interval_ms"]) / 1000.0
    hold = float(options.get("hold_s", 0))
    response = web.StreamResponse(headers={"content-type": "text/event-stream",
                                           "cache-control": "no-cache"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    for i, event in enumerate(events):
        await response.write(event)
        if i + 1 < len(events):
            await asyncio.sleep(hold if (i == 0 and hold) else interval)
    await response.write_eof()
    return response


async def upload(request: web.Request) -> web.Response:
    """Count the body without keeping it."""
    received = 0
    async for piece in request.content.iter_any():
        received += len(piece)
    return web.json_response({"received": received})


async def big(request: web.Request) -> web.StreamResponse:
    """``n`` bytes, as fast as the reader takes them."""
    size = int(request.match_info["size"])
    response = web.StreamResponse(headers={"content-type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    left = size
    while left:
        n = min(left, len(_PIECE))
        await response.write(_PIECE if n == len(_PIECE) else _PIECE[:n])
        left -= n
    await response.write_eof()
    return response


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app() -> web.Application:
    """The application: the routes above, no request-size cap."""
    app = web.Application(client_max_size=1 << 40)
    app.router.add_post("/v1/chat/completions", chat)
    for path in ("/v1/files", "/upload", "/v1/audio/transcriptions"):
        app.router.add_post(path, upload)
    app.router.add_route("*", "/big/{size:\\d+}", big)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT; print the bound port first."""
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
    await site.start()
    assert site._server is not None
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # aiohttp types sockets as optional; started above
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    sys.stdout.write(f"fake upstream listening on {host}:{bound}\n")
    sys.stdout.flush()
    await stop
    await runner.cleanup()


def main(argv: Optional[list[str]] = None) -> None:
    """Command line: ``python -m bench.aiohttp_upstream --port 0``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
