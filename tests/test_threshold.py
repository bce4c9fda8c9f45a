"""Dynamic thresholding's per-sample quantile: every available backend against torch.quantile
(the reference), and lincomb(clip=dynamic_threshold(...)) against diffusers' formula."""

from __future__ import annotations

import pytest
import torch

from fastdiff.ops import dynamic_threshold, lincomb, unavailable_reason
from fastdiff.reference.lincomb import lincomb as lincomb_reference
from fastdiff.reference.threshold import dynamic_threshold as reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
KERNEL_BACKENDS = [b for b in ("cpu", "cuda", "triton") if not unavailable_reason(b, DEVICE)]
ALL_BACKENDS = ["reference", *KERNEL_BACKENDS]
INTERPRETED = DEVICE.type == "cpu"
INF = float("inf")


def skip_unsupported(backend: str, dtype: torch.dtype) -> None:
    if backend == "triton" and INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter cannot do bf16 arithmetic")


def acc_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_inputs(shape, n, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(DEVICE, dtype)
            for _ in range(n)]


def make_coef(rows, out_rows, width, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, out_rows, width, generator=g, dtype=torch.float64).to(
        DEVICE, acc_of(dtype))


# (batch, ...) with odd sample sizes: 1 element, primes, more than one Triton block (1024)
SHAPES = [(1, 1), (3, 1), (2, 7), (3, 5, 7), (2, 3, 17, 19), (2, 4099)]
RATIOS = [0.0, 0.25, 0.5, 0.77, 0.995, 1.0]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_torch_quantile(backend, dtype, shape, tol):
    """max_value = inf exposes the raw quantile (above 1 with these scales); 2.0 clamps."""
    skip_unsupported(backend, dtype)
    xs = make_inputs(shape, 2, dtype)
    coef = make_coef(3, 2, 4, dtype)  # a clip table: the pre-clip row is coef[row, -1, :2]
    for ratio in RATIOS:
        for max_value in (INF, 2.0):
            got = dynamic_threshold(xs, coef, 1, ratio, max_value, backend=backend)
            want = reference(xs, coef, 1, ratio, max_value)
            assert got.shape == (shape[0], 2) and got.dtype == acc_of(dtype)
            where = f"ratio {ratio}, max {max_value}"
            torch.testing.assert_close(got, want, **tol(acc_of(dtype)),
                                       msg=lambda m, where=where: f"{where}: {m}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_all_equal_and_signed_zeros(backend, dtype):
    """Small integers (many ties, +-0), a constant sample, and a sample of one value repeated
    but its sign: the order statistics are exact, so the results are equal bit for bit."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-4, 5, (4, 3, 11), generator=g).to(DEVICE, dtype) * 1.5
    x[1] = 2.75
    x[2] = -0.0
    x[3, :, ::2] = -3.25
    x[3, :, 1::2] = 3.25
    coef = torch.ones(1, 1, 1, dtype=acc_of(dtype), device=DEVICE)
    for ratio in RATIOS + [0.1, 0.9]:
        got = dynamic_threshold([x], coef, 0, ratio, INF, backend=backend)
        want = reference([x], coef, 0, ratio, INF)
        assert torch.equal(got, want), f"ratio {ratio}: {got[:, 0]} != {want[:, 0]}"
    assert float(got[2, 0]) == 1.0  # all zeros: the quantile 0 is raised to 1


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_ratio_0_and_1_are_min_and_max_and_s_is_clamped(backend):
    """Independent of torch.quantile: ratio 0 is min |w|, ratio 1 is max |w|; s is clamped to
    [1, max_value] (max_value below 1 wins, as torch.clamp's max does)."""
    g = torch.Generator().manual_seed(4)
    scales = torch.tensor([0.1, 2.0, 50.0], dtype=torch.float64).reshape(3, 1, 1)
    x = (scales * (0.5 + torch.rand(3, 4, 5, generator=g, dtype=torch.float64))).to(DEVICE)
    coef = torch.tensor([[[-1.0]]], dtype=torch.float64, device=DEVICE)
    flat = x.reshape(3, -1).abs()
    for ratio, stat in ((0.0, flat.amin(1)), (1.0, flat.amax(1))):
        got = dynamic_threshold([x], coef, 0, ratio, INF, backend=backend)
        assert torch.equal(got[:, 0], stat.clamp(min=1)) and torch.equal(got[:, 0], got[:, 1])
        got = dynamic_threshold([x], coef, 0, ratio, 10.0, backend=backend)
        assert torch.equal(got[:, 0], stat.clamp(1, 10))
    assert float(got[0, 0]) == 1.0 and float(got[2, 0]) == 10.0  # both bounds were hit
    got = dynamic_threshold([x], coef, 0, 0.5, 0.25, backend=backend)
    assert bool((got == 0.25).all())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the Triton interpreter
def test_nan_in_a_sample_gives_nan_for_that_sample(backend):
    xs = make_inputs((3, 2, 9), 2, torch.float32)
    xs[1][1, 1, 4] = float("nan")
    coef = make_coef(1, 1, 2, torch.float32)
    got = dynamic_threshold(xs, coef, 0, 0.9, INF, backend=backend)
    assert bool(got[1].isnan().all())
    assert bool(got[[0, 2]].isfinite().all())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_row_tensor_equals_int_row_and_bad_device_row_gives_nan(backend):
    xs = make_inputs((2, 3, 5), 3, torch.float32)
    coef = make_coef(4, 2, 4, torch.float32)
    for r in range(4):
        by_tensor = dynamic_threshold(xs, coef, torch.tensor(r, device=DEVICE), 0.8, INF,
                                      backend=backend)
        assert torch.equal(by_tensor, dynamic_threshold(xs, coef, r, 0.8, INF, backend=backend))
    bad = dynamic_threshold(xs, coef, torch.tensor(-1, device=DEVICE), 0.8, INF, backend=backend)
    assert bool(bad.isnan().all())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_layouts(backend, layout, tol):
    """Samples are dim 0 whatever the memory order (transposed: dim 0 is innermost)."""
    base = make_inputs((3, 4, 5, 6), 2, torch.float32)
    if layout == "channels_last":
        xs = [x.contiguous(memory_format=torch.channels_last) for x in base]
    elif layout == "transposed":
        xs = [x.transpose(0, -1).contiguous().transpose(0, -1) for x in base]
    else:
        xs = [torch.cat([x, x], dim=-1)[..., ::2] for x in base]
    coef = make_coef(1, 1, 2, torch.float32)
    got = dynamic_threshold(xs, coef, 0, 0.7, INF, backend=backend)
    want = reference([x.contiguous() for x in xs], coef, 0, 0.7, INF)
    torch.testing.assert_close(got, want, **tol(torch.float32))


def diffusers_threshold_sample(sample: torch.Tensor, ratio: float, max_value: float):
    """diffusers' `_threshold_sample` (DDPMScheduler and others), written out."""
    dtype, shape = sample.dtype, sample.shape
    if dtype not in (torch.float32, torch.float64):
        sample = sample.float()
    sample = sample.reshape(shape[0], -1)
    s = torch.quantile(sample.abs(), ratio, dim=1)
    s = torch.clamp(s, min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(sample, -s, s) / s).reshape(shape).to(dtype)


def test_the_formula_is_diffusers():
    diffusers = pytest.importorskip("diffusers")
    x = 4 * torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(5))
    sched = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9,
                                    sample_max_value=3.0)
    want = sched._threshold_sample(x)
    assert torch.equal(diffusers_threshold_sample(x, 0.9, 3.0), want)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("ratio,max_value", [(0.995, 1.0), (0.9, 3.0), (0.6, 1e9)])
