"""The fused GroupNorm(+scale/shift)(+SiLU): every available backend against the reference, the
reference against torch.nn.GroupNorm, numerical stability, errors, torch.library, fastdiff.nn."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdiff.ops import group_norm, unavailable_reason
from fastdiff.ops.group_norm import _run
from fastdiff.reference.group_norm import group_norm as reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
KERNEL_BACKENDS = [b for b in ("cpu", "cuda", "triton") if not unavailable_reason(b, DEVICE)]
ALL_BACKENDS = ["reference", *KERNEL_BACKENDS]
INTERPRETED = DEVICE.type == "cpu"  # Triton runs under its interpreter here
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def skip_unsupported(backend: str, dtype: torch.dtype) -> None:
    if backend == "triton" and INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter cannot do bf16 arithmetic")


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":  # channels innermost, for any number of spatial dims
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "sliced":  # not dense: every other pixel of the last dim
        return torch.cat([x, x], dim=-1)[..., ::2]
    return x.contiguous()


def make_case(shape, dtype, layout="nchw", affine=True, scale=False, shift=False, seed=0,
              mean=0.5, std=2.0):
    """x ~ mean + std * N(0, 1) plus every argument group_norm takes, on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    n, c = shape[0], shape[1]

    def rand(*s, loc=0.0, sd=1.0):
        return (loc + sd * torch.randn(*s, generator=g, dtype=torch.float64)).to(DEVICE, dtype)

    x = to_layout(rand(*shape, loc=mean, sd=std), layout)
    return x, dict(
        weight=rand(c, loc=1.0) if affine else None,
        bias=rand(c, sd=0.5) if affine else None,
        scale=rand(n, c, sd=0.5) if scale else None,
        shift=rand(n, c, sd=0.5) if shift else None,
    )


# (shape, groups, options): channels 6..1280, 0/1/2/3 spatial dims, odd sizes (7x9, 1x1, 5x3),
# HW a multiple of the vector width (8x8) or not, every combination of the options.
CASES = [
    ((1, 32, 7, 9), 32, dict()),
    ((2, 64, 1, 1), 32, dict(silu=True)),
    ((2, 64, 8, 8), 32, dict(scale=True, shift=True, silu=True)),
    ((2, 320, 3, 5), 32, dict(affine=False, scale=True, silu=True)),
    ((1, 1280, 2, 3), 32, dict(shift=True)),
    ((2, 6, 5), 3, dict(scale=True, shift=True)),
    ((1, 64, 2, 3, 4), 16, dict(scale=True, shift=True, silu=True)),
    ((3, 8), 4, dict(affine=False, silu=True)),
]


