"""
Where the proxy's time goes: ``python -m bench.profile chat|sse|connect``.

Starts the fake upstream and twisted-forward (pinned as in ``python -m
bench``), drives one kind of load, and reports the proxy's CPU time per
request (or per stream, or per SSE chunk) from ``/proc``.  With py-spy
installed (``pip install py-spy``) it also samples the proxy's main thread
while the load runs and prints the functions with the most samples, self and
inclusive.  py-spy samples without pausing the proxy (``--nonblocking``), so
some stacks come back cut short: the self column is exact about leaves, the
inclusive one undercounts callers.

- ``chat``: small non-stream chat requests on 32 keep-alive connections.
- ``sse``: concurrent SSE streams (``--streams``, ``--events``,
  ``--interval-ms``); the CPU per chunk is measured as the difference between
  a run with ``--events`` and one with five times as many.
- ``connect``: streams of a single event, i.e. the cost of a new client
  connection, a new upstream connection and one short answer.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from . import client
from .run import wrk_script
from .targets import HOST, Server, start_fake, start_twisted_forward

_LINE = re.compile(r":\d+\)")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _short(frame: str) -> str:
    frame = _LINE.sub(")", frame)
    for prefix in sys.path:
        if prefix and prefix in frame:
            frame = frame.replace(prefix.rstrip("/") + "/", "")
    return frame


def summarise(raw: Path, top: int) -> str:
    """Self and inclusive shares of py-spy's raw (collapsed) main-thread stacks."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or not stack.startswith("thread") or "MainThread" not in stack.split(";")[0]:
            continue
        frames = [_short(f) for f in stack.split(";")[1:] if f.strip()]
        if not frames:
            continue
        n = int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return "py-spy took no samples of the main thread\n"
    out = [f"{total} main-thread samples", "", "self:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    out += ["", "inclusive:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top * 2)]
    return "\n".join(out) + "\n"


class Sampler:
    """py-spy recording a process while a block runs (a no-op without py-spy)."""

    enabled = True

    def __init__(self, pid: int, raw: Path, seconds: float, cpus: Optional[set[int]]) -> None:
        self.raw = raw
        self.process: Optional[subprocess.Popen] = None
        spy = shutil.which("py-spy") if self.enabled else None
        if spy:
            self.process = subprocess.Popen(
                [spy, "record", "-p", str(pid), "-r", "250", "--nonblocking", "--threads",
                 "-d", str(max(1, int(seconds))), "-f", "raw", "-o", str(raw)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            )
            time.sleep(0.5)  # let py-spy attach before the load starts

    def finish(self) -> bool:
        """Wait for py-spy to write its file; True if there is one."""
        if self.process is None:
            return False
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return self.raw.exists()


def profile_chat(proxy: Server, workdir: Path, seconds: float, cpus: Optional[set[int]]) -> str:
    wrk = shutil.which("wrk")
    request = client.chat_request(HOST, proxy.port, key=proxy.key)
    asyncio.run(client.rps_python(HOST, proxy.port, request, 32, 1.0))  # warm-up
    sampler = Sampler(proxy.pid, workdir / "chat.raw", seconds, cpus)
    before = cpu_seconds(proxy.pid)
    if wrk:
        out = subprocess.run(
            [wrk, "-t1", "-c32", f"-d{int(seconds)}s", "-s", str(wrk_script(workdir, proxy.key)),
             f"http://{HOST}:{proxy.port}/v1/chat/completions"],
            capture_output=True, text=True, preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        ).stdout
        done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]  # wrk always prints it
    else:
        rps, done, _ = asyncio.run(client.rps_python(HOST, proxy.port, request, 32, seconds))
    used = cpu_seconds(proxy.pid) - before
    head = (f"chat: {done} requests in {seconds:.0f}s ({done / seconds:,.0f}/s), proxy CPU "
            f"{used:.2f}s = {1e6 * used / max(1, done):.0f} µs per request\n")
    return head + ("\n" + summarise(sampler.raw, 40) if sampler.finish() else "")


def _streams_cpu(proxy: Server, streams: int, events: int, interval_ms: float) -> tuple[float, int, float]:
    before = cpu_seconds(proxy.pid)
    started = time.perf_counter()
    results = asyncio.run(client.run_streams(HOST, proxy.port, streams, events, interval_ms, 120,
                                             key=proxy.key))
    wall = time.perf_counter() - started
    return cpu_seconds(proxy.pid) - before, sum(r.whole for r in results), wall


