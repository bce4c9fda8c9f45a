"""The non-finite guard (issue 13, section 3): the fused step lowers a device flag to the first
stage whose output held an inf or NaN; the Sampler reads it once after an eager run and raises
naming that stage and its sigma. Nothing is read inside the loop (tests/test_fake_cuda.py runs
the guarded loop on "cuda" fake tensors, where any host read raises)."""

from __future__ import annotations

import pytest
import torch
from _lincomb_cases import ALL_BACKENDS, DEVICE, HAS_CUDA

from fastdiff.ops import lincomb
from fastdiff.ops.lincomb import NO_NONFINITE, nonfinite_flag
from fastdiff.sampler import NonFiniteError, Sampler
from fastdiff.spacings import get_sigmas_karras

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in Triton's interpreter


def _flag() -> torch.Tensor:
    return nonfinite_flag(DEVICE)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_the_op_lowers_the_flag_to_the_first_bad_stage(backend, dtype):
    x = torch.randn(2, 3, 67, dtype=torch.float64).to(DEVICE, dtype)
    coef = torch.tensor([[[0.5, 0.25]], [[2.0, 1.0]]],
                        dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    coef = coef.to(DEVICE)
    flag = _flag()
    lincomb([x, x], coef, 0, flag=flag, stage=4, backend=backend)
    assert int(flag.item()) == NO_NONFINITE  # finite outputs leave it alone
    bad = x.clone()
    bad[1, 2, 66] = float("nan")  # the last element: the kernels' tails
    lincomb([bad, x], coef, 0, flag=flag, stage=7, backend=backend)
    assert int(flag.item()) == 7
    lincomb([bad, x], coef, 0, flag=flag, stage=9, backend=backend)  # a later stage: min stays
    assert int(flag.item()) == 7
    inf = x.clone()
    inf[0, 0, 0] = float("inf")
    lincomb([inf, x], coef, 1, flag=flag, stage=3, backend=backend)
    assert int(flag.item()) == 3


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_an_fp16_overflow_counts(backend):
    """Finite inputs whose result overflows fp16 on the store: the flag looks at what is stored."""
    x = torch.full((4, 33), 40000.0, device=DEVICE, dtype=torch.float16)
    coef = torch.tensor([[[1.0, 1.0]]], device=DEVICE)
    flag = _flag()
    out = lincomb([x, x], coef, 0, flag=flag, stage=2, backend=backend)[0]
    assert bool(torch.isinf(out).all()) and int(flag.item()) == 2


def test_bad_flag_arguments_are_named():
    x = torch.zeros(2, 3, device=DEVICE)
    coef = torch.ones(1, 1, 1, device=DEVICE)
    with pytest.raises(TypeError, match="flag must be a one-element int32"):
        lincomb([x], coef, flag=torch.zeros(1, device=DEVICE))
    with pytest.raises(ValueError, match="stage must be an int"):
        lincomb([x], coef, flag=_flag(), stage=-1)


class _NanAt:
    """A k-diffusion denoiser of unit Gaussian data that answers NaN in one element from its
    `bad`-th call on."""

    def __init__(self, bad: int):
        self.bad, self.calls = bad, 0

    def __call__(self, x, sigma, **cond):
        out = x / (1 + sigma.view(-1, *[1] * (x.dim() - 1)) ** 2)
        if self.calls >= self.bad:
            out = out.clone()
            out.view(-1)[5] = float("nan")
        self.calls += 1
        return out


SOLVERS = ["euler", "heun", "dpmpp_2m", "euler_ancestral", "unipc_bh2_3"]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("solver", SOLVERS)
def test_a_nan_at_stage_k_is_reported_as_stage_k(backend, solver):
    sigmas = get_sigmas_karras(6, 0.03, 14.6)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE) * 14.6
    nfe = Sampler(_NanAt(10**9), solver, sigmas, backend=backend).plan.nfe
    for k in sorted({0, 2, nfe - 1}):
        sampler = Sampler(_NanAt(k), solver, sigmas, backend=backend)
        with pytest.raises(NonFiniteError, match=f"at stage {k} ") as info:
            sampler(x, seed=0)
        assert info.value.stage == k
        assert info.value.sigma == pytest.approx(sampler.plan.stages[k].sigma)
    # the switch: no flag, no read, the NaN comes back
    out = Sampler(_NanAt(2), solver, sigmas, backend=backend, check_finite=False)(x, seed=0)
    assert bool(torch.isnan(out).any())
    # and a finite run raises nothing
    assert bool(torch.isfinite(Sampler(_NanAt(10**9), solver, sigmas, backend=backend)(x)).all())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_finite_initial_noise_is_named(backend):
    sigmas = get_sigmas_karras(4, 0.03, 14.6)
    x = torch.randn(2, 4, 4, device=DEVICE)
    x[1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="noise holds inf or NaN"):
        Sampler(_NanAt(10**9), "dpmpp_2m", sigmas, backend=backend)(x)


def test_check_finite_must_be_a_bool():
    with pytest.raises(TypeError, match="check_finite must be a bool"):
        Sampler(_NanAt(0), "euler", get_sigmas_karras(4, 0.03, 14.6), check_finite="yes")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_graph_replay_reports_through_check_finite():
    """graph=True: the replay does not read the flag; check_finite() after the caller's sync
    does, per replay (the captured fill resets it)."""
    sigmas = get_sigmas_karras(6, 0.03, 14.6)
    x = torch.randn(2, 4, 8, 8, device="cuda") * 14.6

    mask = torch.zeros(2, 4, 8, 8, device="cuda")  # read by the captured model at replay

    def model(x, sigma, **cond):
        return x / (1 + sigma.view(-1, 1, 1, 1) ** 2) + mask

    sampler = Sampler(model, "dpmpp_2m", sigmas, graph=True)
    sampler(x)
    torch.cuda.synchronize()
    sampler.check_finite()  # finite: nothing raised
    mask.view(-1)[3] = float("nan")  # every stage's model output goes NaN now
    out = sampler(x)
    torch.cuda.synchronize()
    assert bool(torch.isnan(out).any())
    with pytest.raises(NonFiniteError, match="at stage 0 "):
        sampler.check_finite()
    mask.zero_()
    sampler(x)
    torch.cuda.synchronize()
    sampler.check_finite()  # the replay's own fill reset the flag
