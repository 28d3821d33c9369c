"""The benchmark harness's own parts, on tiny inputs: the chain builder (judged by
qemu-img), the raw QMP client and one measured run against a real qemu-storage-daemon
(skipped when none is installed), one start-up round against it and against the installed
blockd, figure 9's commit runs against both, and the rule that unavailable figures are
never filled in. Nothing here asserts a speed."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from kit.qemu import qemu_img, qemu_img_json
from kit.repo import ROOT, load_package

load_package("benchmarks")  # not an installed package

from benchmarks import commit, figures, report, run, startup  # noqa: E402
from benchmarks.chains import MiB, build_chain, clone_chain  # noqa: E402
from benchmarks.daemons import (  # noqa: E402
    Daemon,
    DaemonSpec,
    blockd_spec,
    default_reference,
    reference_spec,
)
from benchmarks.qmp_client import QMPError  # noqa: E402

SIZE = 4 * MiB
#: two daemons that never run: for the report's tests
SPECS = [DaemonSpec("reference", "ref", ("x",)), DaemonSpec("blockd", "blockd", ("y",))]


def allocated(image: Path) -> list[tuple[int, int]]:
    """(start, length) of the data extents of ``image``'s own layer."""
    return [
        (e["start"], e["length"])
        for e in qemu_img_json("map", "-f", "qcow2", image)
        if e["data"] and e["depth"] == 0
    ]


@pytest.mark.parametrize("method", ["random", "pattern"])
def test_chain_layout(tmp_path: Path, method: str) -> None:
    chain = build_chain(tmp_path / "c", SIZE, method=method)
    info = qemu_img_json("info", "--backing-chain", "-f", "qcow2", str(chain.top))
    assert [i["filename"] for i in info] == [str(chain.top), str(chain.mid), str(chain.base)]
    assert {i["virtual-size"] for i in info} == {SIZE}
    for image in chain.files():
        qemu_img("check", "-q", image)
    base_map = qemu_img_json("map", "-f", "qcow2", str(chain.base))
    assert all(e["data"] and not e["zero"] for e in base_map)  # every cluster written
    assert sum(n for _, n in allocated(chain.mid)) == SIZE // 2  # half, in 1 MiB extents
    assert all(s % MiB == 0 and n % MiB == 0 for s, n in allocated(chain.mid))
    top_bytes = sum(n for _, n in allocated(chain.top))
    assert 0 < top_bytes < SIZE // 2
    assert chain.copy_full == SIZE - top_bytes
    assert 0 < chain.copy_to_base <= SIZE // 2
    assert chain.commit_mid == SIZE // 2  # all mid stores
    assert chain.commit_active == chain.copy_to_base + top_bytes  # all top or mid store


def test_chain_is_reproducible_and_clonable(tmp_path: Path) -> None:
    a = build_chain(tmp_path / "a", SIZE, seed=5)
    b = build_chain(tmp_path / "b", SIZE, seed=5)
    assert allocated(a.mid) == allocated(b.mid)
    cmp = ["compare", "-q", "-f", "qcow2", "-F", "qcow2"]
    qemu_img(*cmp, a.top, b.top)
    clone = clone_chain(a, tmp_path / "clone")
    info = qemu_img_json("info", "--backing-chain", "-f", "qcow2", str(clone.top))
    assert [i["filename"] for i in info] == [str(clone.top), str(clone.mid), str(clone.base)]
    qemu_img(*cmp, clone.top, a.top)
    fresh = a.fresh_top(tmp_path / "fresh.qcow2")
    qemu_img(*cmp, fresh, a.top)


def test_build_chain_rejects_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build_chain(tmp_path, MiB + 512)


REFERENCE = default_reference()
needs_qsd = pytest.mark.skipif(not REFERENCE.exists(), reason="no qemu-storage-daemon here")


@pytest.fixture
def qsd() -> DaemonSpec:
    return reference_spec(REFERENCE)


@needs_qsd
def test_qmp_client_drives_a_stream(qsd: DaemonSpec, tmp_path: Path, sock_dir: Path) -> None:
    chain = build_chain(tmp_path / "c", SIZE)
    top = chain.fresh_top(tmp_path / "top.qcow2")
    with Daemon(qsd, sock_dir) as d:
        with d.connect(0) as c:
            assert "block-stream" in {x["name"] for x in c.execute("query-commands")}
            with pytest.raises(QMPError) as err:
                c.execute("no-such-command")
            assert err.value.error_class == "CommandNotFound"
            figures.open_chain(c, "", chain.base, chain.mid, top)
            c.execute("block-stream", {"job-id": "j", "device": "top"})
            ev = c.wait_event("BLOCK_JOB_COMPLETED", device="j", timeout=60)
            assert ev["data"]["offset"] == ev["data"]["len"] == SIZE
            assert "error" not in ev["data"]
            assert c.execute("query-block-jobs") == []
            figures.close_chain(c, "")
        clients = [d.connect(i) for i in range(len(d.sockets))]  # one per monitor, at once
        try:
            for c in clients:
                assert c.execute("query-block-jobs") == []
        finally:
            for c in clients:
                c.close()
    figures.verify_image(top, chain.top, None)


