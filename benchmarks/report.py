"""The benchmark's report: the table rows for the planned tests, the table of medians
with both daemons' figures and their ratios (and the host ceilings each daemon is put
against), and the one-line summary printed last. Pure functions of the outcomes
:mod:`benchmarks.run` collected; nothing here measures.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from benchmarks.chains import GiB, MiB
from benchmarks.daemons import DaemonSpec
from benchmarks.startup import IMPORT_CUMULATIVE, IMPORT_SELF

if TYPE_CHECKING:
    from benchmarks.figures import Record
    from benchmarks.run import Outcome, Plan, Test


@dataclass(frozen=True)
class Row:
    fig: str
    label: str
    test: str
    key: str
    fmt: str
    target: str = ""


def rows_for(plan: Plan, tests: Sequence[Test]) -> list[Row]:
    """The table rows for the tests that were planned, in figure order."""
    names = {t.name for t in tests}
    s = f"{plan.size // MiB} MiB"
    r: list[Row] = []
    if "full" in names and 1 in plan.figures:
        r += [
            Row(
                "1",
                f"full stream {s}: MiB/s of virtual size",
                "full",
                "virtual_mibps",
                ".0f",
                ">= 1.5x",
            ),
            Row(
                "1",
                f"full stream {s}: MiB/s of bytes copied",
                "full",
                "copied_mibps",
                ".0f",
                ">= 1.5x",
            ),
            Row("1", f"full stream {s}: seconds", "full", "seconds", ".3f"),
            Row(
                "1",
                "  ... until closed (data on disk): MiB/s",
                "full",
                "stable_virtual_mibps",
                ".0f",
            ),
        ]
    if "to_base" in names:
        r += [
            Row("1", "base-node=base: MiB/s of virtual size", "to_base", "virtual_mibps", ".0f"),
            Row("1", "base-node=base: MiB/s of bytes copied", "to_base", "copied_mibps", ".0f"),
        ]
    if "convert" in names:
        r += [
            Row("2", "qemu-img convert of the chain: MiB/s", "convert", "mibps", ".0f"),
            Row("2", "sequential read+write (ceiling): MiB/s", "copy", "readwrite_mibps", ".0f"),
            Row("2", "os.copy_file_range: MiB/s", "copy", "copy_file_range_mibps", ".0f"),
        ]
    if "rate" in names:
        r += [
            Row(
                "3",
                f"rate {plan.speed // MiB} MiB/s: achieved/requested",
                "rate",
                "ratio",
                ".3f",
                "0.98-1.02",
            ),
            Row("3", "rate: whole-job average/requested", "rate", "job_average_ratio", ".3f"),
        ]
    if "qmp" in names:
        r += [
            Row(
                "4",
                f"QMP 1 client x{plan.qmp_sequential}: median us",
                "qmp",
                "seq_median_us",
                ".0f",
                "<= 1.0x",
            ),
            Row("4", "QMP 1 client: p99 us", "qmp", "seq_p99_us", ".0f"),
            Row("4", "QMP 1 client: commands/s", "qmp", "seq_cmds_per_s", ".0f"),
            Row("4", "QMP 1 client: daemon CPU us per command", "qmp", "seq_cpu_us_per_cmd", ".0f"),
            Row(
                "4",
                f"QMP 10 clients x{plan.qmp_per_client}: commands/s",
                "qmp",
                "conc_cmds_per_s",
                ".0f",
            ),
            Row("4", "QMP 10 clients: median us", "qmp", "conc_median_us", ".0f"),
            Row("4", "QMP 10 clients: p99 us", "qmp", "conc_p99_us", ".0f"),
        ]
    if "concurrent" in names:
        n = f"{plan.streams}x{plan.stream_size // MiB} MiB"
        r += [
            Row("5", f"{n} concurrent: wall seconds", "concurrent", "seconds", ".3f"),
            Row(
                "5",
                f"{n}: aggregate MiB/s (virtual)",
                "concurrent",
                "aggregate_virtual_mibps",
                ".0f",
                ">= 1.5x",
            ),
            Row(
                "5",
                "  ... until closed (data on disk): MiB/s",
                "concurrent",
                "stable_virtual_mibps",
                ".0f",
            ),
            Row(
                "5",
                "durable copy, same bytes (ceiling): MiB/s",
                "durable",
                "virtual_mibps",
                ".0f",
            ),
        ]
    if "full" in names:
        r += [
            Row("6", "peak RSS during 1 (full stream): MiB", "full", "peak_rss_mib", ".1f"),
            Row("6", "CPU seconds during 1", "full", "cpu_seconds", ".2f"),
            Row("6", "RSS with the chain open, before 1: MiB", "full", "open_rss_mib", ".1f"),
            Row("6", "start-up: spawn to sockets bound, s", "full", "startup_seconds", ".3f"),
        ]
    if "concurrent" in names:
        r += [
            Row(
                "6",
                "peak RSS during 5 (16 streams): MiB",
                "concurrent",
                "peak_rss_mib",
                ".1f",
                "<= 40 MiB",
            ),
            Row("6", "CPU seconds during 5", "concurrent", "cpu_seconds", ".2f"),
        ]
    for size in sorted(set(plan.scale_sizes)):
        name = "full" if size == plan.size and 1 in plan.figures else f"scale_{size // MiB}"
        if name in names:
            label = f"{size // GiB} GiB" if size >= GiB else f"{size // MiB} MiB"
            r.append(Row("7", f"scale {label}: seconds", name, "seconds", ".2f"))
            r.append(
                Row(
                    "7",
                    f"scale {label}: MiB/s of virtual size",
                    name,
                    "virtual_mibps",
                    ".0f",
                    "flat",
                )
            )
    if "startup" in names:
        r += [
            Row("8", "start-up: exec to accepting socket, s", "startup", "accept_seconds", ".3f"),
            Row(
                "8",
                "start-up: exec to blockdev-add reply, s",
                "startup",
                "blockdev_add_seconds",
                ".3f",
                "<= 0.15 s",
            ),
            Row(
                "8",
                "blockctl jobs: exec to exit, s",
                "startup",
                "blockctl_seconds",
                ".3f",
                "<= 0.15 s",
            ),
            Row(
                "8",
                "idle RSS (no node, no client): MiB",
                "startup",
                "idle_rss_mib",
                ".1f",
                "<= 25 MiB",
            ),
            Row("8", "RSS after the blockdev-add: MiB", "startup", "open_rss_mib", ".1f"),
        ]
    if "startup_floor" in names:
        f = "startup_floor"
        r += [
            Row("8", "floor: python -c pass, s", f, "python_seconds", ".3f"),
            Row("8", "floor: python -c 'import trio', s", f, "trio_seconds", ".3f"),
            Row("8", "floor: python -c 'import blockd.run', s", f, "blockd_import_seconds", ".3f"),
            Row("8", "  under -X importtime: cumulative us", f, "importtime_total_us", ".0f"),
        ]
    return r + _commit_rows(plan, names)


def _commit_rows(plan: Plan, names: set[str]) -> list[Row]:
    """Figure 9's rows (block-commit), for the tests that were planned."""
    r: list[Row] = []
    for test, what in (
        ("commit", f"commit {plan.commit_size // MiB} MiB mid->base"),
        ("active", f"active commit {plan.active_size // MiB} MiB"),
    ):
        if test not in names:
            continue
        until = " to ready" if test == "active" else ""
        r += [
            Row("9", f"{what}{until}: virtual MiB/s", test, "virtual_mibps", ".0f", ">= 1.5x"),
            Row("9", f"{what}{until}: copied MiB/s", test, "copied_mibps", ".0f"),
            Row("9", f"{what}{until}: seconds", test, "seconds", ".3f"),
        ]
        if test == "active":
            label = "  ... then job-complete: s to completed"
            r.append(Row("9", label, test, "completed_seconds", ".3f"))
        label = "  ... until closed (data on disk): MiB/s"
        r.append(Row("9", label, test, "stable_virtual_mibps", ".0f"))
        r.append(Row("9", "  ... CPU seconds during the job", test, "cpu_seconds", ".2f"))
    speed = f"{plan.speed // MiB} MiB/s"
    for test, what in (("commit_rate", "commit"), ("active_rate", "active commit")):
        if test in names:
            label = f"{what} rate {speed}: achieved/requested"
            r.append(Row("9", label, test, "ratio", ".3f", "0.98-1.02"))
    return r


