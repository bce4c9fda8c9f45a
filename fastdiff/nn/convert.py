"""Swapping fastdiff.nn modules into an existing model (a diffusers UNet or VAE, any nn.Module).

Every torch.nn.GroupNorm becomes a fastdiff.nn.GroupNorm (sharing the original's parameter
tensors) and every diffusers Attention a fastdiff.nn.Attention built from the original's own
settings and loaded with its state dict; the state-dict keys stay the same. `restore_modules`
puts the originals back (kept outside the module tree: not in `state_dict()`, not moved by
`.to()`). Modules fastdiff does not support (e.g. attention with added KV projections, spatial
norm) stay as they are.
"""

from __future__ import annotations

from torch import nn

from fastdiff.nn.attention import Attention
from fastdiff.nn.group_norm import GroupNorm

_ORIGINAL = "_fastdiff_original"


def _group_norm(m: nn.GroupNorm, backend: str) -> GroupNorm:
    new = GroupNorm(m.num_groups, m.num_channels, m.eps, m.affine, device="meta")
    if m.affine:
        new.weight, new.bias = m.weight, m.bias
    new.backend = backend
    return new


def _attention(m: nn.Module, backend: str) -> Attention | None:
    """fastdiff.nn.Attention with the settings of a diffusers Attention, or None if unsupported."""
    norm_cross = getattr(m, "norm_cross", None)
    kwargs = dict(
        query_dim=m.query_dim,
        cross_attention_dim=m.cross_attention_dim if m.is_cross_attention else None,
        heads=m.heads, dim_head=m.inner_dim // m.heads, dropout=m.dropout, bias=m.use_bias,
        upcast_attention=m.upcast_attention, upcast_softmax=m.upcast_softmax,
        cross_attention_norm=(None if norm_cross is None else
                              "layer_norm" if isinstance(norm_cross, nn.LayerNorm) else
                              "group_norm"),
        norm_num_groups=m.group_norm.num_groups if m.group_norm is not None else None,
        out_bias=m.to_out[0].bias is not None, scale_qk=m.scale_qk,
        eps=m.group_norm.eps if m.group_norm is not None else 1e-5,
        rescale_output_factor=m.rescale_output_factor,
        residual_connection=m.residual_connection, backend=backend,
    )
    if (getattr(m, "added_kv_proj_dim", None) is not None or getattr(m, "spatial_norm", None)
            is not None or getattr(m, "only_cross_attention", False)
            or m.inner_kv_dim != m.inner_dim or m.out_dim != m.query_dim):
        return None
    try:
        new = Attention(**kwargs).to(device=m.to_q.weight.device, dtype=m.to_q.weight.dtype)
    except ValueError:
        return None
    new.load_state_dict(m.state_dict())
    return new


def swap_modules(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replaces GroupNorm and diffusers Attention modules in `model` (in place; returned)."""
    try:
        from diffusers.models.attention_processor import Attention as DiffusersAttention
    except ImportError:  # diffusers is optional: then only GroupNorm is swapped
        DiffusersAttention = None

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            new = None
            if type(child) is nn.GroupNorm:
                new = _group_norm(child, backend)
            elif DiffusersAttention is not None and type(child) is DiffusersAttention:
                new = _attention(child, backend)
            if new is None:
                visit(child)
            else:  # the original stays whole, outside the module tree, for restore_modules
                object.__setattr__(new, _ORIGINAL, child)
                setattr(parent, name, new)

    visit(model)
    return model


def restore_modules(model: nn.Module) -> nn.Module:
    """Puts back the modules `swap_modules` replaced (in place; returned)."""
    for name, child in list(model.named_children()):
        original = getattr(child, _ORIGINAL, None)
        if original is not None:
            setattr(model, name, original)
        else:
            restore_modules(child)
    return model