def test_fused_step_equals_diffusers_thresholding(backend, ratio, max_value, tol):
    """A DDPM step with thresholding (Ho et al. 2020, eq. 7): x0 = (x - sqrt(1 - abar) eps) /
    sqrt(abar), thresholded, then mean = c0 x0 + cx x; as two launches (quantile, then the
    step with the clipped x0 fused in) it must equal diffusers' thresholding of x0 in fp32."""
    abar, c0, cx = 0.3, 0.45, 0.8
    g = torch.Generator().manual_seed(6)
    # per-sample scales: s below 1, between 1 and max_value, and above it
    scale = torch.tensor([0.05, 1.0, 4.0]).reshape(3, 1, 1, 1)
    x = (scale * torch.randn(3, 4, 9, 7, generator=g)).to(DEVICE)
    eps = (scale * torch.randn(3, 4, 9, 7, generator=g)).to(DEVICE)
    pre = [1 / abar**0.5, -((1 - abar) / abar) ** 0.5]
    coef = torch.tensor([[[cx, 0.0, c0], [0.0, 0.0, 1.0], [*pre, 0.0]]], device=DEVICE)
    clip = dynamic_threshold([x, eps], coef, 0, ratio, max_value, backend=backend)
    mean, x0_clipped = lincomb([x, eps], coef, 0, clip=clip, backend=backend)

    x0 = (x - (1 - abar) ** 0.5 * eps) / abar**0.5
    want_x0 = diffusers_threshold_sample(x0, ratio, max_value)
    torch.testing.assert_close(x0_clipped, want_x0, **tol(torch.float32))
    torch.testing.assert_close(mean, c0 * want_x0 + cx * x, **tol(torch.float32))