#: how many top-level packages the floor of figure 8 lists
TOP_IMPORTS = 8


def _with_import_rows(
    rows: Sequence[Row], out: dict[str, dict[str, Outcome]], key: str
) -> list[Row]:
    """``rows`` with, after the ``-X importtime`` total of figure 8, one row for each of
    the ``TOP_IMPORTS`` top-level packages with the highest median cumulative import
    time in daemon ``key``'s floor runs (its median self time in the label): which
    packages those are is known only once measured."""
    at = next((i for i, r in enumerate(rows) if r.key == "importtime_total_us"), None)
    o = None if at is None else out.get(rows[at].test, {}).get(key)
    if at is None or o is None or not o.runs:
        return list(rows)
    names = {
        k.removeprefix(IMPORT_CUMULATIVE)
        for run in o.runs
        for k in run
        if k.startswith(IMPORT_CUMULATIVE)
    }
    cumulative = {n: median_of(o, IMPORT_CUMULATIVE + n) or 0.0 for n in names}
    top = sorted(names, key=lambda n: (-cumulative[n], n))[:TOP_IMPORTS]
    extra = [
        Row(
            "8",
            f"    {n} (self {median_of(o, IMPORT_SELF + n) or 0:.0f} us)",
            rows[at].test,
            IMPORT_CUMULATIVE + n,
            ".0f",
        )
        for n in top
    ]
    return [*rows[: at + 1], *extra, *rows[at + 1 :]]


