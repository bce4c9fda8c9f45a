"""Triton flash-attention forward kernel (reference: fastdiff/reference/attention.py).

    O = softmax(Q K^T * scale) V        per (batch, head); Q [Sq, D], K, V [Skv, D]

FlashAttention (Dao et al. 2022, arXiv:2205.14135, Algorithm 1) in the style of Triton's tutorial
06-fused-attention: one program owns BLOCK_M query rows, streams K/V in BLOCK_N tiles and keeps
the online-softmax state (running max m, running sum l, unnormalised output acc) in fp32
registers, so the Sq x Skv score matrix never touches memory. exp2 with log2(e) folded into the
scale (one FMA per score); the key-length mask is applied only in the last, partial tile.

Head dims without padding to a power of two: tl.arange (and so every tile) needs a power-of-two
length, and tl.dot a K or N extent >= 16. The head dim is split as D = D0 + D1, D0 the largest
power of two <= D and D1 the remainder rounded up to a power of two >= 16, so QK^T is
Q0 K0^T + Q1 K1^T and the output is [acc0 | acc1]. Stable Diffusion's heads then cost
40 -> 32+16 (48 columns, not 64), 80 -> 64+16 (exact, not 128), 160 -> 128+32 (exact, not 256);
only the masked columns of D1 are wasted. (A "next multiple of 16" tile is not expressible in
Triton, whose block shapes are powers of two.)
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastdiff.kernels import device_guard
from fastdiff.ops._backends import triton_interpreter

LOG2E = 1.4426950408889634


def split_head_dim(d: int) -> tuple[int, int]:
    """(D0, D1): D0 the largest power of two <= d (at least 16), D1 the padded remainder
    (0 when d is a power of two)."""
    d0 = max(16, 1 << (d.bit_length() - 1))
    rest = d - d0
    return d0, (0 if rest <= 0 else max(16, triton.next_power_of_2(rest)))


@triton.jit
def _load_tile(ptr, offs_r, offs_c, stride_r, stride_c, mask_r, n_c,
               MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    """tile[r, c] = ptr[offs_r[r] * stride_r + offs_c[c] * stride_c], zero where masked."""
    ptrs = ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    if MASK_R and MASK_C:
        return tl.load(ptrs, mask=mask_r[:, None] & (offs_c[None, :] < n_c), other=0.0)
    elif MASK_R:
        return tl.load(ptrs, mask=mask_r[:, None], other=0.0)
    elif MASK_C:
        return tl.load(ptrs, mask=offs_c[None, :] < n_c, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _attn_tile(
    acc0, acc1, m_i, l_i, q0, q1, K, V, start_n, n_kv, qk_scale,
    stride_ks, stride_kd, stride_vs, stride_vd,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_N: tl.constexpr, PAD_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """One K/V tile of the online softmax (FlashAttention Algorithm 1, lines 9-13)."""
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64) + start_n  # int64: offs_n * stride_ks
    mask_n = offs_n < n_kv
    offs_d0 = tl.arange(0, D0)
    # K is loaded transposed ([D, BLOCK_N]) so the scores are a plain dot.
    k0 = _load_tile(K, offs_d0, offs_n, stride_kd, stride_ks, offs_d0 < HEAD_DIM, n_kv,
                    D0 > HEAD_DIM, MASK_N)
    qk = tl.dot(q0, k0, input_precision=PRECISION)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        k1 = _load_tile(K, offs_d1, offs_n, stride_kd, stride_ks, offs_d1 < HEAD_DIM, n_kv,
                        PAD_D, MASK_N)
        qk = tl.dot(q1, k1, qk, input_precision=PRECISION)
    if MASK_N:
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
    # Every tile holds at least one valid key, so m_new is finite and exp2(-inf) = 0 is exact.
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v0 = _load_tile(V, offs_n, offs_d0, stride_vs, stride_vd, mask_n, HEAD_DIM, MASK_N,
                    D0 > HEAD_DIM)
    acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=PRECISION)
    if D1 > 0:
        v1 = _load_tile(V, offs_n, offs_d1, stride_vs, stride_vd, mask_n, HEAD_DIM, MASK_N, PAD_D)
        acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=PRECISION)
    return acc0, acc1, m_new, l_i


@triton.jit
def attention_fwd_kernel(
    Q,  # queries [B, H, Sq, D], any strides
    K,  # keys [B, H, Skv, D], any strides
    V,  # values [B, H, Skv, D], any strides
    O,  # output [B, H, Sq, D], any strides
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    H,  # heads
    N_CTX_Q,  # Sq
    N_CTX_KV,  # Skv
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,  # D
    D0: tl.constexpr,  # power-of-two part of D
    D1: tl.constexpr,  # padded remainder of D (0: none)
    PAD_D: tl.constexpr,  # D0 + D1 > D: mask the remainder columns
    PRECISION: tl.constexpr,  # tl.dot input precision ("ieee" for fp32 data)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # B * H on axis 0 (2^31 - 1 programs; axis 1 stops at 65535), query tiles on axis 1
    off_bh = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1).to(tl.int64)
    off_b = off_bh // H
    off_h = off_bh % H
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    O += off_b * stride_ob + off_h * stride_oh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: offs_m * stride_qs
    mask_m = offs_m < N_CTX_Q
    offs_d0 = tl.arange(0, D0)
    q0 = _load_tile(Q, offs_m, offs_d0, stride_qs, stride_qd, mask_m, HEAD_DIM, True,
                    D0 > HEAD_DIM)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    q1 = q0  # placeholders when D1 == 0 (never read)
    acc1 = acc0
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        q1 = _load_tile(Q, offs_m, offs_d1, stride_qs, stride_qd, mask_m, HEAD_DIM, True, PAD_D)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Full tiles without masks, then at most one partial tile.
    n_full = (N_CTX_KV // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc0, acc1, m_i, l_i = _attn_tile(
            acc0, acc1, m_i, l_i, q0, q1, K, V, start_n, N_CTX_KV, qk_scale,
            stride_ks, stride_kd, stride_vs, stride_vd,
            HEAD_DIM, D0, D1, BLOCK_N, False, PAD_D, PRECISION)
    if n_full < N_CTX_KV:
        acc0, acc1, m_i, l_i = _attn_tile(
            acc0, acc1, m_i, l_i, q0, q1, K, V, n_full, N_CTX_KV, qk_scale,
            stride_ks, stride_kd, stride_vs, stride_vd,
            HEAD_DIM, D0, D1, BLOCK_N, True, PAD_D, PRECISION)

    # Algorithm 1, line 15: one division per row at the end.
    inv_l = 1.0 / l_i
    o_ptrs = O + offs_m[:, None] * stride_os + offs_d0[None, :] * stride_od
    tl.store(o_ptrs, (acc0 * inv_l[:, None]).to(O.dtype.element_ty),
             mask=mask_m[:, None] & (offs_d0[None, :] < HEAD_DIM))
    if D1 > 0:
        o_ptrs = O + offs_m[:, None] * stride_os + offs_d1[None, :] * stride_od
        tl.store(o_ptrs, (acc1 * inv_l[:, None]).to(O.dtype.element_ty),
                 mask=mask_m[:, None] & (offs_d1[None, :] < HEAD_DIM))


def shared_memory_floor(config, width: int, itemsize: int) -> int:
    """Bytes of shared memory a config needs at least: its Q tile [BLOCK_M, width], which stays
    in shared memory for the dot (ptxas for sm_90 reports this plus a few KB for the K/V
    staging: tests/_triton_aot.py). A config above the device's limit cannot launch."""
    return itemsize * config.kwargs["BLOCK_M"] * width