@needs_qsd
def test_roundtrip_returns_the_raw_reply(qsd: DaemonSpec, sock_dir: Path) -> None:
    with Daemon(qsd, sock_dir) as d, d.connect() as c:
        reply = c.roundtrip(b'{"execute": "query-block-jobs", "id": "x"}', "x")
        assert reply == {"return": [], "id": "x"}
        assert isinstance(c.greeting["QMP"]["version"], dict)


@needs_qsd
def test_measured_runs_on_a_tiny_chain(qsd: DaemonSpec, tmp_path: Path) -> None:
    chain = build_chain(tmp_path / "c", SIZE)
    rec = figures.stream_run(qsd, tmp_path, chain, base_node=True, verify=True)
    assert rec["copied_bytes"] == chain.copy_to_base and rec["verified"]
    assert rec["peak_rss_mib"] > 0 and rec["seconds"] > 0
    q = figures.qmp_run(qsd, tmp_path, sequential=20, per_client=5)
    assert q["seq_commands"] == 20 and q["conc_commands"] == 50
    assert q["seq_p99_us"] >= q["seq_median_us"] > 0


@needs_qsd
@pytest.mark.parametrize("active", [False, True], ids=["non-active", "active"])
def test_commit_runs_on_a_tiny_chain(qsd: DaemonSpec, tmp_path: Path, active: bool) -> None:
    """Each daemon commits (and the first repetition's checks pass); a rate run samples
    the job's progress until it is done (ready, for an active commit)."""
    chain = build_chain(tmp_path / "c", SIZE)
    for spec in (qsd, blockd_spec(None, ROOT)):
        rec = commit.commit_run(spec, tmp_path, chain, active=active, verify=True)
        copied = chain.commit_active if active else chain.commit_mid
        assert rec["copied_bytes"] == copied and rec["verified"]
        assert 0 < rec["seconds"] <= rec["completed_seconds"] <= rec["stable_seconds"]
    spec = blockd_spec(None, ROOT) if active else qsd
    speed = 8 * MiB  # half a second for the 4 MiB base
    rate = commit.commit_rate_run(
        spec, tmp_path, chain, active=active, speed=speed, poll=0.02, verify=True
    )
    assert rate["samples"] >= 5 and rate["requested_bps"] == speed
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # every run cleaned up after itself


def test_commit_run_fails_on_a_wrong_guest_view(qsd: DaemonSpec, tmp_path: Path) -> None:
    """A committed base that does not read as the chain did gets FAILED, not a figure."""
    chain = build_chain(tmp_path / "c", SIZE)
    with pytest.raises(figures.RunFailed, match="differs"):
        commit._verify(chain.base, chain.top, chain.top, active=True)


def test_commit_figures_plan_rows_and_summary() -> None:
    quick = run.make_plan(run.parse_args(["--quick"]))
    full = run.make_plan(run.parse_args([]))
    assert 9 in quick.figures and 9 in full.figures
    assert (quick.commit_size, quick.active_size) == (64 * MiB, 64 * MiB)
    assert (full.commit_size, full.active_size) == (512 * MiB, 1024 * MiB)
    plan = run.make_plan(run.parse_args(["--quick", "--figures", "9"]))
    names = ["commit", "active", "commit_rate", "active_rate"]
    tests = [run.Test(n, 9, commit.RATE_CMDS) for n in names]

    def job(mibps: float) -> dict[str, float]:
        return {"virtual_mibps": mibps, "seconds": 64 / mibps, "ratio": mibps / 1000}

    out = {
        "commit": {
            "reference": run.Outcome(runs=[job(1000.0), job(1200.0)]),
            "blockd": run.Outcome(runs=[job(1650.0), job(1650.0)]),
        },
        "active": {
            "reference": run.Outcome(runs=[job(2000.0)]),
            "blockd": run.Outcome(failure="job bench failed: Input/output error"),
        },
        "commit_rate": {"blockd": run.Outcome(runs=[{"ratio": 0.99}, {"ratio": 0.996}])},
        "active_rate": {"blockd": run.Outcome(unavailable="lacks job-complete")},
    }
    lines, _ = report.render(plan, report.rows_for(plan, tests), out, SPECS)
    rows = {ln[4:48].strip(): ln[48:].split() for ln in lines if ln.startswith("9 ")}
    assert rows["commit 64 MiB mid->base: virtual MiB/s"] == ["1100", "1650", "1.50x", ">=", "1.5x"]
    assert rows["active commit 64 MiB to ready: virtual MiB/s"][:3] == ["2000", "FAILED", "-"]
    assert rows["commit rate 64 MiB/s: achieved/requested"][:2] == ["-", "0.993"]
    line = report.summary(plan, out, SPECS)
    assert ", commit 1.50x, active n/a, commit rate 0.993/n/a" in line
    assert "reference alone:" in line and "commit 1100 MiB/s, active 2000 MiB/s" in line


