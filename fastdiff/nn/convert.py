"""Swapping fastdiff kernels into an existing model (a diffusers UNet or VAE, any nn.Module).

Every torch.nn.GroupNorm becomes a fastdiff.nn.GroupNorm (a torch.nn.GroupNorm subclass sharing
the original's parameter tensors: `isinstance` checks and state-dict keys are unchanged), and
every diffusers Attention module gets fastdiff.nn.AttnProcessor through diffusers' own
processor API, so the module and everything diffusers inspects (`attn_processors`,
`set_attn_processor`, `set_default_attn_processor`, attention slicing) stay. Only modules with
diffusers' default processor are changed: a user's processor (IP-Adapter, LoRA-wrapped
projections, added KV projections, ...) is kept. `restore_modules` puts the originals back (the
GroupNorms are kept outside the module tree: not in `state_dict()`, not moved by `.to()`).
"""

from __future__ import annotations

from torch import nn

from fastdiff.nn.attention import AttnProcessor
from fastdiff.nn.group_norm import GroupNorm

_ORIGINAL = "_fastdiff_original"


def _group_norm(m: nn.GroupNorm, backend: str) -> GroupNorm:
    new = GroupNorm(m.num_groups, m.num_channels, m.eps, m.affine, device="meta")
    if m.affine:
        new.weight, new.bias = m.weight, m.bias
    new.backend = backend
    return new


def _diffusers_attention():
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:  # diffusers is optional: then only GroupNorm is swapped
        return None
    return Attention


def swap_modules(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Swaps GroupNorm modules and sets fastdiff's attention processor in `model` (in place;
    returned)."""
    attention = _diffusers_attention()

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if type(child) is nn.GroupNorm:
                new = _group_norm(child, backend)
                object.__setattr__(new, _ORIGINAL, child)  # kept whole, outside the tree
                setattr(parent, name, new)
                continue
            if attention is not None and isinstance(child, attention) \
                    and AttnProcessor.supports(child):
                child.set_processor(AttnProcessor(backend, original=child.processor))
            visit(child)

    visit(model)
    return model


def restore_modules(model: nn.Module) -> nn.Module:
    """Puts back the modules and processors `swap_modules` replaced (in place; returned)."""
    for name, child in list(model.named_children()):
        original = getattr(child, _ORIGINAL, None)
        if original is not None:
            setattr(model, name, original)
            continue
        processor = getattr(child, "processor", None)
        if isinstance(processor, AttnProcessor):
            child.set_processor(processor.original)
        restore_modules(child)
    return model
