"""Scale-out with real load balancers: three trio-upper instances behind
nginx and behind HAProxy, restarted one by one under load; nothing may fail.

Run it from the repository root (pytest does not collect it; the nox
session ``scaleout`` installs nginx and HAProxy where it can, then runs it)::

    python -m tests.scaleout [--balancers nginx,haproxy,reuse-port] [--step SECONDS]

For each balancer:

1. Three instances, ``python -m trio_upper serve --host 127.0.0.1 --port P
   --proxy-protocol``, one port each (see :class:`Instance`).
2. The balancer, run as a child process with the configuration shipped in
   ``contrib/`` (:data:`NGINX_CONF`, :data:`HAPROXY_CFG`), only its ports
   and listen address changed (:func:`nginx_config`, :func:`haproxy_config`),
   so the files people copy are the files tested.
3. Load through the balancer (:class:`Load`): TCP clients that each send
   random UTF-8 text, half-close and check that the reply is exactly its
   uppercase, one connection after another; and, through nginx, UDP clients
   that send tagged datagrams as ``trio-upper udp`` does (its own
   :func:`~trio_upper.udp_client.udp_ask`, which sends again when no reply
   comes).
4. Meanwhile the rolling restart (:func:`rolling_restart`): SIGTERM one
   instance, which must exit 0; start a new one on its port; wait until it
   serves; then the balancer's recovery time (:data:`CONF_RECOVERY`) and
   more before the next.

The run fails if any TCP exchange fails or comes back different, any
datagram is still unanswered after its retries, any instance exits other
than 0 or writes anything on stderr (at the default log level anything
there is a warning or worse: the balancer's health checks, which connect
and reset, must not be), or the balancer dies.

Three ports behind a balancer, not one shared: that is the setup across
machines, where each instance is an address of its own, and it is the
balancer's retry of a refused connection that has to be shown to work.
The third "balancer", ``reuse-port``, is the one-machine setup without
one: three ``serve --reuse-port`` on one port, the clients talking to them
directly, and each restart starting the new instance before stopping the
old, so that the port never lacks a listener.
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from benchmarks.servers import free_port
from trio_upper.transform import upper_bytes
from trio_upper.udp_client import udp_ask

__all__ = [
    "BALANCERS",
    "HAPROXY_CFG",
    "NGINX_CONF",
    "Counts",
    "Settings",
    "haproxy_config",
    "missing",
    "nginx_config",
    "run_scenario",
]

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "contrib" / "nginx" / "trio-upper.conf"
HAPROXY_CFG = ROOT / "contrib" / "haproxy" / "trio-upper.cfg"

# Where Debian's libnginx-mod-stream puts the stream module.
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")

# The ports the shipped configurations name: the balancer's, then the
# instances'.
CONF_LISTEN_PORT = 12000
CONF_INSTANCE_PORTS = (12001, 12002, 12003)

# How soon, in the shipped configurations, a balancer uses a restarted
# instance again: nginx's fail_timeout, HAProxy's check interval (one good
# check brings it back). A rolling restart must give each instance that
# long once it serves, before stopping the next: else the balancer may
# count every instance out at once, and then it refuses clients.
CONF_RECOVERY = 2.0

# "reuse-port" is no balancer: three instances share one port with
# --reuse-port, and the kernel spreads the clients over them.
BALANCERS = ("nginx", "haproxy", "reuse-port")
# The balancers that carry UDP: HAProxy's open-source edition does not.
WITH_UDP = ("nginx", "reuse-port")

# Bounds on waits that only something broken reaches: a process that does
# not start, a balancer that does not listen, an exchange that hangs.
START_TIMEOUT = 30.0
EXCHANGE_TIMEOUT = 30.0
# An instance has its --grace (5 s) for open connections after SIGTERM.
STOP_TIMEOUT = 20.0

# The UDP clients' first wait for a reply; each retry waits twice as long
# (trio_upper.udp_client.udp_ask), UDP_TRIES tries in all: 0.5 + 1 + 2 + 4
# + 8 s. A datagram lost in a restart (in the stopped instance's queue, or
# sent to its port while nothing listened) is answered on a later try.
UDP_WAIT = 0.5
UDP_TRIES = 5

# Seconds between one UDP client's datagrams: together the clients stay far
# below each instance's --udp-rate-limit (1000 a second from one network;
# every client here is 127.0.0.1), which would otherwise refuse replies and
# log a warning, as it should.
UDP_PACE = 0.01

# What the random text is made of: ASCII, characters whose uppercase is
# longer (ß, ﬁ, ΐ) or other, and every plane's letters.
_ALPHABET = (
    "abcdefghijklmnopqrstuvwxyz      \n"
    "ßçàéïõüÿœæøåñ"
    "ﬁﬂΐΰŉǰ"
    "αβγδεζηθικλμνξοπρστυφχψω"
    "абвгдежзийклмнопрстуфхцчшщъыьэюя"
    "ǅǈǋ日本語中文한국어"
    "🙂🎉𝒶𐐨"
)


# --- The shipped configurations, with this run's ports ----------------------------------


def _replace(text: str, old: str, new: str, count: int, where: Path) -> str:
    """``text`` with ``old`` replaced; ``old`` must occur ``count`` times, or
    the shipped file has drifted from what this test runs."""
    found = text.count(old)
    if found != count:
        raise ValueError(f"{where.name}: expected {old!r} {count} times, found {found}")
    return text.replace(old, new)


def nginx_config(
    text: str, listen: int, instances: Sequence[int], recovery: float = CONF_RECOVERY
) -> str:
    """contrib/nginx/trio-upper.conf listening on 127.0.0.1:``listen``, with
    ``instances`` for its three instances' ports, and ``recovery`` seconds
    for its fail_timeout (see :data:`CONF_RECOVERY`).

    Raises:
      ValueError: the file does not name the ports it is meant to (it has
          drifted from this test).
    """
    text = _replace(
        text, f"listen {CONF_LISTEN_PORT};", f"listen 127.0.0.1:{listen};", 1, NGINX_CONF
    )
    text = _replace(
        text, f"listen {CONF_LISTEN_PORT} udp;", f"listen 127.0.0.1:{listen} udp;", 1, NGINX_CONF
    )
    for shipped, port in zip(CONF_INSTANCE_PORTS, instances, strict=True):
        # Each instance is in the TCP and the UDP upstream.
        text = _replace(text, f"127.0.0.1:{shipped} ", f"127.0.0.1:{port} ", 2, NGINX_CONF)
    if recovery != CONF_RECOVERY:
        if recovery != int(recovery):
            raise ValueError(f"nginx's fail_timeout is whole seconds, not {recovery:g}")
        text = _replace(
            text,
            f"fail_timeout={CONF_RECOVERY:g}s;",
            f"fail_timeout={int(recovery)}s;",
            6,
            NGINX_CONF,
        )
    return text


def haproxy_config(
    text: str, listen: int, instances: Sequence[int], recovery: float = CONF_RECOVERY
) -> str:
    """contrib/haproxy/trio-upper.cfg binding 127.0.0.1:``listen``, with
    ``instances`` for its three instances' ports, and ``recovery`` seconds
    between its health checks (see :data:`CONF_RECOVERY`).

    Raises:
      ValueError: as :func:`nginx_config`.
    """
    text = _replace(
        text, f"bind :{CONF_LISTEN_PORT}\n", f"bind 127.0.0.1:{listen}\n", 1, HAPROXY_CFG
    )
    for shipped, port in zip(CONF_INSTANCE_PORTS, instances, strict=True):
        text = _replace(text, f"127.0.0.1:{shipped}\n", f"127.0.0.1:{port}\n", 1, HAPROXY_CFG)
    if recovery != CONF_RECOVERY:
        text = _replace(
            text,
            f" inter {CONF_RECOVERY:g}s ",
            f" inter {round(recovery * 1000)}ms ",
            1,
            HAPROXY_CFG,
        )
    return text


def _nginx_stream_module() -> Path | str | None:
    """How this nginx gets its stream module: a module file to load (Path),
    built in (None), or why it has none (str)."""
    nginx = shutil.which("nginx")
    if nginx is None:
        return "nginx is not installed (Debian: apt-get install nginx libnginx-mod-stream)"
    if NGINX_STREAM_MODULE.exists():
        return NGINX_STREAM_MODULE
    try:
        built = subprocess.run(
            [nginx, "-V"], capture_output=True, text=True, timeout=START_TIMEOUT, check=False
        ).stderr
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nginx -V failed: {exc}"
    if "--with-stream" in built and "--with-stream=dynamic" not in built:
        return None
    return "nginx has no stream module (Debian: apt-get install libnginx-mod-stream)"


def missing(balancer: str) -> str | None:
    """Why ``balancer`` cannot run here, or None if it can."""
    if balancer == "nginx":
        module = _nginx_stream_module()
        return module if isinstance(module, str) else None
    if balancer == "haproxy":
        if shutil.which("haproxy") is None:
            return "haproxy is not installed (Debian: apt-get install haproxy)"
        return None
    if balancer == "reuse-port":
        if not hasattr(socket, "SO_REUSEPORT") or not sys.platform.startswith("linux"):
            return "SO_REUSEPORT spreads connections over sockets on Linux only"
        return None
    raise ValueError(f"unknown balancer {balancer!r}")


def free_ports(count: int) -> list[int]:
    """``count`` different ports free on 127.0.0.1 for both TCP and UDP,
    below the ephemeral range where there is room (see the benchmarks'
    free_port): a restarted instance's port is free for a moment, and the
    balancer's own outgoing connections must not take it."""
    ports: list[int] = []
    for _ in range(count * 50):
        if len(ports) == count:
            return ports
        if (port := free_port()) not in ports:
            ports.append(port)
    raise OSError("found no ports free for both TCP and UDP on 127.0.0.1")


