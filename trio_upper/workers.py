"""``serve --workers N``: N server processes on one port, supervised from a
trio nursery, as gunicorn and hypercorn do it.

The parent binds the sockets (or takes them from systemd) and hands them to
each worker exactly as systemd's socket activation does: open from file
descriptor 3 on, ``LISTEN_FDS``, ``LISTEN_FDNAMES`` and ``LISTEN_PID`` set
(see :mod:`trio_upper.worker_entry`), so a worker is a plain ``trio-upper
serve`` that adopts them (:func:`trio_upper.systemd.listen_fds`).

Where the system has ``SO_REUSEPORT`` (Linux), the parent binds one set of
sockets per worker, all with that option, and the kernel spreads
connections and datagrams over them evenly, by a hash of the client's
address and port. Measured here (2,000 connections and 2,000 datagrams
from one client at a time, two workers): 1,005/995 and 971/1,029 that way,
against 1,245/755 and 500/1,500 with both workers waiting on the same
sockets, where whichever worker is awake first takes the next one and
every arrival wakes them all. Hashing also keeps a client's datagrams on
one worker, so each worker's rate limit sees all of a client's traffic.
Sockets passed by systemd are one set, and then every worker waits on it.

The parent keeps every socket open, so a worker that dies loses nothing
that waits in its queue: its replacement takes the same sockets.

The parent and a worker talk over the worker's standard streams:

* The worker's stdin is a pipe the parent never writes to. When the parent
  is gone, however it went (even SIGKILL), the pipe reads end of file and
  the worker stops as on SIGTERM: nothing is left running.
* The worker writes status lines, JSON, on its stdout: ``ready`` once it
  serves, ``stats`` (its counts) every :data:`STATS_INTERVAL` seconds and
  when it stops. The parent prints the one ready line, adds the counts up
  for its summary and for ``--metrics``, which only the parent serves.
* Its stderr is the parent's: log lines go where the parent's go, each
  naming its worker.

The parent replaces a worker that dies (logged, with back-off if it keeps
dying). On SIGINT or SIGTERM it sends SIGTERM to every worker, which drains
with the grace period; a second signal is passed on too (stop now).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import trio

from .errors import UserError
from .server import Endpoint, ServerStats
from .systemd import ListenFd
from .udp import UdpCounts

__all__ = [
    "STATS_INTERVAL",
    "WORKER_VARIABLE",
    "Supervisor",
    "add_stats",
    "report",
    "report_stats",
    "stats_fields",
    "watch_parent",
]

logger = logging.getLogger("trio_upper.workers")

# Set in a worker's environment to its number (1 to N): it reports to its
# parent instead of printing for a person, and stops when the parent goes.
WORKER_VARIABLE = "TRIO_UPPER_WORKER"

# How often a worker sends its counts: the freshness of the parent's
# metrics. A line of JSON a second costs nothing measurable.
STATS_INTERVAL = 1.0

# A worker that dies is replaced after this many seconds, doubled each time
# it dies again soon, up to _MAX_BACKOFF; one that ran _STEADY seconds is
# taken to have been healthy, and the next death waits the least again.
_FIRST_BACKOFF = 0.5
_MAX_BACKOFF = 30.0
_STEADY = 30.0

# After the grace period, how long a stopping worker still gets before it
# is killed: time to close its connections and report its counts.
_KILL_MARGIN = 5.0

# The longest status line read from a worker; ours are a few hundred bytes.
_MAX_LINE = 1 << 16


# --- In the worker ------------------------------------------------------------


def report(event: str, **fields: Any) -> None:
    """Send one status line to the parent (on stdout)."""
    line = json.dumps({"event": event, **fields}, separators=(",", ":"))
    # If the parent is gone, so is the pipe: watch_parent is about to stop us.
    with contextlib.suppress(OSError):
        print(line, flush=True)


def stats_fields(stats: ServerStats) -> dict[str, Any]:
    return dataclasses.asdict(stats)


async def watch_parent(on_gone: Callable[[], object]) -> None:
    """Call ``on_gone`` once stdin, the pipe from the parent, reads end of
    file: the parent has exited. Run it as a task in the worker's nursery."""
    stream = trio.lowlevel.FdStream(os.dup(0))
    async with stream:
        while await stream.receive_some():
            pass  # the parent writes nothing; anything else is ignored
    on_gone()


