"""systemd: socket activation (``listen_fds``), the notify protocol
(``notify``, the watchdog), the server on inherited sockets, the command line
started as systemd starts it, a restart that loses nothing, and the shipped
unit files.

systemd itself is not needed: sockets are handed to a subprocess as systemd
hands them (from file descriptor 3, ``LISTEN_PID`` set to the child's own
pid before it execs), and a datagram socket stands in for ``NOTIFY_SOCKET``.
The real ``systemd-socket-activate`` and ``systemd-analyze verify`` are run
too where they are installed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_upper import systemd
from trio_upper.errors import UserError
from trio_upper.ratelimit import network_label, source_network
from trio_upper.server import DEFAULT_PORT, Endpoint, ServerConfig, UpperServer
from trio_upper.systemd import ListenFd, listen_fds, notify, watchdog, watchdog_interval
from trio_upper.transform import upper_ascii, upper_bytes
from trio_upper.udp import MAX_PAYLOAD_IPV4

from .helpers import PROCESS_TIMEOUT, cli

UNITS = Path(__file__).parent.parent / "contrib" / "systemd"

# Bounds every wait on a socket in these tests: a hang fails, it never stalls.
IO_TIMEOUT = 10.0

# A server given this and inherited sockets serves those; were it to bind
# anything instead, it would fail: 192.0.2.1 (TEST-NET-1) is no address here.
UNBINDABLE = ServerConfig(host="192.0.2.1", port=DEFAULT_PORT)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


HAVE_IPV6 = socket.has_ipv6 and _ipv6_loopback()
needs_ipv6 = pytest.mark.skipif(not HAVE_IPV6, reason="no IPv6 loopback here")


def tcp_listening(host: str = "127.0.0.1", port: int = 0, *, v6only: bool = True) -> socket.socket:
    """A listening TCP socket, as a ``ListenStream=`` line makes one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    sock.bind((host, port))
    sock.listen(64)
    return sock


def udp_bound(host: str = "127.0.0.1", port: int = 0, *, v6only: bool = True) -> socket.socket:
    """A bound UDP socket, as a ``ListenDatagram=`` line makes one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    sock.bind((host, port))
    return sock


def tcp_and_udp(host: str = "127.0.0.1") -> tuple[socket.socket, socket.socket]:
    """A listening TCP socket and a UDP socket on one port number, as the
    shipped socket unit makes them."""
    for _ in range(20):
        tcp = tcp_listening(host)
        try:
            return tcp, udp_bound(host, tcp.getsockname()[1])
        except OSError as exc:
            tcp.close()
            if exc.errno != errno.EADDRINUSE:
                raise
    raise AssertionError("no port free on both TCP and UDP")


class NotifyReceiver:
    """A stand-in for systemd's notify socket: a bound AF_UNIX datagram
    socket, at a path or an abstract name.

    Attributes:
      address: The value for ``NOTIFY_SOCKET`` (``@name`` if abstract).
      messages: Every message received so far, each as its list of fields.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path is None:
            name = f"trio-upper-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.sock.bind(str(path))
            self.address = str(path)
        self.sock.settimeout(IO_TIMEOUT)
        self.messages: list[list[str]] = []

    def receive(self) -> list[str]:
        """The next message; fails (socket.timeout) if none comes."""
        fields = self.sock.recv(65536).decode().split("\n")
        self.messages.append(fields)
        return fields

    def until(self, field: str) -> list[str]:
        """Receive until a message with ``field`` comes; return that message."""
        while field not in (fields := self.receive()):
            pass
        return fields

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[NotifyReceiver]:
    stand_in = NotifyReceiver(tmp_path / "notify")
    yield stand_in
    stand_in.close()


def status(fields: Sequence[str]) -> str:
    found = [field.removeprefix("STATUS=") for field in fields if field.startswith("STATUS=")]
    assert len(found) == 1, fields
    return found[0]


