"""fastdiff.diffusers inside diffusers' real pipelines, built here from tiny random-weight
components and in-memory tokenizers (no Hub): SD img2img and inpaint at strength 0.3 and 0.6
for every class (PNDM included: its step is computed from the timestep given), SD txt2img with
Align-Your-Steps `timesteps=[...]`, Flux with `sigmas=` and `mu=` through retrieve_timesteps,
a saved pipeline that loads with plain diffusers and back into fastdiff's class, and
`accelerate` on SD img2img (attn_processors kept, restore exact)."""

from __future__ import annotations

import warnings

import pytest
import torch

D = pytest.importorskip("diffusers")
F = pytest.importorskip("fastdiff.diffusers")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import fastdiff  # noqa: E402
from fastdiff.diffusers._loops import OWN_PIPELINES  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops on a shared runner
RTOL = 1e-5  # the README's full-loop tolerance (fp32)
# SD 1.5's shipped scheduler config (PNDM's; the others take what they know of it)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
          num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
          skip_prk_steps=True, steps_offset=1)
WORDS = ["<pad>", "<unk>", "<s>", "</s>", "a", "photo", "of", "cat", "dog", "red", "blue"]
# every class SD's img2img/inpaint pipelines can run in diffusers: add_noise users, not the
# inverse (noise-to-latent) classes, which diffusers uses only to invert an image (the flow and
# inverse classes: tests/test_diffusers_pipelines_more.py, in Flux/SD3 img2img and DiffEdit)
# (and not the two classes only their own pipelines can call: fastdiff/diffusers/_loops.py)
SD_CLASSES = sorted(n for n in F.__all__
                    if hasattr(getattr(D, n), "add_noise") and "Inverse" not in n
                    and n not in OWN_PIPELINES)
# diffusers draws DPMSolverSDE's Brownian tree from a random seed unless the config fixes one
SEEDED = {"DPMSolverSDEScheduler": dict(noise_sampler_seed=0)}


def tokenizer(max_length=8):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length,
                                   pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def clip_text(hidden=24):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=32, num_attention_heads=2,
        num_hidden_layers=1, max_position_embeddings=8, eos_token_id=3, bos_token_id=2,
        pad_token_id=0, projection_dim=hidden)).eval()


def sd_components(in_channels=4):
    torch.manual_seed(0)
    vae = D.AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3,
                          down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                          norm_num_groups=4, sample_size=16)
    unet = D.UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=24,
        attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return dict(vae=vae.eval(), text_encoder=clip_text(), tokenizer=tokenizer(),
                unet=unet.eval(), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)


@pytest.fixture(scope="module")
def sd_parts():
    return {"img2img": sd_components(4), "inpaint": sd_components(9)}


def pipeline(kind, parts, scheduler):
    cls = D.StableDiffusionImg2ImgPipeline if kind == "img2img" else \
        D.StableDiffusionInpaintPipeline
    pipe = cls(**parts[kind], scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, kind, strength, **kwargs):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 16, 16, generator=g)
    extra = {}
    if kind == "inpaint":
        mask = torch.zeros(1, 1, 16, 16)
        mask[..., 4:12, 4:12] = 1
        extra = dict(mask_image=mask, height=16, width=16)
    with torch.no_grad():
        return pipe("a photo of a cat", image=image, strength=strength, num_inference_steps=10,
                    generator=torch.Generator().manual_seed(1), output_type="latent",
                    **extra, **kwargs).images


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def assert_fused(sched):
    plans = list(sched._fd_state().shared.plans.values())
    assert plans and all(hasattr(p, "chunks") for p in plans)  # no step fell back


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
@pytest.mark.parametrize("name", SD_CLASSES)
def test_img2img_and_inpaint_every_class(sd_parts, kind, name):
    for strength in (0.3, 0.6):
        config = {**SD, **SEEDED.get(name, {})}
        ref = getattr(D, name).from_config(config)
        ours = getattr(F, name).from_config(config)
        want = call(pipeline(kind, sd_parts, ref), kind, strength)
        got = call(pipeline(kind, sd_parts, ours), kind, strength)
        assert torch.isfinite(want).all()
        assert rel_err(got, want) <= RTOL, (strength, rel_err(got, want))
        assert_fused(ours)


AYS_SD15 = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]  # Align Your Steps, SD 1.5


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
                                  "DDPMScheduler", "LCMScheduler", "HeunDiscreteScheduler",
                                  "DPMSolverSinglestepScheduler"])
