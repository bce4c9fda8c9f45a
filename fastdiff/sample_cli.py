"""`fastdiff sample`: generate a grid of digits with the embedded model.

    fastdiff sample                                   # 100 digits (0..9 x 10), digits.png
    fastdiff sample --labels 3,1,4 --solver euler --steps 50 --guidance 3 --npz out.npz
    fastdiff sample --plan plan.json                  # a tuned plan (`fastdiff tune`)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from fastdiff.cli import torch_device

__all__ = ["add_sample_parser"]

DEFAULT_GUIDANCE = 1.5


def _parse_labels(text: str) -> list[int]:
    """"0,1,2" or "0-9" pieces, comma separated; "all" = 0..9 ten times."""
    if text == "all":
        return [d for _ in range(10) for d in range(10)]
    labels: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            labels += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--labels: expected e.g. '0,3,7' or '0-9', got "
                                         f"{text!r}") from None
    if not labels or any(not 0 <= v <= 9 for v in labels):
        raise argparse.ArgumentTypeError(f"--labels: digits 0..9 expected, got {text!r}")
    return labels


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"a finite number expected, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a positive integer expected, got {text!r}")
    return value


def _output_file(text: str) -> Path:
    """An output file name whose folder exists (checked before any sampling work)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; a file name expected")
    folder = path.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: the folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: the folder {str(folder)!r} is not writable")
    return path


def _image_file(text: str) -> Path:
    """--out: an output file in an image format Pillow writes (by its extension)."""
    path = _output_file(text)
    try:
        from PIL import Image
    except ImportError:  # checked when saving
        return path
    Image.init()
    if path.suffix.lower() not in Image.registered_extensions():
        raise argparse.ArgumentTypeError(f"{text!r}: an image file name expected (e.g."
                                         f" digits.png), got extension {path.suffix!r}")
    return path


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not -(2**63) <= value < 2**63 - 1:
        raise argparse.ArgumentTypeError(f"an integer in [-2**63, 2**63 - 1) expected, got"
                                         f" {text!r}")
    return value


def _cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from fastdiff.models.digits import load_digits_model, make_grid, sample_digits, to_uint8
    from fastdiff.ops import unavailable_reason

    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    backend = None if args.reference else args.backend
    if backend not in (None, "auto") and (why := unavailable_reason(backend, device)):
        args.parser.error(f"argument --backend: {backend!r} cannot run on {device}: {why}")
    engine = "reference solver" if backend is None else f"fused engine, backend {backend}"
    model = load_digits_model(device=device, dtype=dtype)
    plan = None
    if args.plan is not None:  # the plan's solver and sigmas (warns if made for another model)
        from fastdiff.tuning import load_plan

        try:
            plan = load_plan(args.plan)
        except (ValueError, KeyError, OSError) as e:
            args.parser.error(f"argument --plan: {e}")
        args.solver, args.steps = plan.solver, len(plan.sigmas) - 1
    start = time.perf_counter()
    x = sample_digits(model, args.labels, steps=args.steps, solver=args.solver,
                      guidance=args.guidance, seed=args.seed, backend=backend,
                      graph=args.graph and backend is not None, disable=args.quiet or None,
                      sigmas=plan)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    images = to_uint8(x)
    n = len(args.labels)
    tuned = " (tuned plan)" if plan else ""
    print(f"{n} digits, {args.solver}, {args.steps} steps{tuned}, guidance {args.guidance},"
          f" {engine}"
          f"{' + CUDA graph' if args.graph and backend else ''}, {device} {args.dtype}: "
          f"{seconds:.2f} s ({seconds / args.steps * 1e3:.1f} ms/step)")
    if args.out is not None:
        from PIL import Image

        Image.fromarray(make_grid(images, nrow=min(10, n))).save(args.out)
        print(f"wrote {args.out}")
    if args.npz is not None:
        np.savez_compressed(args.npz, images=images, labels=np.asarray(args.labels, np.int64))
        print(f"wrote {args.npz} (images uint8 [{n}, 8, 8], labels)")
    return 0


def add_sample_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `sample` to the `fastdiff` CLI (fastdiff/cli.py)."""
    from fastdiff.ops import BACKENDS
    from fastdiff.reference.solvers import SOLVERS
    from fastdiff.tune_cli import plan_file

    p = subparsers.add_parser("sample", help="generate digits with the embedded model",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", type=_parse_labels, default=_parse_labels("all"),
                   help="digits to draw, e.g. '0,3,7' or '0-9' (default: 0..9 ten times)")
    ve = sorted(k for k, v in SOLVERS.items() if v.param == "ve")
    p.add_argument("--solver", default="dpmpp_2m", choices=ve, metavar="NAME",
                   help="a VE solver of fastdiff.reference.solvers.SOLVERS (default dpmpp_2m)")
    p.add_argument("--steps", type=_positive_int, default=20, help="solver steps (default 20)")
    p.add_argument("--guidance", type=_finite, default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE})")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--backend", default="auto", choices=("auto", *BACKENDS),
                   help="kernel backend of the fused engine")
    p.add_argument("--graph", action="store_true", help="capture the loop in one CUDA graph")
    p.add_argument("--reference", action="store_true",
                   help="run the reference solver function instead of the fused engine")
    p.add_argument("--device", type=torch_device, default=None,
                   help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32",
                                                          "float64"])
    p.add_argument("--out", type=_image_file, default="digits.png",
                   help="grid image (PNG; default digits.png)")
    p.add_argument("--npz", type=_output_file, default=None,
                   help="also save uint8 images [N, 8, 8] and labels to this .npz")
    p.add_argument("--plan", type=plan_file, default=None,
                   help="a tuned plan file (`fastdiff tune`): its solver and sigmas")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_sample, parser=p)
    return p
