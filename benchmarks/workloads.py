"""The workloads: what the load generator does to each server.

Every payload is lowercase text, so that each request has real work in it,
and it is fixed, so that every server gets the very same bytes. The expected
reply is computed per server by the transform that server claims to apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "IDLE_CONNECTIONS",
    "IDLE_WARM",
    "QUICK_IDLE_CONNECTIONS",
    "TLS_WORKLOADS",
    "WORKLOAD_NAMES",
    "Workload",
    "ascii_text",
    "utf8_text",
    "workloads",
]

IDLE_CONNECTIONS = 10_000
QUICK_IDLE_CONNECTIONS = 100

# Idle mode opens this many connections before the baseline memory sample,
# so that what a server allocates once, for its first connections, is not
# charged to the ten thousand that follow.
IDLE_WARM = 50

_ASCII = b"the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. "
_UTF8 = "grüße aus köln, straße und maß; ça va, garçon? ﬁn de ΐ; żółć, δέκα, ёлка, ǆ. "


def ascii_text(size: int) -> bytes:
    """``size`` bytes of lowercase ASCII text."""
    return (_ASCII * (size // len(_ASCII) + 1))[:size]


def utf8_text(size: int) -> bytes:
    """``size`` bytes of valid UTF-8 text, mostly non-ASCII lowercase, some of
    which grows when uppercased (``ß``, ``ﬁ``, ``ΐ``)."""
    out = bytearray()
    while True:
        for char in _UTF8:
            encoded = char.encode()
            if len(out) + len(encoded) > size:
                # Pad with ASCII rather than cut a character in two.
                return bytes(out) + ascii_text(size - len(out))
            out += encoded


Mode = Literal["tcp", "connect", "udp", "idle"]


@dataclass(frozen=True)
class Workload:
    """One way of loading a server, and how the report names it."""

    name: str
    title: str
    mode: Mode
    connections: int
    payload: bytes
    description: str
    depth: int = 1
    count: int = 0
    """Idle mode: the connections to hold."""
    tls: bool = False
    """Over TLS: each connection's handshake is done before the warm-up, so
    what is measured is requests over TLS."""


WORKLOAD_NAMES = (
    "tcp",
    "pipelined",
    "bulk",
    "connect",
    "udp",
    "idle",
    "tcp-utf8",
    "tls",
    "tls-bulk",
)
TLS_WORKLOADS = frozenset({"tls", "tls-bulk"})


def workloads(*, idle_connections: int) -> list[Workload]:
    """Every workload, in the order they run and are reported."""
    small = ascii_text(100)
    return [
        Workload(
            "tcp",
            "TCP ping-pong",
            "tcp",
            50,
            small,
            "50 connections; each sends 100 B and waits for the whole reply before the next",
        ),
        Workload(
            "pipelined",
            "TCP pipelined",
            "tcp",
            50,
            small,
            "50 connections; each sends 16 x 100 B at once and waits for all 16 replies "
            "(16 requests per round trip)",
            depth=16,
        ),
        Workload(
            "bulk",
            "TCP bulk",
            "tcp",
            4,
            ascii_text(65536),
            "4 connections; each sends 64 KiB messages, reading the reply while it writes",
        ),
        Workload(
            "connect",
            "TCP connect per request",
            "connect",
            50,
            small,
            "50 in flight; each: connect, send 100 B, read the reply, close (the lecture's "
            "client)",
        ),
        Workload(
            "udp",
            "UDP",
            "udp",
            50,
            small,
            "50 sockets, one 100 B datagram outstanding on each; resent after 250 ms",
        ),
        Workload(
            "idle",
            "Idle connections",
            "idle",
            50,
            small,
            f"{idle_connections:,} connections, one request each, then held open; "
            "server memory (VmRSS) growth per connection",
            count=idle_connections,
        ),
        Workload(
            "tcp-utf8",
            "TCP ping-pong, non-ASCII text",
            "tcp",
            50,
            utf8_text(100),
            "as TCP ping-pong, with 100 B of mostly non-ASCII UTF-8 text",
        ),
        Workload(
            "tls",
            "TLS ping-pong",
            "tcp",
            50,
            small,
            "as TCP ping-pong, over TLS (TLS 1.3, handshakes done before the warm-up)",
            tls=True,
        ),
        Workload(
            "tls-bulk",
            "TLS bulk",
            "tcp",
            4,
            ascii_text(65536),
            "as TCP bulk, over TLS (TLS 1.3, handshakes done before the warm-up)",
            tls=True,
        ),
    ]