def test_unavailable_blockd_gets_no_numbers(tmp_path: Path) -> None:
    plan = run.make_plan(run.parse_args(["--quick"]))
    ref_run = {"virtual_mibps": 1000.0, "copied_mibps": 900.0, "seconds": 0.1}
    out = {
        "full": {
            "reference": run.Outcome(runs=[ref_run, ref_run]),
            "blockd": run.Outcome(unavailable="lacks block-stream"),
        }
    }
    tests = [run.Test("full", 1, run.STREAM_CMDS)]
    lines, table = report.render(plan, report.rows_for(plan, tests), out, SPECS)
    assert table[0]["reference"] == 1000.0 and table[0]["blockd"] is None
    assert table[0]["ratio"] is None
    assert any("lacks block-stream" in ln for ln in lines)
    line = report.summary(plan, out, SPECS)
    assert line.startswith("summary: stream n/a,")
    assert "unavailable: lacks block-stream" in line and "stream 1000 MiB/s" in line


def test_concurrent_rows_show_the_durable_ceiling_and_the_bound(tmp_path: Path) -> None:
    plan = run.make_plan(run.parse_args(["--quick"]))

    def conc(mibps: float) -> dict[str, float]:
        return {"aggregate_virtual_mibps": mibps, "seconds": 1024 / mibps}

    out = {
        "concurrent": {
            "reference": run.Outcome(runs=[conc(1000.0), conc(1200.0)]),
            "blockd": run.Outcome(runs=[conc(1400.0), conc(1500.0)]),
        },
        "durable": {"host": run.Outcome(runs=[{"virtual_mibps": 1650.0}])},
    }
    tests = [run.Test("concurrent", 5, run.STREAM_CMDS), run.Test("durable", 5)]
    lines, _ = report.render(plan, report.rows_for(plan, tests), out, SPECS)
    fig5 = [ln.split() for ln in lines if ln.startswith("5 ")]
    ceiling = next(f for f in fig5 if "(ceiling):" in f)
    assert ceiling[-2:] == ["1650", "(host)"]
    share = next(f for f in fig5 if f[1:4] == ["concurrent", "streams", "/"])
    assert share[-2:] == ["0.67", "0.88"]  # medians 1100 and 1450 against 1650
    bound = next(f for f in fig5 if "durable" in f and "reach" in f)
    assert bound[-1] == "1.50x"  # 1650 / 1100: what a stream durable at completion can reach
    assert "16x 1.32x (durable bound 1.50x)," in report.summary(plan, out, SPECS)


def limiter_staircase(window: float, phase: float, burst: float) -> list[tuple[float, float]]:
    """Offsets of an ideal 64 MiB/s limiter with 100 ms slices (a quota copied in ``burst``
    seconds at each slice start), polled every 20 ms from 0.1 s + ``phase``."""
    speed, slice_ = 64 * MiB, 0.1
    samples = []
    t = 0.1 + phase
    while t < 0.1 + window:
        k = int(t / slice_)
        part = min(1.0, (t - k * slice_) / burst) if burst else 1.0
        samples.append((t, (k + part) * speed * slice_))
        t += 0.02
    return samples


@pytest.mark.parametrize(("window", "bound"), [(0.9, 0.015), (3.6, 0.002)])
def test_rate_estimator_error_on_an_ideal_limiter(window: float, bound: float) -> None:
    errors = [
        abs(figures._slope(limiter_staircase(window, ph / 1000, burst)) / (64 * MiB) - 1)
        for ph in range(0, 20, 2)
        for burst in (0.0, 0.005, 0.05)
    ]
    assert max(errors) < bound


