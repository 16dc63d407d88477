"""The servers under test, and starting and stopping them.

Ours runs as a user runs it, ``python -m trio_upper serve``; the peers are
the scripts in ``benchmarks/peers/``. All run under the harness's own Python.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

from trio_upper.transform import upper_bytes

from .lines import LineReader
from .procinfo import descendants, pinned
from .workloads import TLS_WORKLOADS, WORKLOAD_NAMES

__all__ = [
    "ROOT",
    "SCALE_OUT",
    "Certificates",
    "RunningServer",
    "Server",
    "free_port",
    "ours_extra_flags",
    "servers",
]

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers"

# Bounds on waits that only a broken or hung server reaches. Ours waits up to
# its grace period (5 s) for open connections after SIGINT; by then every
# load generator connection is closed, so it should need far less.
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0

# glibc's malloc, as every server runs it. asyncio reads up to 256 KiB at a
# time into a fresh bytes object; above glibc's 128 KiB mmap threshold that
# costs an mmap, an mremap and a munmap per read, about 20 µs of system time
# per request, until glibc's dynamic threshold happens to adapt (seconds or
# never, depending on what else the process frees). These are the values it
# adapts to; fixing them for every server measures each in its steady state
# rather than asyncio in a start-up artifact. Ours reads 64 KiB and never
# reaches the threshold either way.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "2097152"}


# Where Debian's libnginx-mod-stream puts nginx's TCP/UDP proxy.
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")

ALL_WORKLOADS = frozenset(WORKLOAD_NAMES)
# Ours scaled out: the price of the proxy hop, and of worker processes, on
# a request on an open connection, a connection per request, and a
# datagram. (The idle figure is one process's memory, and the others add
# nothing to these three but minutes.)
SCALE_OUT_WORKLOADS = frozenset({"tcp", "connect", "udp"})
SCALE_OUT = ("ours-nginx", "ours-workers2")
# The peers uppercase with bytes.upper(), ASCII only: on non-ASCII text they
# would do less work than ours, not the same, so they skip that workload.
PEER_WORKLOADS = ALL_WORKLOADS - {"tcp-utf8"}

# How every server is told to serve TLS: the same certificate and key files,
# made for the run (see run.py).
TLS_FLAGS = ("--certfile", "{certfile}", "--keyfile", "{keyfile}")


@dataclass(frozen=True)
class Certificates:
    """PEM files for the TLS workloads: a CA, and a certificate for
    127.0.0.1 and localhost that it signed, with its key."""

    ca: Path
    cert: Path
    key: Path


def _ascii_upper(data: bytes) -> bytes:
    return data.upper()


@dataclass(frozen=True)
class Server:
    """One server under test."""

    name: str
    title: str
    argv: tuple[str, ...]
    """The command, with ``{port}`` where the port goes."""
    transform: Callable[[bytes], bytes]
    """What the server must send back for a whole message."""
    workloads: frozenset[str] = ALL_WORKLOADS
    """The workloads it takes part in."""
    needs: str | None = None
    """A module that must be importable, or the server is skipped."""
    scrape: bool = False
    """Serves Prometheus metrics (``--metrics``), which the harness scrapes
    while the load runs (see scrape.py)."""
    tls: tuple[str, ...] = ()
    """What to add to ``argv`` for the TLS workloads; none: it takes no part
    in them."""
    front: str | None = None
    """``"nginx"``: the load goes through nginx's stream proxy, started
    beside the server, which then takes the PROXY protocol on a port of its
    own."""

    def takes(self, workload: str) -> bool:
        """Whether this server runs ``workload`` at all."""
        if workload in TLS_WORKLOADS and not self.tls:
            return False
        return workload in self.workloads

    def missing(self) -> str | None:
        """Why this server cannot run here, or None if it can."""
        if self.needs and importlib.util.find_spec(self.needs) is None:
            return f"{self.needs} is not installed (pip install -e '.[bench]')"
        if self.front == "nginx":
            module = nginx_stream_module()
            if isinstance(module, str):
                return module
        return None

    def command(self, port: int, certificates: Certificates | None = None) -> list[str]:
        """The command line that serves on ``port``; with ``certificates``,
        TLS on TCP."""
        argv = list(self.argv)
        values = {"{port}": str(port)}
        if certificates is not None:
            argv += self.tls
            values |= {"{certfile}": str(certificates.cert), "{keyfile}": str(certificates.key)}
        for placeholder, value in values.items():
            argv = [part.replace(placeholder, value) for part in argv]
        return argv


def ours_extra_flags() -> list[str]:
    """Flags our server gets beyond host and port, to limit nothing the peers
    do not limit: ``--udp-rate-limit 0`` (the UDP load comes from one
    address), and ``--max-connections`` above the idle workload's 10,000
    connections plus its warm-up ones (the default is exactly 10,000)."""
    helptext = subprocess.run(
        [sys.executable, "-m", "trio_upper", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        timeout=READY_TIMEOUT,
    ).stdout
    flags = []
    if "--udp-rate-limit" in helptext:
        flags += ["--udp-rate-limit", "0"]
    if "--max-connections" in helptext:
        flags += ["--max-connections", "1000000"]
    return flags


def servers(ours_flags: Sequence[str]) -> list[Server]:
    """Every server, ours first."""
    py = sys.executable
    ours = (py, "-m", "trio_upper", "serve", "--host", "127.0.0.1", "--port", "{port}")
    peers = str(PEERS)
    return [
        Server("ours", "trio-upper", (*ours, *ours_flags), upper_bytes, tls=TLS_FLAGS),
        Server(
            "ours-ascii",
            "trio-upper --ascii",
            (*ours, *ours_flags, "--ascii"),
            partial(upper_bytes, ascii_only=True),
            # Only what the UTF-8 against --ascii comparison needs.
            frozenset({"tcp", "tcp-utf8"}),
        ),
        Server(
            "ours-metrics",
            "trio-upper --metrics",
            (*ours, *ours_flags, "--metrics", "127.0.0.1:0"),
            upper_bytes,
            # What a scrape could cost: the workloads with the most requests.
            frozenset({"tcp", "udp"}),
            needs="prometheus_client",
            scrape=True,
        ),
        Server(
            "ours-nginx",
            "trio-upper via nginx",
            (*ours, *ours_flags, "--proxy-protocol"),
            upper_bytes,
            SCALE_OUT_WORKLOADS,
            front="nginx",
        ),
        Server(
            "ours-workers2",
            "trio-upper --workers 2",
            (*ours, *ours_flags, "--workers", "2"),
            upper_bytes,
            SCALE_OUT_WORKLOADS,
        ),
        Server(
            "trio-tutorial",
            "trio tutorial",
            (py, f"{peers}/trio_tutorial.py", "--port", "{port}"),
            _ascii_upper,
            PEER_WORKLOADS,
            tls=TLS_FLAGS,
        ),
        Server(
            "asyncio-streams",
            "asyncio streams",
            (py, f"{peers}/asyncio_streams.py", "--port", "{port}"),
            _ascii_upper,
            PEER_WORKLOADS - {"udp"},
            tls=TLS_FLAGS,
        ),
        Server(
            "asyncio-protocol",
            "asyncio Protocol",
            (py, f"{peers}/asyncio_protocol.py", "--port", "{port}"),
            _ascii_upper,
            PEER_WORKLOADS,
            tls=TLS_FLAGS,
        ),
        Server(
            "uvloop-protocol",
            "uvloop Protocol",
            (py, f"{peers}/asyncio_protocol.py", "--port", "{port}", "--uvloop"),
            _ascii_upper,
            PEER_WORKLOADS,
            needs="uvloop",
            tls=TLS_FLAGS,
        ),
    ]


def nginx_stream_module() -> Path | str | None:
    """How this machine's nginx gets its stream module: a file to load
    (Path), built in (None), or why there is none (str)."""
    nginx = shutil.which("nginx")
    if nginx is None:
        return "nginx is not installed (Debian: apt-get install nginx libnginx-mod-stream)"
    if NGINX_STREAM_MODULE.exists():
        return NGINX_STREAM_MODULE
    built = subprocess.run(
        [nginx, "-V"], capture_output=True, text=True, timeout=READY_TIMEOUT, check=False
    ).stderr
    if "--with-stream" in built and "--with-stream=dynamic" not in built:
        return None
    return "nginx has no stream module (Debian: apt-get install libnginx-mod-stream)"


def nginx_config(scratch: Path, port: int, backend: int, log: Path) -> Path:
    """An nginx configuration that passes TCP and UDP on ``port`` to one
    instance on ``backend``: contrib/nginx/trio-upper.conf's settings, with
    one instance, in the foreground."""
    module = nginx_stream_module()
    if isinstance(module, str):
        raise ServerError(module)
    path = scratch / f"nginx-{port}.conf"
    path.write_text(
        (f"load_module {module};\n" if module is not None else "")
        + f"daemon off;\npid {scratch}/nginx-{port}.pid;\nerror_log {log} warn;\n"
        "worker_processes 1;\nevents { worker_connections 4096; }\n"
        "stream {\n"
        f"    server {{ listen 127.0.0.1:{port}; proxy_pass 127.0.0.1:{backend};\n"
        "             proxy_protocol on; proxy_half_close on; }\n"
        f"    server {{ listen 127.0.0.1:{port} udp; proxy_pass 127.0.0.1:{backend};\n"
        "             proxy_protocol on; proxy_responses 1; proxy_timeout 3s; }\n"
        "}\n"
    )
    return path


def _local_port_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port free on 127.0.0.1 for both TCP and UDP.

    Taken below the ephemeral range where there is room, so that the
    thousands of client ports the connect workload churns through never
    land on the next server's port.
    """
    floor = _local_port_floor()
    candidates = list(range(10_000, floor)) if floor > 11_000 else []
    rng = int.from_bytes(os.urandom(4), "little")
    for attempt in range(50):
        port = candidates[(rng + attempt * 7919) % len(candidates)] if candidates else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return int(port)
    raise OSError("found no port free for both TCP and UDP on 127.0.0.1")


