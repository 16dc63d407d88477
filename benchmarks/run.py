"""The runner: ``python -m benchmarks [--quick] [--servers ...] [--workloads ...]``.

For each workload, for each server: start the server pinned to one CPU, wait
for its ready line, run the load generator pinned to another, read the
server's CPU time (or memory, for idle connections) at the two marks the
generator prints, stop the server with SIGINT and check that it exits.
Then write the report. The exit status is 1 if any reply did not match, any
request failed, or any server misbehaved; the figures are written anyway.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import loadgen
from .model import Result, RunInfo
from .procinfo import (
    CpuSample,
    allowed_cpus,
    cpu_seconds_between,
    raise_fd_limit,
    rss_kib,
    sample_cpu,
)
from .report import write_report
from .scrape import Scraper
from .servers import (
    ROOT,
    Certificates,
    RunningServer,
    Server,
    ServerError,
    free_port,
    ours_extra_flags,
    servers,
)
from .workloads import (
    IDLE_CONNECTIONS,
    IDLE_WARM,
    QUICK_IDLE_CONNECTIONS,
    WORKLOAD_NAMES,
    Workload,
    workloads,
)

__all__ = ["main"]

DEFAULT_OUTPUT = Path(__file__).resolve().parent
DEFAULT_WARMUP, DEFAULT_DURATION = 2.0, 10.0
# Short enough that the whole quick run takes seconds, long enough that every
# connection of every workload completes some requests.
QUICK_WARMUP, QUICK_DURATION = 0.05, 0.1

# File descriptors kept back from the idle workload's share of the limit,
# for the server's and the load generator's own files and sockets.
FD_HEADROOM = 256

# UDP datagrams never answered, up to this share of the requests, are
# reported but do not fail the run: loopback drops a datagram when a socket's
# receive buffer is full, which a server cannot always prevent.
UDP_LOSS_TOLERANCE = 0.001

EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Setup:
    """What every measurement of a run shares."""

    binary: Path
    server_cpu: int | None
    loadgen_cpu: int | None
    warmup: float
    duration: float
    scratch: Path
    tls: TlsSetup | str | None = None
    """For the TLS workloads: their load generator and certificates, or why
    they cannot run here; None if none is chosen."""


@dataclass(frozen=True)
class TlsSetup:
    """The TLS workloads' own load generator, and the certificates every
    server serves with."""

    binary: Path
    certificates: Certificates


def _tls_setup(directory: Path) -> TlsSetup | str:
    """Build the TLS load generator and make the certificates; or say why
    the TLS workloads cannot run here."""
    try:
        binary = loadgen.build(tls=True)
    except loadgen.LoadgenError as exc:
        return str(exc).splitlines()[0]
    try:
        import trustme
    except ImportError:
        return "trustme is not installed (pip install -e '.[bench]')"
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    certificates = Certificates(
        ca=directory / "ca.pem", cert=directory / "cert.pem", key=directory / "key.pem"
    )
    ca.cert_pem.write_to_path(str(certificates.ca))
    leaf.private_key_pem.write_to_path(str(certificates.key))
    for i, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(certificates.cert), append=i > 0)
    return TlsSetup(binary, certificates)


def _names(text: str, known: Sequence[str], what: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what}: {', '.join(unknown) or '(none given)'}; choose from "
            + ", ".join(known)
        )
    return names


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


SERVER_NAMES = tuple(s.name for s in servers([]))


def build_parser() -> argparse.ArgumentParser:
    """The runner's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure server CPU time per request of trio-upper and its peers. "
        "See benchmarks/README.md.",
    )
    parser.add_argument(
        "--duration",
        type=float,
        metavar="SECONDS",
        help=f"measured window per server and workload (default {DEFAULT_DURATION:g}; "
        f"--quick: {QUICK_DURATION:g})",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        metavar="SECONDS",
        help=f"warm-up before each window, not counted (default {DEFAULT_WARMUP:g}; "
        f"--quick: {QUICK_WARMUP:g})",
    )
    parser.add_argument(
        "--servers",
        type=lambda text: _names(text, SERVER_NAMES, "server"),
        default=list(SERVER_NAMES),
        metavar="LIST",
        help="comma-separated servers to run (default: all): " + ", ".join(SERVER_NAMES),
    )
    parser.add_argument(
        "--workloads",
        type=lambda text: _names(text, WORKLOAD_NAMES, "workload"),
        default=list(WORKLOAD_NAMES),
        metavar="LIST",
        help="comma-separated workloads to run (default: all): " + ", ".join(WORKLOAD_NAMES),
    )
    parser.add_argument(
        "--idle-connections",
        type=_positive,
        metavar="N",
        help=f"connections held by the idle workload (default {IDLE_CONNECTIONS:,}, or "
        f"what the open-file limit allows; --quick: {QUICK_IDLE_CONNECTIONS})",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        metavar="DIR",
        help="where RESULTS.md, results.json and results.png go (default: benchmarks/)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the smoke configuration: every server and workload, for a fraction of a "
        "second each; checks the harness, measures nothing",
    )
    parser.add_argument("--no-chart", action="store_true", help="do not draw results.png")
    return parser


