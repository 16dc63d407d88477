"""Behind real load balancers: the configurations shipped in contrib/, the
bytes nginx and HAProxy send, and the scale-out scenario of
:mod:`tests.scaleout` (three instances, a rolling restart under load) with
nginx and with HAProxy where they are installed, and with the instances
sharing a port (--reuse-port)."""

from __future__ import annotations

import logging
import re
import socket
import struct
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_upper.proxy import DEFAULT_ALLOW, AllowList, parse_allow_list
from trio_upper.server import ServerConfig, UpperServer
from trio_upper.transform import upper_bytes
from trio_upper.udp_client import udp_ask

from .helpers import PROCESS_TIMEOUT
from .scaleout import (
    CONF_INSTANCE_PORTS,
    CONF_LISTEN_PORT,
    HAPROXY_CFG,
    NGINX_CONF,
    Settings,
    haproxy_config,
    missing,
    nginx_config,
    run_scenario,
)

# What HAProxy 2.6 sends as its health check when the server line has
# send-proxy-v2: a version 2 header with the LOCAL command and no
# addresses; then it resets the connection (captured from a real one).
HAPROXY_CHECK = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"

# What nginx 1.22 puts before each datagram with `proxy_protocol on` in a
# UDP server: a version 1 line that says TCP4 (captured from a real one).
NGINX_DATAGRAM_HEADER = b"PROXY TCP4 192.0.2.7 127.0.0.1 48163 12000\r\n"

SHIPPED_PORTS = re.compile(
    r"\b(?:" + "|".join(map(str, [CONF_LISTEN_PORT, *CONF_INSTANCE_PORTS])) + r")\b"
)
PORTS = (20000, 20001, 20002, 20003)


def settings_of(text: str) -> str:
    """The configuration without its comments."""
    return "".join(line.partition("#")[0] + "\n" for line in text.splitlines())


# --- The configurations in contrib/ ---------------------------------------------------------


def test_the_nginx_configuration_is_run_with_every_port_replaced() -> None:
    listen, *instances = PORTS
    text = settings_of(nginx_config(NGINX_CONF.read_text(), listen, instances))
    assert SHIPPED_PORTS.findall(text) == []
    assert f"listen 127.0.0.1:{listen};" in text
    assert f"listen 127.0.0.1:{listen} udp;" in text
    for port in instances:
        assert text.count(f"127.0.0.1:{port} ") == 2
    quick = nginx_config(NGINX_CONF.read_text(), listen, instances, recovery=1)
    assert settings_of(quick).count("fail_timeout=1s;") == 6


def test_the_haproxy_configuration_is_run_with_every_port_replaced() -> None:
    listen, *instances = PORTS
    text = settings_of(haproxy_config(HAPROXY_CFG.read_text(), listen, instances))
    assert SHIPPED_PORTS.findall(text) == []
    assert f"bind 127.0.0.1:{listen}\n" in text
    for port in instances:
        assert text.count(f"127.0.0.1:{port}\n") == 1
    quick = haproxy_config(HAPROXY_CFG.read_text(), listen, instances, recovery=0.3)
    assert " check inter 300ms " in settings_of(quick)


@pytest.mark.parametrize(
    ("shipped", "render", "old", "new"),
    [
        (NGINX_CONF, nginx_config, "listen 12000 udp;", "listen 12000 udp reuseport;"),
        (NGINX_CONF, nginx_config, "server 127.0.0.1:12002 ", "server 127.0.0.1:12004 "),
        (HAPROXY_CFG, haproxy_config, "bind :12000\n", "bind *:12000\n"),
        (HAPROXY_CFG, haproxy_config, "127.0.0.1:12003\n", "127.0.0.1:12003 weight 2\n"),
        (NGINX_CONF, nginx_config, "12003 max_fails=1 fail_timeout=2s", "12003 max_fails=1"),
        (HAPROXY_CFG, haproxy_config, "check inter 2s", "check inter 5s"),
    ],
)
def test_a_configuration_that_drifted_from_the_test_is_an_error(
    shipped: Path, render: object, old: str, new: str
) -> None:
    text = shipped.read_text()
    assert old in text
    with pytest.raises(ValueError, match="expected"):
        render(text.replace(old, new), PORTS[0], PORTS[1:], 1)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("shipped", "directives"),
    [
        (
            NGINX_CONF,
            ["proxy_protocol on;", "proxy_half_close on;", "proxy_responses 1;",
             "proxy_next_upstream on;"],
        ),
        (HAPROXY_CFG, ["mode tcp", "send-proxy-v2", " check ", "retries 3", "option redispatch"]),
    ],
)  # fmt: skip
def test_the_configurations_say_what_the_scenario_relies_on(
    shipped: Path, directives: list[str]
) -> None:
    # Not in a comment: a directive commented out does nothing.
    text = settings_of(shipped.read_text())
    for directive in directives:
        assert directive in text, directive


# --- What the balancers send ----------------------------------------------------------------


