"""fastdiff.accelerate(pipe) on pipelines built locally from configs with random weights."""

from __future__ import annotations

import contextlib
import copy
import sys
import types
import warnings

import pytest
import torch

import fastdiff

diffusers = pytest.importorskip("diffusers")
HAS_CUDA = torch.cuda.is_available()


@contextlib.contextmanager
def float32_noise():
    """diffusers' randn_tensor draws in float32 and casts, so a float64 run of a pipeline sees
    the same noise as a float32 one (torch's float32 and float64 draws differ)."""
    from diffusers.utils import torch_utils

    original = torch_utils.randn_tensor

    def draw(shape, generator=None, device=None, dtype=None, layout=None, **kw):
        x = original(shape, generator=generator, device=device, dtype=torch.float32,
                     layout=layout, **kw)
        return x.to(dtype or torch.float32)

    patched = [m for m in list(sys.modules.values())
               if getattr(m, "randn_tensor", None) is original]
    for m in patched:
        m.randn_tensor = draw
    try:
        yield
    finally:
        for m in patched:
            m.randn_tensor = original


def within_twice_the_originals_error(make, run, **accelerate_kwargs):
    """The end-to-end form of the project's low-precision rule: against a float64 run of the
    original, the accelerated float32 pipeline's error is at most 2x the original float32
    pipeline's own error."""
    with float32_noise():
        exact = run(make(torch.float64)).double()
        original = run(make(torch.float32)).double()
        accelerated_pipe = fastdiff.accelerate(make(torch.float32), **accelerate_kwargs)
        accelerated = run(accelerated_pipe).double()
    err = (accelerated - exact).abs().max().item()
    own = (original - exact).abs().max().item()
    assert err <= 2 * own, (err, own)
    return accelerated_pipe


def ddpm_pipeline(variance_type="fixed_small"):
    """DDPMPipeline; with a learned variance the UNet returns the mean and v (6 channels)."""
    torch.manual_seed(0)
    learned = variance_type.startswith("learned")
    unet = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=6 if learned else 3, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=False,
                                        variance_type=variance_type)
    return diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)


def run_ddpm(pipe):
    out = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=8,
               output_type="np")
    return out.images


def sd_like_loop(pipe, steps=8, guidance=5.0, dtype=torch.float32):
    """An SD-style denoising loop: CFG by batching, scale_model_input, scheduler.step."""
    g = torch.Generator().manual_seed(1)
    context = torch.randn(2, 7, 24, generator=g).to(dtype)  # [uncond, cond]
    latents = torch.randn(1, 4, 8, 8, generator=g).to(dtype) * pipe.scheduler.init_noise_sigma
    pipe.scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            model_in = pipe.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            eps = pipe.unet(model_in, t, encoder_hidden_states=context).sample
            uncond, cond = eps.chunk(2)
            latents = pipe.scheduler.step(uncond + guidance * (cond - uncond), t,
                                          latents).prev_sample
    return latents


def sd_pipeline():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=24,
        attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear",
                                                      beta_start=0.00085, beta_end=0.012)
    return types.SimpleNamespace(unet=unet.eval(), scheduler=scheduler)


@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_ddpm_pipeline_outputs_unchanged_and_restore_is_exact(variance_type):
    base = ddpm_pipeline(variance_type)

    def make(dtype):
        pipe = copy.deepcopy(base)
        pipe.unet.to(dtype)
        return pipe

    def run(pipe):
        return torch.from_numpy(run_ddpm(pipe))

    pipe = within_twice_the_originals_error(make, run, graph=False)
    assert type(pipe.scheduler).__module__.startswith("fastdiff.diffusers")
    original_scheduler = pipe._fastdiff_accelerate["scheduler"]
    fastdiff.restore(pipe)
    assert pipe.scheduler is original_scheduler
    with float32_noise():
        assert torch.equal(run(pipe), run(make(torch.float32)))


