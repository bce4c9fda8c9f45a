"""The fused linear combination op: validation (once, here), layout handling and dispatch to
{reference, cpu, cuda, triton}, registered with torch.library so torch.compile traces it.

    out_j = sum_k coef[row, j, k] * in_k  +  sum_m coef[row, j, num_in + m] * z_m

with optional in-kernel Gaussian noise z_m (Philox, keyed by per-sample seeds, a counter per
term and the element within the sample: fastdiff/reference/noise.py), and optional fused x0
clipping (`clip`: per-sample bound and divisor; fastdiff/reference/lincomb.py has the formula).

`coef` is a device table [rows, num_out, num_in]; `row` is an int or an int64 device scalar, so
the same call works for every step of a solver and inside a captured CUDA graph.

Non-finite guard (`flag`, `stage`): a launch whose output holds an inf or NaN lowers the int32
device scalar `flag` to `stage` (an atomic min, on every backend), so after a run of many
launches the flag holds the first bad stage, or NO_NONFINITE; nothing is read on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastdiff import _native
from fastdiff.ops._backends import native_target, resolve, traced
from fastdiff.reference.lincomb import lincomb as lincomb_reference

MAX_INPUTS = 6
MAX_OUTPUTS = 3  # a UniPC step's three new tensors in one launch (csrc kLincombMaxOut)
MAX_NOISE = 2
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NO_NONFINITE = 2**31 - 1  # the flag's value while no output was non-finite (csrc kNoNonfinite)


def nonfinite_flag(device: torch.device | str) -> torch.Tensor:
    """A fresh non-finite flag on `device` (a device fill: no host-to-device copy)."""
    return torch.full((1,), NO_NONFINITE, dtype=torch.int32, device=device)


def _validate_flag(flag, stage, x0) -> None:
    if flag is None:
        return
    if not isinstance(flag, torch.Tensor) or flag.dtype != torch.int32 or flag.numel() != 1 \
            or not flag.is_contiguous():
        raise TypeError("flag must be a one-element int32 tensor (fastdiff.ops.lincomb."
                        "nonfinite_flag)")
    if flag.device != x0.device:
        raise ValueError(f"flag is on {flag.device}, expected {x0.device} like the inputs")
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < NO_NONFINITE:
        raise ValueError(f"stage must be an int in [0, 2**31 - 1), got {stage!r}")


def mark_nonfinite(outputs: Sequence[torch.Tensor], flag: torch.Tensor, stage: int) -> None:
    """The reference of the guard: flag = min(flag, stage) if any output is inf or NaN, by
    device ops only (no host read)."""
    bad = torch.stack([~torch.isfinite(o).all() for o in outputs]).any()
    flag.copy_(torch.where(bad, flag.clamp(max=stage), flag))


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


def _batch_outermost(t: torch.Tensor) -> bool:
    """Dense with dim 0 outermost in memory: sample n is the flat range [n, n + 1) * numel / B
    (what per-sample clipping needs; noise needs only a shared layout)."""
    if t.dim() == 0 or t.shape[0] <= 1:
        return _is_dense(t)
    return _is_dense(t) and t.stride(0) == t.numel() // t.shape[0]


def kernel_layout(x0: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """The tensor whose dense layout the kernels use: inputs[0] when it has a usable one (with
    per_sample, each sample must be a contiguous range), else empty_like's (contiguous or
    channels-last: batch outermost either way)."""
    usable = _batch_outermost(x0) if per_sample else _is_dense(x0)
    if usable:
        return x0
    if _is_dense(x0):  # dense but with the batch dim inside: fall back to contiguous
        return torch.empty_like(x0, memory_format=torch.contiguous_format)
    return torch.empty_like(x0)


def to_layout(tensors: Sequence[torch.Tensor], ref: torch.Tensor) -> list[torch.Tensor]:
    """The tensors in ref's dense layout: the ones already in it as they are, others copied."""
    layout = _layout(ref)
    return [t if _layout(t) == layout and _is_dense(t) else torch.empty_like(ref).copy_(t)
            for t in tensors]


