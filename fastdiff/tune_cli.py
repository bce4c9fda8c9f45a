"""`fastdiff tune`: a tuned plan (fastdiff.tuning) for the embedded digits model or the exact
mixture, written as a plan file that `fastdiff sample --plan` and `fastdiff.Sampler` take.

    fastdiff tune --model digits --solver dpmpp_2m --nfe 5 --out plan.json
    fastdiff sample --plan plan.json --out digits.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

__all__ = ["add_tune_parser", "digits_features", "digits_tuning_set", "mixture_problem",
           "TUNING_SEED"]

# Tuning noise is drawn from seeds >= 1000; evaluation (benchmarks/quality.py, fastdiff sample)
# uses seed 0 and its neighbours, so tuned plans are always scored on held-out noise.
TUNING_SEED = 1000
MIXTURE_RANGE = (0.002, 80.0)  # EDM's range (Karras et al. 2022), for the exact mixture


def digits_tuning_set(per_class: int = 10, seed: int = TUNING_SEED, guidance: float = 1.5):
    """(guided digits denoiser, unit noise [10 * per_class, 1, 8, 8], cond) for tuning."""
    import torch

    from fastdiff.models.digits import IMAGE_SIZE, NULL_LABEL, guided, load_digits_model

    model = load_digits_model()
    labels = torch.arange(10).repeat_interleave(per_class)
    gen = torch.Generator().manual_seed(seed)
    # drawn as sample_digits draws its noise (float64 on the CPU), from another seed
    noise = torch.randn(len(labels), 1, IMAGE_SIZE, IMAGE_SIZE, generator=gen,
                        dtype=torch.float64)
    cond = {"cond": labels}
    if guidance != 1.0:
        cond["uncond"] = torch.full_like(labels, NULL_LABEL)
        return guided(model, guidance), noise, cond
    return model, noise, cond


def digits_features():
    """The embedded digit classifier's penultimate features as an LD3 distance (the LPIPS
    analogue for 8x8 digits; it is also FD-digits' embedding, so report L2-tuned rows too)."""
    from fastdiff.models.classifier import load_classifier

    clf = load_classifier()

    def features(y):
        return clf.features(y.to(next(clf.parameters()).dtype))

    return features


def mixture_problem(n: int = 256, seed: int = TUNING_SEED, d: int = 2):
    """(mixture, unit noise [n, d], exact ODE solution from sigma_max to 0 of that noise)."""
    import torch

    from fastdiff.models.gmm import GaussianMixture

    g = GaussianMixture.default(d)
    lo, hi = MIXTURE_RANGE
    noise = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return g, noise, g.ode_solution(noise * hi, hi, 0.0)


def _cmd_tune(args: argparse.Namespace) -> int:
    import torch

    from fastdiff.tuning import plot_loss, tune

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.model == "digits":
        model, noise, cond = digits_tuning_set(args.per_class, args.seed, args.guidance)
        plan = tune(model, args.solver, args.nfe, noise=noise, cond=cond, clamp=(-1.0, 1.0),
                    teacher_steps=args.teacher_steps, max_evals=args.max_evals,
                    progress=not args.quiet, tune_start=args.tune_start,
                    features=digits_features() if args.distance == "features" else None)
        plan.seeds["labels"] = f"0..9 x {args.per_class}"
    else:
        model, noise, exact = mixture_problem(10 * args.per_class, args.seed)
        lo, hi = MIXTURE_RANGE
        plan = tune(model, args.solver, args.nfe, noise=noise, targets=exact, sigma_min=lo,
                    sigma_max=hi, max_evals=args.max_evals, progress=not args.quiet,
                    tune_start=args.tune_start)
        plan.method["teacher"] = {"targets": "exact ODE solution (DOP853, rtol 1e-12)"}
    plan.seeds["seed"] = args.seed
    seconds = time.perf_counter() - start
    plan.method["seconds"] = round(seconds, 2)
    plan.save(args.out)
    print(f"tuned {args.solver} at NFE {plan.nfe} for {args.model} in {seconds:.1f} s: loss"
          f" {min(plan.loss['start'].values()):.4g} (best fixed schedule) -> "
          f"{plan.loss['final']:.4g}\nsigmas {[round(s, 5) for s in plan.sigmas.tolist()]}\n"
          f"wrote {args.out}")
    if args.plot is not None:
        try:
            plot_loss(plan, args.plot)
            print(f"wrote {args.plot}")
        except ImportError:
            print("no loss plot: matplotlib is not installed (pip install matplotlib)")
    return 0


def add_tune_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `tune` to the `fastdiff` CLI (fastdiff/cli.py)."""
    from fastdiff.reference.solvers import SOLVERS
    from fastdiff.sample_cli import _finite, _output_file, _positive_int

    p = subparsers.add_parser("tune", help="tune a solver's sigmas for a model and NFE",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits", choices=("digits", "mixture"))
    ode = sorted(k for k, v in SOLVERS.items() if v.param == "ve" and
                 (not v.stochastic or v.deterministic_kwargs))
    p.add_argument("--solver", default="dpmpp_2m", choices=ode, metavar="NAME",
                   help="a deterministic VE solver (default dpmpp_2m)")
    p.add_argument("--nfe", type=_positive_int, default=5, help="model calls (default 5)")
    p.add_argument("--out", type=_output_file, default="plan.json", help="the plan file")
    p.add_argument("--plot", type=_output_file, default=None, help="loss curve PNG")
    p.add_argument("--per-class", type=_positive_int, default=10,
                   help="tuning samples per digit class (mixture: 10x this many samples)")
    p.add_argument("--seed", type=int, default=TUNING_SEED,
                   help=f"tuning noise seed (default {TUNING_SEED}; evaluation uses 0)")
    p.add_argument("--guidance", type=_finite, default=1.5)
    p.add_argument("--teacher-steps", type=_positive_int, default=100)
    p.add_argument("--max-evals", type=_positive_int, default=40,
                   help="budget of student solver runs (default 40)")
    p.add_argument("--tune-start", action="store_true",
                   help="tune the first level too (the run starts from noise * sigmas[0])")
    p.add_argument("--distance", default="l2", choices=("l2", "features"),
                   help="digits: L2 (default) or the digit classifier's features")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_tune, parser=p)
    return p


def plan_file(text: str) -> Path:
    """--plan: an existing plan file."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: no such plan file")
    return path
