"""The fused linear combination: every available backend against the reference."""

from __future__ import annotations

import shutil

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

from fastdiff import _native
from fastdiff.ops import lincomb
from fastdiff.reference.lincomb import lincomb as reference

SHAPES = [(1,), (7,), (131,), (2, 4, 8, 8), (3, 7, 13), (1, 1, 1, 1), (2, 3, 17, 19),
          (2, 4, 33, 31)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, dtype, shape, tol):
    skip_unsupported(backend, dtype)
    for num_in, num_out in [(1, 1), (2, 1), (3, 2), (6, 2), (1, 3), (4, 3), (6, 3)]:
        xs = make_inputs(shape, num_in, dtype)
        coef = make_coef(5, num_out, num_in, dtype)
        got = lincomb(xs, coef, 3, backend=backend)
        want = reference(xs, coef, 3)
        assert len(got) == num_out
        for g, w in zip(got, want):
            assert g.dtype == dtype and g.shape == w.shape
            torch.testing.assert_close(g, w, **tol(dtype))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced", "mixed"])
@pytest.mark.parametrize("num_out", [2, 3])
def test_layouts(backend, layout, num_out, tol):
    dtype = torch.float32
    xs = make_inputs((2, 3, 5, 7), 4, dtype, layout)
    coef = make_coef(2, num_out, 4, dtype)
    got = lincomb(xs, coef, 1, backend=backend)
    want = reference([x.contiguous() for x in xs], coef, 1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol(dtype))
    assert len(got) == num_out
    if layout == "channels_last":  # the results keep the inputs' layout
        assert all(g.is_contiguous(memory_format=torch.channels_last) for g in got)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the Triton interpreter
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_rounding_is_exact_for_every_bit_pattern(backend, dtype):
    """All 65536 encodings (subnormals, inf, NaN included), scaled by coefficients that round,
    underflow and overflow: the kernels' widening and round-to-nearest-even must equal torch's
    bit for bit (a single product leaves no room for accumulation-order differences)."""
    skip_unsupported(backend, dtype)
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype).to(DEVICE)
    # Exact products that land on fp16 rounding ties (1 + 2^-11: half an ulp), a quarter and
    # three quarters of an ulp, and powers of two that shift normals into the subnormal range.
    exact = [1 + 2**-11, 1 + 2**-12, 1 + 3 * 2**-12, 2**-11, -(2**-13), 2**-20]
    coef = torch.tensor([[[c]] for c in (1.0, 1 / 3, -7.1e-3, 3.3e4, 1e-7, *exact)],
                        device=DEVICE)
    for row in range(coef.shape[0]):
        got = lincomb([x], coef, row, backend=backend)[0]
        want = (x.float() * coef[row, 0, 0]).to(dtype)
        same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
        assert bool(same.all()), f"row {row}: {int((~same).sum())} encodings differ"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("num_out", [2, 3])
