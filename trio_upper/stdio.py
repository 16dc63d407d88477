"""The clients' terminal and pipe plumbing: where their input comes from and
where the server's replies go.

Lines typed at a terminal come from :func:`read_terminal_line` (with the
lecture's prompt); lines from a pipe or file come from
:func:`pipe_line_reader`; a stream of bytes comes from
:class:`FdReceiveStream` and goes to :class:`FdSendStream`. All of them do
their blocking reads and writes in worker threads, so the trio loop, and with
it every timeout, keeps running.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

import trio

from .errors import UserError

__all__ = [
    "DEFAULT_HOST",
    "PROMPT",
    "FdReceiveStream",
    "FdSendStream",
    "LineSource",
    "pipe_line_reader",
    "read_terminal_line",
]

# As in the lecture: the host both clients ask when none is named, and the
# prompt they show on a terminal.
DEFAULT_HOST = "localhost"
PROMPT = "Input lowercase sentence: "

# Bytes read from a file descriptor at a time when the caller names no size:
# large enough that a big input costs few thread round trips, small enough to
# hold at once.
_READ_SIZE = 65536

# A line source returns the next line without its line ending, or None at EOF.
LineSource = Callable[[], Awaitable[bytes | None]]


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
                os.read, self._fd, max_bytes or _READ_SIZE, abandon_on_cancel=True
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

    Args:
      fd: What to read (stdin); left open.
      limit: The longest line the caller takes (longer ones come back cut,
          one byte too long, for the caller to refuse).

    Returns:
      The line source: the next line each call, then None at the end.

    Resource handling:
      Nothing to release. ``fd`` is read through a buffer that does not own
      it (``closefd=False``), so no descriptor of ours exists to leak, on any
      path: a read error, a cancellation or Ctrl-C, a caller that stops
      before the end. A duplicate of ``fd`` would need closing on each, and
      closing its buffer while a read abandoned on cancellation still blocks
      in a worker thread waits for that read, which an idle pipe never ends.

    Raises:
      UserError: (from the line source) the read failed.
    """
    file = os.fdopen(fd, "rb", closefd=False)

    async def read_line() -> bytes | None:
        try:
            line: bytes = await trio.to_thread.run_sync(
                file.readline, limit + 2, abandon_on_cancel=True
            )
        except OSError as exc:
            raise UserError(f"cannot read input: {exc.strerror}") from None
        if line.endswith(b"\n"):
            line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        elif not line:
            return None
        return line

    return read_line
