"""The fused engine equals the reference solvers, for every solver with a plan."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastdiff.denoisers import CFGDenoiser, Denoiser, ThresholdedDenoiser
from fastdiff.models.gmm import GaussianMixture
from fastdiff.ops import unavailable_reason
from fastdiff.reference.solvers import SOLVERS
from fastdiff.reference.solvers._utils import default_noise_sampler
from fastdiff.sampler import Sampler, sample
from fastdiff.spacings import get_sigmas_karras

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
BACKENDS = ["reference"] + [b for b in ("cpu", "cuda") if not unavailable_reason(b, DEVICE)]
# the parity tests below also run Triton where it runs (its interpreter on CPU: small problems)
PARITY_BACKENDS = BACKENDS + [b for b in ("triton",) if not unavailable_reason(b, DEVICE)]
FIXED_STEP = list(SOLVERS)  # every entry (dpm_adaptive, data-dependent steps, has none)
GMM = GaussianMixture.default(d=6)


def problem(name: str, dtype=torch.float64, steps: int = 8, batch: int = 5):
    """(model, noise, sigmas) for solver `name`: the exact mixture in its parameterisation."""
    g = torch.Generator().manual_seed(0)
    if SOLVERS[name].param == "flow":
        sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        x = torch.randn(batch, 2, 3, generator=g, dtype=torch.float64)
        model = GMM.flow_denoiser
    else:
        sigmas = get_sigmas_karras(steps, 0.03, 20.0, dtype=torch.float64)
        x = torch.randn(batch, 2, 3, generator=g, dtype=torch.float64) * 20.0
        model = GMM
    return model, x.to(DEVICE, dtype), sigmas


def seeded_noise(x, seed):
    return default_noise_sampler(x, torch.Generator(x.device).manual_seed(seed))


def run_reference(name, model, x, sigmas, seed=1, **kwargs):
    info = SOLVERS[name]
    extra = {}
    if "noise_sampler" in inspect.signature(info.fn).parameters:
        extra["noise_sampler"] = seeded_noise(x, seed)
    torch.manual_seed(seed)  # draws the reference makes with randn_like (s_churn)
    return info.fn(model, x, sigmas.to(x.dtype), disable=True, **info.kwargs, **extra, **kwargs)


def run_engine(name, model, x, sigmas, backend, seed=1, **kwargs):
    sampler = Sampler(model, name, sigmas, backend=backend, noise="generator", **kwargs)
    if "noise_sampler" in inspect.signature(SOLVERS[name].fn).parameters:
        sampler.noise_sampler = seeded_noise(x, seed)
    torch.manual_seed(seed)
    return sampler(x)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
@pytest.mark.parametrize("name", FIXED_STEP)
def test_every_solver_equals_its_reference_fp64(name, backend):
    model, x, sigmas = problem(name)
    original = x.clone()
    want = run_reference(name, model, x, sigmas)
    got = run_engine(name, model, x, sigmas, backend)
    assert torch.equal(x, original), "the input noise was modified"
    assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
@pytest.mark.parametrize("name", FIXED_STEP)
def test_every_solver_equals_its_reference_fp32(name, backend):
    model, x, sigmas = problem(name, torch.float32)
    want = run_reference(name, model, x, sigmas)
    got = run_engine(name, model, x, sigmas, backend)
    assert got.dtype == torch.float32
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc_bh2_3", "deis_3",
                                  "lms", "ddim", "flow_heun"])
def test_low_precision_error_within_twice_the_references(name, dtype):
    """FlashAttention's rule: error against fp64 at most 2x the reference solver's own error
    when it runs in the same precision.

    Max error is measured on a unimodal Gaussian, whose flow map is smooth, so the statistic
    measures arithmetic. On the multimodal mixture a few samples sit on component boundaries,
    where the exact flow map amplifies any perturbation (in bf16 one rounding can move a sample
    to another mode: an error of ~0.5 that dominates max and RMS alike); there the median error
    is compared, which a handful of such samples cannot move."""
    model, x64, sigmas = problem(name, steps=10, batch=64)
    gaussian = GaussianMixture(torch.full((1, 6), 0.7, dtype=torch.float64), 0.5)
    smooth = gaussian.flow_denoiser if SOLVERS[name].param == "flow" else gaussian
    for m, stat in ((smooth, lambda e: e.abs().max()), (model, lambda e: e.abs().median())):
        exact = run_reference(name, m, x64, sigmas)
        x = x64.to(dtype)
        ref_err = stat(run_reference(name, m, x, sigmas).double() - exact).item()
        fused_err = stat(run_engine(name, m, x, sigmas, BACKENDS[-1]).double() - exact).item()
        assert fused_err <= 2 * ref_err, (fused_err, ref_err)


def eps_network():
    """An epsilon-prediction network in VP space, exact for the mixture (the time input is the
    VE sigma here: Denoiser without a schedule)."""

    def network(x_vp, sigma, **cond):
        s = sigma.double().reshape(-1, *([1] * (x_vp.ndim - 1)))
        x = x_vp.double() * (1 + s**2).sqrt()
        return GMM.eps(x, sigma.double()).to(x_vp.dtype)

    return network


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["dpmpp_2m", "heun", "unipc_bh2_3", "lms", "euler_ancestral"])
def test_parameterisation_and_guidance_are_fused(name, backend):
    model, x, sigmas = problem(name)
    wrapped = Denoiser(eps_network(), "epsilon")
    want = run_reference(name, wrapped, x, sigmas)
    sampler = Sampler(wrapped, name, sigmas, backend=backend)
    assert not sampler.scalings.plain  # the conversion runs inside the step kernel
    got = run_engine(name, wrapped, x, sigmas, backend)
    assert rel_err(got, want) < 1e-10
    # Guidance: the two halves of one batched call, combined in the step kernel.
    cfg = CFGDenoiser(wrapped, 2.5)
    cond = dict(cond=torch.zeros(x.shape[0], device=DEVICE),
                uncond=torch.ones(x.shape[0], device=DEVICE))
    want = run_reference(name, cfg, x, sigmas, extra_args=cond)
    sampler = Sampler(cfg, name, sigmas, backend=backend, noise="generator")
    if "noise_sampler" in inspect.signature(SOLVERS[name].fn).parameters:
        sampler.noise_sampler = seeded_noise(x, 1)
    torch.manual_seed(1)
    assert rel_err(sampler(x, **cond), want) < 1e-10


@pytest.mark.parametrize("name", FIXED_STEP)
def test_every_solver_lowers_with_a_network_and_guidance(name):
    """The widest case: conversion of an epsilon network plus the two guidance halves per stage
    (the engine picks the history kind, D or E, that keeps every stage within the kernel)."""
    model, x, sigmas = problem(name, batch=2)
    if SOLVERS[name].param == "flow":
        pytest.skip("the epsilon network here is a VE one")
    network, calls = eps_network(), []

    def counted(x, sigma, **cond):
        calls.append(sigma)
        return network(x, sigma, **cond)

    cfg = CFGDenoiser(Denoiser(counted, "epsilon"), 2.0)
    cond = dict(cond=torch.zeros(2, device=DEVICE), uncond=torch.ones(2, device=DEVICE))
    want = run_reference(name, cfg, x, sigmas, extra_args=cond)
    reference_calls = len(calls)
    sampler = Sampler(cfg, name, sigmas, backend=BACKENDS[-1], noise="generator")
    if "noise_sampler" in inspect.signature(SOLVERS[name].fn).parameters:
        sampler.noise_sampler = seeded_noise(x, 1)
    torch.manual_seed(1)
    del calls[:]
    assert rel_err(sampler(x, **cond), want) < 1e-10
    assert max(len(la.inputs) for la in sampler.launches) <= 6
    # one network call per model evaluation, also where a stage is split in two launches
    assert len(calls) == reference_calls


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "unipc_bh2_3", "heun", "lms", "ddim"])
def test_at_most_two_torch_ops_per_step_outside_the_model(name):
    model, x, sigmas = problem(name, torch.float32, steps=20)
    mode = CountOps()

    def counted_model(x, sigma, **kw):
        mode.paused = True
        try:
            return model(x, sigma, **kw)
        finally:
            mode.paused = False

    sampler = Sampler(counted_model, name, sigmas, backend=BACKENDS[-1])
    sampler(x)  # builds the per-run constants once
    with mode:
        sampler(x)
    assert mode.count / sampler.plan.nfe <= 2, f"{mode.count} ops for {sampler.plan.nfe} steps"


THRESHOLDS = {"dynamic": dict(dynamic_ratio=0.9, max_value=3.0),
              "static": dict(dynamic_ratio=None, clip=1.5),
              "both": dict(dynamic_ratio=0.8, max_value=4.0, clip=0.7)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(THRESHOLDS))
@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m", "unipc_bh2_3", "heun",
                                  "dpmpp_2m_sde", "ipndm", "lms"])
def test_thresholding_is_fused_and_equals_the_reference(name, kind, backend):
    """ThresholdedDenoiser around an epsilon network: the Sampler clips x0 inside the step
    kernel (and finds dynamic thresholding's quantile with the fused reduction) instead of
    running the wrapper; the result equals the reference solver run on the wrapper itself."""
    model, x, sigmas = problem(name)
    net = Denoiser(eps_network(), "epsilon")
    wrapped = ThresholdedDenoiser(net, **THRESHOLDS[kind])
    want = run_reference(name, wrapped, x, sigmas)
    sampler = Sampler(wrapped, name, sigmas, backend=backend, noise="generator")
    assert sampler.scalings.clip and any(la.clip for la in sampler.launches)
    if "noise_sampler" in inspect.signature(SOLVERS[name].fn).parameters:
        sampler.noise_sampler = seeded_noise(x, 1)
    torch.manual_seed(1)
    got = sampler(x)
    assert rel_err(got, want) < 1e-10
    assert rel_err(got, run_reference(name, net, x, sigmas)) > 1e-3  # the clip mattered


class CountAllocations(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.empty_like.default, torch.ops.aten.empty_strided.default,
                    torch.ops.aten.empty.memory_format):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc_bh2_3", "heun", "dpmpp_2m_sde"])
def test_buffers_are_recycled_and_results_never_reused(name):
    """Dead registers' buffers hold later outputs: on CPU a second run allocates only its
    result, and an earlier result is never overwritten by a later run."""
    model, x, sigmas = problem(name, torch.float32, steps=12)
    sampler = Sampler(model, name, sigmas, backend=BACKENDS[-1] if DEVICE.type == "cpu"
                      else "reference")
    first = sampler(x, seed=3)
    kept = first.clone()
    mode = CountAllocations()
    with mode:
        second = sampler(x, seed=3)
    if DEVICE.type == "cpu":
        assert mode.count <= 1 + 1, f"{mode.count} allocations in a warm run"  # result + seeds
    assert torch.equal(first, kept) and torch.equal(second, first)
    assert second.data_ptr() != first.data_ptr()


def test_a_buffer_shared_by_a_live_register_is_not_recycled():
    """A model may return its input tensor: then the dead F register's buffer is still the live
    D register, and recycling it would overwrite D before its last read."""
    from fastdiff.sampler import _Buffers

    x = torch.zeros(3)
    buffers = _Buffers(x, {})
    f = buffers.take()
    regs = {("D", 0): f}  # the model returned f itself
    buffers.release(f, regs)
    assert buffers.take() is not f
    regs.clear()
    buffers.release(f, regs)  # now dead everywhere: reused
    assert buffers.take() is f
    buffers.release(x, {})  # never recycles a tensor it did not allocate (the user's noise)
    assert buffers.take() is not x


def test_plan_is_printable():
    _, x, sigmas = problem("dpmpp_2m")
    text = str(Sampler(GMM, "dpmpp_2m", sigmas).plan)
    assert "Plan dpmpp_2m" in text and "call   7" in text and "D[6]" in text


def test_one_shot_sample_equals_sampler():
    model, x, sigmas = problem("dpmpp_2m")
    assert torch.equal(sample(model, x, sigmas, "dpmpp_2m"), Sampler(model, "dpmpp_2m", sigmas)(x))


def test_plans_are_memoised_by_solver_sigmas_and_options():
    """A second Sampler (or fastdiff.sample call) with the same settings reuses the traced plan;
    any change of sigmas or options builds a new one, and results do not depend on which."""
    model, x, sigmas = problem("dpmpp_2m_sde")
    first = Sampler(model, "dpmpp_2m_sde", sigmas.clone(), eta=0.5)
    again = Sampler(model, "dpmpp_2m_sde", sigmas.clone(), eta=0.5)
    assert again.plan is first.plan
    assert Sampler(model, "dpmpp_2m_sde", sigmas, eta=0.75).plan is not first.plan
    nudged = sigmas.clone()
    nudged[3] *= 1 + 1e-12
    assert Sampler(model, "dpmpp_2m_sde", nudged, eta=0.5).plan is not first.plan
    assert torch.equal(first(x, seed=3), again(x, seed=3))


def test_bad_arguments_are_clear_errors():
    model, x, sigmas = problem("euler")
    with pytest.raises(ValueError, match="solver must be one of"):
        Sampler(model, "nope", sigmas)
    with pytest.raises(ValueError, match="sigmas is required"):
        Sampler(model, "euler")
    with pytest.raises(ValueError, match="sigmas"):
        Sampler(model, "euler", torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="model returned"):
        Sampler(lambda x, s: x[:1], "euler", sigmas)(x)
    with pytest.raises(TypeError, match="model returned"):
        Sampler(lambda x, s: x.float(), "euler", sigmas)(x)
    with pytest.raises(ValueError, match="guidance needs the conditioning"):
        Sampler(Denoiser(eps_network()), "euler", sigmas, guidance=2.0)(x)


@pytest.mark.skipif(bool(unavailable_reason("triton", DEVICE)), reason="triton unavailable")
@pytest.mark.parametrize("name", ["dpmpp_2m", "heun", "unipc_bh2_3", "euler_ancestral", "lms"])
def test_triton_steps_equal_the_reference(name):
    model, x, sigmas = problem(name, torch.float32, steps=5, batch=2)
    want = run_reference(name, model, x, sigmas)
    assert rel_err(run_engine(name, model, x, sigmas, "triton"), want) <= 1e-5


# ---- in-kernel (Philox) noise ------------------------------------------------------------------

# dpmpp_sde(_flow) draw Brownian-bridge noise (tested below), not one Philox draw per call
STOCHASTIC = [n for n in FIXED_STEP if SOLVERS[n].stochastic
              and n not in ("dpmpp_sde", "dpmpp_sde_flow")]


def philox_noise_sampler(x, seeds):
    """A reference noise sampler returning the engine's n-th Philox draw at its n-th call."""
    from fastdiff.reference.lincomb import noise_like

    calls = iter(range(10**6))
    return lambda *args: noise_like(x, seeds, next(calls)).to(x.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", STOCHASTIC)
def test_philox_noise_equals_the_reference_fed_the_same_noise(name, backend):
    model, x, sigmas = problem(name)
    seeds = torch.arange(100, 100 + x.shape[0], device=DEVICE)
    info = SOLVERS[name]
    if "noise_sampler" not in inspect.signature(info.fn).parameters:
        pytest.skip("the reference draws with randn_like only")
    want = info.fn(model, x, sigmas, disable=True, noise_sampler=philox_noise_sampler(x, seeds),
                   **info.kwargs)
    got = Sampler(model, name, sigmas, backend=backend)(x, seeds=seeds)
    assert rel_err(got, want) < 1e-10


@pytest.mark.filterwarnings("ignore:Should have tb<=t1")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "ddpm", "lcm"])
def test_a_sample_is_the_same_alone_or_in_any_batch(name, backend):
    model, x, sigmas = problem(name, torch.float32, batch=4)
    sampler = Sampler(model, name, sigmas, backend=backend)
    together = sampler(x, seed=7)
    for i in range(4):
        alone = sampler(x[i:i + 1], seeds=torch.tensor([7 + i], device=DEVICE))
        assert torch.equal(alone[0], together[i])
    order = torch.tensor([2, 0, 3, 1])
    shuffled = sampler(x[order], seeds=(7 + order).to(DEVICE))
    assert torch.equal(shuffled, together[order])