def test_row_tensor_equals_int_row_and_bad_device_row_gives_nan(backend, num_out):
    xs = make_inputs((4, 9), 3, torch.float32)
    coef = make_coef(4, num_out, 3, torch.float32)
    for r in range(4):
        by_tensor = lincomb(xs, coef, torch.tensor(r, device=DEVICE), backend=backend)
        by_int = lincomb(xs, coef, r, backend=backend)
        for a, b in zip(by_tensor, by_int):
            assert torch.equal(a, b)
    for bad in (-1, 4):
        outs = lincomb(xs, coef, torch.tensor(bad, device=DEVICE), backend=backend)
        assert len(outs) == num_out and all(bool(o.isnan().all()) for o in outs)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_in_place_and_inputs_untouched(backend, tol):
    xs = make_inputs((2, 4, 6, 6), 3, torch.float32)
    originals = [x.clone() for x in xs]
    coef = make_coef(1, 2, 3, torch.float32)
    want = reference(xs, coef, 0)
    got = lincomb(xs, coef, backend=backend)
    for x, o in zip(xs, originals):
        assert torch.equal(x, o)  # not modified
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol(torch.float32))
    # In place: the state is overwritten with output 0, a second buffer gets output 1.
    second = torch.empty_like(xs[0])
    res = lincomb(xs, coef, out=[xs[0], second], backend=backend)
    assert res[0] is xs[0] and res[1] is second
    torch.testing.assert_close(xs[0], want[0], **tol(torch.float32))
    torch.testing.assert_close(second, want[1], **tol(torch.float32))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_three_outputs_in_place_over_two_inputs(backend, dtype, tol):
    """A UniPC-like step: outputs 0 and 2 overwrite inputs 2 and 0, output 1 is fresh; every
    output reads the inputs from before the launch (odd size: vector body and scalar tail)."""
    xs = make_inputs((3, 5, 7, 9), 4, dtype)
    coef = make_coef(2, 3, 4, dtype)
    want = reference(xs, coef, 1)
    fresh = torch.empty_like(xs[0])
    res = lincomb(xs, coef, 1, out=[xs[2], fresh, xs[0]], backend=backend)
    assert res[0] is xs[2] and res[1] is fresh and res[2] is xs[0]
    for g, w in zip(res, want):
        torch.testing.assert_close(g, w, **tol(dtype))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_out_in_another_layout(backend, tol):
    xs = make_inputs((2, 3, 4, 5), 2, torch.float32)
    coef = make_coef(1, 1, 2, torch.float32)
    out = torch.empty((5, 4, 3, 2), device=DEVICE).permute(3, 2, 1, 0)  # dense, other layout
    lincomb(xs, coef, out=[out], backend=backend)
    torch.testing.assert_close(out, reference(xs, coef, 0)[0], **tol(torch.float32))


def test_empty_tensors():
    xs = make_inputs((0, 3), 2, torch.float32)
    out = lincomb(xs, make_coef(1, 1, 2, torch.float32))
    assert out[0].shape == (0, 3)


def _bad_calls():
    x = torch.zeros(4, 5, device=DEVICE)
    c = torch.zeros(2, 1, 2, device=DEVICE)
    base = dict(inputs=[x, x], coef=c)
    yield "inputs", TypeError, dict(base, inputs=x)
    yield "inputs must hold", ValueError, dict(base, inputs=[])
    yield "inputs must hold", ValueError, dict(base, inputs=[x] * 7, coef=torch.zeros(1, 1, 7))
    yield "inputs[1]", TypeError, dict(base, inputs=[x, 3.0])
    yield "inputs[1] has dtype", TypeError, dict(base, inputs=[x, x.double()])
    yield "inputs[1] has shape", ValueError, dict(base, inputs=[x, x[:, :4]])
    yield "inputs[0] must be float", TypeError, dict(base, inputs=[x.int(), x.int()])
    yield "coef must have shape", ValueError, dict(base, coef=c[0])
    yield "coef.shape[2]", ValueError, dict(base, coef=torch.zeros(2, 1, 3, device=DEVICE))
    yield "coef.shape[1]", ValueError, dict(base, coef=torch.zeros(2, 4, 2, device=DEVICE))
    yield "coef.shape[1]", ValueError, dict(base, coef=torch.zeros(2, 0, 2, device=DEVICE))
    yield "coef must be torch.float32", TypeError, dict(base, coef=c.double())
    yield "row must be in", ValueError, dict(base, row=2)
    yield "row must be in", ValueError, dict(base, row=-1)
    yield "row must be an int", TypeError, dict(base, row=1.0)
    yield "row as a tensor", TypeError, dict(base, row=torch.tensor(1, dtype=torch.int32))
    yield "out must hold", ValueError, dict(base, out=[x, x.clone()])
    yield "out[0] must match", ValueError, dict(base, out=[x[:2]])
    buf = torch.zeros(21, device=DEVICE)
    yield "partially overlaps", ValueError, dict(
        inputs=[buf[:20].view(4, 5)], coef=c[:, :, :1], out=[buf[1:].view(4, 5)])
    yield "overlapping", ValueError, dict(
        base, out=[torch.zeros(1, 5, device=DEVICE).expand(4, 5)])
    c3 = torch.zeros(2, 3, 2, device=DEVICE)
    y = torch.zeros(4, 5, device=DEVICE)
    yield "out must hold", ValueError, dict(base, coef=c3, out=[x, y])
    yield "out[2] overlaps out[0]", ValueError, dict(base, coef=c3, out=[y, x, y])
    yield "out[2] partially overlaps inputs[0]", ValueError, dict(
        inputs=[buf[:20].view(4, 5)], coef=c3[:, :, :1], out=[x, y, buf[1:].view(4, 5)])