class ServerError(Exception):
    """A server failed to start, or to stop when told."""


class RunningServer:
    """A server process: started pinned, ready once it has printed its line.
    With a front (nginx), that too, pinned to the same CPU: the server side
    of the benchmark is both, on one core."""

    def __init__(
        self,
        server: Server,
        port: int,
        cpu: int | None,
        log: IO[bytes],
        scratch: Path,
        certificates: Certificates | None = None,
    ) -> None:
        self.server = server
        self.port = port
        # Where the server itself listens: behind nginx, a port of its own.
        self.backend_port = free_port() if server.front else port
        self._log = log
        self.front: subprocess.Popen[bytes] | None = None
        with pinned(cpu):
            self.process = subprocess.Popen(
                server.command(self.backend_port, certificates),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                # A file, not a pipe: a server that logs a lot must never
                # block on a pipe nobody reads during the measurement.
                stderr=log,
                cwd=ROOT,
                env={**os.environ, **MALLOC_ENV},
            )
            if server.front == "nginx":
                nginx = shutil.which("nginx") or "nginx"
                log_path = Path(log.name)
                conf = nginx_config(scratch, port, self.backend_port, log_path)
                # -e: the log before the configuration is read.
                self.front = subprocess.Popen(
                    [nginx, "-p", f"{scratch}/", "-e", str(log_path), "-c", str(conf)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    cwd=ROOT,
                )
        assert self.process.stdout is not None
        self._stdout = LineReader(self.process.stdout)
        self.ready_line = ""
        self.metrics_url: str | None = None
        self.exit_status: int | None = None
        self._exit_reported = False

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.process.pid

    def wait_ready(self) -> None:
        """Wait for the line a server prints once it listens on its port."""
        line = self._stdout.readline(time.monotonic() + READY_TIMEOUT)
        if line is None:
            self.process.wait()
            self._exit_reported = True
            raise ServerError(
                f"{self.server.name} exited with status {self.process.returncode} "
                "before saying it was ready"
            )
        if f":{self.backend_port}" not in line:
            raise ServerError(f"{self.server.name}: unexpected first line {line!r}")
        self.ready_line = line
        if self.server.scrape:
            found = re.search(r"metrics at (http://\S+/metrics)", line)
            if found is None:
                raise ServerError(f"{self.server.name}: no metrics address in {line!r}")
            self.metrics_url = found.group(1)
        if self.front is not None:
            self._wait_front()

    def _wait_front(self) -> None:
        """Wait until nginx takes connections on the port."""
        assert self.front is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.front.poll() is not None:
                raise ServerError(f"nginx exited with status {self.front.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                time.sleep(0.05)
                continue
            return
        raise ServerError(f"nginx did not listen on port {self.port} within {READY_TIMEOUT:g} s")

    def processes(self) -> dict[int, str]:
        """Every process of the server side, and what it is: ``server`` (with
        the workers of --workers) or ``nginx`` (its master and worker)."""
        found = {pid: "server" for pid in [self.process.pid, *descendants(self.process.pid)]}
        if self.front is not None:
            found.update({pid: "nginx" for pid in [self.front.pid, *descendants(self.front.pid)]})
        return found

    def stop(self) -> list[str]:
        """Stop with SIGINT, as a user would; return what went wrong, if anything."""
        problems: list[str] = []
        if self.process.poll() is not None:
            if self._exit_reported:
                return problems
            problems.append(
                f"{self.server.name} had exited (status {self.process.returncode}) "
                "before it was told to stop"
            )
        else:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                problems.append(
                    f"{self.server.name} did not exit within {STOP_TIMEOUT:g} s of SIGINT"
                )
        self.exit_status = self.process.returncode
        if self.exit_status != 0 and not problems:
            problems.append(f"{self.server.name} exited with status {self.exit_status} on SIGINT")
        self._stdout.close()
        if self.front is not None:
            problems += self._stop_front()
        return problems

    def _stop_front(self) -> list[str]:
        assert self.front is not None
        if self.front.poll() is not None:
            return [f"nginx had exited (status {self.front.returncode}) before it was stopped"]
        # nginx's graceful stop.
        self.front.send_signal(signal.SIGQUIT)
        try:
            self.front.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.front.kill()
            self.front.wait()
            return [f"nginx did not exit within {STOP_TIMEOUT:g} s of SIGQUIT"]
        if self.front.returncode != 0:
            return [f"nginx exited with status {self.front.returncode} on SIGQUIT"]
        return []

    def kill(self) -> None:
        """Make sure the process is gone (after an error in the harness)."""
        if self.front is not None and self.front.poll() is None:
            # nginx's worker outlives a master killed outright: it goes too.
            for pid in descendants(self.front.pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        for process in (self.process, self.front):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        self._stdout.close()