@contextlib.contextmanager
def at_consecutive_fds(descriptors: Sequence[int]) -> Iterator[int]:
    """Duplicate ``descriptors`` onto consecutive free numbers (inheritable,
    as systemd leaves them) and yield the first; close them afterwards.

    In-process tests cannot use 3, 4, ...: pytest holds those. They point
    ``SD_LISTEN_FDS_START`` here instead.
    """
    start = 200
    while any(_is_open(start + n) for n in range(len(descriptors))):
        start += len(descriptors)
    for n, fd in enumerate(descriptors):
        os.dup2(fd, start + n, inheritable=True)
    try:
        yield start
    finally:
        for n in range(len(descriptors)):
            with contextlib.suppress(OSError):
                os.close(start + n)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# The part of systemd that starts a service with sockets, in the child: move
# the sockets to 3, 4, ..., say so in LISTEN_FDS, name this very process in
# LISTEN_PID (exec keeps the pid), and exec the service. Arguments: the
# number of sockets, their descriptors in the parent (kept by pass_fds), then
# the command. A LISTEN_* variable already in the environment is kept, for
# the tests of malformed ones.
_ACTIVATE = """\
import fcntl, os, sys
count = int(sys.argv[1])
passed = [int(fd) for fd in sys.argv[2 : 2 + count]]
# Out of the way first: a passed descriptor may itself be 3 or 4.
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3 + count) for fd in passed]
for fd in passed:
    os.close(fd)
for n, fd in enumerate(high):
    os.dup2(fd, 3 + n)
    os.close(fd)
os.environ.setdefault("LISTEN_FDS", str(count))
os.environ.setdefault("LISTEN_PID", str(os.getpid()))
command = sys.argv[2 + count :]
os.execv(command[0], command)
"""