@pytest.mark.filterwarnings("ignore:Should have tb<=t1")  # torchsde's float rounding at t1
def test_brownian_bridge_noise_matches_kdiffusions_brownian_tree_in_distribution():
    """dpmpp_sde draws overlapping Brownian increments; the engine expresses them through
    independent Philox normals by the Brownian bridge. Its samples must match the reference
    run with k-diffusion's torchsde Brownian tree, within sampling error."""
    pytest.importorskip("torchsde")
    from fastdiff.reference.solvers._utils import BrownianTreeNoiseSampler

    gmm = GaussianMixture.default(d=2)
    n = 3000
    sigmas = get_sigmas_karras(12, 0.02, 10.0, dtype=torch.float64)
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 10
    ns = BrownianTreeNoiseSampler(x, 0.02, 10.0, seed=5)  # one batched tree
    ref = SOLVERS["dpmpp_sde"].fn(gmm, x, sigmas, disable=True, noise_sampler=ns)
    got = Sampler(gmm, "dpmpp_sde", sigmas)(x, seed=0)
    se = (ref.var(0) / n + got.var(0) / n).sqrt()
    assert ((got.mean(0) - ref.mean(0)).abs() < 5 * se).all()
    # the ratio of two independent sample variances has standard error ~ sqrt(4 / n)
    assert ((got.var(0) / ref.var(0) - 1).abs() < 5 * (4 / n) ** 0.5).all()
    # the noise really is there: a deterministic run (eta = 0) gives a different distribution
    ode = Sampler(gmm, "dpmpp_sde", sigmas, eta=0.0)(x)
    assert not torch.allclose(ode, got)