def _bad_calls():
    x = torch.zeros(4, 5, device=DEVICE)
    c = torch.zeros(2, 1, 2, device=DEVICE)
    base = dict(inputs=[x, x], coef=c, row=0, ratio=0.9, max_value=2.0)
    yield "inputs must hold", ValueError, dict(base, inputs=[])
    yield "inputs[1] has shape", ValueError, dict(base, inputs=[x, x[:, :4]])
    yield "batch dim", ValueError, dict(base, inputs=[x[0, 0]] * 2)
    yield "at least one element per sample", ValueError, dict(base, inputs=[x[:, :0]] * 2)
    yield "coef must have shape", ValueError, dict(base, coef=c[0])
    yield "coef.shape[2] must be at least", ValueError, dict(base, coef=c[:, :, :1])
    yield "coef must be torch.float32", TypeError, dict(base, coef=c.double())
    yield "coef is on", ValueError, dict(base, coef=torch.zeros(2, 1, 2, device="meta"))
    yield "row must be in", ValueError, dict(base, row=2)
    yield "row as a tensor", TypeError, dict(base, row=torch.tensor(0, dtype=torch.int32))
    yield "ratio must be in", ValueError, dict(base, ratio=1.5)
    yield "ratio must be in", ValueError, dict(base, ratio=-0.1)
    yield "ratio must be in", ValueError, dict(base, ratio=float("nan"))
    yield "ratio must be a float", TypeError, dict(base, ratio="0.9")
    yield "max_value must be positive", ValueError, dict(base, max_value=0.0)
    yield "max_value must be positive", ValueError, dict(base, max_value=float("nan"))
    yield "out must be", ValueError, dict(base, out=torch.zeros(4, 3, device=DEVICE))
    yield "out must be", ValueError, dict(base, out=torch.zeros(4, 2, device=DEVICE).double())


@pytest.mark.parametrize("needle,exc,kwargs", list(_bad_calls()), ids=lambda v: str(v)[:30])
def test_bad_input_is_a_clear_error(needle, exc, kwargs):
    with pytest.raises(exc, match=needle.replace("[", r"\[").replace("]", r"\]")):
        dynamic_threshold(**kwargs)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_out_empty_batch_and_inputs_untouched(backend):
    xs = make_inputs((2, 3, 4), 2, torch.float32)
    keep = [x.clone() for x in xs]
    coef = make_coef(1, 1, 2, torch.float32)
    out = torch.full((2, 2), -1.0, device=DEVICE)
    res = dynamic_threshold(xs, coef, 0, 0.5, INF, out=out, backend=backend)
    assert res is out and torch.equal(out, reference(xs, coef, 0, 0.5, INF))
    assert all(torch.equal(x, k) for x, k in zip(xs, keep))
    empty = dynamic_threshold([xs[0][:0]], coef[:, :, :1], 0, 0.5, INF, backend=backend)
    assert empty.shape == (0, 2)


@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b != "triton"])
def test_opcheck(backend):
    xs = make_inputs((2, 3, 4), 2, torch.float32)
    coef = make_coef(3, 2, 3, torch.float32)
    torch.library.opcheck(torch.ops.fastdiff.dynamic_threshold.default,
                          (xs, coef, None, 1, 0.9, 2.0, backend))
    torch.library.opcheck(torch.ops.fastdiff.dynamic_threshold.default,
                          (xs, coef, torch.tensor(2, device=DEVICE), 0, 0.9, 2.0, backend))
    out = torch.empty(2, 2, device=DEVICE)
    torch.library.opcheck(torch.ops.fastdiff.dynamic_threshold_out.default,
                          (xs, coef, None, 1, 0.9, 2.0, backend, out))


def test_torch_compile_traces_threshold_then_step():
    xs = make_inputs((2, 3, 4), 2, torch.float32)
    coef = make_coef(2, 2, 3, torch.float32)

    def step(a, b, c):
        clip = dynamic_threshold([a, b], c, 1, 0.9, 2.0)
        return lincomb([a, b], c, 1, clip=clip)[0]

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*xs, coef), step(*xs, coef))


@pytest.mark.gpu
def test_cuda_graph_replay_of_threshold_and_step(tol):
    """Captured once, replayed for other rows: no host sync, no host-dependent sizes. Samples
    of 4x64x64 use the shared-memory key cache, 4x128x128 (fp32) recompute w each pass."""
    for shape in [(2, 4, 64, 64), (2, 4, 128, 128)]:
        xs = make_inputs(shape, 2, torch.float16)
        coef = make_coef(4, 2, 3, torch.float16)
        row = torch.tensor(0, device=DEVICE)
        clip = torch.empty(2, 2, device=DEVICE)
        out = [torch.empty_like(xs[0])]
        for backend in KERNEL_BACKENDS:
            dynamic_threshold(xs, coef, row, 0.995, 2.0, out=clip, backend=backend)  # warm-up
            lincomb(xs, coef, row, out=out, clip=clip, backend=backend)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                dynamic_threshold(xs, coef, row, 0.995, 2.0, out=clip, backend=backend)
                lincomb(xs, coef, row, out=out, clip=clip, backend=backend)
            for r in (1, 3):
                row.fill_(r)
                graph.replay()
                torch.cuda.synchronize()
                want_clip = reference(xs, coef, r, 0.995, 2.0)
                torch.testing.assert_close(clip, want_clip, **tol(torch.float32))
                want = lincomb_reference(xs, coef, r, clip=want_clip)[0]
                torch.testing.assert_close(out[0], want, **tol(torch.float16))