# --- Measuring -------------------------------------------------------------------------


def _tail(path: Path, lines: int = 8, chars: int = 600) -> str:
    """The end of a log, on one line, for a problem report."""
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return " | ".join(text.splitlines()[-lines:])[-chars:]


def _judge(result: Result, summary: dict[str, Any], workload: Workload) -> None:
    """Record the figures of a summary, and every problem they show."""
    warm: dict[str, Any] = summary.get("warmup", {})
    result.requests = int(summary.get("requests", 0))
    result.duration_s = float(summary.get("duration_s", 0.0))
    result.requests_per_s = float(summary.get("requests_per_s", 0.0))
    result.latency_us = {k: float(v) for k, v in summary.get("latency_us", {}).items()}
    # The warm-up's failures count as much as the window's: a wrong reply is
    # wrong whenever it comes.
    result.mismatches = int(summary.get("mismatches", 0)) + int(warm.get("mismatches", 0))
    result.errors = int(summary.get("errors", 0)) + int(warm.get("errors", 0))
    kinds: dict[str, int] = {}
    for source in (warm.get("error_kinds", {}), summary.get("error_kinds", {})):
        for kind, count in source.items():
            kinds[kind] = kinds.get(kind, 0) + int(count)
    result.error_kinds = kinds
    result.losses = int(summary.get("losses", 0)) + int(warm.get("losses", 0))
    result.late = int(summary.get("late", 0)) + int(warm.get("late", 0))

    if summary.get("fatal"):
        result.problems.append(f"load generator stopped: {summary['fatal']}")
    if result.mismatches:
        result.problems.append(
            f"MISMATCH: {result.mismatches:,} replies differed from the expected bytes"
        )
    if result.errors:
        described = ", ".join(f"{k} x{v:,}" for k, v in sorted(kinds.items()))
        result.problems.append(f"ERRORS: {result.errors:,} ({described})")
    if result.losses:
        # A reply that came after its timeout was slow, not lost: only the
        # datagrams never answered count against the tolerance.
        lost = result.losses - result.late
        share = lost / result.requests if result.requests else 1.0
        text = (
            f"{result.losses:,} datagrams unanswered within the timeout and sent again, "
            f"{result.late:,} of them answered late ({share:.3%} of requests never answered)"
        )
        if share > UDP_LOSS_TOLERANCE:
            result.problems.append(f"UDP LOSS: {text}")
        else:
            result.note = text
    if workload.mode == "idle":
        held = int(summary.get("held", 0))
        if held < workload.count:
            result.problems.append(f"held only {held:,} of {workload.count:,} connections")
    elif result.requests == 0 and not summary.get("fatal"):
        result.problems.append("no request completed in the measured window")