# --- Processes ------------------------------------------------------------------------------


async def _read_line(stream: trio.abc.ReceiveStream, what: str) -> str:
    """The first line of ``stream``, within START_TIMEOUT."""
    data = b""
    with trio.fail_after(START_TIMEOUT):
        while b"\n" not in data:
            chunk = await stream.receive_some()
            if not chunk:
                raise RuntimeError(f"{what} exited before it said it was ready: {data!r}")
            data += chunk
    return data.partition(b"\n")[0].decode(errors="replace")


class Instance:
    """One ``trio-upper serve --proxy-protocol`` process on one port.

    Its stderr goes to a file, checked when it stops: at the default log
    level anything there is a warning or an error.
    """

    def __init__(self, port: int, log: Path, process: trio.Process) -> None:
        self.port = port
        self.log = log
        self.process = process
        self.summary = ""

    @staticmethod
    def command(port: int, *, reuse_port: bool) -> list[str]:
        """How an instance is started: as a user would behind a balancer on
        the same machine (which --proxy-allow-from allows by default), or
        sharing the port with the others."""
        serve = ["serve", "--host", "127.0.0.1", "--port", str(port)]
        serve.append("--reuse-port" if reuse_port else "--proxy-protocol")
        return [sys.executable, "-m", "trio_upper", *serve]

    @classmethod
    async def start(cls, port: int, log: Path, *, reuse_port: bool = False) -> Instance:
        """Start an instance; return once it serves."""
        with log.open("wb") as stderr:
            process = await trio.lowlevel.open_process(
                cls.command(port, reuse_port=reuse_port),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=ROOT,
            )
        instance = cls(port, log, process)
        assert process.stdout is not None
        try:
            line = await _read_line(process.stdout, f"the instance on port {port}")
        except BaseException:
            with trio.CancelScope(shield=True):
                await instance.kill()
            raise
        if f":{port}" not in line:
            await instance.kill()
            raise RuntimeError(f"the instance on port {port} said {line!r}")
        return instance

    async def stop(self) -> list[str]:
        """SIGTERM, as systemd or a person stops it; returns what was wrong:
        an exit status other than 0, anything on stderr."""
        problems: list[str] = []
        self.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT):
            await self.process.wait()
        if self.process.returncode is None:
            problems.append(f"port {self.port}: still running {STOP_TIMEOUT:g} s after SIGTERM")
            await self.kill()
        elif self.process.returncode != 0:
            problems.append(f"port {self.port}: exit status {self.process.returncode}")
        assert self.process.stdout is not None
        with trio.move_on_after(STOP_TIMEOUT):
            rest = b""
            while chunk := await self.process.stdout.receive_some():
                rest += chunk
            lines = rest.decode(errors="replace").splitlines()
            self.summary = next((line for line in lines if line.startswith("Stopped:")), "")
        await self.process.stdout.aclose()
        logged = self.log.read_text(errors="replace").strip()
        if logged:
            problems.append(f"port {self.port} logged: {' | '.join(logged.splitlines()[:5])}")
        return problems

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        if self.process.stdout is not None:
            await self.process.stdout.aclose()