def run_case(backend, shape, groups, options, dtype, layout):
    opts = dict(options)
    silu = opts.pop("silu", False)
    x, params = make_case(shape, dtype, layout, **opts)
    got = group_norm(x, groups, eps=1e-5, silu=silu, backend=backend, **params)
    want = reference(x, groups, eps=1e-5, silu=silu, **params)
    return x, got, want


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(backend, dtype, layout, tol):
    skip_unsupported(backend, dtype)
    for shape, groups, options in CASES:
        x, got, want = run_case(backend, shape, groups, options, dtype, layout)
        assert got.dtype == dtype and got.shape == x.shape
        assert got.stride() == torch.empty_like(x).stride()  # x's layout is kept
        torch.testing.assert_close(got, want, **tol(dtype), msg=lambda m, s=shape: f"{s}: {m}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_other_layouts_are_copied_in(backend, tol):
    x, params = make_case((2, 64, 4, 6), torch.float32, "sliced", scale=True)
    got = group_norm(x, 32, silu=True, backend=backend, **params)
    torch.testing.assert_close(got, reference(x.contiguous(), 32, silu=True, **params),
                               **tol(torch.float32))
    permuted = torch.randn(2, 4, 64, 6, device=DEVICE).permute(0, 2, 1, 3)  # dense, NHCW
    torch.testing.assert_close(group_norm(permuted, 8, backend=backend),
                               reference(permuted.contiguous(), 8), **tol(torch.float32))


def test_reference_is_torch_group_norm(tol):
    """The reference is torch.nn.GroupNorm (+ the ADM modulation, + SiLU) computed in fp32."""
    x, p = make_case((2, 64, 5, 7), torch.float16, scale=True, shift=True)
    scale, shift = (p[k].float()[:, :, None, None] for k in ("scale", "shift"))
    h = F.group_norm(x.float(), 32, p["weight"].float(), p["bias"].float(), 1e-5)
    want = F.silu(h * (1 + scale) + shift)
    torch.testing.assert_close(reference(x, 32, eps=1e-5, silu=True, **p), want.half(),
                               **tol(torch.float16))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_large_mean_is_stable(backend, layout):
    """x = 1000 + N(0, 1) in fp32: naive E[x^2] - E[x]^2 loses every digit of the variance
    (max error ~1 here), and so does torch's channels-last CPU kernel (~9). Against the exact
    (fp64) result from the same fp32 input, the error must be at most twice that of PyTorch's
    stable (NCHW) fp32 group_norm, itself at fp32's resolution near 1000 (~1e-4)."""
    x, p = make_case((2, 64, 16, 16), torch.float32, layout, mean=1000.0, std=1.0, seed=3)
    exact = reference(x.double(), 32, p["weight"].double(), p["bias"].double(), 1e-5)
    torch_nchw = F.group_norm(x.contiguous(), 32, p["weight"], p["bias"], 1e-5)
    torch_err = (torch_nchw - exact).abs().max().item()
    assert torch_err < 1e-3
    err = (group_norm(x, 32, backend=backend, **p).double() - exact).abs().max().item()
    assert err <= 2 * torch_err, (err, torch_err)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_inputs_not_modified(backend):
    x, params = make_case((2, 64, 4, 4), torch.float32, "channels_last", scale=True, shift=True)
    before = [t.clone() for t in (x, *params.values())]
    group_norm(x, 32, silu=True, backend=backend, **params)
    for t, b in zip((x, *params.values()), before):
        assert torch.equal(t, b) and t.stride() == b.stride()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_scale_shift_as_emb_none_none(backend):
    """ADM passes emb_out[..., None, None] ([N, C, 1, 1]): same result as [N, C]."""
    x, p = make_case((2, 32, 3, 3), torch.float32, scale=True, shift=True)
    flat = group_norm(x, 8, backend=backend, **p)
    p4 = dict(p, scale=p["scale"][:, :, None, None], shift=p["shift"][:, :, None, None])
    assert torch.equal(group_norm(x, 8, backend=backend, **p4), flat)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_batch(backend):
    x = torch.zeros(0, 32, 4, 4, device=DEVICE)
    assert group_norm(x, 8, backend=backend).shape == (0, 32, 4, 4)


def _bad_calls():
    x = torch.zeros(2, 64, 3, 3, device=DEVICE)
    w = torch.ones(64, device=DEVICE)
    nc = torch.zeros(2, 64, device=DEVICE)
    yield "x must be a torch.Tensor", TypeError, dict(x=[1.0], num_groups=1)
    yield "x must be float16", TypeError, dict(x=x.int(), num_groups=32)
    yield r"x must have shape \[N, C", ValueError, dict(x=w, num_groups=32)
    yield "num_groups must be an int", TypeError, dict(x=x, num_groups=32.0)
    yield "num_groups must be a positive divisor", ValueError, dict(x=x, num_groups=24)
    yield "num_groups must be a positive divisor", ValueError, dict(x=x, num_groups=0)
    yield "eps must be a non-negative", ValueError, dict(x=x, num_groups=32, eps=-1.0)
    yield "silu must be a bool", TypeError, dict(x=x, num_groups=32, silu=1)
    yield r"weight must have shape \[64\]", ValueError, dict(x=x, num_groups=32, weight=w[:32])
    yield "weight has dtype torch.float64", TypeError, dict(x=x, num_groups=32, weight=w.double())
    yield "bias must be a torch.Tensor", TypeError, dict(x=x, num_groups=32, bias=0.5)
    yield r"scale must have shape \[2, 64\]", ValueError, dict(x=x, num_groups=32, scale=nc[:1])
    yield r"scale must have shape", ValueError, dict(x=x, num_groups=32, scale=nc[:, :, None])
    yield "shift has dtype torch.float16", TypeError, dict(x=x, num_groups=32, shift=nc.half())
    yield "backend must be one of", ValueError, dict(x=x, num_groups=32, backend="tpu")


@pytest.mark.parametrize("needle,exc,kwargs", list(_bad_calls()), ids=lambda v: str(v)[:30])
def test_bad_input_is_a_clear_error(needle, exc, kwargs):
    with pytest.raises(exc, match=needle):
        group_norm(**kwargs)


@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b != "triton" or HAS_CUDA])
def test_opcheck(backend):
    x, p = make_case((2, 32, 3, 4), torch.float32, scale=True, shift=True)
    op = torch.ops.fastdiff.group_norm.default
    torch.library.opcheck(op, (x, 8, p["weight"], p["bias"], 1e-5, p["scale"], p["shift"], True,
                               backend))
    xc = to_layout(x, "channels_last")
    torch.library.opcheck(op, (xc, 8, None, None, 1e-6, None, None, False, backend))