def _sample_all(processes: dict[int, str]) -> dict[int, tuple[str, CpuSample]]:
    """The CPU time of each process of the server side so far (one that
    ended meanwhile is left out)."""
    samples = {}
    for pid, role in processes.items():
        try:
            samples[pid] = (role, sample_cpu(pid))
        except OSError:
            continue
    return samples


def _cpu_between(
    start: dict[int, tuple[str, CpuSample]], end: dict[int, tuple[str, CpuSample]]
) -> tuple[dict[tuple[str, bool], float], int]:
    """CPU seconds per (role, whether schedstat gave them) between two
    samples of the server side, and the nanoseconds its processes waited
    for a CPU. A process in only one sample (a worker replaced in the
    window: none should be) is left out."""
    cpu: dict[tuple[str, bool], float] = {}
    waited = 0
    for pid, (role, after) in end.items():
        if pid not in start:
            continue
        before = start[pid][1]
        seconds, source = cpu_seconds_between(before, after)
        key = (role, source == "schedstat")
        cpu[key] = cpu.get(key, 0.0) + seconds
        waited += after.waited_ns - before.waited_ns
    return cpu, waited


def measure(server: Server, workload: Workload, setup: Setup) -> Result:
    """Run one server under one workload."""
    result = Result(server.name, workload.name, "ok")
    if not server.takes(workload.name):
        result.status = "n/a"
        return result
    if why := server.missing():
        result.status = "skipped"
        result.note = why
        return result
    binary, cafile, certificates = setup.binary, None, None
    if workload.tls:
        if not isinstance(setup.tls, TlsSetup):
            result.status = "skipped"
            result.note = setup.tls or "no TLS setup"
            return result
        binary, certificates = setup.tls.binary, setup.tls.certificates
        cafile = certificates.ca

    stem = f"{server.name}-{workload.name}"
    payload = setup.scratch / f"{stem}.payload"
    expect = setup.scratch / f"{stem}.expect"
    payload.write_bytes(workload.payload)
    expect.write_bytes(server.transform(workload.payload))
    server_log = setup.scratch / f"{stem}.server.log"
    loadgen_log = setup.scratch / f"{stem}.loadgen.log"

    port = free_port()
    spec = loadgen.LoadgenRun(
        mode=workload.mode,
        port=port,
        connections=workload.connections,
        payload=payload,
        expect=expect,
        warmup=setup.warmup,
        duration=setup.duration,
        depth=workload.depth,
        count=workload.count,
        warm=IDLE_WARM if workload.mode == "idle" else 0,
        cafile=cafile,
    )
    # Per sample, each process of the server side: its role and CPU time.
    samples: list[dict[int, tuple[str, CpuSample]]] = []
    rss: list[int] = []
    running: RunningServer | None = None
    scraper: Scraper | None = None
    summary: dict[str, Any] | None = None
    with server_log.open("wb") as slog, loadgen_log.open("wb") as llog:
        try:
            running = RunningServer(
                server, port, setup.server_cpu, slog, setup.scratch, certificates
            )
            running.wait_ready()
            pid = running.pid
            server_side = running

            def mark(_line: str = "") -> None:
                # The generator waits, with nothing in flight, until this
                # returns: the server is idle while it is sampled.
                if workload.mode == "idle":
                    rss.append(rss_kib(pid))
                else:
                    samples.append(_sample_all(server_side.processes()))

            with contextlib.ExitStack() as scraping:
                if running.metrics_url is not None:
                    scraper = scraping.enter_context(Scraper(running.metrics_url))
                summary = loadgen.run(
                    binary, spec, cpu=setup.loadgen_cpu, log=llog, on_start=mark, on_end=mark
                )
        except (ServerError, loadgen.LoadgenError, OSError) as exc:
            result.status = "failed"
            result.problems.append(str(exc))
        finally:
            if running is not None:
                try:
                    result.problems += running.stop()
                finally:
                    running.kill()
                result.server_exit_status = running.exit_status
    if scraper is not None:
        result.scrapes = scraper.scrapes
        result.problems += scraper.problems
        if not scraper.scrapes:
            result.problems.append("the metrics were never scraped")

    if summary is not None:
        result.loadgen = summary
        _judge(result, summary, workload)
        if workload.mode == "idle" and len(rss) == 2:
            result.idle_connections = int(summary.get("held", 0))
            result.rss_before_kib, result.rss_after_kib = rss
            if result.idle_connections:
                result.kib_per_connection = (rss[1] - rss[0]) / result.idle_connections
        elif len(samples) == 2:
            cpu, waited = _cpu_between(*samples)
            result.cpu_s = sum(cpu.values())
            result.cpu_source = "schedstat" if all(precise for _, precise in cpu) else "stat"
            if result.requests:
                result.cpu_us_per_request = result.cpu_s * 1e6 / result.requests
                if server.front is not None:
                    front = sum(s for (role, _), s in cpu.items() if role != "server")
                    result.front_cpu_us_per_request = front * 1e6 / result.requests
            if result.duration_s:
                result.server_busy = result.cpu_s / result.duration_s
                result.server_waited = waited / 1e9 / result.duration_s
                result.loadgen_busy = float(summary.get("loadgen_cpu_s", 0)) / result.duration_s
    if result.cpu_us_per_request is None and result.kib_per_connection is None:
        result.status = "failed"
    if result.problems:
        logs = [
            f"{name} log: {tail}"
            for name, path in (("server", server_log), ("load generator", loadgen_log))
            if (tail := _tail(path))
        ]
        result.problems += logs
    return result


