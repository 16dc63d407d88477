"""Prometheus metrics over HTTP: ``serve --metrics HOST:PORT``.

The exposition format is :mod:`prometheus_client`'s and the HTTP is
:mod:`h11`'s over a trio stream, so neither is written by hand; both come with
the ``metrics`` extra (``pip install 'trio-upper[metrics]'``), and the server
without ``--metrics`` depends on trio alone.

Nothing here is on the server's hot path. The server counts in plain
attributes of :class:`~trio_upper.server.ServerStats` as it goes; a scrape
reads them (:class:`_StatsCollector`) and renders them then.

Whoever can reach the metrics port can send it anything, so every request is
bounded: in time (:data:`REQUEST_TIMEOUT`), in size (:data:`MAX_REQUEST_HEAD`),
and in number (the server caps metrics connections; see server.py). A
request that is not a well-formed ``GET /metrics`` gets 400, 404 or 405, and
every connection is closed after one response (and a bounded wait for the
client to close first: see :data:`LINGER_TIMEOUT`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import trio

from .capacity import CapacityListener, ConnectionSlots
from .errors import UserError

if TYPE_CHECKING:
    from .server import ServerStats

__all__ = [
    "LINGER_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_REQUEST_HEAD",
    "PATH",
    "REQUEST_TIMEOUT",
    "handle_http",
    "renderer",
    "require",
    "serve_metrics",
]

logger = logging.getLogger("trio_upper.metrics")

# Where the metrics are, as Prometheus expects by default.
PATH = "/metrics"

# A scrape is one short request: a client that has not sent it in this long
# is slow on purpose, or stuck. Prometheus' own scrape timeout is 10 s.
REQUEST_TIMEOUT = 10.0

# The most bytes of request line and headers we hold; Prometheus sends a few
# hundred. Past it, h11 refuses the request (400).
MAX_REQUEST_HEAD = 8192

# Metrics connections handled at once: a scraper or two, and a person with
# curl. More wait in the listen queue, as on the uppercase port.
MAX_CONNECTIONS = 8

# Bytes read at a time: a request head is small.
_RECEIVE_SIZE = 4096

# After answering, how long and how much of what the client still sends we
# read and throw away before closing. Closing a socket with unread bytes
# makes the kernel send a reset, which can destroy our answer before the
# client reads it: an oversized request would get a reset, not its 400.
# Past either bound the client is not waiting for an answer.
LINGER_TIMEOUT = 2.0
_LINGER_BYTES = 256 * 1024

_EXTRA_HINT = "pip install 'trio-upper[metrics]'"


def require() -> None:
    """Check that the ``metrics`` extra is installed.

    Raises:
      UserError: it is not, with the command that installs it.
    """
    try:
        import h11  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise UserError(
            f"--metrics needs {exc.name}, which is not installed: {_EXTRA_HINT}"
        ) from None


class _StatsCollector:
    """A prometheus_client collector that reads the server's counts at
    scrape time."""

    def __init__(self, stats: ServerStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self._stats

        def counter(name: str, documentation: str, value: int) -> CounterMetricFamily:
            # The "_total" suffix is added by prometheus_client.
            return CounterMetricFamily(f"trio_upper_{name}", documentation, value=value)

        yield counter("tcp_connections", "TCP connections accepted.", s.connections)
        yield GaugeMetricFamily(
            "trio_upper_tcp_connections_active", "TCP connections open now.", value=s.active
        )
        yield counter("tcp_bytes_received", "Bytes received on TCP connections.", s.bytes_received)
        yield counter("tcp_bytes_sent", "Bytes sent on TCP connections.", s.bytes_sent)
        errors = CounterMetricFamily(
            "trio_upper_tcp_connection_errors",
            "TCP connections that ended other than by the client closing, by kind.",
            labels=["kind"],
        )
        errors.add_metric(["idle_timeout"], s.idle_closed)
        errors.add_metric(["lost"], s.lost)
        errors.add_metric(["tls_handshake"], s.tls_failed)
        # Not the connections cut off at the end of the grace period: they
        # are counted as the server stops, when this port is closed already.
        errors.add_metric(["internal"], s.internal_errors)
        yield errors
        yield counter(
            "tls_handshake_failures", "TLS handshakes that failed (--certfile).", s.tls_failed
        )
        yield counter("udp_datagrams", "UDP datagrams received.", s.udp.datagrams)
        yield counter(
            "udp_rate_limited",
            "UDP datagrams not answered: over --udp-rate-limit.",
            s.udp.rate_limited,
        )
        yield counter(
            "udp_replies_dropped",
            "UDP replies not sent: no room in the send buffer, or a send error.",
            s.udp.dropped,
        )


def renderer(stats: ServerStats) -> Callable[[], bytes]:
    """A function that renders ``stats`` in Prometheus' text format, as
    they are when it is called."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(stats))
    return lambda: generate_latest(registry)