# ---- what the model is given (issue 13, item 1) ------------------------------------------------

class Recorder:
    """A k-diffusion denoiser of unit-variance Gaussian data, written as users write one:
    x / (1 + sigma**2) stays in x's dtype only if sigma has it. Records each noise level."""

    def __init__(self):
        self.levels = []

    def __call__(self, x, sigma, **cond):
        self.levels.append(sigma.clone())
        return x / (1 + sigma.view(-1, *[1] * (x.dim() - 1)) ** 2)


@pytest.mark.parametrize("sigmas_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "euler_ancestral"])
def test_a_model_gets_the_noise_level_kdiffusion_gives_it(name, dtype, sigmas_dtype):
    """k-diffusion calls model(x, sigmas[i] * s_in): sigma in x's dtype, rounded from the
    schedule's dtype. fp16 latents with fp32 sigmas used to get fp32 levels, so the model above
    returned fp32 and the run raised."""
    from fastdiff import k_diffusion as K

    sigmas = get_sigmas_karras(6, 0.03, 14.6, dtype=sigmas_dtype)
    x = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0)).to(DEVICE, dtype) * 14.6
    engine, reference = Recorder(), Recorder()
    options = {"eta": 0.0} if name == "euler_ancestral" else {}  # no noise: same draws
    out = Sampler(engine, name, sigmas, backend=BACKENDS[-1], **options)(x)
    getattr(K, f"sample_{name}")(reference, x, sigmas.to(DEVICE), disable=True, **options)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    assert len(engine.levels) == len(reference.levels) == 6
    for got, want in zip(engine.levels, reference.levels):
        assert got.dtype == want.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_a_denoiser_network_gets_the_time_input_denoiser_gives_it(dtype):
    """A Denoiser's network gets its time input as Denoiser.forward passes it (fp32 for
    fp16/bf16 data, x's dtype otherwise), whatever the dtype of the sigmas: float64 sigmas
    with fp32 data used to give the network float64 times."""
    seen = {"engine": [], "reference": []}
    where = "engine"

    def network(x, t, **cond):
        seen[where].append(t.clone())
        return (x * 0.5).to(x.dtype)

    model = Denoiser(network, "epsilon")
    sigmas = get_sigmas_karras(4, 0.03, 14.6, dtype=torch.float64)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)).to(DEVICE, dtype) * 14.6
    Sampler(model, "euler", sigmas, backend=BACKENDS[-1])(x)
    where = "reference"  # (its sigmas in at least fp32, as k-diffusion users pass them)
    SOLVERS["euler"].fn(model, x, sigmas.to(DEVICE, torch.promote_types(dtype, torch.float32)),
                        disable=True)
    want = dtype if dtype != torch.float16 else torch.float32
    assert [t.dtype for t in seen["engine"]] == [t.dtype for t in seen["reference"]] == [want] * 4
    # the reference's fp16 sigmas * s_in round sigma to fp16 before Denoiser sees it
    rtol = 2.0**-11 if dtype == torch.float16 else 0.0
    for got, ref in zip(seen["engine"], seen["reference"]):
        torch.testing.assert_close(got, ref, rtol=rtol, atol=0)


