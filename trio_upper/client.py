"""The two clients: TCP and UDP, with every wait for the server bounded.

Each client is a session function that takes its transport and its terminal
as arguments (a :class:`trio.abc.Stream` or a datagram socket factory; a line
reader, or a pair of byte streams), so the tests drive them over in-memory
streams and fake sockets under a mock clock. :mod:`trio_upper.cli` plugs in
the real network and the real stdin/stdout.

Every failure the user can cause or meet (refused, unreachable, DNS failure,
timeout, server closed early) is raised as :class:`~trio_upper.errors.UserError`
with a one-line message.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import trio

from .errors import UserError, bare_user_error, leaves, plural
from .udp import RECEIVE_SIZE as DATAGRAM_RECEIVE_SIZE
from .udp import max_payload

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_HOST",
    "DEFAULT_RETRIES",
    "DEFAULT_TCP_TIMEOUT",
    "DEFAULT_UDP_TIMEOUT",
    "PROMPT",
    "DatagramSocket",
    "FdReceiveStream",
    "FdSendStream",
    "LineSource",
    "connect_tcp",
    "pipe_line_reader",
    "read_terminal_line",
    "resolve_udp",
    "tcp_interactive",
    "tcp_stream",
    "udp_ask",
    "udp_session",
]

logger = logging.getLogger("trio_upper.client")

# As in the lecture.
DEFAULT_HOST = "localhost"
PROMPT = "Input lowercase sentence: "

# A TCP server answers each read at once, so seconds of silence mean trouble;
# five is generous for a slow network and short for a person waiting.
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_TCP_TIMEOUT = 5.0

# UDP loses datagrams, so a short first wait and a few retries with doubling
# waits (1 + 2 + 4 s by default) beat one long wait.
DEFAULT_UDP_TIMEOUT = 1.0
DEFAULT_RETRIES = 2
_BACKOFF = 2.0

# Bytes read from stdin at a time in stream mode. Together with send_all's
# back-pressure this bounds the client's memory for inputs of any size.
_CHUNK = 65536

# A line source returns the next line without its line ending, or None at EOF.
LineSource = Callable[[], Awaitable[bytes | None]]


def _reason(exc: OSError) -> str:
    """The plain reason inside an OSError, digging through trio's
    "all attempts to connect failed" wrapper to the errors of each attempt."""
    if exc.__cause__ is not None:
        reasons = [_reason(e) for e in leaves(exc.__cause__) if isinstance(e, OSError)]
        if reasons:
            return "; ".join(dict.fromkeys(reasons))
    if exc.errno is not None:
        # trio's per-attempt errors carry the address in strerror; os.strerror
        # gives the bare reason ("Connection refused").
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)


async def connect_tcp(host: str, port: int, *, timeout: float) -> trio.SocketStream:
    """Open a TCP connection, giving up after ``timeout`` seconds.

    Every address ``host`` resolves to is tried, as :func:`trio.open_tcp_stream`
    does (happy eyeballs), so ``localhost`` works for IPv4- and IPv6-only
    servers alike.

    Returns:
      The connection; the caller owns it and must close it.

    Raises:
      UserError: DNS failure, refused, unreachable or timed out.
    """
    try:
        with trio.fail_after(timeout):
            return await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise UserError(
            f"timed out after {timeout:g} s connecting to {host} port {port}"
        ) from None
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError.unresolvable(host, exc) from None
    except OSError as exc:
        raise UserError(f"cannot connect to {host} port {port}: {_reason(exc)}") from None


class _LineCount:
    """Counts lines in a byte stream fed in pieces. The transform never adds
    or removes a newline, so a complete reply has exactly the request's
    newlines, and an unterminated last line if the request has one."""

    def __init__(self) -> None:
        self.newlines = 0
        self.open_line = False

    def add(self, data: bytes) -> None:
        if data:
            self.newlines += data.count(b"\n")
            self.open_line = not data.endswith(b"\n")

    @property
    def lines(self) -> int:
        """Lines begun, an unterminated last one included."""
        return self.newlines + self.open_line

    def answers(self, request: _LineCount) -> bool:
        """Whether this (a reply) is complete for ``request``; a cut inside
        an unterminated last line cannot be seen."""
        return self.newlines == request.newlines and self.open_line >= request.open_line


async def _receive(stream: trio.abc.ReceiveStream) -> bytes:
    """One read from the server; a reset connection reads as end of stream,
    so that the caller reports what was and was not answered."""
    try:
        return bytes(await stream.receive_some())
    except trio.BrokenResourceError as exc:
        logger.debug("connection lost: %s", exc.__cause__ or exc)
        return b""


def _unresponsive(timeout: float) -> UserError:
    # One message for every wait on the server: to take data, to reply, to
    # close. The user's remedy is the same (a slow server: a larger timeout).
    return UserError(f"the server did not respond within {timeout:g} s (see --timeout)")


async def _send(stream: trio.abc.SendStream, data: bytes, timeout: float) -> bool:
    """Send within ``timeout``; False if the server has closed the connection."""
    try:
        with trio.fail_after(timeout):
            await stream.send_all(data)
    except trio.TooSlowError:
        raise _unresponsive(timeout) from None
    except trio.BrokenResourceError as exc:
        logger.debug("connection lost: %s", exc.__cause__ or exc)
        return False
    return True


async def tcp_interactive(
    stream: trio.abc.Stream,
    read_line: LineSource,
    write: Callable[[bytes], Awaitable[object]],
    *,
    timeout: float = DEFAULT_TCP_TIMEOUT,
) -> int:
    """The lecture's TCPClient, repeated: for each line, send it with a
    newline, wait for the reply line, and write it.

    Returns:
      The number of lines answered.

    Resource handling:
      ``stream`` is closed on return.

    Raises:
      UserError: no reply within ``timeout`` seconds, or the server closed the
          connection before answering a line (its partial reply, if any, is
          written first).
    """
    answered = 0
    pending = b""
    async with stream:
        while (line := await read_line()) is not None:
            sent = await _send(stream, line + b"\n", timeout)
            with trio.move_on_after(timeout) as waiting:
                while b"\n" not in pending and (data := await _receive(stream)):
                    pending += data
            if waiting.cancelled_caught:
                raise _unresponsive(timeout)
            reply, newline, pending = pending.partition(b"\n")
            if reply or newline:
                await write(reply + newline)
            if not (sent and newline):
                raise UserError(
                    "the server closed the connection; "
                    f"{plural(answered, 'line')} answered, the last line was not"
                )
            answered += 1
    return answered


class _StreamCopy:
    """The state of one :func:`tcp_stream` run: its two tasks and the
    watchdog that bounds each wait for the server."""

    def __init__(
        self,
        stream: trio.abc.HalfCloseableStream,
        source: trio.abc.ReceiveStream,
        sink: trio.abc.SendStream,
        timeout: float,
    ) -> None:
        self.stream, self.source, self.sink, self.timeout = stream, source, sink, timeout
        self.sent = _LineCount()
        self.answered = _LineCount()
        self.sent_since_reply = False
        self.input_ended = False
        self.server_stopped_reading = False
        self.writing_output = False
        self.pump_done = trio.Event()
        # Cancelled when the server has owed us something for `timeout`
        # seconds without making progress. Its deadline moves with every
        # event (see _rearm), so it is the one timer for sends and replies.
        self.watchdog = trio.CancelScope()

    def _rearm(self) -> None:
        """Restart the watchdog if we are waiting for the server, else stop it.

        We wait for the server while it owes us reply lines or bytes, or its
        end of stream after ours. We do not while we write our own output: a
        slow reader of our stdout stalls the server through TCP flow control,
        and that is not the server's fault.
        """
        owed = (
            self.input_ended
            or self.sent_since_reply
            or self.sent.newlines > self.answered.newlines
        )
        if owed and not self.writing_output:
            self.watchdog.deadline = trio.current_time() + self.timeout
        else:
            self.watchdog.deadline = math.inf

    async def pump(self) -> None:
        """Copy the source to the server, then half-close."""
        try:
            while data := bytes(await self.source.receive_some(_CHUNK)):
                self.sent.add(data)
                self.sent_since_reply = True
                self._rearm()
                try:
                    await self.stream.send_all(data)
                except trio.BrokenResourceError:
                    self.server_stopped_reading = True
                    return
                self._rearm()  # the server took it: progress
            self.input_ended = True
            self._rearm()
            with contextlib.suppress(trio.BrokenResourceError):
                await self.stream.send_eof()
        finally:
            self.pump_done.set()

    async def copy_replies(self) -> None:
        """Copy the server's bytes to the sink until the server's EOF."""
        with self.watchdog:
            while data := await _receive(self.stream):
                self.answered.add(data)
                self.sent_since_reply = False
                self.writing_output = True
                self._rearm()
                await self.sink.send_all(data)
                self.writing_output = False
                self._rearm()
        if self.watchdog.cancelled_caught:
            raise _unresponsive(self.timeout)

    def check_complete(self) -> None:
        """Raise if the server closed with input unsent or unanswered."""
        if self.server_stopped_reading or not self.input_ended:
            raise UserError(
                "the server closed the connection before all input was sent; "
                f"{plural(self.answered.newlines, 'line')} answered"
            )
        if not self.answered.answers(self.sent):
            raise UserError(
                "the server closed the connection early; "
                f"{self.answered.newlines} of {plural(self.sent.lines, 'line')} answered"
            )


async def tcp_stream(
    stream: trio.abc.HalfCloseableStream,
    source: trio.abc.ReceiveStream,
    sink: trio.abc.SendStream,
    *,
    timeout: float = DEFAULT_TCP_TIMEOUT,
) -> None:
    """Like ``nc``: copy ``source`` to the server and the server's bytes to
    ``sink``, both at once; half-close after the end of ``source``; return
    when the server ends its reply stream.

    Args:
      stream: The connection to the server.
      source: The input (stdin). Read in chunks of at most 64 KiB.
      sink: Where replies go (stdout).
      timeout: The longest the server may owe us something (reply bytes for
          input sent, the taking of input, or its end of stream after ours)
          without any progress. Time spent writing to ``sink`` does not count,
          nor time spent waiting for input while nothing is owed.

    A server may close first (the lecture's TCPServer answers one read and
    closes). The client then waits up to ``timeout`` more for the end of
    ``source``: if it comes, and every line sent was answered, all is well;
    otherwise input went unanswered, which is an error.

    Memory stays bounded whatever the input size: at most one chunk is in
    hand in each direction, and ``send_all`` waits for the server to read.

    Resource handling:
      ``stream`` is closed on return; ``source`` and ``sink`` are left open.

    Raises:
      UserError: the server did not respond in time, or closed the connection
          before answering every line of input (what it did send is written
          first).
    """
    copy = _StreamCopy(stream, source, sink, timeout)
    with bare_user_error():
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(copy.pump)
            await copy.copy_replies()
            # The server is done. Let the input show whether it was too.
            with trio.move_on_after(timeout):
                await copy.pump_done.wait()
            nursery.cancel_scope.cancel()
    copy.check_complete()


# --- UDP ---------------------------------------------------------------------


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

    Returns:
      The reply, or None if no try got one.

    Raises:
      ConnectionRefusedError: the OS reported that nothing listens there (an
          ICMP port unreachable), which makes waiting pointless.
    """
    for attempt in range(retries + 1):
        await sock.send(request)
        with trio.move_on_after(timeout * _BACKOFF**attempt):
            return await sock.recv(DATAGRAM_RECEIVE_SIZE)
        logger.debug("no reply to try %d", attempt + 1)
    return None