def test_torch_compile_traces_the_op():
    x, p = make_case((2, 32, 4, 4), torch.float32)

    def block(h, w, b):
        return group_norm(h * 2, 8, w, b, silu=True) + 1

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    args = (x, p["weight"], p["bias"])
    torch.testing.assert_close(compiled(*args), block(*args))


# ----- fastdiff.nn -----------------------------------------------------------------------------

@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("fused_silu", [False, True])
def test_nn_modules_are_drop_ins_for_torch(affine, fused_silu, tol):
    from fastdiff.nn import GroupNorm, GroupNormSiLU

    torch.manual_seed(0)
    theirs = torch.nn.GroupNorm(8, 32, eps=1e-6, affine=affine, device=DEVICE)
    if affine:  # non-trivial parameters
        torch.nn.init.normal_(theirs.weight)
        torch.nn.init.normal_(theirs.bias)
    ours = (GroupNormSiLU if fused_silu else GroupNorm)(8, 32, eps=1e-6, affine=affine,
                                                         device=DEVICE)
    assert isinstance(ours, torch.nn.GroupNorm) and ours.backend == "auto"
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 32, 5, 6, device=DEVICE)
    with torch.no_grad():
        want = F.silu(theirs(x)) if fused_silu else theirs(x)
        for backend in ALL_BACKENDS:
            ours.backend = backend
            torch.testing.assert_close(ours(x), want, **tol(torch.float32))
            cl = to_layout(x, "channels_last")
            torch.testing.assert_close(ours(cl), want, **tol(torch.float32))


def test_nn_scale_shift_and_mixed_dtypes(tol):
    from fastdiff.nn import GroupNormSiLU

    norm = GroupNormSiLU(8, 32, device=DEVICE)  # fp32 parameters
    torch.nn.init.normal_(norm.weight)
    x, p = make_case((2, 32, 4, 4), torch.float16, scale=True, shift=True)
    with torch.no_grad():
        got = norm(x, scale=p["scale"][:, :, None, None], shift=p["shift"])
    want = reference(x, 8, norm.weight.half(), norm.bias.half(), 1e-5, p["scale"], p["shift"],
                     silu=True)
    torch.testing.assert_close(got, want, **tol(torch.float16))


def test_nn_backward_falls_back_to_autograd(tol):
    """Training still works: with autograd recording, the module uses the differentiable
    reference, whose gradients equal torch's."""
    from fastdiff.nn import GroupNormSiLU

    ours = GroupNormSiLU(4, 16, device=DEVICE)
    theirs = torch.nn.GroupNorm(4, 16, device=DEVICE)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 3, 3, device=DEVICE, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ours(x).square().sum().backward()
    F.silu(theirs(x2)).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **tol(torch.float32))
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **tol(torch.float32))


