"""The report of a run: RESULTS.md, results.json and results.png.

The headline figure is server CPU time per request: it does not depend on
how fast the load generator is, and it is what a server costs its machine.
Ratios are peer / ours, so a ratio above 1 means ours uses less CPU per
request than that peer.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .model import Result, RunInfo
from .servers import MALLOC_ENV, SCALE_OUT
from .workloads import Workload

# Written by hand from profiles: what stands in the way of the targets not
# met. Full runs copy it into RESULTS.md, under the targets.
ANALYSIS = Path(__file__).resolve().parent / "ANALYSIS.md"

__all__ = ["TARGETS", "Target", "evaluate", "write_report"]

OURS = "ours"
OURS_ASCII = "ours-ascii"
OURS_METRICS = "ours-metrics"
OURS_NGINX, OURS_WORKERS = SCALE_OUT
# Ours in another configuration: compared with ours, not as a peer.
VARIANTS = (OURS, OURS_ASCII, OURS_METRICS, *SCALE_OUT)
MICRO = "\N{MICRO SIGN}"


@dataclass(frozen=True)
class Target:
    """One goal from the issue, checked against the figures."""

    workload: str
    other: str | None
    kind: Literal["ratio", "idle", "utf8", "metrics"]
    bound: float
    stretch: bool = False

    def describe(self, titles: dict[str, str]) -> str:
        """The target as a line of the report."""
        if self.kind == "idle":
            return f"Idle connections: ours <= {self.bound:g} KiB each"
        if self.kind == "utf8":
            return f"UTF-8 mode on ASCII text within 5% of --ascii (utf8/ascii <= {self.bound:g})"
        if self.kind == "metrics":
            return (
                f"{titles[self.workload]}: --metrics, scraped, within 5% of none "
                f"(metrics/none <= {self.bound:g})"
            )
        peer = titles.get(self.other or "", self.other)
        label = "stretch: " if self.stretch else ""
        return f"{label}{titles[self.workload]}: {peer} / ours >= {self.bound:g}"


TARGETS = (
    Target("tcp", "trio-tutorial", "ratio", 2.0),
    Target("tcp", "asyncio-streams", "ratio", 1.3),
    Target("tcp", "asyncio-protocol", "ratio", 1.0),
    Target("pipelined", "asyncio-protocol", "ratio", 1.0),
    Target("bulk", "uvloop-protocol", "ratio", 1.0),
    Target("connect", "asyncio-streams", "ratio", 1.0),
    Target("udp", "trio-tutorial", "ratio", 2.5),
    Target("udp", "asyncio-protocol", "ratio", 1.0),
    Target("idle", None, "idle", 3.0),
    Target("tcp", OURS_ASCII, "utf8", 1.05),
    Target("tcp", OURS_METRICS, "metrics", 1.05),
    Target("udp", OURS_METRICS, "metrics", 1.05),
    Target("tcp", "uvloop-protocol", "ratio", 0.8, stretch=True),
    Target("pipelined", "uvloop-protocol", "ratio", 0.8, stretch=True),
    Target("udp", "uvloop-protocol", "ratio", 0.8, stretch=True),
)


def _index(results: Sequence[Result]) -> dict[tuple[str, str], Result]:
    return {(r.server, r.workload): r for r in results}


def _cpu(found: dict[tuple[str, str], Result], server: str, workload: str) -> float | None:
    result = found.get((server, workload))
    if result is None or not result.measured:
        return None
    return result.cpu_us_per_request


def ratio(results: Sequence[Result], peer: str, workload: str) -> float | None:
    """Peer CPU per request over ours, on one workload; None if either is missing."""
    found = _index(results)
    theirs, ours = _cpu(found, peer, workload), _cpu(found, OURS, workload)
    if theirs is None or not ours:
        return None
    return theirs / ours


def evaluate(target: Target, results: Sequence[Result]) -> tuple[float | None, bool | None]:
    """The measured figure for a target and whether it is met (None: not measured)."""
    found = _index(results)
    value: float | None
    if target.kind == "idle":
        ours = found.get((OURS, "idle"))
        value = ours.kib_per_connection if ours and ours.measured else None
        return value, None if value is None else value <= target.bound
    if target.kind in ("utf8", "metrics"):
        # Ours in two configurations, the second over the first: a cost.
        first, second = (OURS, OURS_ASCII) if target.kind == "utf8" else (OURS_METRICS, OURS)
        one, other = _cpu(found, first, target.workload), _cpu(found, second, target.workload)
        value = one / other if one is not None and other else None
        return value, None if value is None else value <= target.bound
    value = ratio(results, target.other or "", target.workload)
    return value, None if value is None else value >= target.bound


# --- Formatting -----------------------------------------------------------------


def _num(value: float | None, digits: int = 3) -> str:
    """A figure to ``digits`` significant digits, with thousands separators."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    magnitude = len(str(int(abs(value)))) if abs(value) >= 1 else 0
    decimals = max(0, digits - magnitude)
    if abs(value) < 1:
        decimals = digits
    return f"{value:,.{decimals}f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _cell(result: Result | None, text: str) -> str:
    if result is None:
        return ""
    if result.status == "n/a":
        return "-"
    if result.status == "skipped":
        return "skipped"
    if result.status == "failed":
        return "FAILED"
    return text + (" (!)" if result.problems else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _markdown(
    info: RunInfo,
    results: Sequence[Result],
    workloads: Sequence[Workload],
    titles: dict[str, str],
    servers: Sequence[str],
) -> str:
    found = _index(results)
    load = [w for w in workloads if w.mode != "idle"]
    out: list[str] = ["# Benchmark results", ""]
    if info.quick:
        out += [
            "**A quick smoke run (`--quick`): its durations are far too short for these "
            "figures to mean anything. Run without `--quick` on a quiet machine for real "
            "figures.**",
            "",
        ]
    out += [
        f"Written by `{info.command}` on {info.date}. How to read this: [README.md](README.md).",
        "",
        "## Machine and method",
        "",
    ]
    rows = [[key, value] for key, value in info.machine.items()]
    rows += [
        ["pinning", info.pinning],
        [
            "durations",
            f"warm-up {info.warmup_s:g} s, then {info.duration_s:g} s measured, per server "
            f"and workload; {info.idle_connections:,} idle connections",
        ],
        ["our server's flags", " ".join(info.ours_flags) or "(none beyond host and port)"],
        [
            "every server's environment",
            " ".join(f"`{k}={v}`" for k, v in MALLOC_ENV.items())
            + " (glibc's steady state; see `MALLOC_ENV` in servers.py)",
        ],
    ]
    out += _table(["", ""], rows)
    out += [""]
    out += [f"- {note}" for note in info.notes]
    if info.notes:
        out += [""]

    out += [
        f"## Server CPU time per request ({MICRO}s)",
        "",
        "Lower is better. `-`: not applicable; `(!)`: see Problems below.",
        "",
    ]
    rows = []
    for workload in load:
        row = [workload.title]
        for server in servers:
            result = found.get((server, workload.name))
            row.append(_cell(result, _num(result.cpu_us_per_request if result else None)))
        rows.append(row)
    out += _table(["workload", *(titles[s] for s in servers)], rows)

    peers = [s for s in servers if s not in VARIANTS]
    if peers and OURS in servers:
        out += ["", "## Ratios: peer / ours CPU per request", ""]
        out += ["Above 1: ours uses less CPU per request than that peer.", ""]
        rows = []
        for workload in load:
            if workload.name == "tcp-utf8":
                continue
            row = [workload.title]
            for peer in peers:
                value = ratio(results, peer, workload.name)
                row.append(_num(value) if value is not None else "-")
            rows.append(row)
        out += _table(["workload", *(titles[p] for p in peers)], rows)

    out += ["", "## Targets", ""]
    rows = []
    for target in TARGETS:
        value, met = evaluate(target, results)
        verdict = "not measured" if met is None else "yes" if met else "**no**"
        rows.append([target.describe(titles), _num(value), verdict])
    out += _table(["target", "measured", "met"], rows)
    if ANALYSIS.exists() and not info.quick:
        # Written by hand from profiles of the runs it names: what stands in
        # the way of the targets not met.
        out += ["", ANALYSIS.read_text().strip()]

    out += ["", "## Throughput and latency", ""]
    rows = []
    for workload in load:
        for server in servers:
            result = found.get((server, workload.name))
            if result is None or result.status == "n/a":
                continue
            if not result.measured:
                rows.append([workload.title, titles[server], _cell(result, ""), "", "", "", ""])
                continue
            latency = result.latency_us
            rows.append(
                [
                    workload.title,
                    titles[server],
                    _cell(result, _num(result.cpu_us_per_request)),
                    f"{result.requests_per_s:,.0f}",
                    _num(latency.get("p50")),
                    _num(latency.get("p99")),
                    _num(latency.get("max")),
                    _percent(result.server_busy),
                    _percent(result.loadgen_busy),
                    _percent(result.server_waited),
                ]
            )
    out += _table(
        [
            "workload",
            "server",
            f"CPU {MICRO}s/request",
            "requests/s",
            f"p50 {MICRO}s",
            f"p99 {MICRO}s",
            f"max {MICRO}s",
            "server busy",
            "generator busy",
            "server waited",
        ],
        rows,
    )
    out += [
        "",
        "Latency is from the request's first byte sent (for connect-per-request: from "
        "the connect) to its reply's last byte received; in pipelined mode, of a round "
        "of 16. Busy is CPU time over the window: a server near 100% is the bottleneck, "
        "as it should be; a generator near 100% set the pace of requests/s and latency "
        "instead (CPU per request holds either way). Server waited is the time the server "
        "was ready to run but another process had its CPU: on a quiet machine it is near 0.",
    ]

    if OURS in servers and any(s in servers for s in SCALE_OUT):
        out += _scale_out(found, load)

    if any(w.mode == "idle" for w in workloads):
        out += ["", "## Memory per idle connection", ""]
        rows = []
        for server in servers:
            result = found.get((server, "idle"))
            if result is None or result.status == "n/a":
                continue
            rows.append(
                [
                    titles[server],
                    _cell(result, _num(result.kib_per_connection)),
                    f"{result.idle_connections:,}",
                    f"{result.rss_before_kib:,}",
                    f"{result.rss_after_kib:,}",
                ]
            )
        out += _table(
            ["server", "KiB per connection", "connections", "VmRSS before (KiB)", "after"],
            rows,
        )

    if any(w.name in ("tcp", "tcp-utf8") for w in workloads):
        out += ["", "## UTF-8 mode against `--ascii` (ours, TCP ping-pong)", ""]
        rows = []
        for name, text in (("tcp", "ASCII text"), ("tcp-utf8", "non-ASCII text")):
            utf8, ascii_ = _cpu(found, OURS, name), _cpu(found, OURS_ASCII, name)
            value = utf8 / ascii_ if utf8 is not None and ascii_ else None
            rows.append([text, _num(utf8), _num(ascii_), _num(value)])
        out += _table(
            ["payload", f"UTF-8 {MICRO}s/request", f"--ascii {MICRO}s/request", "UTF-8 / ascii"],
            rows,
        )
        out += [
            "",
            "On non-ASCII text the two modes do different work (only UTF-8 mode uppercases "
            "it), so that ratio has no target.",
        ]

    if any(s == OURS_METRICS for s in servers):
        out += ["", "## `--metrics` against none (ours, same run)", ""]
        rows = []
        for workload in load:
            result = found.get((OURS_METRICS, workload.name))
            if result is None or result.status == "n/a":
                continue
            plain, metered = (
                _cpu(found, OURS, workload.name),
                _cpu(found, OURS_METRICS, workload.name),
            )
            value = metered / plain if metered is not None and plain else None
            rows.append(
                [workload.title, _num(plain), _num(metered), _num(value), f"{result.scrapes:,}"]
            )
        out += _table(
            [
                "workload",
                f"none {MICRO}s/request",
                f"--metrics {MICRO}s/request",
                "metrics / none",
                "scrapes",
            ],
            rows,
        )
        out += [
            "",
            "With `--metrics` the harness scrapes `/metrics` once a second while the load runs "
            "(Prometheus' default is every 15 s); the scrapes are in the server's CPU time. "
            "Both servers count connections, bytes and datagrams as they go, for the closing "
            "summary, so this is the cost of serving the metrics, not of counting.",
        ]

    out += ["", "## Problems", ""]
    problems = [
        f"- **{titles[r.server]} / {r.workload}**: {problem}"
        for r in results
        for problem in r.problems
    ]
    notes = [f"- {titles[r.server]} / {r.workload}: {r.note}" for r in results if r.note]
    out += problems or ["None: every reply matched byte for byte, and no errors."]
    if notes:
        out += ["", "Notes:", "", *notes]
    return "\n".join(out) + "\n"


def _scale_out(found: dict[tuple[str, str], Result], load: Sequence[Workload]) -> list[str]:
    """Ours behind nginx and with --workers 2, against ours alone."""
    out = ["", "## Scaling out: through nginx, and with `--workers 2`", ""]
    rows = []
    for workload in load:
        direct = found.get((OURS, workload.name))
        nginx = found.get((OURS_NGINX, workload.name))
        workers = found.get((OURS_WORKERS, workload.name))
        if direct is None or (nginx is None and workers is None):
            continue
        if all(r is None or r.status == "n/a" for r in (nginx, workers)):
            continue
        row = [
            workload.title,
            _cell(direct, _num(direct.cpu_us_per_request)),
            _cell(direct, f"{direct.requests_per_s:,.0f}" if direct.measured else ""),
            _cell(direct, _num(direct.latency_us.get("p50"))),
        ]
        for other in (nginx, workers):
            if other is None or not other.measured:
                row += [_cell(other, "") if other else "-"] + [""] * (2 if other is nginx else 1)
                continue
            cpu = other.cpu_us_per_request
            total = _num(cpu)
            if other is nginx and other.front_cpu_us_per_request is not None and cpu:
                total += f" ({_num(cpu - other.front_cpu_us_per_request)} + "
                total += f"{_num(other.front_cpu_us_per_request)})"
            row += [_cell(other, total), f"{other.requests_per_s:,.0f}"]
            if other is nginx:
                row.append(_num(other.latency_us.get("p50")))
        rows.append(row)
    out += _table(
        [
            "workload",
            f"ours {MICRO}s/request",
            "requests/s",
            f"p50 {MICRO}s",
            f"via nginx {MICRO}s/request (ours + nginx)",
            "requests/s",
            f"p50 {MICRO}s",
            f"`--workers 2` {MICRO}s/request",
            "requests/s",
        ],
        rows,
    )
    out += [
        "",
        "Via nginx: ours with `--proxy-protocol` behind nginx's stream proxy (the settings "
        "of [contrib/nginx](../contrib/nginx/trio-upper.conf), one instance, one nginx "
        "worker), both pinned to the server's CPU: the figure is both processes' CPU per "
        "request, split in brackets, and what the proxy hop costs is the difference from "
        "ours alone. `--workers 2`: the parent and its two workers, pinned to the same one "
        "CPU, so this shows what a request costs with workers, not what a second core "
        "would add: with one core for the server and one for the load generator, this "
        "machine cannot show that.",
    ]
    return out


def _chart(
    path: Path,
    results: Sequence[Result],
    workloads: Sequence[Workload],
    titles: dict[str, str],
    servers: Sequence[str],
) -> None:
    # Imported here: matplotlib is optional (the bench extra), and the smoke
    # test runs without it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = _index(results)
    panels = list(workloads)
    count = len(panels) + 1
    columns = 4
    rows = (count + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    # One panel per workload, then one for the targets, then blanks.
    for ax, workload in zip(flat, panels, strict=False):
        names: list[str] = []
        values: list[float] = []
        colours: list[str] = []
        for server in servers:
            result = found.get((server, workload.name))
            if result is None or not result.measured or server in SCALE_OUT:
                continue
            value = (
                result.kib_per_connection if workload.mode == "idle" else result.cpu_us_per_request
            )
            if value is None:
                continue
            names.append(titles[server])
            values.append(value)
            colours.append(
                "tab:orange"
                if server == OURS
                else "navajowhite"
                if server in VARIANTS
                else "tab:blue"
            )
        ax.barh(names, values, color=colours)
        ax.invert_yaxis()
        ax.margins(x=0.18)  # room for the figures printed past each bar
        ax.set_title(workload.title, fontsize=10)
        ax.set_xlabel("KiB per connection" if workload.mode == "idle" else f"CPU {MICRO}s/request")
        ax.tick_params(labelsize=8)
        for y, value in enumerate(values):
            ax.annotate(
                _num(value),
                (value, y),
                fontsize=7,
                va="center",
                xytext=(2, 0),
                textcoords="offset points",
            )
    ax = flat[len(panels)]
    labels: list[str] = []
    scores: list[float] = []
    met_colours: list[str] = []
    for target in TARGETS:
        value, met = evaluate(target, results)
        if value is None or met is None:
            continue
        # One scale for every target: how far past its bound the figure is,
        # above 1 when met whichever way the bound points.
        score = value / target.bound if target.kind == "ratio" else target.bound / value
        labels.append(_short(target))
        scores.append(score)
        met_colours.append("tab:green" if met else "tab:red")
    ax.barh(labels, scores, color=met_colours)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_title("Targets (figure / bound; >= 1 is met)", fontsize=10)
    ax.tick_params(labelsize=7)
    for extra in flat[len(panels) + 1 :]:
        extra.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _short(target: Target) -> str:
    if target.kind == "idle":
        return "idle KiB"
    if target.kind == "utf8":
        return "utf8/ascii"
    if target.kind == "metrics":
        return f"{target.workload} metrics/none"
    prefix = "(s) " if target.stretch else ""
    return f"{prefix}{target.workload} vs {target.other}"


def write_report(
    output: Path,
    info: RunInfo,
    results: Sequence[Result],
    workloads: Sequence[Workload],
    titles: dict[str, str],
    servers: Sequence[str],
    *,
    chart: bool,
) -> list[str]:
    """Write RESULTS.md, results.json and (if ``chart``) results.png into
    ``output``; return notes on anything left out, which RESULTS.md has too."""
    output.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    if chart:
        try:
            _chart(output / "results.png", results, workloads, titles, servers)
        except ImportError:
            notes.append("chart skipped: matplotlib is not installed (pip install -e '.[bench]')")
    info.notes.extend(notes)
    raw = {
        "run": dataclasses.asdict(info),
        "results": [dataclasses.asdict(r) for r in results],
        "targets": [
            {
                "target": target.describe(titles),
                "workload": target.workload,
                "other": target.other,
                "kind": target.kind,
                "bound": target.bound,
                "stretch": target.stretch,
                "measured": value,
                "met": met,
            }
            for target in TARGETS
            for value, met in [evaluate(target, results)]
        ],
    }
    (output / "results.json").write_text(json.dumps(raw, indent=2) + "\n")
    (output / "RESULTS.md").write_text(_markdown(info, results, workloads, titles, servers))
    return notes
