"""An ADM / DDPM-style UNet that loads diffusers `UNet2DModel` weights unchanged.

Architecture of Ho et al. 2020 (arXiv:2006.11239, App. B) as refined by Dhariwal & Nichol 2021
(ADM, arXiv:2105.05233, Sec. 3): a sinusoidal time embedding through a two-layer MLP, an optional
class embedding added to it, ResNet blocks (GroupNorm -> SiLU -> conv, the embedding added after
the first conv ("default") or applied as GroupNorm(h) * (1 + scale) + shift ("scale_shift", ADM's
adaptive group normalisation), self-attention at chosen resolutions, and a down/up path joined by
skip connections.

The constructor takes diffusers' `UNet2DModel` config keys and the modules carry diffusers' names,
so `UNet(**unet2d.config).load_state_dict(unet2d.state_dict())` reproduces diffusers' outputs
(`UNet.from_diffusers`). Only the configuration space used by ADM/DDPM-style models is covered
(positional time embedding, conv down/upsampling, `DownBlock2D`/`AttnDownBlock2D`,
`UpBlock2D`/`AttnUpBlock2D`, `UNetMidBlock2D`); anything else raises a ValueError.

GroupNorm(+SiLU, + scale-shift) and attention are `fastdiff.nn` modules, which dispatch to fused
kernels; their parameters have the names of `torch.nn.GroupNorm` and diffusers' `Attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdiff.nn import Attention, GroupNormSiLU

__all__ = ["UNet", "timestep_embedding"]

_DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D")
_UP_TYPES = ("UpBlock2D", "AttnUpBlock2D")
_SHIFTS = ("default", "scale_shift")


def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (fractional) timesteps t [B] -> [B, dim] (Vaswani et al. 2017,
    Sec. 3.5; DDPM's form): frequencies max_period^(-i / (dim/2 - freq_shift)), [sin, cos]
    ([cos, sin] with flip_sin_to_cos). Computed in float32 (float64 for float64 input), as
    diffusers' `get_timestep_embedding`."""
    half = dim // 2
    dtype = torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32
    exponent = -math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()] if flip_sin_to_cos else [args.sin(), args.cos()], -1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    """The time MLP: Linear -> SiLU -> Linear (diffusers `TimestepEmbedding` names)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GN -> SiLU -> conv -> (+ emb | GN * (1 + scale) + shift) -> SiLU -> conv, plus a (1x1 conv)
    shortcut (Ho et al. 2020 App. B; ADM Sec. 3 for "scale_shift")."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, groups: int, eps: float,
                 time_scale_shift: str = "default", output_scale_factor: float = 1.0):
        super().__init__()
        self.time_scale_shift = time_scale_shift
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNormSiLU(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch * (2 if time_scale_shift == "scale_shift"
                                                           else 1))
        self.norm2 = GroupNormSiLU(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(self.norm1(x))
        emb = self.time_emb_proj(F.silu(temb))
        if self.time_scale_shift == "scale_shift":  # silu(GN(h) * (1 + scale) + shift), fused
            scale, shift = emb.chunk(2, dim=1)
            h = self.norm2(h, scale=scale, shift=shift)
        else:
            h = self.norm2(h + emb[:, :, None, None])
        h = self.conv2(h)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = skip + h
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class Downsample2D(nn.Module):
    """Strided 3x3 conv; padding 0 pads right/bottom by one first (diffusers, ADM)."""

    def __init__(self, ch: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.padding == 0 else x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _attention(ch: int, head_dim: int | None, groups: int | None, eps: float,
               rescale: float = 1.0) -> Attention:
    """Spatial self-attention with a residual (diffusers' AttnBlock: `_from_deprecated_attn_block`),
    heads = ch // head_dim."""
    head_dim = ch if head_dim is None else head_dim
    return Attention(ch, heads=ch // head_dim, dim_head=head_dim, norm_num_groups=groups, eps=eps,
                     rescale_output_factor=rescale, residual_connection=True, bias=True,
                     upcast_softmax=True, _from_deprecated_attn_block=True)


class DownBlock(nn.Module):
    """`DownBlock2D` / `AttnDownBlock2D`: resnets (each followed by attention) then a downsample.
    Returns the output and every intermediate state for the skip connections."""

    def __init__(self, attn: bool, n: int, in_ch: int, out_ch: int, temb_ch: int, groups: int,
                 eps: float, shift: str, head_dim: int | None, downsample: bool, padding: int):
        super().__init__()
        if attn:  # registered first: diffusers' parameter order
            self.attentions = nn.ModuleList(_attention(out_ch, head_dim, groups, eps)
                                            for _ in range(n))
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_ch, groups, eps, shift)
            for i in range(n))
        self.downsamplers = (nn.ModuleList([Downsample2D(out_ch, padding)]) if downsample
                             else None)

    def forward(self, h: Tensor, temb: Tensor) -> tuple[Tensor, list[Tensor]]:
        states = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if hasattr(self, "attentions"):
                h = self.attentions[i](h)
            states.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            states.append(h)
        return h, states


