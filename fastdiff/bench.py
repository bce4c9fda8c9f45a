"""`fastdiff bench`: run the benchmark suite (benchmarks/, pytest-benchmark) and write a report.

    fastdiff bench                       # the full suite, into benchmarks/results/<device>/<date>
    fastdiff bench --quick --out DIR     # CPU smoke run: few rounds, small shapes
    fastdiff bench --filter "loop or step"   # pytest -k

DIR receives: results.json (pytest-benchmark), environment.json (`fastdiff.info.collect()`, GPU
clocks from nvidia-smi, date, command), summary.md (per benchmark group: the median time of each
implementation, its speed-up against each baseline of the group, GB/s and the fraction of the
device-to-device copy bandwidth when measured), pytest.log, and PNG plots (matplotlib, Agg).

pytest runs in a subprocess with this module loaded as a plugin (`-p fastdiff.bench`), whose
hooks drive a tqdm bar on stderr naming the benchmark that runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

# Implementations a group's others are compared against ("fastdiff-*" never is one).
BASELINES = ("reference", "diffusers", "eager", "sdpa", "k-diffusion", "torch")
# --quick: every benchmark enabled, but timed for a few ms only, and the small shapes only.
QUICK_ARGS = ["--benchmark-max-time=0.002", "--benchmark-min-rounds=1", "--benchmark-warmup=off"]
QUICK_DESELECT = "not 128x128"
_PROGRESS_ENV = "FASTDIFF_BENCH_PROGRESS"
PLAN_PREFIX = "plan "  # bench_plan.py's groups: one log-log table and plot, not a table each


# -- running the suite --------------------------------------------------------------------------


def benchmarks_dir() -> Path:
    """benchmarks/ of the fastdiff checkout this package runs from."""
    import fastdiff

    return Path(fastdiff.__file__).resolve().parent.parent / "benchmarks"


def device_slug() -> str:
    import platform

    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"cpu-{platform.machine()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def default_out(quick: bool) -> Path:
    from fastdiff.info import git_revision

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    rev = git_revision()
    name = stamp + (f"-{rev}" if rev else "") + ("-quick" if quick else "")
    return benchmarks_dir() / "results" / device_slug() / name


def suite_command(out: Path, quick: bool, filter: str | None, bench_dir: Path,
                  extra: list[str] | tuple = ()) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", str(bench_dir), "-p", "fastdiff.bench",
           "-p", "no:cacheprovider", "-rfEs", "--benchmark-enable",
           f"--benchmark-json={out / 'results.json'}"]
    expr = " and ".join(f"({e})" for e in (filter, QUICK_DESELECT if quick else None) if e)
    if expr:
        cmd += ["-k", expr]
    return cmd + (QUICK_ARGS if quick else []) + list(extra)


def gpu_clocks() -> list[dict]:
    """Per GPU: clocks, power limit, driver, from nvidia-smi (empty if it is absent)."""
    import shutil

    fields = ["index", "name", "driver_version", "pstate", "clocks.sm", "clocks.mem",
              "clocks.max.sm", "clocks.max.mem", "clocks.applications.graphics",
              "clocks.applications.memory", "power.limit", "temperature.gpu",
              "persistence_mode"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        res = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [line.split(", ") for line in res.stdout.strip().splitlines() if line.strip()]
    return [dict(zip(fields, row)) for row in rows if len(row) == len(fields)]


def environment(argv: list[str], cmd: list[str], quick: bool) -> dict:
    from fastdiff.info import collect

    env = collect()
    env.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               command=" ".join(["fastdiff", "bench", *map(shlex.quote, argv)]),
               pytest_command=" ".join(map(shlex.quote, cmd)), quick=quick,
               nvidia_smi=gpu_clocks())
    return env


def run_suite(cmd: list[str], log: Path, cwd: Path, progress: bool, quick: bool,
              timeout: float | None) -> int:
    """pytest's exit status; its output goes to `log`, the progress bar to our stderr."""
    # (an outer pytest-xdist worker's variables would make the inner run act as a worker)
    env = {k: v for k, v in os.environ.items()
           if k not in (_PROGRESS_ENV, "FASTDIFF_BENCH_QUICK") and not k.startswith("PYTEST_")}
    if progress:
        env[_PROGRESS_ENV] = "1"
    if quick:
        env["FASTDIFF_BENCH_QUICK"] = "1"  # read by the benchmarks (fewer rounds)
    with open(log, "w") as f:
        try:
            return subprocess.run(cmd, cwd=cwd, env=env, stdout=f,
                                  stderr=None if progress else subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\nfastdiff bench: pytest stopped after {timeout} s\n")
            return 124


def bench(out: Path | str | None = None, quick: bool = False, filter: str | None = None,
          progress: bool = True, timeout: float | None = None, pytest_args=(),
          argv: list[str] | None = None) -> tuple[int, dict[str, Path]]:
    """Runs the suite and writes the report: (pytest's exit status, {name: path written})."""
    bench_dir = benchmarks_dir()
    if not bench_dir.is_dir():
        raise FileNotFoundError(f"no benchmarks/ at {bench_dir}: `fastdiff bench` runs from a"
                                " fastdiff source checkout")
    out = (Path(out) if out is not None else default_out(quick)).resolve()  # pytest: cwd=root
    out.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "summary.md", "*.png"):  # a previous run's, never mixed in
        for stale in out.glob(name):
            stale.unlink()
    cmd = suite_command(out, quick, filter, bench_dir, pytest_args)
    paths = {"environment": out / "environment.json", "log": out / "pytest.log"}
    paths["environment"].write_text(json.dumps(environment(argv or [], cmd, quick), indent=2))
    status = run_suite(cmd, paths["log"], bench_dir.parent, progress, quick, timeout)
    results = out / "results.json"
    data = json.loads(results.read_text()) if results.is_file() else {"benchmarks": []}
    if results.is_file():
        paths["results"] = results
    paths["summary"] = out / "summary.md"
    paths["summary"].write_text(summarize(data, status))
    for i, png in enumerate(plot(data, out)):
        paths[f"plot{i}"] = png
    return status, paths


