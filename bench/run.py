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
    UPSTREAMS,
    Server,
    StartError,
    ensure_openai_forward,
    pinning,
    start_fake,
    start_nginx,
    start_openai_forward,
    start_redis,
    start_twisted_forward,
)

RESULTS = REPO / "bench" / "results"
DEFAULT_VENV = REPO / "bench" / ".venv-openai-forward"
MiB = 1 << 20
KiB = 1 << 10

DIRECT, NGINX, TF, OF = "direct", "nginx", "twisted-forward", "openai-forward"
TFP, TFR = "tf-policies-memory", "tf-policies-redis"
#: Column order and headings.
COLUMNS = {
    DIRECT: "direct",
    NGINX: "nginx (1 worker)",
    TF: "twisted-forward",
    TFP: "twisted-forward, policies in memory",
    TFR: "twisted-forward, policies in Redis",
    OF: "openai-forward 0.8.1",
}
#: KEY_POLICY for the policies rows: every limit on, too high to refuse.
BENCH_POLICY = (
    '{"bench": {"rpm": 100000000, "tpm": 100000000000, "max_parallel": 100000, '
    '"tokens_per_day": 1000000000000}}'
)


@dataclass
class Settings:
    """What a run does; ``--quick`` shrinks every count and duration."""

    rps_seconds: float = 10.0
    rps_connections: int = 32
    latency_requests: int = 2000
    streams: int = 1000
    stream_events: int = 20
    stream_interval_ms: float = 50.0
    open_streams: int = 10000
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
    cores = ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(
            (k.strip(), v.strip()) for k, _, v in
            (line.partition(":") for line in lscpu.splitlines()) if v
        )
        model = fields.get("Model name", model)
        cores = (f"{fields.get('CPU(s)', '?')} CPUs, {fields.get('Core(s) per socket', '?')} "
                 f"core(s) per socket, {fields.get('Thread(s) per core', '?')} thread(s) per core")
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu": model,
        "cores": cores,
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
    requests = {name: client.chat_request(HOST, s.port, key=s.key) for name, s in targets.items()}
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


def wrk_script(workdir: Path, key: str = client.CLIENT_KEY) -> Path:
    """The wrk script sending the same chat request as the Python drivers."""
    request = client.chat_request(HOST, 0, key=key)
    head, body = request.split(b"\r\n\r\n", 1)
    headers = [
        line.split(b": ", 1) for line in head.split(b"\r\n")[1:]
        if not line.lower().startswith((b"host:", b"content-length:"))
    ]
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(body.decode())}"]
    for name, value in headers:
        lines.append(f"wrk.headers[{json.dumps(name.decode())}] = {json.dumps(value.decode())}")
    path = workdir / f"chat-{key}.lua"
    path.write_text("\n".join(lines) + "\n")
    return path


def measure_rps(run: Run, name: str, server: Server, wrk: Optional[str], cpus: Optional[set[int]],
                workdir: Path, measure: str = "rps") -> None:
    """Requests/s of small non-stream chat at N keep-alive connections."""
    s = run.settings
    if wrk:
        script = wrk_script(workdir, server.key)
        _wrk(wrk, server.port, 1, s.rps_connections, cpus, script)  # warm-up
        rps, bad, socket_errors = _wrk(wrk, server.port, s.rps_seconds, s.rps_connections, cpus, script)
        run.put(measure, name, rps)
        run.put(measure + "_errors", name, bad)
        if socket_errors:
            run.notes.append(f"wrk against {name}: {socket_errors}")
        return
    request = client.chat_request(HOST, server.port, key=server.key)
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
                           s.stream_interval_ms, s.timeout, key=server.key)
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
        held = client.HeldStreams(HOST, server.port, hold_s=s.timeout + 90, key=server.key)
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
    request = client.chat_request(HOST, server.port, key=server.key)
    for _ in range(50):
        c.request(request)
    c.close()
    asyncio.run(client.run_streams(HOST, server.port, 20, 2, 1, 30, key=server.key))


def measure_upload(run: Run, name: str, server: Server, raw: bool = False) -> None:
    """Peak memory growth while a large upload to a recorded route
    (``/v1/audio/transcriptions``) passes through: multipart as the SDK
    sends it, or one raw ``application/octet-stream`` body."""
    size = run.settings.upload_mib * MiB
    key = "raw_upload" if raw else "upload"
    with client.RssSampler(server.pid) as sampler:
        status, body, sent = client.upload(HOST, server.port, size, timeout=run.settings.timeout * 3,
                                           raw=raw, key=server.key)
    ok = status == 200 and f'"received":{sent}'.encode() in body.replace(b" ", b"")
    run.put(key + "_growth", name, sampler.growth)
    run.put(key + "_ok", name, ok)
    if not ok:
        run.notes.append(f"{key.replace('_', ' ')} through {name}: status {status}, answer {body[:120]!r}")


