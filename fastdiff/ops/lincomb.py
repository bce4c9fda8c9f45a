"""The fused linear combination op: validation (once, here), layout handling and dispatch to
{reference, cpu, cuda, triton}, registered with torch.library so torch.compile traces it.

    out_j = sum_k coef[row, j, k] * in_k  +  sum_m coef[row, j, num_in + m] * z_m

with optional in-kernel Gaussian noise z_m (Philox, keyed by per-sample seeds, a counter per
term and the element within the sample: fastdiff/reference/noise.py).

`coef` is a device table [rows, num_out, num_in]; `row` is an int or an int64 device scalar, so
the same call works for every step of a solver and inside a captured CUDA graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastdiff import _native
from fastdiff.ops._backends import resolve
from fastdiff.reference.lincomb import lincomb as lincomb_reference

MAX_INPUTS = 6
MAX_OUTPUTS = 2
MAX_NOISE = 2
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _layout(t: torch.Tensor) -> tuple:
    """Strides that matter (size-1 dims can carry any stride without changing the layout)."""
    return tuple(s for s, n in zip(t.stride(), t.shape) if n != 1)


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: some permutation of the dims is C-contiguous."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _no_internal_overlap(t: torch.Tensor) -> bool:
    """No two elements share memory (sufficient test: each dim, by increasing stride, steps past
    the extent of the smaller ones), e.g. a strided slice, unlike an expanded view."""
    extent = 0
    for stride, size in sorted((abs(s), n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride <= extent:
            return False
        extent += (size - 1) * stride
    return True


def _span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range [begin, end) that `t` can touch."""
    extent = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()) if n > 0) + 1
    begin = t.data_ptr()
    return begin, begin + extent * t.element_size()


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def _validate_noise(noise, x0) -> tuple[torch.Tensor | None, list[int]]:
    if noise is None:
        return None, []
    if not isinstance(noise, tuple | list) or len(noise) != 2:
        raise TypeError("noise must be a pair (seeds, counters)")
    seeds, counters = noise
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or seeds.dim() != 1:
        raise TypeError("noise seeds must be a 1-D int64 tensor with one seed per sample")
    if x0.dim() == 0 or seeds.numel() != x0.shape[0]:
        raise ValueError(f"noise seeds must have one entry per sample (inputs[0].shape[0] ="
                         f" {x0.shape[0] if x0.dim() else 'no batch dim'}), got {seeds.numel()}")
    if seeds.device != x0.device:
        raise ValueError(f"noise seeds are on {seeds.device}, expected {x0.device}")
    counters = list(counters)
    if not 1 <= len(counters) <= MAX_NOISE:
        raise ValueError(f"noise counters must hold 1 or {MAX_NOISE} ints, got {len(counters)}")
    for c in counters:
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < 2**32:
            raise ValueError(f"noise counters must be ints in [0, 2**32), got {c!r}")
    return seeds.contiguous(), counters


def _validate(inputs, coef, row, out, noise=None):
    if isinstance(inputs, torch.Tensor) or not isinstance(inputs, Sequence):
        raise TypeError(f"inputs must be a list or tuple of tensors, got {type(inputs).__name__}")
    if not 1 <= len(inputs) <= MAX_INPUTS:
        raise ValueError(f"inputs must hold 1 to {MAX_INPUTS} tensors, got {len(inputs)}")
    for k, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"inputs[{k}] must be a torch.Tensor, got {type(t).__name__}")
    x0 = inputs[0]
    if x0.dtype not in FLOAT_DTYPES:
        raise TypeError(f"inputs[0] must be float16, bfloat16, float32 or float64, got {x0.dtype}")
    for k, t in enumerate(inputs[1:], 1):
        if t.dtype != x0.dtype:
            raise TypeError(f"inputs[{k}] has dtype {t.dtype}, expected {x0.dtype} like inputs[0]")
        if t.device != x0.device:
            raise ValueError(f"inputs[{k}] is on {t.device}, expected {x0.device} like inputs[0]")
        if t.shape != x0.shape:
            raise ValueError(f"inputs[{k}] has shape {tuple(t.shape)}, expected {tuple(x0.shape)}"
                             " like inputs[0]")

    if not isinstance(coef, torch.Tensor):
        raise TypeError(f"coef must be a torch.Tensor, got {type(coef).__name__}")
    if coef.dim() != 3:
        raise ValueError(f"coef must have shape [rows, num_out, num_in], got {tuple(coef.shape)}")
    seeds, counters = _validate_noise(noise, x0)
    rows, num_out, width = coef.shape
    if width != len(inputs) + len(counters):
        raise ValueError(f"coef.shape[2] must equal len(inputs) + noise terms ="
                         f" {len(inputs) + len(counters)}, got {width}")
    if not 1 <= num_out <= MAX_OUTPUTS:
        raise ValueError(f"coef.shape[1] (number of outputs) must be 1 or 2, got {num_out}")
    if rows < 1:
        raise ValueError("coef must have at least one row")
    want = torch.float64 if x0.dtype == torch.float64 else torch.float32
    if coef.dtype != want:
        raise TypeError(f"coef must be {want} for {x0.dtype} inputs (it sets the accumulation"
                        f" precision), got {coef.dtype}")
    if coef.device != x0.device:
        raise ValueError(f"coef is on {coef.device}, expected {x0.device} like the inputs")

    row_tensor = None
    if isinstance(row, torch.Tensor):
        if row.dtype != torch.int64 or row.numel() != 1:
            raise TypeError(f"row as a tensor must be a single int64 element, got {row.dtype}"
                            f" with {row.numel()} elements")
        if row.device != x0.device:
            raise ValueError(f"row is on {row.device}, expected {x0.device} like the inputs")
        row_tensor, row = row, 0
    elif isinstance(row, bool) or not isinstance(row, int):
        raise TypeError(f"row must be an int or an int64 tensor, got {type(row).__name__}")
    elif not 0 <= row < rows:
        raise ValueError(f"row must be in [0, {rows}) for coef with {rows} rows, got {row}")

    if out is not None:
        if isinstance(out, torch.Tensor) or not isinstance(out, Sequence):
            raise TypeError(f"out must be a list or tuple of tensors, got {type(out).__name__}")
        if len(out) != num_out:
            raise ValueError(f"out must hold coef.shape[1] = {num_out} tensors, got {len(out)}")
        for j, o in enumerate(out):
            if not isinstance(o, torch.Tensor):
                raise TypeError(f"out[{j}] must be a torch.Tensor, got {type(o).__name__}")
            if o.dtype != x0.dtype or o.device != x0.device or o.shape != x0.shape:
                raise ValueError(f"out[{j}] must match the inputs ({tuple(x0.shape)}, {x0.dtype},"
                                 f" {x0.device}), got ({tuple(o.shape)}, {o.dtype}, {o.device})")
    return list(inputs), coef.contiguous(), row, row_tensor, out, seeds, counters