# --- Describing the run ------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "unknown"


def _cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "trio_upper"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (trio_upper/ modified)" if dirty else "")


def _machine(fd_limit: int) -> dict[str, str]:
    memory = "unknown"
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "CPU": f"{_cpu_model()}, {os.cpu_count()} cores ({len(allowed_cpus())} usable)",
        "memory": memory,
        "kernel": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "trio": _version("trio"),
        "uvloop": _version("uvloop"),
        "trio-upper": f"{_version('trio-upper')}, git {_git_revision()}",
        "network": f"loopback; net.ipv4.tcp_tw_reuse={_read('/proc/sys/net/ipv4/tcp_tw_reuse')}"
        f", ports {' - '.join(_read('/proc/sys/net/ipv4/ip_local_port_range').split())}",
        "open files limit": f"{fd_limit:,}",
        "load average at start": load,
    }


def _describe(result: Result, title: str, workload: Workload) -> str:
    head = f"{workload.name:<10} {title:<24}"
    if result.status == "n/a":
        return f"{head} -"
    if result.status in ("skipped", "failed"):
        return f"{head} {result.status.upper()} {result.note}".rstrip()
    if workload.mode == "idle":
        per = result.kib_per_connection
        figure = f"{per:8.2f} KiB/connection" if per is not None else "no memory figure"
        return f"{head} {figure} ({result.idle_connections:,} connections)"
    cpu = result.cpu_us_per_request
    figure = f"{cpu:8.2f} \N{MICRO SIGN}s/request" if cpu is not None else "no CPU figure"
    latency = result.latency_us
    busy = (
        f"{result.server_busy or 0:4.0%} / {result.loadgen_busy or 0:4.0%}"
        f"  waited {result.server_waited or 0:4.0%}"
    )
    return (
        f"{head} {figure} {result.requests_per_s:>10,.0f} req/s"
        f"  p50 {latency.get('p50', 0):>8,.0f} \N{MICRO SIGN}s"
        f"  p99 {latency.get('p99', 0):>8,.0f} \N{MICRO SIGN}s  busy {busy}"
    )


