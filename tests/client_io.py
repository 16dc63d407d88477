"""Stand-ins for a client's terminal, shared by the client session tests: a
line source from a list, a writer that keeps what it is given, and stdin and
stdout as streams for the pipe mode."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from trio_upper.stdio import LineSource


def line_source(lines: list[bytes]) -> LineSource:
    """A list-backed read_line: each line in turn, then None."""
    pending = iter(lines)

    async def read_line() -> bytes | None:
        await trio.lowlevel.checkpoint()
        return next(pending, None)

    return read_line


def collector(out: list[bytes]) -> Callable[[bytes], Awaitable[None]]:
    """A write callback that keeps each write, in order, in ``out``."""

    async def write(data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        out.append(data)

    return write


class BytesSource(trio.abc.ReceiveStream):
    """Stdin for tcp_stream: the given chunks, then end of stream. Empty
    chunks are left out, since an empty read is the end of stream."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = [chunk for chunk in chunks if chunk]

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.chunks.pop(0) if self.chunks else b""

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class Collector(trio.abc.SendStream):
    """Stdout for tcp_stream: keeps everything sent to it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.data += data

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()