def median_of(outcome: Outcome | None, key: str) -> float | None:
    if outcome is None or not outcome.runs:
        return None
    vals = [float(r[key]) for r in outcome.runs if key in r]
    return statistics.median(vals) if vals else None


def _cell(o: Outcome | None, key: str, fmt: str) -> str:
    if o is None:
        return "-"
    v = median_of(o, key)
    if v is not None:
        return format(v, fmt)
    if o.unavailable:
        return "n/a"
    if o.failure:
        return "FAILED"
    return "-"


def render(
    plan: Plan,
    rows: Sequence[Row],
    out: dict[str, dict[str, Outcome]],
    daemons: Sequence[DaemonSpec],
) -> tuple[list[str], list[Record]]:
    """The table's lines (medians, ratios blockd/reference, targets, then what could not
    be measured and why) and the same rows as records for the JSON file."""
    ref, bd = daemons[0].key, daemons[1].key
    rows = _with_import_rows(rows, out, bd)
    lines = [
        f"{'fig':3s} {'measure':44s} {'reference':>10s} {'blockd':>10s} {'blockd/ref':>10s}  target"
    ]
    table: list[Record] = []
    for row in rows:
        o = out.get(row.test, {})
        if "host" in o:
            v = median_of(o["host"], row.key)
            cell = "-" if v is None else format(v, row.fmt)
            lines.append(f"{row.fig:3s} {row.label:44s} {cell:>10s} {'(host)':>10s} {'':>10s}")
            table.append({"figure": row.fig, "measure": row.label, "host": v})
            continue
        a, b = median_of(o.get(ref), row.key), median_of(o.get(bd), row.key)
        ratio = f"{b / a:.2f}x" if a and b is not None else "-"
        lines.append(
            f"{row.fig:3s} {row.label:44s} {_cell(o.get(ref), row.key, row.fmt):>10s} "
            f"{_cell(o.get(bd), row.key, row.fmt):>10s} {ratio:>10s}  {row.target}"
        )
        table.append(
            {
                "figure": row.fig,
                "measure": row.label,
                ref: a,
                bd: b,
                "ratio": (b / a if a and b is not None else None),
                "target": row.target,
            }
        )
    for fig, label, (test, key), (host, ceiling_key) in (
        ("2", "full stream / read+write ceiling", ("full", "virtual_mibps"),
         ("copy", "readwrite_mibps")),
        ("5", "concurrent streams / durable ceiling", ("concurrent", "aggregate_virtual_mibps"),
         ("durable", "virtual_mibps")),
    ):  # fmt: skip
        ceiling = median_of(out.get(host, {}).get("host"), ceiling_key)
        if test not in out or not ceiling:
            continue
        ca, cb = (
            f"{v / ceiling:.2f}" if v else "-"
            for v in (median_of(out[test].get(d.key), key) for d in daemons)
        )
        at = max(i for i, ln in enumerate(lines) if ln.startswith(fig + " ")) + 1
        lines.insert(at, f"{fig:3s} {label:44s} {ca:>10s} {cb:>10s}")
        ref_value = median_of(out[test].get(ref), key)
        if fig == "5" and ref_value:
            # blockd's data is on disk at BLOCK_JOB_COMPLETED: no run of it can beat the
            # ceiling, so no ratio of this run can exceed ceiling / reference.
            bound = f"{ceiling / ref_value:.2f}x"
            label = "  highest ratio a durable stream can reach"
            lines.insert(at + 1, f"{fig:3s} {label:44s} {'':>10s} {'':>10s} {bound:>10s}")
    growth = [r for r in rows if r.fig == "7" and r.key == "seconds"]
    if len(growth) >= 2:
        first, last = growth[0], growth[-1]
        sizes = sorted(set(plan.scale_sizes))
        for spec in daemons:
            t_small = median_of(out.get(first.test, {}).get(spec.key), "seconds")
            t_big = median_of(out.get(last.test, {}).get(spec.key), "seconds")
            if t_small and t_big:
                label = f"time/size growth {sizes[0] // MiB}M->{sizes[-1] // MiB}M, {spec.key}"
                growth_factor = t_big / t_small / (sizes[-1] / sizes[0])
                lines.append(f"{'7':3s} {label:44s} {growth_factor:>10.2f}  (1.00 = linear)")
    grouped: dict[tuple[str, str], list[str]] = {}
    for t_name, per in out.items():
        for key, oc in per.items():
            if oc.unavailable:
                grouped.setdefault((key, f"unavailable: {oc.unavailable}"), []).append(t_name)
            elif oc.failure:
                grouped.setdefault((key, f"FAILED: {oc.failure[:400]}"), []).append(t_name)
    if grouped:
        lines += ["", "unavailable or failed:"]
        lines += [f"  {key} {', '.join(names)}: {why}" for (key, why), names in grouped.items()]
    return lines, table


