"""GPU stress: captured sampling loops replayed 1,000 times from two streams while a third
stream keeps the GPU busy, over several shapes and dtypes, and the fused ops hammered from two
streams at once. Every checked result equals its eager counterpart bitwise, nothing errors, and
allocated memory does not grow. (scripts/sanitize.sh runs the kernels under compute-sanitizer.)
"""

from __future__ import annotations

import pytest
import torch

from fastdiff.sampler import Sampler
from fastdiff.spacings import get_sigmas_karras

pytestmark = pytest.mark.gpu

REPLAYS = 1000
# (solver, shape, dtype): deterministic and stochastic (Philox) solvers, odd sizes
CASES = [
    ("dpmpp_2m", (2, 4, 32, 32), torch.float16),
    ("euler_ancestral", (3, 4, 16, 24), torch.float32),
    ("dpmpp_2m_sde", (1, 4, 8, 8), torch.bfloat16),
    ("unipc_bh2_3", (5, 3, 7, 13), torch.float16),
]


def conv_model(dtype):
    """A small convolutional denoiser (cuDNN kernels inside the graph)."""
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    conv = conv.cuda().to(dtype)

    def model(x, sigma, **cond):
        c = x.shape[1]
        y = x if c == 4 else torch.nn.functional.pad(x, (0, 0, 0, 0, 0, 4 - c))
        return (x / (1 + sigma.view(-1, 1, 1, 1) ** 2) + 0.1 * conv(y)[:, :c]).to(x.dtype)

    return model


def _load(stop: torch.cuda.Event, a: torch.Tensor, stream: torch.cuda.Stream, n: int) -> None:
    """Queue n large matmuls on `stream` (they run concurrently with the replays)."""
    with torch.cuda.stream(stream):
        for _ in range(n):
            a = (a @ a).clamp_(-1, 1)
        stop.record(stream)


def test_graph_replays_on_two_streams_under_load():
    sigmas = get_sigmas_karras(8, 0.03, 14.6)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    load_stream = torch.cuda.Stream()
    setups = []
    for i, (solver, shape, dtype) in enumerate(CASES):
        model = conv_model(dtype)
        g = torch.Generator().manual_seed(i)
        noise = (torch.randn(shape, generator=g) * 14.6).cuda().to(dtype)
        eager = Sampler(model, solver, sigmas)
        want = {s: eager(noise, seed=s) for s in range(4)}
        # one graphed sampler per stream: a captured graph's static buffers serve one stream
        graphed = [Sampler(model, solver, sigmas, graph=True) for _ in streams]
        setups.append((noise, want, graphed))
    for stream in streams:  # the inputs were made on the default stream
        stream.wait_stream(torch.cuda.current_stream())
    for noise, want, graphed in setups:  # capture (and warm up) every signature
        for k, stream in enumerate(streams):
            with torch.cuda.stream(stream):
                assert torch.equal(graphed[k](noise, seed=0), want[0])
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()

    a = torch.randn(2048, 2048, device="cuda") / 45
    stop = torch.cuda.Event()
    _load(stop, a, load_stream, 200)
    mismatches = []
    outs = []
    for i in range(REPLAYS):
        noise, want, graphed = setups[i % len(setups)]
        k = (i // len(setups)) % 2
        seed = i % 4
        with torch.cuda.stream(streams[k]):
            out = graphed[k](noise, seed=seed)
            if i % 25 == 0 or i >= REPLAYS - 8:  # check a sample of them (and the last ones)
                outs.append((i, out, want[seed]))
        for stream in streams:  # outputs are consumed on the default stream
            torch.cuda.current_stream().wait_stream(stream)
    stop.synchronize()
    torch.cuda.synchronize()
    for i, out, expected in outs:
        if not torch.equal(out, expected):
            mismatches.append(i)
    assert not mismatches, f"replays differing from eager: {mismatches[:10]}"
    del outs, out, a
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fused_ops_from_two_streams(dtype):
    from fastdiff.ops import group_norm, lincomb

    g = torch.Generator().manual_seed(0)
    shapes = [(2, 32, 16, 16), (3, 64, 5, 7), (1, 8, 1, 1)]
    xs = [torch.randn(s, generator=g).cuda().to(dtype) for s in shapes]
    acc = torch.float32
    coef = torch.randn(4, 2, 3, generator=g).cuda().to(acc)
    seeds = [torch.arange(s[0], dtype=torch.int64, device="cuda") for s in shapes]
    want_gn = [group_norm(x, 8, silu=True) for x in xs]
    want_lc = [lincomb([x], coef, 1, noise=(sd, [3, 4])) for x, sd in zip(xs, seeds)]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    bad = []
    for i in range(REPLAYS):
        j = i % len(shapes)
        stream = streams[i % 2]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            gn = group_norm(xs[j], 8, silu=True)
            lc = lincomb([xs[j]], coef, 1, noise=(seeds[j], [3, 4]))
        torch.cuda.current_stream().wait_stream(stream)
        if i % 50 == 0:
            if not torch.equal(gn, want_gn[j]) or not all(
                    torch.equal(a, b) for a, b in zip(lc, want_lc[j])):
                bad.append(i)
    torch.cuda.synchronize()
    assert not bad, f"results differing from the first run: {bad}"
    del gn, lc
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before
