"""Reading a child's output line by line, each wait bounded by a deadline."""

from __future__ import annotations

import os
import select
import time
from typing import IO

__all__ = ["LineReader"]


class LineReader:
    """Lines from a pipe, with a deadline on each wait.

    Reads the raw file descriptor through ``select``, so a child that hangs
    never hangs the harness, and no line is lost in a buffer ``select`` does
    not see.
    """

    def __init__(self, pipe: IO[bytes]) -> None:
        self._pipe = pipe
        self._fd = pipe.fileno()
        self._buffer = b""
        self._eof = False

    def readline(self, deadline: float) -> str | None:
        """The next line without its newline; None at the end of the output.

        Raises:
          TimeoutError: if no whole line came by ``deadline`` (monotonic).
        """
        while b"\n" not in self._buffer:
            if self._eof:
                if self._buffer:
                    rest, self._buffer = self._buffer, b""
                    return rest.decode(errors="replace")
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            readable, _, _ = select.select([self._fd], [], [], remaining)
            if readable:
                chunk = os.read(self._fd, 65536)
                if chunk:
                    self._buffer += chunk
                else:
                    self._eof = True
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode(errors="replace")

    def close(self) -> None:
        """Close the pipe."""
        self._pipe.close()
