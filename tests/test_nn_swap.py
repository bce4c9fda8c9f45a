"""fastdiff kernels swapped into diffusers UNets (built from config, random weights): GroupNorm
modules replaced by fastdiff.nn.GroupNorm, attention through diffusers' own processor API
(fastdiff.nn.AttnProcessor). Outputs stay equal within the dtype tolerance, diffusers' APIs that
inspect the modules keep working, and restore is exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastdiff.nn import AttnProcessor, GroupNorm, restore_modules, swap_modules

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import (  # noqa: E402
    AttnProcessor2_0,
    SlicedAttnProcessor,
)


def count(model, cls):
    return sum(type(m) is cls for m in model.modules())


def processors(model):
    """Every Attention module's processor (UNet2DModel has no attn_processors property)."""
    from diffusers.models.attention_processor import Attention

    return {n: m.processor for n, m in model.named_modules() if isinstance(m, Attention)}


def fused_processors(model):
    return [p for p in processors(model).values() if isinstance(p, AttnProcessor)]


def check_swap(model, call, tol):
    torch.manual_seed(0)
    model = model.eval()
    keys = list(model.state_dict())
    originals = processors(model)
    assert originals
    with torch.no_grad():
        want = call(model)
        swap_modules(model)
        assert count(model, GroupNorm) > 0 and count(model, nn.GroupNorm) == 0
        assert all(isinstance(m, nn.GroupNorm) for m in model.modules() if type(m) is GroupNorm)
        # diffusers' Attention modules stay; their processors are fastdiff's
        assert len(fused_processors(model)) == len(originals)
        assert list(model.state_dict()) == keys  # same keys, nothing extra registered
        got = call(model)
        torch.testing.assert_close(got, want, **tol(torch.float32))
        restore_modules(model)
        assert count(model, GroupNorm) == 0
        assert all(processors(model)[k] is p for k, p in originals.items())
        assert torch.equal(call(model), want)


def unet2d():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def unet2d_condition():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=24,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def test_unet2d_model(tol):
    x = torch.randn(2, 3, 16, 16)
    check_swap(unet2d(), lambda m: m(x, torch.tensor([10, 500])).sample, tol)


def test_unet2d_condition_model(tol):
    x = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 7, 24)
    check_swap(unet2d_condition(), lambda m: m(x, torch.tensor([10, 500]), context).sample, tol)


def test_diffusers_processor_api_keeps_working(tol):
    """After the swap: set_default_attn_processor, attention slicing and a user's processor
    act on the real modules, as in diffusers."""
    unet = unet2d_condition().eval()
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 24)
    with torch.no_grad():
        want = unet(x, torch.tensor([10, 500]), context).sample
        swap_modules(unet)
        unet.set_default_attn_processor()
        assert not fused_processors(unet)
        torch.testing.assert_close(unet(x, torch.tensor([10, 500]), context).sample, want,
                                   **tol(torch.float32))
        swap_modules(unet)
        unet.set_attention_slice(1)
        assert all(isinstance(p, SlicedAttnProcessor) for p in unet.attn_processors.values())
        torch.testing.assert_close(unet(x, torch.tensor([10, 500]), context).sample, want,
                                   **tol(torch.float32))
        restore_modules(unet)

        class Counting(AttnProcessor2_0):  # a user's processor: never replaced
            calls = 0

            def __call__(self, *args, **kwargs):
                Counting.calls += 1
                return super().__call__(*args, **kwargs)

        unet.set_attn_processor(Counting())
        swap_modules(unet)
        assert not fused_processors(unet)
        unet(x, torch.tensor([10, 500]), context)
        assert Counting.calls == len(unet.attn_processors)
