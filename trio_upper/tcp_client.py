"""The TCP client: connect, then either the lecture's prompt-and-reply loop
(:func:`tcp_interactive`) or an ``nc``-like copy of a stream
(:func:`tcp_stream`), with every wait for the server bounded.

The sessions take their transport and their terminal as arguments (a
:class:`trio.abc.Stream`; a line reader, or a pair of byte streams), so the
tests drive them over in-memory streams under a mock clock.
:mod:`trio_upper.cli` plugs in the real network and
:mod:`trio_upper.stdio`'s stdin and stdout.

Every failure the user can cause or meet (refused, unreachable, DNS failure,
timeout, server closed early) is raised as :class:`~trio_upper.errors.UserError`
with a one-line message.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import socket
import ssl
from collections.abc import Awaitable, Callable

import trio

from .errors import UserError, bare_user_error, os_reason, plural
from .layers import StreamWrapper
from .stdio import LineSource
from .tls import describe_tls_error
from .transform import Uppercaser

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_TCP_TIMEOUT",
    "MAX_PENDING_REPLY",
    "connect_tcp",
    "tcp_interactive",
    "tcp_stream",
]

logger = logging.getLogger("trio_upper.tcp_client")

# A TCP server answers each read at once, so seconds of silence mean trouble;
# five is generous for a slow network and short for a person waiting.
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_TCP_TIMEOUT = 5.0

# The most of a reply line the interactive client holds before writing it
# out. Without a bound, a server that never sends a newline would grow our
# memory without end. A line typed at a terminal is short (Linux's tty line
# buffer holds 4 KiB) and its uppercase at most 3 times longer, so 64 KiB
# still writes the reply to a typed line in one piece.
MAX_PENDING_REPLY = 64 * 1024

# Bytes read from stdin at a time in stream mode. Together with send_all's
# back-pressure this bounds the client's memory for inputs of any size.
_CHUNK = 65536


async def connect_tcp(
    host: str,
    port: int,
    *,
    timeout: float,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> trio.abc.Stream:
    """Open a TCP connection, and with ``tls`` its TLS session, giving up
    after ``timeout`` seconds.

    Every address ``host`` resolves to is tried, as :func:`trio.open_tcp_stream`
    does (happy eyeballs), so ``localhost`` works for IPv4- and IPv6-only
    servers alike.

    Args:
      host, port: The server.
      timeout: For the connection and the TLS handshake together.
      tls: Speak TLS, verifying the server as this context says.
      server_name: The name the server's certificate must carry (and the
          one sent in SNI); default ``host``.

    Returns:
      The connection: a :class:`trio.abc.HalfCloseableStream` over plain
      TCP, a :class:`trio.SSLStream` over TLS (handshake done). The caller
      owns it and must close it.

    Raises:
      UserError: DNS failure, refused, unreachable or timed out; over TLS, a
          certificate that does not verify, or a server that does not speak
          TLS.
    """
    where = f"{host} port {port}"
    try:
        with trio.fail_after(timeout):
            stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
            if tls is not None:
                stream = trio.SSLStream(
                    _EchoGuard(stream),
                    tls,
                    server_hostname=server_name or host,
                    https_compatible=False,
                )
                try:
                    await stream.do_handshake()
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
            return stream
    except trio.TooSlowError:
        raise UserError(f"timed out after {timeout:g} s connecting to {where}") from None
    except _EchoedHello:
        raise UserError(
            f"TLS with {where} failed: the other side does not speak TLS "
            "(it sent our TLS hello back)"
        ) from None
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError.unresolvable(host, exc) from None
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        reason = describe_tls_error(cause) if isinstance(cause, ssl.SSLError) else str(cause)
        raise UserError(f"TLS with {where} failed: {reason}") from None
    except OSError as exc:
        raise UserError(f"cannot connect to {where}: {os_reason(exc)}") from None


class _EchoedHello(Exception):
    """The server sent our ClientHello back."""


class _EchoGuard(StreamWrapper):
    """The TCP stream beneath a TLS client, watching the server's first bytes.

    A server that does not speak TLS but answers every byte (trio-upper
    without ``--certfile``, or any echo server) sends our ClientHello back,
    uppercased. OpenSSL reads the whole record before it looks inside, and
    the uppercase may have made the record shorter than its header says, or
    the server may hold its last bytes back as half a UTF-8 character: the
    handshake would then wait for bytes that never come, and the user would
    get a timeout instead of the reason. A server's first handshake message
    is a ServerHello (type 2), never a ClientHello (type 1), so the first six
    bytes (the record header, then the message type) tell at once.
    """

    def __init__(self, transport_stream: trio.abc.Stream) -> None:
        super().__init__(transport_stream)
        self._head = b""
        self._checked = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.transport_stream.receive_some(max_bytes)
        if not self._checked:
            self._head += data[: 6 - len(self._head)]
            if len(self._head) == 6 or not data:
                self._checked = True
                if self._head[:1] == b"\x16" and self._head[5:6] == b"\x01":
                    raise _EchoedHello
        return data


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


async def _receive(stream: trio.abc.ReceiveStream, max_bytes: int | None = None) -> bytes:
    """One read from the server, of at most ``max_bytes``; a reset connection
    reads as end of stream, so that the caller reports what was and was not
    answered."""
    try:
        return bytes(await stream.receive_some(max_bytes))
    except trio.BrokenResourceError as exc:
        logger.debug("connection lost: %s", exc.__cause__ or exc)
        return b""


def _silence_hint(stream: trio.abc.Stream) -> str:
    """For a server that closed without sending a byte back, a guess at why,
    to append to the message."""
    if isinstance(stream, trio.SSLStream):
        # trio closes without the alert that would say why (the handshake
        # had completed on our side: TLS 1.3 checks a client's certificate
        # after that).
        return (
            " (a server that requires a client certificate does this when it gets "
            "none it trusts: see --certfile)"
        )
    # A TLS server says nothing to a client that does not speak TLS: it
    # just closes.
    return " (if it serves TLS, use --tls)"


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


class _ReplyLines:
    """The server's replies, cut into lines for :func:`tcp_interactive`,
    holding at most :data:`MAX_PENDING_REPLY` bytes of them."""

    def __init__(
        self,
        stream: trio.abc.ReceiveStream,
        write: Callable[[bytes], Awaitable[object]],
        timeout: float,
    ) -> None:
        self.stream, self.write, self.timeout = stream, write, timeout
        # Received and not yet written: the start of the next reply line, and
        # whatever a server sent ahead of it. Never longer than the bound.
        self.pending = bytearray()
        self.received_any = False

    async def _write_out(self, size: int) -> None:
        """Write the first ``size`` pending bytes, and forget them."""
        if size:
            data = bytes(self.pending[:size])
            del self.pending[:size]
            await self.write(data)

    async def relay(self) -> bool:
        """Write the next reply line; return True if it ended with its
        newline, False if the server closed the connection first.

        Raises:
          UserError: the newline did not come within ``timeout``.

        Whatever did come of the line is written in every case.
        """
        deadline = trio.current_time() + self.timeout
        searched = 0  # self.pending[:searched] has no newline
        while (newline := self.pending.find(b"\n", searched)) < 0:
            if len(self.pending) >= MAX_PENDING_REPLY:
                # Full without a newline: the user gets it now. Time spent
                # writing is ours (a slow terminal), not the server's.
                writing = trio.current_time()
                await self._write_out(len(self.pending))
                deadline += trio.current_time() - writing
            searched = len(self.pending)
            data = b""
            with trio.move_on_at(deadline) as waiting:
                # Never more than fills the bound, so it is never passed.
                data = await _receive(self.stream, MAX_PENDING_REPLY - len(self.pending))
            if waiting.cancelled_caught:
                await self._write_out(len(self.pending))
                raise _unresponsive(self.timeout)
            if not data:
                await self._write_out(len(self.pending))
                return False
            self.received_any = True
            self.pending += data
        await self._write_out(newline + 1)
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

    A reply line is written in one piece unless it grows past
    :data:`MAX_PENDING_REPLY` bytes without a newline; then each full
    :data:`MAX_PENDING_REPLY` bytes are written as they arrive, and the rest
    with the newline. Every byte is written, in order, and memory stays
    bounded whatever the server sends.

    Args:
      stream: The connection to the server.
      read_line: The next line to send, without its line ending, or None to
          end the session.
      write: Where the replies go (stdout), newlines included.
      timeout: The longest each send may take, and the longest from the end
          of a send to the newline ending its reply line, however many
          pieces that reply is written in. Time spent in ``write`` does not
          count: a slow output is not a slow server.

    Returns:
      The number of lines answered.

    Resource handling:
      ``stream`` is closed on return.

    Raises:
      UserError: no reply line within ``timeout`` seconds (a server that
          sends endlessly without a newline included), or the server closed
          the connection before answering a line. What did come of the reply
          is written first in both cases.
    """
    answered = 0
    replies = _ReplyLines(stream, write, timeout)
    async with stream:
        while (line := await read_line()) is not None:
            sent = await _send(stream, line + b"\n", timeout)
            complete = await replies.relay()
            if not (sent and complete):
                hint = "" if replies.received_any else _silence_hint(stream)
                raise UserError(
                    "the server closed the connection; "
                    f"{plural(answered, 'line')} answered, the last line was not{hint}"
                )
            answered += 1
    return answered


