"""Whole sampling loops (issue 7, regime 3): eager vs whole-loop CUDA graph, model included.

Digits: the embedded class-conditional model (fastdiff.models.digits), DPM-Solver++(2M), 20
steps on a GPU (5 on CPU), classifier-free guidance 1.5 with one batched network call per step:
diffusers' DPMSolverMultistepScheduler loop on the same network (and the same loop with the
scheduler swapped for fastdiff.diffusers' fused twin: "fastdiff-scheduler"), a k-diffusion-style
eager loop (fastdiff.reference.solvers.sample_dpmpp_2m), fastdiff.Sampler eager and graph=True
(GPU only).
The network is tiny, so these loops measure per-step overhead: launches and Python.

SD1.5-shaped (GPU only): diffusers' UNet2DConditionModel built from Stable Diffusion 1.5's
config with random weights (no download), fp16, 512x512 (latents 1x4x64x64), CFG 7.5 (the
network sees batch 2), 20 steps: diffusers' scheduler loop, the same loop with the fused twin
scheduler ("fastdiff-scheduler") and after fastdiff.accelerate, fastdiff.Sampler eager /
graph, and torch.compile(unet) (mode in extra_info; FASTDIFF_BENCH_COMPILE_MODE overrides; only
in full timed runs: not with --benchmark-disable or `fastdiff bench --quick`).
The SDPA backend is pinned (torch.nn.attention.sdpa_kernel; FASTDIFF_BENCH_SDPA overrides) and
recorded. Every result records ms_per_step and the largest difference of its samples from the
baseline loops of its group (diffusers, k-diffusion) that ran before it.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import pytest
import torch

from fastdiff.denoisers import Denoiser
from fastdiff.reference.solvers import sample_dpmpp_2m
from fastdiff.sampler import Sampler
from fastdiff.schedules import DiscreteVPSchedule

diffusers = pytest.importorskip("diffusers")

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
QUICK = os.environ.get("FASTDIFF_BENCH_QUICK", "") == "1"  # set by `fastdiff bench --quick`
ROUNDS = 3 if QUICK or not HAS_CUDA else 10
DIGITS_STEPS = 20 if HAS_CUDA else 5
SD_STEPS = 20
SD_DTYPE = torch.float16
COMPILE_MODE = os.environ.get("FASTDIFF_BENCH_COMPILE_MODE", "max-autotune-no-cudagraphs")
SDPA = os.environ.get("FASTDIFF_BENCH_SDPA", "FLASH_ATTENTION")
SD15_UNET = dict(  # Stable Diffusion 1.5's unet/config.json, minus the weights
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                num_train_timesteps=1000)
_OUTPUTS: dict[tuple[str, str], torch.Tensor] = {}  # (group, baseline) -> its samples


def dpm_scheduler(steps: int, **betas):
    s = diffusers.DPMSolverMultistepScheduler(**betas, algorithm_type="dpmsolver++",
                                              solver_order=2, use_karras_sigmas=True)
    s.set_timesteps(steps, device=DEVICE)
    return s


def scheduler_sigmas(s) -> torch.Tensor:
    """The scheduler's noise levels (float64, ending in 0): every loop walks the same ones."""
    return s.sigmas.double().cpu()


def fused_twin(s):
    """The scheduler swapped for fastdiff's drop-in twin, as a user does in one line."""
    import fastdiff.diffusers

    twin = getattr(fastdiff.diffusers, type(s).__name__).from_config(s.config)
    twin.set_timesteps(len(s.timesteps), device=DEVICE)
    return twin


def diffusers_loop(s, call, noise, steps, guidance):
    """The loop of a diffusers pipeline: batched CFG halves, scale_model_input, step."""

    def loop():
        sample = noise * s.init_noise_sigma
        for t in s.timesteps:
            inp = s.scale_model_input(torch.cat([sample, sample]), t)
            eps_u, eps_c = call(inp, t).chunk(2)
            sample = s.step(eps_u + guidance * (eps_c - eps_u), t, sample).prev_sample
        return sample

    def rewind():  # the scheduler keeps a step index: reset it, untimed (as bench_step does)
        s.set_timesteps(steps, device=DEVICE)

    return loop, rewind