async def report_stats(stats: ServerStats) -> None:
    """Send ``stats`` to the parent every STATS_INTERVAL seconds."""
    while True:
        await trio.sleep(STATS_INTERVAL)
        report("stats", stats=stats_fields(stats))


# --- In the parent ------------------------------------------------------------


def add_stats(total: ServerStats, more: ServerStats) -> None:
    """Add ``more``'s counts to ``total``'s (the gauge ``active`` too)."""
    for field in dataclasses.fields(ServerStats):
        if field.name == "udp":
            continue
        setattr(total, field.name, getattr(total, field.name) + getattr(more, field.name))
    for field in dataclasses.fields(UdpCounts):
        value = getattr(total.udp, field.name) + getattr(more.udp, field.name)
        setattr(total.udp, field.name, value)


def _stats_from(fields: dict[str, Any]) -> ServerStats:
    udp = UdpCounts(**fields.pop("udp"))
    return ServerStats(**fields, udp=udp)


class Supervisor:
    """Runs N workers until :meth:`stop`, replacing those that die.

    Args:
      count: How many workers.
      worker_args: The ``trio-upper serve`` arguments of every worker (no
          --host, --port, --workers or --metrics: see cli.py).
      handed_down: The sockets to hand to each worker: one list per worker
          (the same list for each, or a set of SO_REUSEPORT sockets each).
          The parent keeps them open: a replacement worker takes the same
          ones, and connections made meanwhile wait in their queues.
      grace: The workers' grace period, to know when to give up on one.

    Attributes:
      stats: The counts of every worker, the living and the replaced,
          added up: what the parent's summary and metrics show. Updated
          whenever a worker reports.
      served: What the first worker to be ready said it serves.
    """

    def __init__(
        self,
        count: int,
        worker_args: Sequence[str],
        handed_down: Sequence[Sequence[ListenFd]],
        grace: float,
    ) -> None:
        if len(handed_down) != count:
            raise ValueError(f"{count} workers, {len(handed_down)} sets of sockets")
        self._count = count
        self._worker_args = list(worker_args)
        self._grace = grace
        # Copies of each worker's sockets, kept open for the parent's
        # lifetime, at numbers above 3 + N, so that moving them to 3, 4, ...
        # in a worker never overwrites one not yet moved.
        self._parked = [
            [
                fcntl.fcntl(passed.socket.fileno(), fcntl.F_DUPFD_CLOEXEC, 3 + len(sockets))
                for passed in sockets
            ]
            for sockets in handed_down
        ]
        self._names = [[passed.name for passed in sockets] for sockets in handed_down]
        self._processes: dict[int, trio.Process] = {}
        self._latest: dict[int, ServerStats] = {}
        self._retired = ServerStats()
        self.stats = ServerStats()
        self.served: list[Endpoint] = []
        self._ever_ready = False
        self._ready: set[int] = set()
        self._all_ready = trio.Event()
        self._stopping = False
        self._signals_sent = 0

    def close(self) -> None:
        for parked in self._parked:
            for fd in parked:
                os.close(fd)
        self._parked = []

    async def run(
        self, *, task_status: trio.TaskStatus[list[Endpoint]] = trio.TASK_STATUS_IGNORED
    ) -> ServerStats:
        """Start the workers; started once all of them serve; return the
        added-up counts once every worker has stopped (after :meth:`stop`).

        Raises:
          UserError: the first worker to start exited before it served
              (its own error line is on stderr above).
        """
        try:
            async with trio.open_nursery() as nursery:
                for number in range(1, self._count + 1):
                    nursery.start_soon(self._keep_running, number)
                await self._all_ready.wait()
                task_status.started(self.served)
        finally:
            self.close()
        return self.stats

    def stop(self) -> None:
        """Stop every worker: SIGTERM, so that each drains with the grace
        period. Called again, SIGTERM again: each worker stops at once."""
        self._stopping = True
        self._signals_sent += 1
        for process in self._processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` has been called."""
        return self._stopping

    async def _keep_running(self, number: int) -> None:
        backoff = _FIRST_BACKOFF
        while not self._stopping:
            started = trio.current_time()
            status = await self._run_one(number)
            if self._stopping:
                return
            if not self._ever_ready:
                raise UserError(
                    f"worker {number} {_how_it_ended(status)} before it served "
                    "(its error is above)"
                )
            if trio.current_time() - started >= _STEADY:
                backoff = _FIRST_BACKOFF
            logger.warning(
                "worker %d %s; starting another in %g s", number, _how_it_ended(status), backoff
            )
            await trio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    async def _run_one(self, number: int) -> int:
        """Run worker ``number`` until it exits; return its exit status."""
        parked = self._parked[number - 1]
        process = await trio.lowlevel.open_process(
            _command(parked, self._worker_args),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=self._environment(number),
            pass_fds=parked,
            # Its own session: a terminal's Ctrl-C reaches the parent only,
            # which passes on one SIGTERM, not a second one.
            start_new_session=True,
        )
        self._processes[number] = process
        if self._stopping:
            process.send_signal(signal.SIGTERM)
        try:
            assert process.stdout is not None
            await self._read_reports(number, process.stdout)
            return await process.wait()
        finally:
            with trio.CancelScope(shield=True):
                await self._finish(number, process)

    async def _finish(self, number: int, process: trio.Process) -> None:
        """Make sure the worker is gone, and keep its last counts."""
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(self._grace + _KILL_MARGIN):
                await process.wait()
            if process.returncode is None:
                logger.warning("worker %d did not stop: killing it", number)
                process.kill()
                await process.wait()
        if process.stdin is not None:
            await process.stdin.aclose()
        if process.stdout is not None:
            await process.stdout.aclose()
        self._processes.pop(number, None)
        last = self._latest.pop(number, None)
        if last is not None:
            add_stats(self._retired, last)
            logger.debug(
                "worker %d (pid %d) served %d TCP connections and %d datagrams",
                number,
                process.pid,
                last.connections,
                last.udp.datagrams,
            )
        self._ready.discard(number)
        self._add_up()

    async def _read_reports(self, number: int, stdout: trio.abc.ReceiveStream) -> None:
        buffer = b""
        while chunk := await stdout.receive_some():
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            if len(buffer) > _MAX_LINE:
                raise RuntimeError(f"worker {number} sent a status line of over {_MAX_LINE} B")
            for line in lines:
                self._take_report(number, json.loads(line))

    def _take_report(self, number: int, report: dict[str, Any]) -> None:
        event = report["event"]
        if event == "ready":
            if not self.served:
                self.served = [Endpoint(*endpoint) for endpoint in report["served"]]
            self._ever_ready = True
            self._ready.add(number)
            if len(self._ready) == self._count:
                self._all_ready.set()
        elif event in ("stats", "stopped"):
            self._latest[number] = _stats_from(report["stats"])
            self._add_up()

    def _add_up(self) -> None:
        total = ServerStats()
        add_stats(total, self._retired)
        for stats in self._latest.values():
            add_stats(total, stats)
        # In place: the metrics renderer holds this very object.
        for field in dataclasses.fields(ServerStats):
            setattr(self.stats, field.name, getattr(total, field.name))

    def _environment(self, number: int) -> dict[str, str]:
        env = dict(os.environ)
        # The parent alone talks to systemd.
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(name, None)
        env["LISTEN_FDS"] = str(len(self._parked[number - 1]))
        env["LISTEN_FDNAMES"] = ":".join(self._names[number - 1])
        env[WORKER_VARIABLE] = str(number)
        return env


def _how_it_ended(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


def _command(parked: Sequence[int], worker_args: Sequence[str]) -> list[str]:
    """The worker's command line: see :mod:`trio_upper.worker_entry`."""
    fds = ",".join(map(str, parked))
    return [sys.executable, "-m", "trio_upper.worker_entry", fds, "serve", *worker_args]
