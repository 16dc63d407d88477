"""Shared fixtures: an in-process server on loopback, and our server as a
subprocess. The helpers they are made of, and every other shared helper, are
in helpers.py."""

from __future__ import annotations

import signal
import sys
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import trio

import trio_upper

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

from .helpers import LoopbackServer, ServerProcess, serve_loopback, serving

# test_clients.py, which another change is rewriting, still imports this from
# here; once it imports from .helpers, this line goes.


@pytest.fixture
async def loopback(nursery: trio.Nursery) -> AsyncIterator[LoopbackServer]:
    served = await serve_loopback(nursery)
    yield served
    served.server.shutdown(grace=0)


@pytest.fixture
def server_process() -> Iterator[ServerProcess]:
    """Our server on 127.0.0.1, a port of the OS's choosing."""
    with serving() as server:
        yield server


# --- The per-test timeout inside trio ----------------------------------------------------
#
# pytest-timeout (pyproject.toml) fails a hung test from a SIGALRM handler,
# which raises wherever the main thread is. In a trio test that is nearly
# always trio's own loop, waiting for I/O, and an exception there leaves trio
# half torn down: every later trio test then fails with "Attempted to call
# run() from inside a run()". So inside trio.run the alarm is handed to trio
# (run_sync_soon is safe in a signal handler), which fails the test from a
# task of its own and tears the run down in order: one hang, one failed test.


class HangTimeout(Exception):
    """The per-test timeout ran out in a trio run."""


def _where_tasks_wait() -> list[str]:
    """Where each task of the run waits, in our code: what a thread's stack
    dump would show, had the tasks threads of their own."""
    ours = (str(Path(__file__).parent), str(Path(trio_upper.__file__).parent))
    lines = []
    root = trio.lowlevel.current_root_task()
    pending = [] if root is None else [root]
    while pending:
        task = pending.pop()
        frames = [
            f"{frame.f_code.co_filename}:{lineno} in {frame.f_code.co_name}"
            for frame, lineno in task.iter_await_frames()
            if frame.f_code.co_filename.startswith(ours)
        ]
        if frames and task is not trio.lowlevel.current_task():
            lines.append(f"task {task.name}, waiting at:")
            lines += [f"    {frame}" for frame in frames]
        pending += [child for nursery in task.child_nurseries for child in nursery.child_tasks]
    return lines


async def _fail_the_run(timeout: float) -> None:
    message = [f"Timeout (>{timeout:g}s) from pytest-timeout", *_where_tasks_wait()]
    await trio.lowlevel.checkpoint()
    raise HangTimeout("\n".join(message))


# If the run does not end this many seconds after the alarm (a task that
# never reaches a checkpoint), the exception is raised where it stands after
# all, as pytest-timeout does.
STUCK_RUN = 10.0


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    if settings.method != "signal":
        return None  # pytest-timeout's own thread method
    import pytest_timeout  # type: ignore[import-untyped]

    alarms = 0

    def alarm(signum: int, frame: FrameType | None) -> None:
        nonlocal alarms
        alarms += 1
        try:
            token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            token = None
        if token is None or alarms > 1:
            pytest_timeout.timeout_sigalrm(item, settings)
            return
        token.run_sync_soon(
            partial(trio.lowlevel.spawn_system_task, _fail_the_run, settings.timeout)
        )
        signal.setitimer(signal.ITIMER_REAL, STUCK_RUN)

    def cancel() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel  # type: ignore[attr-defined]
    signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    return True


def _hang_timeout_in(exc: BaseException | None) -> HangTimeout | None:
    while exc is not None:
        if isinstance(exc, HangTimeout):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = [_hang_timeout_in(inner) for inner in exc.exceptions]
            return next((f for f in found if f is not None), None)
        exc = exc.__cause__
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    # trio reports an exception from a system task as its own internal
    # error; say what it was.
    try:
        return (yield)
    except trio.TrioInternalError as exc:
        timeout = _hang_timeout_in(exc.__cause__)
        if timeout is None:
            raise
    pytest.fail(str(timeout), pytrace=False)