class UpBlock(nn.Module):
    """`UpBlock2D` / `AttnUpBlock2D`: n resnets on [h, skip] concatenations, then an upsample."""

    def __init__(self, attn: bool, n: int, in_ch: int, prev_ch: int, out_ch: int, temb_ch: int,
                 groups: int, eps: float, shift: str, head_dim: int | None, upsample: bool):
        super().__init__()
        if attn:
            self.attentions = nn.ModuleList(_attention(out_ch, head_dim, groups, eps)
                                            for _ in range(n))
        self.resnets = nn.ModuleList(
            ResnetBlock2D((prev_ch if i == 0 else out_ch) + (in_ch if i == n - 1 else out_ch),
                          out_ch, temb_ch, groups, eps, shift)
            for i in range(n))
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, h: Tensor, skips: list[Tensor], temb: Tensor) -> Tensor:
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb)
            if hasattr(self, "attentions"):
                h = self.attentions[i](h)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
        return h


class MidBlock(nn.Module):
    """`UNetMidBlock2D`: resnet, (attention, resnet)."""

    def __init__(self, ch: int, temb_ch: int, groups: int, eps: float, shift: str,
                 head_dim: int | None, add_attention: bool, attn_groups: int | None,
                 scale: float):
        super().__init__()
        if add_attention:
            # diffusers: the mid attention has a GroupNorm only with "default" unless given
            if attn_groups is None and shift == "default":
                attn_groups = groups
            self.attentions = nn.ModuleList([_attention(ch, head_dim, attn_groups, eps, scale)])
        self.resnets = nn.ModuleList(ResnetBlock2D(ch, ch, temb_ch, groups, eps, shift, scale)
                                     for _ in range(2))

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        h = self.resnets[0](h, temb)
        if hasattr(self, "attentions"):
            h = self.attentions[0](h)
        return self.resnets[1](h, temb)