def test_sd_style_loop_with_guidance_scheduler_only_and_kernels():
    base = sd_pipeline()

    def make(dtype):
        pipe = copy.deepcopy(base)
        pipe.unet.to(dtype)
        return pipe

    def run(pipe):
        return sd_like_loop(pipe, dtype=next(pipe.unet.parameters()).dtype)

    within_twice_the_originals_error(make, run, graph=False, kernels=False)  # scheduler alone
    pipe = within_twice_the_originals_error(make, run, graph=False)  # + fastdiff.nn kernels
    fastdiff.restore(pipe)
    assert torch.equal(run(pipe), run(make(torch.float32)))


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
                                  "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                                  "HeunDiscreteScheduler", "PNDMScheduler"])
def test_scheduler_swap_with_the_reference_backend_is_bitwise(name):
    """Only the scheduler swapped, backend="reference": the pipeline's output is bitwise the
    original's (set_timesteps, scale_model_input, add_noise and the step bookkeeping change
    nothing); the same loop through the fused step differs only by rounding."""
    base = sd_pipeline()
    base.scheduler = getattr(diffusers, name).from_config(base.scheduler.config)  # DDPM and
    # DDIM clip x0 by default: fused too

    def loop(pipe):
        torch.manual_seed(7)  # DDPM's step draws from the global generator
        return sd_like_loop(pipe)

    want = loop(copy.deepcopy(base))
    pipe = fastdiff.accelerate(copy.deepcopy(base), graph=False, kernels=False,
                               backend="reference")
    assert type(pipe.scheduler).__module__.startswith("fastdiff.diffusers")
    assert torch.equal(loop(pipe), want)
    fused = fastdiff.accelerate(copy.deepcopy(base), graph=False, kernels=False)
    got = loop(fused)
    assert not torch.equal(got, want)  # the fused arithmetic really ran
    # Against a float64 run, the fused loop's error is at most 2x diffusers' own float32 error.
    # (Not a fixed 1e-5: with clip_sample, this random-UNet loop amplifies rounding to ~5e-5 in
    # diffusers' own float32 run, and the fused run is as close to float64 as diffusers is.)
    exact = copy.deepcopy(base)
    exact.unet.double()
    with float32_noise():  # DDPM's step noise: the same draws as the float32 runs
        torch.manual_seed(7)
        exact = sd_like_loop(exact, dtype=torch.float64)
    own = (want.double() - exact).abs().max()
    assert own < 1e-3 and (got.double() - exact).abs().max() <= 2 * own


def test_accelerate_rejects_an_unknown_backend():
    with pytest.raises(ValueError, match="backend must be"):
        fastdiff.accelerate(sd_pipeline(), backend="fast")


def test_graph_on_cpu_warns_once_and_runs_eagerly():
    pipe = sd_pipeline()
    want = sd_like_loop(pipe, steps=3)
    fastdiff.accelerate(pipe)  # graph=True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = sd_like_loop(pipe, steps=3)
    assert sum("runs eagerly" in str(w.message) for w in caught) == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_graphed_unet_equals_eager_on_gpu():
    pipe = sd_pipeline()
    pipe.unet = pipe.unet.cuda()
    eager = types.SimpleNamespace(unet=pipe.unet, scheduler=pipe.scheduler)

    def loop(p):
        g = torch.Generator().manual_seed(1)
        context = torch.randn(2, 7, 24, generator=g).cuda()
        latents = torch.randn(1, 4, 8, 8, generator=g).cuda()
        p.scheduler.set_timesteps(8, device="cuda")
        with torch.no_grad():
            for t in p.scheduler.timesteps:
                eps = p.unet(p.scheduler.scale_model_input(torch.cat([latents] * 2), t), t,
                             encoder_hidden_states=context).sample
                u, c = eps.chunk(2)
                latents = p.scheduler.step(u + 5.0 * (c - u), t, latents).prev_sample
        return latents

    want = loop(eager)
    fastdiff.accelerate(pipe, kernels=False)
    assert torch.allclose(loop(pipe), want, rtol=1e-4, atol=1e-4)