def _validate_clip(clip, x0, acc: torch.dtype) -> torch.Tensor | None:
    if clip is None:
        return None
    if not isinstance(clip, torch.Tensor):
        raise TypeError(f"clip must be a torch.Tensor [batch, 2] of per-sample (bound, divisor),"
                        f" got {type(clip).__name__}")
    if x0.dim() == 0:
        raise ValueError("clip needs inputs with a batch dim (dim 0), got a 0-d inputs[0]")
    if tuple(clip.shape) != (x0.shape[0], 2):
        raise ValueError(f"clip must have shape [batch, 2] = [{x0.shape[0]}, 2] (per-sample bound,"
                         f" divisor), got {tuple(clip.shape)}")
    if not clip.dtype.is_floating_point:
        raise TypeError(f"clip must be a floating-point tensor (converted to {acc}), got"
                        f" {clip.dtype}")
    if clip.device != x0.device:
        raise ValueError(f"clip is on {clip.device}, expected {x0.device} like the inputs")
    return clip.to(acc).contiguous()


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


def validate_inputs(inputs) -> torch.Tensor:
    """1 to 6 float tensors of one shape, dtype and device; returns inputs[0]."""
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
    return x0


def validate_coef_placement(coef: torch.Tensor, x0: torch.Tensor) -> torch.dtype:
    """The accumulation dtype (float64 for float64 inputs, else float32), which coef must have,
    on the inputs' device."""
    acc = torch.float64 if x0.dtype == torch.float64 else torch.float32
    if coef.dtype != acc:
        raise TypeError(f"coef must be {acc} for {x0.dtype} inputs (it sets the accumulation"
                        f" precision), got {coef.dtype}")
    if coef.device != x0.device:
        raise ValueError(f"coef is on {coef.device}, expected {x0.device} like the inputs")
    return acc


def validate_row(row, rows: int, device: torch.device) -> tuple[int, torch.Tensor | None]:
    """(row, None) for an int row in [0, rows), (0, row) for an int64 device scalar."""
    if isinstance(row, torch.Tensor):
        if row.dtype != torch.int64 or row.numel() != 1:
            raise TypeError(f"row as a tensor must be a single int64 element, got {row.dtype}"
                            f" with {row.numel()} elements")
        if row.device != device:
            raise ValueError(f"row is on {row.device}, expected {device} like the inputs")
        return 0, row
    if isinstance(row, bool) or not isinstance(row, int):
        raise TypeError(f"row must be an int or an int64 tensor, got {type(row).__name__}")
    if not 0 <= row < rows:
        raise ValueError(f"row must be in [0, {rows}) for coef with {rows} rows, got {row}")
    return row, None


def _validate(inputs, coef, row, out, noise=None, clip=None):
    x0 = validate_inputs(inputs)
    if not isinstance(coef, torch.Tensor):
        raise TypeError(f"coef must be a torch.Tensor, got {type(coef).__name__}")
    if coef.dim() != 3:
        raise ValueError(f"coef must have shape [rows, num_out, num_in], got {tuple(coef.shape)}")
    seeds, counters = _validate_noise(noise, x0)
    clipped = clip is not None  # one more output row (pre-clip) and column (clipped term)
    rows, num_out, width = coef.shape
    num_out -= clipped
    if width != len(inputs) + len(counters) + clipped:
        raise ValueError(f"coef.shape[2] must equal len(inputs) + noise terms"
                         f"{' + 1 (the clipped term)' if clipped else ''} ="
                         f" {len(inputs) + len(counters) + clipped}, got {width}")
    if not 1 <= num_out <= MAX_OUTPUTS:
        what = "number of outputs + 1 pre-clip row" if clipped else "number of outputs"
        raise ValueError(f"coef.shape[1] ({what}) must be {1 + clipped} to"
                         f" {MAX_OUTPUTS + clipped} (at most {MAX_OUTPUTS} outputs per launch),"
                         f" got {coef.shape[1]}")
    if rows < 1:
        raise ValueError("coef must have at least one row")
    want = validate_coef_placement(coef, x0)
    clip = _validate_clip(clip, x0, want)

    row, row_tensor = validate_row(row, rows, x0.device)

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
    return list(inputs), coef.contiguous(), row, row_tensor, out, seeds, counters, clip


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


