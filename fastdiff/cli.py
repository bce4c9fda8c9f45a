"""The `fastdiff` command line: info, compare, sample, tune, generate, train, bench (each handler
lives beside the feature it drives; this file only assembles the parser)."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from fastdiff.info import collect, render

    info = collect()
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"sizes joined by 'x' expected (e.g. 2x4x64x64), got"
                                         f" {text!r}")
    return shape


def torch_device(text: str):
    """--device: a torch device that exists here (checked before any work starts)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"cpu, cuda or cuda:N expected, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available (torch"
                                             f" {torch.__version__})")
        if (device.index or 0) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA"
                                             " device(s) here")
    return device


def _cmd_compare(args: argparse.Namespace) -> int:
    """Runs the fused linear combination on every available backend: error and time."""
    import torch
    from torch.utils.benchmark import Timer

    from fastdiff.ops import BACKENDS, lincomb, unavailable_reason

    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    shape = args.shape
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(shape, generator=g).to(device, dtype) for _ in range(4)]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    coef = torch.randn(1, 2, 4, generator=g, dtype=torch.float64)
    exact = [sum(coef[0, j, k] * xs[k].double() for k in range(4)) for j in range(2)]
    coef = coef.to(device, acc)
    nbytes = 6 * xs[0].numel() * xs[0].element_size()
    print(f"lincomb: 4 inputs -> 2 outputs, {'x'.join(map(str, shape))} {args.dtype} on"
          f" {device}"
          f" ({nbytes / 1e6:.1f} MB moved per call)")
    print(f"  {'backend':<12}{'max |err| vs fp64':>20}{'time / call':>16}{'GB/s':>10}")
    for backend in BACKENDS:
        if why := unavailable_reason(backend, device):
            print(f"  {backend:<12}unavailable: {why}")
            continue
        out = lincomb(xs, coef, backend=backend)
        err = max((o.double() - e.to(device)).abs().max().item() for o, e in zip(out, exact))
        t = Timer("lincomb(xs, coef, backend=b)", globals=dict(lincomb=lincomb, xs=xs, coef=coef,
                                                              b=backend)).blocked_autorange()
        print(f"  {backend:<12}{err:>20.3e}{t.median * 1e6:>13.1f} us"
              f"{nbytes / t.median / 1e9:>10.1f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, devices and backend availability")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("compare", help="run the fused linear combination on every backend")
    p.add_argument("--shape", type=_shape, default="2x4x64x64",
                   help="tensor shape, e.g. 2x4x64x64")
    p.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32",
                                                          "float64"])
    p.add_argument("--device", type=torch_device, default=None,
                   help="cpu or cuda (default: cuda if available)")
    p.set_defaults(func=_cmd_compare)
    from fastdiff.bench import add_bench_parser
    from fastdiff.generate import add_generate_parser
    from fastdiff.sample_cli import add_sample_parser
    from fastdiff.train import add_train_parser
    from fastdiff.tune_cli import add_tune_parser

    add_sample_parser(sub)
    add_generate_parser(sub)
    add_train_parser(sub)
    add_tune_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