def run_timed(benchmark, loop, steps: int, impl: str, setup=None):
    """Times the whole loop (synchronised), records ms per step and the distance to baseline."""

    def timed():
        out = loop()
        if HAS_CUDA:
            torch.cuda.synchronize()
        return out

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if setup is not None:
            setup()
        out = timed()  # warm-up: plans, Triton/inductor compilation, graph capture
    fallbacks = [str(w.message) for w in caught if "running" in str(w.message)]
    if fallbacks:
        benchmark.extra_info["fallback"] = fallbacks[0]
    for base in ("diffusers", "k-diffusion"):  # same network, noise and noise levels
        if (benchmark.group, base) in _OUTPUTS:
            benchmark.extra_info[f"max_abs_diff_vs_{base}"] = float(
                (out.float() - _OUTPUTS[benchmark.group, base]).abs().max())
    if impl in ("diffusers", "k-diffusion"):
        _OUTPUTS[benchmark.group, impl] = out.float()
    benchmark.extra_info.update(steps=steps, device=str(DEVICE), impl=impl,
                                finite=bool(torch.isfinite(out).all()))
    benchmark.pedantic(timed, setup=setup, rounds=ROUNDS, warmup_rounds=0)
    if benchmark.stats is not None:
        benchmark.extra_info["ms_per_step"] = benchmark.stats.stats.median * 1e3 / steps


# -- digits: the embedded model ------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    from fastdiff.models.digits import NULL_LABEL, SCHEDULE, load_digits_model

    model = load_digits_model(device=DEVICE)
    labels = torch.arange(10, device=DEVICE)
    s = dpm_scheduler(DIGITS_STEPS, **SCHEDULE)
    noise = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    return model, labels, torch.full_like(labels, NULL_LABEL), s, noise


@pytest.mark.parametrize("impl", ["diffusers", "fastdiff-scheduler", "k-diffusion",
                                  "fastdiff-eager", "fastdiff-graph"])
def bench_loop_digits(benchmark, digits, impl):
    from fastdiff.models.digits import guided

    if impl == "fastdiff-graph" and not HAS_CUDA:
        pytest.skip("graph=True needs CUDA")
    model, labels, null, s, noise = digits
    setup = None
    guidance, steps = 1.5, DIGITS_STEPS
    sigmas = scheduler_sigmas(s)
    x = noise * sigmas[0].item()  # VE coordinates (k-diffusion)
    benchmark.group = f"loop digits dpmpp_2m {steps} steps cfg batch 10"
    benchmark.extra_info.update(solver="dpmpp_2m", guidance=guidance)
    if impl in ("diffusers", "fastdiff-scheduler"):  # diffusers' loop, its scheduler or fastdiff's
        unet, cls = model.network.unet, torch.cat([null, labels])
        loop, setup = diffusers_loop(s if impl == "diffusers" else fused_twin(s),
                                     lambda inp, t: unet(inp, t, class_labels=cls), noise,
                                     steps, guidance)
    elif impl == "k-diffusion":
        cfg = guided(model, guidance)

        def loop():
            return sample_dpmpp_2m(cfg, x, sigmas.to(DEVICE, x.dtype), disable=True,
                                   extra_args=dict(cond=labels, uncond=null))
    else:
        sampler = Sampler(guided(model, guidance), "dpmpp_2m", sigmas,
                          graph=impl == "fastdiff-graph")

        def loop():
            return sampler(x, cond=labels, uncond=null)
    with torch.no_grad():
        run_timed(benchmark, loop, steps, impl, setup)


# -- SD1.5-shaped UNet, random weights, fp16 (GPU only) ----------------------------------


