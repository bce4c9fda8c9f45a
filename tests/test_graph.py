"""Whole-loop CUDA graphs and the engine's GPU promises: no host sync, <= 2 launches per step."""

from __future__ import annotations

import pytest
import torch

from fastdiff.sampler import Sampler
from fastdiff.spacings import get_sigmas_karras

pytestmark = pytest.mark.gpu
SOLVERS = ["dpmpp_2m", "euler_ancestral", "unipc_bh2_3", "heun", "dpmpp_sde"]
# A capture failure falls back to eager with a warning "fastdiff: ...": an error here.
NO_FALLBACK = pytest.mark.filterwarnings("error:fastdiff")


def conv_model():
    """A small convolutional denoiser (cuDNN kernels inside the graph)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.SiLU(),
                              torch.nn.Conv2d(32, 4, 3, padding=1)).cuda().half()

    def model(x, sigma, **cond):
        return x / (1 + sigma.view(-1, 1, 1, 1) ** 2) + 0.1 * net(x)

    return model


def assert_replayed(sampler):
    """The graph path really ran: every input signature was captured."""
    entries = sampler._graphs.entries if sampler._graphs else {}
    assert entries and all(e is not None for e in entries.values()), "ran eagerly"


@NO_FALLBACK
@pytest.mark.parametrize("name", SOLVERS)
def test_graph_replay_is_bitwise_equal_to_eager(name):
    model = conv_model()
    sigmas = get_sigmas_karras(20, 0.03, 14.6)
    noise = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16) * 14.6
    eager = Sampler(model, name, sigmas)(noise, seed=3)
    graphed = Sampler(model, name, sigmas, graph=True)
    first = graphed(noise, seed=3)
    assert_replayed(graphed)
    assert torch.equal(first, eager)
    other = torch.randn_like(noise) * 14.6
    assert torch.equal(graphed(other, seed=4), Sampler(model, name, sigmas)(other, seed=4))
    assert len(graphed._graphs.entries) == 1  # same signature: replayed, not captured again


@NO_FALLBACK
def test_the_first_graphed_call_runs_the_loop_once_eagerly_then_records_it():
    """Warm-up once on a side stream, record, replay (it used to run the loop 3 times)."""
    calls = []
    net = conv_model()

    def model(x, sigma, **cond):
        calls.append(1)
        return net(x, sigma)

    sampler = Sampler(model, "dpmpp_2m", get_sigmas_karras(10, 0.03, 14.6), graph=True)
    noise = torch.randn(2, 4, 32, 32, device="cuda", dtype=torch.float16)
    sampler(noise, seed=0)
    assert_replayed(sampler)
    assert len(calls) == 2 * sampler.plan.nfe  # the warm-up run and the recorded one
    sampler(noise, seed=1)
    assert len(calls) == 2 * sampler.plan.nfe  # a replay calls no Python


def test_philox_seeds_drawn_from_a_cuda_generator():
    """A CUDA torch.Generator (natural beside CUDA noise) draws the Philox seeds on its own
    device; the draw used to be made on the CPU with it, which raises."""
    model = conv_model()
    sampler = Sampler(model, "euler_ancestral", get_sigmas_karras(4, 0.03, 14.6))
    noise = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float16)
    a = sampler(noise, generator=torch.Generator("cuda").manual_seed(5))
    b = sampler(noise, generator=torch.Generator("cuda").manual_seed(5))
    assert torch.equal(a, b) and bool(torch.isfinite(a).all())


@NO_FALLBACK
def test_thousand_replays_do_not_grow_memory():
    model = conv_model()
    sampler = Sampler(model, "dpmpp_2m", get_sigmas_karras(10, 0.03, 14.6), graph=True)
    noise = torch.randn(2, 4, 32, 32, device="cuda", dtype=torch.float16)
    for _ in range(3):
        sampler(noise, seed=0)
    assert_replayed(sampler)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for i in range(1000):
        out = sampler(noise, seed=i)
    del out
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before


@pytest.mark.parametrize("name", SOLVERS)
def test_no_host_sync_over_a_whole_run(name):
    model = conv_model()
    sampler = Sampler(model, name, get_sigmas_karras(10, 0.03, 14.6))
    noise = torch.randn(2, 4, 32, 32, device="cuda", dtype=torch.float16)
    sampler(noise, seed=0)  # per-run constants are built (and copied to the GPU) once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampler(noise, seed=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", SOLVERS)
def test_at_most_two_kernel_launches_per_step_outside_the_model(name):
    from torch.profiler import ProfilerActivity, profile

    def model(x, sigma, **cond):  # exactly one kernel per call
        return x * 0.5

    sampler = Sampler(model, name, get_sigmas_karras(10, 0.03, 14.6))
    noise = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16)
    sampler(noise, seed=0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        sampler(noise, seed=1)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    outside = len(kernels) - sampler.plan.nfe  # the model's own kernels
    assert outside <= 2 * sampler.plan.nfe, [e.name for e in kernels]


@NO_FALLBACK
def test_sample_digits_and_fastdiff_sample_on_the_gpu(tmp_path):
    """`make demo` on a GPU (item 7: CPU noise times a CUDA sigma raised): the embedded model
    eager, graphed (the same samples, bitwise) and through the command line."""
    from fastdiff.cli import main
    from fastdiff.models.digits import load_digits_model, sample_digits

    model = load_digits_model().to("cuda")
    labels = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    eager = sample_digits(model, labels, steps=8, backend="auto")
    graphed = sample_digits(model, labels, steps=8, backend="auto", graph=True)
    assert eager.is_cuda and bool(torch.isfinite(eager).all())
    assert torch.equal(graphed, eager)
    assert main(["sample", "--device", "cuda", "--steps", "4", "--quiet", "--graph",
                 "--out", str(tmp_path / "digits.png")]) == 0
    assert (tmp_path / "digits.png").stat().st_size > 0
