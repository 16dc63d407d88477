"""The UDP client: one datagram per line, each on a fresh socket, with
retries and backoff for lost datagrams.

:func:`udp_session` takes its sockets from a factory and its terminal as a
line reader and a writer, so the tests drive it over a fake datagram network
under a mock clock. :mod:`trio_upper.cli` plugs in real sockets and
:mod:`trio_upper.stdio`'s stdin and stdout.

Every failure the user can cause or meet (refused, unreachable, DNS failure,
no reply, a line too long for a datagram) is raised as
:class:`~trio_upper.errors.UserError` with a one-line message.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import trio

from .errors import UserError, os_reason, plural
from .stdio import LineSource
from .udp import RECEIVE_SIZE as DATAGRAM_RECEIVE_SIZE
from .udp import max_payload

__all__ = [
    "DEFAULT_RETRIES",
    "DEFAULT_UDP_TIMEOUT",
    "Address",
    "DatagramSocket",
    "SocketFactory",
    "resolve_udp",
    "udp_ask",
    "udp_session",
]

logger = logging.getLogger("trio_upper.udp_client")

# UDP loses datagrams, so a short first wait and a few retries with doubling
# waits (1 + 2 + 4 s by default) beat one long wait.
DEFAULT_UDP_TIMEOUT = 1.0
DEFAULT_RETRIES = 2
_BACKOFF = 2.0


class DatagramSocket(Protocol):
    """The part of :class:`trio.socket.SocketType` the UDP client uses, so
    tests can hand it a fake network."""

    def connect(self, address: tuple[object, ...], /) -> Awaitable[None]: ...
    def send(self, data: bytes, /) -> Awaitable[int]: ...
    def recv(self, bufsize: int, /) -> Awaitable[bytes]: ...
    def close(self) -> None: ...


# Makes a new UDP socket for an address family.
SocketFactory = Callable[[int], DatagramSocket]


def _udp_socket(family: int) -> DatagramSocket:
    return trio.socket.socket(family, socket.SOCK_DGRAM)


Address = tuple[int, tuple[object, ...]]  # (family, sockaddr)


async def resolve_udp(host: str, port: int) -> list[Address]:
    """The addresses to try for ``host``, in the resolver's order.

    Raises:
      UserError: the name does not resolve.
    """
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError.unresolvable(host, exc) from None
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


async def udp_ask(
    sock: DatagramSocket, request: bytes, *, timeout: float, retries: int
) -> bytes | None:
    """Send ``request`` on a connected socket and return the first reply.

    Try ``retries + 1`` times, waiting ``timeout`` seconds after the first
    send and twice as long after each retry.

    An empty datagram is the reply to an empty request only: the uppercase
    of anything else is never empty. nginx sends one when the server it
    forwarded to did not answer (one restarting, say); it is not taken for
    the answer, and the try waits on, then sends again.

    Returns:
      The reply, or None if no try got one.

    Raises:
      ConnectionRefusedError: the OS reported that nothing listens there (an
          ICMP port unreachable), which makes waiting pointless.
    """
    for attempt in range(retries + 1):
        await sock.send(request)
        with trio.move_on_after(timeout * _BACKOFF**attempt):
            while True:
                reply = await sock.recv(DATAGRAM_RECEIVE_SIZE)
                if reply or not request:
                    return reply
                logger.debug("an empty datagram is no answer to %d bytes: ignored", len(request))
        logger.debug("no reply to try %d", attempt + 1)
    return None


def _total_wait(timeout: float, retries: int) -> float:
    return math.fsum(timeout * _BACKOFF**attempt for attempt in range(retries + 1))


async def _ask_at(
    new_socket: SocketFactory,
    family: int,
    sockaddr: tuple[object, ...],
    request: bytes,
    *,
    timeout: float,
    retries: int,
) -> bytes | None:
    """:func:`udp_ask` at one address, on a socket of its own.

    Returns:
      The reply, or None if no try got one.

    Resource handling:
      The socket is closed on return.

    Raises:
      OSError: the socket cannot be made (``EAFNOSUPPORT``: an IPv6 address
          on a host without IPv6), cannot connect (unreachable), or is
          refused. Each means that nothing will answer at this address.
    """
    sock = new_socket(family)
    try:
        await sock.connect(sockaddr)
        return await udp_ask(sock, request, timeout=timeout, retries=retries)
    finally:
        sock.close()


async def udp_session(
    addresses: Sequence[Address],
    read_line: LineSource,
    write: Callable[[bytes], Awaitable[object]],
    *,
    where: str,
    timeout: float = DEFAULT_UDP_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    new_socket: SocketFactory = _udp_socket,
) -> int:
    """The lecture's UDPClient, repeated: each line is one datagram, and each
    reply is written followed by a newline.

    Every line gets a fresh socket, so a late reply to an earlier line, which
    arrives at the earlier socket's port, can never be taken for the answer to
    a later one. Addresses are tried in order (``localhost`` is often ``::1``
    first, and the server, or this host, may be IPv4 only); one that refuses,
    is unreachable, or is of a family this host has no sockets for is dropped,
    and the first that answers is kept for the lines after.

    Args:
      addresses: From :func:`resolve_udp`.
      read_line: The next line without its line ending, or None at the end.
      write: Where each reply (plus a newline) goes.
      where: ``"HOST port PORT"``, for messages.
      timeout: Seconds to wait for the first try's reply; see :func:`udp_ask`.
      retries: Tries after the first before giving up on a line.
      new_socket: Makes the socket for each line (the tests pass fakes).

    Returns:
      The number of lines answered.

    Resource handling:
      Each line's socket is closed before the next line is read.

    Raises:
      UserError: a line too long for one datagram, no server (refused), no
          address that can be reached (the reason is the last address's), or
          no reply after every retry.
    """
    candidates = list(addresses)
    answered = 0
    while (line := await read_line()) is not None:
        reply: bytes | None = None
        failures: list[OSError] = []
        for family, sockaddr in list(candidates):
            if len(line) > max_payload(family):
                raise UserError(
                    f"line {answered + 1} is longer than one datagram can carry "
                    f"({max_payload(family)} bytes)"
                )
            try:
                reply = await _ask_at(
                    new_socket, family, sockaddr, line, timeout=timeout, retries=retries
                )
            except OSError as exc:
                # No socket for its family, refused (ICMP port unreachable) or
                # unreachable: nothing will answer there, so drop this address
                # and try the next.
                logger.debug("%s: %s; trying the next address", sockaddr, exc)
                failures.append(exc)
                candidates.remove((family, sockaddr))
                continue
            if reply is None:
                raise UserError(
                    f"no reply from {where} after {plural(retries + 1, 'try', 'tries')} "
                    f"over {_total_wait(timeout, retries):g} s"
                )
            break
        if reply is None:
            if failures and all(isinstance(e, ConnectionRefusedError) for e in failures):
                raise UserError(f"no UDP server at {where}: connection refused")
            reason = os_reason(failures[-1]) if failures else "no address to try"
            raise UserError(f"cannot reach {where}: {reason}")
        await write(reply + b"\n")
        answered += 1
    return answered
