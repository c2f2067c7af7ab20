"""
The servers a benchmark run starts, each in its own process on 127.0.0.1:
the fake upstream, twisted-forward (the real ``twistd openai-forward``
plugin), and openai-forward 0.8.1 from PyPI in its own virtualenv.

Each process can be pinned to a set of CPUs (what ``taskset -c`` does, through
``os.sched_setaffinity`` in the child before it runs), so the proxy under test
does not fight the load generator for the same core.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from .client import CLIENT_KEY, KeepAliveClient

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
#: The key the proxies hold; the bench clients send their own ``sk-bench-…``.
BENCH_KEY = "sk-bench-proxy-default-key"
#: The forward key twisted-forward's clients send (label ``bench``), so the
#: rows with and without policies take the same path through the key rules.
FORWARD_KEY = "fk-bench0123456789abcdef"
OPENAI_FORWARD_VERSION = "0.8.1"
#: openai-forward 0.8.1 imports yaml without declaring it.
OPENAI_FORWARD_PACKAGES = [f"openai-forward=={OPENAI_FORWARD_VERSION}", "pyyaml"]


class StartError(RuntimeError):
    """A server did not come up; the text says which and why."""


def pinning(cpus: Optional[set[int]]) -> Optional[Callable[[], None]]:
    """A ``preexec_fn`` that pins the child to ``cpus`` (None: no pinning)."""
    if not cpus:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, cpus)

    return pin


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A server process the run started."""

    name: str
    port: int
    process: subprocess.Popen
    log_path: Optional[Path] = None
    notes: list[str] = field(default_factory=list)
    #: The key the bench's clients send to this target.
    key: str = CLIENT_KEY

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        """The end of the server's output, for error messages."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def wait_ready(self, timeout: float = 60.0, path: str = "/healthz") -> None:
        """Poll ``path`` until it answers 200, the process dies, or ``timeout``."""
        deadline = time.monotonic() + timeout
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        last = ""
        while time.monotonic() < deadline:
            if not self.alive():
                raise StartError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            client = KeepAliveClient(HOST, self.port, timeout=2.0)
            try:
                status, _ = client.request(request)
                if status == 200:
                    return
                last = f"status {status}"
            except OSError as e:
                last = repr(e)
            finally:
                client.close()
            time.sleep(0.05)  # polling a server that is starting up
        raise StartError(f"{self.name} not ready after {timeout}s ({last}):\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if not self.alive():
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)


#: The fake upstreams: the raw asyncio one, and one on aiohttp.
UPSTREAMS = {"raw": "bench.fake_upstream", "aiohttp": "bench.aiohttp_upstream"}


def start_fake(workdir: Path, cpus: Optional[set[int]], timeout: float = 30.0,
               kind: str = "raw") -> Server:
    """The fake upstream on a port the OS picks (read back from its first line).

    :param kind: ``raw`` or ``aiohttp`` (see :data:`UPSTREAMS`).
    """
    log_path = workdir / f"fake-upstream-{kind}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", UPSTREAMS[kind], "--host", HOST, "--port", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=open(log_path, "wb"),
        preexec_fn=pinning(cpus),
    )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline().decode() if ready else ""
    if "listening on" not in line:
        process.kill()
        process.wait()
        raise StartError(f"fake upstream did not start: {line!r} {log_path.read_text()}")
    port = int(line.rsplit(":", 1)[1])
    server = Server("fake upstream", port, process, log_path)
    server.wait_ready(timeout)
    return server


NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 32768; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size 0;
    upstream fake {{ server {host}:{upstream}; keepalive 256; }}
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def start_nginx(upstream_port: int, workdir: Path, cpus: Optional[set[int]]) -> Optional[Server]:
    """nginx from Debian's package as a reverse proxy: one worker, buffering
    off both ways, HTTP/1.1 keep-alive to the upstream.  None when nginx is
    not installed (``apt-get install nginx-light``)."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        return None
    port = free_port()
    rundir = workdir / "nginx"
    rundir.mkdir(parents=True, exist_ok=True)
    conf = rundir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=rundir, host=HOST, upstream=upstream_port, port=port))
    return _launch("nginx", port, [nginx, "-p", str(rundir), "-c", str(conf)], rundir,
                   dict(os.environ), cpus, "nginx.log")