@pytest.mark.parametrize("needle,exc,kwargs", list(_bad_calls()), ids=lambda v: str(v)[:30])
def test_bad_input_is_a_clear_error(needle, exc, kwargs):
    with pytest.raises(exc, match=needle.replace("[", r"\[").replace("]", r"\]")):
        lincomb(**kwargs)


def test_unknown_backend():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="backend must be one of"):
        lincomb([x], torch.zeros(1, 1, 1), backend="tpu")


@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b != "triton"])
def test_opcheck(backend):
    xs = make_inputs((2, 3, 4), 3, torch.float32)
    coef = make_coef(3, 2, 3, torch.float32)
    torch.library.opcheck(torch.ops.fastdiff.lincomb.default, (xs, coef, None, 1, backend))
    row = torch.tensor(2, device=DEVICE)
    torch.library.opcheck(torch.ops.fastdiff.lincomb.default, (xs, coef, row, 0, backend))
    outs = [torch.empty_like(xs[0]) for _ in range(2)]
    torch.library.opcheck(torch.ops.fastdiff.lincomb_out.default,
                          (xs, coef, None, 1, backend, outs))
    seeds = torch.tensor([5, 6], device=DEVICE)
    with_noise = make_coef(3, 2, 4, torch.float32)
    torch.library.opcheck(torch.ops.fastdiff.lincomb.default,
                          (xs, with_noise, None, 1, backend, seeds, [9]))
    three = make_coef(3, 3, 4, torch.float32)
    torch.library.opcheck(torch.ops.fastdiff.lincomb.default,
                          (xs, three, None, 2, backend, seeds, [9]))
    outs = [torch.empty_like(xs[0]) for _ in range(3)]
    torch.library.opcheck(torch.ops.fastdiff.lincomb_out.default,
                          (xs, three, None, 2, backend, outs, seeds, [9]))


def test_torch_compile_traces_the_op():
    xs = make_inputs((2, 3, 4), 2, torch.float32)
    coef = make_coef(2, 1, 2, torch.float32)

    def step(a, b, c):
        return lincomb([a * 2, b], c, 1)[0] + 1

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*xs, coef), step(*xs, coef))


def test_native_module_has_cuda_code_where_nvcc_exists():
    mod, reason = _native.load()
    assert mod is not None, reason
    if shutil.which("nvcc") or shutil.which("/usr/local/cuda/bin/nvcc"):
        assert mod.has_cuda()
        assert mod.cuda_archs(), "built with nvcc but for no architecture"
    assert mod.abi_version() == _native.ABI_VERSION
    x, coef = torch.zeros(8), torch.zeros(1, 4, 1)  # the binding checks the arity itself
    with pytest.raises(ValueError, match="1 to 3 outputs expected, got 4"):
        mod.lincomb(_native.DTYPE_CODES[x.dtype], -1, [x.data_ptr()], [x.data_ptr()] * 4,
                    coef.data_ptr(), 0, 0, 1, x.numel(), 0)


@pytest.mark.gpu
def test_cuda_graph_replay_reads_the_row_from_device(tol):
    xs = make_inputs((2, 4, 64, 64), 3, torch.float16)
    coef = make_coef(8, 2, 3, torch.float16)
    row = torch.tensor(0, device=DEVICE)
    outs = [torch.empty_like(xs[0]) for _ in range(2)]
    for backend in KERNEL_BACKENDS:
        lincomb(xs, coef, row, out=outs, backend=backend)  # warm-up (Triton compiles here)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            lincomb(xs, coef, row, out=outs, backend=backend)
        for r in (3, 7):
            row.fill_(r)
            graph.replay()
            torch.cuda.synchronize()
            for o, w in zip(outs, reference(xs, coef, r)):
                torch.testing.assert_close(o, w, **tol(torch.float16))


