"""Triton kernel of the fused linear combination (reference: fastdiff/reference/lincomb.py).

out_j = sum_k coef[row, j, k] * in_k over flat arrays of one dense layout. Memory-bound: each
element is read once per input and written once per output. The row is an int or is read from a
device scalar, so a captured CUDA graph can replay the same launch for every step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _madd(acc0, acc1, X, C, k, valid, offs, mask, NIN: tl.constexpr, NOUT: tl.constexpr):
    """acc_j += coef[j, k] * x_k for the loaded block of input k."""
    x = tl.load(X + offs, mask=mask, other=0.0).to(acc0.dtype)
    c0 = tl.where(valid, tl.load(C + k).to(acc0.dtype), float("nan"))
    acc0 += c0 * x
    if NOUT > 1:
        c1 = tl.where(valid, tl.load(C + NIN + k).to(acc0.dtype), float("nan"))
        acc1 += c1 * x
    return acc0, acc1


@triton.jit
def lincomb_kernel(
    X0, X1, X2, X3, X4, X5,  # input pointers, each [N]; slots >= NIN are unused
    Y0, Y1,  # output pointers, each [N]; Y1 unused when NOUT == 1
    COEF,  # coefficient table [rows, NOUT, NIN], contiguous, fp32 (fp64 for fp64 data)
    ROW_PTR,  # int64 device scalar holding the row (read when HAS_ROW_PTR)
    row,  # row index used when not HAS_ROW_PTR
    rows,  # number of rows of COEF (out-of-range row -> NaN output)
    N,  # elements per tensor
    NIN: tl.constexpr,
    NOUT: tl.constexpr,
    HAS_ROW_PTR: tl.constexpr,
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
    C = COEF + tl.where(valid, r, 0) * (NOUT * NIN)
    # The sum starts from the first term (not from +0) so a zero result keeps its sign.
    x = tl.load(X0 + offs, mask=mask, other=0.0).to(COEF.dtype.element_ty)
    acc0 = tl.where(valid, tl.load(C), float("nan")).to(COEF.dtype.element_ty) * x
    acc1 = acc0
    if NOUT > 1:
        acc1 = tl.where(valid, tl.load(C + NIN), float("nan")).to(COEF.dtype.element_ty) * x
    if NIN > 1:
        acc0, acc1 = _madd(acc0, acc1, X1, C, 1, valid, offs, mask, NIN, NOUT)
    if NIN > 2:
        acc0, acc1 = _madd(acc0, acc1, X2, C, 2, valid, offs, mask, NIN, NOUT)
    if NIN > 3:
        acc0, acc1 = _madd(acc0, acc1, X3, C, 3, valid, offs, mask, NIN, NOUT)
    if NIN > 4:
        acc0, acc1 = _madd(acc0, acc1, X4, C, 4, valid, offs, mask, NIN, NOUT)
    if NIN > 5:
        acc0, acc1 = _madd(acc0, acc1, X5, C, 5, valid, offs, mask, NIN, NOUT)
    tl.store(Y0 + offs, acc0.to(Y0.dtype.element_ty), mask=mask)
    if NOUT > 1:
        tl.store(Y1 + offs, acc1.to(Y1.dtype.element_ty), mask=mask)


def lincomb(
    inputs: Sequence[torch.Tensor],
    coef: torch.Tensor,
    row: int,
    row_tensor: torch.Tensor | None,
    outputs: Sequence[torch.Tensor],
) -> None:
    """Launches the kernel; fastdiff.ops has validated shapes, dtypes, devices and layout."""
    n = inputs[0].numel()
    if n == 0:
        return
    x = list(inputs) + [inputs[0]] * (6 - len(inputs))
    y = list(outputs) + [outputs[0]] * (2 - len(outputs))
    grid = (triton.cdiv(n, BLOCK),)
    lincomb_kernel[grid](
        *x, *y, coef, row_tensor if row_tensor is not None else coef, row, coef.shape[0], n,
        NIN=len(inputs), NOUT=len(outputs), HAS_ROW_PTR=row_tensor is not None, BLOCK=BLOCK,
        num_warps=8,
    )