def summary(plan: Plan, out: dict[str, dict[str, Outcome]], daemons: Sequence[DaemonSpec]) -> str:
    """The one-line summary; when blockd's figures are missing it says why and gives the
    reference's own figures instead of ratios. Start-up (figure 8: exec to the first
    blockdev-add reply), blockctl and idle RSS are blockd's own figures, as rate and rss
    are, since their targets are absolute."""
    ref, bd = daemons[0].key, daemons[1].key

    def med(test: str, key: str, who: str) -> float | None:
        return median_of(out.get(test, {}).get(who), key)

    def ratio(test: str, key: str) -> str:
        a, b = med(test, key, ref), med(test, key, bd)
        return f"{b / a:.2f}x" if a and b is not None else "n/a"

    def durable_bound() -> str:
        ceiling = median_of(out.get("durable", {}).get("host"), "virtual_mibps")
        a = med("concurrent", "aggregate_virtual_mibps", ref)
        return f" (durable bound {ceiling / a:.2f}x)" if ceiling and a else ""

    def absolute(name: str, test: str, key: str, fmt: str) -> str:
        value = med(test, key, bd)
        return f"{name} {fmt.format(value)}" if value is not None else f"{name} n/a"

    parts = [
        f"stream {ratio('full', 'virtual_mibps')}",
        absolute("rate", "rate", "ratio", "{:.3f}"),
        f"qmp {ratio('qmp', 'seq_median_us')}",
        f"16x {ratio('concurrent', 'aggregate_virtual_mibps')}{durable_bound()}",
        absolute("rss", "concurrent", "peak_rss_mib", "{:.0f} MiB"),
        absolute("startup", "startup", "blockdev_add_seconds", "{:.3f} s"),
        absolute("blockctl", "startup", "blockctl_seconds", "{:.3f} s"),
        absolute("idle rss", "startup", "idle_rss_mib", "{:.0f} MiB"),
    ]
    if 9 in plan.figures:
        rates = [med(t, "ratio", bd) for t in ("commit_rate", "active_rate")]
        parts += [
            f"commit {ratio('commit', 'virtual_mibps')}",
            f"active {ratio('active', 'virtual_mibps')}",
            "commit rate " + "/".join("n/a" if v is None else f"{v:.3f}" for v in rates),
        ]
    line = "summary: " + ", ".join(parts)
    missing = sorted(
        {
            o.unavailable or o.failure or ""
            for per in out.values()
            for k, o in per.items()
            if k == bd and (o.unavailable or o.failure)
        }
    )
    if missing:
        rv = [
            ("stream", med("full", "virtual_mibps", ref), "{:.0f} MiB/s"),
            ("rate", med("rate", "ratio", ref), "{:.3f}"),
            ("qmp", med("qmp", "seq_median_us", ref), "{:.0f} us"),
            ("16x", med("concurrent", "aggregate_virtual_mibps", ref), "{:.0f} MiB/s"),
            ("rss", med("concurrent", "peak_rss_mib", ref), "{:.0f} MiB"),
            ("startup", med("startup", "blockdev_add_seconds", ref), "{:.3f} s"),
            ("blockctl", med("startup", "blockctl_seconds", ref), "{:.3f} s"),
            ("idle rss", med("startup", "idle_rss_mib", ref), "{:.0f} MiB"),
            ("commit", med("commit", "virtual_mibps", ref), "{:.0f} MiB/s"),
            ("active", med("active", "virtual_mibps", ref), "{:.0f} MiB/s"),
        ]
        shown = ", ".join(f"{n} {f.format(v)}" for n, v, f in rv if v is not None)
        why = missing[0].split(";")[0][:100]
        line += f" (blockd figures unavailable: {why}; reference alone: {shown})"
    return line