@dataclass
class Balancer:
    """nginx or HAProxy as a child process, with its configuration in a
    scratch directory."""

    name: str
    argv: list[str]
    log: Path
    process: trio.Process | None = None

    @classmethod
    def prepare(
        cls, name: str, scratch: Path, listen: int, instances: Sequence[int], recovery: float
    ) -> Balancer:
        log = scratch / f"{name}.log"
        if name == "nginx":
            module = _nginx_stream_module()
            if isinstance(module, str):
                raise RuntimeError(module)
            stream = scratch / "trio-upper.conf"
            stream.write_text(nginx_config(NGINX_CONF.read_text(), listen, instances, recovery))
            # What nginx.conf around the shipped file has: the module, and
            # running in the foreground with everything in the scratch
            # directory.
            main = scratch / "nginx.conf"
            main.write_text(
                (f"load_module {module};\n" if module is not None else "")
                + f"daemon off;\npid {scratch}/nginx.pid;\nerror_log {log} warn;\n"
                "worker_processes 1;\nevents { worker_connections 4096; }\n"
                f"include {stream};\n"
            )
            nginx = shutil.which("nginx") or "nginx"
            # -e: the log before the configuration is read, which would
            # otherwise be /var/log/nginx/error.log.
            argv = [nginx, "-p", f"{scratch}/", "-e", str(log), "-c", str(main)]
            return cls(name, argv, log)
        if name == "haproxy":
            cfg = scratch / "haproxy.cfg"
            cfg.write_text(
                "global\n    maxconn 4096\n\n"
                + haproxy_config(HAPROXY_CFG.read_text(), listen, instances, recovery)
            )
            return cls(name, [shutil.which("haproxy") or "haproxy", "-db", "-f", str(cfg)], log)
        raise ValueError(f"unknown balancer {name!r}")

    async def start(self, listen: int) -> None:
        with self.log.open("ab") as output:
            self.process = await trio.lowlevel.open_process(
                self.argv, stdin=subprocess.DEVNULL, stdout=output, stderr=output, cwd=ROOT
            )
        with trio.fail_after(START_TIMEOUT):
            while True:
                if self.process.returncode is not None or self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited: {self._tail()}")
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", listen)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await stream.aclose()
                return

    def _tail(self) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").splitlines()[-5:])
        except OSError:
            return "(no log)"

    async def stop(self) -> list[str]:
        if self.process is None:
            return []
        if self.process.poll() is not None:
            return [f"{self.name} died during the run: {self._tail()}"]
        self.process.terminate()
        with trio.move_on_after(STOP_TIMEOUT):
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        return []


