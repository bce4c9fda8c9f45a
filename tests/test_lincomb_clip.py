"""The fused linear combination's x0 clipping (the clip= argument): every backend against the
reference, NaN propagation, layouts, in-place use, errors and torch.library registration."""

from __future__ import annotations

import pytest
import torch
from _lincomb_cases import (
    ALL_BACKENDS,
    DEVICE,
    KERNEL_BACKENDS,
    make_coef,
    make_inputs,
    skip_unsupported,
)

from fastdiff.ops import lincomb
from fastdiff.reference.lincomb import lincomb as reference


def make_clip(batch, dtype, seed=2):
    """Per-sample (bound, divisor), different for every sample."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    bound = 0.5 + 2 * torch.rand(batch, generator=g, dtype=torch.float64)
    divisor = 0.5 + torch.rand(batch, generator=g, dtype=torch.float64)
    return torch.stack([bound, divisor], 1).to(DEVICE, acc)


CLIP_SHAPES = [(1,), (3, 7), (2, 3, 17, 19), (3, 1, 5, 1), (4, 131)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", CLIP_SHAPES, ids=str)
def test_clip_matches_reference(backend, dtype, shape, tol):
    skip_unsupported(backend, dtype)
    clip = make_clip(shape[0], dtype)
    seeds = torch.arange(3, 3 + shape[0], device=DEVICE)
    for num_in, num_out, num_noise in [(1, 1, 0), (3, 1, 0), (2, 2, 1), (6, 2, 2), (3, 3, 0),
                                       (6, 3, 2)]:
        xs = [3 * x for x in make_inputs(shape, num_in, dtype)]  # |w| often above the bounds
        coef = make_coef(4, num_out + 1, num_in + num_noise + 1, dtype)
        noise = (seeds, list(range(5, 5 + num_noise))) if num_noise else None
        got = lincomb(xs, coef, 2, noise=noise, clip=clip, backend=backend)
        want = reference(xs, coef, 2, noise=noise, clip=clip)
        assert len(got) == num_out
        for g, w in zip(got, want):
            assert g.dtype == dtype and g.shape == w.shape
            torch.testing.assert_close(g, w, **tol(dtype))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_clip_sample_equals_the_formula(backend, tol):
    """Static clip_sample (clip = (r, 1)), against the formula written out in float64:
    out = 0.5 x + 2 e - 1.5 clamp(0.8 x - 0.6 e, -r, r), r differing per sample."""
    x, e = make_inputs((3, 4, 9), 2, torch.float64)
    x, e = 2 * x, 2 * e
    r = torch.tensor([0.5, 1.0, 2.5], dtype=torch.float64)
    coef = torch.tensor([[[0.5, 2.0, -1.5], [0.8, -0.6, 0.0]]], dtype=torch.float64)
    clip = torch.stack([r, torch.ones(3, dtype=torch.float64)], 1)
    got = lincomb([x, e], coef.to(DEVICE), clip=clip.to(DEVICE), backend=backend)[0]
    rr = r.reshape(3, 1, 1)
    w = 0.8 * x.cpu() - 0.6 * e.cpu()
    assert bool((w.abs() > rr).any() & (w.abs() < rr).any())  # both sides of the bound occur
    want = 0.5 * x.cpu() + 2 * e.cpu() - 1.5 * torch.minimum(torch.maximum(w, -rr), rr)
    torch.testing.assert_close(got.cpu(), want, **tol(torch.float64))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the Triton interpreter
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_propagates_nan(backend, dtype):
    """w = x0 - x1 is NaN where x0 = x1 = inf, while the plain sum x0 + x1 is inf: the output
    must be NaN there (a clamp returning the bound would give inf). A NaN bound makes its whole
    sample NaN, as torch.clamp does."""
    x0, x1 = make_inputs((3, 5), 2, dtype)
    x0[0, 1] = x1[0, 1] = float("inf")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    coef = torch.tensor([[[1.0, 1.0, 1.0], [1.0, -1.0, 0.0]]], dtype=acc, device=DEVICE)
    clip = torch.tensor([[1.0, 1.0], [float("nan"), 1.0], [2.0, 2.0]], dtype=acc, device=DEVICE)
    out = lincomb([x0, x1], coef, clip=clip, backend=backend)[0]
    assert out[0, 1].isnan()
    assert bool(out[1].isnan().all())
    finite = torch.ones_like(out, dtype=torch.bool)
    finite[0, 1] = False
    finite[1] = False
    assert bool(out[finite].isfinite().all())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("num_out", [2, 3])
def test_clip_row_tensor_equals_int_row_and_bad_device_row_gives_nan(backend, num_out):
    xs = make_inputs((4, 9), 3, torch.float32)
    coef = make_coef(4, num_out + 1, 4, torch.float32)  # the clip row last
    clip = make_clip(4, torch.float32)
    for r in range(4):
        by_tensor = lincomb(xs, coef, torch.tensor(r, device=DEVICE), clip=clip, backend=backend)
        by_int = lincomb(xs, coef, r, clip=clip, backend=backend)
        for a, b in zip(by_tensor, by_int):
            assert torch.equal(a, b)
    outs = lincomb(xs, coef, torch.tensor(4, device=DEVICE), clip=clip, backend=backend)
    assert len(outs) == num_out and all(bool(o.isnan().all()) for o in outs)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced", "mixed"])
def test_clip_layouts(backend, layout, tol):
    """The clip bound follows dim 0 whatever the memory order (transposed: dim 0 innermost)."""
    xs = [3 * x for x in make_inputs((4, 3, 5, 7), 3, torch.float32, layout)]
    clip = make_clip(xs[0].shape[0], torch.float32)
    coef = make_coef(2, 3, 4, torch.float32)
    got = lincomb(xs, coef, 1, clip=clip, backend=backend)
    want = reference([x.contiguous() for x in xs], coef, 1, clip=clip)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol(torch.float32))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_clip_in_place_and_clip_converted(backend, tol):
    xs = make_inputs((2, 4, 6, 6), 2, torch.float32)
    originals = [x.clone() for x in xs]
    coef = make_coef(1, 2, 3, torch.float32)
    clip = make_clip(2, torch.float32)
    want = reference(xs, coef, 0, clip=clip)
    by_double = lincomb(xs, coef, clip=clip.double(), backend=backend)  # converted to fp32
    torch.testing.assert_close(by_double[0], want[0], **tol(torch.float32))
    assert all(torch.equal(x, o) for x, o in zip(xs, originals))
    lincomb(xs, coef, out=[xs[0]], clip=clip, backend=backend)
    torch.testing.assert_close(xs[0], want[0], **tol(torch.float32))
    # Three outputs + the clip row (4 rows), two of them in place: the clipped x0 is formed
    # from the inputs before any output overwrites them.
    xs = [3 * x for x in originals]
    coef = make_coef(1, 4, 3, torch.float32)
    want = reference(xs, coef, 0, clip=clip)
    res = lincomb(xs, coef, out=[xs[1], torch.empty_like(xs[0]), xs[0]], clip=clip,
                  backend=backend)
    for g, w in zip(res, want):
        torch.testing.assert_close(g, w, **tol(torch.float32))


def _bad_clip_calls():
    x = torch.zeros(4, 5, device=DEVICE)
    c = torch.zeros(2, 2, 3, device=DEVICE)  # 1 output + the pre-clip row; 2 inputs + 1
    clip = torch.ones(4, 2, device=DEVICE)
    base = dict(inputs=[x, x], coef=c, clip=clip)
    yield "clip must be a torch.Tensor", TypeError, dict(base, clip=[[1.0, 1.0]] * 4)
    yield "clip must have shape", ValueError, dict(base, clip=clip[:3])
    yield "clip must have shape", ValueError, dict(base, clip=clip[:, :1])
    yield "clip must be a floating", TypeError, dict(base, clip=clip.int())
    yield "clip is on", ValueError, dict(base, clip=torch.ones(4, 2, device="meta"))
    yield "clip needs inputs with a batch dim", ValueError, dict(
        base, inputs=[x[0, 0]] * 2)
    yield "coef.shape[2]", ValueError, dict(base, coef=torch.zeros(2, 2, 2, device=DEVICE))
    yield "coef.shape[1]", ValueError, dict(base, coef=torch.zeros(2, 1, 3, device=DEVICE))
    yield "coef.shape[1]", ValueError, dict(base, coef=torch.zeros(2, 5, 3, device=DEVICE))


@pytest.mark.parametrize("needle,exc,kwargs", list(_bad_clip_calls()), ids=lambda v: str(v)[:30])
def test_bad_clip_is_a_clear_error(needle, exc, kwargs):
    with pytest.raises(exc, match=needle.replace("[", r"\[").replace("]", r"\]")):
        lincomb(**kwargs)


@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b != "triton"])
def test_opcheck_with_clip(backend):
    xs = make_inputs((2, 3, 4), 2, torch.float32)
    coef = make_coef(3, 3, 4, torch.float32)
    clip = make_clip(2, torch.float32)
    seeds = torch.tensor([5, 6], device=DEVICE)
    torch.library.opcheck(torch.ops.fastdiff.lincomb.default,
                          (xs, coef, None, 1, backend, seeds, [9], clip))
    outs = [torch.empty_like(xs[0]) for _ in range(2)]
    torch.library.opcheck(torch.ops.fastdiff.lincomb_out.default,
                          (xs, coef, None, 1, backend, outs, seeds, [9], clip))
    three = make_coef(3, 4, 4, torch.float32)  # 3 outputs + the pre-clip row
    torch.library.opcheck(torch.ops.fastdiff.lincomb.default,
                          (xs, three, None, 1, backend, seeds, [9], clip))


def test_torch_compile_traces_the_op_with_clip():
    xs = make_inputs((2, 3, 4), 2, torch.float32)
    coef = make_coef(2, 2, 3, torch.float32)
    clip = make_clip(2, torch.float32)

    def step(a, b, c, k):
        return lincomb([a * 2, b], c, 1, clip=k)[0] + 1

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*xs, coef, clip), step(*xs, coef, clip))