def activated(
    sockets: Sequence[socket.socket],
    args: Sequence[str],
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """``python -m trio_upper ARGS`` started as systemd starts a service
    with ``sockets``."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "WATCH"))}
    environment.pop("NOTIFY_SOCKET", None)
    environment.update(env or {})
    fds = [str(sock.fileno()) for sock in sockets]
    return subprocess.Popen(
        [sys.executable, "-c", _ACTIVATE, str(len(fds)), *fds, *cli(*args)],
        pass_fds=[sock.fileno() for sock in sockets],
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str, str]:
    """Wait for ``proc`` to exit; return (status, stdout, stderr).

    Never signals: a second SIGTERM could land after the server has
    stopped handling signals, and kill it.
    """
    try:
        out, err = proc.communicate(timeout=PROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, out.decode(), err.decode()


def tcp_exchange(address: tuple[str, int], data: bytes) -> bytes:
    with socket.create_connection(address, timeout=IO_TIMEOUT) as conn:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        return receive_all(conn)


def receive_all(conn: socket.socket) -> bytes:
    reply = bytearray()
    while chunk := conn.recv(65536):
        reply += chunk
    return bytes(reply)


def udp_exchange(address: tuple[str, int], data: bytes) -> bytes:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as client:
        client.settimeout(IO_TIMEOUT)
        client.sendto(data, address)
        return client.recv(65536)


# --- listen_fds ----------------------------------------------------------


def test_listen_fds_none_without_variables() -> None:
    environ = {"PATH": "/bin"}
    assert listen_fds(environ) is None
    assert environ == {"PATH": "/bin"}


def test_sockets_for_another_process_are_not_ours_and_not_passed_on() -> None:
    # We were started by the process systemd passed them to: they are its.
    environ = {
        "LISTEN_PID": str(os.getppid()),
        "LISTEN_FDS": "2",
        "LISTEN_FDNAMES": "a:b",
        "PATH": "/bin",
    }
    assert listen_fds(environ) is None
    assert environ == {"PATH": "/bin"}


def test_listen_fds_takes_the_sockets_with_their_names(monkeypatch: pytest.MonkeyPatch) -> None:
    tcp, udp = tcp_and_udp()
    with tcp, udp, at_consecutive_fds([tcp.fileno(), udp.fileno()]) as start:
        monkeypatch.setattr(systemd, "SD_LISTEN_FDS_START", start)
        environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "up:dg"}
        passed = listen_fds(environ)
        assert passed is not None
        assert environ == {}
        assert [p.name for p in passed] == ["up", "dg"]
        assert [p.socket.fileno() for p in passed] == [start, start + 1]
        assert [(p.socket.family, p.socket.type) for p in passed] == [
            (socket.AF_INET, socket.SOCK_STREAM),
            (socket.AF_INET, socket.SOCK_DGRAM),
        ]
        assert passed[0].socket.getsockname() == tcp.getsockname()
        # Nothing we start inherits them.
        assert not any(os.get_inheritable(p.socket.fileno()) for p in passed)
        for p in passed:
            p.socket.detach()  # at_consecutive_fds closes the numbers


@pytest.mark.parametrize(
    ("names", "expected"),
    [(None, ["unknown", "unknown"]), ("", ["unknown", "unknown"]), ("one", ["one", "unknown"])],
)
def test_listen_fds_names_default_to_unknown(
    monkeypatch: pytest.MonkeyPatch, names: str | None, expected: list[str]
) -> None:
    tcp, udp = tcp_and_udp()
    with tcp, udp, at_consecutive_fds([tcp.fileno(), udp.fileno()]) as start:
        monkeypatch.setattr(systemd, "SD_LISTEN_FDS_START", start)
        environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2"}
        if names is not None:
            environ["LISTEN_FDNAMES"] = names
        passed = listen_fds(environ)
        assert passed is not None
        assert [p.name for p in passed] == expected
        for p in passed:
            p.socket.detach()


@pytest.mark.parametrize(
    ("pid", "count", "quoted"),
    [
        ("abc", "1", "'abc'"),
        ("", "1", "LISTEN_PID=''"),
        ("ours", "two", "'two'"),
        ("ours", "1.5", "'1.5'"),
        ("ours", "-1", "'-1'"),
    ],
)
def test_malformed_variables_are_a_one_line_error(pid: str, count: str, quoted: str) -> None:
    environ = {"LISTEN_PID": str(os.getpid()) if pid == "ours" else pid, "LISTEN_FDS": count}
    with pytest.raises(UserError) as raised:
        listen_fds(environ)
    message = str(raised.value)
    assert "\n" not in message
    assert quoted in message
    assert environ == {}


def test_a_descriptor_that_is_not_a_socket_is_an_error_and_nothing_leaks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tcp = tcp_listening()
    read_end, write_end = os.pipe()
    try:
        with tcp, at_consecutive_fds([tcp.fileno(), read_end]) as start:
            monkeypatch.setattr(systemd, "SD_LISTEN_FDS_START", start)
            environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2"}
            with pytest.raises(UserError) as raised:
                listen_fds(environ)
            assert re.fullmatch(
                rf"file descriptor {start + 1} from systemd \(LISTEN_FDS=2\) is not a socket: .+",
                str(raised.value),
            )
            # The socket taken before the bad descriptor was closed again,
            # by listen_fds: not left to the garbage collector, which could
            # not collect it yet (the traceback in ``raised`` holds it).
            assert not _is_open(start)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_descriptor_that_is_not_open_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    start = 300
    while _is_open(start):
        start += 1
    monkeypatch.setattr(systemd, "SD_LISTEN_FDS_START", start)
    with pytest.raises(UserError, match=rf"^file descriptor {start} from systemd"):
        listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"})


@pytest.mark.parametrize("whose", ["ours", "another's"])
def test_children_do_not_inherit_the_variables(
    monkeypatch: pytest.MonkeyPatch, whose: str
) -> None:
    # LISTEN_FDS=0 so that "ours" takes no descriptor.
    pid = os.getpid() if whose == "ours" else os.getppid()
    monkeypatch.setenv("LISTEN_PID", str(pid))
    monkeypatch.setenv("LISTEN_FDS", "0")
    monkeypatch.setenv("LISTEN_FDNAMES", "x")
    assert listen_fds() == ([] if whose == "ours" else None)
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(k for k in os.environ if 'LISTEN' in k))"],
        capture_output=True,
        timeout=PROCESS_TIMEOUT,
        check=True,
    )
    assert child.stdout == b"[]\n"


# --- notify ----------------------------------------------------------------


def test_notify_without_notify_socket_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert notify("READY=1") is False


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notify_sends_one_datagram(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kind: str
) -> None:
    stand_in = NotifyReceiver(tmp_path / "notify" if kind == "path" else None)
    with contextlib.closing(stand_in):
        monkeypatch.setenv("NOTIFY_SOCKET", stand_in.address)
        assert notify("READY=1", "STATUS=Serving uppercase on tcp 127.0.0.1:1") is True
        assert stand_in.receive() == ["READY=1", "STATUS=Serving uppercase on tcp 127.0.0.1:1"]
        assert notify("WATCHDOG=1") is True
        assert stand_in.receive() == ["WATCHDOG=1"]


def test_notify_to_a_socket_that_is_gone_logs_and_goes_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gone = tmp_path / "gone"
    monkeypatch.setenv("NOTIFY_SOCKET", str(gone))
    with caplog.at_level(logging.DEBUG, logger="trio_upper.systemd"):
        assert notify("READY=1") is False
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert str(gone) in record.getMessage()


def test_notify_to_a_full_socket_does_not_wait(
    monkeypatch: pytest.MonkeyPatch, receiver: NotifyReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    # A systemd that does not read: the message is dropped, not waited for,
    # and that is no news worth a warning.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            for _ in range(100_000):
                filler.sendto(b"x" * 1024, receiver.address)
        monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
        with caplog.at_level(logging.DEBUG, logger="trio_upper.systemd"):
            assert notify("WATCHDOG=1") is False
    [record] = caplog.records
    assert record.levelno == logging.DEBUG


# --- the watchdog ----------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "20000000"}, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "ours"}, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "parent's"}, None),
        ({"WATCHDOG_PID": "ours"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-2"}, None),
        ({"WATCHDOG_USEC": "abc"}, None),
        ({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    pids = {"ours": str(os.getpid()), "parent's": str(os.getppid())}
    resolved = {key: pids.get(value, value) for key, value in environ.items()}
    assert watchdog_interval(resolved) == expected


def test_malformed_watchdog_variables_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="trio_upper.systemd"):
        assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert "WATCHDOG_USEC='soon'" in caplog.text


async def test_watchdog_pings_every_interval(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    sent: list[tuple[float, tuple[str, ...]]] = []

    def record(*fields: str) -> bool:
        sent.append((trio.current_time(), fields))
        return True

    monkeypatch.setattr(systemd, "notify", record)
    start = trio.current_time()
    with trio.move_on_after(35):
        await watchdog(10.0)
    assert [(round(when - start, 6), fields) for when, fields in sent] == [
        (0.0, ("WATCHDOG=1",)),
        (10.0, ("WATCHDOG=1",)),
        (20.0, ("WATCHDOG=1",)),
        (30.0, ("WATCHDOG=1",)),
    ]


# --- the server on inherited sockets ---------------------------------------


async def _tcp_round_trip(host: str, port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(data)
        await stream.send_eof()
        reply = bytearray()
        while chunk := await stream.receive_some():
            reply += chunk
        return bytes(reply)


async def _udp_round_trip(host: str, port: int, data: bytes) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with trio.socket.socket(family, socket.SOCK_DGRAM) as client:
        await client.sendto(data, (host, port))
        reply: bytes = await client.recv(65536)
        return reply


@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", marks=needs_ipv6)])
async def test_server_serves_inherited_sockets(nursery: trio.Nursery, host: str) -> None:
    tcp, udp = tcp_and_udp(host)
    port = tcp.getsockname()[1]
    # A second TCP socket: any number of each.
    other = tcp_listening(host)
    # Binding anything would fail: nothing has that address.
    server = UpperServer(UNBINDABLE)
    inherited = [ListenFd(udp, "u"), ListenFd(tcp, "t"), ListenFd(other, "t")]
    with trio.fail_after(IO_TIMEOUT):
        served: list[Endpoint] = await nursery.start(partial(server.run, inherited=inherited))
        assert served == [
            Endpoint("tcp", host, port),
            Endpoint("tcp", host, other.getsockname()[1]),
            Endpoint("udp", host, port),
        ]
        assert await _tcp_round_trip(host, port, b"hello") == b"HELLO"
        assert await _tcp_round_trip(host, other.getsockname()[1], b"two") == b"TWO"
        assert await _udp_round_trip(host, port, b"datagram") == b"DATAGRAM"
        server.shutdown(grace=0)
        await server.stopped_accepting()
    # The server owned them: closed with it.
    assert [s.fileno() for s in (tcp, udp, other)] == [-1, -1, -1]


@needs_ipv6
async def test_dual_stack_sockets_serve_ipv4_as_ipv4(nursery: trio.Nursery) -> None:
    # What a bare ListenStream=12000 / ListenDatagram=12000 gives: [::] taking
    # IPv4 too, whose clients appear as ::ffff:a.b.c.d.
    tcp = tcp_listening("::", v6only=False)
    port = tcp.getsockname()[1]
    udp = udp_bound("::", port, v6only=False)
    server = UpperServer(UNBINDABLE)
    with trio.fail_after(IO_TIMEOUT):
        served = await nursery.start(
            partial(server.run, inherited=[ListenFd(tcp, "t"), ListenFd(udp, "u")])
        )
        assert served == [Endpoint("tcp", "::", port), Endpoint("udp", "::", port)]
        assert await _tcp_round_trip("127.0.0.1", port, b"v4") == b"V4"
        assert await _udp_round_trip("127.0.0.1", port, b"v4") == b"V4"
        # A reply that would fit IPv6 but not IPv4 comes back as the --ascii
        # transform, as on an IPv4 socket, instead of failing to send.
        request = "ΐ".encode() + b"a" * (MAX_PAYLOAD_IPV4 - 2)
        assert MAX_PAYLOAD_IPV4 < len(upper_bytes(request)) < 65_527
        assert await _udp_round_trip("127.0.0.1", port, request) == upper_ascii(request)
        server.shutdown(grace=0)


def test_ipv4_clients_of_dual_stack_sockets_share_their_network_limit() -> None:
    # The rate limit counts per /24 for IPv4 however the address is written;
    # as an IPv6 /56, every IPv4 client on earth would share one bucket.
    assert source_network("::ffff:192.0.2.1") == source_network("192.0.2.200")
    assert source_network("::ffff:192.0.2.1") != source_network("::ffff:192.0.3.1")
    assert network_label("::ffff:192.0.2.1") == "192.0.2.0/24"
    # Not mapped, though it starts alike: an IPv6 address like any other.
    assert source_network("::ffff:1:2:3") == source_network("::ffff:1:2:4")
    assert source_network("::ffff:1:2:3") != source_network("192.0.2.1")


async def test_a_socket_named_metrics_serves_the_metrics(nursery: trio.Nursery) -> None:
    pytest.importorskip("prometheus_client")
    tcp, udp = tcp_and_udp()
    metrics_socket = tcp_listening()
    metrics_port = metrics_socket.getsockname()[1]
    server = UpperServer(UNBINDABLE)
    inherited = [ListenFd(tcp, "x"), ListenFd(udp, "x"), ListenFd(metrics_socket, "metrics")]
    with trio.fail_after(IO_TIMEOUT):
        served = await nursery.start(partial(server.run, inherited=inherited))
        assert Endpoint("metrics", "127.0.0.1", metrics_port) in served
        assert await _tcp_round_trip("127.0.0.1", tcp.getsockname()[1], b"x") == b"X"
        response = await _tcp_round_trip(
            "127.0.0.1", metrics_port, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        assert response.startswith(b"HTTP/1.1 200 ")
        # The one connection above, counted.
        assert re.search(rb"\ntrio_upper_tcp_connections_total 1(\.0)?\n", response), response
        server.shutdown(grace=0)


def _unix_socket() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)


def _unlistening_tcp() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.mark.parametrize(
    ("make", "config", "message"),
    [
        (lambda: [_unix_socket()], ServerConfig(), r"is neither TCP nor UDP over IP"),
        (lambda: [udp_bound(), _unlistening_tcp()], ServerConfig(), r"\) is not listening$"),
        (
            lambda: [tcp_listening(), udp_bound()],
            ServerConfig(udp=False),
            r"^an inherited socket is udp 127\.0\.0\.1:\d+, which --tcp-only excludes$",
        ),
        (
            lambda: [tcp_listening(), udp_bound()],
            ServerConfig(tcp=False),
            r"^an inherited socket is tcp 127\.0\.0\.1:\d+, which --udp-only excludes$",
        ),
        (
            lambda: [tcp_listening(), ("metrics", tcp_listening())],
            ServerConfig(metrics=("127.0.0.1", 0)),
            r"^--metrics cannot be used: an inherited socket named 'metrics'",
        ),
        (
            lambda: [("metrics", tcp_listening())],
            ServerConfig(),
            r"^no inherited socket to serve uppercase on",
        ),
        (
            lambda: [udp_bound()],
            ServerConfig(tls=ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)),
            r"^--certfile is for TCP, and every inherited socket is UDP$",
        ),
    ],
)
async def test_inherited_sockets_that_cannot_be_served_are_an_error(
    make: Callable[[], list[socket.socket | tuple[str, socket.socket]]],
    config: ServerConfig,
    message: str,
) -> None:
    inherited = [
        ListenFd(item[1], item[0]) if isinstance(item, tuple) else ListenFd(item, "x")
        for item in make()
    ]
    server = UpperServer(config)
    with trio.fail_after(IO_TIMEOUT), pytest.raises(UserError, match=message) as raised:
        await server.run(inherited=inherited)
    assert "\n" not in str(raised.value)
    # Every one of them closed, not only the culprit.
    assert [passed.socket.fileno() for passed in inherited] == [-1] * len(inherited)


# --- the command line, started as systemd starts it -------------------------


def test_serve_with_sockets_from_systemd(receiver: NotifyReceiver) -> None:
    tcp, udp = tcp_and_udp()
    address = tcp.getsockname()
    with tcp, udp:
        proc = activated([tcp, udp], ["serve"], {"NOTIFY_SOCKET": receiver.address})
        try:
            ready = receiver.until("READY=1")
            assert status(ready) == (
                f"Serving uppercase on tcp 127.0.0.1:{address[1]}, "
                f"udp 127.0.0.1:{address[1]} (sockets from systemd)"
            )
            assert tcp_exchange(address, b"over tcp") == b"OVER TCP"
            assert udp_exchange(address, b"over udp") == b"OVER UDP"
            # Open when the stop begins: it gets the grace period.
            open_one = socket.create_connection(address, timeout=IO_TIMEOUT)
            with open_one:
                open_one.sendall(b"before")
                assert open_one.recv(6) == b"BEFORE"
                proc.send_signal(signal.SIGTERM)
                stopping = receiver.until("STOPPING=1")
                assert status(stopping) == "Stopping: not accepting new connections"
                waiting = receiver.receive()
                assert waiting == ["STATUS=Stopping: waiting up to 5 s for 1 open connection"]
                open_one.sendall(b" and during")
                open_one.shutdown(socket.SHUT_WR)
                assert receive_all(open_one) == b" AND DURING"
            code, out, err = finish(proc)
        finally:
            proc.kill()
            proc.wait(PROCESS_TIMEOUT)
    assert (code, err) == (0, "")
    assert "not accepting new connections; waiting up to 5 s for 1 open connection" in out
    assert out.endswith("Stopped: served 2 TCP connections and 1 datagram.\n")
    assert not any("WATCHDOG=1" in message for message in receiver.messages)


@pytest.mark.parametrize(
    ("sockets", "args", "env", "message"),
    [
        (
            "tcp",
            ["--port", "12000"],
            {},
            "--host and --port cannot be used with sockets from systemd (LISTEN_FDS): "
            "the socket unit says where to listen",
        ),
        (
            "tcp",
            ["--host", "127.0.0.1"],
            {},
            "--host and --port cannot be used with sockets from systemd (LISTEN_FDS): "
            "the socket unit says where to listen",
        ),
        ("", [], {}, "systemd passed no sockets (LISTEN_FDS=0)"),
        (
            "",
            [],
            {"LISTEN_FDS": "some"},
            "LISTEN_PID=<pid>, LISTEN_FDS='some': not the numbers socket activation sets",
        ),
        ("tcp udp", ["--udp-only"], {}, "which --udp-only excludes"),
        ("unix", [], {}, "(fd 3, AF_UNIX SOCK_STREAM) is neither TCP nor UDP over IP"),
    ],
)
def test_serve_with_sockets_it_cannot_serve_is_a_one_line_error(
    sockets: str, args: list[str], env: dict[str, str], message: str
) -> None:
    makers = {"tcp": tcp_listening, "udp": udp_bound, "unix": _unix_socket}
    made = [makers[kind]() for kind in sockets.split()]
    try:
        proc = activated(made, ["serve", *args], env)
        code, out, err = finish(proc)
    finally:
        for sock in made:
            sock.close()
    assert code == 1
    assert out == ""
    [line] = err.splitlines()
    line = re.sub(r"LISTEN_PID='\d+'", "LISTEN_PID=<pid>", line)
    assert line.startswith("trio-upper: error: ")
    assert message in line


@pytest.mark.parametrize("whose", ["ours", "another's"])
def test_watchdog_pings_only_when_meant_for_us(receiver: NotifyReceiver, whose: str) -> None:
    tcp, udp = tcp_and_udp()
    env = {"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "100000"}
    if whose == "another's":
        # Pings every 50 us if it wrongly took them for its own: plenty of
        # them while the round trip below runs.
        env |= {"WATCHDOG_USEC": "100", "WATCHDOG_PID": "1"}
    with tcp, udp:
        proc = activated([tcp, udp], ["serve"], env)
        try:
            receiver.until("READY=1")
            if whose == "ours":
                receiver.until("WATCHDOG=1")
                receiver.until("WATCHDOG=1")
            assert tcp_exchange(tcp.getsockname(), b"ping") == b"PING"
            proc.send_signal(signal.SIGTERM)
            receiver.until("STOPPING=1")
            code, _, err = finish(proc)
        finally:
            proc.kill()
            proc.wait(PROCESS_TIMEOUT)
    assert (code, err) == (0, "")
    pings = sum(message == ["WATCHDOG=1"] for message in receiver.messages)
    assert (pings >= 2) if whose == "ours" else (pings == 0)


def test_a_restart_loses_no_connection_and_no_datagram(receiver: NotifyReceiver) -> None:
    # The test holds the sockets, as systemd does: between two server
    # processes, connections wait in the listen queue and datagrams in the
    # receive queue, and the second server answers them all.
    tcp, udp = tcp_and_udp()
    address = tcp.getsockname()
    env = {"NOTIFY_SOCKET": receiver.address}
    with contextlib.ExitStack() as held:
        held.enter_context(tcp)
        held.enter_context(udp)
        first = activated([tcp, udp], ["serve"], env)
        held.callback(first.kill)
        receiver.until("READY=1")
        assert tcp_exchange(address, b"first") == b"FIRST"
        first.send_signal(signal.SIGTERM)
        code, out, err = finish(first)
        assert (code, err) == (0, "")
        assert out.endswith("Stopped: served 1 TCP connection and 0 datagrams.\n")

        # No server runs now.
        waiting = []
        for n in range(8):
            conn = held.enter_context(socket.create_connection(address, timeout=IO_TIMEOUT))
            conn.sendall(f"connection {n}, made between the two".encode())
            conn.shutdown(socket.SHUT_WR)
            waiting.append(conn)
        asking = []
        for n in range(8):
            client = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            client.settimeout(IO_TIMEOUT)
            client.sendto(f"datagram {n}, sent between the two".encode(), address)
            asking.append(client)

        second = activated([tcp, udp], ["serve"], env)
        held.callback(second.kill)
        receiver.until("READY=1")
        for n, conn in enumerate(waiting):
            assert receive_all(conn) == f"CONNECTION {n}, MADE BETWEEN THE TWO".encode()
        for n, client in enumerate(asking):
            assert client.recv(65536) == f"DATAGRAM {n}, SENT BETWEEN THE TWO".encode()
        second.send_signal(signal.SIGTERM)
        code, out, err = finish(second)
    assert (code, err) == (0, "")
    assert out.endswith("Stopped: served 8 TCP connections and 8 datagrams.\n")


def _port_free_on_tcp_and_udp() -> int:
    tcp, udp = tcp_and_udp()
    port: int = tcp.getsockname()[1]
    tcp.close()
    udp.close()
    return port


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed (Debian: the systemd package)",
)
def test_real_systemd_socket_activate(receiver: NotifyReceiver) -> None:
    tool = shutil.which("systemd-socket-activate")
    assert tool is not None
    port = _port_free_on_tcp_and_udp()
    where = f"127.0.0.1:{port}"
    # One systemd-socket-activate makes sockets of one kind: the first binds
    # TCP and, at the first connection, execs the second, which keeps that
    # socket (LISTEN_FDS), adds the UDP one and execs the server. Neither
    # passes its environment on, but for what -E names.
    argv = [
        tool, "--listen", where, "--",
        tool, "--datagram", "--listen", where, "--fdname=uppercase:uppercase",
        f"--setenv=NOTIFY_SOCKET={receiver.address}", "--",
        *cli("serve"),
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stderr is not None
        # It says so once it listens; an error ends it (and the read).
        line = proc.stderr.readline().decode()
        assert line.startswith(f"Listening on {where}"), line
        assert tcp_exchange(("127.0.0.1", port), b"activated") == b"ACTIVATED"
        ready = receiver.until("READY=1")
        assert status(ready) == (
            f"Serving uppercase on tcp {where}, udp {where} (sockets from systemd)"
        )
        assert udp_exchange(("127.0.0.1", port), b"datagram") == b"DATAGRAM"
        proc.send_signal(signal.SIGTERM)
        receiver.until("STOPPING=1")
        code, out, err = finish(proc)
    finally:
        proc.kill()
        proc.wait(PROCESS_TIMEOUT)
    assert code == 0, err
    assert out.endswith("Stopped: served 1 TCP connection and 1 datagram.\n")
    assert "trio-upper" not in err  # no error line, no warning


# --- the unit files ----------------------------------------------------------


def _settings(unit: Path) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, values in order."""
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def _seconds(value: str) -> float:
    number = re.fullmatch(r"(\d+)(s|min)?", value)
    assert number is not None, value
    return int(number.group(1)) * (60 if number.group(2) == "min" else 1)


def test_units_say_what_the_server_does() -> None:
    socket_unit = _settings(UNITS / "trio-upper.socket")
    service = _settings(UNITS / "trio-upper.service")
    assert socket_unit["ListenStream"] == [str(DEFAULT_PORT)]
    assert socket_unit["ListenDatagram"] == [str(DEFAULT_PORT)]
    assert service["Type"] == ["notify"]
    assert service["KillSignal"] == ["SIGTERM"]
    [exec_start] = service["ExecStart"]
    command = exec_start.split()
    assert command[:2] == ["/usr/local/bin/trio-upper", "serve"]
    assert not {"--host", "--port", "-p"} & set(command)
    grace = float(command[command.index("--grace") + 1])
    # Room after the grace period for the server to finish and exit, before
    # systemd's SIGKILL.
    assert _seconds(service["TimeoutStopSec"][0]) >= grace + 5
    # What the watchdog pings against: long enough for a busy event loop.
    assert _seconds(service["WatchdogSec"][0]) >= 10
    for setting in ("DynamicUser", "NoNewPrivileges", "PrivateNetwork"):
        assert service[setting] == ["yes"], setting
    assert service["ProtectSystem"] == ["strict"]


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian: the systemd package)",
)
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart= names an executable: point it at this
    # environment's trio-upper, in copies.
    command = Path(sys.executable).parent / "trio-upper"
    if not command.exists():
        pytest.skip(f"no {command} to point ExecStart= at (pip install -e . makes it)")
    for name in ("trio-upper.socket", "trio-upper.service"):
        text = (UNITS / name).read_text()
        (tmp_path / name).write_text(text.replace("/usr/local/bin/trio-upper", str(command)))
    result = subprocess.run(
        ["systemd-analyze", "verify", "trio-upper.socket", "trio-upper.service"],
        cwd=tmp_path,
        capture_output=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )
    # Unknown or misspelt settings are only warnings: none is allowed.
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
