"""The UDP side of the server: a receive loop on one trio UDP socket.

Each datagram is a complete message: its uppercase goes back to its sender as
one datagram. There is no connection and no state between datagrams.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NoReturn, Protocol

import trio

from .errors import Episode, host_port
from .proxy import AllowList, strip_datagram
from .ratelimit import ReplyRateLimiter, Verdict, network_label, source_network
from .transform import upper_ascii, upper_bytes

__all__ = [
    "BATCH",
    "RECEIVE_SIZE",
    "DatagramSocket",
    "UdpCounts",
    "UdpSocket",
    "max_payload",
    "reply_for",
    "serve_udp",
]

logger = logging.getLogger("trio_upper.udp")

# The largest UDP payload each family can carry: 65,535 (the IP length field)
# minus the headers: 20 (IPv4) + 8 (UDP); IPv6 counts its 40-byte header
# outside the length field, so only the UDP header comes off. The lecture
# truncates at 2,048; we never truncate.
MAX_PAYLOAD_IPV4 = 65_507
MAX_PAYLOAD_IPV6 = 65_527

# One byte more than any datagram can hold, so a read never truncates.
RECEIVE_SIZE = 65_536

# Datagrams answered per pass through trio's scheduler. A pass costs more
# than answering a datagram, so answering the backlog that one wait uncovers
# is what makes a busy UDP server cheap; the cap keeps TCP connections from
# waiting behind a flood of datagrams.
BATCH = 64

# How long a reply may wait for room in the kernel's send buffer. The buffer
# drains at network speed, so a full one that stays full this long means the
# path is jammed; receiving pauses while a reply waits, so the wait is short.
SEND_PATIENCE = 1.0

# After a receive error that is not the peer's doing (ENOBUFS, ENOMEM, ...),
# how long to wait before receiving again: the kernel needs a moment to
# recover, and retrying at once would spin. trio.serve_listeners waits as
# long after accept() runs out of resources.
RECEIVE_RETRY = 0.1

# The errors that mean the socket itself is gone (closed under us). Only
# these end the loop; every other error is ridden out.
_SOCKET_GONE_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})

# Errors that one datagram's sender causes: an ICMP error for an earlier
# reply, which some systems report on a later receive or send (Linux on a
# connected socket, Windows on any), or an address no reply can go to. They
# concern that one sender; the loop drops the datagram and goes on, at debug
# level. ConnectionError (refused, reset) is one of them too.
_PEER_ERRNOS = frozenset(
    {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}
    | {errno.EACCES, errno.EPERM, errno.EINVAL, errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL}
    | {errno.EMSGSIZE}
)


def max_payload(family: int) -> int:
    """The largest datagram payload for an address family."""
    return MAX_PAYLOAD_IPV6 if family == socket.AF_INET6 else MAX_PAYLOAD_IPV4


def _mapped_ipv4(address: str) -> bool:
    """Whether ``address`` is an IPv4 one as an IPv6 socket gives it
    (``::ffff:192.0.2.1``)."""
    return address.startswith("::ffff:") and "." in address


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
    dropped: int = 0  # replies not sent: no room within SEND_PATIENCE, or a send error
    # From an address allowed to send PROXY protocol headers, a datagram that
    # starts like one but is not: dropped unanswered (--proxy-protocol).
    bad_proxy_header: int = 0


class DatagramSocket(Protocol):
    """What :func:`serve_udp` needs of its socket; :class:`UdpSocket` is the
    real one, and the tests pass fakes that fail on purpose.

    The two ``async`` methods are the waits. The ``_nowait`` ones either do
    their work at once or raise :exc:`BlockingIOError`, and are never a
    checkpoint.
    """

    @property
    def family(self) -> int: ...
    def getsockname(self) -> Any: ...
    async def recvfrom(self) -> tuple[bytes, Any]: ...
    def recvfrom_nowait(self) -> tuple[bytes, Any]: ...
    async def sendto(self, data: bytes, address: Any) -> object: ...
    def sendto_nowait(self, data: bytes, address: Any, /) -> object: ...
    def close(self) -> None: ...


class UdpSocket:
    """A bound UDP socket as :func:`serve_udp` uses it: a trio socket, with a
    way to drain a backlog.

    Every wait is the trio socket's own (``await recvfrom``, ``await
    sendto``), so wake-ups and cancellation are trio's. A wait costs a pass
    through trio's scheduler, which is about what answering a datagram
    costs; so once a wait has returned, the datagrams queued behind it are
    taken with plain non-blocking calls on the standard-library socket that
    the trio socket wraps (the same socket: ``from_stdlib_socket`` wraps, it
    does not copy). Those never wait: when nothing is left they raise
    :exc:`BlockingIOError` and the loop goes back to waiting on the trio
    socket.

    Args:
      sock: A bound UDP socket; owned from now on (closed by :meth:`close`).

    Attributes:
      trio_socket: The trio socket.
    """

    __slots__ = ("_sock", "recvfrom_nowait", "sendto_nowait", "trio_socket")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.trio_socket = trio.socket.from_stdlib_socket(sock)  # makes it non-blocking
        # The calls that drain a backlog are the socket's own, bound here:
        # no frame of ours per datagram.
        self.recvfrom_nowait: Callable[[], tuple[bytes, Any]] = partial(
            sock.recvfrom, RECEIVE_SIZE
        )
        self.sendto_nowait: Callable[[bytes, Any], object] = sock.sendto

    @property
    def family(self) -> int:
        return self._sock.family

    @property
    def socket(self) -> socket.socket:
        """The standard-library socket, to hand to another process."""
        return self._sock

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    async def recvfrom(self) -> tuple[bytes, Any]:
        return await self.trio_socket.recvfrom(RECEIVE_SIZE)

    async def sendto(self, data: bytes, address: Any) -> object:
        return await self.trio_socket.sendto(data, address)

    def close(self) -> None:
        self.trio_socket.close()


async def serve_udp(
    sock: DatagramSocket,
    *,
    ascii_only: bool = False,
    limiter: ReplyRateLimiter | None = None,
    counts: UdpCounts | None = None,
    proxy_allow: AllowList | None = None,
) -> NoReturn:
    """Answer every datagram that arrives on ``sock`` until cancelled.

    Each turn waits on the trio socket for one datagram, answers it, and
    then answers up to :data:`BATCH` - 1 more that are already queued,
    without waiting (see :class:`UdpSocket`): one pass through the
    scheduler per batch, not per datagram.

    Args:
      sock: A bound UDP socket, normally a :class:`UdpSocket`. Its family
          sets the reply size limit.
      ascii_only: Use the ``--ascii`` transform.
      limiter: If given, a request is answered only if the limiter allows a
          reply to its source's network (see
          :func:`~trio_upper.ratelimit.source_network`); refusals are counted,
          and the first of each run of refusals to one network is logged.
      counts: Incremented as datagrams come and go, for the server's summary.
      proxy_allow: Senders whose datagrams may begin with a PROXY protocol
          header (a load balancer, such as nginx with ``proxy_protocol on``):
          the header is taken off, the rest is answered (to the sender, which
          relays the reply), and the rate limit counts the client the header
          names. A datagram from them that starts like a header but is not
          one is dropped and counted.

    Resource handling:
      ``sock`` is left open: whoever bound it closes it.

    Error handling:
      Only an error that means the socket itself is gone (``EBADF``,
      ``ENOTSOCK``, or :exc:`trio.ClosedResourceError`) ends the loop.

      An error that one sender causes (an ICMP error reported for an earlier
      reply, an address no reply can go to) costs that one datagram or
      reply, logged at debug level.

      Any other error (``ENOBUFS``, ``ENOMEM``, ...) is transient: a failed
      receive is retried after :data:`RECEIVE_RETRY` seconds, a failed reply
      is dropped and counted, and each run of them is logged once, as a
      warning, with another line when it ends.

      A reply that finds the kernel's send buffer full waits for room up to
      :data:`SEND_PATIENCE` seconds (receiving pauses meanwhile, which is
      back-pressure); then it is dropped and counted.
    """
    await _UdpLoop(sock, ascii_only, limiter, counts or UdpCounts(), proxy_allow).run()


class _UdpLoop:
    """The state of one :func:`serve_udp` run."""

    def __init__(
        self,
        sock: DatagramSocket,
        ascii_only: bool,
        limiter: ReplyRateLimiter | None,
        counts: UdpCounts,
        proxy_allow: AllowList | None,
    ) -> None:
        self.sock = sock
        self.proxy_allow = proxy_allow
        self.ascii_only = ascii_only
        self.limit = max_payload(sock.family)
        self.limiter = limiter
        self.counts = counts
        where = sock.getsockname()
        self.where = f"udp {host_port(where[0], where[1])}"
        self.receiving = Episode(logger, f"{self.where}: receiving again")
        self.sending = Episode(logger, f"{self.where}: sending replies again")

    async def run(self) -> NoReturn:
        while True:
            try:
                request, sender = await self.sock.recvfrom()
            except OSError as exc:
                self._receive_failed(exc)
                if not _caused_by_peer(exc):
                    await trio.sleep(RECEIVE_RETRY)
                continue
            self.receiving.ended()
            pending = self._answer(request, sender)
            if pending is None:
                pending = self._answer_backlog()
            if pending is not None:
                await self._send_when_room(*pending)

    def _answer_backlog(self) -> tuple[bytes, Any] | None:
        """Answer up to BATCH - 1 datagrams already queued, without waiting.

        Returns a reply that found the send buffer full, and its address,
        which the caller must wait to send; None otherwise.
        """
        for _ in range(BATCH - 1):
            try:
                request, sender = self.sock.recvfrom_nowait()
            except BlockingIOError:
                return None
            except OSError as exc:
                # Left to the next wait: if the error is still there it is
                # raised again, and handled (and waited out) there.
                if not _caused_by_peer(exc):
                    return None
                self._receive_failed(exc)
                continue
            pending = self._answer(request, sender)
            if pending is not None:
                return pending
        return None

    def _answer(self, request: bytes, sender: Any) -> tuple[bytes, Any] | None:
        """Answer one datagram if the rate limit allows it. Returns the reply
        and its address if the send buffer was full, else None."""
        counts = self.counts
        counts.datagrams += 1
        source = sender[0]
        if self.proxy_allow is not None and self.proxy_allow.allows(source):
            stripped = strip_datagram(request)
            if stripped is None:
                counts.bad_proxy_header += 1
                logger.debug("%s: datagram from %s with a bad PROXY header", self.where, sender)
                return None
            header, request = stripped
            if header is not None and header.source is not None:
                source = header.source[0]
        if self.limiter is not None and not self._allowed(source):
            return None
        reply = reply_for(request, ascii_only=self.ascii_only, limit=self.limit)
        if len(reply) > MAX_PAYLOAD_IPV4 and _mapped_ipv4(sender[0]):
            # An IPv4 client of an IPv6 socket that takes both families (as
            # a systemd socket unit's [::]:12000 does): IPv4 carries less.
            reply = reply_for(request, ascii_only=self.ascii_only, limit=MAX_PAYLOAD_IPV4)
        try:
            self.sock.sendto_nowait(reply, sender)
        except BlockingIOError:
            return reply, sender
        except OSError as exc:
            self._send_failed(exc, sender)
            return None
        self.sending.ended()
        return None

    def _allowed(self, source: str) -> bool:
        assert self.limiter is not None
        verdict = self.limiter.check(source_network(source), trio.current_time())
        if verdict is Verdict.ALLOW:
            return True
        self.counts.rate_limited += 1
        if verdict is Verdict.FIRST_REFUSAL:
            logger.warning(
                "%s sends more than %g requests per second: not answering all of them "
                "(see --udp-rate-limit)",
                network_label(source),
                self.limiter.rate,
            )
        return False

    async def _send_when_room(self, reply: bytes, address: Any) -> None:
        with trio.move_on_after(SEND_PATIENCE):
            try:
                await self.sock.sendto(reply, address)
            except OSError as exc:
                self._send_failed(exc, address)
            else:
                self.sending.ended()
            return
        self.counts.dropped += 1
        logger.warning("reply to %s dropped: no room to send it for %g s", address, SEND_PATIENCE)

    def _receive_failed(self, exc: OSError) -> None:
        """Log a receive error, or raise it if the socket is gone."""
        if exc.errno in _SOCKET_GONE_ERRNOS:
            raise exc
        if _caused_by_peer(exc):
            logger.debug("%s: receive error ignored: %s", self.where, exc)
        else:
            self.receiving.failing(
                f"{self.where}: cannot receive: {exc.strerror or exc}; "
                f"retrying every {RECEIVE_RETRY:g} s"
            )

    def _send_failed(self, exc: OSError, address: Any) -> None:
        """Count and log a reply that could not be sent, or raise if the
        socket is gone."""
        if exc.errno in _SOCKET_GONE_ERRNOS:
            raise exc
        self.counts.dropped += 1
        if _caused_by_peer(exc):
            logger.debug("%s: reply to %s not sent: %s", self.where, address, exc)
        else:
            self.sending.failing(
                f"{self.where}: cannot send replies: {exc.strerror or exc}; dropping them"
            )


def _caused_by_peer(exc: OSError) -> bool:
    return isinstance(exc, ConnectionError) or exc.errno in _PEER_ERRNOS