def _check_out_aliasing(inputs, out) -> None:
    """Outputs may be an input exactly (an in-place update), never a partial overlap."""
    for j, o in enumerate(out):
        if o.numel() > 1 and not _no_internal_overlap(o):
            raise ValueError(f"out[{j}] must not be an overlapping (e.g. expanded) view")
        for k, t in enumerate(inputs):
            same = t.data_ptr() == o.data_ptr() and _layout(t) == _layout(o)
            if not same and _overlaps(o, t):
                raise ValueError(f"out[{j}] partially overlaps inputs[{k}]: pass the same tensor"
                                 " for an in-place update, or a separate buffer")
        for i, other in enumerate(out[:j]):
            if _overlaps(o, other):
                raise ValueError(f"out[{j}] overlaps out[{i}]")


def _launch_native(inputs, coef, row, row_tensor, outs, seeds, counters) -> None:
    device = inputs[0].device
    if device.type == "cuda":
        index, stream = device.index, torch.cuda.current_stream(device).cuda_stream
    else:
        index, stream = -1, 0
    _native.module().lincomb(
        _native.DTYPE_CODES[inputs[0].dtype], index, [t.data_ptr() for t in inputs],
        [o.data_ptr() for o in outs], coef.data_ptr(),
        row_tensor.data_ptr() if row_tensor is not None else 0, row, coef.shape[0],
        inputs[0].numel(), stream, seeds.data_ptr() if seeds is not None else 0,
        inputs[0].numel() // inputs[0].shape[0] if counters else 1, counters,
    )


def _launch_triton(inputs, coef, row, row_tensor, outs, seeds, counters) -> None:
    from fastdiff.kernels.lincomb import lincomb as lincomb_triton

    lincomb_triton(inputs, coef, row, row_tensor, outs, seeds, counters)


_LAUNCHERS = {"cpu": _launch_native, "cuda": _launch_native, "triton": _launch_triton}


def _run(inputs, coef, row, row_tensor, out, backend: str, seeds=None, counters=()
         ) -> list[torch.Tensor]:
    """Validated arguments in, results out (written into `out` when given)."""
    x0 = inputs[0]
    backend = resolve(backend, x0.device)
    if backend == "reference":
        ref_x0 = x0 if _is_dense(x0) else torch.empty_like(x0)  # noise follows the kernels' layout
        noise = (seeds, counters) if counters else None
        results = lincomb_reference([ref_x0.copy_(x0) if ref_x0 is not x0 else x0, *inputs[1:]],
                                    coef, row_tensor if row_tensor is not None else row, noise)
        if out is None:
            return results
        for o, r in zip(out, results):
            o.copy_(r)
        return list(out)
    # The kernels see flat arrays: every tensor must share one dense layout, that of
    # empty_like(inputs[0]) (inputs[0]'s own when it is dense, e.g. channels-last).
    ref = x0 if _is_dense(x0) else torch.empty_like(x0)
    outs = [torch.empty_like(ref) for _ in range(coef.shape[1])] if out is None else list(out)
    layout = _layout(ref)
    flat_in = [t if _layout(t) == layout and _is_dense(t) else torch.empty_like(ref).copy_(t)
               for t in inputs]
    flat_out = [o if _layout(o) == layout and _is_dense(o) else torch.empty_like(ref)
                for o in outs]
    if x0.numel() > 0:
        _LAUNCHERS[backend](flat_in, coef, row, row_tensor, flat_out, seeds, counters)
    for o, f in zip(outs, flat_out):
        if o is not f:
            o.copy_(f)
    return outs