def measure_raw_upload(run: Run, name: str, server: Server) -> None:
    """:func:`measure_upload` with a raw ``application/octet-stream`` body."""
    measure_upload(run, name, server, raw=True)


def measure_slow_reader(run: Run, name: str, server: Server) -> None:
    """Peak memory growth while a large answer goes to a slow reader."""
    size = run.settings.answer_mib * MiB
    rate = run.settings.slow_rate_mib * MiB
    with client.RssSampler(server.pid) as sampler:
        status, got, seconds = client.slow_read(
            HOST, server.port, size, rate, timeout=size / rate * 3 + 30, key=server.key
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
    return f"{(v - base) * scale:+.2f} {unit}"


def _mib(v: Optional[float]) -> str:
    return "–" if v is None else f"{v / MiB:.1f} MiB"


def _verdict(ok: Optional[bool], detail: str = "") -> str:
    if ok is None:
        return "n/a"
    return ("yes" if ok else "**no**") + (f" ({detail})" if detail else "")


def table(run: Run, present: list[str]) -> tuple[list[str], list[list[str]]]:
    """The head and rows of the result table: measure, one column a
    target, the target, met."""
    s = run.settings
    g = run.get
    columns = [c for c in COLUMNS if c in present]
    rows: list[list[str]] = []

    def cells(fn: Callable[[str], str]) -> list[str]:
        return [fn(t) for t in columns]

    def num(measure: str, fmt: str) -> Callable[[str], str]:
        def cell(t: str) -> str:
            v = g(measure, t)
            return "–" if v is None else format(v, fmt)
        return cell

    rps_tf, rps_of = g("rps", TF), g("rps", OF)
    ratio = rps_tf / rps_of if rps_tf and rps_of else None
    rows.append([
        f"chat requests/s, {s.rps_connections} connections", *cells(num("rps", ",.0f")),
        "≥ 4x openai-forward (aim 5x)",
        _verdict(None if ratio is None else ratio >= 4, f"{ratio:.1f}x" if ratio else ""),
    ])

    def share(t: str) -> str:
        v = g("rps", t)
        return "–" if v is None or not rps_tf else f"{v / rps_tf:.2f}"

    pol = [(t, floor) for t, floor in ((TFP, 0.9), (TFR, 0.7)) if g("rps", t) is not None]
    pol_ok = None if not pol or not rps_tf else all(g("rps", t) / rps_tf >= f for t, f in pol)
    rows.append([
        "requests/s ÷ twisted-forward's (same run)", *cells(share),
        "policies: memory ≥ 0.90, Redis ≥ 0.70",
        _verdict(pol_ok, ", ".join(f"{g('rps', t) / rps_tf:.2f}" for t, _ in pol) if pol_ok is not None else ""),
    ])
    base50, base99 = g("latency_p50_ms", DIRECT), g("latency_p99_ms", DIRECT)

    def added(measure: str, base: Optional[float]) -> Callable[[str], str]:
        def cell(t: str) -> str:
            if t == DIRECT:
                return f"{_ms(base)} (base)"
            return _plus(g(measure, t), base)
        return cell

    tf50 = g("latency_p50_ms", TF)
    nginx_added = None if g("latency_p50_ms", NGINX) is None or base50 is None else (
        g("latency_p50_ms", NGINX) - base50)
    detail = ""
    if tf50 is not None and base50 is not None and nginx_added:
        detail = f"{(tf50 - base50) / max(nginx_added, 0.001):.1f}x nginx's"
    rows.append([
        "added latency p50, one request at a time", *cells(added("latency_p50_ms", base50)),
        "≤ 1.0 ms (aim 3x nginx's)",
        _verdict(None if tf50 is None or base50 is None else tf50 - base50 <= 1.0, detail),
    ])
    rows.append([
        "added latency p99, one request at a time", *cells(added("latency_p99_ms", base99)), "", "",
    ])
    n = s.streams

    def whole(t: str) -> str:
        v = g("streams_whole", t)
        return "–" if v is None else f"{v}/{n}"

    rows.append([
        f"{n} concurrent SSE streams ({s.stream_events} events {s.stream_interval_ms:g} ms apart) whole",
        *cells(whole), f"{n}/{n}",
        _verdict(None if g("streams_whole", TF) is None else g("streams_whole", TF) == n),
    ])
    sb50, sb99 = g("streams_p50_s", DIRECT), g("streams_p99_s", DIRECT)

    def added_s(measure: str, base: Optional[float]) -> Callable[[str], str]:
        def cell(t: str) -> str:
            if t == DIRECT:
                return "–" if base is None else f"{base:.2f} s (base)"
            return _plus(g(measure, t), base, "s")
        return cell

    rows.append(["stream duration, added p50", *cells(added_s("streams_p50_s", sb50)), "", ""])
    tf99 = g("streams_p99_s", TF)
    rows.append([
        "stream duration, added p99", *cells(added_s("streams_p99_s", sb99)), "≤ 1.0 s",
        _verdict(None if tf99 is None or sb99 is None else tf99 - sb99 <= 1.0),
    ])

    def per_stream(t: str) -> str:
        v = g("open_stream_bytes", t)
        if v is None:
            return "–"
        opened = g("open_streams", t)
        extra = "" if opened == s.open_streams else f" ({opened} opened)"
        return f"{v / KiB:.2f} KiB{extra}"

    tfs = g("open_stream_bytes", TF)
    rows.append([
        f"memory per open stream, {s.open_streams:,} open", *cells(per_stream), "≤ 16 KiB (aim 12)",
        _verdict(None if tfs is None else tfs <= 16 * KiB and g("open_streams", TF) == s.open_streams),
    ])
    for key, label in (
        ("upload", f"memory growth, {s.upload_mib} MiB multipart upload to /v1/audio/transcriptions"),
        ("raw_upload", f"memory growth, {s.upload_mib} MiB application/octet-stream upload "
                       "to /v1/audio/transcriptions"),
        ("slow", f"memory growth, {s.answer_mib} MiB answer to a slow reader"),
    ):
        def cell(t: str, key: str = key) -> str:
            v = g(key + "_growth", t)
            if v is None:
                return "–"
            return _mib(v) + ("" if g(key + "_ok", t) else " (failed)")

        v = g(key + "_growth", TF)
        rows.append([
            label, *cells(cell), "< 32 MiB",
            _verdict(None if v is None else v < 32 * MiB and bool(g(key + "_ok", TF))),
        ])
    if g("rps_workers", TF) is not None:
        w = g("rps_workers", TF)
        ratio_w = w / rps_tf if rps_tf else None

        def wcell(t: str) -> str:
            return f"{w:,.0f}" if t == TF else "–"

        rows.append([
            f"chat requests/s, --workers {s.workers}", *cells(wcell),
            "≥ 1.8x one worker",
            _verdict(None if ratio_w is None else ratio_w >= 1.8,
                     f"{ratio_w:.2f}x" if ratio_w else ""),
        ])
    head = ["measure", *(COLUMNS[c] for c in columns), "target", "met"]
    return head, rows


def render(run: Run, present: list[str], driver: str, pinned: str) -> str:
    """The markdown report: machine, method, table, notes."""
    m = run.machine
    head, rows = table(run, present)
    out = [
        f"Measured {m['date']} on {m['cpu']} ({m.get('cores') or str(m['nproc']) + ' CPUs'}), "
        f"{m['memory']} RAM, Linux {m['kernel']}, Python {m['python']}, Twisted {m['twisted']}; "
        f"load average {m['loadavg_start']} at the start, {m.get('loadavg_end', '?')} at the end.",
        f"Upstream: {m.get('upstream', 'raw')} fake upstream. Load driver: {driver}. {pinned}",
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
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the table and raw numbers go")
    parser.add_argument("--no-openai-forward", action="store_true", help="skip the openai-forward column")
    parser.add_argument("--openai-forward-venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx column")
    parser.add_argument("--no-policies", action="store_true",
                        help="skip the twisted-forward columns with policies on")
    parser.add_argument("--no-wrk", action="store_true", help="use the Python load driver even if wrk is installed")
    parser.add_argument("--pin", action="store_true",
                        help="pin the proxies to CPU 0, the load and the upstream to CPU 1 (the second table)")
    parser.add_argument("--no-pin", action="store_true", help="(the default) nothing pinned")
    parser.add_argument("--upstream", choices=sorted(UPSTREAMS), default="aiohttp",
                        help="the fake upstream: aiohttp (the headline) or raw asyncio")
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
    parser.add_argument("--only", default="",
                        help="comma list of: latency,rps,streams,open,upload,rawupload,slow,workers")
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

    soft, hard = client.raise_nofile()
    run = Run(settings, machine_info())
    # One open stream holds two descriptors in the proxy (client and
    # upstream), and its connection caps follow the limit: past what the
    # hard limit allows, the proxy would refuse streams (503) by design.
    from twisted_forward.limits import default_caps

    most = default_caps(hard)[0] - 100  # room for the warm-up's pooled connections
    if settings.open_streams > most:
        run.notes.append(
            f"open streams: {settings.open_streams:,} asked, {most:,} measured: the hard "
            f"descriptor limit here is {hard} (not raisable without CAP_SYS_RESOURCE), "
            f"and each stream holds two descriptors in the proxy"
        )
        settings.open_streams = most
    run.machine["upstream"] = args.upstream
    run.machine["nofile"] = f"{soft}/{hard}"
    cpus = os.cpu_count() or 1
    if cpus >= 2 and args.pin:
        proxy_cpus: Optional[set[int]] = {0}
        load_cpus: Optional[set[int]] = {1}
        pinned = ("Pinned: each proxy (nginx too) on CPU 0; the load generator, the fake upstream "
                  "and redis-server on CPU 1 (sched_setaffinity, as taskset -c does).")
        os.sched_setaffinity(0, load_cpus)
    else:
        proxy_cpus = load_cpus = None
        pinned = ("Not pinned (as users deploy): the load generator, the upstream and the proxy "
                  "share the cores.")
    pinned += f" Descriptor limit of the bench (and its children) {soft} (hard {hard})."
    wrk = find_wrk(not args.no_wrk)
    driver = (f"wrk -t1 -c{settings.rps_connections} for requests/s, Python drivers for the rest"
              if wrk else "Python asyncio driver (wrk not installed)")

    workdir = Path(tempfile.mkdtemp(prefix="tf-bench-"))
    servers: list[Server] = []
    targets: dict[str, Server] = {}
    present: list[str] = []
    try:
        say(f"work directory {workdir}")
        fake = start_fake(workdir, load_cpus, kind=args.upstream)
        servers.append(fake)
        targets[DIRECT] = fake
        if not args.no_nginx:
            nginx = start_nginx(fake.port, workdir, proxy_cpus)
            if nginx is None:
                run.notes.append("nginx not installed (apt-get install nginx-light): its column is empty")
            else:
                servers.append(nginx)
                targets[NGINX] = nginx
        starters: dict[str, Callable[[], Server]] = {
            TF: lambda: start_twisted_forward(fake.port, workdir, proxy_cpus,
                                              port_options=args.port_options),
        }
        if not args.no_policies:
            starters[TFP] = lambda: start_twisted_forward(
                fake.port, workdir, proxy_cpus, name=TFP, port_options=args.port_options,
                extra_env={"KEY_POLICY": BENCH_POLICY})
            redis = start_redis(workdir, load_cpus)
            if redis is None:
                run.notes.append("redis-server not installed: the Redis policies column is empty")
            else:
                servers.append(redis)
                redis_url = f"redis://{HOST}:{redis.port}/0"
                starters[TFR] = lambda: start_twisted_forward(
                    fake.port, workdir, proxy_cpus, name=TFR, port_options=args.port_options,
                    extra_env={"KEY_POLICY": BENCH_POLICY, "REDIS_URL": redis_url})
        if args.port_options:
            pinned += f" twisted-forward listens on tcp:PORT:interface=127.0.0.1:{args.port_options}."
        if not args.no_openai_forward:
            python = ensure_openai_forward(args.openai_forward_venv, create=not args.quick, log=say)
            if python is None:
                run.notes.append("openai-forward 0.8.1 not installed: its column is empty "
                                 "(run without --quick to create its virtualenv)")
            else:
                starters[OF] = lambda: start_openai_forward(python, fake.port, workdir, proxy_cpus)
        for name, start in list(starters.items()):
            try:
                targets[name] = start()
            except StartError as e:
                if name == TF:
                    raise
                # An optional column (a store this build lacks): say so, go on.
                run.notes.append(f"{COLUMNS[name]} did not start: {str(e).splitlines()[-1]}")
                del starters[name]
                continue
            servers.append(targets[name])
        present = list(targets)
        #: The memory measures: the default configuration and its peer.
        memory_targets = [t for t in (TF, OF) if t in starters]

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
            ("upload", measure_upload, f"{settings.upload_mib} MiB multipart upload"),
            ("rawupload", measure_raw_upload, f"{settings.upload_mib} MiB raw upload"),
            ("slow", measure_slow_reader, f"{settings.answer_mib} MiB answer to a slow reader"),
        ):
            if wanted(step):
                for name in memory_targets:
                    say(f"{label}: {name} (fresh process)")
                    measure(run, name, fresh(name))
        if settings.workers and wanted("workers"):
            say(f"requests/s with --workers {settings.workers}")
            for name in list(targets):
                if name != DIRECT:  # only the upstream and the workers run now
                    targets[name].stop()
            every_cpu = set(range(cpus))
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
    stem = f"{'pinned' if args.pin else 'unpinned'}-{args.upstream}"
    for name in ("latest", stem):
        (args.out / f"{name}.md").write_text(report)
        (args.out / f"{name}.json").write_text(json.dumps(
            {"machine": run.machine, "settings": run.settings.__dict__, "values": run.values,
             "notes": run.notes, "driver": driver, "pinning": pinned},
            indent=2, default=str,
        ) + "\n")
    if args.keep:
        say(f"server logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    say(f"written to {args.out / (stem + '.md')}")
    return 0
