"""What the harness reads about a process from /proc, and CPU pinning.

Server CPU time is read per thread from ``/proc/PID/task/*/schedstat``, whose
first field is the time the thread has run in nanoseconds, and checked
against the process's user + system time in ``/proc/PID/stat``, which counts
threads that have ended too but only in clock ticks (10 ms, usually).
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CpuSample",
    "allowed_cpus",
    "cpu_seconds_between",
    "descendants",
    "pinned",
    "raise_fd_limit",
    "rss_kib",
    "sample_cpu",
]

_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSample:
    """The CPU time a process has used so far, read two ways."""

    process_s: float
    """User + system time of the whole process, ended threads included."""
    threads_ns: Mapping[int, int]
    """Run time of each live thread in ns; empty if schedstat is missing."""
    waited_ns: int = 0
    """Time the live threads have spent runnable but waiting for a CPU, in ns."""


def _process_seconds(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may hold spaces.
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _TICKS_PER_SECOND


def _threads_ns(pid: int) -> tuple[dict[int, int], int]:
    found: dict[int, int] = {}
    waited = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found, waited
    for task in tasks:
        try:
            # schedstat: time on a CPU, time waiting on a run queue (both ns),
            # and the number of times the thread was scheduled.
            fields = (task / "schedstat").read_text().split()
            found[int(task.name)] = int(fields[0])
            waited += int(fields[1])
        except (OSError, ValueError, IndexError):
            # A thread that ended between listing and reading: the check
            # against /proc/PID/stat in cpu_seconds_between covers it.
            continue
    return found, waited


def sample_cpu(pid: int) -> CpuSample:
    """Read the CPU time used so far by every thread of process ``pid``."""
    threads, waited = _threads_ns(pid)
    return CpuSample(_process_seconds(pid), threads, waited)


def cpu_seconds_between(start: CpuSample, end: CpuSample) -> tuple[float, str]:
    """The CPU seconds used between two samples, and which source gave them.

    The per-thread nanosecond figures are preferred. A thread that ended in
    between takes its last moments with it, so when the tick-precision
    process total disagrees by more than its own rounding, it wins.
    """
    ticks = end.process_s - start.process_s
    if not start.threads_ns or not end.threads_ns:
        return ticks, "stat"
    ns = sum(end.threads_ns[t] - start.threads_ns.get(t, 0) for t in end.threads_ns)
    precise = ns / 1e9
    tolerance = 2 / _TICKS_PER_SECOND + 0.01 * max(ticks, precise)
    if abs(precise - ticks) > tolerance:
        return ticks, "stat"
    return precise, "schedstat"


def rss_kib(pid: int) -> int:
    """The resident set size of process ``pid`` in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError(f"no VmRSS for process {pid}")


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (its children, theirs, ...), as they are
    now: the workers of ``serve --workers``, nginx's worker. Processes that
    end meanwhile are left out."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        # The parent is the second field after the command name, which is in
        # parentheses and may hold spaces.
        parent = int(text[text.rindex(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    waiting = [pid]
    while waiting:
        below = children.get(waiting.pop(), [])
        found += below
        waiting += below
    return found


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on, in order."""
    return sorted(os.sched_getaffinity(0))


@contextlib.contextmanager
def pinned(cpu: int | None) -> Iterator[None]:
    """Run the body (a process start) pinned to ``cpu``; ``None`` leaves it be.

    A child inherits the affinity of the thread that forks it, so starting it
    inside this block pins it from its first instruction: no window in which
    it runs elsewhere, and no preexec_fn.
    """
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit, for it and
    its children to inherit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:
        # The kernel refuses "infinity" for open files; nr_open is its ceiling.
        target = int(Path("/proc/sys/fs/nr_open").read_text())
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft if soft != resource.RLIM_INFINITY else target
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft
