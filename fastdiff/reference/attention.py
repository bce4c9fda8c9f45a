"""Reference of the UNet attention block: the specification every backend must match.

Core (Vaswani et al. 2017, arXiv:1706.03762, eq. 1), per batch and head:

    O = softmax(Q K^T * scale + mask) V,        scale = 1 / sqrt(D) by default

Block (diffusers' `Attention` with `AttnProcessor2_0`, as in UNet2DModel's AttnDownBlock2D /
UNetMidBlock2D and UNet2DConditionModel's transformer blocks):

    h   = x as a sequence [B, S, C]             (4-D input [B, C, H, W]: S = H * W)
    h   = GroupNorm(h)                          (when the block has one; over channels)
    q   = h W_q^T + b_q,  k = c W_k^T + b_k,  v = c W_v^T + b_v     (c = context, or h)
    o   = concat_heads(attention(q, k, v)) W_out^T + b_out
    out = (o (reshaped like x) + residual) / rescale_output_factor

The core computes in float32 (float64 for float64 data) and rounds once, as the kernels do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q [..., Sq, D], k [..., Skv, D], v [..., Skv, Dv].

    attn_mask: bool (True = attend) or additive float, broadcastable to [..., Sq, Skv]."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(acc)
    return (torch.softmax(scores, dim=-1) @ v.to(acc)).to(q.dtype)


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, heads * D] -> [B, heads, S, D]."""
    b, s, inner = t.shape
    return t.view(b, s, heads, inner // heads).transpose(1, 2)


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
) -> torch.Tensor:
    """The attention block, step by step as diffusers' AttnProcessor2_0 runs it.

    hidden_states: [B, C, H, W] or [B, S, C]; encoder_hidden_states: [B, Skv, Ckv] (cross
    attention) or None (self attention); num_groups: GroupNorm groups over C (None: no norm);
    residual: added to the output (diffusers' residual_connection; None: nothing added);
    attention_mask: broadcastable to [B, heads, S, Skv] (bool or additive); dropout_p:
    training-mode dropout on the output projection (diffusers' to_out[1]).
    """
    x = hidden_states
    if x.dim() == 4:
        b, c, height, width = x.shape
        x = x.view(b, c, height * width).transpose(1, 2)
    if num_groups is not None:
        x = F.group_norm(x.transpose(1, 2), num_groups, norm_weight, norm_bias, eps).transpose(1, 2)
    context = x if encoder_hidden_states is None else encoder_hidden_states
    q = _split_heads(F.linear(x, q_weight, q_bias), heads)
    k = _split_heads(F.linear(context, k_weight, k_bias), heads)
    v = _split_heads(F.linear(context, v_weight, v_bias), heads)
    o = scaled_dot_product_attention(q, k, v, scale, attention_mask)
    o = o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    out = F.linear(o, out_weight, out_bias)
    if dropout_p > 0:
        out = F.dropout(out, dropout_p)
    if hidden_states.dim() == 4:
        out = out.transpose(-1, -2).reshape(hidden_states.shape)
    if residual is not None:
        out = out + residual
    return out / rescale_output_factor
