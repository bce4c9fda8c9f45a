"""Triton kernel of dynamic thresholding's per-sample quantile (reference:
fastdiff/reference/threshold.py; Saharia et al. 2022, Sec. 2.3).

One program per sample runs an exact radix select on the keys of |w| (the bit patterns of
non-negative floats, which order like the floats), MSB first, 8 bits a pass: each pass
histograms the digit of the keys that match the digits chosen so far (tl.histogram) and picks
the bin holding the wanted rank. 4 passes (8 for fp64) give the order statistic of rank lo
exactly; one more pass counts the keys <= it and finds the next larger key, which gives rank
hi. w is recomputed from the inputs on each pass (L2-resident for latent-sized samples).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from fastdiff.kernels import device_guard

BLOCK = 1024
BINS = tl.constexpr(256)  # radix: 8 bits a pass


@triton.jit
def _keys(X0, X1, X2, X3, X4, X5, c0, c1, c2, c3, c4, c5, offs, mask, NIN: tl.constexpr,
          KEY: tl.constexpr, KEY_MAX: tl.constexpr):
    """Keys of |w| for one block of a sample; masked lanes get KEY_MAX (above every number)."""
    w = c0 * tl.load(X0 + offs, mask=mask, other=0.0).to(c0.dtype)
    if NIN > 1:
        w += c1 * tl.load(X1 + offs, mask=mask, other=0.0).to(c0.dtype)
    if NIN > 2:
        w += c2 * tl.load(X2 + offs, mask=mask, other=0.0).to(c0.dtype)
    if NIN > 3:
        w += c3 * tl.load(X3 + offs, mask=mask, other=0.0).to(c0.dtype)
    if NIN > 4:
        w += c4 * tl.load(X4 + offs, mask=mask, other=0.0).to(c0.dtype)
    if NIN > 5:
        w += c5 * tl.load(X5 + offs, mask=mask, other=0.0).to(c0.dtype)
    key = tl.abs(w).to(KEY, bitcast=True)
    return tl.where(mask, key, tl.full(key.shape, KEY_MAX, KEY))


@triton.jit
def _coef(C, k: tl.constexpr, valid, NIN: tl.constexpr):
    """Pre-clip coefficient k (NaN for an out-of-range row; unused slots repeat slot 0)."""
    if k < NIN:
        c = tl.load(C + k)
    else:
        c = tl.load(C)
    return tl.where(valid, c, float("nan")).to(C.dtype.element_ty)


# No specialisation on values: 1 or a zero bit pattern must stay a runtime integer (and each
# row would otherwise compile its own kernel).
@triton.jit(do_not_specialize=["row", "rows", "lo", "hi", "weight_bits", "max_value_bits"])
def dynamic_threshold_kernel(
    X0, X1, X2, X3, X4, X5,  # input pointers, each [batch * N]; slots >= NIN are unused
    COEF,  # coefficient table [rows, out_rows, width], contiguous, fp32 (fp64 for fp64 data)
    ROW_PTR,  # int64 device scalar holding the row (read when HAS_ROW_PTR)
    row,  # row index used when not HAS_ROW_PTR
    rows,  # number of rows of COEF (out-of-range row -> NaN)
    out_rows,  # COEF.shape[1]: the pre-clip row is the last
    width,  # COEF.shape[2]
    N,  # elements per sample (the batch dim is outermost in memory)
    lo,  # rank of the lower order statistic (quantile_rank)
    hi,  # rank of the upper one: lo or lo + 1
    weight_bits,  # weight of the upper one, as the bit pattern of a float64
    max_value_bits,  # upper clamp of s, as the bit pattern of a float64
    OUT,  # [batch, 2] (s, s), COEF's dtype
    NIN: tl.constexpr,
    HAS_ROW_PTR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    ACC: tl.constexpr = COEF.dtype.element_ty
    KEY: tl.constexpr = tl.int64 if ACC == tl.float64 else tl.int32
    KEY_BITS: tl.constexpr = 64 if ACC == tl.float64 else 32
    # |w| has a zero sign bit, so its keys are non-negative as signed ints, as is KEY_MAX.
    KEY_MAX: tl.constexpr = 0x7FFFFFFFFFFFFFFF if ACC == tl.float64 else 0x7FFFFFFF
    KEY_INF: tl.constexpr = 0x7FF0000000000000 if ACC == tl.float64 else 0x7F800000
    pid = tl.program_id(0).to(tl.int64)
    base = pid * N
    if HAS_ROW_PTR:
        r = tl.load(ROW_PTR)
    else:
        r = row
    valid = (r >= 0) & (r < rows)
    C = COEF + (tl.where(valid, r, 0) * out_rows + out_rows - 1) * width
    c0 = _coef(C, 0, valid, NIN)
    c1 = _coef(C, 1, valid, NIN)
    c2 = _coef(C, 2, valid, NIN)
    c3 = _coef(C, 3, valid, NIN)
    c4 = _coef(C, 4, valid, NIN)
    c5 = _coef(C, 5, valid, NIN)

    weight = weight_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)  # exact

    bins = tl.arange(0, BINS)
    prefix = tl.full((), 0, KEY)  # digits chosen so far
    chosen = tl.full((), 0, KEY)  # mask of the bits they cover
    k = lo.to(tl.int64)  # the wanted rank among the keys matching prefix
    equal = tl.full((), 0, tl.int64)
    for p in range(KEY_BITS // 8):
        shift = KEY_BITS - 8 - 8 * p
        hist = tl.zeros((BINS,), tl.int32)
        for start in range(0, N, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < N
            keys = _keys(X0, X1, X2, X3, X4, X5, c0, c1, c2, c3, c4, c5, base + offs, mask, NIN,
                         KEY, KEY_MAX)
            digit = ((keys >> shift) & 0xFF).to(tl.int32)
            hist += tl.histogram(digit, BINS, mask=mask & ((keys & chosen) == prefix))
        inclusive = tl.cumsum(hist, 0).to(tl.int64)
        d = tl.sum((inclusive <= k).to(tl.int32), 0)  # first bin whose cumulative count > k
        below = tl.sum(tl.where(bins < d, hist, 0).to(tl.int64), 0)
        equal = tl.sum(tl.where(bins == d, hist, 0).to(tl.int64), 0)
        prefix = prefix | (d.to(KEY) << shift)
        chosen = chosen | (tl.full((), 0xFF, KEY) << shift)
        k = k - below

    # Rank hi: the same key while lo + 1 stays among the keys equal to it, else the next one.
    nan = tl.full((), 0, tl.int32)
    above = tl.full((), KEY_MAX, KEY)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < N
        keys = _keys(X0, X1, X2, X3, X4, X5, c0, c1, c2, c3, c4, c5, base + offs, mask, NIN, KEY,
                     KEY_MAX)
        nan += tl.sum(((keys > KEY_INF) & mask).to(tl.int32), 0)
        above = tl.minimum(above, tl.min(tl.where(keys > prefix, keys, KEY_MAX), 0))
    key_hi = tl.where((hi == lo) | (k + 1 < equal), prefix, above)
    v_lo = prefix.to(ACC, bitcast=True)
    v_hi = key_hi.to(ACC, bitcast=True)
    # torch.lerp's formula (ATen/native/Lerp.h), then clamp(s, 1, max_value) as torch.clamp
    small = (weight < 0.5) & (weight > -0.5)
    s = tl.where(small, v_lo + weight * (v_hi - v_lo), v_hi - (v_hi - v_lo) * (1.0 - weight))
    s = tl.where(nan > 0, float("nan"), s)  # torch.quantile: NaN in, NaN out
    s = tl.where(s < 1.0, 1.0, s)
    top = max_value_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
    s = tl.where(s > top, top, s).to(ACC)
    tl.store(OUT + 2 * pid, s)
    tl.store(OUT + 2 * pid + 1, s)


def _bits(value: float) -> int:
    """The float64 bit pattern of a non-negative float, as an int. Triton passes Python floats
    as fp32 (the interpreter leaves them untyped): fp64 data needs its values exactly."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


