"""The engine on device "cuda" without a GPU: FakeTensorMode runs (tests/_fake_cuda.py).

Plans and sigmas are made beforehand on the host; then every run on "cuda" fake tensors must
make no host read (FakeTensorMode raises on .item(), bool(), nonzero(), masks), mix no devices
(it raises FakeTensorDeviceMismatchError), launch every stage through the registered
fastdiff::lincomb op (whose fake implementation checks the kernels' contract), and copy nothing
between host and device after the first model call; a second run copies nothing at all. This
is the CPU-tested form of "no host sync in the loop".
"""

from __future__ import annotations

import copy

import pytest
import torch
from _fake_cuda import DEVICE, Transfers, counting, fake_cuda

from fastdiff.denoisers import CFGDenoiser, Denoiser, ThresholdedDenoiser
from fastdiff.reference.solvers import SOLVERS
from fastdiff.sampler import Sampler
from fastdiff.spacings import get_sigmas_karras

FIXED_STEP = list(SOLVERS)  # every entry (dpm_adaptive, data-dependent steps, has none)
SHAPE = (2, 4, 8, 8)


def gaussian(x, sigma, **cond):
    """k-diffusion denoiser of unit Gaussian data, as users write one (it stays in x's dtype
    only if sigma has it)."""
    return x / (1 + sigma.view(-1, *[1] * (x.dim() - 1)) ** 2)


def eps_network(x, t, cond=None):
    return x * 0.5 + 0.01 * t.view(-1, *[1] * (x.dim() - 1)).to(x.dtype)


def sigmas_for(name: str, steps: int = 6) -> torch.Tensor:
    if SOLVERS[name].param == "flow":
        return torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return get_sigmas_karras(steps, 0.03, 14.6)  # float32, as k-diffusion users pass them


def run_twice(sampler: Sampler, transfers: Transfers, dtype=torch.float16, **call):
    """Two runs on fake CUDA noise; returns the first result and the second run's Transfers."""
    with fake_cuda(transfers):
        noise = torch.randn(SHAPE, device=DEVICE, dtype=dtype)
        out = sampler(noise, **call)
    again = Transfers()
    with fake_cuda(again):
        sampler(torch.randn(SHAPE, device=DEVICE, dtype=dtype), **call)
    return out, again


def check(sampler: Sampler, transfers: Transfers, again: Transfers, out, dtype=torch.float16):
    assert out.device == DEVICE and out.dtype == dtype and tuple(out.shape) == SHAPE
    assert transfers.after(1) == [], "copies after the first step"
    assert again.copies == [], "copies in a warm run"
    launches = [op for op in transfers.ops if op.startswith("lincomb")]
    assert len(launches) == len(sampler.launches), "a stage did not run the registered op"


@pytest.mark.parametrize("name", FIXED_STEP)
def test_every_solver_runs_on_cuda_without_host_reads_or_copies(name):
    transfers = Transfers()
    sampler = Sampler(counting(gaussian, transfers), name, sigmas_for(name))
    out, again = run_twice(sampler, transfers, seed=0)
    check(sampler, transfers, again, out)