# --- The load --------------------------------------------------------------------------------


@dataclass
class Counts:
    """What one balancer's run did and what went wrong."""

    balancer: str
    exchanges: int = 0  # TCP exchanges, each checked byte for byte
    tcp_bytes: int = 0  # bytes sent in them
    datagrams: int = 0  # UDP requests answered, each checked
    resent: int = 0  # UDP tries that got no reply in time and were sent again
    restarts: int = 0
    failures: list[str] = field(default_factory=list)
    served: list[str] = field(default_factory=list)  # the instances' closing summaries

    def fail(self, text: str) -> None:
        self.failures.append(text)

    def line(self) -> str:
        udp = (
            f"{self.datagrams:,} datagrams ({self.resent:,} tries sent again)"
            if self.balancer in WITH_UDP
            else "no UDP (HAProxy balances TCP only)"
        )
        return (
            f"{self.balancer}: {self.exchanges:,} TCP exchanges ({self.tcp_bytes:,} bytes), "
            f"{udp}, {self.restarts} restarts, {len(self.failures)} failures"
        )


def random_text(rng: random.Random, longest: int) -> bytes:
    """Random UTF-8 text, 1 to ``longest`` characters, mostly short."""
    size = int(math.exp(rng.uniform(0, math.log(longest))))
    return "".join(rng.choices(_ALPHABET, k=size)).encode()