# ---- in-kernel noise ---------------------------------------------------------------------------

def test_philox_matches_random123_known_answers():
    """Known-answer vectors of Random123's philox4x32_10 (kat_vectors)."""
    from fastdiff.reference.noise import philox4x32_10

    f = 0xFFFFFFFF
    cases = [([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
             ([f, f, f, f], [f, f], [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
             ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
              [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1])]
    for counter, key, want in cases:
        got = philox4x32_10([torch.tensor([c]) for c in counter],
                            (torch.tensor([key[0]]), torch.tensor([key[1]])))
        assert [int(g) for g in got] == want


SEEDS = [3, 2**40 + 17, -5]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("num_out", [2, 3])
def test_noise_terms_equal_the_reference(backend, layout, num_out):
    xs = make_inputs((3, 4, 6, 5), 2, torch.float32, layout)
    coef = make_coef(3, num_out, 4, torch.float32)  # 2 inputs + 2 noise terms
    seeds = torch.tensor(SEEDS, device=DEVICE)
    got = lincomb(xs, coef, 1, noise=(seeds, [7, 8]), backend=backend)
    want = reference(xs, coef, 1, noise=(seeds, [7, 8]))
    assert len(got) == num_out
    for g, w in zip(got, want):
        # Box-Muller is evaluated in float64 on every backend, so the fp32 results agree
        # exactly unless a libm last-ulp difference lands on an fp32 rounding tie.
        assert torch.equal(g, w)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_noise_of_a_sample_does_not_depend_on_its_batch(backend):
    xs = make_inputs((3, 2, 5, 5), 1, torch.float32)
    coef = torch.tensor([[[0.0, 1.0]]], device=DEVICE)  # out = z
    seeds = torch.tensor(SEEDS, device=DEVICE)
    batch = lincomb(xs, coef, noise=(seeds, [4]), backend=backend)[0]
    for b in range(3):
        alone = lincomb([xs[0][b:b + 1]], coef, noise=(seeds[b:b + 1], [4]), backend=backend)[0]
        assert torch.equal(alone[0], batch[b])
    reordered = lincomb([xs[0].flip(0)], coef, noise=(seeds.flip(0), [4]), backend=backend)[0]
    assert torch.equal(reordered, batch.flip(0))


def test_noise_is_standard_normal_and_independent():
    from fastdiff.reference.noise import philox_normal

    n = 200_000
    z = philox_normal(torch.tensor([11, 12]), 3, n // 2).reshape(-1)
    w = philox_normal(torch.tensor([11, 12]), 4, n // 2).reshape(-1)
    se = n**-0.5
    assert abs(z.mean().item()) < 5 * se
    assert abs(z.std().item() - 1) < 5 * (0.5**0.5) * se
    assert abs(((z - z.mean()) ** 4).mean().item() / z.var().item() ** 2 - 3) < 5 * 24**0.5 * se
    assert abs(torch.corrcoef(torch.stack([z, w]))[0, 1].item()) < 5 * se  # counters independent


def test_noise_validation():
    x = torch.zeros(2, 3, device=DEVICE)
    c = torch.zeros(1, 1, 2, device=DEVICE)
    seeds = torch.tensor([1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="coef.shape\\[2\\]"):
        lincomb([x], c)
    with pytest.raises(TypeError, match="seeds must be a 1-D int64"):
        lincomb([x], c, noise=(seeds.int(), [1]))
    with pytest.raises(ValueError, match="one entry per sample"):
        lincomb([x], c, noise=(seeds[:1], [1]))
    with pytest.raises(ValueError, match="counters must hold"):
        lincomb([x], c, noise=(seeds, []))
    with pytest.raises(ValueError, match="counters must be ints"):
        lincomb([x], c, noise=(seeds, [-1]))