async def serve_metrics(
    listeners: Sequence[trio.abc.Listener[Any]],
    stats: ServerStats,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``stats`` on ``listeners`` until cancelled, through
    :func:`trio.serve_listeners`, at most :data:`MAX_CONNECTIONS` at once.
    The listeners are closed when this is cancelled."""
    render = renderer(stats)
    slots = ConnectionSlots(MAX_CONNECTIONS)
    capped = [CapacityListener(listener, slots) for listener in listeners]
    task_status.started()
    await trio.serve_listeners(partial(handle_http, render=render), capped)


async def handle_http(stream: trio.abc.Stream, render: Callable[[], bytes]) -> None:
    """Answer one HTTP request on ``stream``, then close it.

    ``GET`` or ``HEAD`` of :data:`PATH` gets the metrics; any other path 404,
    any other method 405, a malformed or oversized request 400; a client
    that closes before sending a request, or has not sent it within
    :data:`REQUEST_TIMEOUT` seconds, is closed without an answer. After the
    answer, what the client still sends is read and thrown away until it
    closes, for at most :data:`LINGER_TIMEOUT` seconds, so that the answer
    is not lost to a reset.

    Resource handling:
      ``stream`` is always closed.

    Error handling:
      Nothing a client does raises: a broken connection ends quietly (debug
      log), as on the uppercase port.
    """
    import h11

    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    try:
        async with stream:
            with trio.move_on_after(REQUEST_TIMEOUT) as timer:
                request = await _read_request(stream, connection)
            if timer.cancelled_caught:
                logger.debug("metrics: no request within %g s", REQUEST_TIMEOUT)
                return
            if request is None:
                # Closed before sending anything (a port scan, a TCP health
                # check): h11 can send nothing now, and nobody would read it.
                logger.debug("metrics: closed without a request")
                return
            status, body, content_type = _answer(request, render)
            headers = [
                ("Content-Type", content_type),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
            ]
            if status == HTTPStatus.METHOD_NOT_ALLOWED:
                headers.append(("Allow", "GET, HEAD"))  # RFC 9110 requires it with 405
            response = h11.Response(
                status_code=status, headers=headers, reason=HTTPStatus(status).phrase
            )
            data = connection.send(response)
            if not (isinstance(request, h11.Request) and request.method == b"HEAD"):
                data += connection.send(h11.Data(data=body))
            data += connection.send(h11.EndOfMessage())
            with trio.move_on_after(REQUEST_TIMEOUT) as timer:
                await stream.send_all(data)
            if not timer.cancelled_caught:
                await _linger(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        logger.debug("metrics: connection lost: %s", exc.__cause__ or exc)
    except Exception as exc:
        # A bug in trio-upper, not the client's doing. trio.serve_listeners
        # would let it stop the whole server: log it and go on.
        logger.error(
            "metrics connection dropped by an internal error: %r",
            exc,
            exc_info=logger.isEnabledFor(logging.DEBUG),
        )


async def _read_request(stream: trio.abc.Stream, connection: Any) -> Any:
    """The request, or the h11.RemoteProtocolError it could not be parsed
    for (None if the client closed first)."""
    import h11

    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError as exc:
            return exc
        if event is h11.NEED_DATA:
            data = await stream.receive_some(_RECEIVE_SIZE)
            connection.receive_data(bytes(data))
            continue
        if isinstance(event, h11.Request):
            return event
        return None  # ConnectionClosed: nothing to answer


async def _linger(stream: trio.abc.Stream) -> None:
    """Say that we are done sending, then read and discard what the client
    still sends until it closes, within :data:`LINGER_TIMEOUT` and
    ``_LINGER_BYTES`` (Apache's "lingering close")."""
    # The half-closeable stream beneath any wrappers (a SlotStream holding a
    # connection slot is not one, but the socket stream it wraps is).
    beneath: object = stream
    while beneath is not None and not isinstance(beneath, trio.abc.HalfCloseableStream):
        beneath = getattr(beneath, "transport_stream", None)
    with trio.move_on_after(LINGER_TIMEOUT):
        if beneath is not None:
            # A client that reads until the end of stream, rather than
            # Content-Length bytes, stops waiting now.
            await beneath.send_eof()
        discarded = 0
        while discarded < _LINGER_BYTES and (data := await stream.receive_some(_RECEIVE_SIZE)):
            discarded += len(data)


def _answer(request: Any, render: Callable[[], bytes]) -> tuple[int, bytes, str]:
    import h11
    from prometheus_client import CONTENT_TYPE_LATEST

    text = "text/plain; charset=utf-8"
    if not isinstance(request, h11.Request):
        return 400, b"bad request\n", text
    if request.method not in (b"GET", b"HEAD"):
        return 405, b"only GET and HEAD\n", text
    path = request.target.partition(b"?")[0]
    if path != PATH.encode():
        return 404, f"not found: the metrics are at {PATH}\n".encode(), text
    return 200, render(), CONTENT_TYPE_LATEST
