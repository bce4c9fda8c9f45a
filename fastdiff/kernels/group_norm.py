"""Triton kernels of the fused GroupNorm(+scale/shift)(+SiLU) (reference:
fastdiff/reference/group_norm.py).

Three launches, none of them one program per (sample, group), so batch 1 still fills the GPU:
  1. partial moments (count, mean, M2) of chunks: NCHW chunks are runs of one group's contiguous
     values; channels-last chunks are [pixels, channels] tiles (coalesced rows of C) giving
     per-channel moments;
  2. per (sample, group): merge the chunk moments (parallel formula of Chan, Golub & LeVeque
     1979, no sum-of-squares cancellation) into mean and 1 / sqrt(var + eps);
  3. elementwise y = (x - mean) * a + b (a, b per sample and channel), then SiLU.
Statistics in fp32 (fp64 for fp64 data), whatever the storage dtype.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from fastdiff.kernels import device_guard

TILE = 4096  # values per program (stats chunk, apply tile)


@triton.jit
def stats_nchw_kernel(
    X,  # input [N * G, M]: each group's values are contiguous
    PN, PMEAN, PM2,  # partial moments [N * G, K]
    M,  # values per group: C / G * HW
    K,  # chunks per group
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    unit, k = pid // K, pid % K
    offs = k * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    acc = PMEAN.dtype.element_ty
    x = tl.load(X + unit * M + offs, mask=mask, other=0.0).to(acc)
    # Sum relative to the chunk's first value: stays small for data with a large mean.
    ref = tl.load(X + unit * M + k * BLOCK).to(acc)
    n = tl.sum(mask.to(acc), axis=0)
    mean = ref + tl.sum(tl.where(mask, x - ref, 0.0), axis=0) / n
    d = tl.where(mask, x - mean, 0.0)
    tl.store(PN + pid, n)
    tl.store(PMEAN + pid, mean)
    tl.store(PM2 + pid, tl.sum(d * d, axis=0))


@triton.jit
def stats_channels_last_kernel(
    X,  # input [N, HW, C], channels innermost
    PN, PMEAN, PM2,  # per-channel partial moments [N, KP, C]
    HW, C,
    KP,  # pixel tiles per sample
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n, kp = pid // KP, pid % KP
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = kp * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = (p[:, None] < HW) & (c[None, :] < C)
    acc = PMEAN.dtype.element_ty
    x = tl.load(X + (n * HW + p[:, None]) * C + c[None, :], mask=mask, other=0.0).to(acc)
    # Sums relative to the tile's first pixel row (always in range): exact for large means.
    ref = tl.load(X + (n * HW + kp * BLOCK_P) * C + c, mask=c < C, other=0.0).to(acc)
    cnt = tl.sum((p < HW).to(acc), axis=0)
    mean = ref + tl.sum(tl.where(mask, x - ref[None, :], 0.0), axis=0) / cnt
    d = tl.where(mask, x - mean[None, :], 0.0)
    dst = (n * KP + kp) * C + c
    cmask = c < C
    tl.store(PN + dst, tl.zeros_like(mean) + cnt, mask=cmask)
    tl.store(PMEAN + dst, mean, mask=cmask)
    tl.store(PM2 + dst, tl.sum(d * d, axis=0), mask=cmask)


@triton.jit(do_not_specialize=["eps_bits"])
def finalize_kernel(
    PN, PMEAN, PM2,  # partial moments
    MEAN, RSTD,  # outputs [N * G]
    G,
    SN, SG, SK,  # partial (sample, group, chunk) strides; the J values of a chunk are contiguous
    KJ,  # partials per group: chunks x J
    J,  # consecutive partials per chunk (1 for NCHW, C / G for channels-last)
    eps_bits,  # eps as the bit pattern of a float64 (Triton would type a Python float fp32)
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    base = (pid // G) * SN + (pid % G) * SG
    acc = PMEAN.dtype.element_ty
    # Mean of the partial means weighted by their counts, shifted by the first one (exact for
    # inputs with a large mean).
    ref = tl.load(PMEAN + base)
    sn = tl.zeros([BLOCK], dtype=acc)
    sd = tl.zeros([BLOCK], dtype=acc)
    for i0 in range(0, KJ, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        mask = i < KJ
        off = base + (i // J) * SK + i % J
        pn = tl.load(PN + off, mask=mask, other=0.0)
        sn += pn
        sd += pn * (tl.load(PMEAN + off, mask=mask, other=0.0) - ref)
    count = tl.sum(sn, axis=0)
    mean = ref + tl.sum(sd, axis=0) / count
    sm = tl.zeros([BLOCK], dtype=acc)
    for i0 in range(0, KJ, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        mask = i < KJ
        off = base + (i // J) * SK + i % J
        pn = tl.load(PN + off, mask=mask, other=0.0)
        d = tl.load(PMEAN + off, mask=mask, other=0.0) - mean
        sm += tl.load(PM2 + off, mask=mask, other=0.0) + pn * d * d
    var = tl.sum(sm, axis=0) / count
    eps = eps_bits.to(tl.int64).to(tl.float64, bitcast=True).to(acc)  # rounded once, as torch
    tl.store(MEAN + pid, mean)
    tl.store(RSTD + pid, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _normalise(x, mean, rstd, W, B, S, T, c, nc, cmask,
               HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_S: tl.constexpr,
               HAS_T: tl.constexpr, SILU: tl.constexpr):
    """y = (x - mean) * rstd * gamma * (1 + scale) + beta * (1 + scale) + shift, then SiLU."""
    a = rstd
    b = tl.zeros_like(rstd)
    if HAS_W:
        a = a * tl.load(W + c, mask=cmask, other=1.0).to(rstd.dtype)
    if HAS_B:
        b = b + tl.load(B + c, mask=cmask, other=0.0).to(rstd.dtype)
    if HAS_S:
        s1 = 1.0 + tl.load(S + nc, mask=cmask, other=0.0).to(rstd.dtype)
        a = a * s1
        b = b * s1
    if HAS_T:
        b = b + tl.load(T + nc, mask=cmask, other=0.0).to(rstd.dtype)
    y = (x - mean) * a + b
    if SILU:  # y * sigmoid(y), with exp of a non-positive argument only (no overflow)
        e = tl.exp(-tl.abs(y))
        r = 1.0 / (1.0 + e)
        y = y * tl.where(y >= 0, r, e * r)
    return y


@triton.jit
def apply_nchw_kernel(
    X, Y,  # input and output [N * C, HW]
    W, B,  # weight, bias [C] (unused unless HAS_W / HAS_B)
    S, T,  # scale, shift [N, C] (unused unless HAS_S / HAS_T)
    MEAN, RSTD,  # group statistics [N * G]
    C, HW, CG,
    NC,  # planes: N * C
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_S: tl.constexpr, HAS_T: tl.constexpr,
    SILU: tl.constexpr,
    PLANES: tl.constexpr,  # planes (n, c) per program: one affine map each, no per-value division
    BLOCK: tl.constexpr,  # values per plane per program
):
    plane = tl.program_id(0).to(tl.int64) * PLANES + tl.arange(0, PLANES)
    pmask = plane < NC
    c = plane % C
    g = (plane // C) * (C // CG) + c // CG
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = pmask[:, None] & (offs[None, :] < HW)
    mean = tl.load(MEAN + g, mask=pmask, other=0.0)
    rstd = tl.load(RSTD + g, mask=pmask, other=0.0)
    off = plane[:, None] * HW + offs[None, :]
    x = tl.load(X + off, mask=mask, other=0.0).to(mean.dtype)
    y = _normalise(x, mean[:, None], rstd[:, None], W, B, S, T, c[:, None], plane[:, None],
                   pmask[:, None], HAS_W, HAS_B, HAS_S, HAS_T, SILU)
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def apply_channels_last_kernel(
    X, Y,  # input and output [N, HW, C], channels innermost
    W, B, S, T,  # as in apply_nchw_kernel
    MEAN, RSTD,  # group statistics [N * G]
    C, HW, CG,
    KP,  # pixel tiles per sample
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_S: tl.constexpr, HAS_T: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n, kp = pid // KP, pid % KP
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = kp * BLOCK_P + tl.arange(0, BLOCK_P)
    cmask = c < C
    mask = (p[:, None] < HW) & cmask[None, :]
    g = n * (C // CG) + c // CG
    mean = tl.load(MEAN + g, mask=cmask, other=0.0)
    rstd = tl.load(RSTD + g, mask=cmask, other=0.0)
    off = (n * HW + p[:, None]) * C + c[None, :]
    x = tl.load(X + off, mask=mask, other=0.0).to(mean.dtype)
    y = _normalise(x, mean[None, :], rstd[None, :], W, B, S, T, c[None, :],
                   n * C + c[None, :], cmask[None, :], HAS_W, HAS_B, HAS_S, HAS_T, SILU)
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)


def _bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _tile(C: int) -> tuple[int, int]:
    """[pixels, channels] tile of TILE values for channels-last."""
    block_c = min(triton.next_power_of_2(C), 256)
    return max(1, TILE // block_c), block_c


def group_norm(
    x: torch.Tensor,
    y: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    silu: bool,
    channels_last: bool,
) -> None:
    """Launches the kernels; fastdiff.ops has validated everything and made x, y dense in one
    layout (NCHW, or channels innermost when channels_last), weight/bias [C] and scale/shift
    [N, C] contiguous."""
    with device_guard(x):
        _launch(x, y, num_groups, weight, bias, eps, scale, shift, silu, channels_last)


# enable_fp_fusion=False on every launch: products and sums rounded one by one, as the reference
# and the native backends compute them (no FMA contraction; memory-bound, so it costs nothing).
def _launch(x, y, num_groups, weight, bias, eps, scale, shift, silu, channels_last) -> None:
    N, C = x.shape[0], x.shape[1]
    HW = x.numel() // (N * C)
    G, CG = num_groups, C // num_groups
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if channels_last:
        block_p, block_c = _tile(C)
        kp = triton.cdiv(HW, block_p)
        parts = [torch.empty((N, kp, C), device=x.device, dtype=acc) for _ in range(3)]
        stats_channels_last_kernel[(N * kp, triton.cdiv(C, block_c))](
            x, *parts, HW, C, kp, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=8,
            enable_fp_fusion=False)
        strides, kj, j = (kp * C, CG, C), kp * CG, CG
    else:
        block = min(TILE, triton.next_power_of_2(CG * HW))
        k = triton.cdiv(CG * HW, block)
        parts = [torch.empty((N * G, k), device=x.device, dtype=acc) for _ in range(3)]
        stats_nchw_kernel[(N * G * k,)](x, *parts, CG * HW, k, BLOCK=block, num_warps=8,
                                        enable_fp_fusion=False)
        strides, kj, j = (G * k, k, 1), k, 1
    mean = torch.empty(N * G, device=x.device, dtype=acc)
    rstd = torch.empty_like(mean)
    finalize_kernel[(N * G,)](*parts, mean, rstd, G, *strides, kj, j, _bits(eps),
                              BLOCK=min(1024, triton.next_power_of_2(kj)), enable_fp_fusion=False)
    dummy = mean  # any pointer for the absent parameters (never read)
    params = [t if t is not None else dummy for t in (weight, bias, scale, shift)]
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_S=scale is not None,
                 HAS_T=shift is not None, SILU=silu)
    if channels_last:
        apply_channels_last_kernel[(N * kp, triton.cdiv(C, block_c))](
            x, y, *params, mean, rstd, C, HW, CG, kp, **flags, BLOCK_P=block_p, BLOCK_C=block_c,
            num_warps=8, enable_fp_fusion=False)
    else:
        block = min(TILE, triton.next_power_of_2(HW))
        planes = TILE // block
        apply_nchw_kernel[(triton.cdiv(N * C, planes), triton.cdiv(HW, block))](
            x, y, *params, mean, rstd, C, HW, CG, N * C, **flags, PLANES=planes, BLOCK=block,
            num_warps=8, enable_fp_fusion=False)
