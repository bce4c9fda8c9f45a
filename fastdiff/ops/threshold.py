"""Dynamic thresholding's per-sample quantile as an op: validation (once, here), layout handling
and dispatch to {reference, cpu, cuda, triton}, registered with torch.library.

    w    = sum_k coef[row, -1, k] * inputs[k]                      (k < num_in)
    s_n  = clamp(quantile(|w_n|, ratio), 1, max_value)             (per sample n, dim 0)
    clip = [[s_n, s_n]]                                            [batch, 2]

so that `lincomb(inputs, coef, row, clip=clip)` clips the predicted x0 exactly as diffusers'
`_threshold_sample` (Saharia et al. 2022, Imagen, Sec. 2.3) and fuses it into the step. The
quantile is exact (torch.quantile's 'linear' interpolation of two order statistics), computed
without a host sync, so the pair of launches can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fastdiff import _native
from fastdiff.ops._backends import native_target, resolve, traced
from fastdiff.ops.lincomb import (
    check_one_device,
    kernel_layout,
    to_layout,
    validate_coef_placement,
    validate_inputs,
    validate_row,
)
from fastdiff.reference.threshold import dynamic_threshold as dynamic_threshold_reference


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def _validate(inputs, coef, row, ratio, max_value, out):
    x0 = validate_inputs(inputs)
    if x0.dim() == 0:
        raise ValueError("dynamic_threshold needs inputs with a batch dim (dim 0), got 0-d")
    if x0.shape[0] > 0 and x0.numel() == 0:
        raise ValueError(f"dynamic_threshold needs at least one element per sample, got inputs"
                         f" of shape {tuple(x0.shape)}")
    if not isinstance(coef, torch.Tensor):
        raise TypeError(f"coef must be a torch.Tensor, got {type(coef).__name__}")
    if coef.dim() != 3 or coef.shape[0] < 1 or coef.shape[1] < 1:
        raise ValueError(f"coef must have shape [rows, out_rows, width] (the pre-clip row"
                         f" coef[row, -1]), got {tuple(coef.shape)}")
    if coef.shape[2] < len(inputs):
        raise ValueError(f"coef.shape[2] must be at least len(inputs) = {len(inputs)} (the"
                         f" pre-clip row's input columns), got {coef.shape[2]}")
    acc = validate_coef_placement(coef, x0)
    row, row_tensor = validate_row(row, coef.shape[0], x0.device)
    ratio = _number("ratio", ratio)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1] (a quantile), got {ratio}")
    max_value = _number("max_value", max_value)
    if math.isnan(max_value) or max_value <= 0:
        raise ValueError(f"max_value must be positive (s divides the clipped x0), got {max_value}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        want = (x0.shape[0], 2)
        if tuple(out.shape) != want or out.dtype != acc or out.device != x0.device \
                or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {list(want)} {acc} tensor on {x0.device},"
                             f" got {list(out.shape)} {out.dtype} on {out.device}")
    return list(inputs), coef.contiguous(), row, row_tensor, ratio, max_value, out


def _launch_native(inputs, coef, row, row_tensor, ratio, max_value, out) -> None:
    x0 = inputs[0]
    index, stream = native_target(x0.device)
    _native.module().dynamic_threshold(
        _native.DTYPE_CODES[x0.dtype], index, [t.data_ptr() for t in inputs], coef.data_ptr(),
        row_tensor.data_ptr() if row_tensor is not None else 0, row, coef.shape[0],
        coef.shape[1], coef.shape[2], x0.shape[0], x0.numel() // x0.shape[0], ratio, max_value,
        out.data_ptr(), stream,
    )


def _launch_triton(inputs, coef, row, row_tensor, ratio, max_value, out) -> None:
    from fastdiff.kernels.threshold import dynamic_threshold as dynamic_threshold_triton

    dynamic_threshold_triton(inputs, coef, row, row_tensor, ratio, max_value, out)


_LAUNCHERS = {"cpu": _launch_native, "cuda": _launch_native, "triton": _launch_triton}


def _run(inputs, coef, row, row_tensor, ratio, max_value, out, backend: str) -> torch.Tensor:
    """Validated arguments in, the [batch, 2] clip table out (written into `out` when given)."""
    x0 = inputs[0]
    backend = resolve(backend, x0.device)
    if out is None:
        out = torch.empty((x0.shape[0], 2), dtype=coef.dtype, device=x0.device)
    if x0.shape[0] == 0:  # no samples (torch.quantile refuses empty input)
        return out
    if backend == "reference":
        return out.copy_(dynamic_threshold_reference(
            inputs, coef, row_tensor if row_tensor is not None else row, ratio, max_value))
    # The kernels read sample n as the flat range [n, n + 1) * numel / batch of one dense
    # layout shared by the inputs (the order within a sample does not matter).
    flat = to_layout(inputs, kernel_layout(x0, per_sample=True))
    _LAUNCHERS[backend](flat, coef, row, row_tensor, ratio, max_value, out)
    return out


def dynamic_threshold(
    inputs: Sequence[torch.Tensor],
    coef: torch.Tensor,
    row: int | torch.Tensor,
    ratio: float,
    max_value: float,
    *,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-sample dynamic-thresholding bounds, as a lincomb `clip` table.

    Args:
        inputs: 1 to 6 tensors of one shape [batch, ...], dtype and device (as for lincomb);
            at least one element per sample.
        coef: [rows, out_rows, width] table in the accumulation dtype (float32; float64 for
            float64 inputs); w combines the inputs by coef[row, -1, :len(inputs)]: the pre-clip
            row of a lincomb clip table, or the only row of a [rows, 1, num_in] table.
        row: an int, or an int64 device scalar (no host sync; out of range gives NaN).
        ratio: the quantile of |w| per sample, in [0, 1] (diffusers'
            dynamic_thresholding_ratio, e.g. 0.995).
        max_value: upper clamp of s (diffusers' sample_max_value); s is at least 1.
        out: optional contiguous [batch, 2] tensor to write (accumulation dtype).
        backend: "auto", "reference", "cpu", "cuda" or "triton".

    Returns:
        [batch, 2] tensor of (s_n, s_n), s_n = clamp(quantile(|w_n|, ratio), 1, max_value):
        pass it as lincomb(..., clip=...) to compute clamp(w, -s_n, s_n) / s_n in the step.
    """
    inputs, coef, row, row_tensor, ratio, max_value, out = _validate(
        inputs, coef, row, ratio, max_value, out)
    if traced(inputs[0]):
        if out is None:
            return torch.ops.fastdiff.dynamic_threshold(inputs, coef, row_tensor, row, ratio,
                                                        max_value, backend)
        torch.ops.fastdiff.dynamic_threshold_out(inputs, coef, row_tensor, row, ratio, max_value,
                                                 backend, out)
        return out
    return _run(inputs, coef, row, row_tensor, ratio, max_value, out, backend)


