"""The UDP side of the server: a receive loop on one UDP socket.

Each datagram is a complete message: its uppercase goes back to its sender as
one datagram. There is no connection and no state between datagrams.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any, NoReturn

import trio

from .ratelimit import ReplyRateLimiter, Verdict, network_label, source_network
from .transform import upper_ascii, upper_bytes

__all__ = ["BATCH", "RECEIVE_SIZE", "UdpCounts", "max_payload", "reply_for", "serve_udp"]

logger = logging.getLogger("trio_upper.udp")

# The largest UDP payload each family can carry: 65,535 (the IP length field)
# minus the headers: 20 (IPv4) + 8 (UDP); IPv6 counts its 40-byte header
# outside the length field, so only the UDP header comes off. The lecture
# truncates at 2,048; we never truncate.
MAX_PAYLOAD_IPV4 = 65_507
MAX_PAYLOAD_IPV6 = 65_527

# One byte more than any datagram can hold, so a read never truncates.
RECEIVE_SIZE = 65_536

# Datagrams answered per wake-up before a schedule point. Waking the task
# costs more than answering a datagram, so answering the whole backlog per
# wake-up is what makes a busy UDP server cheap; the cap keeps TCP
# connections from waiting behind a flood of datagrams.
BATCH = 64

# How long a reply may wait for room in the kernel's send buffer. The buffer
# drains at network speed, so a full one that stays full this long means the
# path is jammed; receiving pauses while a reply waits, so the wait is short.
SEND_PATIENCE = 1.0
_RETRY_INTERVAL = 0.01


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


@dataclass
class UdpCounts:
    """What the UDP side did, for the server's closing summary."""

    datagrams: int = 0  # requests received
    rate_limited: int = 0  # requests not answered: over --udp-rate-limit
    dropped: int = 0  # replies the kernel had no room for within SEND_PATIENCE


async def serve_udp(
    sock: socket.socket,
    *,
    ascii_only: bool = False,
    limiter: ReplyRateLimiter | None = None,
    counts: UdpCounts | None = None,
) -> NoReturn:
    """Answer every datagram that arrives on ``sock`` until cancelled.

    Datagrams are answered in batches: each wake-up reads and answers up to
    :data:`BATCH` datagrams with plain non-blocking calls, then either waits
    for the socket to be readable again (it was drained) or takes a
    checkpoint and goes on (a full batch: let other tasks run first).

    Args:
      sock: A bound UDP socket (standard library). It is made non-blocking.
          Its family sets the reply size limit.
      ascii_only: Use the ``--ascii`` transform.
      limiter: If given, a request is answered only if the limiter allows a
          reply to its source's network (see
          :func:`~trio_upper.ratelimit.source_network`); refusals are counted,
          and the first of each run of refusals to one network is logged.
      counts: Incremented as datagrams come and go, for the server's summary.

    Resource handling:
      ``sock`` is left open: whoever bound it closes it.

    Error handling:
      Any other error from the socket ends this loop, and with it the
      server: it would mean the socket itself is broken.
      A reply that cannot be sent (the sender's address is unreachable, or not
      a valid destination at all) is logged at debug level and dropped: UDP
      promises no delivery, and one bad sender must not stop the loop. An
      ICMP error that some systems report on the next receive is skipped the
      same way. A reply that finds the kernel's send buffer full waits for
      room up to :data:`SEND_PATIENCE` seconds (receiving pauses meanwhile,
      which is back-pressure); then it is dropped and counted.
    """
    if counts is None:
        counts = UdpCounts()
    sock.setblocking(False)
    limit = max_payload(sock.family)
    while True:
        drained, pending = _answer_batch(sock, ascii_only, limit, limiter, counts)
        if pending is not None:
            await _send_when_room(sock, *pending, counts)
        elif drained:
            await trio.lowlevel.wait_readable(sock)
        else:
            await trio.lowlevel.checkpoint()


def _answer_batch(
    sock: socket.socket,
    ascii_only: bool,
    limit: int,
    limiter: ReplyRateLimiter | None,
    counts: UdpCounts,
) -> tuple[bool, tuple[bytes, Any] | None]:
    """Answer up to BATCH waiting datagrams without blocking.

    Returns whether the socket was drained, and a reply that found the send
    buffer full (with its address), which the caller must wait to send.
    """
    # One clock reading per batch: the batch takes microseconds.
    now = trio.current_time() if limiter is not None else 0.0
    for _ in range(BATCH):
        try:
            request, sender = sock.recvfrom(RECEIVE_SIZE)
        except BlockingIOError:
            return True, None
        except ConnectionError as exc:
            logger.debug("receive error ignored: %s", exc)
            continue
        counts.datagrams += 1
        if limiter is not None and not _allowed(limiter, sender[0], now, counts):
            continue
        reply = reply_for(request, ascii_only=ascii_only, limit=limit)
        try:
            sock.sendto(reply, sender)
        except BlockingIOError:
            return False, (reply, sender)
        except OSError as exc:
            logger.debug("reply to %s not sent: %s", sender, exc)
    return False, None


def _allowed(limiter: ReplyRateLimiter, source: str, now: float, counts: UdpCounts) -> bool:
    verdict = limiter.check(source_network(source), now)
    if verdict is Verdict.ALLOW:
        return True
    counts.rate_limited += 1
    if verdict is Verdict.FIRST_REFUSAL:
        logger.warning(
            "%s sends more than %g requests per second: not answering all of them "
            "(see --udp-rate-limit)",
            network_label(source),
            limiter.rate,
        )
    return False


async def _send_when_room(
    sock: socket.socket, reply: bytes, address: Any, counts: UdpCounts
) -> None:
    with trio.move_on_after(SEND_PATIENCE):
        while True:
            await trio.lowlevel.wait_writable(sock)
            try:
                sock.sendto(reply, address)
            except BlockingIOError:
                # "Writable" yet still full: a Unix datagram socket reports
                # its own buffer, not the receiver's queue. Retry, not spin.
                await trio.sleep(_RETRY_INTERVAL)
                continue
            except OSError as exc:
                logger.debug("reply to %s not sent: %s", address, exc)
            return
    counts.dropped += 1
    logger.warning("reply to %s dropped: no room to send it for %g s", address, SEND_PATIENCE)
