"""fastdiff.models.UNet equals diffusers' UNet2DModel with the same weights (random, no hub)."""

import pytest
import torch

from fastdiff.models.unet import UNet, timestep_embedding

diffusers = pytest.importorskip("diffusers")

DOWN, ADOWN, UP, AUP = "DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"

CONFIGS = {
    # the embedded digits model's layout: attention at the low resolution, class-conditional
    "digits_cond": dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                        layers_per_block=1, down_block_types=(DOWN, ADOWN),
                        up_block_types=(AUP, UP), norm_num_groups=8, attention_head_dim=8,
                        num_class_embeds=11),
    # no attention anywhere, scale-shift (ADM AdaGN) time conditioning, DDPM-style embedding
    "no_attn_scale_shift": dict(sample_size=16, in_channels=3, out_channels=3,
                                block_out_channels=(8, 16, 16), layers_per_block=2,
                                down_block_types=(DOWN,) * 3, up_block_types=(UP,) * 3,
                                norm_num_groups=4, add_attention=False,
                                resnet_time_scale_shift="scale_shift", flip_sin_to_cos=False,
                                freq_shift=1),
    # attention at every level, several heads, head dim None in the middle via add_attention,
    # downsample padding 0, mid-block output scaling, scale-shift (mid attention without norm)
    "all_attn": dict(sample_size=8, in_channels=2, out_channels=4, block_out_channels=(16, 24),
                     layers_per_block=1, down_block_types=(ADOWN, ADOWN),
                     up_block_types=(AUP, AUP), norm_num_groups=4, attention_head_dim=8,
                     resnet_time_scale_shift="scale_shift", downsample_padding=0,
                     mid_block_scale_factor=1.5, norm_eps=1e-6),
    # no mid block, one head of the full width, odd time-embedding width, center_input_sample
    "no_mid_cond": dict(sample_size=(8, 12), in_channels=1, out_channels=2,
                        block_out_channels=(8, 16), layers_per_block=1,
                        down_block_types=(ADOWN, DOWN), up_block_types=(UP, AUP),
                        norm_num_groups=2, attention_head_dim=None, mid_block_type=None,
                        time_embedding_dim=37, num_class_embeds=3, center_input_sample=True),
}


def _pair(cfg, dtype=torch.float32):
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(**cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases (default init has weight 1, bias 0)
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if dtype != torch.float32:
        ref = ref.to(dtype)
    return ref, UNet.from_diffusers(ref)


def _inputs(cfg, dtype, batch=3):
    size = cfg["sample_size"]
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg["in_channels"], h, w, generator=g, dtype=dtype)
    t = torch.tensor([0.0, 17.25, 999.0][:batch], dtype=dtype)
    n_cls = cfg.get("num_class_embeds")
    kw = {"class_labels": torch.arange(batch) % n_cls} if n_cls else {}
    return x, t, kw


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_diffusers_fp32(name, tol):
    cfg = CONFIGS[name]
    ref, ours = _pair(cfg)
    assert list(ours.state_dict()) == list(ref.state_dict())  # same names, same order
    x, t, kw = _inputs(cfg, torch.float32)
    with torch.no_grad():
        expected = ref(x, t, **kw).sample
        got = ours(x, t, **kw)
    assert expected.abs().max() > 0.1  # a real output, not a vanishing one
    torch.testing.assert_close(got, expected, **tol(torch.float32))


def test_matches_diffusers_fp64():
    # diffusers rounds the sinusoidal embedding to fp32 even for a float64 model; we keep fp64,
    # so the agreement is at fp32 rounding of that embedding, far below fp32 model error
    cfg = CONFIGS["digits_cond"]
    ref, ours = _pair(cfg, torch.float64)
    x, t, kw = _inputs(cfg, torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, **kw), ref(x, t, **kw).sample, atol=1e-6, rtol=1e-6)


def test_timestep_forms_agree():
    cfg = CONFIGS["digits_cond"]
    _, ours = _pair(cfg)
    x, _, kw = _inputs(cfg, torch.float32)
    with torch.no_grad():
        full = ours(x, torch.full((3,), 250.0), **kw)
        for t in (250, 250.0, torch.tensor(250), torch.tensor([250.0])):
            torch.testing.assert_close(ours(x, t, **kw), full, atol=0, rtol=0)


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.5, 10.0, 999.0])
    for dim, flip, shift in [(32, True, 0), (33, False, 1), (8, True, 1)]:
        expected = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        torch.testing.assert_close(timestep_embedding(t, dim, flip, shift), expected)
    # float64 timesteps keep float64 (no fp32 rounding of large t * freq)
    assert timestep_embedding(t.double(), 8).dtype == torch.float64


def test_bad_input():
    cfg = CONFIGS["digits_cond"]
    _, ours = _pair(cfg)
    x, t, kw = _inputs(cfg, torch.float32)
    with pytest.raises(ValueError, match="class_labels"):
        ours(x, t)
    with pytest.raises(ValueError, match="timestep"):
        ours(x, torch.zeros(2), **kw)
    with pytest.raises(TypeError, match="unknown config"):
        UNet(**cfg, not_a_key=1)
    with pytest.raises(ValueError, match="down_block_types"):
        UNet(**{**cfg, "down_block_types": ("CrossAttnDownBlock2D", DOWN)})
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        UNet(**{**cfg, "resnet_time_scale_shift": "spatial"})
    _, uncond = _pair(CONFIGS["no_attn_scale_shift"])
    x2, t2, _ = _inputs(CONFIGS["no_attn_scale_shift"], torch.float32)
    with pytest.raises(ValueError, match="no class embedding"):
        uncond(x2, t2, class_labels=torch.zeros(3, dtype=torch.long))
