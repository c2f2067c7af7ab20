"""
The benchmark runner: ``python -m bench`` measures, in one run and against
one fake upstream, the upstream directly, twisted-forward, and openai-forward
0.8.1, prints a table and writes it (with the raw numbers) to
``bench/results/``.

CPU placement on a machine with two or more cores: the proxies under test get
CPU 0 to themselves; the load generator (wrk or this process) and the fake
upstream share CPU 1.  Each proxy is one process, so one core is all it can
use; pinning keeps the load generator's CPU time out of the proxy's.  The
``--workers`` row is the exception: it is not pinned and shares the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from . import client
from .targets import (
    HOST,
    REPO,
    Server,
    StartError,
    ensure_openai_forward,
    pinning,
    start_fake,
    start_openai_forward,
    start_twisted_forward,
)

RESULTS = REPO / "bench" / "results"
DEFAULT_VENV = REPO / "bench" / ".venv-openai-forward"
MiB = 1 << 20
KiB = 1 << 10

DIRECT, TF, OF = "direct", "twisted-forward", "openai-forward"


@dataclass
class Settings:
    """What a run does; ``--quick`` shrinks every count and duration."""

    rps_seconds: float = 10.0
    rps_connections: int = 32
    latency_requests: int = 2000
    streams: int = 1000
    stream_events: int = 20
    stream_interval_ms: float = 50.0
    open_streams: int = 3000
    upload_mib: int = 100
    answer_mib: int = 200
    slow_rate_mib: float = 40.0
    workers: int = 2
    timeout: float = 60.0

    @classmethod
    def quick(cls) -> "Settings":
        return cls(
            rps_seconds=0.5,
            latency_requests=100,
            streams=20,
            stream_events=3,
            stream_interval_ms=10.0,
            open_streams=50,
            upload_mib=4,
            answer_mib=8,
            slow_rate_mib=64.0,
            workers=0,
            timeout=20.0,
        )


@dataclass
class Run:
    """Everything measured, keyed by measure then target."""

    settings: Settings
    machine: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    values: dict[str, dict[str, Any]] = field(default_factory=dict)

    def put(self, measure: str, target: str, value: Any) -> None:
        self.values.setdefault(measure, {})[target] = value

    def get(self, measure: str, target: str) -> Any:
        return self.values.get(measure, {}).get(target)


def say(text: str) -> None:
    """Progress on stderr, so stdout holds only the table."""
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


# ---------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import twisted

        twisted_version = twisted.__version__
    except ImportError:  # pragma: no cover
        twisted_version = "?"
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) // 1024 // 1024 + 1} GiB"
    except OSError:
        pass
    return {
        "cpu": model,
        "nproc": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted_version,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": _loadavg(),
    }


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


# ---------------------------------------------------------------- measures


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, int(round(p / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def measure_latency(run: Run, targets: dict[str, Server]) -> None:
    """One request at a time, the targets interleaved request by request."""
    n = run.settings.latency_requests
    clients = {name: client.KeepAliveClient(HOST, s.port) for name, s in targets.items()}
    requests = {name: client.chat_request(HOST, s.port) for name, s in targets.items()}
    samples: dict[str, list[float]] = {name: [] for name in targets}
    errors = {name: 0 for name in targets}
    warmup = max(20, n // 10)
    for i in range(warmup + n):
        for name, c in clients.items():
            status, ns = c.request(requests[name])
            if i >= warmup:
                if status == 200:
                    samples[name].append(ns / 1e6)
                else:
                    errors[name] += 1
    for c in clients.values():
        c.close()
    for name, ms in samples.items():
        run.put("latency_p50_ms", name, percentile(ms, 50))
        run.put("latency_p99_ms", name, percentile(ms, 99))
        run.put("latency_errors", name, errors[name])


def find_wrk(use_wrk: bool) -> Optional[str]:
    """wrk's path when it is installed and wanted."""
    return shutil.which("wrk") if use_wrk else None


def _wrk(wrk: str, port: int, seconds: float, connections: int, cpus: Optional[set[int]],
         script: Path) -> tuple[float, int, str]:
    result = subprocess.run(
        [wrk, "-t1", f"-c{connections}", f"-d{max(1, int(round(seconds)))}s", "-s", str(script),
         f"http://{HOST}:{port}/v1/chat/completions"],
        capture_output=True, text=True, timeout=seconds + 60, preexec_fn=pinning(cpus),
    )
    out = result.stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if result.returncode != 0 or not match:
        raise RuntimeError(f"wrk failed: {result.stderr or out}")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors:.*", out)
    return float(match.group(1)), int(bad.group(1)) if bad else 0, (
        socket_errors.group(0) if socket_errors else ""
    )


