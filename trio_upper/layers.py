"""Streams and listeners that wrap others, trio's way.

trio's wrappers name what they wrap ``transport_stream`` or
``transport_listener`` (:class:`trio.SSLStream`, :class:`trio.SSLListener`),
and its socket streams and listeners keep their socket as ``socket``. The
server's wrappers follow the same convention (the connection slot's
:class:`~trio_upper.capacity.SlotStream`, the PROXY protocol's
:class:`~trio_upper.proxy.ProxyStream`, ...), so these few functions find a
connection's socket and its peer through any stack of them, without
knowing any of their classes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import trio

__all__ = [
    "SocketLike",
    "StreamWrapper",
    "layers",
    "peer_address",
    "socket_of",
    "socket_owner",
]


class SocketLike(Protocol):
    """What the server asks of the socket beneath a stream or a listener:
    its addresses. A :mod:`socket` socket and a :mod:`trio.socket` socket
    both have them."""

    def getsockname(self) -> Any: ...
    def getpeername(self) -> Any: ...


def layers(resource: object) -> Iterator[object]:
    """``resource`` and what it wraps, outermost first, following trio's
    convention: a wrapper names what it wraps ``transport_stream`` or
    ``transport_listener`` (:class:`trio.SSLStream`, :class:`trio.SSLListener`,
    and ours: :class:`~trio_upper.capacity.SlotStream`,
    :class:`~trio_upper.proxy.ProxyStream`, ...)."""
    while resource is not None:
        yield resource
        resource = getattr(resource, "transport_stream", None) or getattr(
            resource, "transport_listener", None
        )


def socket_of(resource: object) -> SocketLike | None:
    """The socket beneath a stream or listener, through any wrappers; None
    if there is none (an in-memory stream).

    A socket stream or listener has a ``socket`` attribute
    (:class:`trio.SocketStream`,
    :class:`~trio_upper.fastsocket.FastSocketStream` and their listeners).
    """
    owner = socket_owner(resource)
    sock: SocketLike | None = getattr(owner, "socket", None)
    return sock


def socket_owner(resource: object) -> object | None:
    """The layer beneath a stream or listener that holds its socket: what
    :func:`socket_of` gets the socket from."""
    for layer in layers(resource):
        if getattr(layer, "socket", None) is not None:
            return layer
    return None


def peer_address(stream: trio.abc.Stream) -> tuple[str, int] | None:
    """The other end of ``stream``: the client a PROXY protocol header named
    (a layer's ``peer_address``), else the socket's peer; None if there is
    no socket, or it is no longer connected."""
    for layer in layers(stream):
        address: tuple[str, int] | None = getattr(layer, "peer_address", None)
        if address is not None:
            return address
        sock: SocketLike | None = getattr(layer, "socket", None)
        if sock is not None:
            try:
                peer = sock.getpeername()
            except OSError:
                return None
            return peer[0], peer[1]
    return None


class StreamWrapper(trio.abc.Stream):
    """A stream around another, passing every call through: the base of the
    wrappers that change one thing (what a receive returns, what a close
    does) and leave the rest to ``transport_stream``.

    Args:
      transport_stream: The stream wrapped; owned from now on.
    """

    def __init__(self, transport_stream: trio.abc.Stream) -> None:
        self.transport_stream = transport_stream

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.transport_stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()