class _Expected:
    """The reply a server in one of the two modes owes for what was sent,
    kept only until it has come: what is in flight, a few MB at most."""

    def __init__(self, *, ascii_only: bool) -> None:
        self._upper = Uppercaser(ascii_only=ascii_only)
        self._owed: collections.deque[bytes] = collections.deque()
        self.owed_bytes = 0
        self.matching = True
        self.tail = b""

    def sent(self, data: bytes) -> None:
        if piece := self._upper.feed(data):
            self._owed.append(piece)
            self.owed_bytes += len(piece)

    def received(self, data: bytes) -> None:
        """Take ``data`` off what is owed; a byte that differs, or one more
        than was owed, means the server is not in this mode."""
        while data and self.matching:
            if not self._owed:
                self.matching = False
                return
            head = self._owed[0]
            size = min(len(head), len(data))
            if head[:size] != data[:size]:
                self.matching = False
                return
            if size == len(head):
                self._owed.popleft()
            else:
                self._owed[0] = head[size:]
            self.owed_bytes -= size
            data = data[size:]

    def end(self) -> None:
        """The input has ended: set :attr:`tail`, what a server in this mode
        sends only at the end of the stream. That is an incomplete UTF-8
        sequence at the very end of the input, which comes back unchanged
        (see :meth:`Uppercaser.flush`), and nothing in ``--ascii`` mode."""
        self.tail = self._upper.flush()


