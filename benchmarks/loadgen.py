"""Building the C load generator (``loadgen.c``) and driving one run of it.

The binary is compiled at run time into ``benchmarks/build/`` (gitignored),
again whenever the source is newer, so a fresh clone needs only a C compiler.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .lines import LineReader
from .procinfo import pinned

__all__ = ["BUILD_DIR", "LoadgenError", "LoadgenRun", "build", "run"]

SOURCE = Path(__file__).resolve().parent / "loadgen.c"
BUILD_DIR = Path(__file__).resolve().parent / "build"
CFLAGS = ("-O2", "-Wall", "-Wextra")

# Slack on top of the warm-up and the measured window for the load
# generator's own steps: only a hung server or generator uses it up.
SLACK = 60.0


class LoadgenError(Exception):
    """The load generator could not be built, or did not finish its run."""


def build(*, tls: bool = False) -> Path:
    """The load generator binary, compiled first if missing or out of date.

    With ``tls``, the one that speaks TLS too (``loadgen-tls``), linked with
    OpenSSL: it needs OpenSSL's headers (Debian's libssl-dev), which the
    plain one and the rest of the project do without.
    """
    binary = BUILD_DIR / ("loadgen-tls" if tls else "loadgen")
    if binary.exists() and binary.stat().st_mtime >= SOURCE.stat().st_mtime:
        return binary
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise LoadgenError(f"the benchmarks need a C compiler: {compiler!r} was not found")
    BUILD_DIR.mkdir(exist_ok=True)
    # Compiled under a name of its own and renamed into place, so that two
    # runs at once (the smoke test and a real run, say) never execute a
    # half-written binary.
    partial = BUILD_DIR / f"{binary.name}.{os.getpid()}.tmp"
    flags = ("-DLOADGEN_TLS",) if tls else ()
    libraries = ("-lssl", "-lcrypto") if tls else ()
    result = subprocess.run(
        [compiler, *CFLAGS, *flags, "-o", str(partial), str(SOURCE), *libraries],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        if tls and "openssl/" in result.stderr:
            raise LoadgenError(
                f"compiling {SOURCE.name} with TLS needs OpenSSL's headers "
                "(libssl-dev, openssl-devel)"
            )
        what = f"{SOURCE.name} with TLS" if tls else SOURCE.name
        raise LoadgenError(f"compiling {what} failed:\n{result.stderr}")
    if result.stderr:
        print(result.stderr, end="")
    os.replace(partial, binary)
    return binary


@dataclass(frozen=True)
class LoadgenRun:
    """One run of the load generator against one server."""

    mode: str
    port: int
    connections: int
    payload: Path
    expect: Path
    warmup: float
    duration: float
    depth: int = 1
    count: int = 0
    warm: int = 0
    cafile: Path | None = None
    """Speak TLS, trusting this CA (the TLS binary only)."""

    def argv(self, binary: Path) -> list[str]:
        """The load generator's command line."""
        args = [
            str(binary),
            self.mode,
            "--port",
            str(self.port),
            "--connections",
            str(self.connections),
            "--payload",
            str(self.payload),
            "--expect",
            str(self.expect),
            "--warmup",
            repr(self.warmup),
            "--duration",
            repr(self.duration),
        ]
        if self.depth != 1:
            args += ["--depth", str(self.depth)]
        if self.mode == "idle":
            args += ["--count", str(self.count), "--warm", str(self.warm)]
        if self.cafile is not None:
            args += ["--tls", "--cafile", str(self.cafile)]
        return args

    def setup_allowance(self) -> float:
        """Seconds the generator may take beyond the warm-up and window."""
        # Opening ten thousand connections through a Python server takes a
        # few seconds; allow for a slow one.
        return SLACK + self.count / 100


def run(
    binary: Path,
    spec: LoadgenRun,
    *,
    cpu: int | None,
    log: IO[bytes],
    on_start: Callable[[], None],
    on_end: Callable[[str], None],
) -> dict[str, Any]:
    """Run the load generator to the end and return its JSON summary.

    ``on_start`` is called when the warm-up is over and nothing is in flight,
    just before the measured window opens; ``on_end`` when the window is over
    and nothing is in flight, with the marker line (``END`` or ``READY n``).
    A summary whose ``fatal`` is set comes back as it is: judging it is the
    caller's job.

    Raises:
      LoadgenError: if the generator hung, or exited without a summary.
    """
    with pinned(cpu):
        process = subprocess.Popen(
            spec.argv(binary),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    assert process.stdin is not None
    assert process.stdout is not None
    lines = LineReader(process.stdout)
    try:
        summary = _converse(spec, lines, process.stdin, on_start, on_end)
        process.wait(timeout=SLACK)
    except BaseException:
        process.kill()
        process.wait()
        raise
    finally:
        lines.close()
        if not process.stdin.closed:
            process.stdin.close()
    return summary


def _converse(
    spec: LoadgenRun,
    lines: LineReader,
    stdin: IO[bytes],
    on_start: Callable[[], None],
    on_end: Callable[[str], None],
) -> dict[str, Any]:
    allowance = spec.setup_allowance()
    expected: Sequence[str] = ("START", "END")
    deadline = time.monotonic() + spec.warmup + allowance
    for step in expected:
        line = _next_line(lines, deadline, f"waiting for {step}")
        if line.startswith("{"):
            return _parse(line)  # a fatal error, reported before the marker
        if step == "START" and line == "START":
            on_start()
            stdin.write(b"go\n")
            stdin.flush()
            deadline = time.monotonic() + spec.duration + allowance
        elif step == "END" and (line == "END" or line.startswith("READY ")):
            on_end(line)
            stdin.close()
        else:
            raise LoadgenError(f"load generator said {line!r} while {step} was due")
    return _parse(_next_line(lines, time.monotonic() + SLACK, "waiting for the summary"))


def _next_line(lines: LineReader, deadline: float, doing: str) -> str:
    try:
        line = lines.readline(deadline)
    except TimeoutError:
        raise LoadgenError(f"load generator timed out {doing}") from None
    if line is None:
        raise LoadgenError(f"load generator exited early while {doing}")
    return line


def _parse(line: str) -> dict[str, Any]:
    try:
        summary: dict[str, Any] = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LoadgenError(f"load generator printed {line!r}: {exc}") from None
    return summary