# -- figure 8: start-up -----------------------------------------------------------------------


def importtime_line(self_us: int, cumulative: int, level: int, name: str) -> str:
    return f"import time: {self_us:9d} | {cumulative:10d} | {' ' * (2 * level)}{name}"


def test_import_breakdown_counts_the_commands_imports_by_package() -> None:
    report_text = "\n".join(
        [
            "import time: self [us] | cumulative | imported package",
            importtime_line(500, 500, 0, "site"),  # the interpreter's own: left out
            importtime_line(40, 40, 0, "blockd"),
            importtime_line(30, 30, 2, "trio._core"),
            importtime_line(10, 40, 1, "trio"),
            importtime_line(15, 15, 2, "jsonschema._format"),
            importtime_line(5, 20, 1, "jsonschema"),
            importtime_line(8, 8, 2, "trio._extra"),  # entered again from blockd.qmp
            importtime_line(12, 20, 1, "blockd.qmp"),
            importtime_line(20, 100, 0, "blockd.run"),
        ]
    )
    total, packages = startup.import_breakdown(report_text)
    assert total == 140
    assert packages == {"blockd": (140, 72), "trio": (48, 48), "jsonschema": (20, 20)}
    assert sum(own for _, own in packages.values()) == total


def test_startup_tests_run_in_alternating_rounds(tmp_path: Path) -> None:
    plan = run.make_plan(run.parse_args(["--quick", "--figures", "8"]))
    assert plan.startup_rounds >= 5 and plan.reps == 2
    assert 8 in run.make_plan(run.parse_args(["--quick"])).figures
    assert 8 in run.make_plan(run.parse_args([])).figures
    tests = run.build_tests(plan, tmp_path, "qemu-img")
    assert [(t.name, t.rounds, t.only) for t in tests] == [
        ("startup", plan.startup_rounds, None),
        ("startup_floor", plan.startup_rounds, "blockd"),
    ]
    calls: list[tuple[str, str]] = []

    def fake(name: str) -> run.DaemonRun:
        def one(spec: DaemonSpec, verify: bool) -> figures.Record:
            calls.append((name, spec.key))
            if name == "startup" and spec.key == "blockd" and len(calls) == 6:
                raise figures.RunFailed("third round failed")
            return {"blockdev_add_seconds": 0.1}

        return one

    fakes = [
        run.Test("startup", 8, startup.STARTUP_CMDS, fake("startup"), rounds=5),
        run.Test("startup_floor", 8, daemon_run=fake("floor"), rounds=5, only="blockd"),
    ]
    cmds = dict.fromkeys(("reference", "blockd"), startup.STARTUP_CMDS)
    out = run.measure(plan, fakes, SPECS, cmds, {})
    first_rep = [("startup", k) for k in ("reference", "blockd")] * 2 + [("startup", "reference")]
    assert calls[:5] == first_rep  # A B A B ...: blockd's third round failed
    assert calls.count(("startup", "reference")) == 10  # 5 rounds x 2 repetitions
    assert calls.count(("startup", "blockd")) == 3  # a failed test is not retried
    assert calls.count(("floor", "blockd")) == 10 and ("floor", "reference") not in calls
    assert out["startup"]["blockd"].failure == "third round failed"
    assert len(out["startup"]["blockd"].runs) == 2
    assert set(out["startup_floor"]) == {"blockd"}


@needs_qsd
def test_startup_round_against_each_daemon(qsd: DaemonSpec, tmp_path: Path) -> None:
    blockctl = startup.find_blockctl()
    assert blockctl is not None, "blockctl is installed with blockd"
    work = Path(tempfile.mkdtemp(prefix="blockd-"))  # short socket paths
    try:
        for spec in (qsd, blockd_spec(None, ROOT)):
            rec = startup.startup_run(spec, work, qemu_img="qemu-img", blockctl=blockctl)
            assert set(rec) == {
                "accept_seconds",
                "blockdev_add_seconds",
                "blockctl_seconds",
                "idle_rss_mib",
                "open_rss_mib",
            }
            assert 0 < rec["accept_seconds"] < rec["blockdev_add_seconds"]
            assert rec["blockctl_seconds"] > 0
            assert rec["idle_rss_mib"] > 0 and rec["open_rss_mib"] > 0
        assert list(work.iterdir()) == []  # every run cleaned up after itself
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_startup_run_fails_rather_than_guess(tmp_path: Path) -> None:
    dead = DaemonSpec("blockd", "exits at once", ("false",))
    with pytest.raises(figures.RunFailed, match="exited with status 1"):
        startup.startup_run(dead, tmp_path, qemu_img="qemu-img", blockctl="blockctl")
    with pytest.raises(figures.RunFailed, match="no blockctl"):
        startup.startup_run(dead, tmp_path, qemu_img="qemu-img", blockctl=None)


