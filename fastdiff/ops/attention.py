"""Attention: validation (once, here) and dispatch to {reference, sdpa, triton}, registered with
torch.library so torch.compile traces the Triton path as one op.

    attention(q, k, v)        softmax(q k^T * scale + mask) v on [B, H, S, D] tensors, any strides
    attention_block(x, ...)   diffusers' Attention block: GroupNorm -> q, k, v projections ->
                              attention -> output projection (+ residual) / rescale_output_factor

Backends: "reference" (fastdiff/reference/attention.py), "sdpa" (torch's
F.scaled_dot_product_attention, whichever kernel torch picks), "triton"
(fastdiff/kernels/attention.py), "auto" (the rule in `choose_backend`, printed by
`attention_dispatch_info()`). The block's non-reference paths differ from eager diffusers by
layout, not arithmetic: one GEMM for q, k and v (a cached concatenation of the weights), heads
split by views (no copies), the core writing [B, S, H, D] so the output projection reads it in
place, and the residual added in one pass.

GroupNorm stays torch's kernel (statistics and normalisation in fp32, as diffusers). Folding it
into the projection (W diag(rstd * gamma) x + W (beta - mean * rstd * gamma), exact algebra)
would save one pass over x, under 5% of the block at SD shapes, but in fp16 the rounding of the
folded weights multiplies |x| instead of |x - mean|: error grows with |mean| / std of a group.
Fusing the normalisation into the GEMM's prologue instead needs a GEMM of our own; not worth it
while the attention core is >80% of the block.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from fastdiff.ops._backends import traced, unavailable_reason
from fastdiff.reference.attention import attention_block as attention_block_reference
from fastdiff.reference.attention import scaled_dot_product_attention as attention_reference

ATTENTION_BACKENDS = ("reference", "sdpa", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 256

# --- The dispatch rule ("auto") -------------------------------------------------------------
# The Triton kernel splits the head dim into power-of-two tiles (D0 + D1, see
# fastdiff/kernels/attention.py); SDPA's flash kernel (FlashAttention-2 inside PyTorch) rounds D
# up to one of its compiled head dims. Both are bound by the exp / tensor-core work per score, so
# the kernel that computes fewer head-dim columns wins when everything else is equal: Triton for
# D in (32, 64) and (64, 96) exclusive -- SD 1.5's 40 (48 vs 64 columns) and 80 (80 vs 96) --
# SDPA for 32, 64, 96, 128, 160 (equal columns: torch's kernels are at least as fast) and for
# problems too small to amortise a Triton launch. These are predictions from column counts;
# benchmarks/bench_attention.py measures them on a GPU (TODO: confirm on H100 and adjust).
SDPA_HEAD_DIMS = (32, 64, 96, 128, 160, 192, 224, 256)
MIN_TRITON_WORK = 2**24  # B * H * Sq * Skv * D multiply-adds: below this, launch-bound


def triton_columns(head_dim: int) -> int:
    """Head-dim columns the Triton kernel computes (D0 + D1)."""
    d0 = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - d0
    return d0 + (0 if rest <= 0 else max(16, 1 << (rest - 1).bit_length()))


def sdpa_columns(head_dim: int) -> int:
    """Head-dim columns SDPA's flash kernel computes (its next compiled head dim)."""
    return next((d for d in SDPA_HEAD_DIMS if d >= head_dim), head_dim)


def choose_backend(device_type: str, dtype: torch.dtype, batch_heads: int, seq_q: int,
                   seq_kv: int, head_dim: int, has_mask: bool = False,
                   needs_grad: bool = False) -> tuple[str, str]:
    """The "auto" rule on shapes alone: (backend, why). Triton availability is checked apart."""
    if needs_grad:
        return "sdpa", "autograd needed (the Triton kernel is forward only)"
    if has_mask:
        return "sdpa", "attention mask (the Triton kernel has none)"
    if device_type != "cuda":
        return "sdpa", f"{device_type} tensors (Triton runs on CPU only under its interpreter)"
    if dtype not in (torch.float16, torch.bfloat16):
        return "sdpa", f"{dtype} (the Triton path is tuned for fp16/bf16)"
    if head_dim > TRITON_MAX_HEAD_DIM:
        return "sdpa", f"head dim {head_dim} > {TRITON_MAX_HEAD_DIM}"
    if batch_heads * seq_q * seq_kv * head_dim < MIN_TRITON_WORK:
        return "sdpa", "small problem (launch-bound)"
    t, s = triton_columns(head_dim), sdpa_columns(head_dim)
    if t < s:
        return "triton", f"head dim {head_dim}: Triton computes {t} columns, SDPA flash {s}"
    return "sdpa", f"head dim {head_dim}: SDPA computes {s} columns, Triton {t}"