def _total_wait(timeout: float, retries: int) -> float:
    return math.fsum(timeout * _BACKOFF**attempt for attempt in range(retries + 1))


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
    first, and the server may be IPv4 only); the first that does not refuse is
    kept for the lines after.

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

    Raises:
      UserError: a line too long for one datagram, no server (refused), or no
          reply after every retry.
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
            sock = new_socket(family)
            try:
                await sock.connect(sockaddr)
                reply = await udp_ask(sock, line, timeout=timeout, retries=retries)
            except OSError as exc:
                # Refused (ICMP port unreachable) or unreachable: nothing
                # answers there, so try the next address and drop this one.
                logger.debug("%s: %s; trying the next address", sockaddr, exc)
                failures.append(exc)
                candidates.remove((family, sockaddr))
                continue
            finally:
                sock.close()
            if reply is None:
                raise UserError(
                    f"no reply from {where} after {plural(retries + 1, 'try', 'tries')} "
                    f"over {_total_wait(timeout, retries):g} s"
                )
            break
        if reply is None:
            if failures and all(isinstance(e, ConnectionRefusedError) for e in failures):
                raise UserError(f"no UDP server at {where}: connection refused")
            reason = _reason(failures[-1]) if failures else "no address to try"
            raise UserError(f"cannot reach {where}: {reason}")
        await write(reply + b"\n")
        answered += 1
    return answered


