"""Fused drop-in modules (GroupNorm, Attention) with the parameter names of torch.nn and
diffusers, dispatching to fastdiff.ops."""

from fastdiff.nn.attention import Attention, AttnProcessor
from fastdiff.nn.convert import restore_modules, swap_modules
from fastdiff.nn.group_norm import GroupNorm, GroupNormSiLU

__all__ = ["Attention", "AttnProcessor", "GroupNorm", "GroupNormSiLU", "restore_modules",
           "swap_modules"]
