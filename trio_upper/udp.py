"""The UDP side of the server: a receive loop on one trio UDP socket.

Each datagram is a complete message: its uppercase goes back to its sender as
one datagram. There is no connection and no state between datagrams.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import NoReturn

import trio

from .transform import upper_ascii, upper_bytes

__all__ = ["RECEIVE_SIZE", "max_payload", "reply_for", "serve_udp"]

logger = logging.getLogger("trio_upper.udp")

# The largest UDP payload each family can carry: 65,535 (the IP length field)
# minus the headers: 20 (IPv4) + 8 (UDP); IPv6 counts its 40-byte header
# outside the length field, so only the UDP header comes off. The lecture
# truncates at 2,048; we never truncate.
MAX_PAYLOAD_IPV4 = 65_507
MAX_PAYLOAD_IPV6 = 65_527

# One byte more than any datagram can hold, so a read never truncates.
RECEIVE_SIZE = 65_536


def max_payload(family: int) -> int:
    """The largest datagram payload for an address family."""
    return MAX_PAYLOAD_IPV6 if family == socket.AF_INET6 else MAX_PAYLOAD_IPV4


def reply_for(request: bytes, *, ascii_only: bool = False, limit: int) -> bytes:
    """The reply datagram for one request datagram.

    Uppercasing UTF-8 text can make it longer (``ß`` becomes ``SS``; some
    characters triple), and a datagram cannot grow past ``limit``. When the
    UTF-8 uppercase would not fit, the reply is the ``--ascii`` transform of
    the request instead: same length as the request, so it always fits, and
    every byte still comes back. The server logs this at debug level.
    """
    reply = upper_bytes(request, ascii_only=ascii_only)
    if len(reply) > limit:
        logger.debug(
            "reply of %d bytes would exceed %d: sent the --ascii transform instead",
            len(reply),
            limit,
        )
        return upper_ascii(request)
    return reply


async def serve_udp(
    sock: trio.socket.SocketType,
    *,
    ascii_only: bool = False,
    on_datagram: Callable[[], object] | None = None,
) -> NoReturn:
    """Answer every datagram that arrives on ``sock`` until cancelled.

    Args:
      sock: A bound UDP socket. Its family sets the reply size limit.
      ascii_only: Use the ``--ascii`` transform.
      on_datagram: Called for each request, for the server's counts.

    Resource handling:
      ``sock`` is left open: whoever bound it closes it.

    Error handling:
      Any other error from the socket ends this loop, and with it the
      server: it would mean the socket itself is broken.
      A reply that cannot be sent (the sender's address is unreachable, or not
      a valid destination at all) is logged at debug level and dropped: UDP
      promises no delivery, and one bad sender must not stop the loop. An
      ICMP error that some systems report on the next receive is skipped the
      same way.
    """
    limit = max_payload(sock.family)
    while True:
        try:
            request, sender = await sock.recvfrom(RECEIVE_SIZE)
        except ConnectionError as exc:
            logger.debug("receive error ignored: %s", exc)
            continue
        if on_datagram is not None:
            on_datagram()
        reply = reply_for(request, ascii_only=ascii_only, limit=limit)
        try:
            await sock.sendto(reply, sender)
        except OSError as exc:
            logger.debug("reply to %s not sent: %s", sender, exc)