def launch_unchecked(inputs, coef, row: int, outs, backend: str, seeds=None, counters=()) -> None:
    """The kernel launch without validation, for callers that guarantee what lincomb() checks
    (the sampling engine, per stage): same shape, dtype and device; one dense layout shared by
    every input and output; `coef` [rows, len(outs), len(inputs) + len(counters)] contiguous in
    the accumulation dtype; `backend` already resolved; outputs fresh or exactly an input."""
    if backend == "reference":
        _run(list(inputs), coef, row, None, outs, backend, seeds, counters)
    else:
        _LAUNCHERS[backend](inputs, coef, row, None, outs, seeds, counters)


def same_dense_layout(tensors: Sequence[torch.Tensor]) -> bool:
    """True when all tensors share one dense layout (what launch_unchecked needs)."""
    first = tensors[0]
    return _is_dense(first) and all(t.stride() == first.stride() for t in tensors[1:])


def lincomb(
    inputs: Sequence[torch.Tensor],
    coef: torch.Tensor,
    row: int | torch.Tensor = 0,
    *,
    out: Sequence[torch.Tensor] | None = None,
    noise: tuple[torch.Tensor, Sequence[int]] | None = None,
    backend: str = "auto",
) -> list[torch.Tensor]:
    """Fused linear combination ``out_j = sum_k coef[row, j, k] * inputs[k]`` (+ noise terms).

    Args:
        inputs: 1 to 6 tensors of one shape, dtype (fp16/bf16/fp32/fp64) and device; any
            strides (tensors not sharing inputs[0]'s dense layout are copied into it first).
        coef: [rows, num_out, num_in + num_noise] table, num_out in {1, 2}, float32 (float64
            for float64 inputs: the accumulation precision), on the inputs' device.
        row: which row of `coef` to use: an int, or an int64 device scalar (no host sync; an
            out-of-range device row yields NaN outputs instead of reading out of bounds).
        out: optional num_out tensors to write; each may be one of the inputs (in place).
        noise: optional (seeds, counters): per-sample int64 seeds [batch] and 1-2 counters;
            term m is the standard normal z(seeds[b], counters[m], element within sample b),
            generated in-kernel, the same on every backend and in any batch.
        backend: "auto", "reference", "cpu", "cuda" or "triton" (see `fastdiff info`).

    Returns:
        The num_out results (the `out` tensors when given). The inputs are never modified
        unless passed as `out`.
    """
    inputs, coef, row, row_tensor, out, seeds, counters = _validate(inputs, coef, row, out, noise)
    if torch.compiler.is_compiling():
        if out is None:
            return torch.ops.fastdiff.lincomb(inputs, coef, row_tensor, row, backend, seeds,
                                              counters)
        torch.ops.fastdiff.lincomb_out(inputs, coef, row_tensor, row, backend, list(out), seeds,
                                       counters)
        return list(out)
    if out is not None:
        _check_out_aliasing(inputs, out)
    return _run(inputs, coef, row, row_tensor, out, backend, seeds, counters)


# torch.library registration: torch.compile traces these instead of the Python above.
@torch.library.custom_op("fastdiff::lincomb", mutates_args=())
def _lincomb_op(
    inputs: list[torch.Tensor], coef: torch.Tensor, row_tensor: torch.Tensor | None, row: int,
    backend: str, seeds: torch.Tensor | None = None, counters: list[int] | None = None,
) -> list[torch.Tensor]:
    return _run(inputs, coef, row, row_tensor, None, backend, seeds, counters or [])


@_lincomb_op.register_fake
def _(inputs, coef, row_tensor, row, backend, seeds=None, counters=None):
    return [torch.empty_like(inputs[0]) for _ in range(coef.shape[1])]


@torch.library.custom_op("fastdiff::lincomb_out", mutates_args=("out",))
def _lincomb_out_op(
    inputs: list[torch.Tensor], coef: torch.Tensor, row_tensor: torch.Tensor | None, row: int,
    backend: str, out: list[torch.Tensor], seeds: torch.Tensor | None = None,
    counters: list[int] | None = None,
) -> None:
    _run(inputs, coef, row, row_tensor, out, backend, seeds, counters or [])


@_lincomb_out_op.register_fake
def _(inputs, coef, row_tensor, row, backend, out, seeds=None, counters=None):
    return None