# -- reading the results ------------------------------------------------------------------------


def _fmt_param(v) -> str:
    return "x".join(map(str, v)) if isinstance(v, list) else str(v)


def rows_by_group(data: dict) -> dict[str, list[dict]]:
    """group -> rows {label, seconds, extra}: label = the params that vary within the group."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in data.get("benchmarks", []):
        groups[b.get("group") or b["name"].split("[")[0]].append(b)
    out = {}
    for group, items in groups.items():
        keys = sorted({k for b in items for k in (b.get("params") or {})})
        varying = [k for k in keys
                   if len({_fmt_param((b.get("params") or {}).get(k)) for b in items}) > 1]
        rows = []
        for b in items:
            extra = b.get("extra_info") or {}
            params = b.get("params") or {}
            label = "-".join(_fmt_param(params[k]) for k in varying if k in params) or \
                str(extra.get("impl") or extra.get("backend") or b.get("param") or b["name"])
            # CUDA-event time (L2 flushed) when the benchmark measured it, else pytest-benchmark's
            seconds = extra["gpu_ms"] * 1e-3 if "gpu_ms" in extra else b["stats"]["median"]
            rows.append(dict(label=label, seconds=seconds, extra=extra))
        out[group] = rows
    return out


def is_baseline(label: str) -> bool:
    return not label.startswith("fastdiff") and any(
        label == b or label.startswith((b + "-", b + "+", b + ".")) for b in BASELINES)


def fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def summarize(data: dict, status: int = 0) -> str:
    """The markdown report: one table per benchmark group."""
    lines = ["# fastdiff benchmarks", ""]
    if "datetime" in data:
        lines += [f"Run {data['datetime']} on {data.get('machine_info', {}).get('node', '?')};"
                  " versions, devices and clocks: environment.json.", ""]
    lines += ["Times are medians (CUDA events, cold L2, when on a GPU). Speed-up vs X = time of X"
              " / time of the row (> 1: the row is faster).", ""]
    if status not in (0, None):
        lines += [f"**pytest exited with status {status}: see pytest.log.**", ""]
    groups = rows_by_group(data)
    if not groups:
        lines.append("No benchmark results.")
    scaling = plan_scaling(groups)
    if scaling:
        steps = sorted({n for row in scaling for n in row["times"]})
        lines += ["## plan build time (cold cache) against the step count", "",
                  "Slope: least-squares fit of log(time) on log(steps) (1 = linear).", "",
                  "| plan | kind | " + " | ".join(f"{n} steps" for n in steps) + " | slope |",
                  "|---|---|" + "---:|" * (len(steps) + 1)]
        for row in scaling:
            cells = [fmt_time(row["times"][n]) if n in row["times"] else "" for n in steps]
            slope = f"{row['slope']:.2f}" if row["slope"] is not None else ""
            lines.append(f"| {row['name']} | {row['kind']} | " + " | ".join(cells)
                         + f" | {slope} |")
        worst = max((r for r in scaling if r["slope"] is not None), key=lambda r: r["slope"],
                    default=None)
        if worst is not None:
            lines += ["", f"Largest slope: {worst['slope']:.2f} ({worst['name']})."]
        lines.append("")
    for group, rows in groups.items():
        if group.startswith(PLAN_PREFIX):
            continue
        bases = [r for r in rows if is_baseline(r["label"])]
        cols = ["implementation", "median"]
        has = {k: any(k in r["extra"] for r in rows)
               for k in ("ms_per_step", "gbps", "fraction_of_copy_bandwidth", "tflops")}
        cols += [name for k, name in (("ms_per_step", "per step"), ("gbps", "GB/s"),
                                      ("fraction_of_copy_bandwidth", "of copy BW"),
                                      ("tflops", "TFLOP/s")) if has[k]]
        cols += [f"vs {b['label']}" for b in bases]
        lines += [f"## {group}", "", "| " + " | ".join(cols) + " |",
                  "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
        for r in rows:
            e = r["extra"]
            cells = [r["label"], fmt_time(r["seconds"])]
            if has["ms_per_step"]:
                cells.append(fmt_time(e["ms_per_step"] * 1e-3) if "ms_per_step" in e else "")
            if has["gbps"]:
                cells.append(f"{e['gbps']:.0f}" if "gbps" in e else "")
            if has["fraction_of_copy_bandwidth"]:
                f = e.get("fraction_of_copy_bandwidth")
                cells.append(f"{100 * f:.0f}%" if f is not None else "")
            if has["tflops"]:
                cells.append(f"{e['tflops']:.1f}" if "tflops" in e else "")
            cells += ["—" if b is r else f"{b['seconds'] / r['seconds']:.2f}x" for b in bases]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# -- plots ----------------------------------------------------------------------------------------


def plan_scaling(groups: dict[str, list[dict]]) -> list[dict]:
    """Per "plan <name>" group (benchmarks/bench_plan.py): {name, kind, times: {steps:
    seconds}, slope} with the least-squares slope of log(time) on log(steps), None with fewer
    than two step counts."""
    import math

    out = []
    for group, rows in groups.items():
        if not group.startswith(PLAN_PREFIX):
            continue
        times = {int(r["extra"]["steps"]): r["seconds"] for r in rows if "steps" in r["extra"]}
        slope = None
        if len(times) >= 2:
            xs = [math.log(n) for n in times]
            ys = [math.log(t) for t in times.values()]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum(
                (x - mx) ** 2 for x in xs)
        kind = next((r["extra"].get("kind", "") for r in rows), "")
        out.append(dict(name=group[len(PLAN_PREFIX):], kind=kind, times=dict(sorted(
            times.items())), slope=slope))
    return out


def _bar_figure(plt, labels: list[str], values: list[float], xlabel: str, title: str):
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.22 * len(labels)))
    ax.barh(range(len(labels)), values, color="tab:blue")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return fig, ax


def plot(data: dict, out: Path) -> list[Path]:
    """PNGs: time per step by implementation (step and loop groups); per op family the achieved
    bandwidth against the measured copy peak (GPU) or the time per op (CPU). At least one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = rows_by_group(data)
    written: list[Path] = []

    def save(fig, name: str):
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)

    loops = {g: rows for g, rows in groups.items() if g.startswith(("step ", "loop "))}
    if loops:
        impls = sorted({r["label"] for rows in loops.values() for r in rows})
        fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(loops)), 5.5))
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, rows in enumerate(loops.values()):
                for r in rows:
                    if r["label"] == impl:
                        per = r["extra"].get("ms_per_step")
                        steps = r["extra"].get("steps") or 1
                        xs.append(i + (j - (len(impls) - 1) / 2) * width)
                        ys.append(per if per is not None else r["seconds"] * 1e3 / steps)
            ax.bar(xs, ys, width, label=impl)
        ax.set_xticks(range(len(loops)), [g.replace(" ", "\n", 2) for g in loops], fontsize=7,
                      rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("ms per step (median)")
        ax.set_title("Time per sampler step, by implementation")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        save(fig, "step_time.png")

    scaling = [row for row in plan_scaling(groups) if len(row["times"]) >= 2]
    if scaling:
        fig, ax = plt.subplots(figsize=(9, 6))
        slowest = sorted(scaling, key=lambda r: -max(r["times"].values()))[:6]
        for row in scaling:
            named = row in slowest
            ax.plot(list(row["times"]), [t * 1e3 for t in row["times"].values()],
                    marker="o" if named else None, lw=1.5 if named else 0.6,
                    color=None if named else "0.7",
                    label=f"{row['name']} (slope {row['slope']:.2f})" if named else None)
        lo = min(min(r["times"]) for r in scaling)
        hi = max(max(r["times"]) for r in scaling)
        base = min(min(r["times"].values()) for r in scaling) * 1e3
        ax.plot([lo, hi], [base, base * hi / lo], "k--", lw=1, label="slope 1 (linear)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("steps")
        ax.set_ylabel("plan build time, cold cache (ms)")
        ax.set_title(f"Plan build time against the step count ({len(scaling)} plans; grey: "
                     "the others)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
        save(fig, "plan_scaling.png")

    families: dict[str, list[tuple[str, dict]]] = defaultdict(list)
    for g, rows in groups.items():
        if g not in loops and not g.startswith(PLAN_PREFIX):
            for r in rows:
                families[g.split(" ")[0]].append((f"{g.split(' ', 1)[-1]} | {r['label']}", r))
    for family, items in families.items():
        slug = re.sub(r"[^A-Za-z0-9_]+", "_", family)
        bw = [(lab, r) for lab, r in items if "gbps" in r["extra"]]
        if bw:
            fig, ax = _bar_figure(plt, [lab for lab, _ in bw], [r["extra"]["gbps"] for _, r in bw],
                                  "GB/s achieved", f"{family}: bandwidth vs the copy peak")
            peak = max((r["extra"].get("copy_gbps") or 0) for _, r in bw)
            if peak:
                ax.axvline(peak, color="tab:red", ls="--",
                           label=f"device-to-device copy: {peak:.0f} GB/s")
                ax.legend(fontsize=8)
            save(fig, f"bandwidth_{slug}.png")
        else:
            fig, ax = _bar_figure(plt, [lab for lab, _ in items],
                                  [r["seconds"] * 1e6 for _, r in items],
                                  "median time per op (us)", f"{family}: time per op")
            ax.set_xscale("log")
            save(fig, f"time_{slug}.png")
    if not written:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no benchmark results (see pytest.log)", ha="center", va="center")
        save(fig, "no_results.png")
    return written


# -- command line ----------------------------------------------------------------------------------


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="run the benchmark suite and write a report",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: benchmarks enabled, few rounds, small shapes (CPU: < 2 min)")
    p.add_argument("--filter", metavar="EXPR", default=None,
                   help="run only the benchmarks matching this pytest -k expression")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output folder (default: benchmarks/results/<device>/<date>-<git>)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="stop pytest after S seconds")
    p.add_argument("--pytest-args", default="", metavar="ARGS",
                   help="more pytest arguments, e.g. --pytest-args='-x --benchmark-min-rounds=20'")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_bench)
    return p


def _argv_of(args: argparse.Namespace) -> list[str]:
    """The command line that reproduces args (recorded in environment.json)."""
    argv = ["--quick"] if args.quick else []
    for flag in ("filter", "out", "timeout", "pytest_args"):
        if getattr(args, flag):
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return argv + (["--no-progress"] if args.no_progress else [])


def _cmd_bench(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    status, paths = bench(args.out, quick=args.quick, filter=args.filter,
                          progress=not args.no_progress, timeout=args.timeout,
                          pytest_args=shlex.split(args.pytest_args), argv=_argv_of(args))
    print(paths["summary"].read_text())
    print(f"wrote {', '.join(p.name for p in paths.values())} to {paths['summary'].parent}"
          f" in {time.perf_counter() - start:.0f} s")
    if status not in (0, 5):
        print(f"pytest exited with status {status}: see {paths['log']}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    """`python -m fastdiff.bench ...` (the same as `fastdiff bench ...`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="fastdiff")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return _cmd_bench(parser.parse_args(["bench", *argv]))


# -- pytest plugin (loaded in the benchmark subprocess with -p fastdiff.bench) ---------------------

_bar = None


def pytest_collection_finish(session) -> None:
    global _bar
    if os.environ.get(_PROGRESS_ENV) != "1":
        return
    from tqdm.auto import tqdm

    _bar = tqdm(total=len(session.items), unit="bench", file=sys.__stderr__, dynamic_ncols=True)


def pytest_runtest_logstart(nodeid: str, location) -> None:
    if _bar is not None:
        _bar.set_description_str(nodeid.split("::")[-1][:60])


def pytest_runtest_logreport(report) -> None:
    if _bar is not None and report.when == "teardown":
        _bar.update(1)


def pytest_sessionfinish(session, exitstatus) -> None:
    global _bar
    if _bar is not None:
        _bar.close()
        _bar = None


if __name__ == "__main__":
    sys.exit(main())