class _ReplyCheck:
    """How a client that cannot half-close (over TLS, which has no way to
    end one direction only) knows that every reply has come.

    The transform is known, and so is what was sent: the client works out the
    reply a server in UTF-8 mode owes and the reply one in ``--ascii`` mode
    owes, checks what comes against both, and knows the server is done when
    one of them has come in full. It then closes the connection (TLS
    close_notify). A reply that matches neither is an error.

    The one thing the server sends only at the end of the stream, an
    incomplete UTF-8 sequence at the very end of the input, passes through
    the transform unchanged; the client writes it itself (at most 3 bytes).
    """

    def __init__(self) -> None:
        self._modes = [_Expected(ascii_only=False), _Expected(ascii_only=True)]
        self.input_ended = False

    def sent(self, data: bytes) -> None:
        for mode in self._modes:
            mode.sent(data)

    def end_of_input(self) -> None:
        self.input_ended = True
        for mode in self._modes:
            mode.end()

    def received(self, data: bytes) -> None:
        """Check ``data``, the next bytes of the reply.

        Raises:
          UserError: the reply so far is the start of neither mode's reply.
        """
        for mode in self._modes:
            mode.received(data)
        self._modes = [mode for mode in self._modes if mode.matching]
        if not self._modes:
            raise UserError("the server's reply is not the uppercase of what was sent")

    def _complete(self) -> _Expected | None:
        if not self.input_ended:
            return None
        return next((mode for mode in self._modes if not mode.owed_bytes), None)

    @property
    def done(self) -> bool:
        """Whether the input has ended and one mode's reply has come in full."""
        return self._complete() is not None

    @property
    def held(self) -> bytes:
        """Once :attr:`done`, what the client writes itself: the tail of the
        mode whose reply came in full (a server in ``--ascii`` mode has sent
        its copy of the same bytes already)."""
        complete = self._complete()
        return complete.tail if complete is not None else b""


