"""`Attention`: a drop-in for diffusers' `Attention` (diffusers.models.attention_processor) as
UNet2DModel's attention blocks and UNet2DConditionModel's transformer blocks use it, running
fastdiff.ops.attention_block (fused QKV GEMM, Triton or SDPA core, in-place head layout).

Same constructor arguments, state-dict keys (group_norm, spatial_norm, norm_cross, to_q, to_k,
to_v, to_out.0) and forward signature as diffusers; the output equals diffusers'
AttnProcessor2_0 within the dtype's tolerance. Features outside those UNets (kv_heads, qk_norm,
added_kv_proj_dim, out_dim, custom processors, ...) raise a ValueError naming the argument.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.ops.attention import attention_block

# Arguments diffusers accepts that these UNets never set: name -> the only supported value.
_UNSUPPORTED_DEFAULTS = dict(
    kv_heads=None, qk_norm=None, added_kv_proj_dim=None, only_cross_attention=False,
    processor=None, out_dim=None, out_context_dim=None, context_pre_only=None, pre_only=False,
    is_causal=False)
# Renames for checkpoints saved with diffusers' deprecated attention block (AttentionBlock).
_DEPRECATED_KEYS = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.",
                    "proj_attn.": "to_out.0."}


class SpatialNorm(nn.Module):
    """Spatially conditioned GroupNorm (Zheng et al. 2022, MoVQ, arXiv:2209.09002), as diffusers'
    SpatialNorm: GroupNorm(f) * conv_y(zq) + conv_b(zq), zq resized to f (nearest)."""

    def __init__(self, f_channels: int, zq_channels: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(num_channels=f_channels, num_groups=32, eps=1e-6)
        self.conv_y = nn.Conv2d(zq_channels, f_channels, kernel_size=1)
        self.conv_b = nn.Conv2d(zq_channels, f_channels, kernel_size=1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        zq = F.interpolate(zq, size=f.shape[-2:], mode="nearest")
        return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)


class Attention(nn.Module):
    """Multi-head (self or cross) attention with optional GroupNorm, residual and rescale.

    Arguments as diffusers' `Attention`; in addition `backend` ("auto", "sdpa", "triton",
    "reference"; also a settable attribute) picks the path (see
    fastdiff.ops.attention_dispatch_info). upcast_attention / upcast_softmax are accepted and
    always hold: the core accumulates scores and softmax in float32.
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        kv_heads: int | None = None,
        dim_head: int = 64,
        dropout: float = 0.0,
        bias: bool = False,
        upcast_attention: bool = False,
        upcast_softmax: bool = False,
        cross_attention_norm: str | None = None,
        cross_attention_norm_num_groups: int = 32,
        qk_norm: str | None = None,
        added_kv_proj_dim: int | None = None,
        added_proj_bias: bool | None = True,
        norm_num_groups: int | None = None,
        spatial_norm_dim: int | None = None,
        out_bias: bool = True,
        scale_qk: bool = True,
        only_cross_attention: bool = False,
        eps: float = 1e-5,
        rescale_output_factor: float = 1.0,
        residual_connection: bool = False,
        _from_deprecated_attn_block: bool = False,
        processor=None,
        out_dim: int | None = None,
        out_context_dim: int | None = None,
        context_pre_only=None,
        pre_only: bool = False,
        elementwise_affine: bool = True,
        is_causal: bool = False,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        given = dict(kv_heads=kv_heads, qk_norm=qk_norm, added_kv_proj_dim=added_kv_proj_dim,
                     only_cross_attention=only_cross_attention, processor=processor,
                     out_dim=out_dim, out_context_dim=out_context_dim,
                     context_pre_only=context_pre_only, pre_only=pre_only, is_causal=is_causal)
        if kv_heads == heads:  # plain multi-head attention, spelled out
            given["kv_heads"] = None
        for name, value in given.items():
            if value is not _UNSUPPORTED_DEFAULTS[name] and value != _UNSUPPORTED_DEFAULTS[name]:
                raise ValueError(f"fastdiff.nn.Attention does not support {name}={value!r}"
                                 f" (only {_UNSUPPORTED_DEFAULTS[name]!r}); use diffusers'"
                                 " Attention for it")
        for name, value in (("query_dim", query_dim), ("heads", heads), ("dim_head", dim_head)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if rescale_output_factor == 0:
            raise ValueError("rescale_output_factor must be nonzero")

        self.inner_dim = dim_head * heads
        self.query_dim = query_dim
        self.use_bias = bias
        self.is_cross_attention = cross_attention_dim is not None
        self.cross_attention_dim = cross_attention_dim or query_dim
        self.upcast_attention = upcast_attention
        self.upcast_softmax = upcast_softmax
        self.rescale_output_factor = rescale_output_factor
        self.residual_connection = residual_connection
        self.dropout = dropout
        self.out_dim = query_dim
        self.heads = heads
        self.scale_qk = scale_qk
        self.scale = dim_head**-0.5 if scale_qk else 1.0
        self._from_deprecated_attn_block = _from_deprecated_attn_block
        self.backend = backend
        self.fused_projections = False
        self.only_cross_attention = False
        self.added_kv_proj_dim = None
        self.norm_q = self.norm_k = None

        self.group_norm = (nn.GroupNorm(num_channels=query_dim, num_groups=norm_num_groups,
                                        eps=eps, affine=True)
                           if norm_num_groups is not None else None)
        self.spatial_norm = (SpatialNorm(query_dim, spatial_norm_dim)
                             if spatial_norm_dim is not None else None)
        if cross_attention_norm is None:
            self.norm_cross = None
        elif cross_attention_norm == "layer_norm":
            self.norm_cross = nn.LayerNorm(self.cross_attention_dim)
        elif cross_attention_norm == "group_norm":
            self.norm_cross = nn.GroupNorm(num_channels=self.cross_attention_dim,
                                           num_groups=cross_attention_norm_num_groups, eps=1e-5)
        else:
            raise ValueError(f"cross_attention_norm must be None, 'layer_norm' or 'group_norm',"
                             f" got {cross_attention_norm!r}")
        self.to_q = nn.Linear(query_dim, self.inner_dim, bias=bias)
        self.to_k = nn.Linear(self.cross_attention_dim, self.inner_dim, bias=bias)
        self.to_v = nn.Linear(self.cross_attention_dim, self.inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, query_dim, bias=out_bias),
                                     nn.Dropout(dropout)])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self._from_deprecated_attn_block:  # as diffusers' ModelMixin does on load
            for old, new in _DEPRECATED_KEYS.items():
                for name in ("weight", "bias"):
                    if prefix + old + name in state_dict:
                        state_dict[prefix + new + name] = state_dict.pop(prefix + old + name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def prepare_attention_mask(self, attention_mask: torch.Tensor | None, target_length: int,
                               batch_size: int, out_dim: int = 3) -> torch.Tensor | None:
        """diffusers' Attention.prepare_attention_mask, unchanged (its padding quirk included)."""
        if attention_mask is None:
            return None
        if attention_mask.shape[-1] != target_length:
            attention_mask = F.pad(attention_mask, (0, target_length), value=0.0)
        if out_dim == 3:
            if attention_mask.shape[0] < batch_size * self.heads:
                attention_mask = attention_mask.repeat_interleave(self.heads, dim=0)
        elif out_dim == 4:
            attention_mask = attention_mask.unsqueeze(1).repeat_interleave(self.heads, dim=1)
        return attention_mask

    def norm_encoder_hidden_states(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        if isinstance(self.norm_cross, nn.LayerNorm):
            return self.norm_cross(encoder_hidden_states)
        # GroupNorm normalises dim 1: move the hidden dim there and back.
        return self.norm_cross(encoder_hidden_states.transpose(1, 2)).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """diffusers' AttnProcessor2_0: (attention(GroupNorm(x)) + x) / rescale_output_factor,
        the norm and residual only where configured. Extra keyword arguments are ignored with a
        warning, as diffusers does."""
        unused = [k for k in kwargs if k not in ("ip_adapter_masks", "ip_hidden_states")]
        if unused:
            warnings.warn(f"cross_attention_kwargs {unused} are not expected by"
                          " fastdiff.nn.Attention and will be ignored.", stacklevel=2)
        return attention_forward(self, hidden_states, encoder_hidden_states, attention_mask,
                                 temb, self.backend)

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, dim_head={self.inner_dim // self.heads},"
                f" backend={self.backend!r}")


def attention_forward(attn, hidden_states: torch.Tensor,
                      encoder_hidden_states: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None,
                      temb: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """diffusers' AttnProcessor2_0 as one fastdiff.ops.attention_block call, for `attn` a
    fastdiff.nn.Attention or a diffusers Attention (the same attribute names):
    (attention(GroupNorm(x)) + x) / rescale_output_factor, the norm and residual only where
    configured."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() not in (3, 4):
        raise ValueError("hidden_states must be a [B, C, H, W] or [B, S, C] tensor")
    residual = hidden_states
    if attn.spatial_norm is not None:
        if temb is None:
            raise ValueError("temb (the quantised latents zq) is required with spatial_norm")
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if encoder_hidden_states is not None and attn.norm_cross is not None:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    if attention_mask is not None:
        batch = hidden_states.shape[0]
        kv_len = (encoder_hidden_states.shape[1] if encoder_hidden_states is not None
                  else hidden_states[0, 0].numel() if hidden_states.dim() == 4
                  else hidden_states.shape[1])
        attention_mask = attn.prepare_attention_mask(attention_mask, kv_len, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    gn = attn.group_norm
    out = attn.to_out[0]
    return attention_block(
        hidden_states, attn.to_q.weight, attn.to_k.weight, attn.to_v.weight, out.weight,
        heads=attn.heads, q_bias=attn.to_q.bias, k_bias=attn.to_k.bias, v_bias=attn.to_v.bias,
        out_bias=out.bias, encoder_hidden_states=encoder_hidden_states,
        norm_weight=gn.weight if gn is not None else None,
        norm_bias=gn.bias if gn is not None else None,
        num_groups=gn.num_groups if gn is not None else None,
        eps=gn.eps if gn is not None else 1e-5, scale=attn.scale,
        residual=residual if attn.residual_connection else None,
        rescale_output_factor=attn.rescale_output_factor, attention_mask=attention_mask,
        dropout_p=attn.dropout if attn.training else 0.0, backend=backend)


class AttnProcessor:
    """A diffusers attention processor (`unet.set_attn_processor(AttnProcessor())`) running
    fastdiff.ops.attention_block: the same numbers as diffusers' AttnProcessor2_0 within the
    dtype's tolerance. The module stays diffusers' Attention, so `attn_processors`,
    `set_default_attn_processor`, attention slicing and other processors keep working.
    `original` is the processor it replaced (fastdiff.nn.restore_modules puts it back)."""

    def __init__(self, backend: str = "auto", original=None):
        self.backend = backend
        self.original = original

    @property
    def __class__(self):
        """diffusers' own checks read `processor.__class__` against its tuples of default
        processors (`set_default_attn_processor` raises for any other class): this processor
        computes AttnProcessor2_0's function, so it reports that class there. `type()` and
        `isinstance` still see fastdiff's class."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        return AttnProcessor2_0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        return attention_forward(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 temb, self.backend)

    @staticmethod
    def supports(attn) -> bool:
        """Whether a diffusers Attention module is one attention_block computes (plain
        nn.Linear projections: a LoRA-wrapped one keeps its processor)."""
        from diffusers.models.attention_processor import AttnProcessor as Default
        from diffusers.models.attention_processor import AttnProcessor2_0

        linears = [attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]]
        return (type(attn.processor) in (Default, AttnProcessor2_0)
                and all(type(m) is nn.Linear for m in linears)
                and getattr(attn, "added_kv_proj_dim", None) is None
                and not getattr(attn, "only_cross_attention", False)
                and not getattr(attn, "fused_projections", False)
                and not getattr(attn, "is_causal", False)
                and getattr(attn, "norm_q", None) is None
                and getattr(attn, "norm_k", None) is None
                and attn.inner_kv_dim == attn.inner_dim and attn.out_dim == attn.query_dim)
