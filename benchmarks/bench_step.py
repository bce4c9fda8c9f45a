"""One sampler step outside the model: fused engine vs pure-PyTorch reference vs diffusers.

Each benchmark runs a whole 20-step loop with a model that costs nothing (it returns a fixed
epsilon tensor), so the time is the solver's own work; extra_info carries the time per step.
Same arithmetic on every side: an epsilon-prediction network on SD1.5's scaled-linear
schedule, so diffusers' step does the eps -> x0 conversion and the update, and fastdiff fuses
both (fastdiff.denoisers.Denoiser) into its single stage kernel.
"""

from __future__ import annotations

import pytest
import torch

from fastdiff.denoisers import Denoiser
from fastdiff.ops import resolve
from fastdiff.reference.solvers import SOLVERS
from fastdiff.sampler import Sampler
from fastdiff.schedules import DiscreteVPSchedule

diffusers = pytest.importorskip("diffusers")

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPE = torch.float16 if HAS_CUDA else torch.float32
STEPS = 20
SHAPES = [(2, 4, 64, 64), (2, 4, 128, 128)]
FUSED = [resolve("auto", DEVICE)]  # the backend fastdiff picks by default (never the interpreter)
# On a GPU the same loop also runs graph-replayed: one CUDA graph for all 20 steps.
FUSED += [f"{FUSED[0]}-graph"] if HAS_CUDA else []
# fastdiff solver name -> (diffusers scheduler class, its config overrides)
PAIRS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++",
                                                 "solver_order": 2}),
    "unipc_bh2_2": ("UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2"}),
}
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                num_train_timesteps=1000)


def scheduler(name: str):
    cls_name, overrides = PAIRS[name]
    s = getattr(diffusers, cls_name)(**SD_BETAS, **overrides)
    s.set_timesteps(STEPS, device=DEVICE)
    return s


def constant_eps(shape):
    eps = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    return eps, (lambda x, t, **kw: eps)


def sigmas_of(s) -> torch.Tensor:
    if hasattr(s, "sigmas") and s.sigmas is not None and len(s.sigmas) == STEPS + 1:
        return s.sigmas.double().cpu()
    abar = s.alphas_cumprod.double()[s.timesteps.cpu().long()]
    return torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=torch.float64)])


def schedule():
    return DiscreteVPSchedule.from_betas("scaled_linear", 1000, beta_start=0.00085,
                                         beta_end=0.012)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("impl", ["diffusers", "reference", *(f"fastdiff-{b}" for b in FUSED)])
def bench_sampler_step(benchmark, impl, name, shape):
    s = scheduler(name)
    eps, network = constant_eps(shape)
    x = torch.randn(shape, device=DEVICE, dtype=DTYPE) * s.init_noise_sigma
    sigmas = sigmas_of(s)
    benchmark.group = f"step {name} {'x'.join(map(str, shape))}"
    benchmark.extra_info.update(steps=STEPS, device=str(DEVICE), dtype=str(DTYPE))

    if impl == "diffusers":
        def loop():
            sample = x
            for t in s.timesteps:
                model_in = s.scale_model_input(sample, t)
                sample = s.step(network(model_in, t), t, sample).prev_sample
            return sample
    else:
        denoiser = Denoiser(network, "epsilon", schedule=schedule())
        if impl == "reference":
            def loop():
                return SOLVERS[name].fn(denoiser, x, sigmas.to(DEVICE), disable=True,
                                        **SOLVERS[name].kwargs)
        else:
            kernel_backend = impl.split("-")[1]
            sampler = Sampler(denoiser, name, sigmas, backend=kernel_backend,
                              graph=impl.endswith("-graph"))

            def loop():
                return sampler(x, seed=0)

    def timed():
        out = loop()
        if HAS_CUDA:
            torch.cuda.synchronize()
        return out

    def reset():  # diffusers' schedulers keep a step index: rewind it, untimed
        s.set_timesteps(STEPS, device=DEVICE)

    reset()
    timed()  # warm-up: plans, caches, Triton compilation
    benchmark.pedantic(timed, setup=reset, rounds=10, warmup_rounds=1)
    if benchmark.stats is not None:
        benchmark.extra_info["ms_per_step"] = benchmark.stats.stats.median * 1e3 / STEPS
