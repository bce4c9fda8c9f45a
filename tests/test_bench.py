"""`fastdiff bench`: the report's arithmetic on hand-made results, and a real --quick run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fastdiff import bench

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def result(group, params, median_s, **extra):
    name = "bench_x[" + "-".join(map(str, params.values())) + "]"
    return dict(group=group, name=name, params=params, param=name[8:-1], extra_info=extra,
                stats=dict(median=median_s))


def test_summary_speedups_and_bandwidth():
    data = {"benchmarks": [
        # the shape is the same in the group, so the label is the impl alone
        result("op 2x4", {"impl": "reference", "shape": [2, 4]}, 4e-3),
        result("op 2x4", {"impl": "diffusers", "shape": [2, 4]}, 2e-3),
        # a CUDA-event time overrides pytest-benchmark's (host) median
        result("op 2x4", {"impl": "fastdiff-cuda", "shape": [2, 4]}, 9.0, gpu_ms=1.0, gbps=750.0,
               fraction_of_copy_bandwidth=0.25, copy_gbps=3000.0),
    ]}
    md = bench.summarize(data)
    row = next(line for line in md.splitlines() if line.startswith("| fastdiff-cuda"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # columns: impl, median, GB/s, of copy BW, vs reference, vs diffusers
    assert cells == ["fastdiff-cuda", "1 ms", "750", "25%", "4.00x", "2.00x"]
    ref = next(line for line in md.splitlines() if line.startswith("| reference"))
    assert [c.strip() for c in ref.strip("|").split("|")][-2:] == ["—", "0.50x"]
    assert "## op 2x4" in md


def test_baselines():
    for label in ("reference", "diffusers", "diffusers-compile", "eager", "sdpa", "k-diffusion"):
        assert bench.is_baseline(label), label
    for label in ("fastdiff-eager", "fastdiff-graph-compile", "cuda", "triton", "cpu"):
        assert not bench.is_baseline(label), label


def test_suite_command_quick_and_filter(tmp_path):
    cmd = bench.suite_command(tmp_path, True, "loop", Path("benchmarks"))
    assert "--benchmark-enable" in cmd and f"--benchmark-json={tmp_path / 'results.json'}" in cmd
    assert cmd[cmd.index("-k") + 1] == "(loop) and (not 128x128)"
    assert "-k" not in bench.suite_command(tmp_path, False, None, Path("benchmarks"))


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "empty").mkdir()
    empty = bench.plot({"benchmarks": []}, tmp_path / "empty")
    assert len(empty) == 1 and empty[0].read_bytes()[:8] == PNG_MAGIC
    data = {"benchmarks": [
        result("step euler 2x4", {"impl": "diffusers"}, 2e-3, ms_per_step=0.1, steps=20),
        result("step euler 2x4", {"impl": "fastdiff-cuda"}, 1e-3, ms_per_step=0.05, steps=20),
        result("lincomb 3->1", {"backend": "cuda"}, 1e-3, gpu_ms=0.01, gbps=2000.0,
               copy_gbps=3000.0, fraction_of_copy_bandwidth=2 / 3),
    ]}
    names = {p.name for p in bench.plot(data, tmp_path)}
    assert names == {"step_time.png", "bandwidth_lincomb.png"}


@pytest.mark.slow
def test_quick_run_writes_report(tmp_path):
    """The real thing, as CI runs it: every benchmark file enabled for a few ms each. The
    Triton-interpreter cases are left out to keep CI fast (they run in the plain benchmark pass)."""
    start = time.perf_counter()
    status = bench.main(["--quick", "--out", str(tmp_path), "--filter", "not triton",
                         "--no-progress", "--timeout", "400"])
    elapsed = time.perf_counter() - start
    log = (tmp_path / "pytest.log").read_text()
    assert status == 0, log[-3000:]
    assert elapsed < 400
    results = json.loads((tmp_path / "results.json").read_text())["benchmarks"]
    names = {r["name"].split("[")[0] for r in results}
    assert {"bench_lincomb", "bench_sampler_step", "bench_loop_digits"} <= names
    loops = [r for r in results if r["name"].startswith("bench_loop_digits")]
    assert all(r["extra_info"]["ms_per_step"] > 0 for r in loops)
    assert not any("128x128" in r["name"] or "triton" in r["name"] for r in results)
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["torch"] and "git" in env and "--quick" in env["command"]
    md = (tmp_path / "summary.md").read_text()
    assert "## loop digits" in md and "vs k-diffusion" in md
    pngs = list(tmp_path.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    assert (tmp_path / "step_time.png").is_file()


def test_plan_scaling_table_and_log_log_plot(tmp_path):
    """bench_plan.py's groups: one table with the least-squares log-log slope per plan and one
    log-log plot; times c * n**p give slope p."""
    data = {"benchmarks": [
        result("plan euler", {"name": "euler", "steps": n}, 2e-4 * n, steps=n, kind="solver")
        for n in (10, 100, 1000)] + [
        result("plan lms", {"name": "lms", "steps": n}, 1e-5 * n ** 1.5, steps=n, kind="solver")
        for n in (10, 100, 1000)] + [
        result("step euler 2x4", {"impl": "diffusers"}, 2e-3, ms_per_step=0.1, steps=20)]}
    rows = {r["name"]: r for r in bench.plan_scaling(bench.rows_by_group(data))}
    assert abs(rows["euler"]["slope"] - 1.0) < 1e-12 and abs(rows["lms"]["slope"] - 1.5) < 1e-12
    md = bench.summarize(data)
    line = next(x for x in md.splitlines() if x.startswith("| lms |"))
    assert [c.strip() for c in line.strip("|").split("|")] == [
        "lms", "solver", "316 us", "10 ms", "316 ms", "1.50"]
    assert "## plan euler" not in md and "Largest slope: 1.50 (lms)" in md
    if pytest.importorskip("matplotlib"):
        names = {p.name for p in bench.plot(data, tmp_path)}
        assert names == {"step_time.png", "plan_scaling.png"}
        assert (tmp_path / "plan_scaling.png").read_bytes()[:8] == PNG_MAGIC
