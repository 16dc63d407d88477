"""The clients' local input and output (trio_upper.stdio) over real pipes
and file descriptors."""

from __future__ import annotations

import fcntl
import os
import resource

import pytest

from trio_upper.errors import UserError
from trio_upper.stdio import FdReceiveStream, FdSendStream


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
