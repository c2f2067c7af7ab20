"""
The proxy's CPU per request, counted rather than timed:
``python -m bench.cpu calls|instructions [--policies] [--no-log-chat]``.

The machine the bench runs on is shared, so a time per request moves with
everyone else's load.  These two measures do not:

- ``calls``: the proxy runs under :mod:`cProfile`, switched on for the
  measured requests only (real-time signals), and the report gives the
  Python calls per request, the functions called most per request, and the
  profiler's own time per function (a share, not a figure to compare
  across runs).
- ``instructions``: the proxy runs under ``valgrind --tool=callgrind`` with
  instrumentation off until the warm-up is over (``callgrind_control``),
  and the report gives the machine instructions per request (all threads).

Requests are small non-stream chat completions, one at a time on one
keep-alive connection, after a warm-up: the same work every run.
"""

from __future__ import annotations

import argparse
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from .client import KeepAliveClient, chat_request
from .run import BENCH_POLICY
from .targets import HOST, Server, start_fake, start_twisted_forward

#: twistd with a profiler switched on by SIGRTMIN and dumped by SIGRTMIN+1.
_PROFILED = """\
import cProfile, signal
from twisted.scripts.twistd import run
out = {out!r}
profile = cProfile.Profile()
def start(*_):
    profile.enable()
def stop(*_):
    profile.disable()
    profile.dump_stats(out)
signal.signal(signal.SIGRTMIN, start)
signal.signal(signal.SIGRTMIN + 1, stop)
run()
"""


def _drive(proxy: Server, count: int) -> None:
    request = chat_request(HOST, proxy.port, key=proxy.key)
    client = KeepAliveClient(HOST, proxy.port, timeout=120.0)
    try:
        for _ in range(count):
            status, _ = client.request(request)
            if status != 200:
                raise RuntimeError(f"status {status}:\n{proxy.log_tail()}")
    finally:
        client.close()


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            time.sleep(0.2)  # let the writer finish the file
            return
        time.sleep(0.05)  # polling a file another process writes
    raise RuntimeError(f"{path} not written")


def calls(proxy: Server, out: Path, requests: int, top: int) -> str:
    """Python calls per request while ``requests`` requests are served."""
    os.kill(proxy.pid, signal.SIGRTMIN)
    time.sleep(0.2)  # the signal is handled on the proxy's next bytecode
    _drive(proxy, requests)
    os.kill(proxy.pid, signal.SIGRTMIN + 1)
    _wait_for(out)
    stats = pstats.Stats(str(out)).stats  # type: ignore[attr-defined]  # set by Stats, not declared in typeshed
    rows = []
    total_calls = 0
    total_time = 0.0
    for (file, line, name), (_, ncalls, tottime, _, _) in stats.items():
        total_calls += ncalls
        total_time += tottime
        rows.append((ncalls / requests, tottime, f"{_short(file)}:{line}({name})"))
    lines = [f"{requests} requests: {total_calls / requests:.1f} Python calls per request", "",
             "calls per request (most called):"]
    for per, _, where in sorted(rows, reverse=True)[:top]:
        lines.append(f"  {per:7.2f}  {where}")
    lines += ["", "profiler time share (own):"]
    for per, t, where in sorted(rows, key=lambda r: -r[1])[:top]:
        lines.append(f"  {100 * t / total_time:5.1f}%  {per:6.2f}/req  {where}")
    json_loads = sum(r[0] for r in rows if r[2].endswith("json/__init__.py:299(loads)"))
    lines += ["", f"json.loads per request: {json_loads:.2f}"]
    return "\n".join(lines) + "\n"


def _short(file: str) -> str:
    for prefix in sorted(sys.path, key=len, reverse=True):
        if prefix and file.startswith(prefix.rstrip("/") + "/"):
            return file[len(prefix.rstrip("/")) + 1:]
    return file


def instructions(proxy: Server, out: Path, requests: int) -> str:
    """Machine instructions per request, counted by callgrind."""
    control = shutil.which("callgrind_control")
    assert control is not None
    subprocess.run([control, "-i", "on", str(proxy.pid)], check=True, capture_output=True)
    _drive(proxy, requests)
    subprocess.run([control, "-i", "off", str(proxy.pid)], check=True, capture_output=True)
    subprocess.run([control, "-d", str(proxy.pid)], check=True, capture_output=True)
    total = 0
    time.sleep(1.0)  # the dump is written by the proxy's valgrind
    for dump in out.parent.glob(out.name + ".*"):  # the dumps asked for, not the one at exit
        m = re.search(r"^totals: (\d+)", dump.read_text(errors="replace"), re.M)
        if m:
            total += int(m.group(1))
    return f"{requests} requests: {total / requests:,.0f} instructions per request\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("measure", choices=["calls", "instructions"])
    parser.add_argument("--requests", type=int, default=0,
                        help="requests measured (default 2000 for calls, 300 for instructions)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--policies", action="store_true",
                        help="KEY_POLICY on (in memory), as the bench's policies column")
    parser.add_argument("--no-log-chat", action="store_true", help="LOG_CHAT=false")
    parser.add_argument("--save", type=Path, default=None,
                        help="keep the profile (calls) or callgrind dump (instructions) here")
    args = parser.parse_args(argv)
    requests = args.requests or (2000 if args.measure == "calls" else 300)
    workdir = Path(tempfile.mkdtemp(prefix="tf-cpu-"))
    servers: list[Server] = []
    try:
        fake = start_fake(workdir, None)
        servers.append(fake)
        extra = {"PYTHONHASHSEED": "0"}
        if args.policies:
            extra["KEY_POLICY"] = BENCH_POLICY
        if args.no_log_chat:
            extra["LOG_CHAT"] = "false"
        out = workdir / ("calls.prof" if args.measure == "calls" else "callgrind.out")
        if args.measure == "calls":
            proxy = start_twisted_forward(
                fake.port, workdir, None, extra_env=extra,
                python_code=_PROFILED.format(out=str(out)),
            )
            servers.append(proxy)
        else:
            valgrind = shutil.which("valgrind")
            if valgrind is None:
                sys.stderr.write("valgrind is not installed\n")
                return 2
            proxy = start_twisted_forward(
                fake.port, workdir, None, extra_env=extra, ready_timeout=600.0,
                launcher=[valgrind, "--tool=callgrind", "--instr-atstart=no",
                          f"--callgrind-out-file={out}"],
            )
            servers.append(proxy)
        _drive(proxy, args.warmup)
        if args.measure == "calls":
            report = calls(proxy, out, requests, args.top)
        else:
            report = instructions(proxy, out, requests)
    finally:
        for server in reversed(servers):
            server.stop(timeout=120.0)
    sys.stdout.write(report)
    if args.save is not None:
        for dump in workdir.glob(out.name + "*"):
            shutil.copy(dump, args.save.parent / (args.save.name + dump.name[len(out.name):]))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
