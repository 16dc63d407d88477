"""The figures one run produces, as written to results.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Result", "RunInfo", "Status"]

Status = Literal["ok", "failed", "skipped", "n/a"]


@dataclass
class Result:
    """One server under one workload."""

    server: str
    workload: str
    status: Status
    note: str = ""
    requests: int = 0
    duration_s: float = 0.0
    requests_per_s: float = 0.0
    cpu_s: float = 0.0
    cpu_source: str = ""
    cpu_us_per_request: float | None = None
    front_cpu_us_per_request: float | None = None
    """Through nginx: nginx's part of ``cpu_us_per_request``."""
    server_busy: float | None = None
    """Server CPU time over the window's length: 1.0 is one core, flat out."""
    loadgen_busy: float | None = None
    """The same for the load generator; near 1.0, it set the pace."""
    server_waited: float | None = None
    """Time the server was ready to run but waited for its CPU, over the
    window's length: anything but small means other processes took its CPU."""
    latency_us: dict[str, float] = field(default_factory=dict)
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    mismatches: int = 0
    losses: int = 0
    late: int = 0
    idle_connections: int = 0
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    kib_per_connection: float | None = None
    server_exit_status: int | None = None
    scrapes: int = 0
    """Metrics scrapes answered while the load ran (servers with --metrics)."""
    problems: list[str] = field(default_factory=list)
    """What makes this result wrong: mismatches, errors, a server that
    would not stop. Any of these fails the whole run."""
    loadgen: dict[str, Any] = field(default_factory=dict)
    """The load generator's own summary, as it printed it."""

    @property
    def measured(self) -> bool:
        """Whether this result holds figures to compare."""
        return self.status == "ok"


@dataclass
class RunInfo:
    """How, where and when the figures were taken."""

    date: str
    command: str
    quick: bool
    warmup_s: float
    duration_s: float
    idle_connections: int
    pinning: str
    machine: dict[str, str]
    ours_flags: list[str]
    notes: list[str] = field(default_factory=list)