def attention_dispatch_info() -> dict:
    """What "auto" picks, for `fastdiff info`: the rule, and the choice at Stable Diffusion 1.5's
    shapes (batch 2 = one image with classifier-free guidance, fp16 CUDA tensors)."""
    cuda = torch.device("cuda")
    triton_here = unavailable_reason("triton", cuda) if torch.cuda.is_available() else (
        "no CUDA device")
    shapes = {"sd15 64x64 self (S 4096, d 40)": (16, 4096, 4096, 40),
              "sd15 64x64 cross (S 4096 x 77, d 40)": (16, 4096, 77, 40),
              "sd15 32x32 self (S 1024, d 80)": (16, 1024, 1024, 80),
              "sd15 32x32 cross (S 1024 x 77, d 80)": (16, 1024, 77, 80),
              "sd15 16x16 self (S 256, d 160)": (16, 256, 256, 160),
              "sd2/sdxl self (S 4096, d 64)": (20, 4096, 4096, 64)}
    choices = {}
    for name, (bh, sq, skv, d) in shapes.items():
        backend, why = choose_backend("cuda", torch.float16, bh, sq, skv, d)
        here = f"; here sdpa: triton unavailable ({triton_here})" if (
            backend == "triton" and triton_here) else ""
        choices[name] = f"{backend} ({why}){here}"
    return dict(
        rule=("triton for fp16/bf16 CUDA tensors when it computes fewer head-dim columns than"
              " SDPA's flash kernel and B*H*Sq*Skv*D >= 2**24; otherwise sdpa (also with a mask,"
              " with autograd, on CPU)"),
        triton_available=not triton_here, triton_unavailable_reason=triton_here,
        cuda_fp16=choices)


# --- Validation ------------------------------------------------------------------------------

def _check_4d(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape [batch, heads, seq, head_dim], got"
                         f" {tuple(t.shape)}")


def _validate(q, k, v, scale, attn_mask, backend) -> float:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_4d(name, t)
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, expected {q.dtype} like q")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, expected {q.device} like q")
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"q, k, v must share batch and heads, got {tuple(q.shape)},"
                         f" {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[3] != q.shape[3] or v.shape[3] != q.shape[3]:
        raise ValueError(f"k and v must have q's head dim {q.shape[3]}, got {k.shape[3]} and"
                         f" {v.shape[3]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have as many positions as k ({k.shape[2]}), got {v.shape[2]}")
    if k.shape[2] == 0 or q.shape[3] == 0:
        raise ValueError(f"k must hold at least one key of head dim >= 1, got {tuple(k.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    elif not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor, got {type(attn_mask).__name__}")
        if attn_mask.dtype not in (torch.bool, q.dtype):
            raise TypeError(f"attn_mask must be bool or {q.dtype}, got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask is on {attn_mask.device}, expected {q.device}")
        want = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        try:
            if torch.broadcast_shapes(attn_mask.shape, want) != want:
                raise RuntimeError
        except RuntimeError:
            raise ValueError(f"attn_mask must broadcast to {want}, got"
                             f" {tuple(attn_mask.shape)}") from None
    if backend != "auto" and backend not in ATTENTION_BACKENDS:
        raise ValueError(f"backend must be one of {ATTENTION_BACKENDS} or 'auto', got {backend!r}")
    return float(scale)


def _resolve(backend: str, q, k, v, attn_mask, scale: float) -> str:
    if backend == "auto":
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        backend, _ = choose_backend(q.device.type, q.dtype, q.shape[0] * q.shape[1], q.shape[2],
                                    k.shape[2], q.shape[3], attn_mask is not None, needs_grad)
        if backend == "triton" and (scale < 0 or unavailable_reason("triton", q.device)):
            return "sdpa"
        return backend
    if backend == "triton":
        if reason := unavailable_reason("triton", q.device):
            raise RuntimeError(f"backend 'triton' is unavailable for {q.device} tensors: {reason}")
        if q.dtype not in TRITON_DTYPES:
            raise TypeError(f"the triton backend supports float16, bfloat16 and float32, got"
                            f" {q.dtype}")
        if q.shape[3] > TRITON_MAX_HEAD_DIM:
            raise ValueError(f"the triton backend supports head dims up to"
                             f" {TRITON_MAX_HEAD_DIM}, got {q.shape[3]}")
        if attn_mask is not None:
            raise ValueError("the triton backend takes no attn_mask (use 'sdpa' or 'auto')")
        if scale < 0:  # the kernel takes the running max of unscaled scores
            raise ValueError(f"the triton backend needs scale >= 0, got {scale}")
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise ValueError("the triton backend is forward only: inputs require grad (run"
                             " under torch.no_grad(), or use 'sdpa' or 'auto')")
    return backend


