"""`fastdiff train digits | classifier`: trains the embedded digits model and its metric.

digits: the DDPM objective (Ho et al. 2020, arXiv:2006.11239, Algorithm 1): draw x0 from the
training split, t uniform in {0..N-1}, eps ~ N(0, I); x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps;
minimise |eps - eps_theta(x_t, t, y)|^2, with y replaced by the null class with probability
`label_dropout` (classifier-free guidance, Ho & Salimans 2022, arXiv:2207.12598, Algorithm 1).
Adam with linear warm-up and cosine decay; the saved weights are an exponential moving average
(Ho et al. 2020 App. B). classifier: cross-entropy on the same training split.

Everything is drawn from one seeded torch.Generator and the thread count is fixed (`--threads`),
so a run is repeatable on the same machine and torch version. The weights go to safetensors with
metadata: the model config, the schedule, the exact command and the final loss.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import time
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["train_digits", "train_classifier", "add_train_parser"]

DIGITS_DEFAULTS = dict(steps=2000, batch_size=128, lr=1e-3, warmup=200, ema=0.999,
                       label_dropout=0.1, seed=0, threads=1)
CLASSIFIER_DEFAULTS = dict(steps=1500, batch_size=64, lr=1e-3, seed=0, threads=1)


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 1% of lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(steps - warmup, 1)
    return lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * frac)))


def _save(path: Path, state: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in state.items()}, str(path),
              metadata={k: str(v) for k, v in metadata.items()})


def train_digits(out: str | Path | None = None, *, steps: int = 2000, batch_size: int = 128,
                 lr: float = 1e-3, warmup: int = 200, ema: float = 0.999,
                 label_dropout: float = 0.1, seed: int = 0, threads: int | None = 1,
                 command: str | None = None, disable: bool | None = None) -> dict:
    """Trains the digits UNet; saves the EMA weights to `out` (default: the shipped file).
    Returns {"loss": final smoothed loss, "seconds": wall time, "path": out}."""
    from tqdm.auto import trange

    from fastdiff.models import digits

    _check_positive(steps=steps, batch_size=batch_size, lr=lr)
    if not 0 <= label_dropout < 1 or not 0 <= ema < 1:
        raise ValueError(f"need 0 <= label_dropout < 1 and 0 <= ema < 1, got {label_dropout}, "
                         f"{ema}")
    if threads:
        torch.set_num_threads(threads)
    out = Path(out) if out is not None else digits.WEIGHTS
    x_all, y_all = digits.load_dataset("train")
    abar = digits.digits_schedule().alphas_cumprod
    n_t = abar.numel()
    sqrt_ab, sqrt_1m_ab = abar.sqrt().float(), (1 - abar).sqrt().float()

    torch.manual_seed(seed)
    model = digits.build_unet().train()
    ema_model = digits.build_unet().eval().requires_grad_(False)
    ema_model.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)

    start, smooth = time.perf_counter(), None
    bar = trange(steps, disable=disable, desc="train digits")
    for step in bar:
        idx = torch.randint(len(x_all), (batch_size,), generator=g)
        x0, y = x_all[idx], y_all[idx].clone()
        t = torch.randint(n_t, (batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        y[torch.rand(batch_size, generator=g) < label_dropout] = digits.NULL_LABEL
        x_t = sqrt_ab[t, None, None, None] * x0 + sqrt_1m_ab[t, None, None, None] * eps
        loss = F.mse_loss(model(x_t, t, class_labels=y), eps)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(ema, (1 + step) / (10 + step))  # short-run EMA warm-up
        with torch.no_grad():
            for p_ema, p in zip(ema_model.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{smooth:.4f}")
    seconds = time.perf_counter() - start
    _save(out, ema_model.state_dict(), {
        "format": "fastdiff digits UNet (diffusers UNet2DModel layout), epsilon prediction",
        "unet_config": json.dumps(digits.UNET_CONFIG), "schedule": json.dumps(digits.SCHEDULE),
        "null_label": digits.NULL_LABEL, "data": "sklearn.datasets.load_digits, split 'train'",
        "command": command or _command("digits", steps=steps, batch_size=batch_size, lr=lr,
                                       warmup=warmup, ema=ema, label_dropout=label_dropout,
                                       seed=seed, threads=threads),
        "final_loss": f"{smooth:.5f}", "train_seconds": f"{seconds:.0f}",
        "torch": torch.__version__,
    })
    return {"loss": smooth, "seconds": seconds, "path": str(out)}


def train_classifier(out: str | Path | None = None, *, steps: int = 1500, batch_size: int = 64,
                     lr: float = 1e-3, seed: int = 0, threads: int | None = 1,
                     command: str | None = None, disable: bool | None = None) -> dict:
    """Trains the FD-digits classifier on the training split; returns its held-out accuracy."""
    from tqdm.auto import trange

    from fastdiff.models import classifier as clf
    from fastdiff.models.digits import load_dataset

    _check_positive(steps=steps, batch_size=batch_size, lr=lr)
    if threads:
        torch.set_num_threads(threads)
    out = Path(out) if out is not None else clf.CLASSIFIER_WEIGHTS
    x_all, y_all = load_dataset("train")
    torch.manual_seed(seed)
    model = clf.DigitClassifier().train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in trange(steps, disable=disable, desc="train classifier"):
        idx = torch.randint(len(x_all), (batch_size,), generator=g)
        # small input noise: generated digits are continuous-valued, the data has 17 levels
        x = x_all[idx] + 0.05 * torch.randn(batch_size, 1, 8, 8, generator=g)
        loss = F.cross_entropy(model(x), y_all[idx])
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    x_test, y_test = load_dataset("test")
    with torch.no_grad():
        acc = float((model(x_test).argmax(1) == y_test).double().mean())
    seconds = time.perf_counter() - start
    _save(out, model.state_dict(), {
        "format": "fastdiff DigitClassifier", "data": "sklearn.datasets.load_digits, split 'train'",
        "command": command or _command("classifier", steps=steps, batch_size=batch_size, lr=lr,
                                       seed=seed, threads=threads),
        "test_accuracy": f"{acc:.4f}", "train_seconds": f"{seconds:.0f}",
        "torch": torch.__version__,
    })
    return {"accuracy": acc, "seconds": seconds, "path": str(out)}


def _check_positive(**values) -> None:
    for name, v in values.items():
        if not v > 0:
            raise ValueError(f"{name} must be positive, got {v}")


def _command(what: str, **options) -> str:
    """The `fastdiff train` command line that reproduces a run, every option explicit."""
    args = [f"--{k.replace('_', '-')} {v}" for k, v in options.items() if v is not None]
    return " ".join(["fastdiff", "train", what, *args])


def _cmd_train(args: argparse.Namespace) -> int:
    defaults = DIGITS_DEFAULTS if args.what == "digits" else CLASSIFIER_DEFAULTS
    opts = {k: getattr(args, k) if getattr(args, k) is not None else v
            for k, v in defaults.items()}
    cmd = _command(args.what, **opts)
    if args.out is not None:
        cmd += f" --out {shlex.quote(str(args.out))}"
    fn = train_digits if args.what == "digits" else train_classifier
    print(cmd)
    result = fn(args.out, **opts, command=cmd, disable=args.quiet or None)
    extra = (f"final loss {result['loss']:.4f}" if "loss" in result
             else f"held-out accuracy {result['accuracy']:.4f}")
    size = Path(result["path"]).stat().st_size
    print(f"{args.what}: {result['seconds']:.0f} s, {extra}; wrote {result['path']} "
          f"({size / 1e6:.2f} MB)")
    return 0


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `train` to the `fastdiff` CLI (fastdiff/cli.py)."""
    p = subparsers.add_parser(
        "train", help="train the embedded digits model or its classifier",
        description="Train the embedded digits diffusion model (DDPM objective) or the "
        "classifier behind its quality metric, on scikit-learn's digits. Defaults reproduce "
        "the shipped weights (digits: " + _command("digits", **DIGITS_DEFAULTS) + ").")
    p.add_argument("what", choices=["digits", "classifier"])
    p.add_argument("--steps", type=int, help="optimiser steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--warmup", type=int, help="warm-up steps (digits)")
    p.add_argument("--ema", type=float, help="EMA decay of the saved weights (digits)")
    p.add_argument("--label-dropout", type=float, help="null-label probability (digits)")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads (fixed for repeatability)")
    p.add_argument("--out", type=Path, help="output .safetensors (default: the shipped file)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)
    return p