def keep_configs(configs, named_args, meta, smem_limit: int):
    """The configs worth timing: none larger than the problem (a 77-key cross-attention gains
    nothing from BLOCK_N = 128), none whose registers spill for wide heads, none above the
    device's shared memory (the autotuner would compile each one to find it out)."""
    n_q = max(16, triton.next_power_of_2(named_args["N_CTX_Q"]))
    n_kv = max(16, triton.next_power_of_2(named_args["N_CTX_KV"]))
    width = meta["D0"] + meta["D1"]
    itemsize = named_args["Q"].element_size()
    # (Register limits from ptxas -v for sm_90: 128-row tiles on 4 warps spill above 128
    # columns, and so do 128-key tiles above 128 * 128 elements.)
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] <= n_q and c.kwargs["BLOCK_N"] <= n_kv
            and c.kwargs["BLOCK_N"] * width <= 128 * 128
            and not (c.kwargs["BLOCK_M"] == 128 and c.num_warps == 4 and width > 128)
            and shared_memory_floor(c, width, itemsize) <= smem_limit]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


@functools.cache
def _smem_limit(index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def _prune_configs(configs, named_args, **kwargs):
    q = named_args["Q"]
    return keep_configs(configs, named_args, kwargs, _smem_limit(q.device.index or 0))


def _config(block_m, block_n, num_warps, num_stages):
    return triton.Config(dict(BLOCK_M=block_m, BLOCK_N=block_n), num_warps=num_warps,
                         num_stages=num_stages)


# A small Hopper/Ampere list (tutorial 06's space, pruned): long queries want BLOCK_M = 128 with
# 8 warps; seq 1024 x 16 heads is only 128 programs at BLOCK_M = 128, so 64 stays in the list.
CONFIGS = [
    _config(128, 64, 8, 3), _config(128, 128, 8, 3), _config(128, 32, 4, 3),
    _config(128, 64, 4, 4), _config(64, 64, 4, 3), _config(64, 128, 4, 3), _config(64, 32, 4, 2),
]

attention_fwd_tuned = triton.autotune(
    CONFIGS, key=["N_CTX_Q", "N_CTX_KV", "HEAD_DIM"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(attention_fwd_kernel)

# Under the interpreter (CPU tests) autotuning would run every config: one small tile instead.
INTERPRETER_BLOCK = 32


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              scale: float) -> None:
    """Launches the kernel on [B, H, S, D] views; fastdiff.ops has validated everything."""
    b, h, n_q, d = q.shape
    n_kv = k.shape[2]
    if out.numel() == 0:
        return
    d0, d1 = split_head_dim(d)
    args = (q, k, v, out, *q.stride(), *k.stride(), *v.stride(), *out.stride(), h, n_q, n_kv,
            scale * LOG2E)
    meta = dict(HEAD_DIM=d, D0=d0, D1=d1, PAD_D=d0 + d1 > d,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    # FMA contraction stays on (the default, set explicitly): exp2's argument is one FMA per
    # score, and the result is compared with SDPA within a tolerance, not bitwise
    meta["enable_fp_fusion"] = True
    with device_guard(q):
        if triton_interpreter():
            grid = (b * h, triton.cdiv(n_q, INTERPRETER_BLOCK))
            attention_fwd_kernel[grid](*args, **meta, BLOCK_M=INTERPRETER_BLOCK,
                                       BLOCK_N=INTERPRETER_BLOCK)
        else:
            def grid(m):
                return (b * h, triton.cdiv(n_q, m["BLOCK_M"]))

            attention_fwd_tuned[grid](*args, **meta)