def quantile_rank(n: int, ratio: float, dtype: torch.dtype) -> tuple[int, int, float]:
    """torch.quantile's 'linear' rule (aten/src/ATen/native/Sorting.cpp): rank q (n - 1) in
    the data's dtype; the two ranks around it and the weight of the upper one. On the host, as
    in csrc/include/fastdiff/threshold.h: a GPU compiler would fuse q (n - 1) - lo into an FMA."""
    pos = torch.tensor(ratio, dtype=dtype) * (n - 1)
    lo = int(pos)  # pos >= 0: truncation is floor
    hi, weight = lo + int(float(pos) > lo), float(pos - lo)
    # beyond 2^24 elements fp32 may round n - 1 up: stay inside the sample
    return min(lo, n - 1), min(hi, n - 1), weight


def dynamic_threshold(
    inputs: Sequence[torch.Tensor],
    coef: torch.Tensor,
    row: int,
    row_tensor: torch.Tensor | None,
    ratio: float,
    max_value: float,
    out: torch.Tensor,
) -> None:
    """Launches the kernel; fastdiff.ops has validated shapes, dtypes, devices and layout."""
    batch = inputs[0].shape[0]
    if batch == 0:
        return
    x = list(inputs) + [inputs[0]] * (6 - len(inputs))
    n = inputs[0].numel() // batch
    lo, hi, weight = quantile_rank(n, ratio, coef.dtype)
    with device_guard(inputs[0]):
        # enable_fp_fusion=False: w is the step kernel's pre-clip combination to the bit
        dynamic_threshold_kernel[(batch,)](
            *x, coef, row_tensor if row_tensor is not None else coef, row, coef.shape[0],
            coef.shape[1], coef.shape[2], n, lo, hi, _bits(weight), _bits(max_value), out,
            NIN=len(inputs), HAS_ROW_PTR=row_tensor is not None, BLOCK=BLOCK, num_warps=8,
            enable_fp_fusion=False,
        )
