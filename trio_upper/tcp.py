"""The TCP side of the server: one handler per connection.

:func:`handle_stream` is written against :class:`trio.abc.Stream`, not against
sockets, so the very handler that production runs under
:func:`trio.serve_listeners` also runs in the tests over
:func:`trio.testing.memory_stream_pair` and
:func:`trio.testing.lockstep_stream_pair`.
"""

from __future__ import annotations

import logging
import math
import ssl
from dataclasses import dataclass

import trio

from .errors import host_port
from .layers import peer_address, socket_of
from .tls import describe_tls_error
from .transform import Uppercaser

__all__ = ["TcpCounts", "describe_peer", "handle_stream"]

logger = logging.getLogger("trio_upper.tcp")

# How much to ask the transport for per read. Replies are sent as soon as each
# read returns, so this bounds the bytes one connection holds at a time (at
# most this, times MAX_GROWTH after the transform) without delaying anything:
# the lecture's client sends no newline and reads once, and gets its answer.
RECEIVE_SIZE = 65536

# How much later than --idle-timeout an idle connection may be closed. Moving
# a cancel scope's deadline costs about as much as answering a small request,
# so the deadline is set this much further out and only moved when it gets
# closer than the timeout: at most once per eighth of the timeout.
_IDLE_SLACK = 0.125


@dataclass
class TcpCounts:
    """What the TCP side did, counted as it happens: for the server's
    closing summary and its metrics."""

    connections: int = 0  # accepted
    active: int = 0  # open now
    bytes_received: int = 0
    bytes_sent: int = 0
    # How connections ended, other than by the client closing in good order.
    idle_closed: int = 0  # silent for --idle-timeout
    lost: int = 0  # reset, broken pipe, or another error of the connection
    tls_failed: int = 0  # the TLS handshake failed
    cut_off: int = 0  # still open at the end of the grace period
    internal_errors: int = 0  # a bug in trio-upper (logged as an error)


def describe_peer(stream: trio.abc.Stream) -> str:
    """A short name for the other end of ``stream``, for log lines."""
    address = peer_address(stream)
    if address is not None:
        return host_port(*address)
    if socket_of(stream) is not None:
        return "<disconnected peer>"
    return f"<{type(stream).__name__}>"


async def handle_stream(
    stream: trio.abc.Stream,
    *,
    ascii_only: bool = False,
    idle_timeout: float = math.inf,
    counts: TcpCounts | None = None,
) -> int:
    """Uppercase everything that arrives on ``stream`` and send it back.

    Each chunk's uppercase is sent as soon as the chunk arrives: there is no
    waiting for a newline. When the peer closes its sending side (half-close or
    full close), whatever the transform still holds is flushed and then this
    side is closed too.

    Args:
      stream: The connection. Any :class:`trio.abc.Stream` works.
      ascii_only: Use the ``--ascii`` transform (see :mod:`trio_upper.transform`).
      idle_timeout: Close the connection once the peer has sent nothing for
          this many seconds (up to an eighth more: see ``_IDLE_SLACK``). A
          reply the peer does not read counts as silence too, so a client
          that never reads cannot hold the connection for ever either.
      counts: Where to count bytes as they come and go, and how the
          connection ended (``idle_closed``, ``lost``, ``tls_failed``);
          the caller counts the rest.

    Returns:
      The number of bytes received.

    Resource handling:
      ``stream`` is always closed before this returns or raises.

    Error handling:
      A connection that breaks (reset by peer, broken pipe) or goes idle ends
      here, logged at debug level, and the function returns normally: one
      client's failure never reaches the caller's nursery and so never stops
      the server. Cancellation from outside propagates as usual.
    """
    if counts is None:
        counts = TcpCounts()
    # getpeername is a system call: skip it unless the log lines are shown.
    debug = logger.isEnabledFor(logging.DEBUG)
    peer = describe_peer(stream) if debug else ""
    upper = Uppercaser(ascii_only=ascii_only)
    received = 0
    # One scope for the whole connection, its deadline pushed back as data
    # arrives; pushing it back only once it is less than idle_timeout away
    # keeps that to once per eighth of the timeout, not once per chunk.
    renew = idle_timeout * (1 + _IDLE_SLACK)
    with trio.CancelScope(deadline=trio.current_time() + renew) as idle:
        try:
            async with stream:
                if isinstance(stream, trio.SSLStream):
                    # Now rather than inside the first receive, so that a
                    # failed handshake is told from a connection lost after
                    # a good one (a client that closes before sending, say).
                    try:
                        await stream.do_handshake()
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        counts.tls_failed += 1
                        cause = exc.__cause__ or exc
                        reason = (
                            describe_tls_error(cause)
                            if isinstance(cause, ssl.SSLError)
                            else str(cause)
                        )
                        logger.debug("%s: TLS handshake failed: %s", peer, reason)
                        return received
                data = await stream.receive_some(RECEIVE_SIZE)
                if debug:
                    # Only now: the first read took any PROXY protocol
                    # header, which names the real client.
                    peer = describe_peer(stream)
                    logger.debug("%s: connected", peer)
                while data:
                    size = len(data)
                    received += size
                    counts.bytes_received += size
                    now = trio.current_time()
                    if idle.deadline - now < idle_timeout:
                        idle.deadline = now + renew
                    if reply := upper.feed(bytes(data)):
                        await stream.send_all(reply)
                        counts.bytes_sent += len(reply)
                    data = await stream.receive_some(RECEIVE_SIZE)
                if tail := upper.flush():
                    await stream.send_all(tail)
                    counts.bytes_sent += len(tail)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            counts.lost += 1
            cause = exc.__cause__ or exc
            logger.debug("%s: connection lost after %d bytes: %s", peer, received, cause)
            return received
    if idle.cancelled_caught:
        counts.idle_closed += 1
        logger.debug("%s: closed after %g s idle, %d bytes", peer, idle_timeout, received)
    else:
        logger.debug("%s: closed after %d bytes", peer, received)
    return received