class _StreamCopy:
    """The state of one :func:`tcp_stream` run: its two tasks and the
    watchdog that bounds each wait for the server."""

    def __init__(
        self,
        stream: trio.abc.Stream,
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
        # Without half-close, the end comes from counting: see _ReplyCheck.
        self.check = None if isinstance(stream, trio.abc.HalfCloseableStream) else _ReplyCheck()
        # Cancelled once the check says every reply has come.
        self.reading = trio.CancelScope()

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
        """Copy the source to the server, then half-close (or, without
        half-close, let the reply check know that the input has ended)."""
        try:
            while data := bytes(await self.source.receive_some(_CHUNK)):
                self.sent.add(data)
                if self.check is not None:
                    self.check.sent(data)
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
            if self.check is None:
                assert isinstance(self.stream, trio.abc.HalfCloseableStream)
                with contextlib.suppress(trio.BrokenResourceError):
                    await self.stream.send_eof()
            else:
                self.check.end_of_input()
                if self.check.done:
                    self.reading.cancel()
        finally:
            self.pump_done.set()

    async def copy_replies(self) -> None:
        """Copy the server's bytes to the sink until the server's EOF, or
        until the reply check says every reply has come."""
        with self.watchdog, self.reading:
            while data := await _receive(self.stream):
                self.answered.add(data)
                self.sent_since_reply = False
                self.writing_output = True
                self._rearm()
                await self.sink.send_all(data)
                self.writing_output = False
                self._rearm()
                if self.check is not None:
                    self.check.received(data)
                    if self.check.done:
                        break
        if self.watchdog.cancelled_caught:
            raise _unresponsive(self.timeout)
        if self.check is not None and self.check.done and self.check.held:
            await self.sink.send_all(self.check.held)

    def check_complete(self) -> None:
        """Raise if the server closed with input unsent or unanswered."""
        # Not a byte back at all: say what might be wrong.
        hint = "" if self.answered.lines else _silence_hint(self.stream)
        if self.server_stopped_reading or not self.input_ended:
            raise UserError(
                "the server closed the connection before all input was sent; "
                f"{plural(self.answered.newlines, 'line')} answered{hint}"
            )
        answered = self.check.done if self.check is not None else self.answered.answers(self.sent)
        if not answered:
            raise UserError(
                "the server closed the connection early; "
                f"{self.answered.newlines} of {plural(self.sent.lines, 'line')} answered{hint}"
            )


async def tcp_stream(
    stream: trio.abc.Stream,
    source: trio.abc.ReceiveStream,
    sink: trio.abc.SendStream,
    *,
    timeout: float = DEFAULT_TCP_TIMEOUT,
) -> None:
    """Like ``nc``: copy ``source`` to the server and the server's bytes to
    ``sink``, both at once; half-close after the end of ``source``; return
    when the server ends its reply stream.

    Over a stream that cannot half-close (TLS), the end is found by counting
    instead (see :class:`_ReplyCheck`): every reply byte is checked against
    the transform of what was sent, and once all of it has come the client
    closes the connection itself.

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