async def start_behind_proxy(nursery: trio.Nursery) -> tuple[UpperServer, int]:
    allow = AllowList(parse_allow_list(DEFAULT_ALLOW))
    server = UpperServer(ServerConfig(host="127.0.0.1", port=0, proxy_allow=allow))
    endpoints = await nursery.start(server.run)
    return server, endpoints[0].port


async def test_a_health_check_that_resets_before_it_is_accepted_is_quiet(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    server, port = await start_behind_proxy(nursery)
    # Connected, header sent and reset with no checkpoint in between: the
    # server accepts it only afterwards, when it has no peer address any
    # more but its header can still be read.
    check = socket.create_connection(("127.0.0.1", port), timeout=PROCESS_TIMEOUT)
    check.sendall(HAPROXY_CHECK)
    check.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    check.close()
    # The next connection, accepted after it: once it is served, the
    # check's handler has run too.
    request = "straße".encode()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(HAPROXY_CHECK + request)
        await stream.send_eof()
        with trio.fail_after(PROCESS_TIMEOUT):
            reply = b""
            while chunk := await stream.receive_some():
                reply += chunk
    assert reply == b"STRASSE"
    await trio.testing.wait_all_tasks_blocked()
    assert server.stats.connections == 2
    assert server.stats.active == 0
    # The check's header was read as a header, not as a client's data to
    # answer: the bytes counted are the second connection's.
    assert server.stats.bytes_received == len(request)
    assert server.stats.lost == 1
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    server.shutdown(grace=0)


async def test_a_datagram_with_nginx_s_header_is_answered_without_it(
    nursery: trio.Nursery,
) -> None:
    server, port = await start_behind_proxy(nursery)
    payload = "héllo ΐ".encode()
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.sendto(NGINX_DATAGRAM_HEADER + payload, ("127.0.0.1", port))
        with trio.fail_after(PROCESS_TIMEOUT):
            reply, _ = await sock.recvfrom(65536)
    assert reply == upper_bytes(payload)
    server.shutdown(grace=0)


class NginxFront:
    """A client's connected UDP socket to nginx in front of an instance that
    is restarting: nginx answers the first ``failures`` datagrams with an
    empty one at once (what nginx 1.22 does when its upstream refuses), and
    the others with their uppercase."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.sent: list[bytes] = []
        self._replies, self._inbox = trio.open_memory_channel[bytes](10)

    async def connect(self, address: tuple[object, ...], /) -> None:
        await trio.lowlevel.checkpoint()

    async def send(self, data: bytes, /) -> int:
        await trio.lowlevel.checkpoint()
        self.sent.append(data)
        reply = b"" if len(self.sent) <= self.failures else upper_bytes(data)
        self._replies.send_nowait(reply)
        return len(data)

    async def recv(self, bufsize: int, /) -> bytes:
        return await self._inbox.receive()

    def close(self) -> None:
        pass


async def test_the_udp_client_takes_nginx_s_empty_datagram_for_no_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sock = NginxFront(failures=2)
    reply = await udp_ask(sock, "héllo".encode(), timeout=1.0, retries=2)
    assert reply == "HÉLLO".encode()
    assert sock.sent == ["héllo".encode()] * 3
    # Only two tries failing this way: the client gives up after its retries.
    sock = NginxFront(failures=3)
    assert await udp_ask(sock, b"hello", timeout=1.0, retries=2) is None


async def test_the_udp_client_takes_an_empty_reply_to_an_empty_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sock = NginxFront(failures=0)
    assert await udp_ask(sock, b"", timeout=1.0, retries=2) == b""
    assert sock.sent == [b""]


# --- The scenario with the real balancers ---------------------------------------------------


# Short: what `nox -s scaleout` runs for longer. Each restart still meets
# load before and after it.
# Their recovery (nginx's fail_timeout, whole seconds; HAProxy's check
# interval) is shortened to match: a step shorter than it fails, as it should.
QUICK = {
    "nginx": Settings(tcp_clients=8, udp_clients=2, step=1.3, recovery=1.0),
    "haproxy": Settings(tcp_clients=8, udp_clients=2, step=0.6, recovery=0.3),
    # No balancer to wait for: the instances share the port.
    "reuse-port": Settings(tcp_clients=8, udp_clients=2, step=0.5, recovery=0.1),
}


def setup(balancer: str) -> object:
    """``balancer`` as a test parameter, skipped with the reason where it
    cannot run."""
    why = missing(balancer)
    return pytest.param(balancer, marks=pytest.mark.skipif(why is not None, reason=why or ""))


@pytest.mark.parametrize("balancer", [setup(name) for name in QUICK])
async def test_a_rolling_restart_behind_a_balancer_fails_nothing(
    balancer: str, tmp_path: Path
) -> None:
    with trio.fail_after(PROCESS_TIMEOUT * 2):
        counts = await run_scenario(
            balancer, QUICK[balancer], tmp_path, seed=1, report=lambda _: None
        )
    assert counts.failures == []
    assert counts.restarts == 3
    assert counts.exchanges > 0
    if balancer != "haproxy":
        assert counts.datagrams > 0
