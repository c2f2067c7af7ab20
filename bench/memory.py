"""
Where an open stream's memory goes: ``python -m bench.memory``.

Starts the fake upstream and the real plugin (``twistd openai-forward``,
chat records on, a forward key, as ``python -m bench`` does) with
``tracemalloc`` on, holds ``--streams`` SSE streams open after their first
event, and takes two snapshots in the proxy (SIGUSR2): after a third of them
and after all.  It prints, per stream added between the two:

- the resident memory (RSS) growth;
- the traced allocations, grouped by where they were made (``--group
  traceback`` shows the call chain, filtered to the frames of
  twisted_forward and Twisted);
- the live objects by type (``gc``), i.e. how many Requests, Headers,
  Deferreds, delayed calls... each stream holds.

tracemalloc slows the proxy and adds its own memory (not counted in the
traced figures, counted in the RSS one): the RSS line here is not the
bench's figure, the traced lines say where the bench's figure comes from.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any, Optional

from . import client
from .targets import BENCH_KEY, FORWARD_KEY, HOST, REPO, Server, free_port, start_fake

#: Run in the proxy's process before twistd: tracemalloc, and a SIGUSR2
#: handler that writes a snapshot and the live objects' type counts.
_PROXY = """
import gc, os, pickle, signal, sys, tracemalloc, collections
tracemalloc.start(int(os.environ["TF_MEM_FRAMES"]))
_out = os.environ["TF_MEM_DIR"]
_n = [0]
def _dump(signum, frame):
    gc.collect()
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)])
    counts = collections.Counter()
    for o in gc.get_objects():
        t = type(o)
        name = str(t.__dict__.get("__module__", "")) + "." + t.__qualname__
        counts[name] += 1
        if _n[0] and name.startswith("twisted"):
            # Only in the last snapshot: reading __dict__ makes Python
            # build the dict of an object that had its values inline.
            d = getattr(o, "__dict__", None)
            counts["bytes " + name] += sys.getsizeof(o) + (sys.getsizeof(d) if isinstance(d, dict) else 0)
            counts["attrs " + name] += len(d) if isinstance(d, dict) else 0
    _n[0] += 1
    path = os.path.join(_out, "snap-%d.pickle" % _n[0])
    with open(path + ".tmp", "wb") as f:
        pickle.dump((snap, dict(counts)), f)
    os.rename(path + ".tmp", path)
