"""The step's element math is never FMA-contracted (issue 13, item 2; DESIGN.md, Numerics).

The reference rounds every product and every sum; a kernel whose compiler contracts
`acc + c * x` into one fused multiply-add rounds once instead, which changes the last bit of
many results. Here the inputs are chosen so that it does: for each element, the contracted
result (computed exactly: fp32 products are exact in fp64, fp64 ones in Fractions) differs
from the reference's. Every backend must still give the reference's bits. (A _C built with
FASTDIFF_EXTRA_CXXFLAGS="-ffp-contract=fast -march=native" on an FMA-capable CPU fails this;
the CUDA side is guarded by the SASS/PTX checks of tests/test_ptxas.py.)
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from _lincomb_cases import ALL_BACKENDS, DEVICE

from fastdiff.ops import lincomb
from fastdiff.reference.lincomb import lincomb as reference

N = 4099  # several CPU tiles, GPU vectors and a tail


def _fused(a, b, c, dtype):
    """round(a * b + c) with one rounding (an FMA), elementwise, exactly."""
    if dtype == torch.float32:  # the fp32 product is exact in fp64; one more rounding to fp32
        return (a.double() * b.double() + c.double()).float()
    out = [float(Fraction(x) * Fraction(y) + Fraction(z))
           for x, y, z in zip(a.tolist(), b.tolist(), c.tolist())]
    return torch.tensor(out, dtype=torch.float64)


def contraction_sensitive(dtype, seed=0):
    """Coefficients (c0, c1) and inputs x0, x1 [N] on which both ways of contracting
    c0 * x0 + c1 * x1 (the second product into the sum, or the first) change the bits."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(2, generator=g, dtype=torch.float64).to(dtype)
    picked0, picked1, have = [], [], 0
    while have < N:
        x0 = torch.randn(4 * N, generator=g, dtype=torch.float64).to(dtype)
        x1 = torch.randn(4 * N, generator=g, dtype=torch.float64).to(dtype)
        p0, p1 = c[0] * x0, c[1] * x1
        plain = p0 + p1
        second = _fused(x1, torch.full_like(x1, c[1].item()), p0, dtype)
        first = _fused(x0, torch.full_like(x0, c[0].item()), p1, dtype)
        keep = (second != plain) & (first != plain)
        picked0.append(x0[keep])
        picked1.append(x1[keep])
        have += int(keep.sum())
    return c, torch.cat(picked0)[:N], torch.cat(picked1)[:N]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the Triton interpreter
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bitwise_equal_to_the_reference_where_an_fma_would_differ(backend, dtype):
    c, x0, x1 = contraction_sensitive(dtype)
    coef = c.reshape(1, 1, 2).to(DEVICE)
    xs = [x0.to(DEVICE), x1.to(DEVICE)]
    want = reference(xs, coef, 0)[0]
    # the construction has teeth: an FMA would differ from the reference on every element
    fused = _fused(x1, torch.full_like(x1, c[1].item()), c[0] * x0, dtype).to(DEVICE)
    assert bool((fused != want).all())
    got = lincomb(xs, coef, 0, backend=backend)[0]
    mismatches = int((got != want).sum())
    assert mismatches == 0, f"{backend}: {mismatches} of {N} results rounded differently"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fused_clip_term_is_not_contracted(backend):
    """The clipped term enters as out + c_y * y (lincomb_add_clipped): rounded op by op too."""
    c, x0, x1 = contraction_sensitive(torch.float32, seed=1)
    # row 0: out = c0 x0 + c1 x1 + c1 * clip(w); the pre-clip row w = x0 (never clipped: b = 1e9)
    coef = torch.tensor([[[c[0], c[1], c[1]], [1.0, 0.0, 0.0]]], dtype=torch.float32)
    x0, x1 = x0.reshape(1, -1), x1.reshape(1, -1)
    clip = torch.tensor([[1e9, 1.0]], dtype=torch.float32)
    xs = [x0.to(DEVICE), x1.to(DEVICE)]
    want = reference(xs, coef.to(DEVICE), 0, clip=clip.to(DEVICE))[0]
    partial = c[0] * x0 + c[1] * x1
    fused = _fused(x0.reshape(-1), torch.full((N,), c[1].item()), partial.reshape(-1),
                   torch.float32)
    assert int((fused != want.cpu().reshape(-1)).sum()) > N // 10  # an FMA would show
    got = lincomb(xs, coef.to(DEVICE), 0, clip=clip.to(DEVICE), backend=backend)[0]
    assert torch.equal(got, want)