def wrk_script(workdir: Path) -> Path:
    """The wrk script sending the same chat request as the Python drivers."""
    request = client.chat_request(HOST, 0)
    head, body = request.split(b"\r\n\r\n", 1)
    headers = [
        line.split(b": ", 1) for line in head.split(b"\r\n")[1:]
        if not line.lower().startswith((b"host:", b"content-length:"))
    ]
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(body.decode())}"]
    for name, value in headers:
        lines.append(f"wrk.headers[{json.dumps(name.decode())}] = {json.dumps(value.decode())}")
    path = workdir / "chat.lua"
    path.write_text("\n".join(lines) + "\n")
    return path


def measure_rps(run: Run, name: str, server: Server, wrk: Optional[str], cpus: Optional[set[int]],
                workdir: Path, measure: str = "rps") -> None:
    """Requests/s of small non-stream chat at N keep-alive connections."""
    s = run.settings
    if wrk:
        script = wrk_script(workdir)
        _wrk(wrk, server.port, 1, s.rps_connections, cpus, script)  # warm-up
        rps, bad, socket_errors = _wrk(wrk, server.port, s.rps_seconds, s.rps_connections, cpus, script)
        run.put(measure, name, rps)
        run.put(measure + "_errors", name, bad)
        if socket_errors:
            run.notes.append(f"wrk against {name}: {socket_errors}")
        return
    request = client.chat_request(HOST, server.port)
    asyncio.run(client.rps_python(HOST, server.port, request, s.rps_connections,
                                  min(1.0, s.rps_seconds / 2)))  # warm-up
    rps, ok, bad = asyncio.run(
        client.rps_python(HOST, server.port, request, s.rps_connections, s.rps_seconds)
    )
    run.put(measure, name, rps)
    run.put(measure + "_errors", name, bad)


def measure_streams(run: Run, name: str, server: Server) -> None:
    """N concurrent SSE streams: how many came whole, and how long they took."""
    s = run.settings
    results = asyncio.run(
        client.run_streams(HOST, server.port, s.streams, s.stream_events,
                           s.stream_interval_ms, s.timeout)
    )
    seconds = [r.seconds for r in results if r.whole]
    run.put("streams_whole", name, sum(1 for r in results if r.whole))
    run.put("streams_p50_s", name, percentile(seconds, 50) if seconds else None)
    run.put("streams_p99_s", name, percentile(seconds, 99) if seconds else None)
    errors = [r.error for r in results if not r.whole]
    if errors:
        run.notes.append(f"streams through {name}: {len(errors)} not whole, e.g. {errors[0]}")