@pytest.fixture(scope="module")
def sd_unet():
    if not HAS_CUDA:
        pytest.skip("the SD1.5-shaped UNet loop needs a CUDA GPU")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**SD15_UNET)
    return {"eager": unet.to(DEVICE, torch.float16).eval().requires_grad_(False)}


def sdpa_context():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA))


def unet_call(unet, emb):
    """network(x, t) with the batched text embeddings; one timestep form (float32 [B]) for
    every loop, so a compiled UNet sees one signature."""

    def call(x, t):
        t = t.to(device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        t = t.contiguous()  # the same strides from every loop: no recompilation
        return unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]

    return call


@pytest.mark.parametrize("impl", ["diffusers", "fastdiff-scheduler", "fastdiff-eager",
                                  "fastdiff-graph", "fastdiff-accelerate", "diffusers-compile",
                                  "fastdiff-eager-compile", "fastdiff-graph-compile"])
def bench_loop_sd15_unet(benchmark, sd_unet, impl):
    if impl == "fastdiff-graph-compile" and COMPILE_MODE in ("reduce-overhead", "max-autotune"):
        pytest.skip("torch.compile's own CUDA graphs cannot be captured in fastdiff's graph")
    compiled = impl.endswith("-compile")
    if compiled and (QUICK or getattr(benchmark, "disabled", False)):
        pytest.skip("torch.compile (minutes for this UNet) runs only in full, timed runs")
    guidance, steps, dtype = 7.5, SD_STEPS, SD_DTYPE
    size, width = SD15_UNET["sample_size"], SD15_UNET["cross_attention_dim"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(sdpa_context())
        if compiled and "compiled" not in sd_unet:
            sd_unet["compiled"] = torch.compile(sd_unet["eager"], mode=COMPILE_MODE)
        unet = sd_unet["compiled" if compiled else "eager"]
        gen = torch.Generator().manual_seed(0)
        text = torch.randn(2, 77, width, generator=gen).to(DEVICE, dtype)  # (uncond, cond)
        noise = torch.randn(1, 4, size, size, generator=gen).to(DEVICE, dtype)
        s = dpm_scheduler(steps, **SD_BETAS)
        sigmas = scheduler_sigmas(s)
        benchmark.group = (f"loop sd15-unet {8 * size}x{8 * size} {str(dtype)[6:]} dpmpp_2m"
                           f" {steps} steps cfg")
        benchmark.extra_info.update(solver="dpmpp_2m", guidance=guidance, sdpa_backend=SDPA,
                                    compile_mode=COMPILE_MODE if compiled else None,
                                    dtype=str(dtype))
        call = unet_call(unet, text)
        if impl == "fastdiff-accelerate":  # the same diffusers loop, after fastdiff.accelerate
            import copy
            import types

            import fastdiff

            pipe = fastdiff.accelerate(types.SimpleNamespace(
                unet=copy.deepcopy(sd_unet["eager"]), scheduler=s))  # swaps modules in place
            pipe.scheduler.set_timesteps(steps, device=DEVICE)
            loop, setup = diffusers_loop(pipe.scheduler, unet_call(pipe.unet, text), noise,
                                         steps, guidance)
        elif impl == "fastdiff-scheduler":
            loop, setup = diffusers_loop(fused_twin(s), call, noise, steps, guidance)
        elif impl.startswith("diffusers"):
            loop, setup = diffusers_loop(s, call, noise, steps, guidance)
        else:
            setup = None
            schedule = DiscreteVPSchedule.from_betas("scaled_linear", 1000,
                                                     beta_start=0.00085, beta_end=0.012)

            def network(x, t, cond):
                return unet_call(unet, cond)(x, t)

            denoiser = Denoiser(network, "epsilon", schedule=schedule)
            sampler = Sampler(denoiser, "dpmpp_2m", sigmas, guidance=guidance,
                              graph="-graph" in impl)
            x = noise * sigmas[0].item()

            def loop():
                return sampler(x, cond=text[1:], uncond=text[:1])
        run_timed(benchmark, loop, steps, impl, setup)
