"""fastdiff.nn modules swapped into diffusers UNets (built from config, random weights) leave
their outputs equal within the dtype tolerance."""

from __future__ import annotations

import pytest
import torch

from fastdiff.nn import Attention, GroupNorm, restore_modules, swap_modules

diffusers = pytest.importorskip("diffusers")


def count(model, cls):
    return sum(type(m) is cls for m in model.modules())


def check_swap(model, call, tol):
    torch.manual_seed(0)
    model = model.eval()
    keys = list(model.state_dict())
    with torch.no_grad():
        want = call(model)
        swap_modules(model)
        assert count(model, GroupNorm) > 0 and count(model, Attention) > 0
        assert list(model.state_dict()) == keys  # same keys, nothing extra registered
        got = call(model)
        torch.testing.assert_close(got, want, **tol(torch.float32))
        restore_modules(model)
        assert count(model, GroupNorm) == 0 and count(model, Attention) == 0
        assert torch.equal(call(model), want)


def test_unet2d_model(tol):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    x = torch.randn(2, 3, 16, 16)
    check_swap(unet, lambda m: m(x, torch.tensor([10, 500])).sample, tol)


def test_unet2d_condition_model(tol):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=24,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    x = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 7, 24)
    check_swap(unet, lambda m: m(x, torch.tensor([10, 500]), context).sample, tol)
