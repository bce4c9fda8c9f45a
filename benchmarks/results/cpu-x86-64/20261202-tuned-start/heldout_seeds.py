"""Held-out check of the NFE 3 acceptance on three evaluation seeds (0, 1, 2; tuning noise:
seed 1000): tuned NFE 3 plans (this folder's plans/, features + free start, and one L2 + free
start plan tuned here) against today's best NFE 5 (lms, Karras), 500 samples each.

    PYTHONPATH=. python benchmarks/results/cpu-x86-64/20261202-tuned-start/heldout_seeds.py
"""
import json
import time
from pathlib import Path

import torch

import fastdiff
from fastdiff.models.classifier import evaluate_digits, load_classifier
from fastdiff.models.digits import load_digits_model, sample_digits
from fastdiff.tune_cli import digits_tuning_set
from fastdiff.tuning import load_plan, fixed_sigmas

torch.set_num_threads(1)
here = Path(__file__).parent
model, clf = load_digits_model(), load_classifier()
labels = torch.arange(10).repeat_interleave(50)
lo, hi = model.schedule.sigma_min, model.schedule.sigma_max


def scores(solver, sigmas):
    out = []
    for seed in (0, 1, 2):
        x = sample_digits(model, labels, solver=solver, guidance=1.5, seed=seed, backend="auto",
                          sigmas=sigmas)
        s = evaluate_digits(x, labels, clf)
        out.append((round(s["fd"], 2), s["accuracy"]))
    return out


rows = {"lms karras NFE 5 (today's best NFE 5)": scores("lms", fixed_sigmas("karras", 5, lo, hi))}
for solver in ("dpmpp_2m", "unipc_bh2_2", "euler", "ipndm"):
    plan = load_plan(here / "plans" / f"{solver}_nfe3+start+features.json")
    rows[f"{solver} tuned NFE 3 (features, free start)"] = scores(solver, plan.sigmas)
gm, noise, cond = digits_tuning_set(10)
t = time.process_time()
plan = fastdiff.tune(gm, "dpmpp_2m", 3, noise=noise, cond=cond, clamp=(-1.0, 1.0), max_evals=40,
                     progress=False, tune_start=True)
plan.save(here / "plans" / "dpmpp_2m_nfe3+start+l2.json")
rows[f"dpmpp_2m tuned NFE 3 (L2, free start; {time.process_time() - t:.0f} s CPU)"] = \
    scores("dpmpp_2m", plan.sigmas)
lines = ["| plan | seed 0 | seed 1 | seed 2 | mean |", "|---|---|---|---|---|"]
for k, v in rows.items():
    mean = sum(f for f, _ in v) / 3
    lines.append(f"| {k} | " + " | ".join(f"{f:.1f} ({100 * a:.0f}%)" for f, a in v)
                 + f" | {mean:.1f} |")
(here / "heldout_seeds.md").write_text("\n".join(lines) + "\n")
(here / "heldout_seeds.json").write_text(json.dumps(rows, indent=1))
print("\n".join(lines))