def measure_open_streams(run: Run, name: str, server: Server) -> None:
    """Resident memory per open stream, with thousands of streams open.

    A third of the streams are opened first; the figure is the growth from
    there to all of them, divided by the streams added, so one-time costs
    (buffers, pools, the allocator's first arenas) do not count.
    """
    s = run.settings
    pids = client.process_tree(server.pid)
    first = max(1, s.open_streams // 3)

    async def go() -> tuple[int, int, int, int, int]:
        held = client.HeldStreams(HOST, server.port, hold_s=s.timeout + 30)
        deadline = time.perf_counter() + s.timeout
        start = client.rss_bytes(pids)
        more = await held.add(first, deadline)
        await asyncio.sleep(0.5)  # let the proxy finish what the last events started
        opened_first = held.opened
        middle = client.rss_bytes(pids)
        if more:
            await held.add(s.open_streams - first, deadline)
            await asyncio.sleep(0.5)
        end = client.rss_bytes(pids)
        opened = held.opened
        held.close()
        await asyncio.sleep(0.2)  # let the aborts go out before the loop ends
        return start, middle, end, opened_first, opened

    start, middle, end, opened_first, opened = asyncio.run(go())
    run.put("open_streams", name, opened)
    if opened > opened_first:
        run.put("open_stream_bytes", name, (end - middle) / (opened - opened_first))
    else:
        run.put("open_stream_bytes", name, (end - start) / max(1, opened))
    if opened < s.open_streams:
        run.notes.append(
            f"open streams through {name}: only {opened}/{s.open_streams} had their first event "
            f"(opened by batches of 100, each given 10 s); the memory figure is then the "
            f"average over those, with the waiting connections' memory in it"
        )


def warm_up(server: Server) -> None:
    """A few requests and streams, so a fresh process has its code paths and
    connection pool warm before its memory is measured."""
    c = client.KeepAliveClient(HOST, server.port)
    request = client.chat_request(HOST, server.port)
    for _ in range(50):
        c.request(request)
    c.close()
    asyncio.run(client.run_streams(HOST, server.port, 20, 2, 1, 30))


def measure_upload(run: Run, name: str, server: Server) -> None:
    """Peak memory growth while a large multipart upload passes through."""
    size = run.settings.upload_mib * MiB
    with client.RssSampler(server.pid) as sampler:
        status, body, sent = client.upload(HOST, server.port, size, timeout=run.settings.timeout * 3)
    ok = status == 200 and f'"received":{sent}'.encode() in body.replace(b" ", b"")
    run.put("upload_growth", name, sampler.growth)
    run.put("upload_ok", name, ok)
    if not ok:
        run.notes.append(f"upload through {name}: status {status}, answer {body[:120]!r}")


def measure_slow_reader(run: Run, name: str, server: Server) -> None:
    """Peak memory growth while a large answer goes to a slow reader."""
    size = run.settings.answer_mib * MiB
    rate = run.settings.slow_rate_mib * MiB
    with client.RssSampler(server.pid) as sampler:
        status, got, seconds = client.slow_read(
            HOST, server.port, size, rate, timeout=size / rate * 3 + 30
        )
    run.put("slow_growth", name, sampler.growth)
    run.put("slow_ok", name, status == 200 and got == size)
    run.put("slow_seconds", name, seconds)
    if not (status == 200 and got == size):
        run.notes.append(f"slow reader through {name}: status {status}, {got}/{size} bytes")


# ---------------------------------------------------------------- table


def _ms(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.2f} ms"


def _plus(v: Optional[float], base: Optional[float], unit: str = "ms", scale: float = 1.0) -> str:
    if v is None or base is None:
        return "–"
    return f"+{(v - base) * scale:.2f} {unit}"


def _mib(v: Optional[float]) -> str:
    return "–" if v is None else f"{v / MiB:.1f} MiB"


def _verdict(ok: Optional[bool], detail: str = "") -> str:
    if ok is None:
        return "n/a"
    return ("yes" if ok else "**no**") + (f" ({detail})" if detail else "")


def table(run: Run, present: list[str]) -> list[list[str]]:
    """The rows of the result table: measure, one column a target, target, met."""
    s = run.settings
    g = run.get
    rows: list[list[str]] = []

    def col(target: str, text: str) -> str:
        return text if target in present else "–"

    rps = {t: g("rps", t) for t in (DIRECT, TF, OF)}
    ratio = rps[TF] / rps[OF] if rps[TF] and rps[OF] else None
    rows.append([
        f"chat requests/s, {s.rps_connections} connections",
        *(col(t, f"{rps[t]:,.0f}" if rps[t] else "–") for t in (DIRECT, TF, OF)),
        "≥ 3x openai-forward (aim 4x)",
        _verdict(None if ratio is None else ratio >= 3, f"{ratio:.1f}x" if ratio else ""),
    ])
    base50, base99 = g("latency_p50_ms", DIRECT), g("latency_p99_ms", DIRECT)
    rows.append([
        "added latency p50, one request at a time",
        col(DIRECT, f"{_ms(base50)} (base)"),
        col(TF, _plus(g("latency_p50_ms", TF), base50)),
        col(OF, _plus(g("latency_p50_ms", OF), base50)),
        "≤ 1.0 ms (aim 0.5 ms)",
        _verdict(None if g("latency_p50_ms", TF) is None else g("latency_p50_ms", TF) - base50 <= 1.0),
    ])
    rows.append([
        "added latency p99, one request at a time",
        col(DIRECT, f"{_ms(base99)} (base)"),
        col(TF, _plus(g("latency_p99_ms", TF), base99)),
        col(OF, _plus(g("latency_p99_ms", OF), base99)),
        "",
        "",
    ])
    n = s.streams
    whole = {t: g("streams_whole", t) for t in (DIRECT, TF, OF)}
    rows.append([
        f"{n} concurrent SSE streams ({s.stream_events} events {s.stream_interval_ms:g} ms apart) whole",
        *(col(t, f"{whole[t]}/{n}" if whole[t] is not None else "–") for t in (DIRECT, TF, OF)),
        f"{n}/{n}",
        _verdict(None if whole[TF] is None else whole[TF] == n),
    ])
    sb50, sb99 = g("streams_p50_s", DIRECT), g("streams_p99_s", DIRECT)
    rows.append([
        "stream duration, added p50",
        col(DIRECT, f"{sb50:.2f} s (base)" if sb50 is not None else "–"),
        col(TF, _plus(g("streams_p50_s", TF), sb50, "s")),
        col(OF, _plus(g("streams_p50_s", OF), sb50, "s")),
        "",
        "",
    ])
    tf99 = g("streams_p99_s", TF)
    rows.append([
        "stream duration, added p99",
        col(DIRECT, f"{sb99:.2f} s (base)" if sb99 is not None else "–"),
        col(TF, _plus(tf99, sb99, "s")),
        col(OF, _plus(g("streams_p99_s", OF), sb99, "s")),
        "≤ 1.5 s",
        _verdict(None if tf99 is None or sb99 is None else tf99 - sb99 <= 1.5),
    ])

    def per_stream(t: str) -> str:
        v = g("open_stream_bytes", t)
        if v is None or t not in present:
            return "–"
        opened = g("open_streams", t)
        extra = "" if opened == s.open_streams else f" ({opened} opened)"
        return f"{v / KiB:.2f} KiB{extra}"

    tfs = g("open_stream_bytes", TF)
    rows.append([
        f"memory per open stream, {s.open_streams} open",
        "–", per_stream(TF), per_stream(OF),
        "< 16 KiB",
        _verdict(None if tfs is None else tfs < 16 * KiB and g("open_streams", TF) == s.open_streams),
    ])
    for key, ok_key, label in (
        ("upload_growth", "upload_ok", f"memory growth, {s.upload_mib} MiB upload"),
        ("slow_growth", "slow_ok", f"memory growth, {s.answer_mib} MiB answer to a slow reader"),
    ):
        def cell(t: str, key: str = key, ok_key: str = ok_key) -> str:
            v = g(key, t)
            if v is None or t not in present:
                return "–"
            return _mib(v) + ("" if g(ok_key, t) else " (failed)")

        v = g(key, TF)
        rows.append([
            label, "–", cell(TF), cell(OF), "< 32 MiB",
            _verdict(None if v is None else v < 32 * MiB and bool(g(ok_key, TF))),
        ])
    if g("rps_workers", TF) is not None:
        w = g("rps_workers", TF)
        ratio_w = w / rps[OF] if rps[OF] else None
        rows.append([
            f"chat requests/s, --workers {s.workers} (not pinned)",
            "–", f"{w:,.0f}", "–", "",
            f"{ratio_w:.1f}x openai-forward" if ratio_w else "",
        ])
    return rows


def render(run: Run, present: list[str], driver: str, pinned: str) -> str:
    """The markdown report: machine, method, table, notes."""
    m = run.machine
    head = ["measure", "direct", "twisted-forward", "openai-forward 0.8.1", "target", "met"]
    rows = table(run, present)
    out = [
        f"Measured {m['date']} on {m['nproc']} × {m['cpu']}, {m['memory']} RAM, "
        f"Linux {m['kernel']}, Python {m['python']}, Twisted {m['twisted']} "
        f"(load average {m['loadavg_start']} at the start, {m.get('loadavg_end', '?')} at the end).",
        f"Load driver: {driver}. {pinned}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    if run.notes:
        out.append("")
        out += [f"- {note}" for note in run.notes]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of a few seconds (tiny counts; no openai-forward unless its venv exists)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where latest.md and latest.json go")
    parser.add_argument("--no-openai-forward", action="store_true", help="skip the openai-forward column")
    parser.add_argument("--openai-forward-venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--no-wrk", action="store_true", help="use the Python load driver even if wrk is installed")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--rps-seconds", type=float)
    parser.add_argument("--latency-requests", type=int)
    parser.add_argument("--streams", type=int)
    parser.add_argument("--open-streams", type=int)
    parser.add_argument("--upload-mib", type=int)
    parser.add_argument("--answer-mib", type=int)
    parser.add_argument("--workers", type=int, help="also measure --workers N (0: skip)")
    parser.add_argument("--port-options", default=None,
                        help=(
                            "endpoint options for twisted-forward after tcp:PORT:interface=127.0.0.1, "
                            "e.g. backlog=1024"
                        ))
    parser.add_argument("--keep", action="store_true", help="keep the work directory (server logs)")
    parser.add_argument("--only", default="", help="comma list of: latency,rps,streams,open,upload,slow,workers")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    for name in ("rps_seconds", "latency_requests", "streams", "open_streams",
                 "upload_mib", "answer_mib", "workers"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    only = set(filter(None, args.only.split(",")))

    def wanted(step: str) -> bool:
        return not only or step in only

    run = Run(settings, machine_info())
    cpus = os.cpu_count() or 1
    if cpus >= 2 and not args.no_pin:
        proxy_cpus: Optional[set[int]] = {0}
        load_cpus: Optional[set[int]] = {1}
        pinned = ("Each proxy pinned to CPU 0; the load generator and the fake upstream "
                  "pinned to CPU 1 (sched_setaffinity, as taskset -c does).")
        os.sched_setaffinity(0, load_cpus)
    else:
        proxy_cpus = load_cpus = None
        pinned = "Not pinned: the load generator competes with the proxy for the same cores."
    wrk = find_wrk(not args.no_wrk)
    driver = (f"wrk -t1 -c{settings.rps_connections} for requests/s, Python drivers for the rest"
              if wrk else "Python asyncio driver (wrk not installed)")

    workdir = Path(tempfile.mkdtemp(prefix="tf-bench-"))
    servers: list[Server] = []
    targets: dict[str, Server] = {}
    try:
        say(f"work directory {workdir}")
        fake = start_fake(workdir, load_cpus)
        servers.append(fake)
        targets[DIRECT] = fake
        starters: dict[str, Callable[[], Server]] = {
            TF: lambda: start_twisted_forward(fake.port, workdir, proxy_cpus,
                                              port_options=args.port_options),
        }
        if args.port_options:
            pinned += f" twisted-forward listens on tcp:PORT:interface=127.0.0.1:{args.port_options}."
        if not args.no_openai_forward:
            python = ensure_openai_forward(args.openai_forward_venv, create=not args.quick, log=say)
            if python is None:
                run.notes.append("openai-forward 0.8.1 not installed: its column is empty "
                                 "(run without --quick to create its virtualenv)")
            else:
                starters[OF] = lambda: start_openai_forward(python, fake.port, workdir, proxy_cpus)
        for name, start in starters.items():
            targets[name] = start()
            servers.append(targets[name])
        present = list(targets)

        def fresh(name: str) -> Server:
            """A new process for a memory measure, so earlier runs' memory
            (and anything they left open) does not count."""
            old = targets[name]
            old.stop()
            servers.remove(old)
            new = targets[name] = starters[name]()
            servers.append(new)
            warm_up(new)
            return new

        if wanted("latency"):
            say(f"latency: {settings.latency_requests} requests one at a time, targets interleaved")
            measure_latency(run, targets)
        if wanted("rps"):
            for name, server in list(targets.items()):
                say(f"requests/s: {name}")
                measure_rps(run, name, server, wrk, load_cpus, workdir)
        if wanted("streams"):
            for name, server in list(targets.items()):
                say(f"{settings.streams} concurrent streams: {name}")
                measure_streams(run, name, server)
        for step, measure, label in (
            ("open", measure_open_streams, f"{settings.open_streams} open streams"),
            ("upload", measure_upload, f"{settings.upload_mib} MiB upload"),
            ("slow", measure_slow_reader, f"{settings.answer_mib} MiB answer to a slow reader"),
        ):
            if wanted(step):
                for name in starters:
                    say(f"{label}: {name} (fresh process)")
                    measure(run, name, fresh(name))
        if settings.workers and wanted("workers"):
            say(f"requests/s with --workers {settings.workers}")
            targets[TF].stop()
            servers.remove(targets[TF])
            every_cpu = set(range(cpus))  # this process is pinned: do not inherit it
            workers = start_twisted_forward(fake.port, workdir, every_cpu, workers=settings.workers,
                                            name=f"twisted-forward-workers-{settings.workers}",
                                            port_options=args.port_options)
            servers.append(workers)
            measure_rps(run, TF, workers, wrk, load_cpus, workdir, measure="rps_workers")
    except StartError as e:
        say(str(e))
        return 2
    finally:
        for server in reversed(servers):
            server.stop()
    run.machine["loadavg_end"] = _loadavg()
    report = render(run, present, driver, pinned)
    sys.stdout.write(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.md").write_text(report)
    (args.out / "latest.json").write_text(json.dumps(
        {"machine": run.machine, "settings": run.settings.__dict__, "values": run.values,
         "notes": run.notes, "driver": driver, "pinning": pinned},
        indent=2, default=str,
    ) + "\n")
    if args.keep:
        say(f"server logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    say(f"written to {args.out / 'latest.md'}")
    return 0