def _launch_native(inputs, coef, row, row_tensor, outs, seeds, counters, clip, flag=None,
                   stage=0) -> None:
    index, stream = native_target(inputs[0].device)
    _native.module().lincomb(
        _native.DTYPE_CODES[inputs[0].dtype], index, [t.data_ptr() for t in inputs],
        [o.data_ptr() for o in outs], coef.data_ptr(),
        row_tensor.data_ptr() if row_tensor is not None else 0, row, coef.shape[0],
        inputs[0].numel(), stream, seeds.data_ptr() if seeds is not None else 0,
        inputs[0].numel() // inputs[0].shape[0] if counters or clip is not None else 1, counters,
        clip.data_ptr() if clip is not None else 0,
        flag.data_ptr() if flag is not None else 0, stage,
    )


def _launch_triton(inputs, coef, row, row_tensor, outs, seeds, counters, clip, flag=None,
                   stage=0) -> None:
    from fastdiff.kernels.lincomb import lincomb as lincomb_triton

    lincomb_triton(inputs, coef, row, row_tensor, outs, seeds, counters, clip, flag, stage)


_LAUNCHERS = {"cpu": _launch_native, "cuda": _launch_native, "triton": _launch_triton}


def _run(inputs, coef, row, row_tensor, out, backend: str, seeds=None, counters=(), clip=None,
         flag=None, stage=0) -> list[torch.Tensor]:
    """Validated arguments in, results out (written into `out` when given)."""
    x0 = inputs[0]
    backend = resolve(backend, x0.device)
    num_out = coef.shape[1] - (clip is not None)
    # The kernels see flat arrays: every tensor must share one dense layout, inputs[0]'s own
    # when it is dense (e.g. channels-last; with clipping also batch-outermost), else
    # empty_like's. The noise follows that layout on every backend.
    ref = kernel_layout(x0, clip is not None)
    if backend == "reference":
        noise = (seeds, counters) if counters else None
        results = lincomb_reference([ref.copy_(x0) if ref is not x0 else x0, *inputs[1:]],
                                    coef, row_tensor if row_tensor is not None else row, noise,
                                    clip)
        if flag is not None:
            mark_nonfinite(results, flag, stage)
        if out is None:
            return results
        for o, r in zip(out, results):
            o.copy_(r)
        return list(out)
    outs = [torch.empty_like(ref) for _ in range(num_out)] if out is None else list(out)
    layout = _layout(ref)
    flat_in = to_layout(inputs, ref)
    flat_out = [o if _layout(o) == layout and _is_dense(o) else torch.empty_like(ref)
                for o in outs]
    if x0.numel() > 0:
        _LAUNCHERS[backend](flat_in, coef, row, row_tensor, flat_out, seeds, counters, clip, flag,
                            stage)
    for o, f in zip(outs, flat_out):
        if o is not f:
            o.copy_(f)
    return outs


def launch_unchecked(inputs, coef, row: int, outs, backend: str, seeds=None, counters=(),
                     clip=None, flag=None, stage: int = 0) -> None:
    """The kernel launch without validation, for callers that guarantee what lincomb() checks
    (the sampling engine, per stage): same shape, dtype and device; one dense layout shared by
    every input and output (batch-outermost with `clip`); `coef` [rows, len(outs) (+ 1),
    len(inputs) + len(counters) (+ 1)] contiguous in the accumulation dtype; `clip` None or
    [batch, 2] contiguous in that dtype; `backend` already resolved; outputs fresh or exactly
    an input; `flag` None or an int32 [1] on the inputs' device (nonfinite_flag)."""
    if traced(inputs[0]):  # torch.compile, fake tensors: the registered op, its contract checked
        check_unchecked_launch(inputs, coef, outs, seeds, clip)
        check_one_device([inputs[0], flag])
        torch.ops.fastdiff.lincomb_out(list(inputs), coef, None, row, backend, list(outs), seeds,
                                       list(counters), clip, flag, stage)
    elif backend == "reference":
        _run(list(inputs), coef, row, None, outs, backend, seeds, counters, clip, flag, stage)
    else:
        _LAUNCHERS[backend](inputs, coef, row, None, outs, seeds, counters, clip, flag, stage)