def static_bounds(bound: float, batch: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """lincomb's `clip` for a fixed clamp(x0, -bound, bound): (bound, divisor 1) per sample,
    [batch, 2] in `dtype` (the accumulation dtype). Callers build it once per run setting, so
    no step pays a host-to-device copy. Built on the device by fills (no copy, no sync)."""
    return torch.cat([torch.full((batch, 1), bound, dtype=dtype, device=device),
                      torch.ones((batch, 1), dtype=dtype, device=device)], dim=1)


# torch.library registration: torch.compile traces these instead of the Python above.
@torch.library.custom_op("fastdiff::dynamic_threshold", mutates_args=())
def _dynamic_threshold_op(
    inputs: list[torch.Tensor], coef: torch.Tensor, row_tensor: torch.Tensor | None, row: int,
    ratio: float, max_value: float, backend: str,
) -> torch.Tensor:
    return _run(inputs, coef, row, row_tensor, ratio, max_value, None, backend)


@_dynamic_threshold_op.register_fake
def _(inputs, coef, row_tensor, row, ratio, max_value, backend):
    check_one_device([*inputs, coef, row_tensor])
    return coef.new_empty((inputs[0].shape[0], 2))


@torch.library.custom_op("fastdiff::dynamic_threshold_out", mutates_args=("out",))
def _dynamic_threshold_out_op(
    inputs: list[torch.Tensor], coef: torch.Tensor, row_tensor: torch.Tensor | None, row: int,
    ratio: float, max_value: float, backend: str, out: torch.Tensor,
) -> None:
    _run(inputs, coef, row, row_tensor, ratio, max_value, out, backend)


@_dynamic_threshold_out_op.register_fake
def _(inputs, coef, row_tensor, row, ratio, max_value, backend, out):
    check_one_device([*inputs, coef, row_tensor, out])
    return None