# --- Execution -------------------------------------------------------------------------------

def _run(q, k, v, attn_mask, scale: float, backend: str) -> torch.Tensor:
    """Validated arguments in; the output as a contiguous [B, Sq, H, D] tensor."""
    backend = _resolve(backend, q, k, v, attn_mask, scale)
    b, h, n_q, d = q.shape
    if backend == "triton":
        from fastdiff.kernels.attention import attention as attention_triton

        out = q.new_empty(b, n_q, h, d)
        attention_triton(q, k, v, out.transpose(1, 2), scale)  # under q's device guard
        return out
    if backend == "sdpa":
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    else:
        o = attention_reference(q, k, v, scale, attn_mask)
    return o.transpose(1, 2).contiguous()


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
    attn_mask: torch.Tensor | None = None, backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T * scale + attn_mask) v, like F.scaled_dot_product_attention.

    Args:
        q: [B, H, Sq, D]; k, v: [B, H, Skv, D]; one dtype (fp16/bf16/fp32/fp64) and device;
            any strides (e.g. heads split from a fused QKV projection by views).
        scale: the softmax scale, default 1 / sqrt(D).
        attn_mask: bool (True = attend) or additive mask broadcastable to [B, H, Sq, Skv].
        backend: "auto", "reference", "sdpa" or "triton" (`attention_dispatch_info()`).

    Returns:
        [B, H, Sq, D], a view of a [B, Sq, H, D]-contiguous tensor (heads merge for free).
    """
    scale = _validate(q, k, v, scale, attn_mask, backend)
    if traced(q) and _resolve(backend, q, k, v, attn_mask, scale) == "triton":
        # torch.compile sees one opaque op; the other backends are plain torch ops it traces.
        return torch.ops.fastdiff.attention(q, k, v, None, scale, "triton").transpose(1, 2)
    return _run(q, k, v, attn_mask, scale, backend).transpose(1, 2)


@torch.library.custom_op("fastdiff::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  attn_mask: torch.Tensor | None, scale: float, backend: str) -> torch.Tensor:
    return _run(q, k, v, attn_mask, scale, backend)


@_attention_op.register_fake
def _(q, k, v, attn_mask, scale, backend):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[3])


# --- The block -------------------------------------------------------------------------------

class _ConcatCache:
    """One concatenation of projection weights per weight tuple, so the fused QKV GEMM does not
    copy the weights on every call. Keyed by identity; invalidated when a source tensor is
    updated in place (tensor._version) or freed (weak references)."""

    def __init__(self, size: int = 256):
        self.size, self.entries = size, {}

    def __call__(self, tensors: tuple) -> torch.Tensor:
        if torch.compiler.is_compiling() or (
                torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return torch.cat(tensors)  # traced, or differentiable: never cached
        try:
            versions = tuple(t._version for t in tensors)
        except RuntimeError:  # inference tensors have no version counter
            return torch.cat(tensors)
        key = tuple(id(t) for t in tensors)
        hit = self.entries.get(key)
        if hit and hit[1] == versions and all(r() is t for r, t in zip(hit[0], tensors)):
            return hit[2]
        if len(self.entries) >= self.size:
            self.entries = {k: e for k, e in self.entries.items()
                            if all(r() is not None for r in e[0])}
            if len(self.entries) >= self.size:
                self.entries.clear()
        fused = torch.cat(tensors)
        self.entries[key] = (tuple(weakref.ref(t) for t in tensors), versions, fused)
        return fused


_concat = _ConcatCache()


def _fused_linear(x, weights, biases) -> torch.Tensor:
    """x @ concat(weights)^T + concat(biases): one GEMM for several projections of x."""
    if len(weights) == 1:
        return F.linear(x, weights[0], biases[0])
    if all(b is None for b in biases):
        bias = None
    elif all(b is not None for b in biases):
        bias = _concat(biases)
    else:  # mixed (never in diffusers, whose q, k, v share one `bias` flag): not cached
        bias = torch.cat([torch.zeros_like(w[:, 0]) if b is None else b
                          for w, b in zip(weights, biases)])
    return F.linear(x, _concat(weights), bias)


def _validate_block(x, q_weight, k_weight, v_weight, out_weight, heads, context, num_groups,
                    residual, rescale_output_factor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError(f"hidden_states must be [B, C, H, W] or [B, S, C], got {tuple(x.shape)}")
    channels = x.shape[1] if x.dim() == 4 else x.shape[2]
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight), ("v_weight", v_weight),
                    ("out_weight", out_weight)):
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(f"{name} must be a 2-D weight tensor")
    inner = q_weight.shape[0]
    if q_weight.shape[1] != channels:
        raise ValueError(f"q_weight must be [inner, {channels}], got {tuple(q_weight.shape)}")
    kv_channels = channels if context is None else context.shape[-1]
    if context is not None and (context.dim() != 3 or context.shape[0] != x.shape[0]):
        raise ValueError(f"encoder_hidden_states must be [{x.shape[0]}, S_kv, C_kv], got"
                         f" {tuple(context.shape)}")
    for name, w in (("k_weight", k_weight), ("v_weight", v_weight)):
        if tuple(w.shape) != (inner, kv_channels):
            raise ValueError(f"{name} must be [{inner}, {kv_channels}], got {tuple(w.shape)}")
    if out_weight.shape[1] != inner or (x.dim() == 4 and out_weight.shape[0] != channels):
        raise ValueError(f"out_weight must be [{channels}, {inner}], got"
                         f" {tuple(out_weight.shape)}")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or inner % heads:
        raise ValueError(f"heads must be a positive int dividing {inner}, got {heads!r}")
    if num_groups is not None and (num_groups < 1 or channels % num_groups):
        raise ValueError(f"num_groups must divide the {channels} channels, got {num_groups}")
    if residual is not None and not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual must be a tensor or None, got {type(residual).__name__}")
    if not isinstance(rescale_output_factor, (int, float)) or rescale_output_factor == 0:
        raise ValueError(f"rescale_output_factor must be a nonzero number, got"
                         f" {rescale_output_factor!r}")


def attention_block(
    hidden_states: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    v_weight: torch.Tensor,
    out_weight: torch.Tensor,
    *,
    heads: int,
    q_bias: torch.Tensor | None = None,
    k_bias: torch.Tensor | None = None,
    v_bias: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    num_groups: int | None = None,
    eps: float = 1e-5,
    scale: float | None = None,
    residual: torch.Tensor | None = None,
    rescale_output_factor: float = 1.0,
    attention_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """diffusers' attention block (arguments as in fastdiff.reference.attention.attention_block);
    `backend` picks the core ("auto", "sdpa", "triton") or the whole reference ("reference").
    dropout_p: training-mode dropout on the output projection (diffusers' to_out[1])."""
    x, context = hidden_states, encoder_hidden_states
    _validate_block(x, q_weight, k_weight, v_weight, out_weight, heads, context, num_groups,
                    residual, rescale_output_factor)
    if backend == "reference":
        return attention_block_reference(
            x, q_weight, k_weight, v_weight, out_weight, heads=heads, q_bias=q_bias,
            k_bias=k_bias, v_bias=v_bias, out_bias=out_bias, encoder_hidden_states=context,
            norm_weight=norm_weight, norm_bias=norm_bias, num_groups=num_groups, eps=eps,
            scale=scale, residual=residual, rescale_output_factor=rescale_output_factor,
            attention_mask=attention_mask, dropout_p=dropout_p)
    # [B, C, H, W] -> [B, S, C] as a view (GEMMs read the transposed layout in place).
    seq = x.flatten(2).transpose(1, 2) if x.dim() == 4 else x
    if num_groups is not None:
        seq = F.group_norm(seq.transpose(1, 2), num_groups, norm_weight, norm_bias,
                           eps).transpose(1, 2)
    batch, n_q, _ = seq.shape
    inner = q_weight.shape[0]
    if context is None:
        q, k, v = _fused_linear(seq, (q_weight, k_weight, v_weight),
                                (q_bias, k_bias, v_bias)).split(inner, dim=-1)
    else:
        q = _fused_linear(seq, (q_weight,), (q_bias,))
        k, v = _fused_linear(context, (k_weight, v_weight), (k_bias, v_bias)).split(inner, -1)
    q, k, v = (t.unflatten(-1, (heads, inner // heads)).transpose(1, 2) for t in (q, k, v))
    o = attention(q, k, v, scale=scale, attn_mask=attention_mask, backend=backend)
    out = F.linear(o.transpose(1, 2).reshape(batch, n_q, inner), out_weight, out_bias)
    if dropout_p > 0:
        out = F.dropout(out, dropout_p)
    if x.dim() == 4:
        out = out.transpose(1, 2).view(x.shape)
    if residual is not None:
        if x.dim() == 4 and not (torch.is_grad_enabled() and out.requires_grad):
            # One pass, in the residual's layout (NCHW stays NCHW for the next convolution).
            out = torch.add(residual, out, out=torch.empty_like(residual))
        else:
            out = residual + out
    if rescale_output_factor != 1.0:
        out = out / rescale_output_factor
    return out