def check_unchecked_launch(inputs, coef, outs, seeds=None, clip=None) -> None:
    """What launch_unchecked's callers guarantee, checked from metadata alone (run where tensors
    are fake or traced: a CPU test on "cuda" fake tensors then fails on what would make a
    kernel read the wrong memory on a GPU)."""
    tensors = [*inputs, *outs]
    first = tensors[0]
    if any(t.shape != first.shape or t.dtype != first.dtype for t in tensors):
        raise RuntimeError("launch_unchecked: inputs and outputs must share shape and dtype")
    if not same_dense_layout(tensors, batch_outermost=clip is not None):
        raise RuntimeError("launch_unchecked: inputs and outputs must share one dense layout"
                           f" (strides {[t.stride() for t in tensors]})")
    if not coef.is_contiguous():
        raise RuntimeError("launch_unchecked: coef must be contiguous")
    if seeds is not None and (not seeds.is_contiguous() or seeds.dtype != torch.int64
                              or seeds.shape != first.shape[:1]):
        raise RuntimeError(f"launch_unchecked: seeds must be a contiguous int64 [batch] tensor"
                           f" (the kernels read them densely), got {seeds.dtype}"
                           f" {tuple(seeds.shape)} strides {seeds.stride()}")
    if clip is not None and (not clip.is_contiguous() or clip.dtype != coef.dtype):
        raise RuntimeError("launch_unchecked: clip must be contiguous, in coef's dtype")
    check_one_device([*tensors, coef, seeds, clip])