def start_redis(workdir: Path, cpus: Optional[set[int]], timeout: float = 30.0) -> Optional[Server]:
    """A redis-server on a loopback port, persistence off; None when it is
    not installed."""
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        return None
    port = free_port()
    rundir = workdir / "redis"
    rundir.mkdir(parents=True, exist_ok=True)
    log_path = rundir / "redis.log"
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
         "--dir", str(rundir)],
        cwd=rundir, stdin=subprocess.DEVNULL, stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT, preexec_fn=pinning(cpus),
    )
    server = Server("redis", port, process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise StartError(f"redis-server exited:\n{server.log_tail()}")
        try:
            with socket.create_connection((HOST, port), 1.0) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return server
        except OSError:
            pass
        time.sleep(0.05)  # polling a server that is starting up
    server.stop()
    raise StartError("redis-server not ready")


def _launch(
    name: str,
    port: int,
    argv: list[str],
    rundir: Path,
    env: dict[str, str],
    cpus: Optional[set[int]],
    log_name: str,
    ready_timeout: float = 60.0,
) -> Server:
    """Start a proxy under test, its output in ``rundir/log_name``, and wait
    until it answers on ``port``."""
    log_path = rundir / log_name
    process = subprocess.Popen(
        argv,
        cwd=rundir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
        preexec_fn=pinning(cpus),
    )
    server = Server(name, port, process, log_path)
    server.wait_ready(ready_timeout)
    return server


def start_twisted_forward(
    upstream_port: int,
    workdir: Path,
    cpus: Optional[set[int]],
    workers: int = 0,
    extra_env: Optional[dict[str, str]] = None,
    name: str = "twisted-forward",
    port_options: Optional[str] = None,
    launcher: Sequence[str] = (),
    python_code: str = "from twisted.scripts.twistd import run; run()",
    ready_timeout: float = 60.0,
) -> Server:
    """``twistd -n openai-forward`` from this checkout, chat log on.

    :param port_options: more endpoint options after
        ``tcp:PORT:interface=127.0.0.1`` (``backlog=1024``).
    :param launcher: a command the Python is run under (``valgrind ...``).
    :param python_code: what ``python -c`` runs (twistd, maybe wrapped).
    """
    port = free_port()
    rundir = workdir / name.replace(" ", "_")
    rundir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(
                [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
            ),
            "OPENAI_BASE_URL": f"http://{HOST}:{upstream_port}",
            "OPENAI_API_KEY": BENCH_KEY,
            "LOG_CHAT": "true",
            "LOG_DIR": str(rundir / "Log"),
            "FORWARD_KEY": f"bench:{FORWARD_KEY}",
            # Every bench client comes from 127.0.0.1: the per-address share
            # (half the connections) would cap the open-streams measure.
            "MAX_CONNECTIONS_PER_CLIENT": "0",
        }
    )
    env.update(extra_env or {})
    args = [
        *launcher, sys.executable, "-c", python_code,
        "-n", "--pidfile=", "openai-forward",
        "--port", f"tcp:{port}:interface={HOST}" + (f":{port_options}" if port_options else ""),
        "--env-file", os.devnull,
    ]
    if workers:
        args += ["--workers", str(workers)]
    server = _launch(name, port, args, rundir, env, cpus, "twistd.log", ready_timeout)
    server.key = FORWARD_KEY
    return server


def ensure_openai_forward(venv: Path, create: bool, log: Callable[[str], None]) -> Optional[Path]:
    """The Python of a virtualenv holding openai-forward 0.8.1, or None.

    :param create: make (or repair) the virtualenv with pip if needed.
    """
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import yaml, uvicorn, openai_forward; print(openai_forward.__version__)"]

    def installed() -> bool:
        if not python.exists():
            return False
        result = subprocess.run(check, capture_output=True, text=True, cwd=venv)
        return result.returncode == 0 and result.stdout.strip() == OPENAI_FORWARD_VERSION

    if installed():
        return python
    if not create:
        return None
    log(f"creating {venv} with openai-forward {OPENAI_FORWARD_VERSION} (one time)")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", *OPENAI_FORWARD_PACKAGES],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        log(f"pip install failed: {result.stderr[-2000:]}")
        return None
    return python if installed() else None


def start_openai_forward(
    python: Path, upstream_port: int, workdir: Path, cpus: Optional[set[int]]
) -> Server:
    """openai-forward 0.8.1 as ``openai-forward run`` starts it, chat log on.

    ``openai-forward run --port=P`` is ``uvicorn.run("openai_forward.app:app",
    host="0.0.0.0", port=P, workers=1)``; the same call is made here with
    ``host="127.0.0.1"`` so the benchmark listens on loopback only.
    """
    port = free_port()
    rundir = workdir / "openai-forward"
    rundir.mkdir(parents=True, exist_ok=True)
    env = {
        k: v for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "OPENAI_BASE_URL", "FORWARD_CONFIG")
    }
    env.update(
        {
            "FORWARD_CONFIG": (
                f'[{{"base_url":"http://{HOST}:{upstream_port}","route":"/","type":"openai"}}]'
            ),
            "OPENAI_API_KEY": BENCH_KEY,
            "LOG_OPENAI": "true",
            "TZ": "UTC",
        }
    )
    code = (
        "import uvicorn; uvicorn.run(app='openai_forward.app:app', "
        f"host='{HOST}', port={port}, workers=1, app_dir='..')"
    )
    return _launch(
        "openai-forward", port, [str(python), "-c", code], rundir, env, cpus, "openai-forward.log"
    )