class UNet(nn.Module):
    """ADM/DDPM UNet with diffusers `UNet2DModel`'s config keys and parameter names.

    `forward(sample, timestep, class_labels=None) -> Tensor`: sample [B, C, H, W], timestep a
    number, 0-dim or [B] tensor (fractional timesteps allowed), class_labels [B] integers when
    `num_class_embeds` is set (a model trained for classifier-free guidance reserves one index as
    the "null" class; which one is the trainer's convention, e.g. the last).

    Config keys of other `UNet2DModel` features (fourier/learned time embeddings, skip or
    resnet up/down blocks, class_embed_type) raise a ValueError; `dropout` is accepted and
    ignored (this module is for inference; diffusers' dropout is the identity in eval mode);
    `sample_size` and `num_train_timesteps` are recorded only. Keys starting with "_"
    (diffusers' `_class_name`, ...) are ignored.
    """

    def __init__(self, sample_size: int | tuple[int, int] | None = None, in_channels: int = 3,
                 out_channels: int = 3, center_input_sample: bool = False,
                 time_embedding_type: str = "positional", time_embedding_dim: int | None = None,
                 freq_shift: float = 0, flip_sin_to_cos: bool = True,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                                   "AttnDownBlock2D"),
                 mid_block_type: str | None = "UNetMidBlock2D",
                 up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(224, 448, 672, 896), layers_per_block: int = 2,
                 mid_block_scale_factor: float = 1, downsample_padding: int = 1,
                 downsample_type: str = "conv", upsample_type: str = "conv", dropout: float = 0.0,
                 act_fn: str = "silu", attention_head_dim: int | None = 8,
                 norm_num_groups: int = 32, attn_norm_num_groups: int | None = None,
                 norm_eps: float = 1e-5, resnet_time_scale_shift: str = "default",
                 add_attention: bool = True, class_embed_type: str | None = None,
                 num_class_embeds: int | None = None, num_train_timesteps: int | None = None,
                 **private):
        super().__init__()
        unknown = [k for k in private if not k.startswith("_")]  # diffusers' _class_name etc.
        if unknown:
            raise TypeError(f"UNet got unknown config keys {unknown}")
        _check_config(time_embedding_type, down_block_types, up_block_types, block_out_channels,
                      mid_block_type, downsample_type, upsample_type, act_fn,
                      resnet_time_scale_shift, class_embed_type)
        self.config = dict(
            sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
            center_input_sample=center_input_sample, time_embedding_type=time_embedding_type,
            time_embedding_dim=time_embedding_dim, freq_shift=freq_shift,
            flip_sin_to_cos=flip_sin_to_cos, down_block_types=list(down_block_types),
            mid_block_type=mid_block_type, up_block_types=list(up_block_types),
            block_out_channels=list(block_out_channels), layers_per_block=layers_per_block,
            mid_block_scale_factor=mid_block_scale_factor, downsample_padding=downsample_padding,
            attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups,
            attn_norm_num_groups=attn_norm_num_groups, norm_eps=norm_eps,
            resnet_time_scale_shift=resnet_time_scale_shift, add_attention=add_attention,
            num_class_embeds=num_class_embeds)
        chans = list(block_out_channels)
        temb_ch = time_embedding_dim or chans[0] * 4
        groups, eps, shift = norm_num_groups, norm_eps, resnet_time_scale_shift

        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chans[0], temb_ch)
        self.class_embedding = (nn.Embedding(num_class_embeds, temb_ch)
                                if num_class_embeds is not None else None)

        # registration order = diffusers' state-dict order (down, up, then mid)
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(down_block_types):
            last = i == len(chans) - 1
            self.down_blocks.append(DownBlock(
                kind == "AttnDownBlock2D", layers_per_block, chans[max(i - 1, 0)], chans[i],
                temb_ch, groups, eps, shift, attention_head_dim, not last, downsample_padding))

        self.mid_block = None
        if mid_block_type is not None:
            self.mid_block = MidBlock(chans[-1], temb_ch, groups, eps, shift, attention_head_dim,
                                      add_attention, attn_norm_num_groups, mid_block_scale_factor)

        rev = chans[::-1]
        for i, kind in enumerate(up_block_types):
            last = i == len(chans) - 1
            self.up_blocks.append(UpBlock(
                kind == "AttnUpBlock2D", layers_per_block + 1, rev[min(i + 1, len(chans) - 1)],
                rev[max(i - 1, 0)], rev[i], temb_ch, groups, eps, shift, attention_head_dim,
                not last))

        self.conv_norm_out = GroupNormSiLU(groups, chans[0], eps=eps)
        self.conv_out = nn.Conv2d(chans[0], out_channels, 3, padding=1)

    @classmethod
    def from_diffusers(cls, model) -> UNet:
        """A UNet with the config and weights of a diffusers `UNet2DModel` (same device/dtype)."""
        param = next(model.parameters())
        unet = cls(**dict(model.config)).to(device=param.device, dtype=param.dtype)
        unet.load_state_dict(model.state_dict())
        return unet.eval()

    def forward(self, sample: Tensor, timestep, class_labels: Tensor | None = None) -> Tensor:
        cfg = self.config
        if cfg["center_input_sample"]:
            sample = 2 * sample - 1.0
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, sample.shape[0])):
            raise ValueError(f"timestep must be a scalar or [B={sample.shape[0]}], got "
                             f"{tuple(t.shape)}")
        t = t.reshape(-1).expand(sample.shape[0])
        emb = timestep_embedding(t, cfg["block_out_channels"][0], cfg["flip_sin_to_cos"],
                                 cfg["freq_shift"])
        emb = self.time_embedding(emb.to(sample.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels is required: this UNet is class-conditional "
                                 f"(num_class_embeds={cfg['num_class_embeds']})")
            if not isinstance(class_labels, Tensor) or class_labels.is_floating_point():
                raise TypeError("class_labels must be an integer tensor (a float one would be"
                                " truncated)")
            emb = emb + self.class_embedding(class_labels.to(sample.device).long())
        elif class_labels is not None:
            raise ValueError("class_labels given but this UNet has no class embedding")

        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            h, states = block(h, emb)
            skips += states
        if self.mid_block is not None:
            h = self.mid_block(h, emb)
        for block in self.up_blocks:
            h = block(h, skips, emb)
        return self.conv_out(self.conv_norm_out(h))


def _check_config(time_embedding_type, down_block_types, up_block_types, block_out_channels,
                  mid_block_type, downsample_type, upsample_type, act_fn, shift,
                  class_embed_type) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(what)

    need(time_embedding_type == "positional",
         f"time_embedding_type must be 'positional', got {time_embedding_type!r}")
    need(all(t in _DOWN_TYPES for t in down_block_types),
         f"down_block_types must be in {_DOWN_TYPES}, got {tuple(down_block_types)}")
    need(all(t in _UP_TYPES for t in up_block_types),
         f"up_block_types must be in {_UP_TYPES}, got {tuple(up_block_types)}")
    need(len(down_block_types) == len(up_block_types) == len(block_out_channels) > 0,
         "down_block_types, up_block_types and block_out_channels must have the same length")
    need(mid_block_type in (None, "UNetMidBlock2D"),
         f"mid_block_type must be 'UNetMidBlock2D' or None, got {mid_block_type!r}")
    need(downsample_type == "conv", f"downsample_type must be 'conv', got {downsample_type!r}")
    need(upsample_type == "conv", f"upsample_type must be 'conv', got {upsample_type!r}")
    need(act_fn in ("silu", "swish"), f"act_fn must be 'silu', got {act_fn!r}")
    need(shift in _SHIFTS, f"resnet_time_scale_shift must be in {_SHIFTS}, got {shift!r}")
    need(class_embed_type is None, f"class_embed_type must be None, got {class_embed_type!r}")