# name -> (model from the innermost callable, Sampler options, solvers)
VARIANTS = {
    "epsilon network + guidance": (
        lambda f: CFGDenoiser(Denoiser(f(eps_network), "epsilon"), 2.5), {}, ("dpmpp_2m", "heun")),
    "guidance option": (lambda f: Denoiser(f(eps_network), "v"), {"guidance": 3.0},
                        ("unipc_bh2_3", "euler_ancestral")),
    "dynamic thresholding": (
        lambda f: ThresholdedDenoiser(Denoiser(f(eps_network)), dynamic_ratio=0.9,
                                      max_value=3.0), {}, ("ddim", "dpmpp_2m")),
    "static clip": (lambda f: ThresholdedDenoiser(Denoiser(f(eps_network)), dynamic_ratio=None,
                                                  clip=1.0), {}, ("ddim", "heun")),
    "both clips": (lambda f: ThresholdedDenoiser(Denoiser(f(eps_network)), dynamic_ratio=0.8,
                                                 max_value=4.0, clip=0.7), {}, ("dpmpp_2m_sde",)),
    "generator noise": (lambda f: f(gaussian), {"noise": "generator"},
                        ("euler_ancestral", "dpmpp_2m_sde", "ddpm")),
    # 7 inputs after each call: stages split in two launches (lowering.lower's split)
    "epsilon network + guidance + generator noise": (
        lambda f: CFGDenoiser(Denoiser(f(eps_network), "epsilon"), 2.5), {"noise": "generator"},
        ("sa_solver",)),
    "noise sampler": (lambda f: f(gaussian),
                      {"noise_sampler": lambda s, t: torch.randn(SHAPE, device=DEVICE)
                       .half()}, ("euler_ancestral",)),
    "channels-last model output": (
        lambda f: f(lambda x, s, **c: gaussian(x, s).contiguous(memory_format=torch.channels_last)),
        {}, ("dpmpp_2m", "euler_ancestral")),
}
CASES = [(v, n) for v, (_, _, names) in VARIANTS.items() for n in names]


@pytest.mark.parametrize("variant,name", CASES)
def test_engine_options_run_on_cuda_without_host_reads_or_copies(variant, name):
    make, options, _ = VARIANTS[variant]
    transfers = Transfers()
    sampler = Sampler(make(lambda f: counting(f, transfers)), name, sigmas_for(name), **options)
    call = {"seed": 0}
    if isinstance(sampler.adapter.guidance, float):
        # conditioning tensors on the device, made before the run, as a caller would
        with fake_cuda():
            cond = {"cond": torch.zeros(SHAPE[0], device=DEVICE),
                    "uncond": torch.ones(SHAPE[0], device=DEVICE)}
        call.update(cond)
    out, again = run_twice(sampler, transfers, **call)
    check(sampler, transfers, again, out)


@pytest.mark.parametrize("stride", [1, 2])
def test_seeds_on_the_device_any_strides(stride):
    """Caller's seeds on the device, also as a strided view: the kernels read them densely, so
    the Sampler makes them contiguous (the registered op's fake checks it)."""
    transfers = Transfers()
    sampler = Sampler(counting(gaussian, transfers), "euler_ancestral", sigmas_for("ddpm"))
    with fake_cuda():
        seeds = torch.arange(2 * stride * SHAPE[0], device=DEVICE)[::2 * stride][:SHAPE[0]]
    out, again = run_twice(sampler, transfers, seeds=seeds)
    check(sampler, transfers, again, out)


def test_the_launch_contract_is_checked_on_fake_tensors():
    """The guard has teeth: launch_unchecked on fake tensors refuses what a kernel would
    misread (strided seeds, seeds or tables on another device)."""
    from fastdiff.ops.lincomb import launch_unchecked

    with fake_cuda():
        x = torch.empty(SHAPE, device=DEVICE)
        coef = torch.ones(1, 1, 2, device=DEVICE)
        out = torch.empty_like(x)
        good = torch.zeros(SHAPE[0], dtype=torch.int64, device=DEVICE)
        launch_unchecked([x], coef, 0, [out], "cuda", good, [0])
        bad = {"seeds are strided": (coef, torch.zeros(2 * SHAPE[0], dtype=torch.int64,
                                                       device=DEVICE)[::2]),
               "seeds are on the host": (coef, torch.zeros(SHAPE[0], dtype=torch.int64)),
               "coef is on the host": (torch.ones(1, 1, 2), good)}
        for what, (c, seeds) in bad.items():
            with pytest.raises(RuntimeError, match="seeds must be|one device"):
                launch_unchecked([x], c, 0, [out], "cuda", seeds, [0])
                pytest.fail(what)


@pytest.fixture(scope="module")
def digits_model():
    from fastdiff.models.digits import load_digits_model

    return load_digits_model()