# ----- GPU: Stable Diffusion shapes, both CUDA modes, graphs --------------------------------------

SD_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (1, 128, 256, 256)]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_sd_shapes(shape, dtype, layout, tol):
    x, p = make_case(shape, dtype, layout, scale=True, shift=True)
    want = reference(x, 32, eps=1e-6, silu=True, **p)
    for backend in KERNEL_BACKENDS:
        got = group_norm(x, 32, eps=1e-6, silu=True, backend=backend, **p)
        torch.testing.assert_close(got, want, **tol(dtype), msg=lambda m, b=backend: f"{b}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES + [((1, 128, 512, 512), 32, dict(silu=True)),
                                          ((1, 4096, 4, 4), 32, dict(silu=True)),
                                          ((3, 96, 17, 33), 32, dict(scale=True))],
                         ids=lambda c: "x".join(map(str, c[0])))
def test_gpu_cuda_fused_and_two_pass_modes(case, layout, tol):
    """The CUDA launcher's two strategies (one cooperative launch with per-unit waits; stats +
    apply kernels) on every shape class, channels-last fallbacks (4096 channels) included."""
    if "cuda" not in KERNEL_BACKENDS:
        pytest.skip(unavailable_reason("cuda", DEVICE))
    shape, groups, options = case
    opts = dict(options)
    silu = opts.pop("silu", False)
    x, p = make_case(shape, torch.float16, layout, **opts)
    want = reference(x, groups, p["weight"], p["bias"], 1e-5, p["scale"], p["shift"], silu)
    for mode in (1, 2, 0):
        try:
            got = _run(x, groups, p["weight"], p["bias"], 1e-5, p["scale"], p["shift"], silu,
                       "cuda", cuda_mode=mode)
        except RuntimeError as e:
            assert mode == 2 and "fused mode" in str(e)
            continue
        torch.testing.assert_close(got, want, **tol(torch.float16),
                                   msg=lambda m, mode=mode: f"mode {mode}: {m}")
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_gpu_cuda_graph_replay(tol):
    x, p = make_case((2, 320, 32, 32), torch.float16, scale=True, shift=True)
    for backend in KERNEL_BACKENDS:
        out = group_norm(x, 32, silu=True, backend=backend, **p)  # warm-up (Triton compiles)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = group_norm(x, 32, silu=True, backend=backend, **p)
        for seed in (1, 2):
            x.copy_(make_case(x.shape, x.dtype, seed=seed)[0])
            graph.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(out, reference(x, 32, silu=True, **p), **tol(x.dtype))


def test_no_layout_plan_is_an_error_not_garbage(monkeypatch):
    """Issue 13, item 12: when the kernels accept no layout (the CUDA plans refuse groups of
    >= 2**31 elements), the op returned torch.empty_like(x), never written. An explicit backend
    now raises naming x; "auto" falls back to the reference with a warning."""
    import importlib

    ops = importlib.import_module("fastdiff.ops.group_norm")  # (the package exports the function)
    x = torch.randn(2, 8, 5, 5)
    monkeypatch.setitem(ops._LAUNCHERS, "cpu", lambda *args: False)  # no plan for any layout
    if not unavailable_reason("cpu", x.device):
        with pytest.raises(ValueError, match=r"cannot run x of shape \(2, 8, 5, 5\)"):
            ops._run(x, 4, None, None, 1e-5, None, None, False, "cpu")
    monkeypatch.setattr(ops, "resolve", lambda backend, device: "cpu")  # auto -> the kernels
    with pytest.warns(UserWarning, match="using the reference"):
        got = ops._run(x, 4, None, None, 1e-5, None, None, False, "auto")
    assert torch.equal(got, reference(x, 4))
