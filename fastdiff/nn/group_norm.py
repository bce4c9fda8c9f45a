"""`GroupNorm` and `GroupNormSiLU`: drop-ins for torch.nn.GroupNorm (and GroupNorm followed by
SiLU) that run fastdiff.ops.group_norm, one fused kernel.

Same constructor (num_groups, num_channels, eps=1e-5, affine=True, device, dtype), same
parameters and state-dict keys (weight, bias): they subclass torch.nn.GroupNorm, so checkpoints,
`isinstance` checks and `reset_parameters` behave as for torch's module. forward() also takes
optional per-sample `scale`/`shift` [N, C] (ADM's scale-shift norm, Dhariwal & Nichol 2021):
``norm(x, scale=s, shift=t) == norm_without_silu(x) * (1 + s) + t`` then SiLU for GroupNormSiLU.

The kernels are forward only: when autograd must record the op (grad mode on and x or a
parameter requires grad) the modules compute the same function with the differentiable
reference instead.
"""

from __future__ import annotations

import torch
from torch import nn

from fastdiff.ops.group_norm import _validate, group_norm
from fastdiff.reference.group_norm import group_norm as group_norm_reference


class GroupNorm(nn.GroupNorm):
    """torch.nn.GroupNorm running the fused fastdiff kernel.

    `backend` ("auto", "reference", "cpu", "cuda", "triton"; a settable attribute) picks the
    path (see `fastdiff info`).
    """

    silu = False

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 affine: bool = True, device=None, dtype=None, backend: str = "auto") -> None:
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device,
                         dtype=dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if weight is not None and weight.dtype != x.dtype:  # e.g. fp32 parameters, fp16 data
            weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, scale, shift))
        if needs_grad:
            weight, bias, eps, scale, shift = _validate(x, self.num_groups, weight, bias,
                                                        self.eps, scale, shift, self.silu)
            return group_norm_reference(x, self.num_groups, weight, bias, eps, scale, shift,
                                        self.silu)
        return group_norm(x, self.num_groups, weight, bias, self.eps, scale=scale, shift=shift,
                          silu=self.silu, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"


class GroupNormSiLU(GroupNorm):
    """GroupNorm followed by SiLU, fused: ``silu(torch.nn.GroupNorm(...)(x))``."""

    silu = True
