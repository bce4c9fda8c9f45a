"""Sample quality on real data: solver x NFE table of FD-digits and label accuracy.

In the style of the DPM-Solver papers' FID tables: the embedded class-conditional digits model
(fastdiff.models.digits), sampled by the fused engine with each solver at 5, 10, 20 and 50
model evaluations (NFE; a solver with k evaluations per step gets NFE / k steps, rounded down),
scored by the project's held-out digit classifier (fastdiff.models.classifier): the Frechet
distance of its penultimate features against the real held-out split, and the fraction of
samples classified as their requested label.

    python benchmarks/quality.py --out benchmarks/results/quality

The second table is schedule x NFE for euler and dpmpp_2m: ComfyUI's schedulers
(`fastdiff.comfyui.SCHEDULER_NAMES`, computed from the model's own training table by
`calculate_sigmas`) in place of Karras, then ComfyUI's scheduler nodes as a user would set
them (`NODE_SCHEDULES`): Align Your Steps (its SD1.5 table) and GITS (coeff 1.2, SD1.5) start
at sigma 14.6, below this model's sigma_max 157 (their published tables, log-linearly
interpolated to other step counts as ComfyUI does); laplace (mu 0, beta 0.5) gets the
model's range, vp (the continuous VP SDE) its own defaults; OptimalSteps' FLUX table (flow
times in [0, 1]: ComfyUI's node does not rescale them, so on this model sampling starts at
sigma 1) and sd_turbo (timesteps 999, 899, ... read through the model's table; at most 10
steps, n/a above) as the nodes give them.

    python benchmarks/quality.py --only schedules --samples-per-class 30
    python benchmarks/quality.py --quick     # CI: euler and dpmpp_2m, NFE 5, 3 schedules

The tuned rows (`fastdiff.tune` plans vs Karras vs AYS-style schedules at NFE 3-10, evaluated on
noise disjoint from the tuning noise) are benchmarks/quality_tuned.py.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

SOLVERS = ["euler", "heun", "dpm_2", "ddim", "lms", "ipndm", "deis_3", "dpmpp_2m", "dpmpp_3m",
           "dpmpp_2s", "unipc_bh2_2", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde"]
# issue 16's samplers (ComfyUI's): ODE ones, then stochastic ones
NEW_SOLVERS = ["ipndm_v", "res_multistep", "gradient_estimation", "exp_heun_2_x0", "heunpp2",
               "sa_solver eta=0", "seeds_2", "er_sde", "res_multistep_ancestral", "sa_solver",
               "sa_solver comfyui-tau", "seeds_3", "sa_solver_pece"]
# CFG++ (the renoising with the unconditional prediction): the table's guidance scale too,
# above the [0, 1] that CFG++ is meant for (README)
CFG_PP_SOLVERS = ["euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2m_cfg_pp",
                  "dpmpp_2s_ancestral_cfg_pp", "res_multistep_cfg_pp",
                  "res_multistep_ancestral_cfg_pp", "gradient_estimation_cfg_pp"]
SOLVERS += NEW_SOLVERS + CFG_PP_SOLVERS


def _comfyui_tau(model) -> dict:
    """ComfyUI's SA-Solver default: tau = 1 from percent 0.2 to 0.8 of the model's own table
    (fastdiff.comfyui.percent_to_sigma; for the digits model sigma 25.6 down to 0.72)."""
    from types import SimpleNamespace

    from fastdiff.comfyui import percent_to_sigma

    ms = SimpleNamespace(model_sampling=model.schedule)
    return {"sde_start_sigma": percent_to_sigma(ms, 0.2, "ve"),
            "sde_end_sigma": percent_to_sigma(ms, 0.8, "ve")}


# a row that is a registry solver with options: row name -> (solver, options of the model)
VARIANTS = {"sa_solver eta=0": ("sa_solver", lambda model: {"eta": 0.0}),
            "sa_solver comfyui-tau": ("sa_solver", _comfyui_tau)}
NFES = [5, 10, 20, 50]
SCHEDULE_SOLVERS = ["euler", "dpmpp_2m"]


def _node_schedules() -> dict:
    """ComfyUI scheduler nodes: name -> (model schedule, steps) -> sigmas (float64, ending in
    0 except laplace, whose node ends at sigma_min: it gets steps + 1 levels, i.e. `steps`
    steps)."""
    from fastdiff import comfyui as c

    return {
        "ays_sd1": lambda ms, n: c.align_your_steps_scheduler("SD1", n),
        "gits_1.2": lambda ms, n: c.gits_scheduler(1.20, n),
        "laplace": lambda ms, n: c.laplace_scheduler(n + 1, ms.sigma_max, ms.sigma_min),
        "vp": lambda ms, n: c.vp_scheduler(n),
        "optimal_steps_flux": lambda ms, n: c.optimal_steps_scheduler("FLUX", n),
        "sd_turbo": lambda ms, n: c.sd_turbo_scheduler(ms, n) if n <= 10 else None,
    }


NODE_SCHEDULES = ["ays_sd1", "gits_1.2", "laplace", "vp", "optimal_steps_flux", "sd_turbo"]
SCHEDULE_NFES = [5, 10, 20]


def evaluate(solvers, nfes, samples_per_class: int, guidance: float, seed: int) -> list[dict]:
    from fastdiff.models.classifier import evaluate_digits, load_classifier
    from fastdiff.models.digits import load_digits_model, sample_digits
    from fastdiff.reference.solvers import SOLVERS as REGISTRY

    model, classifier = load_digits_model(), load_classifier()
    labels = torch.arange(10).repeat_interleave(samples_per_class)
    calls = [0]  # the network's calls (one batched call per guided evaluation)
    model.network.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    rows = []
    for row in solvers:
        solver, options = VARIANTS.get(row, (row, lambda model: {}))
        options = options(model)
        per_step = REGISTRY[solver].nfe_per_step
        for nfe in nfes:
            steps = nfe // per_step
            if steps < 1:
                rows.append(dict(solver=row, nfe=nfe, steps=0, fd=math.nan, accuracy=math.nan))
                continue
            start, calls[0] = time.perf_counter(), 0
            x = sample_digits(model, labels, steps=steps, solver=solver, guidance=guidance,
                              seed=seed, backend="auto", options=options)
            seconds = time.perf_counter() - start
            score = evaluate_digits(x, labels, classifier)
            # nfe_used: steps x the registry's calls per step; calls: what the run made (fewer
            # where the last steps take fewer, as heun's step into sigma = 0)
            rows.append(dict(solver=row, nfe=nfe, nfe_used=steps * per_step, calls=calls[0],
                             steps=steps, options=options, fd=score["fd"],
                             accuracy=score["accuracy"], seconds=seconds))
            print(f"{row:>16} NFE {nfe:>3}: FD-digits {score['fd']:8.2f}"
                  f"  accuracy {score['accuracy']:.3f}  ({steps} steps, {calls[0]} calls,"
                  f" {seconds:.1f} s)", flush=True)
    return rows


def evaluate_schedules(solvers, schedules, nfes, samples_per_class: int, guidance: float,
                       seed: int) -> list[dict]:
    """Rows keyed "solver / schedule": each ComfyUI schedule for the model's own table (or a
    scheduler node of NODE_SCHEDULES)."""
    from fastdiff.comfyui import SCHEDULER_NAMES, calculate_sigmas
    from fastdiff.models.classifier import evaluate_digits, load_classifier
    from fastdiff.models.digits import load_digits_model, sample_digits
    from fastdiff.reference.solvers import SOLVERS as REGISTRY

    model, classifier = load_digits_model(), load_classifier()
    labels = torch.arange(10).repeat_interleave(samples_per_class)
    nodes = _node_schedules()
    unknown = [s for s in schedules if s not in nodes and s not in SCHEDULER_NAMES]
    if unknown:
        raise ValueError(f"--schedules: unknown {unknown}; expected ComfyUI's "
                         f"{SCHEDULER_NAMES} or {NODE_SCHEDULES}")
    rows = []
    for solver in solvers:
        per_step = REGISTRY[solver].nfe_per_step
        for schedule in schedules:
            for nfe in nfes:
                # beta / ddim_uniform can return fewer levels (repeated timesteps dropped)
                n = max(nfe // per_step, 1)
                sigmas = nodes[schedule](model.schedule, n) if schedule in nodes else \
                    calculate_sigmas(model.schedule, schedule, n)
                if sigmas is None:  # the node has no schedule of this length (sd_turbo)
                    rows.append(dict(solver=f"{solver} / {schedule}", nfe=nfe, steps=0,
                                     fd=math.nan, accuracy=math.nan))
                    continue
                steps = len(sigmas) - 1
                start = time.perf_counter()
                x = sample_digits(model, labels, solver=solver, guidance=guidance, seed=seed,
                                  backend="auto", sigmas=sigmas)
                seconds = time.perf_counter() - start
                score = evaluate_digits(x, labels, classifier)
                rows.append(dict(solver=f"{solver} / {schedule}", nfe=nfe,
                                 nfe_used=steps * per_step, steps=steps, fd=score["fd"],
                                 accuracy=score["accuracy"], seconds=seconds))
                print(f"{solver:>9} {schedule:>16} NFE {nfe:>3}: FD-digits {score['fd']:8.2f}"
                      f"  accuracy {score['accuracy']:.3f}  ({seconds:.1f} s)", flush=True)
    return rows


def markdown(rows: list[dict], nfes, caption: str) -> str:
    cell = {(r["solver"], r["nfe"]): r for r in rows}
    lines = [caption, "", "| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|" + "---|" * len(nfes)]
    for s in dict.fromkeys(r["solver"] for r in rows):
        cells = [f"{cell[s, n]['fd']:.1f} ({100 * cell[s, n]['accuracy']:.0f}%)"
                 if cell[s, n]["steps"] else "n/a" for n in nfes]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for solver in dict.fromkeys(r["solver"] for r in rows):
        pts = [(r["nfe_used"], r["fd"]) for r in rows if r["solver"] == solver and r["steps"]]
        ax.plot(*zip(*pts), marker="o", label=solver)
    ax.set(xscale="log", yscale="log", xlabel="model evaluations (NFE)",
           ylabel="FD-digits (lower is better)", title="Digits model: quality vs NFE")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/quality")
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--nfe", default=",".join(map(str, NFES)))
    p.add_argument("--samples-per-class", type=int, default=50)
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedules", default=None,
                   help="ComfyUI schedulers (and NODE_SCHEDULES) for the schedule table "
                        "(default: all)")
    p.add_argument("--schedule-solvers", default=",".join(SCHEDULE_SOLVERS))
    p.add_argument("--schedule-nfe", default=",".join(map(str, SCHEDULE_NFES)))
    p.add_argument("--only", choices=("solvers", "schedules"), default=None,
                   help="write one of the two tables")
    p.add_argument("--quick", action="store_true",
                   help="CI: the schedule table only, euler and dpmpp_2m at NFE 5, 3 schedules")
    args = p.parse_args(argv)
    if args.quick:
        args.only, args.schedules, args.schedule_nfe = "schedules", "simple,beta,kl_optimal", "5"
        args.samples_per_class = min(args.samples_per_class, 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = 10 * args.samples_per_class
    if args.only != "solvers":
        from fastdiff.comfyui import SCHEDULER_NAMES

        names = [*SCHEDULER_NAMES, *NODE_SCHEDULES] if args.schedules is None \
            else args.schedules.split(",")
        s_nfes = [int(v) for v in args.schedule_nfe.split(",")]
        rows = evaluate_schedules(args.schedule_solvers.split(","), names, s_nfes,
                                  args.samples_per_class, args.guidance, args.seed)
        caption = (f"FD-digits (accuracy) of {n} samples, guidance {args.guidance}, seed"
                   f" {args.seed}, by solver / ComfyUI schedule (calculate_sigmas on the model's"
                   " training table; ays_sd1 .. vp: ComfyUI's scheduler nodes, see"
                   " benchmarks/quality.py); NFE as in the solver table (beta and ddim_uniform"
                   " may use fewer: see quality_schedules.json).")
        (out / "quality_schedules.md").write_text(markdown(rows, s_nfes, caption))
        (out / "quality_schedules.json").write_text(
            json.dumps(dict(rows=rows, args=vars(args)), indent=1))
        print(f"wrote {out / 'quality_schedules.md'}, quality_schedules.json")
    if args.only == "schedules":
        return 0
    nfes = [int(v) for v in args.nfe.split(",")]
    rows = evaluate(args.solvers.split(","), nfes, args.samples_per_class, args.guidance,
                    args.seed)
    caption = (f"FD-digits (accuracy) of {n} samples, guidance {args.guidance}, Karras sigmas,"
               f" seed {args.seed}; real held-out digits score FD ~10.7 against themselves"
               " (1397 train vs 400 held-out).")
    (out / "quality.md").write_text(markdown(rows, nfes, caption))
    (out / "quality.json").write_text(json.dumps(dict(rows=rows, args=vars(args)), indent=1))
    plot(rows, out / "quality.png")
    print(f"wrote {out / 'quality.md'}, quality.json, quality.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
