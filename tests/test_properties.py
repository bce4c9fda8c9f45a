"""Property-based tests (hypothesis): the fused ops equal their references on random shapes
(sizes 1 and primes), strides (permutations, slices), dtypes, numbers of inputs and outputs,
coefficient magnitudes (1e-6 .. 1e4), noise terms and x0 clipping, and dynamic thresholding's
quantile equals torch.quantile (ties included), on every backend that runs on CPU here
(reference, native cpu, triton under the interpreter).

Tolerance: the table's (atol, rtol) per dtype, with rtol applied to the magnitude of the sum
S = sum_k |c_k| |x_k| rather than to |result|: the rounding error of a sum is bounded by
eps * S, and a result that cancels to ~0 keeps that absolute error (Higham 2002, Sec. 4.2).
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastdiff.ops import BACKENDS, dynamic_threshold, group_norm, lincomb, unavailable_reason
from fastdiff.ops.lincomb import MAX_OUTPUTS
from fastdiff.reference.group_norm import group_norm as group_norm_reference
from fastdiff.reference.lincomb import lincomb as lincomb_reference
from fastdiff.reference.threshold import dynamic_threshold as threshold_reference

CPU = torch.device("cpu")
AVAILABLE = [b for b in BACKENDS if not unavailable_reason(b, CPU)]
SIZES = st.sampled_from([1, 2, 3, 5, 7, 11, 13])
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
MAX_NUMEL = 1500  # the Triton interpreter runs Python per block


def usable(backend: str, dtype: torch.dtype) -> bool:
    # the Triton interpreter cannot do bf16 arithmetic (numpy has no bf16)
    return not (backend == "triton" and dtype == torch.bfloat16)


@st.composite
def layouts(draw, shape):
    """A tensor factory of `shape` with a drawn memory layout: contiguous, permuted, sliced
    (a stride-2 or offset view of a larger tensor), or both."""
    kind = draw(st.sampled_from(["contiguous", "permuted", "sliced", "permuted+sliced"]))
    perm = draw(st.permutations(range(len(shape)))) if "permuted" in kind else None
    dim = draw(st.integers(0, max(len(shape) - 1, 0))) if "sliced" in kind else None
    step = draw(st.sampled_from([2, 3]))

    def make(values: torch.Tensor) -> torch.Tensor:
        t = values
        if perm is not None:  # same values, memory order permuted
            t = t.permute(*perm).contiguous().permute(*[perm.index(i) for i in range(len(perm))])
        if dim is not None and len(shape) > 0:
            big_shape = list(t.shape)
            big_shape[dim] = t.shape[dim] * step + 1
            big = torch.full(big_shape, float("nan"), dtype=t.dtype)
            index = [slice(None)] * len(shape)
            index[dim] = slice(1, None, step)
            big[tuple(index)] = t
            t = big[tuple(index)]
        assert torch.equal(t, values) or t.dtype.is_floating_point
        return t

    return make


def close(got, want, dtype, magnitude, tol, what=""):
    """|got - want| <= atol + rtol * magnitude, elementwise; equal where want is not finite."""
    t = tol(dtype)
    got, want = got.double(), want.double()
    finite = torch.isfinite(want)
    assert torch.equal(got[~finite], want[~finite]), what
    err = (got - want).abs()[finite]
    bound = (t["atol"] + t["rtol"] * magnitude.double())[finite]
    worst = (err - bound).max().item() if err.numel() else -1.0
    assert worst <= 0, f"{what}: error exceeds the bound by {worst:.3g}"


@st.composite
def aliases(draw, num_in, num_out):
    """Per output, None (a fresh buffer) or the index of the input it overwrites in place;
    distinct inputs (an output may alias an input exactly, never two outputs one input)."""
    order = draw(st.permutations(range(num_in)))
    return [order[j] if j < num_in and draw(st.booleans()) else None for j in range(num_out)]


def outputs_for(xs, alias):
    """The `out` list of `aliases`: the aliased inputs themselves, else fresh buffers (None
    when no output is in place, to exercise the allocating path too)."""
    if all(a is None for a in alias):
        return None
    return [xs[a] if a is not None else torch.empty_like(xs[0]) for a in alias]


def check_outputs(got, out, xs, keep, alias):
    """`out` returned as given; inputs that no output overwrites are untouched."""
    if out is not None:
        assert all(g is o for g, o in zip(got, out))
    written = {a for a in alias if a is not None}
    assert all(torch.equal(x.nan_to_num(), k.nan_to_num())
               for i, (x, k) in enumerate(zip(xs, keep)) if i not in written)


def draw_case(draw):
    """A backend, a dtype it runs, and a shape of at most MAX_NUMEL elements."""
    backend = draw(st.sampled_from(AVAILABLE))
    dtype = draw(st.sampled_from([d for d in DTYPES if usable(backend, d)]))
    shape = tuple(draw(st.lists(SIZES, min_size=1, max_size=4)))
    while math.prod(shape) > MAX_NUMEL:
        shape = shape[1:]
    return backend, dtype, shape


@st.composite
def lincomb_problems(draw):
    backend, dtype, shape = draw_case(draw)
    num_in = draw(st.integers(1, 6))
    num_out = draw(st.integers(1, MAX_OUTPUTS))
    num_noise = draw(st.integers(0, 2))
    rows = draw(st.integers(1, 3))
    row = draw(st.integers(0, rows - 1))
    # fp16 overflows at 65504: keep sum |c| |x| below it there
    top = 3 if dtype == torch.float16 else 4
    exponent = draw(st.integers(-6, top))
    makers = [draw(layouts(shape)) for _ in range(num_in)]
    seed = draw(st.integers(0, 2**31 - 1))
    alias = draw(aliases(num_in, num_out))
    return backend, dtype, shape, num_in, num_out, num_noise, rows, row, exponent, makers, seed, \
        alias


@SETTINGS
@given(lincomb_problems())
def test_lincomb_equals_the_reference(tol, problem):
    (backend, dtype, shape, num_in, num_out, num_noise, rows, row, exponent, makers, seed,
     alias) = problem
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    values = [torch.randn(shape, generator=g, dtype=torch.float64).clamp(-4, 4).to(dtype)
              for _ in range(num_in)]
    xs = [make(v) for make, v in zip(makers, values)]
    keep = [x.clone() for x in xs]
    # coefficients of mixed signs, magnitudes within a decade of 10**exponent
    mag = 10.0 ** exponent * (1 + 9 * torch.rand(rows, num_out, num_in + num_noise, generator=g,
                                                 dtype=torch.float64))
    sign = torch.randint(0, 2, mag.shape, generator=g, dtype=torch.float64) * 2 - 1
    coef = (mag * sign).to(acc)
    noise = None
    if num_noise:
        seeds = torch.randint(-(2**63), 2**63 - 1, (shape[0],), generator=g, dtype=torch.int64)
        noise = (seeds, list(range(7, 7 + num_noise)))
    out = outputs_for(xs, alias)
    got = lincomb(xs, coef, row, out=out, noise=noise, backend=backend)

    # the specification: the reference in float64 on the same values; the noise follows the
    # kernels' layout (that of inputs[0] when dense, else empty_like's)
    x0 = keep[0] if _dense(keep[0]) else torch.empty_like(keep[0]).copy_(keep[0])
    ref_in = [x0.double(), *[k.double() for k in keep[1:]]]
    z = lincomb_reference([x0], torch.eye(1 + num_noise, dtype=acc)[None, 1:, :],
                          0, noise)[:num_noise] if num_noise else []
    want = lincomb_reference(ref_in, coef.double()[:, :, :num_in], row)
    c = coef.double()[row]
    for j in range(num_out):
        want[j] = want[j] + sum(c[j, num_in + m] * z[m].double() for m in range(num_noise))
        magnitude = sum(c[j, k].abs() * ref_in[k].abs() for k in range(num_in)) + sum(
            c[j, num_in + m].abs() * z[m].double().abs() for m in range(num_noise))
        assert got[j].dtype == dtype and got[j].shape == shape
        close(got[j], want[j].to(dtype) if dtype != torch.float64 else want[j], dtype,
              magnitude, tol, f"{backend} {dtype} {shape} out {j}")
    assert len(got) == num_out
    check_outputs(got, out, xs, keep, alias)


@st.composite
def clip_problems(draw):
    backend, dtype, shape = draw_case(draw)
    num_in = draw(st.integers(1, 4))
    num_out = draw(st.integers(1, MAX_OUTPUTS))
    num_noise = draw(st.integers(0, 2))
    makers = [draw(layouts(shape)) for _ in range(num_in)]
    # bounds from far inside to far outside the data's range; divisors as dynamic
    # thresholding's (s = b) or clip_sample's (1)
    log_bound = [draw(st.floats(-2, 1)) for _ in range(shape[0])]
    same_divisor = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    alias = draw(aliases(num_in, num_out))
    return backend, dtype, shape, num_in, num_out, num_noise, makers, log_bound, same_divisor, \
        seed, alias


@SETTINGS
@given(clip_problems())
def test_lincomb_with_clip_equals_the_reference(tol, problem):
    (backend, dtype, shape, num_in, num_out, num_noise, makers, log_bound, same_divisor,
     seed, alias) = problem
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    values = [(2 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
              for _ in range(num_in)]
    xs = [make(v) for make, v in zip(makers, values)]
    keep = [x.clone() for x in xs]
    coef = torch.randn(2, num_out + 1, num_in + num_noise + 1, generator=g,
                       dtype=torch.float64).to(acc)
    bound = 10.0 ** torch.tensor(log_bound, dtype=torch.float64)
    clip = torch.stack([bound, bound if same_divisor else torch.ones_like(bound)], 1).to(acc)
    noise = None
    if num_noise:
        seeds = torch.randint(-(2**63), 2**63 - 1, (shape[0],), generator=g, dtype=torch.int64)
        noise = (seeds, list(range(3, 3 + num_noise)))
    # the specification in float64 on the same values; the noise follows the kernels' layout:
    # inputs[0]'s when dense with the batch dim outermost, else contiguous or empty_like's
    x0 = xs[0]
    if not (_dense(x0) and (shape[0] == 1 or x0.stride(0) == x0.numel() // shape[0])):
        x0 = x0.contiguous() if _dense(x0) else torch.empty_like(x0).copy_(x0)
    x0 = x0.clone()  # same strides (dense); an output may overwrite inputs[0]
    ref_in = [x0.double(), *[k.double() for k in keep[1:]]]
    out = outputs_for(xs, alias)  # in place: w must be formed before any input is overwritten
    got = lincomb(xs, coef, 1, out=out, noise=noise, clip=clip, backend=backend)
    want = lincomb_reference(ref_in, coef.double(), 1, noise, clip.double())
    z = lincomb_reference([ref_in[0]], torch.eye(1 + num_noise, dtype=torch.float64)[None, 1:],
                          0, noise) if num_noise else []
    c = coef.double()[1]
    # |y| error <= |w| error / d: the clamp is 1-Lipschitz
    w_mag = sum(c[num_out, k].abs() * ref_in[k].abs() for k in range(num_in))
    d = clip.double()[:, 1].reshape((-1,) + (1,) * (len(shape) - 1))
    for j in range(num_out):
        magnitude = sum(c[j, k].abs() * ref_in[k].abs() for k in range(num_in)) + sum(
            c[j, num_in + m].abs() * z[m].abs() for m in range(num_noise)) + \
            c[j, -1].abs() * (w_mag + clip.double()[:, :1].reshape(d.shape)) / d
        assert got[j].dtype == dtype and got[j].shape == shape
        close(got[j], want[j].to(dtype) if dtype != torch.float64 else want[j], dtype,
              magnitude, tol, f"{backend} {dtype} {shape} out {j}")
    assert len(got) == num_out
    check_outputs(got, out, xs, keep, alias)


@st.composite
def threshold_problems(draw):
    backend = draw(st.sampled_from(AVAILABLE))
    dtype = draw(st.sampled_from([d for d in DTYPES if usable(backend, d)]))
    batch = draw(st.integers(1, 3))
    sample = tuple(draw(st.lists(SIZES, min_size=0, max_size=3)))
    while batch * math.prod(sample) > MAX_NUMEL:
        sample = sample[1:]
    num_in = draw(st.integers(1, 3))
    grid = draw(st.sampled_from([0.0, 0.5, 1.0]))  # round values to it: ties (0: none)
    ratio = draw(st.one_of(st.sampled_from([0.0, 0.5, 0.995, 1.0]), st.floats(0, 1)))
    max_value = draw(st.sampled_from([1.0, 2.5, float("inf")]))
    seed = draw(st.integers(0, 2**31 - 1))
    return backend, dtype, (batch, *sample), num_in, grid, ratio, max_value, seed


@SETTINGS
@given(threshold_problems())
def test_dynamic_threshold_equals_torch_quantile(tol, problem):
    backend, dtype, shape, num_in, grid, ratio, max_value, seed = problem
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    xs = [4 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(num_in)]
    if grid:
        xs = [(x / grid).round() * grid for x in xs]
    xs = [x.to(dtype) for x in xs]
    # a clip table's pre-clip row; small integers keep ties exact in w
    coef = torch.randint(-2, 3, (2, 2, num_in + 1), generator=g).to(acc)
    got = dynamic_threshold(xs, coef, 1, ratio, max_value, backend=backend)
    want = threshold_reference(xs, coef, 1, ratio, max_value)
    assert got.shape == (shape[0], 2) and got.dtype == acc
    torch.testing.assert_close(got, want, **tol(acc), equal_nan=True,
                               msg=lambda m: f"{backend} {dtype} {shape} ratio {ratio}: {m}")


def _dense(t: torch.Tensor) -> bool:
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


@st.composite
def group_norm_problems(draw):
    backend = draw(st.sampled_from(AVAILABLE))
    dtype = draw(st.sampled_from([d for d in DTYPES if usable(backend, d)]))
    groups = draw(st.sampled_from([1, 2, 3, 5]))
    per_group = draw(st.sampled_from([1, 2, 3, 7]))
    n = draw(st.sampled_from([1, 2, 3]))
    spatial = tuple(draw(st.lists(SIZES, min_size=0, max_size=2)))
    shape = (n, groups * per_group, *spatial)
    while math.prod(shape) > MAX_NUMEL:
        spatial = spatial[1:]
        shape = (n, groups * per_group, *spatial)
    channels_last = len(shape) == 4 and draw(st.booleans())
    maker = None if channels_last else draw(layouts(shape))
    affine = draw(st.booleans())
    modulate = draw(st.booleans())
    silu = draw(st.booleans())
    eps = draw(st.sampled_from([1e-6, 1e-5, 1e-3]))
    log_scale = draw(st.integers(-3, 3))  # data scale 1e-3 .. 1e3
    offset = draw(st.sampled_from([0.0, 1.0, 10.0]))  # mean, in units of the scale
    seed = draw(st.integers(0, 2**31 - 1))
    return (backend, dtype, groups, shape, channels_last, maker, affine, modulate, silu, eps,
            log_scale, offset, seed)


@SETTINGS
@given(group_norm_problems())
def test_group_norm_equals_the_reference(tol, problem):
    (backend, dtype, groups, shape, channels_last, maker, affine, modulate, silu, eps,
     log_scale, offset, seed) = problem
    g = torch.Generator().manual_seed(seed)
    s = 10.0 ** log_scale
    values = ((torch.randn(shape, generator=g, dtype=torch.float64) + offset) * s).to(dtype)
    x = values.to(memory_format=torch.channels_last) if channels_last else maker(values)
    keep = x.clone()
    c = shape[1]
    params = {}
    if affine:
        params["weight"] = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
        params["bias"] = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    if modulate:
        params["scale"] = (0.5 * torch.randn(n := shape[0], c, generator=g,
                                             dtype=torch.float64)).to(dtype)
        params["shift"] = torch.randn(n, c, generator=g, dtype=torch.float64).to(dtype)
    got = group_norm(x, groups, eps=eps, silu=silu, backend=backend, **params)
    assert got.shape == x.shape and got.dtype == dtype
    assert torch.equal(x.nan_to_num(), keep.nan_to_num())  # x untouched
    # the specification in float64 on the same values
    want = group_norm_reference(values.double(), groups, eps=eps, silu=silu,
                                **{k: v.double() for k, v in params.items()})
    magnitude = _group_norm_magnitude(values.double(), groups, eps, params) + want.abs()
    close(got, want.to(dtype) if dtype != torch.float64 else want, dtype, magnitude, tol,
          f"{backend} {dtype} {shape} cl={channels_last}")


def _group_norm_magnitude(x, groups, eps, params):
    """The scale of the rounding error of y = ((x - mean) rstd w + b)(1 + s) + t: the terms'
    magnitudes, (|x| + |mean|) rstd |w (1 + s)| + |b (1 + s)| + |t|. (x - mean) is where fp32
    loses accuracy when |mean| >> std: e.g. torch's CPU kernel evaluates x rstd - mean rstd.)"""
    n, c = x.shape[:2]
    xg = x.reshape(n, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    rstd = (xg.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
    norm = ((xg.abs() + mean.abs()) * rstd).reshape(x.shape)
    per_channel = [n, c] + [1] * (x.dim() - 2)
    one_s = (1 + params["scale"].double().reshape(per_channel)).abs() if "scale" in params \
        else torch.ones(per_channel, dtype=torch.float64)
    w = params["weight"].double().abs().reshape([1, c] + [1] * (x.dim() - 2)) \
        if "weight" in params else 1.0
    b = params["bias"].double().abs().reshape([1, c] + [1] * (x.dim() - 2)) \
        if "bias" in params else 0.0
    t = params["shift"].double().abs().reshape(per_channel) if "shift" in params else 0.0
    return norm * w * one_s + b * one_s + t


def test_the_backends_under_test():
    """reference always; the others where this machine has them (reported, not required)."""
    assert "reference" in AVAILABLE
    for b in BACKENDS:
        if b not in AVAILABLE:
            print(f"not tested here: {b}: {unavailable_reason(b, CPU)}")


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