def check_one_device(tensors) -> None:
    """Every tensor a kernel reads by pointer on one device (None entries skipped): a host
    pointer read on a GPU is an illegal address, not an error message."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"a fastdiff kernel's tensors must be on one device, got"
                           f" {sorted(map(str, devices))}")


def same_dense_layout(tensors: Sequence[torch.Tensor], batch_outermost: bool = False) -> bool:
    """True when all tensors share one dense layout (what launch_unchecked needs); with
    batch_outermost, also one in which each sample is a contiguous range (needed with clip)."""
    first = tensors[0]
    dense = _batch_outermost(first) if batch_outermost else _is_dense(first)
    return dense and all(t.stride() == first.stride() for t in tensors[1:])


def lincomb(
    inputs: Sequence[torch.Tensor],
    coef: torch.Tensor,
    row: int | torch.Tensor = 0,
    *,
    out: Sequence[torch.Tensor] | None = None,
    noise: tuple[torch.Tensor, Sequence[int]] | None = None,
    clip: torch.Tensor | None = None,
    flag: torch.Tensor | None = None,
    stage: int = 0,
    backend: str = "auto",
) -> list[torch.Tensor]:
    """Fused linear combination ``out_j = sum_k coef[row, j, k] * inputs[k]`` (+ noise terms).

    Args:
        inputs: 1 to 6 tensors of one shape, dtype (fp16/bf16/fp32/fp64) and device; any
            strides (tensors not sharing inputs[0]'s dense layout are copied into it first).
        coef: [rows, num_out, num_in + num_noise] table, num_out in {1, 2, 3}, float32 (float64
            for float64 inputs: the accumulation precision), on the inputs' device.
        row: which row of `coef` to use: an int, or an int64 device scalar (no host sync; an
            out-of-range device row yields NaN outputs instead of reading out of bounds).
        out: optional num_out tensors to write; each may be one of the inputs (in place).
        noise: optional (seeds, counters): per-sample int64 seeds [batch] and 1-2 counters;
            term m is the standard normal z(seeds[b], counters[m], element within sample b),
            generated in-kernel, the same on every backend and in any batch.
        clip: optional [batch, 2] floating tensor of per-sample (bound b_n, divisor d_n), on
            the inputs' device (converted to the accumulation dtype): fused x0 clipping. coef
            is then [rows, num_out + 1, num_in + num_noise + 1]: its last output row is the
            pre-clip combination w of the inputs (its other columns are ignored), its last
            column weighs y = clamp(w, -b_n, b_n) / d_n, which is never rounded to the data
            dtype. clip_sample(r) is clip = (r, 1); dynamic thresholding is
            clip = fastdiff.ops.dynamic_threshold(...).
        flag: optional non-finite guard, a one-element int32 tensor on the inputs' device
            (`nonfinite_flag(device)`): lowered to `stage` (atomic min) if an output holds an
            inf or NaN; never read here (no sync).
        stage: the value the flag is lowered to (an int in [0, 2**31 - 1)).
        backend: "auto", "reference", "cpu", "cuda" or "triton" (see `fastdiff info`).

    Returns:
        The num_out results (the `out` tensors when given). The inputs are never modified
        unless passed as `out`.
    """
    inputs, coef, row, row_tensor, out, seeds, counters, clip = _validate(inputs, coef, row, out,
                                                                          noise, clip)
    _validate_flag(flag, stage, inputs[0])
    if traced(inputs[0]):
        if flag is not None:  # the functional op mutates nothing: write fresh outputs
            ref = kernel_layout(inputs[0], clip is not None)
            out = out if out is not None else [torch.empty_like(ref) for _ in
                                               range(coef.shape[1] - (clip is not None))]
            torch.ops.fastdiff.lincomb_out(inputs, coef, row_tensor, row, backend, list(out),
                                           seeds, counters, clip, flag, stage)
            return list(out)
        if out is None:
            return torch.ops.fastdiff.lincomb(inputs, coef, row_tensor, row, backend, seeds,
                                              counters, clip)
        torch.ops.fastdiff.lincomb_out(inputs, coef, row_tensor, row, backend, list(out), seeds,
                                       counters, clip)
        return list(out)
    if out is not None:
        _check_out_aliasing(inputs, out)
    return _run(inputs, coef, row, row_tensor, out, backend, seeds, counters, clip, flag, stage)


# torch.library registration: torch.compile traces these instead of the Python above.
@torch.library.custom_op("fastdiff::lincomb", mutates_args=())
def _lincomb_op(
    inputs: list[torch.Tensor], coef: torch.Tensor, row_tensor: torch.Tensor | None, row: int,
    backend: str, seeds: torch.Tensor | None = None, counters: list[int] | None = None,
    clip: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    return _run(inputs, coef, row, row_tensor, None, backend, seeds, counters or [], clip)


@_lincomb_op.register_fake
def _(inputs, coef, row_tensor, row, backend, seeds=None, counters=None, clip=None):
    check_one_device([*inputs, coef, row_tensor, seeds, clip])
    ref = kernel_layout(inputs[0], clip is not None)
    return [torch.empty_like(ref) for _ in range(coef.shape[1] - (clip is not None))]


@torch.library.custom_op("fastdiff::lincomb_out", mutates_args=("out", "flag"))
def _lincomb_out_op(
    inputs: list[torch.Tensor], coef: torch.Tensor, row_tensor: torch.Tensor | None, row: int,
    backend: str, out: list[torch.Tensor], seeds: torch.Tensor | None = None,
    counters: list[int] | None = None, clip: torch.Tensor | None = None,
    flag: torch.Tensor | None = None, stage: int = 0,
) -> None:
    _run(inputs, coef, row, row_tensor, out, backend, seeds, counters or [], clip, flag, stage)


@_lincomb_out_op.register_fake
def _(inputs, coef, row_tensor, row, backend, out, seeds=None, counters=None, clip=None,
      flag=None, stage=0):
    check_one_device([*inputs, *out, coef, row_tensor, seeds, clip, flag])
    return None