# --- Local input and output ---------------------------------------------------


class FdReceiveStream(trio.abc.ReceiveStream):
    """Reads a file descriptor (stdin) in a worker thread.

    A thread, unlike :class:`trio.lowlevel.FdStream`, works for regular files
    as well as pipes and terminals. A read blocked on an idle pipe is
    abandoned on cancellation, so the client can always exit.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            return await trio.to_thread.run_sync(
                os.read, self._fd, max_bytes or _CHUNK, abandon_on_cancel=True
            )
        except OSError as exc:
            raise UserError(f"cannot read input: {exc.strerror}") from None

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class FdSendStream(trio.abc.SendStream):
    """Writes a file descriptor (stdout) in a worker thread, all of each
    chunk, so a slow reader of our output slows us down instead of filling
    memory."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await trio.to_thread.run_sync(self._write_all, bytes(data))
        except OSError as exc:
            raise UserError(f"cannot write output: {exc.strerror}") from None

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def read_terminal_line() -> bytes | None:
    """Prompt on the terminal, as the lecture does; None at Ctrl-D."""

    def ask() -> bytes | None:
        try:
            return input(PROMPT).encode("utf-8", "surrogateescape")
        except EOFError:
            print()  # Ctrl-D leaves the cursor after the prompt
            return None

    return await trio.to_thread.run_sync(ask, abandon_on_cancel=True)


def pipe_line_reader(fd: int, limit: int) -> LineSource:
    """A line source over a pipe or file: lines without their ending (``\\n``
    or ``\\r\\n``). Reads at most ``limit + 2`` bytes per line, so an endless
    line cannot fill memory; a longer line comes back cut at that size.

    It reads a duplicate of ``fd`` (buffered), closed at the end of input;
    ``fd`` itself is left open."""
    file = os.fdopen(os.dup(fd), "rb")

    async def read_line() -> bytes | None:
        try:
            line: bytes = await trio.to_thread.run_sync(
                file.readline, limit + 2, abandon_on_cancel=True
            )
        except OSError as exc:
            raise UserError(f"cannot read input: {exc.strerror}") from None
        if not line:
            file.close()
            return None
        if line.endswith(b"\n"):
            line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        return line

    return read_line
