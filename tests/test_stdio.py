"""The clients' local input and output (trio_upper.stdio) over real pipes
and file descriptors."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import resource
import socket
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_upper.errors import UserError
from trio_upper.stdio import FdReceiveStream, FdSendStream, LineSource, pipe_line_reader
from trio_upper.udp import MAX_PAYLOAD_IPV6
from trio_upper.udp_client import DatagramSocket, udp_session

from .client_io import collector


async def test_writing_to_a_broken_pipe_is_a_user_error() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        # Python ignores SIGPIPE, so the write fails with EPIPE.
        with pytest.raises(UserError, match=r"^cannot write output: Broken pipe$"):
            await FdSendStream(write_end).send_all(b"lost")
    finally:
        os.close(write_end)


def closed_fd() -> int:
    """A file descriptor number that is closed, and high enough that nothing
    the test process opens meanwhile takes it (the OS hands out the lowest
    free number)."""
    soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD, min(1000, soft_limit - 1))
    finally:
        os.close(fd)
    os.close(high)
    return high


async def test_reading_a_closed_fd_is_a_user_error() -> None:
    fd = closed_fd()
    with pytest.raises(UserError, match=r"^cannot read input: ") as caught:
        await FdReceiveStream(fd).receive_some()
    assert str(caught.value) == "cannot read input: Bad file descriptor"


# --- pipe_line_reader -----------------------------------------------------------


def lowest_free_fd() -> int:
    """The number the next descriptor opened (a dup, say) would get: the OS
    hands out the lowest free one."""
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd


def assert_still_free(fd: int) -> None:
    """Nothing holds descriptor number ``fd``."""
    with pytest.raises(OSError, match=re.escape(os.strerror(errno.EBADF))) as caught:
        os.fstat(fd)
    assert caught.value.errno == errno.EBADF


async def read_all(read_line: LineSource) -> list[bytes | None]:
    """Every line from ``read_line``, and the None that ends them."""
    lines: list[bytes | None] = []
    while (line := await read_line()) is not None:
        lines.append(line)
    return [*lines, None]


async def test_pipe_line_reader_lines_endings_and_limit() -> None:
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"one\ntwo\r\n\n" + b"x" * 12 + b"\nlast")
        os.close(write_end)
        lines = await read_all(pipe_line_reader(read_end, limit=8))
        # A line longer than the limit comes back cut at limit + 2 bytes; its
        # rest is the next line.
        assert lines == [b"one", b"two", b"", b"x" * 10, b"xx", b"last", None]
        os.fstat(read_end)  # left open for its owner
    finally:
        os.close(read_end)


async def test_pipe_line_reader_holds_no_descriptor_when_the_session_fails(
    tmp_path: Path,
) -> None:
    # The CLI's path: a line too long for a datagram stops the UDP session
    # with a UserError before the input's end.
    path = tmp_path / "input"
    path.write_bytes(b"x" * (MAX_PAYLOAD_IPV6 + 10) + b"\nnever read\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        free = lowest_free_fd()
        read_line = pipe_line_reader(fd, MAX_PAYLOAD_IPV6)

        def no_socket(family: int) -> DatagramSocket:
            raise AssertionError("the line is refused before any socket is made")

        with pytest.raises(UserError, match=r"^line 1 is longer than one datagram can carry"):
            await udp_session(
                [(socket.AF_INET, ("127.0.0.1", 12000))],
                read_line,
                collector([]),
                where="localhost port 12000",
                new_socket=no_socket,
            )
        # The reader is still referenced, as it is until the CLI returns.
        assert_still_free(free)
    finally:
        os.close(fd)


async def test_pipe_line_reader_holds_no_descriptor_after_a_read_error() -> None:
    # Input opened for writing only (a shell's "0>file"): every read fails.
    read_end, write_end = os.pipe()
    try:
        free = lowest_free_fd()
        read_line = pipe_line_reader(write_end, 100)
        with pytest.raises(UserError, match=r"^cannot read input: Bad file descriptor$"):
            await read_line()
        assert_still_free(free)
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_pipe_line_reader_holds_no_descriptor_when_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Ctrl-C, or any cancellation, while the input is an idle pipe: the read
    # is abandoned in its thread, blocked.
    read_end, write_end = os.pipe()
    free = lowest_free_fd()
    read_line = pipe_line_reader(read_end, 100)
    try:
        with trio.move_on_after(1) as waiting:
            await read_line()
        assert waiting.cancelled_caught
        assert_still_free(free)
    finally:
        os.close(write_end)
        # The abandoned read, dispatched first, holds the buffer's lock until
        # the end of input lets it return; this read waits for that lock, so
        # read_end is not closed under the abandoned one.
        assert await read_line() is None
        os.close(read_end)
