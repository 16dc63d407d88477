"""The benchmark harness in its quick mode, as ``python -m benchmarks --quick``.

A smoke test of the harness, not a benchmark: it checks that every server
and workload runs, that every reply matched byte for byte and that the report
is written, and asserts no figure. It needs only what the test extra
installs: without uvloop the uvloop peer is skipped, without prometheus_client
ours with --metrics, without matplotlib the chart, and without OpenSSL's headers
the TLS workloads. It does need a C compiler, for the load generator.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.servers import nginx_stream_module

ROOT = Path(__file__).resolve().parent.parent

SERVERS = (
    "ours",
    "ours-ascii",
    "ours-metrics",
    "ours-nginx",
    "ours-workers2",
    "trio-tutorial",
    "asyncio-streams",
    "asyncio-protocol",
    "uvloop-protocol",
)
WORKLOADS = ("tcp", "pipelined", "bulk", "connect", "udp", "idle", "tcp-utf8", "tls", "tls-bulk")
TLS_WORKLOADS = ("tls", "tls-bulk")

PEERS = ("trio-tutorial", "asyncio-streams", "asyncio-protocol", "uvloop-protocol")

# What each server does not run: the peers only uppercase ASCII, asyncio
# streams has no UDP, --ascii only takes part in the UTF-8 comparison, and
# --metrics only in TCP ping-pong and UDP, ours behind nginx or with workers
# in ping-pong, connect and UDP only (every other server takes part in the
# TLS workloads).
NOT_APPLICABLE = (
    {("ours-ascii", w) for w in WORKLOADS if w not in ("tcp", "tcp-utf8")}
    | {("ours-metrics", w) for w in WORKLOADS if w not in ("tcp", "udp")}
    | {(peer, "tcp-utf8") for peer in PEERS}
    | {("asyncio-streams", "udp")}
    | {
        (ours, w)
        for ours in ("ours-nginx", "ours-workers2")
        for w in WORKLOADS
        if w not in ("tcp", "connect", "udp")
    }
)

# The quick run takes about ten seconds; this only stops a hung one, and
# does so before pytest-timeout's 120 s for the test (pyproject.toml).
TIMEOUT = 100


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Run the harness once in quick mode; return its output folder and stdout."""
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("the load generator needs a C compiler")
    output = tmp_path_factory.mktemp("bench")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return output, result.stdout


def tls_load_generator_builds() -> bool:
    """Whether the TLS load generator can be built here (OpenSSL's headers)."""
    from benchmarks import loadgen

    try:
        loadgen.build(tls=True)
    except loadgen.LoadgenError:
        return False
    return True


def nginx_stream_module_missing() -> str | None:
    """Why the harness skips ours behind nginx here, or None if it runs it."""
    module = nginx_stream_module()
    return module if isinstance(module, str) else None


def _results(output: Path) -> dict[tuple[str, str], dict[str, Any]]:
    raw = json.loads((output / "results.json").read_text())
    return {(r["server"], r["workload"]): r for r in raw["results"]}


def test_every_server_and_workload_has_a_row(quick_run: tuple[Path, str]) -> None:
    output, _ = quick_run
    results = _results(output)
    assert set(results) == {(s, w) for s in SERVERS for w in WORKLOADS}
    cannot_run = set()
    if importlib.util.find_spec("uvloop") is None:
        cannot_run.add("uvloop-protocol")
    if importlib.util.find_spec("prometheus_client") is None:
        cannot_run.add("ours-metrics")
    if nginx_stream_module_missing() is not None:
        cannot_run.add("ours-nginx")
    have_tls = tls_load_generator_builds()
    for (server, workload), result in results.items():
        if (server, workload) in NOT_APPLICABLE:
            expected = "n/a"
        elif server in cannot_run or (workload in TLS_WORKLOADS and not have_tls):
            expected = "skipped"
        else:
            expected = "ok"
        assert result["status"] == expected, result


def test_every_measurement_is_clean(quick_run: tuple[Path, str]) -> None:
    output, _ = quick_run
    for result in _results(output).values():
        if result["status"] != "ok":
            continue
        assert result["requests"] > 0, result
        assert result["mismatches"] == 0, result
        assert result["errors"] == 0, result
        assert result["problems"] == [], result
        assert result["server_exit_status"] == 0, result
        # Scraped while it ran, every scrape parsed (a failed one is a problem).
        assert (result["scrapes"] > 0) == (result["server"] == "ours-metrics"), result
        if result["workload"] == "idle":
            assert result["idle_connections"] > 0, result
            assert result["kib_per_connection"] is not None, result
        else:
            assert result["cpu_us_per_request"] is not None, result


def test_report_is_written(quick_run: tuple[Path, str]) -> None:
    output, stdout = quick_run
    report = (output / "RESULTS.md").read_text()
    for heading in (
        "Server CPU time per request",
        "Ratios",
        "Targets",
        "`--metrics` against none",
        "Scaling out",
        "Problems",
    ):
        assert heading in report
    assert "None: every reply matched" in report
    assert "quick smoke run" in report
    chart = output / "results.png"
    if importlib.util.find_spec("matplotlib") is None:
        assert not chart.exists()
        assert "chart skipped" in report
    else:
        assert chart.read_bytes().startswith(b"\x89PNG")
    assert "RESULTS.md" in stdout
