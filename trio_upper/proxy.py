"""Serving behind a load balancer: the PROXY protocol on the server's
connections and datagrams (``serve --proxy-protocol``).

A connection from an address on the allow list (``--proxy-allow-from``) must
begin with a PROXY protocol header (:mod:`trio_upper.proxyproto` parses it);
the header is taken off, and the client it names is the peer from then on.
From any other address nothing is parsed: the bytes are data.

:class:`ProxyListener` wraps a listener the way :class:`trio.SSLListener`
does, and its streams are read lazily: the header is read by the first
``receive_some``, in the connection's own handler, so a balancer (or anyone)
slow to send it holds up no one and is bounded by ``--idle-timeout`` like
any silent client.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from typing import Any

import trio

from .layers import StreamWrapper, socket_of
from .proxyproto import V2_SIGNATURE, ProxyHeader, ProxyProtocolError, parse

__all__ = [
    "DEFAULT_ALLOW",
    "AllowList",
    "ProxyListener",
    "ProxyStream",
    "parse_allow_list",
    "strip_datagram",
]

logger = logging.getLogger("trio_upper.proxy")

# Who may send a header by default: a balancer on this machine. Anything
# wider must be said, since whoever may send a header may claim any address.
DEFAULT_ALLOW = "127.0.0.1,::1"

# Addresses whose verdict is remembered, so that a busy balancer's datagrams
# cost a dictionary lookup rather than an ipaddress parse each.
_CACHE_SIZE = 1024

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_allow_list(text: str) -> list[Network]:
    """``ADDR[/BITS],...`` as networks.

    Raises:
      ValueError: an item is not an address or network (host bits set
          included), with the item in the message.
    """
    networks: list[Network] = []
    for item in text.split(","):
        item = item.strip()
        try:
            networks.append(ipaddress.ip_network(item))
        except ValueError:
            raise ValueError(f"not an address or ADDR/BITS network: {item!r}") from None
    return networks


class AllowList:
    """Which peers may (and then must) send a PROXY protocol header.

    Args:
      networks: As :func:`parse_allow_list` returns them.
    """

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = list(networks)
        self._verdicts: dict[str, bool] = {}

    def allows(self, address: str) -> bool:
        """Whether ``address`` (as ``getpeername``/``recvfrom`` give it) is on
        the list. An IPv4 client of a dual-stack socket counts as IPv4."""
        verdict = self._verdicts.get(address)
        if verdict is None:
            try:
                ip = ipaddress.ip_address(address.partition("%")[0])
            except ValueError:
                return False
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            verdict = any(ip in network for network in self.networks)
            if len(self._verdicts) >= _CACHE_SIZE:
                self._verdicts.clear()
            self._verdicts[address] = verdict
        return verdict


def strip_datagram(data: bytes) -> tuple[ProxyHeader | None, bytes] | None:
    """A datagram from an allowed sender: its header (None if it has none)
    and the payload after it; None if it starts like a header but is not
    one (drop it: half a header cannot be completed by a later datagram)."""
    if not (data.startswith(V2_SIGNATURE[:4]) or data.startswith(b"PROXY ")):
        return None, data
    try:
        header = parse(data)
    except ProxyProtocolError:
        return None
    if header is None:
        return None
    return header, data[header.length :]


class ProxyStream(StreamWrapper):
    """A connection that begins with a PROXY protocol header; the first
    :meth:`receive_some` reads it (and no further) and returns the data
    after it.

    Args:
      transport_stream: The connection from the balancer; owned from now on.

    Attributes:
      transport_stream: As given.
      peer_address: The client's (address, port) from the header, once it
          has been read; None before, or if the header names no client
          (the balancer's own health check), when the connection's own
          address applies.
    """

    def __init__(self, transport_stream: trio.abc.Stream) -> None:
        super().__init__(transport_stream)
        self.peer_address: tuple[str, int] | None = None
        self._header_read = False
        self._pending = b""

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self._header_read:
            await self._read_header()
        elif self._pending:
            await trio.lowlevel.checkpoint()
        if not self._pending:
            return await self.transport_stream.receive_some(max_bytes)
        size = len(self._pending) if max_bytes is None else max_bytes
        data, self._pending = self._pending[:size], self._pending[size:]
        return data

    async def _read_header(self) -> None:
        """Read until the header is complete; keep what came after it.

        Raises:
          trio.BrokenResourceError: no header, a malformed one, or the end
              of the stream before it ended.
        """
        buffer = b""
        while True:
            chunk = await self.transport_stream.receive_some()
            if not chunk:
                raise trio.BrokenResourceError(
                    f"the connection ended inside a PROXY protocol header ({len(buffer)} bytes)"
                )
            buffer += chunk
            try:
                header = parse(buffer)
            except ProxyProtocolError as exc:
                raise trio.BrokenResourceError(f"PROXY protocol: {exc}") from exc
            if header is not None:
                break
        self._header_read = True
        self.peer_address = header.source
        self._pending = buffer[header.length :]


class ProxyListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose connections from ``allow``'s addresses are
    :class:`ProxyStream`; the others pass through untouched.

    Args:
      transport_listener: The real listener; owned from now on.
      allow: Who may send (and so must send) a header.

    Attributes:
      transport_listener: As given.
    """

    def __init__(self, transport_listener: trio.abc.Listener[Any], allow: AllowList) -> None:
        self.transport_listener = transport_listener
        self._allow = allow

    async def accept(self) -> trio.abc.Stream:
        stream: trio.abc.Stream = await self.transport_listener.accept()
        sock = socket_of(stream)
        try:
            peer = sock.getpeername()[0] if sock is not None else None
        except OSError:
            # Reset before we took it (ENOTCONN), yet what it sent can still
            # be read: HAProxy's health check sends its header and resets
            # at once. Who sent it is unknown, so the bytes are not taken
            # for a direct client's data: a header is required, as from a
            # balancer, and anything else ends the connection unanswered.
            return ProxyStream(stream)
        if peer is not None and self._allow.allows(peer):
            return ProxyStream(stream)
        return stream

    async def aclose(self) -> None:
        await self.transport_listener.aclose()
