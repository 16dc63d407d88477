"""Stand-ins for a client's terminal, shared by the client session tests: a
line source from a list, and a writer that keeps what it is given."""

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