# --- The command ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks; return the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(arguments)
    warmup = (
        args.warmup
        if args.warmup is not None
        else (QUICK_WARMUP if args.quick else DEFAULT_WARMUP)
    )
    duration = (
        args.duration
        if args.duration is not None
        else (QUICK_DURATION if args.quick else DEFAULT_DURATION)
    )
    if warmup < 0 or duration <= 0:
        print("error: --warmup must be 0 or more and --duration more than 0", file=sys.stderr)
        return EXIT_USAGE

    notes: list[str] = []
    fd_limit = raise_fd_limit()
    wanted_idle = args.idle_connections or (
        QUICK_IDLE_CONNECTIONS if args.quick else IDLE_CONNECTIONS
    )
    idle = max(1, min(wanted_idle, fd_limit - IDLE_WARM - FD_HEADROOM))
    if idle < wanted_idle:
        notes.append(
            f"idle workload: {idle:,} connections, not {wanted_idle:,}: the open-file limit "
            f"is {fd_limit:,}"
        )

    cpus = allowed_cpus()
    server_cpu: int | None
    loadgen_cpu: int | None
    if len(cpus) >= 2:
        server_cpu, loadgen_cpu = cpus[0], cpus[1]
        pinning = f"server on CPU {server_cpu}, load generator on CPU {loadgen_cpu}"
    else:
        server_cpu = loadgen_cpu = None
        pinning = (
            "none: only one CPU is usable, so server and load generator share it "
            "(CPU per request still holds; requests/s and latency do not)"
        )

    try:
        binary = loadgen.build()
    except loadgen.LoadgenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    ours_flags = ours_extra_flags()
    if ours_flags:
        notes.append(
            "our server runs with --udp-rate-limit 0: the peers limit nothing, so neither "
            "does ours here"
        )
    all_servers = {s.name: s for s in servers(ours_flags)}
    chosen_servers = [name for name in SERVER_NAMES if name in args.servers]
    every_workload = workloads(idle_connections=idle)
    chosen_workloads = [w for w in every_workload if w.name in args.workloads]
    titles = {name: s.title for name, s in all_servers.items()}
    titles.update({w.name: w.title for w in every_workload})

    info = RunInfo(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command=shlex.join(["python", "-m", "benchmarks", *arguments]),
        quick=args.quick,
        warmup_s=warmup,
        duration_s=duration,
        idle_connections=idle,
        pinning=pinning,
        machine=_machine(fd_limit),
        ours_flags=ours_flags,
        notes=notes,
    )
    print(f"trio-upper benchmarks: {pinning}; warm-up {warmup:g} s, window {duration:g} s")
    for note in notes:
        print(f"note: {note}")

    results: list[Result] = []
    try:
        with tempfile.TemporaryDirectory(prefix="trio-upper-bench-") as scratch:
            tls: TlsSetup | str | None = None
            if any(w.tls for w in chosen_workloads):
                tls = _tls_setup(Path(scratch))
                if isinstance(tls, str):
                    print(f"note: the TLS workloads are skipped: {tls}")
            setup = Setup(binary, server_cpu, loadgen_cpu, warmup, duration, Path(scratch), tls)
            for workload in chosen_workloads:
                for name in chosen_servers:
                    server = all_servers[name]
                    result = measure(server, workload, setup)
                    results.append(result)
                    print(_describe(result, server.title, workload), flush=True)
                    for problem in result.problems:
                        print(f"!!! {server.title} / {workload.name}: {problem}", file=sys.stderr)
    except KeyboardInterrupt:
        # measure() has stopped its server and generator on the way out.
        print("interrupted: no report written", file=sys.stderr)
        return EXIT_INTERRUPTED

    output: Path = args.output
    left_out = write_report(
        output, info, results, chosen_workloads, titles, chosen_servers, chart=not args.no_chart
    )
    for note in left_out:
        print(f"note: {note}")
    print(f"wrote {output / 'RESULTS.md'} and {output / 'results.json'}")
    failed = [r for r in results if r.problems]
    if failed:
        print(
            f"!!! {len(failed)} of {len(results)} measurements had problems: see above "
            f"and the Problems section of {output / 'RESULTS.md'}",
            file=sys.stderr,
        )
        return EXIT_PROBLEMS
    return 0
