"""Triton kernel of the fused linear combination (reference: fastdiff/reference/lincomb.py).

out_j = sum_k coef[row, j, k] * in_k (+ in-kernel Philox noise terms) (+ a clipped term
coef[row, j, -1] * clamp(w, -b_n, b_n) / d_n, w the pre-clip row's combination of the inputs)
over flat arrays of one dense layout. Memory-bound: each element is read once per input and
written once per output. The row is an int or is read from a device scalar, so a captured CUDA
graph can replay the same launch for every step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from fastdiff.kernels import device_guard

BLOCK = 2048
# With in-kernel noise a thread holds the Philox state and the float64 Box-Muller of each of its
# elements: 8 elements a thread (2048 on 8 warps) hits 255 registers and spills (ptxas, sm_90,
# tests/_triton_aot.py); 4 a thread stays near 170 registers, spill-free.
NOISE_BLOCK = 1024


@triton.jit
def _coef(C, valid, j, k, WIDTH: tl.constexpr, dtype: tl.constexpr):
    """coef[row, j, k] in the accumulation dtype; NaN when the row is out of range."""
    return tl.where(valid, tl.load(C + j * WIDTH + k).to(dtype), float("nan"))


@triton.jit
def _madd(acc0, acc1, acc2, accw, X, C, k, valid, offs, mask, WIDTH: tl.constexpr,
          NOUT: tl.constexpr, CLIP: tl.constexpr):
    """acc_j += coef[j, k] * x_k (and w += coef[NOUT, k] * x_k) for the block of input k."""
    x = tl.load(X + offs, mask=mask, other=0.0).to(acc0.dtype)
    acc0 += _coef(C, valid, 0, k, WIDTH, acc0.dtype) * x
    if NOUT > 1:
        acc1 += _coef(C, valid, 1, k, WIDTH, acc0.dtype) * x
    if NOUT > 2:
        acc2 += _coef(C, valid, 2, k, WIDTH, acc0.dtype) * x
    if CLIP:
        accw += _coef(C, valid, NOUT, k, WIDTH, acc0.dtype) * x
    return acc0, acc1, acc2, accw


@triton.jit
def clip_value(w, bound, divisor):
    """clamp(w, -bound, bound) / divisor with torch.clamp's NaN semantics (NaN in w or the bound
    stays NaN; a negative bound yields the bound), the division correctly rounded."""
    y = tl.where(w < -bound, -bound, w)
    y = tl.where(y > bound, bound, y)
    y = tl.where(bound != bound, bound, y)
    if y.dtype == tl.float32:
        return tl.math.div_rn(y, divisor)  # plain `/` is an approximate division for fp32
    else:
        return y / divisor


@triton.jit
def _mulhilo(a, b):
    return tl.umulhi(a, b), a * b


@triton.jit
def philox_normal(seed, counter, element):
    """Philox4x32-10 + Box-Muller in float64, as csrc/include/fastdiff/philox.h."""
    c0 = (element & 0xFFFFFFFF).to(tl.uint32)
    c1 = (element >> 32).to(tl.uint32)
    c2 = tl.full(c0.shape, 0, tl.uint32) + counter.to(tl.uint32)
    c3 = tl.full(c0.shape, 0x66646966, tl.uint32)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        hi0, lo0 = _mulhilo(tl.full(c0.shape, 0xD2511F53, tl.uint32), c0)
        hi1, lo1 = _mulhilo(tl.full(c0.shape, 0xCD9E8D57, tl.uint32), c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    u1 = (c0.to(tl.float64) + 1.0) * 2.3283064365386963e-10
    u2 = c1.to(tl.float64) * 2.3283064365386963e-10
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)


@triton.jit
def _madd_noise(acc0, acc1, acc2, C, k, valid, seed, counter, element, NOUT: tl.constexpr,
                WIDTH: tl.constexpr):
    """acc_j += coef[j, k] * z for the in-kernel noise term with this counter."""
    z = philox_normal(seed, counter, element).to(acc0.dtype)
    acc0 += _coef(C, valid, 0, k, WIDTH, acc0.dtype) * z
    if NOUT > 1:
        acc1 += _coef(C, valid, 1, k, WIDTH, acc0.dtype) * z
    if NOUT > 2:
        acc2 += _coef(C, valid, 2, k, WIDTH, acc0.dtype) * z
    return acc0, acc1, acc2


@triton.jit
def _report_nonfinite(FLAG, stage, y, mask):
    """flag = min(flag, stage) if the stored block y holds an inf or NaN (one atomic per block,
    only when it does)."""
    bad = ((y != y) | (tl.abs(y) == float("inf"))) & mask
    tl.atomic_min(FLAG, stage, mask=tl.max(bad.to(tl.int32), axis=0) > 0)


# Ints equal to 1 are not specialised into constants: counters are noise indices 0, 1, 2, ...
# (a constant 1 has no .to()), and each row would otherwise compile its own kernel; the stage
# is an atomic's operand.
@triton.jit(do_not_specialize=["row", "rows", "counter0", "counter1", "stage"])
def lincomb_kernel(
    X0, X1, X2, X3, X4, X5,  # input pointers, each [N]; slots >= NIN are unused
    Y0, Y1, Y2,  # output pointers, each [N]; slots >= NOUT are unused
    COEF,  # coefficients [rows, NOUT + CLIP, WIDTH], contiguous, fp32 (fp64 for fp64 data)
    ROW_PTR,  # int64 device scalar holding the row (read when HAS_ROW_PTR)
    row,  # row index used when not HAS_ROW_PTR
    rows,  # number of rows of COEF (out-of-range row -> NaN output)
    N,  # elements per tensor
    SEEDS,  # int64 per-sample Philox seeds [batch] (read when NNOISE > 0)
    sample_numel,  # elements per sample (the batch dim is outermost in memory)
    counter0,  # Philox counter of noise term 0
    counter1,  # Philox counter of noise term 1
    CLIP_PTR,  # per-sample (bound, divisor) [batch, 2], coefficient dtype (read when CLIP)
    FLAG,  # int32 [1] non-finite guard: lowered to `stage` on an inf/NaN output (HAS_FLAG)
    stage,  # this launch's stage index
    NIN: tl.constexpr,
    NOUT: tl.constexpr,
    NNOISE: tl.constexpr,
    CLIP: tl.constexpr,  # 1: fused x0 clipping (pre-clip row NOUT, clipped-term column last)
    HAS_ROW_PTR: tl.constexpr,
    HAS_FLAG: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    if HAS_ROW_PTR:
        r = tl.load(ROW_PTR)
    else:
        r = row
    valid = (r >= 0) & (r < rows)
    WIDTH = NIN + NNOISE + CLIP  # coefficients per output row (a constexpr)
    C = COEF + tl.where(valid, r, 0) * ((NOUT + CLIP) * WIDTH)
    # The sum starts from the first term (not from +0) so a zero result keeps its sign.
    x = tl.load(X0 + offs, mask=mask, other=0.0).to(COEF.dtype.element_ty)
    acc0 = tl.where(valid, tl.load(C), float("nan")).to(COEF.dtype.element_ty) * x
    acc1 = acc0
    if NOUT > 1:
        acc1 = _coef(C, valid, 1, 0, WIDTH, acc0.dtype) * x
    acc2 = acc0
    if NOUT > 2:
        acc2 = _coef(C, valid, 2, 0, WIDTH, acc0.dtype) * x
    accw = acc0
    if CLIP:
        accw = _coef(C, valid, NOUT, 0, WIDTH, acc0.dtype) * x
    if NIN > 1:
        acc0, acc1, acc2, accw = _madd(acc0, acc1, acc2, accw, X1, C, 1, valid, offs, mask,
                                       WIDTH, NOUT, CLIP)
    if NIN > 2:
        acc0, acc1, acc2, accw = _madd(acc0, acc1, acc2, accw, X2, C, 2, valid, offs, mask,
                                       WIDTH, NOUT, CLIP)
    if NIN > 3:
        acc0, acc1, acc2, accw = _madd(acc0, acc1, acc2, accw, X3, C, 3, valid, offs, mask,
                                       WIDTH, NOUT, CLIP)
    if NIN > 4:
        acc0, acc1, acc2, accw = _madd(acc0, acc1, acc2, accw, X4, C, 4, valid, offs, mask,
                                       WIDTH, NOUT, CLIP)
    if NIN > 5:
        acc0, acc1, acc2, accw = _madd(acc0, acc1, acc2, accw, X5, C, 5, valid, offs, mask,
                                       WIDTH, NOUT, CLIP)
    if NNOISE > 0:
        sample = offs // sample_numel
        seed = tl.load(SEEDS + sample, mask=mask, other=0)
        element = offs - sample * sample_numel
        acc0, acc1, acc2 = _madd_noise(acc0, acc1, acc2, C, NIN, valid, seed, counter0, element,
                                       NOUT, WIDTH)
        if NNOISE > 1:
            acc0, acc1, acc2 = _madd_noise(acc0, acc1, acc2, C, NIN + 1, valid, seed, counter1,
                                           element, NOUT, WIDTH)
    if CLIP:
        sample = offs // sample_numel
        bound = tl.load(CLIP_PTR + 2 * sample, mask=mask, other=1.0)
        divisor = tl.load(CLIP_PTR + 2 * sample + 1, mask=mask, other=1.0)
        y = clip_value(accw, bound, divisor)
        acc0 += _coef(C, valid, 0, WIDTH - 1, WIDTH, acc0.dtype) * y
        if NOUT > 1:
            acc1 += _coef(C, valid, 1, WIDTH - 1, WIDTH, acc0.dtype) * y
        if NOUT > 2:
            acc2 += _coef(C, valid, 2, WIDTH - 1, WIDTH, acc0.dtype) * y
    y0 = acc0.to(Y0.dtype.element_ty)
    tl.store(Y0 + offs, y0, mask=mask)
    if HAS_FLAG:
        _report_nonfinite(FLAG, stage, y0, mask)
    if NOUT > 1:
        y1 = acc1.to(Y1.dtype.element_ty)
        tl.store(Y1 + offs, y1, mask=mask)
        if HAS_FLAG:
            _report_nonfinite(FLAG, stage, y1, mask)
    if NOUT > 2:
        y2 = acc2.to(Y2.dtype.element_ty)
        tl.store(Y2 + offs, y2, mask=mask)
        if HAS_FLAG:
            _report_nonfinite(FLAG, stage, y2, mask)


def lincomb(
    inputs: Sequence[torch.Tensor],
    coef: torch.Tensor,
    row: int,
    row_tensor: torch.Tensor | None,
    outputs: Sequence[torch.Tensor],
    seeds: torch.Tensor | None = None,
    counters: Sequence[int] = (),
    clip: torch.Tensor | None = None,
    flag: torch.Tensor | None = None,
    stage: int = 0,
) -> None:
    """Launches the kernel; fastdiff.ops has validated shapes, dtypes, devices and layout."""
    n = inputs[0].numel()
    if n == 0:
        return
    x = list(inputs) + [inputs[0]] * (6 - len(inputs))
    y = list(outputs) + [outputs[0]] * (3 - len(outputs))
    block = NOISE_BLOCK if counters else BLOCK
    grid = (triton.cdiv(n, block),)
    c = list(counters) + [0] * (2 - len(counters))
    with device_guard(inputs[0]):
        # enable_fp_fusion=False: no FMA contraction, each product and sum rounded as the
        # reference, cpu and cuda backends round them (bitwise-equal results)
        lincomb_kernel[grid](
            *x, *y, coef, row_tensor if row_tensor is not None else coef, row, coef.shape[0], n,
            seeds if seeds is not None else coef,
            n // inputs[0].shape[0] if counters or clip is not None else 1, *c,
            clip if clip is not None else coef, flag if flag is not None else coef, stage,
            NIN=len(inputs), NOUT=len(outputs), NNOISE=len(counters), CLIP=int(clip is not None),
            HAS_ROW_PTR=row_tensor is not None, HAS_FLAG=flag is not None, BLOCK=block,
            num_warps=8, enable_fp_fusion=False,
        )