def test_txt2img_with_align_your_steps_timesteps(name):
    """retrieve_timesteps sees `timesteps` in set_timesteps' signature (it raised before)."""
    import inspect

    parts = sd_components(4)
    assert "timesteps" in inspect.signature(getattr(F, name)().set_timesteps).parameters
    out, schedules = [], []
    for lib in (D, F):
        sched = getattr(lib, name).from_config(SD)
        pipe = D.StableDiffusionPipeline(**parts, scheduler=sched)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            out.append(pipe("a red dog", timesteps=AYS_SD15, height=16, width=16,
                            generator=torch.Generator().manual_seed(2),
                            output_type="latent").images)
        assert set(AYS_SD15) <= set(sched.timesteps.tolist())  # (Heun repeats them)
        schedules.append(sched.timesteps)
    assert torch.equal(schedules[1], schedules[0])
    assert rel_err(out[1], out[0]) <= RTOL


def flux_pipeline(scheduler):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = D.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8])
    t5 = T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=37,
                                 num_layers=1, num_heads=4, pad_token_id=0,
                                 decoder_start_token_id=0)).eval()
    vae = D.AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
                          layers_per_block=1, latent_channels=1, norm_num_groups=1,
                          use_quant_conv=False, use_post_quant_conv=False,
                          shift_factor=0.0609, scaling_factor=1.5035)
    pipe = D.FluxPipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=clip_text(32),
                          tokenizer=tokenizer(), text_encoder_2=t5, tokenizer_2=tokenizer(),
                          transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


FLUX = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
            shift=3.0, use_dynamic_shifting=True)


def test_flux_sigmas_and_mu():
    """FluxPipeline passes sigmas= and mu= (every call failed before): diffusers' result."""
    out = []
    for lib in (D, F):
        sched = lib.FlowMatchEulerDiscreteScheduler(**FLUX)
        with torch.no_grad():
            out.append(flux_pipeline(sched)("a photo of a cat", height=16, width=16,
                                            num_inference_steps=4, guidance_scale=3.5,
                                            max_sequence_length=8, output_type="latent",
                                            generator=torch.Generator().manual_seed(3)).images)
    assert_fused(sched)
    assert rel_err(out[1], out[0]) <= RTOL


def test_retrieve_timesteps_sd3_sigmas():
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
        retrieve_timesteps,
    )

    sigmas = [1.0, 0.8, 0.55, 0.3, 0.1]
    got = []
    for lib in (D, F):
        sched = lib.FlowMatchEulerDiscreteScheduler(shift=3.0)
        timesteps, n = retrieve_timesteps(sched, None, "cpu", sigmas=sigmas)
        got.append((timesteps, n, sched.sigmas))
    assert got[1][1] == got[0][1] == 5
    assert torch.equal(got[1][0], got[0][0]) and torch.equal(got[1][2], got[0][2])


def test_saved_pipeline_loads_with_plain_diffusers_and_back(sd_parts, tmp_path):
    """model_index.json names diffusers' class: plain diffusers loads it (as its own class);
    fastdiff's class is loaded by passing it to from_pretrained."""
    import json
    import subprocess
    import sys

    ours = F.PNDMScheduler.from_config(SD)
    pipe = pipeline("img2img", sd_parts, ours)
    want = call(pipe, "img2img", 0.6)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    code = ("import sys, diffusers; p = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained("
            "sys.argv[1]); assert type(p.scheduler) is diffusers.PNDMScheduler;"
            " assert 'fastdiff' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = D.StableDiffusionImg2ImgPipeline.from_pretrained(
            tmp_path, scheduler=F.PNDMScheduler.from_pretrained(tmp_path, subfolder="scheduler"))
    back.set_progress_bar_config(disable=True)
    assert type(back.scheduler) is F.PNDMScheduler
    assert torch.equal(call(back, "img2img", 0.6), want)


def test_accelerate_sd_img2img_pndm(sd_parts, tmp_path):
    """accelerate on SD 1.5's shipped scheduler at strength 0.6 (0.22 max image difference
    before): the original's result; attn_processors are fastdiff's, restore is exact, and the
    accelerated pipeline saves to what plain diffusers loads."""
    from fastdiff.nn import AttnProcessor

    def make():
        return pipeline("img2img", sd_parts,
                        D.PNDMScheduler.from_config(SD))

    want = call(make(), "img2img", 0.6)
    pipe = make()
    originals = dict(pipe.unet.attn_processors)
    fastdiff.accelerate(pipe, graph=False)
    assert pipe.unet.attn_processors
    assert all(type(p) is AttnProcessor for p in pipe.unet.attn_processors.values())
    got = call(pipe, "img2img", 0.6)
    assert rel_err(got, want) <= 1e-4  # fused attention and GroupNorm: fp32 rounding
    pipe.save_pretrained(tmp_path)
    loaded = D.StableDiffusionImg2ImgPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is D.PNDMScheduler
    assert torch.equal(call(loaded, "img2img", 0.6), want)
    fastdiff.restore(pipe)
    assert all(pipe.unet.attn_processors[k] is p for k, p in originals.items())
    assert torch.equal(call(pipe, "img2img", 0.6), want)