def test_a_denoiser_network_answering_in_another_float_dtype_is_used_as_denoiser_uses_it():
    """The Denoiser combines a float network output of any dtype (e.g. autocast's fp16 for
    fp32 data) in fp32; the engine does the same instead of refusing it."""
    model = Denoiser(lambda x, t, **c: (x * 0.25).half(), "epsilon")
    sigmas = get_sigmas_karras(4, 0.03, 14.6, dtype=torch.float64)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)).to(DEVICE) * 14.6
    got = Sampler(model, "euler", sigmas, backend=BACKENDS[-1])(x)
    want = SOLVERS["euler"].fn(model, x, sigmas.to(DEVICE, torch.float32), disable=True)
    assert got.dtype == torch.float32 and rel_err(got, want) < 1e-5


# ---- seeds and noise sources (issue 13, items 8 and 13) ----------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_seeds_give_the_samples_of_their_values(backend):
    """A strided `seeds` view reached the kernels through launch_unchecked, which read it
    densely: sample i got the seed of another sample."""
    model, x, sigmas = problem("euler_ancestral", torch.float32, batch=4)
    sampler = Sampler(model, "euler_ancestral", sigmas, backend=backend)
    every_other = torch.arange(100, 108, device=DEVICE)[::2]
    assert not every_other.is_contiguous()
    assert torch.equal(sampler(x, seeds=every_other), sampler(x, seeds=every_other.clone()))


def test_in_kernel_noise_never_builds_a_brownian_tree(monkeypatch):
    """dpmpp_sde with Philox noise used to build a torchsde Brownian tree on every run (it seeds
    a generator and draws on the host: no CUDA graph capture can hold that) although no launch
    reads it. Generator noise still builds it (the negative control)."""
    import fastdiff.reference.solvers._utils as utils

    built = []

    class Tree(utils.BrownianTreeNoiseSampler):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(utils, "BrownianTreeNoiseSampler", Tree)
    model, x, sigmas = problem("dpmpp_sde", torch.float32, batch=2)
    Sampler(model, "dpmpp_sde", sigmas)(x, seed=0)
    assert built == []
    pytest.importorskip("torchsde")
    Sampler(model, "dpmpp_sde", sigmas, noise="generator")(x)
    assert built == [1]