signal.signal(signal.SIGUSR2, _dump)
from twisted.scripts.twistd import run
run()
"""


def start_traced_proxy(upstream_port: int, workdir: Path, frames: int, log_chat: bool) -> Any:
    """``twistd -n openai-forward`` under tracemalloc, as the bench starts it."""
    port = free_port()
    rundir = workdir / "twisted-forward"
    rundir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": str(REPO),
        "OPENAI_BASE_URL": f"http://{HOST}:{upstream_port}",
        "OPENAI_API_KEY": BENCH_KEY,
        "LOG_CHAT": "true" if log_chat else "false",
        "LOG_DIR": str(rundir / "Log"),
        "FORWARD_KEY": f"bench:{FORWARD_KEY}",
        "MAX_CONNECTIONS_PER_CLIENT": "0",
        "TF_MEM_DIR": str(workdir),
        "TF_MEM_FRAMES": str(frames),
    })
    argv = [sys.executable, "-c", _PROXY, "-n", "--pidfile=", "openai-forward",
            "--port", f"tcp:{port}:interface={HOST}", "--env-file", os.devnull]
    log_path = rundir / "twistd.log"
    process = subprocess.Popen(argv, cwd=rundir, env=env, stdin=subprocess.DEVNULL,
                               stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    server = Server("twisted-forward (traced)", port, process, log_path)
    server.wait_ready(timeout=600)  # tracemalloc slows the start-up
    server.key = FORWARD_KEY
    return server


def snapshot(pid: int, workdir: Path, n: int, timeout: float = 600.0) -> tuple[Any, dict[str, int]]:
    """Ask the proxy for its ``n``-th snapshot and load it."""
    os.kill(pid, signal.SIGUSR2)
    path = workdir / f"snap-{n}.pickle"
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the proxy wrote no snapshot")
        time.sleep(0.1)  # polling for a file another process writes
    with open(path, "rb") as f:
        return pickle.load(f)


def _interesting(frame: tracemalloc.Frame) -> bool:
    return "twisted" in frame.filename or "treq" in frame.filename


def _where(trace: tracemalloc.Traceback, depth: int) -> str:
    frames = [f for f in trace if _interesting(f)] or list(trace)
    shown = frames[-depth:]  # tracemalloc lists the outermost first
    return " <- ".join(
        f"{_short(f.filename)}:{f.lineno}" for f in reversed(shown)
    )


def _short(path: str) -> str:
    for marker in ("site-packages/", str(REPO) + "/", "lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def report(before: Any, after: Any, added: int, group: str, depth: int, top: int) -> str:
    """The traced growth and object counts per stream added."""
    snap_a, counts_a = before
    snap_b, counts_b = after
    out = []
    total = sum(s.size for s in snap_b.statistics("filename")) - sum(
        s.size for s in snap_a.statistics("filename"))
    out.append(f"traced growth: {total / added:,.0f} B per stream ({added} streams added)")
    out.append("")
    out.append(f"by {group} (B per stream, allocations per stream):")
    if group == "traceback":
        by: collections.Counter[str] = collections.Counter()
        blocks: collections.Counter[str] = collections.Counter()
        for stat in snap_b.compare_to(snap_a, "traceback"):
            key = _where(stat.traceback, depth)
            by[key] += stat.size_diff
            blocks[key] += stat.count_diff
        for key, size in by.most_common(top):
            out.append(f"  {size / added:8.0f}  {blocks[key] / added:5.2f}  {key}")
    else:
        for stat in snap_b.compare_to(snap_a, "lineno")[:top]:
            frame = stat.traceback[0]
            out.append(f"  {stat.size_diff / added:8.0f}  {stat.count_diff / added:5.2f}  "
                       f"{_short(frame.filename)}:{frame.lineno}")
    out.append("")
    out.append("live objects by type (per stream):")
    diff = {k: counts_b.get(k, 0) - counts_a.get(k, 0) for k in counts_b}
    types = [(k, n) for k, n in diff.items() if not k.startswith(("bytes ", "attrs "))]
    for name, n in sorted(types, key=lambda kv: -kv[1])[:top]:
        if n / added < 0.5:
            break
        if name.startswith(("bytes ", "attrs ")):
            continue
        size = counts_b.get("bytes " + name, 0) / max(1, counts_b.get(name, 1))
        attrs = counts_b.get("attrs " + name, 0) / max(1, counts_b.get(name, 1))
        extra = f"  ({size:,.0f} B each with its __dict__, {attrs:.0f} attributes)" if size else ""
        out.append(f"  {n / added:6.2f}  {name}{extra}")
    return "\n".join(out) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1500)
    parser.add_argument("--group", choices=["traceback", "lineno"], default="traceback")
    parser.add_argument("--depth", type=int, default=4, help="frames shown per traceback group")
    parser.add_argument("--frames", type=int, default=12, help="frames tracemalloc keeps")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--no-log-chat", action="store_true", help="LOG_CHAT=false")
    args = parser.parse_args(argv)
    client.raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="tf-memory-"))
    servers = []
    try:
        fake = start_fake(workdir, None)
        servers.append(fake)
        proxy = start_traced_proxy(fake.port, workdir, args.frames, not args.no_log_chat)
        servers.append(proxy)
        pids = [proxy.pid]
        first = max(1, args.streams // 3)

        async def go() -> tuple[Any, Any, int, int, int]:
            held = client.HeldStreams(HOST, proxy.port, hold_s=600, key=proxy.key)
            deadline = time.perf_counter() + 300
            await held.add(first, deadline)
            await asyncio.sleep(0.5)
            a = held.opened
            rss_a = client.rss_bytes(pids)
            snap_a = await asyncio.get_running_loop().run_in_executor(
                None, snapshot, proxy.pid, workdir, 1)
            await held.add(args.streams - first, deadline)
            await asyncio.sleep(0.5)
            b = held.opened
            rss_b = client.rss_bytes(pids)
            snap_b = await asyncio.get_running_loop().run_in_executor(
                None, snapshot, proxy.pid, workdir, 2)
            held.close()
            await asyncio.sleep(0.2)
            return snap_a, snap_b, b - a, rss_b - rss_a, b

        snap_a, snap_b, added, rss, opened = asyncio.run(go())
        sys.stdout.write(
            f"{opened} streams open; RSS growth (tracemalloc on) {rss / max(1, added):,.0f} B "
            f"per stream\n"
        )
        sys.stdout.write(report(snap_a, snap_b, max(1, added), args.group, args.depth, args.top))
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
