"""Tuned plans vs fixed schedules on the digits model (the tuned rows of the quality table).

For each solver and NFE: FD-digits and recognised fraction of 500 samples (guidance 1.5, seed 0,
the fused engine) with Karras (rho 7), AYS-style and tuned sigmas (`fastdiff.tune`, tuned on
noise from seed 1000 + 10 samples per class: disjoint from the evaluation noise), plus the
time each tuning took and the sampling time per run. One teacher (dpmpp_2m, 100 Karras steps)
serves every tuning. Also records the exact-mixture check (tuned NFE 5 vs the best untuned
NFE 10 of the same solver on held-out noise).

    python benchmarks/quality_tuned.py --out benchmarks/results/cpu-x86-64/<date>-tuned
    python benchmarks/quality_tuned.py --quick     # CI: one solver, NFE 3, tiny budgets
    python benchmarks/quality_tuned.py --tune-start --distance features --schedules tuned \
        --max-evals 40 --out ...   # the tuned+start+features rows (first level tuned too)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SOLVERS = ["dpmpp_2m", "unipc_bh2_2", "euler", "ipndm"]
NFES = [3, 4, 5, 6, 8, 10]
SCHEDULES = ["karras", "ays", "tuned"]


def digits_rows(solvers, nfes, per_class: int, samples_per_class: int, max_evals: dict,
                teacher_steps: int, plans_dir: Path | None, done=None, label: str = "tuned",
                tune_start: bool = False, distance: str = "l2",
                schedules=tuple(SCHEDULES)) -> list[dict]:
    """Cells in NFE-major order (5 and 3 first: the acceptance cells), so an interrupted run
    has recorded whole NFE columns; `max_evals` maps a solver (or "default") to its budget."""
    import fastdiff
    from fastdiff.models.classifier import evaluate_digits, load_classifier
    from fastdiff.models.digits import load_digits_model, sample_digits
    from fastdiff.tune_cli import digits_features, digits_tuning_set
    from fastdiff.tuning import _run, fixed_sigmas

    features = digits_features() if distance == "features" else None
    guided_model, noise, cond = digits_tuning_set(per_class)
    model, classifier = load_digits_model(), load_classifier()
    lo, hi = model.schedule.sigma_min, model.schedule.sigma_max
    start, cpu = time.perf_counter(), time.process_time()
    teacher_sigmas = fixed_sigmas("karras", teacher_steps, lo, hi)
    targets = _run(guided_model, "dpmpp_2m", (noise * hi).float(), teacher_sigmas, cond, 256, {})
    teacher_seconds = time.perf_counter() - start
    teacher_cpu = time.process_time() - cpu
    print(f"teacher: dpmpp_2m, {teacher_steps} Karras steps, {len(noise)} samples:"
          f" {teacher_seconds:.1f} s wall, {teacher_cpu:.1f} s CPU", flush=True)
    labels = torch.arange(10).repeat_interleave(samples_per_class)
    rows = []
    order = sorted(nfes, key=lambda n: (n not in (5, 3), -n if n in (5, 3) else n))
    for nfe in order:
        for solver in solvers:
            budget = max_evals.get(solver, max_evals["default"])
            for kind in schedules:
                tune_s = None
                if kind == "tuned":
                    t0, c0 = time.perf_counter(), time.process_time()
                    plan = fastdiff.tune(guided_model, solver, nfe, noise=noise, cond=cond,
                                         targets=targets, clamp=(-1.0, 1.0),
                                         max_evals=budget, progress=False,
                                         features=features, tune_start=tune_start)
                    tune_s = (time.perf_counter() - t0, time.process_time() - c0)
                    plan.method["teacher"] = {"solver": "dpmpp_2m", "steps": teacher_steps,
                                              "spacing": "karras", "seconds": teacher_seconds,
                                              "cpu_seconds": teacher_cpu}
                    if plans_dir is not None:
                        plan.save(plans_dir / f"{solver}_nfe{nfe}{label[5:]}.json")
                    sigmas = plan.sigmas
                else:
                    sigmas = fixed_sigmas(kind, nfe, lo, hi)
                t0 = time.perf_counter()
                x = sample_digits(model, labels, solver=solver, guidance=1.5, seed=0,
                                  backend="auto", sigmas=sigmas)
                run_s = time.perf_counter() - t0
                score = evaluate_digits(x, labels, classifier)
                rows.append(dict(solver=solver, nfe=nfe, fd=score["fd"],
                                 schedule=label if kind == "tuned" else kind,
                                 accuracy=score["accuracy"], sample_seconds=run_s,
                                 tune_seconds=tune_s and tune_s[0],
                                 tune_cpu_seconds=tune_s and tune_s[1], max_evals=budget,
                                 teacher_seconds=teacher_seconds, teacher_cpu_seconds=teacher_cpu,
                                 sigmas=sigmas.tolist()))
                extra = (f"  tuned in {tune_s[0]:.1f} s wall / {tune_s[1]:.1f} s CPU"
                         if tune_s else "")
                print(f"{solver:>12} NFE {nfe:>2} {kind:>6}: FD-digits {score['fd']:7.2f}"
                      f"  recognised {score['accuracy']:.3f}{extra}", flush=True)
        if done is not None:  # partial results survive an interrupted run
            done(rows)
    return rows


def mixture_rows(solvers, max_evals: int, tune_start: bool = False) -> list[dict]:
    import fastdiff
    from fastdiff.tune_cli import MIXTURE_RANGE, mixture_problem
    from fastdiff.tuning import _run, fixed_sigmas

    lo, hi = MIXTURE_RANGE
    g, noise, exact = mixture_problem(256)
    _, held, held_exact = mixture_problem(256, seed=7)

    def err(solver, sigmas):
        # from the same noise at the plan's first level, against the exact solution from hi
        x = held * float(sigmas[0])
        return float((_run(g, solver, x, sigmas, {}, 512, {}) - held_exact)
                     .pow(2).mean().sqrt())

    rows = []
    for solver in solvers:
        plan = fastdiff.tune(g, solver, 5, noise=noise, targets=exact, sigma_min=lo,
                             sigma_max=hi, max_evals=max_evals, progress=False,
                             tune_start=tune_start, start_levels=())
        untuned = {f"{k}_nfe{n}": err(solver, fixed_sigmas(k, n, lo, hi))
                   for n in (5, 10) for k in ("karras", "exponential", "ays")}
        best10 = min(v for k, v in untuned.items() if k.endswith("nfe10"))
        rows.append(dict(solver=solver, tuned_nfe5=err(solver, plan.sigmas),
                         tune_start=tune_start,
                         best_untuned_nfe10=best10, **untuned, sigmas=plan.sigmas.tolist()))
        r = rows[-1]
        print(f"mixture {solver:>12}: tuned NFE 5 RMSE {r['tuned_nfe5']:.4f}, best untuned"
              f" NFE 10 {best10:.4f} ({'meets' if r['tuned_nfe5'] <= best10 else 'misses'})",
              flush=True)
    return rows


def markdown(rows: list[dict], nfes, mixture: list[dict], caption: str) -> str:
    cell = {(r["solver"], r["nfe"], r["schedule"]): r for r in rows}
    lines = [caption, "", "| solver | schedule | " + " | ".join(f"NFE {n}" for n in nfes)
             + " |", "|---|---|" + "---|" * len(nfes)]
    for s in dict.fromkeys(r["solver"] for r in rows):
        for k in dict.fromkeys(r["schedule"] for r in rows):
            cells = [f"{cell[s, n, k]['fd']:.1f} ({100 * cell[s, n, k]['accuracy']:.0f}%)"
                     if (s, n, k) in cell else "not run" for n in nfes]
            lines.append(f"| {s} | {k} | " + " | ".join(cells) + " |")
    tuned = [r for r in rows if r["schedule"].startswith("tuned")]
    if tuned:
        lines += ["", "Tuning time per plan (wall / CPU seconds): " + ", ".join(
            f"{r['solver']} NFE {r['nfe']} {r['schedule']} {r['tune_seconds']:.0f}/"
            f"{r['tune_cpu_seconds']:.0f}"
            f" ({r['max_evals']} runs)" for r in tuned)
            + f"; the shared teacher {tuned[0]['teacher_seconds']:.0f}/"
              f"{tuned[0]['teacher_cpu_seconds']:.0f}."]
    if mixture:
        lines += ["", "Exact mixture (2-D, sigma 80 -> 0, RMSE against the exact ODE solution"
                  " on 256 held-out noises):", "",
                  "| solver | tuned NFE 5 | best untuned NFE 10 | karras NFE 5 | meets |",
                  "|---|---|---|---|---|"]
        for r in mixture:
            lines.append(f"| {r['solver']} | {r['tuned_nfe5']:.4f} | "
                         f"{r['best_untuned_nfe10']:.4f} | {r['karras_nfe5']:.4f} | "
                         f"{'yes' if r['tuned_nfe5'] <= r['best_untuned_nfe10'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/quality_tuned")
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--nfe", default=",".join(map(str, NFES)))
    p.add_argument("--per-class", type=int, default=10, help="tuning samples per class")
    p.add_argument("--samples-per-class", type=int, default=50, help="evaluation samples")
    p.add_argument("--max-evals", default="100",
                   help="solver runs per tuning: N, or e.g. 'dpmpp_2m=80,default=40'")
    p.add_argument("--teacher-steps", type=int, default=100)
    p.add_argument("--mixture-evals", type=int, default=400)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: see conftest)")
    p.add_argument("--tune-start", action="store_true", help="tune the first level too")
    p.add_argument("--distance", default="l2", choices=("l2", "features"),
                   help="LD3 distance: l2 or the digit classifier's features (LPIPS-like)")
    p.add_argument("--schedules", default=",".join(SCHEDULES),
                   help="which of karras,ays,tuned to run")
    p.add_argument("--mixture", default="yes", choices=("yes", "no"))
    p.add_argument("--quick", action="store_true", help="CI: dpmpp_2m at NFE 3, tiny budgets")
    args = p.parse_args(argv)
    if args.quick:
        args.solvers, args.nfe, args.per_class, args.samples_per_class = "dpmpp_2m", "3", 1, 3
        args.max_evals, args.teacher_steps, args.mixture_evals = "3", 6, 5
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "plans").mkdir(parents=True, exist_ok=True)
    nfes = [int(n) for n in args.nfe.split(",")]
    budgets = dict(kv.split("=") if "=" in kv else ("default", kv)
                   for kv in args.max_evals.split(","))
    budgets = {k: int(v) for k, v in budgets.items()}
    solvers = args.solvers.split(",")
    caption = (f"FD-digits (recognised) of {10 * args.samples_per_class} samples, guidance 1.5,"
               f" evaluation seed 0; tuned: {10 * args.per_class} tuning samples from seed 1000,"
               f" teacher dpmpp_2m {args.teacher_steps} Karras steps, Nelder-Mead with"
               f" {args.max_evals} solver runs; {args.threads} torch thread(s). Real held-out"
               " digits: FD ~10.7.")
    label = "tuned" + ("+start" if args.tune_start else "") + \
        ("+features" if args.distance == "features" else "")
    mixture = mixture_rows(solvers, args.mixture_evals, args.tune_start) \
        if args.mixture == "yes" else []

    def write(rows):
        (out / "quality_tuned.md").write_text(markdown(rows, nfes, mixture, caption))
        (out / "quality_tuned.json").write_text(json.dumps(dict(rows=rows, mixture=mixture,
                                                                args=vars(args)), indent=1))

    digits_rows(solvers, nfes, args.per_class, args.samples_per_class, budgets,
                args.teacher_steps, out / "plans", done=write, label=label,
                tune_start=args.tune_start, distance=args.distance,
                schedules=args.schedules.split(","))
    print(f"wrote {out / 'quality_tuned.md'}, quality_tuned.json, plans/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