@dataclass
class Load:
    """TCP and UDP clients against ``port`` until :meth:`stop`."""

    port: int
    counts: Counts
    seed: int
    _stopping: trio.Event = field(default_factory=trio.Event)

    def stop(self) -> None:
        self._stopping.set()

    async def tcp_client(self, number: int) -> None:
        rng = random.Random(f"{self.seed}-tcp-{number}")
        while not self._stopping.is_set():
            request = random_text(rng, 3000)
            try:
                with trio.fail_after(EXCHANGE_TIMEOUT):
                    reply = await self._exchange(rng, request)
            except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                self.counts.fail(f"TCP client {number}: {type(exc).__name__}: {exc}")
                continue
            if reply != upper_bytes(request):
                self.counts.fail(
                    f"TCP client {number}: {len(request)} bytes came back as {len(reply)} "
                    "bytes, not their uppercase"
                )
                continue
            self.counts.exchanges += 1
            self.counts.tcp_bytes += len(request)

    async def _exchange(self, rng: random.Random, request: bytes) -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        async with stream:
            # In one to three pieces, then the end of input, as `trio-upper
            # tcp` and nc do.
            cuts = sorted(rng.sample(range(1, len(request)), min(2, len(request) - 1)))
            for start, end in zip([0, *cuts], [*cuts, len(request)], strict=True):
                await stream.send_all(request[start:end])
            await stream.send_eof()
            reply = b""
            while chunk := await stream.receive_some():
                reply += chunk
            return reply

    async def udp_client(self, number: int) -> None:
        rng = random.Random(f"{self.seed}-udp-{number}")
        sequence = 0
        while not self._stopping.is_set():
            sequence += 1
            # Digits and a dot: their own uppercase, so the reply says which
            # request (and which client) it answers.
            tag = f"{number}.{sequence}:".encode()
            payload = random_text(rng, 400)
            try:
                reply, tries = await self._ask(tag + payload)
            except OSError as exc:
                self.counts.fail(f"UDP client {number}: {type(exc).__name__}: {exc}")
                continue
            self.counts.resent += tries - 1
            if reply is None:
                self.counts.fail(f"UDP client {number}: no reply to {tag!r} in {tries} tries")
            elif reply != tag + upper_bytes(payload):
                self.counts.fail(f"UDP client {number}: a wrong reply to {tag!r}")
            else:
                self.counts.datagrams += 1
            await trio.sleep(UDP_PACE)

    async def _ask(self, request: bytes) -> tuple[bytes | None, int]:
        """``request`` as `trio-upper udp` sends a line: from a socket of its
        own, with its retries (:func:`~trio_upper.udp_client.udp_ask`).
        Returns the reply (None if none came) and how many tries it took."""
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            counted = _CountingSocket(sock)
            await counted.connect(("127.0.0.1", self.port))
            reply = await udp_ask(counted, request, timeout=UDP_WAIT, retries=UDP_TRIES - 1)
            return reply, counted.sends


class _CountingSocket:
    """A UDP socket that counts what it sends: the client's tries."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.sends = 0

    async def connect(self, address: tuple[object, ...], /) -> None:
        await self.sock.connect(address)

    async def send(self, data: bytes, /) -> int:
        self.sends += 1
        return await self.sock.send(data)

    async def recv(self, bufsize: int, /) -> bytes:
        return await self.sock.recv(bufsize)

    def close(self) -> None:
        self.sock.close()


# --- The scenario ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How much load, and how long each step of the restart lasts."""

    tcp_clients: int = 16
    udp_clients: int = 4
    # Seconds of load before the first restart, after the last, and between
    # one instance serving again and the next one's SIGTERM.
    step: float = 5.0
    # The balancers' recovery time (see CONF_RECOVERY): as shipped, or
    # shorter for a quick run. Must be less than step.
    recovery: float = CONF_RECOVERY

    def __post_init__(self) -> None:
        if not 0 < self.recovery < self.step:
            raise ValueError(
                f"the step ({self.step:g} s) must be longer than the balancers' recovery "
                f"({self.recovery:g} s): see CONF_RECOVERY"
            )


async def rolling_restart(
    instances: list[Instance], logs: Path, counts: Counts, step: float, *, reuse_port: bool
) -> None:
    """Restart each instance in turn, ``step`` seconds of load before each
    and after the last. Behind a balancer: SIGTERM, wait for it to exit,
    start a new one on its port, wait until it serves. Sharing a port: the
    new one first, then SIGTERM to the old, so the port always has a
    listener."""
    for index, old in enumerate(instances):
        await trio.sleep(step)
        log = logs / f"instance-{index + 1}-restarted.stderr"
        if reuse_port:
            instances[index] = await Instance.start(old.port, log, reuse_port=True)
        for problem in await old.stop():
            counts.fail(f"restart {index + 1}: {problem}")
        counts.served.append(old.summary)
        if not reuse_port:
            instances[index] = await Instance.start(old.port, log)
        counts.restarts += 1
    await trio.sleep(step)


