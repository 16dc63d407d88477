"""The server: TCP and UDP on one port, under one nursery.

The task tree, from the top::

    UpperServer.serve
    └── handler scope (deadline set at shutdown: the grace period)
        └── handlers nursery: one _handle task per TCP connection
            └── accepting scope (cancelled at shutdown: stop accepting at once)
                └── accepting nursery
                    ├── trio.serve_listeners(_handle, listeners,
                    │                        handler_nursery=handlers nursery)
                    ├── metrics.serve_metrics (with --metrics)
                    └── serve_udp, one per bound UDP socket

Each listener serve_listeners accepts from is a chain of trio-style
wrappers, outermost first: _DrainOnClose (takes in the accept queue before
closing), trio.SSLListener (--certfile), ProxyListener (--proxy-protocol),
CapacityListener (--max-connections; EMFILE and its kin), and at the bottom
the FastSocketListener that holds the socket.

Shutdown is nothing but cancellation: :meth:`UpperServer.shutdown` cancels the
accepting scope, which closes the listeners and UDP sockets, and gives the
handler scope a deadline. Open connections finish on their own before it or
are cancelled at it; then :meth:`UpperServer.serve` returns.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import trio

from . import metrics
from .capacity import CapacityListener, ConnectionSlots
from .errors import UserError, host_port
from .fastsocket import FastSocketListener
from .layers import socket_of, socket_owner
from .proxy import AllowList, ProxyListener
from .ratelimit import DEFAULT_RATE, ReplyRateLimiter
from .systemd import ListenFd
from .tcp import TcpCounts, handle_stream
from .udp import DatagramSocket, UdpCounts, UdpSocket, serve_udp

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_PORT",
    "Bound",
    "Endpoint",
    "ServerConfig",
    "ServerStats",
    "UpperServer",
    "adopt",
    "adopt_and_bind_metrics",
    "bind",
    "listener_endpoint",
    "listener_socket",
]

logger = logging.getLogger("trio_upper.server")

# The lecture's port.
DEFAULT_PORT = 12000

# Long enough for a request in flight to be answered, short enough that a
# stopped service is gone before an impatient person presses Ctrl-C again.
DEFAULT_GRACE = 5.0

# Connections handled at once. Past it, new connections wait, unaccepted,
# in the kernel's listen queue until one ends (but for one per extra
# listener: see capacity.py): back-pressure on clients, and a bound on the
# server's memory and file descriptors.
DEFAULT_MAX_CONNECTIONS = 10_000

# Seconds a connection may send nothing before the server closes it (the
# slow-loris defence). Long enough for a person at the interactive client to
# stop and think; 0 turns it off.
DEFAULT_IDLE_TIMEOUT = 300.0

# The listen queue asked for, as trio asks: the kernel caps it at
# net.core.somaxconn (4096 on current Linux).
_BACKLOG = 0xFFFF

# The longest the listeners may take to take in what waits in their queues
# when the server stops: each accept is immediate, so only something odd (a
# run of EMFILE) makes it take long at all.
_DRAIN_LIMIT = 1.0

# With --port 0 the OS picks a free TCP port, and UDP (and the other address
# family) must then bind that same number. Something else may hold it on UDP,
# or grab it in between: try a few fresh ports before giving up.
_PORT_ZERO_ATTEMPTS = 10

_TcpListener = trio.abc.Listener[trio.abc.Stream]


@dataclass(frozen=True)
class ServerConfig:
    """Everything a user can set on the server (see ``serve --help``).

    ``host=None`` means every interface, IPv4 and IPv6 where available.
    """

    host: str | None = None
    port: int = DEFAULT_PORT
    tcp: bool = True
    udp: bool = True
    ascii_only: bool = False
    grace: float = DEFAULT_GRACE
    # UDP replies per second per source network (see ratelimit.source_network);
    # 0 turns the limit off.
    udp_rate_limit: float = DEFAULT_RATE
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # 0 means never.
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    # TLS on every TCP connection (see tls.server_context); None: plain TCP.
    tls: ssl.SSLContext | None = None
    # Where to serve Prometheus metrics over HTTP, as (host, port); None: not.
    metrics: tuple[str | None, int] | None = None
    # Who must send PROXY protocol headers (--proxy-protocol); None: no one.
    proxy_allow: AllowList | None = None
    # SO_REUSEPORT on every socket, so that other servers may share the port.
    reuse_port: bool = False


@dataclass
class ServerStats(TcpCounts):
    """What a server did, for its closing summary and its metrics: the TCP
    side's counts, and the UDP side's in ``udp``."""

    udp: UdpCounts = field(default_factory=UdpCounts)


class Endpoint(NamedTuple):
    """One address the server serves; ``str()`` gives ``tcp [::]:12000``."""

    protocol: str  # "tcp", "tcp+tls", "udp", or "metrics" (HTTP)
    host: str
    port: int

    def __str__(self) -> str:
        if self.protocol == "metrics":
            return f"http://{host_port(self.host, self.port)}{metrics.PATH}"
        return f"{self.protocol} {host_port(self.host, self.port)}"


@dataclass
class Bound:
    """Every socket a server serves on, bound (or inherited) and not yet
    served; whoever holds it owns them until :meth:`UpperServer.serve`."""

    tcp: list[_TcpListener] = field(default_factory=list)
    udp: list[UdpSocket] = field(default_factory=list)
    metrics: list[_TcpListener] = field(default_factory=list)

    async def aclose(self) -> None:
        for listener in [*self.tcp, *self.metrics]:
            await trio.aclose_forcefully(listener)
        for sock in self.udp:
            sock.close()


def _endpoint(protocol: str, sockaddr: tuple[Any, ...]) -> Endpoint:
    return Endpoint(protocol, sockaddr[0], sockaddr[1])


def listener_socket(listener: _TcpListener) -> socket.socket:
    """The standard-library socket of a listener that :func:`bind` made, to
    hand to another process."""
    sock = socket_of(listener)
    assert isinstance(sock, socket.socket), listener
    return sock


def listener_endpoint(listener: _TcpListener, protocol: str = "tcp") -> Endpoint:
    sock = socket_of(listener)
    if sock is None:
        # A listener with no socket (the tests' in-memory one).
        return Endpoint(protocol, f"<{type(listener).__name__}>", 0)
    return _endpoint(protocol, sock.getsockname())


def _where(host: str | None, port: int) -> str:
    return f"{host or 'all interfaces'} port {port}"


async def _bind_sockets(
    host: str | None, port: int, kind: socket.SocketKind, *, reuse_port: bool
) -> list[socket.socket]:
    """Bind a socket of ``kind`` on every address ``host`` resolves to, as
    :func:`trio.open_tcp_listeners` does for TCP (same families, same rules);
    TCP sockets listen too.

    This is what binds UDP, and TCP when ``reuse_port`` asks for
    ``SO_REUSEPORT``, which trio's function cannot set before it binds.
    """
    addresses = await trio.socket.getaddrinfo(host, port, type=kind, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, type_, proto, _, sockaddr in addresses:
            try:
                sock = socket.socket(family, type_, proto)
            except OSError as exc:
                # As in trio: a family the system lacks is fine as long as
                # some other family works.
                if exc.errno == errno.EAFNOSUPPORT:
                    continue
                raise
            sockets.append(sock)
            if kind == socket.SOCK_STREAM:
                # As trio does: restart at once despite connections in
                # TIME_WAIT. Not for UDP: on Linux it would let a second
                # server bind the same port silently and take half the
                # datagrams; that is what --reuse-port says out loud.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            if kind == socket.SOCK_STREAM:
                sock.listen(_BACKLOG)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError(errno.EAFNOSUPPORT, "no usable address family")
    return sockets


async def _take_over(bound: list[trio.SocketListener]) -> list[_TcpListener]:
    """The listeners trio bound, as FastSocketListeners, whose streams cost
    less per call; if one cannot be taken over, every one is closed."""
    taken: list[_TcpListener] = []
    try:
        for listener in bound:
            taken.append(FastSocketListener.from_trio(listener))
    except BaseException:
        for closing in [*taken, *bound[len(taken) :]]:
            await trio.aclose_forcefully(closing)
        raise
    return taken


async def _bind_at(config: ServerConfig, port: int) -> Bound:
    bound = Bound()
    try:
        if config.tcp and not config.reuse_port:
            # trio resolves, binds and listens.
            bound.tcp = await _take_over(await trio.open_tcp_listeners(port, host=config.host))
        elif config.tcp:
            tcp = await _bind_sockets(config.host, port, socket.SOCK_STREAM, reuse_port=True)
            bound.tcp = [FastSocketListener(sock) for sock in tcp]
        if config.udp:
            udp = await _bind_sockets(
                config.host, port, socket.SOCK_DGRAM, reuse_port=config.reuse_port
            )
            bound.udp = [UdpSocket(sock) for sock in udp]
    except BaseException:
        await bound.aclose()
        raise
    return bound


async def _bind_metrics(config: ServerConfig, bound: Bound) -> None:
    """Add the metrics listeners to ``bound``, unless it has them (from
    systemd) or there are none to bind; on failure, close all of ``bound``."""
    if config.metrics is None or bound.metrics:
        return
    host, port = config.metrics
    try:
        with _bind_errors("serve metrics", host, port):
            bound.metrics = await _take_over(await trio.open_tcp_listeners(port, host=host))
    except BaseException:
        await bound.aclose()
        raise


@contextlib.contextmanager
def _bind_errors(what: str, host: str | None, port: int) -> Iterator[None]:
    """A failure to bind as the one line a user can act on."""
    try:
        yield
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError.unresolvable(host, exc) from exc
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UserError(f"cannot {what} on {_where(host, port)}: {reason}") from exc


def adopt(inherited: Sequence[ListenFd], config: ServerConfig) -> Bound:
    """Serve on sockets that someone else bound: systemd's socket activation
    (:func:`trio_upper.systemd.listen_fds`), or a parent process.

    Args:
      inherited: Listening TCP sockets and bound UDP sockets, IPv4 or IPv6,
          in any number and order; owned from now on (closed here on error).
          A TCP socket named ``metrics`` (``FileDescriptorName=metrics``)
          serves the metrics.
      config: Uses ``tcp`` and ``udp``: a socket of a protocol that is not
          to be served is an error, not something to ignore; and
          ``metrics``, which must not be set if a metrics socket is passed.

    Returns:
      The sockets to serve on.

    Raises:
      UserError: a socket of another kind (a Unix socket, a TCP socket that
          is not listening), one that ``config`` contradicts, none to serve
          uppercase on, or TLS asked for with no TCP socket to serve it on.
    """
    bound = Bound()
    try:
        for passed in inherited:
            sock = passed.socket
            kind = {socket.SOCK_STREAM: "tcp", socket.SOCK_DGRAM: "udp"}.get(sock.type)
            if sock.family not in (socket.AF_INET, socket.AF_INET6) or kind is None:
                raise UserError(
                    f"an inherited socket (fd {sock.fileno()}, {sock.family.name} "
                    f"{sock.type.name}) is neither TCP nor UDP over IP"
                )
            where = _endpoint(kind, sock.getsockname())
            for_metrics = kind == "tcp" and passed.name == "metrics"
            if for_metrics and config.metrics is not None:
                raise UserError(
                    f"--metrics cannot be used: an inherited socket named 'metrics' ({where}) "
                    "serves the metrics"
                )
            if not for_metrics and not (config.tcp if kind == "tcp" else config.udp):
                only = "--udp-only" if kind == "tcp" else "--tcp-only"
                raise UserError(f"an inherited socket is {where}, which {only} excludes")
            if kind == "udp":
                bound.udp.append(UdpSocket(sock))
                continue
            try:
                listener = FastSocketListener(sock)
            except ValueError:
                raise UserError(f"an inherited socket ({where}) is not listening") from None
            (bound.metrics if for_metrics else bound.tcp).append(listener)
        if not bound.tcp and not bound.udp:
            raise UserError(
                "no inherited socket to serve uppercase on (a socket named 'metrics' "
                "serves only the metrics)"
            )
        if config.tls is not None and not bound.tcp:
            raise UserError("--certfile is for TCP, and every inherited socket is UDP")
    except BaseException:
        for passed in inherited:
            passed.socket.close()
        raise
    return bound


async def adopt_and_bind_metrics(inherited: Sequence[ListenFd], config: ServerConfig) -> Bound:
    """:func:`adopt`, and the metrics listeners if ``config`` asks for them
    and none was inherited."""
    bound = adopt(inherited, config)
    await _bind_metrics(config, bound)
    return bound


async def _free_port(host: str | None) -> int:
    probe = await trio.open_tcp_listeners(0, host=host)
    port: int = probe[0].socket.getsockname()[1]
    for listener in probe:
        await trio.aclose_forcefully(listener)
    return port


async def bind(config: ServerConfig) -> Bound:
    """Bind everything ``config`` asks for, all on one port number.

    This is the first half of :func:`trio.serve_tcp` (its
    :func:`trio.open_tcp_listeners`) plus the UDP sockets, done as one step so
    that the server is either listening on everything or on nothing.

    Args:
      config: Uses ``host``, ``port``, ``tcp`` and ``udp``. With port 0 the
          OS picks a port free for every protocol and family bound. And
          ``metrics``: its listeners are bound in the same step.

    Returns:
      The sockets; the caller owns them.

    Raises:
      UserError: the host does not resolve, or a bind failed (port in use,
          permission denied, address not available); nothing stays bound.
    """
    bound = await _bind_uppercase(config)
    await _bind_metrics(config, bound)
    return bound


async def _bind_uppercase(config: ServerConfig) -> Bound:
    with _bind_errors("serve", config.host, config.port):
        if config.port != 0:
            return await _bind_at(config, config.port)
        for _ in range(_PORT_ZERO_ATTEMPTS):
            try:
                return await _bind_at(config, await _free_port(config.host))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        raise OSError(errno.EADDRINUSE, "no port was free on both TCP and UDP")


class _DrainOnClose(trio.abc.Listener[trio.abc.Stream]):
    """The top of each listener chain that serve_listeners accepts from.

    When closed, before it closes what it wraps, it accepts the connections
    already waiting in the kernel's queue (while a slot is free) and starts
    their handlers: a listening socket closed with connections in its queue
    resets them, and a client that had already connected would see its
    request fail. So a server that stops answers everyone who reached it in
    time; behind a load balancer, a rolling restart fails no request. The
    listener that holds the socket must be able to say "nothing more is
    waiting": with ``draining`` set, its ``accept`` raises
    :exc:`trio.WouldBlock` rather than wait, as
    :class:`~trio_upper.fastsocket.FastSocketListener` does. With any other,
    closing is immediate, as before.
    """

    def __init__(
        self,
        transport_listener: _TcpListener,
        slots: ConnectionSlots,
        start_handler: Callable[[trio.abc.Stream], object],
    ) -> None:
        self.transport_listener = transport_listener
        self._slots = slots
        self._start_handler = start_handler

    async def accept(self) -> trio.abc.Stream:
        return await self.transport_listener.accept()

    async def aclose(self) -> None:
        # Closing happens as accepting is cancelled; the drain must run all
        # the same, and is bounded on its own.
        with trio.CancelScope(shield=True):
            with trio.move_on_after(_DRAIN_LIMIT):
                await self._drain()
            await self.transport_listener.aclose()

    async def _drain(self) -> None:
        bottom = socket_owner(self)
        if not hasattr(bottom, "draining"):
            return
        bottom.draining = True
        drained = 0
        while not self._slots.all_taken:
            try:
                stream = await self.transport_listener.accept()
            except (trio.WouldBlock, trio.ClosedResourceError, OSError):
                break
            self._start_handler(stream)
            drained += 1
        if drained:
            logger.debug("stopping: took %d connections waiting in the queue", drained)


class UpperServer:
    """The uppercase service: TCP and UDP, run under one nursery.

    Use it once: ``await nursery.start(server.run)`` binds, returns the list of
    :class:`Endpoint` served once every socket is ready, and serves until
    :meth:`shutdown`; ``run`` then returns :attr:`stats`.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.stats = ServerStats()
        self._accepting = trio.CancelScope()
        self._handlers = trio.CancelScope()
        self._not_accepting = trio.Event()
        # One limiter for every UDP socket: a source is one source whichever
        # of our addresses it writes to.
        self._limiter = (
            ReplyRateLimiter(config.udp_rate_limit) if config.udp_rate_limit > 0 else None
        )

    async def run(
        self,
        *,
        inherited: Sequence[ListenFd] | None = None,
        task_status: trio.TaskStatus[list[Endpoint]] = trio.TASK_STATUS_IGNORED,
    ) -> ServerStats:
        """Bind as :func:`bind` does (or take ``inherited`` sockets, as
        :func:`adopt` does), then :meth:`serve`.

        Returns:
          The server's counts, once it has shut down.

        Raises:
          UserError: binding failed (see :func:`bind`), or an inherited
              socket cannot be served (see :func:`adopt`).
        """
        if inherited is None:
            bound = await bind(self.config)
        else:
            bound = await adopt_and_bind_metrics(inherited, self.config)
        return await self.serve(
            bound.tcp, bound.udp, metrics_listeners=bound.metrics, task_status=task_status
        )

    async def serve(
        self,
        listeners: Sequence[_TcpListener],
        udp_sockets: Sequence[DatagramSocket],
        *,
        metrics_listeners: Sequence[_TcpListener] = (),
        task_status: trio.TaskStatus[list[Endpoint]] = trio.TASK_STATUS_IGNORED,
    ) -> ServerStats:
        """Serve on already-bound listeners and UDP sockets until shut down.

        This is the second half of :func:`trio.serve_tcp`:
        :func:`trio.serve_listeners`, with :meth:`_handle` for each
        connection, a handler nursery of our own so that connections outlive
        accepting by the grace period, and each listener wrapped in a
        :class:`~trio_upper.capacity.CapacityListener` for
        ``--max-connections``. Beside it, one
        :func:`~trio_upper.udp.serve_udp` loop per UDP socket. Any
        :class:`trio.abc.Listener` works, which is how the tests drive it over
        in-memory streams.

        With ``config.tls``, each TCP listener is also wrapped in a
        :class:`trio.SSLListener`, so the same handler runs over TLS.

        Args:
          listeners: TCP listeners. Closed when accepting stops.
          udp_sockets: Bound UDP sockets. Closed when accepting stops.
          metrics_listeners: Where to serve the metrics over HTTP. Closed
              when accepting stops.
          task_status: Started with the list of :class:`Endpoint` served.

        Returns:
          The server's counts.
        """
        with self._handlers:
            async with trio.open_nursery() as handlers:
                try:
                    await self._accept(
                        listeners, udp_sockets, metrics_listeners, handlers, task_status
                    )
                finally:
                    # In a finally: a zero grace cancels the handler scope at
                    # the same moment, and its Cancelled passes through here.
                    self._not_accepting.set()
                logger.debug("stopped accepting; %d connections open", self.stats.active)
        return self.stats

    async def _accept(
        self,
        listeners: Sequence[_TcpListener],
        udp_sockets: Sequence[DatagramSocket],
        metrics_listeners: Sequence[_TcpListener],
        handlers: trio.Nursery,
        task_status: trio.TaskStatus[list[Endpoint]],
    ) -> None:
        """Accept connections (their handlers go to ``handlers``) and answer
        datagrams until :meth:`shutdown` cancels this; then close every
        listener and UDP socket."""
        tls = self.config.tls
        tcp = "tcp" if tls is None else "tcp+tls"
        served = [listener_endpoint(listener, tcp) for listener in listeners]
        served += [_endpoint("udp", sock.getsockname()) for sock in udp_sockets]
        served += [listener_endpoint(listener, "metrics") for listener in metrics_listeners]
        slots = ConnectionSlots(self.config.max_connections)
        capped: list[_TcpListener] = [CapacityListener(listener, slots) for listener in listeners]
        if self.config.proxy_allow is not None:
            # Beneath TLS: a balancer sends the header before the handshake.
            capped = [ProxyListener(c, self.config.proxy_allow) for c in capped]
        if tls is not None:
            # Beneath TLS, so that a handshake holds a slot too; the
            # handshake itself runs in the handler, bounded by its idle
            # timeout, and holds up no one else.
            capped = [trio.SSLListener(c, tls, https_compatible=False) for c in capped]

        def start_handler(stream: trio.abc.Stream) -> None:
            handlers.start_soon(self._handle, stream)

        tops = [_DrainOnClose(c, slots, start_handler) for c in capped]
        with self._accepting, contextlib.ExitStack() as udp_closer:
            for sock in udp_sockets:
                udp_closer.callback(sock.close)
            async with trio.open_nursery() as accepting:
                if tops:
                    # serve_listeners closes the listeners when cancelled.
                    await accepting.start(
                        partial(trio.serve_listeners, self._handle, tops, handler_nursery=handlers)
                    )
                if metrics_listeners:
                    await accepting.start(metrics.serve_metrics, metrics_listeners, self.stats)
                for sock in udp_sockets:
                    accepting.start_soon(
                        partial(
                            serve_udp,
                            sock,
                            ascii_only=self.config.ascii_only,
                            limiter=self._limiter,
                            counts=self.stats.udp,
                            proxy_allow=self.config.proxy_allow,
                        )
                    )
                logger.debug("serving on %s", ", ".join(map(str, served)))
                task_status.started(served)

    def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting now; cancel connections still open ``grace`` seconds
        from now (default: the configured grace period).

        Calling it again with a shorter grace shortens the wait, so a second
        Ctrl-C can mean "stop now" (``grace=0``). Must be called from trio.
        """
        if grace is None:
            grace = self.config.grace
        self._accepting.cancel()
        deadline = trio.current_time() + grace
        self._handlers.deadline = min(self._handlers.deadline, deadline)

    async def stopped_accepting(self) -> None:
        """Wait until, after :meth:`shutdown`, the listeners and UDP sockets
        are closed: from then on new connections are refused."""
        await self._not_accepting.wait()

    @property
    def stopping(self) -> bool:
        """True once :meth:`shutdown` has been called."""
        return self._accepting.cancel_called

    async def _handle(self, stream: trio.abc.Stream) -> None:
        """The per-connection handler that serve_listeners runs: it contains
        everything that can go wrong with one connection, because an
        exception escaping it would crash the whole server. serve_listeners
        closes ``stream`` (and so frees its slot) when this returns."""
        self.stats.connections += 1
        self.stats.active += 1
        try:
            await handle_stream(
                stream,
                ascii_only=self.config.ascii_only,
                idle_timeout=self.config.idle_timeout or math.inf,
                counts=self.stats,
            )
        except trio.Cancelled:
            self.stats.cut_off += 1
            raise
        except Exception as exc:
            # handle_stream contains the failures a peer can cause; reaching
            # this means a bug in trio-upper. Log it and keep serving others.
            self.stats.internal_errors += 1
            logger.error(
                "connection dropped by an internal error: %r",
                exc,
                exc_info=logger.isEnabledFor(logging.DEBUG),
            )
        finally:
            self.stats.active -= 1