def test_sample_digits_end_to_end_on_cuda(digits_model):
    """`fastdiff sample` / `make demo` on a GPU: the embedded model moved to the device with
    .to(), sample_digits with the fused engine (a deterministic and a stochastic solver, with
    guidance). Its host work (noise levels, plan) is made by a first call on the host; the
    device call then reads nothing back and copies only its inputs before the first model
    call."""
    from fastdiff.models.digits import sample_digits

    model = copy.deepcopy(digits_model)  # its parameters become fakes below
    labels, solvers = [0, 3, 7, 9], ("dpmpp_2m", "euler_ancestral")
    for solver in solvers:  # host work, once per setting
        sample_digits(model, labels, steps=3, solver=solver, backend="auto")
    with fake_cuda():
        model.to(DEVICE)
    for solver in solvers:
        transfers = Transfers()
        hook = model.network.register_forward_pre_hook(transfers.tick)
        with fake_cuda(transfers):
            out = sample_digits(model, labels, steps=3, solver=solver, backend="auto")
        hook.remove()
        assert out.device == DEVICE and tuple(out.shape) == (4, 1, 8, 8)
        assert transfers.step > 0 and transfers.after(1) == [], solver
        assert "group_norm.default" in transfers.ops and "lincomb_out.default" in transfers.ops


def test_a_denoiser_moves_like_any_module(digits_model):
    """Denoiser.to() / .double() used to raise TypeError: its `_apply` shadowed nn.Module's."""
    from fastdiff.models.digits import sample_digits

    model = copy.deepcopy(digits_model).double()
    assert next(model.parameters()).dtype == torch.float64
    out = sample_digits(model, [1, 2], steps=3)
    assert out.dtype == torch.float64 and bool(torch.isfinite(out).all())


def test_the_exact_mixture_follows_x_to_the_device():
    """GaussianMixture (the ground-truth model of the test suite, on a GPU run too) kept its
    parameters on the host: any CUDA x raised a device mismatch. It copies them once per
    device, and fills Python-number noise levels in on the device."""
    from fastdiff.models.gmm import GaussianMixture

    transfers = Transfers()
    gmm = GaussianMixture.default(d=6)
    sampler = Sampler(counting(gmm, transfers), "dpmpp_2m", sigmas_for("dpmpp_2m"))
    with fake_cuda(transfers):
        x = torch.randn(5, 2, 3, device=DEVICE, dtype=torch.float64)
        out = sampler(x)
        vp = gmm.vp_denoiser(x, 2.0)  # a Python-number level
    assert out.device == vp.device == DEVICE
    assert transfers.after(1) == []  # the parameters' copies happen in the first call


def test_the_host_work_kept_with_a_model_is_never_saved_or_copied(digits_model):
    """sample_digits keeps its engines with the model (so a device run finds its plan ready);
    a copy or a saved model must not carry them (device tables, CUDA graphs)."""
    import io

    from fastdiff.models.digits import sample_digits

    model = copy.deepcopy(digits_model)
    first = sample_digits(model, [4, 2], steps=2, backend="auto")
    assert model.HOST_CACHE in model.__dict__
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (loaded, copy.deepcopy(model)):
        assert model.HOST_CACHE not in other.__dict__
        assert torch.equal(sample_digits(other, [4, 2], steps=2, backend="auto"), first)


class _Loop(torch.nn.Module):
    def __init__(self, sampler):
        super().__init__()
        self.sampler = sampler

    def forward(self, x):
        return self.sampler.run(x, seed=1)


@pytest.mark.parametrize("name", ["dpmpp_2m", "euler_ancestral"])
def test_the_loop_is_traceable_by_torch_compile_and_export(name):
    """The same registrations make the whole loop one graph: torch.compile(fullgraph=True) and
    torch.export trace it (each stage one fastdiff op) and give the eager result bitwise."""
    model = ThresholdedDenoiser(Denoiser(eps_network), dynamic_ratio=0.9, max_value=3.0)
    sampler = Sampler(model, name, sigmas_for(name, steps=4), backend="cpu")
    x = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0)) * 14.6
    want = sampler(x, seed=1)
    torch._dynamo.reset()
    compiled = torch.compile(_Loop(sampler), backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), want)
    exported = torch.export.export(_Loop(sampler), (x,))
    ops = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert sum(op.startswith("fastdiff.lincomb") for op in ops) == len(sampler.launches)
    assert torch.equal(exported.module()(x), want)