async def run_scenario(
    balancer: str,
    settings: Settings,
    scratch: Path,
    *,
    seed: int | None = None,
    report: Callable[[str], None] = print,
) -> Counts:
    """Three instances behind ``balancer``, load through it, a rolling
    restart of all three; the counts and the failures."""
    counts = Counts(balancer)
    reuse_port = balancer == "reuse-port"
    front: Balancer | None = None
    if reuse_port:
        listen = free_ports(1)[0]
        ports = [listen] * 3
    else:
        listen, *ports = free_ports(4)
        front = Balancer.prepare(balancer, scratch, listen, ports, settings.recovery)
    instances: list[Instance] = []
    try:
        for index, port in enumerate(ports):
            log = scratch / f"instance-{index + 1}.stderr"
            instances.append(await Instance.start(port, log, reuse_port=reuse_port))
        if front is not None:
            await front.start(listen)
        load = Load(listen, counts, random.randrange(2**32) if seed is None else seed)
        report(
            f"{balancer}: port {listen}, instances on {', '.join(map(str, ports))}; "
            f"{settings.tcp_clients} TCP clients"
            + (f", {settings.udp_clients} UDP clients" if balancer in WITH_UDP else "")
            + f"; restarting one instance every {settings.step:g} s"
        )
        async with trio.open_nursery() as nursery:
            for number in range(settings.tcp_clients):
                nursery.start_soon(load.tcp_client, number)
            if balancer in WITH_UDP:
                for number in range(settings.udp_clients):
                    nursery.start_soon(load.udp_client, number)
            await rolling_restart(instances, scratch, counts, settings.step, reuse_port=reuse_port)
            load.stop()
    finally:
        with trio.CancelScope(shield=True):
            if front is not None:
                for problem in await front.stop():
                    counts.fail(problem)
            for instance in instances:
                if instance.process.returncode is None:
                    for problem in await instance.stop():
                        counts.fail(f"at the end: {problem}")
                    counts.served.append(instance.summary)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.scaleout",
        description="Three trio-upper instances behind nginx and HAProxy, restarted one by "
        "one under TCP and UDP load: every exchange must succeed.",
    )
    parser.add_argument(
        "--balancers",
        default=",".join(BALANCERS),
        help="comma-separated, from: " + ", ".join(BALANCERS) + " (reuse-port: no balancer, "
        "the instances share one port) (default: all)",
    )
    parser.add_argument(
        "--step",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="seconds of load before the first restart, after the last, and between an "
        f"instance serving again and the next one's stop; more than the balancers' "
        f"{CONF_RECOVERY:g} s recovery (default: %(default)g)",
    )
    parser.add_argument("--tcp-clients", type=int, default=16, metavar="N")
    parser.add_argument("--udp-clients", type=int, default=4, metavar="N")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--missing",
        action="store_true",
        help="only print what this machine lacks to run the balancers, one line each",
    )
    args = parser.parse_args(argv)
    if args.missing:
        for name in BALANCERS:
            if why := missing(name):
                print(f"{name}: {why}")
        return 0
    names = [name.strip() for name in args.balancers.split(",") if name.strip()]
    if unknown := [name for name in names if name not in BALANCERS]:
        parser.error(f"unknown balancers: {', '.join(unknown)}")
    try:
        settings = Settings(args.tcp_clients, args.udp_clients, args.step)
    except ValueError as exc:
        parser.error(str(exc))
    failed = False
    for name in names:
        if why := missing(name):
            print(f"{name}: cannot run: {why}", file=sys.stderr)
            failed = True
            continue
        with tempfile.TemporaryDirectory(prefix=f"trio-upper-scaleout-{name}-") as scratch:
            counts = trio.run(partial(run_scenario, name, settings, Path(scratch), seed=args.seed))
        print(counts.line())
        for summary in counts.served:
            print(f"  an instance: {summary}")
        for failure in counts.failures[:20]:
            print(f"!!! {name}: {failure}", file=sys.stderr)
        failed = failed or bool(counts.failures)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