def test_floor_run_splits_import_blockd_run(tmp_path: Path) -> None:
    rec = startup.floor_run(tmp_path)
    assert rec["python_seconds"] > 0 and rec["trio_seconds"] > 0
    assert rec["blockd_import_seconds"] > 0
    total = rec["importtime_total_us"]
    assert rec["import_us:blockd"] == total  # blockd.run is what the command imports
    assert 0 < rec["import_self_us:trio"] <= rec["import_us:trio"] < total
    assert "import_us:site" not in rec  # the interpreter's own start-up is not counted
    assert list(tmp_path.iterdir()) == []


def startup_rec(add: float) -> dict[str, float]:
    return {
        "accept_seconds": add / 2,
        "blockdev_add_seconds": add,
        "blockctl_seconds": 0.2,
        "idle_rss_mib": 30.0,
        "open_rss_mib": 34.0,
    }


def floor_rec(scale: int) -> dict[str, float]:
    packages = {f"p{i}": (1000 * i * scale, 100 * i * scale) for i in range(1, 11)}
    rec: dict[str, float] = {"python_seconds": 0.01, "importtime_total_us": 99000.0}
    for name, (cumulative, own) in packages.items():
        rec[f"import_us:{name}"] = cumulative
        rec[f"import_self_us:{name}"] = own
    return rec


def figure_8() -> tuple[run.Plan, list[run.Test]]:
    """A quick plan of figure 8 and its two tests, for the report's tests."""
    plan = run.make_plan(run.parse_args(["--quick", "--figures", "8"]))
    tests = [
        run.Test("startup", 8, startup.STARTUP_CMDS),
        run.Test("startup_floor", 8, only="blockd"),
    ]
    return plan, tests


def test_startup_rows_targets_floor_and_summary() -> None:
    plan, tests = figure_8()
    out = {
        "startup": {
            "reference": run.Outcome(runs=[startup_rec(0.007), startup_rec(0.009)]),
            "blockd": run.Outcome(runs=[startup_rec(0.2), startup_rec(0.3), startup_rec(0.4)]),
        },
        "startup_floor": {"blockd": run.Outcome(runs=[floor_rec(1), floor_rec(3)])},
    }
    lines, table = report.render(plan, report.rows_for(plan, tests), out, SPECS)
    rows = {ln[4:48].strip(): ln[48:].split() for ln in lines if ln.startswith("8 ")}
    add = rows["start-up: exec to blockdev-add reply, s"]
    assert add == ["0.008", "0.300", "37.50x", "<=", "0.15", "s"]
    assert rows["blockctl jobs: exec to exit, s"][-3:] == ["<=", "0.15", "s"]
    assert rows["idle RSS (no node, no client): MiB"][-3:] == ["<=", "25", "MiB"]
    assert rows["floor: python -c pass, s"] == ["-", "0.010", "-"]
    listed = [label.split()[0] for label in rows if label.startswith("p")]
    assert listed == [f"p{i}" for i in range(10, 10 - report.TOP_IMPORTS, -1)]  # biggest first
    assert rows["p10 (self 2000 us)"] == ["-", "20000", "-"]  # medians of 1x and 3x
    floor = next(r for r in table if r["measure"] == "floor: python -c pass, s")
    assert floor["blockd"] == 0.01 and floor["reference"] is None and floor["ratio"] is None
    line = report.summary(plan, out, SPECS)
    assert line.endswith(", startup 0.300 s, blockctl 0.200 s, idle rss 30 MiB")


def test_unavailable_startup_gets_no_numbers() -> None:
    plan, tests = figure_8()
    out = {
        "startup": {
            "reference": run.Outcome(runs=[startup_rec(0.007)]),
            "blockd": run.Outcome(unavailable="did not start: boom"),
        },
        "startup_floor": {"blockd": run.Outcome(unavailable="did not start: boom")},
    }
    lines, table = report.render(plan, report.rows_for(plan, tests), out, SPECS)
    assert all(r["blockd"] is None and r["ratio"] is None for r in table)
    assert not [ln for ln in lines if ln.startswith("8 ") and "(self" in ln]
    line = report.summary(plan, out, SPECS)
    assert "startup n/a, blockctl n/a, idle rss n/a" in line
    assert "reference alone: startup 0.007 s, blockctl 0.200 s, idle rss 30 MiB" in line