def profile_sse(proxy: Server, workdir: Path, streams: int, events: int, interval_ms: float,
                cpus: Optional[set[int]]) -> str:
    _streams_cpu(proxy, min(streams, 100), events, interval_ms)  # warm-up
    base, whole_a, _ = _streams_cpu(proxy, streams, events, interval_ms)
    more, whole_b, _ = _streams_cpu(proxy, streams, events * 5, interval_ms / 5)
    # Chunks per stream: the events, plus the last one holding finish + [DONE].
    per_chunk = (more - base) / (streams * events * 4)
    per_stream = (base - per_chunk * streams * events) / streams
    sampler = Sampler(proxy.pid, workdir / "sse.raw", 8, cpus)
    rounds = 0
    deadline = time.monotonic() + 7
    while time.monotonic() < deadline and rounds < 20:
        _streams_cpu(proxy, streams, events, interval_ms)
        rounds += 1
    head = (
        f"sse: {streams} streams x {events} events ({whole_a} whole) used {base:.2f}s of proxy CPU; "
        f"x {events * 5} events ({whole_b} whole) {more:.2f}s\n"
        f"  => {1e6 * per_chunk:.1f} µs per relayed chunk, {1e6 * per_stream:.0f} µs per stream "
        f"(connections, request, head, end)\n"
    )
    return head + ("\n" + summarise(sampler.raw, 40) if sampler.finish() else "")


def profile_connect(proxy: Server, workdir: Path, streams: int, cpus: Optional[set[int]]) -> str:
    _streams_cpu(proxy, min(streams, 100), 1, 0)  # warm-up
    sampler = Sampler(proxy.pid, workdir / "connect.raw", 8, cpus)
    used, whole, total = 0.0, 0, 0
    deadline = time.monotonic() + 7
    while time.monotonic() < deadline and total < 20 * streams:
        cpu, ok, _ = _streams_cpu(proxy, streams, 1, 0)
        used += cpu
        whole += ok
        total += streams
    head = (f"connect: {total} one-event streams ({whole} whole), each on a new client "
            f"connection: {1e6 * used / max(1, total):.0f} µs of proxy CPU per stream\n")
    return head + ("\n" + summarise(sampler.raw, 40) if sampler.finish() else "")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=["chat", "sse", "connect"])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--interval-ms", type=float, default=50.0)
    parser.add_argument("--port", default=None,
                        help="endpoint options appended to tcp:PORT:interface=127.0.0.1 (e.g. backlog=1024)")
    parser.add_argument("--no-spy", action="store_true", help="CPU figures only, no py-spy")
    parser.add_argument("--policies", action="store_true",
                        help="KEY_POLICY on (in memory), as the bench's policies column")
    parser.add_argument("--no-log-chat", action="store_true", help="LOG_CHAT=false")
    args = parser.parse_args(argv)
    Sampler.enabled = not args.no_spy
    cpus = os.cpu_count() or 1
    proxy_cpus, load_cpus = ({0}, {1}) if cpus >= 2 else (None, None)
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)
    workdir = Path(tempfile.mkdtemp(prefix="tf-profile-"))
    servers: list[Server] = []
    try:
        fake = start_fake(workdir, load_cpus)
        servers.append(fake)
        extra = {}
        if args.policies:
            from .run import BENCH_POLICY

            extra["KEY_POLICY"] = BENCH_POLICY
        if args.no_log_chat:
            extra["LOG_CHAT"] = "false"
        proxy = start_twisted_forward(fake.port, workdir, proxy_cpus, port_options=args.port,
                                      extra_env=extra)
        servers.append(proxy)
        if args.scenario == "chat":
            report = profile_chat(proxy, workdir, args.seconds, load_cpus)
        elif args.scenario == "sse":
            report = profile_sse(proxy, workdir, args.streams, args.events, args.interval_ms, load_cpus)
        else:
            report = profile_connect(proxy, workdir, args.streams, load_cpus)
    finally:
        for server in reversed(servers):
            server.stop()
    sys.stdout.write(report)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
