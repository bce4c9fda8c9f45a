"""Attention: the Triton kernel and SDPA against an exact (float64) reference, and
fastdiff.nn.Attention against diffusers' Attention with the same weights.

Low-precision rule (FlashAttention's): the error against float64 is at most 2x the error of
PyTorch's own eager attention (matmul, softmax, matmul) in the same dtype.
"""

from __future__ import annotations

import pytest
import torch

from fastdiff.kernels.attention import split_head_dim
from fastdiff.nn import Attention
from fastdiff.ops import attention, attention_block, attention_dispatch_info
from fastdiff.ops._backends import unavailable_reason
from fastdiff.ops.attention import choose_backend, sdpa_columns, triton_columns
from fastdiff.reference.attention import scaled_dot_product_attention as reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
TRITON = not unavailable_reason("triton", DEVICE)
CORE_BACKENDS = ["reference", "sdpa"] + (["triton"] if TRITON else [])
LOW = (torch.float16, torch.bfloat16)
needs_triton = pytest.mark.skipif(not TRITON, reason="triton unavailable here")
diffusers_attention = pytest.importorskip("diffusers.models.attention_processor")


def skip_unsupported(backend: str, dtype: torch.dtype) -> None:
    if backend == "triton" and not HAS_CUDA and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter cannot do bf16 arithmetic")


def qkv(b, h, sq, skv, d, dtype, seed=0, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
               for n in (sq, skv, skv))
    if layout == "fused":  # heads split from one [B, S, 3 * H * D] projection, as the block does
        assert sq == skv
        buf = torch.cat([t.transpose(1, 2).reshape(b, sq, h * d) for t in (q, k, v)], -1)
        q, k, v = (t.unflatten(-1, (h, d)).transpose(1, 2)
                   for t in buf.to(DEVICE, dtype).split(h * d, -1))
        return q, k, v
    q, k, v = (t.to(DEVICE, dtype) for t in (q, k, v))
    if layout == "head_dim_strided":  # stride along D != 1: [B, H, D, S] storage
        q, k, v = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (q, k, v))
    return q, k, v


def eager_same_dtype(q, k, v, scale=None):
    """What PyTorch users run: matmul, softmax, matmul, all in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


def assert_accurate(got, exact, baseline, dtype, tol):
    """fp32/fp64: within the tolerance table; fp16/bf16: at most 2x the baseline's error."""
    exact = exact.to(got.device, torch.float64)
    if dtype in LOW:
        err = (got.double() - exact).abs().max().item()
        base = (baseline.double() - exact).abs().max().item()
        assert err <= 2 * base, f"error {err:.3g} > 2 x PyTorch's own {base:.3g}"
    else:
        torch.testing.assert_close(got, exact.to(dtype), **tol(dtype))


# (B, H, Sq, Skv, D): SD's unpadded head dims 40/80/160, odd lengths, cross attention (77 keys).
SHAPES = [(1, 2, 33, 77, 40), (2, 1, 64, 64, 80), (1, 2, 77, 33, 32), (1, 1, 20, 40, 160),
          (2, 2, 16, 16, 40), (1, 1, 5, 3, 8)]


@pytest.mark.parametrize("backend", CORE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_core_matches_exact_reference(backend, dtype, shape, tol):
    skip_unsupported(backend, dtype)
    q, k, v = qkv(*shape, dtype)
    got = attention(q, k, v, backend=backend)
    assert got.shape == q.shape and got.dtype == dtype
    exact = reference(q.double(), k.double(), v.double())
    assert_accurate(got, exact, eager_same_dtype(q, k, v), dtype, tol)


@pytest.mark.parametrize("backend", CORE_BACKENDS)
@pytest.mark.parametrize("layout", ["fused", "head_dim_strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_any_strides(backend, layout, dtype, tol):
    q, k, v = qkv(2, 2, 35, 35, 40, dtype, layout=layout)
    got = attention(q, k, v, scale=0.3, backend=backend)
    exact = reference(q.double(), k.double(), v.double(), scale=0.3)
    assert_accurate(got, exact, eager_same_dtype(q, k, v, 0.3), dtype, tol)


@needs_triton
def test_triton_equals_sdpa_fp32(tol):
    q, k, v = qkv(1, 3, 45, 77, 80, torch.float32, seed=3)
    torch.testing.assert_close(attention(q, k, v, backend="triton"),
                               attention(q, k, v, backend="sdpa"), **tol(torch.float32))


def test_head_dims_are_not_padded_to_powers_of_two():
    """40 -> 32 + 16 columns (not 64), 80 -> 64 + 16 (not 128), 160 -> 128 + 32 (not 256)."""
    assert [split_head_dim(d) for d in (32, 40, 64, 80, 160)] == [
        (32, 0), (32, 16), (64, 0), (64, 16), (128, 32)]
    for d in range(8, 257):
        d0, d1 = split_head_dim(d)
        assert d0 + d1 >= d and d0 & (d0 - 1) == 0 and (d1 == 0 or d1 & (d1 - 1) == 0)
        assert triton_columns(d) == d0 + d1
        assert sdpa_columns(d) >= d


@needs_triton
@pytest.mark.parametrize("d", [40, 80])
def test_masked_head_columns_are_never_read_or_written(d):
    """Heads sit side by side in one buffer whose other columns hold NaN: a kernel touching
    columns outside its head would return or leave NaN."""
    from fastdiff.kernels.attention import attention as launch

    q, k, v = qkv(1, 2, 33, 33, d, torch.float16, seed=1)

    def framed(t):  # t's data in columns [8, 8 + d) of NaN rows of width d + 24
        buf = torch.full((*t.shape[:3], d + 24), float("nan"), dtype=t.dtype, device=t.device)
        buf[..., 8:8 + d] = t
        return buf, buf[..., 8:8 + d]

    (_, qf), (_, kf), (_, vf), (out_buf, out) = map(framed, (q, k, v, torch.empty_like(q)))
    out.zero_()
    launch(qf, kf, vf, out, d**-0.5)
    assert not out.isnan().any()
    assert out_buf[..., :8].isnan().all() and out_buf[..., 8 + d:].isnan().all()
    torch.testing.assert_close(out, attention(q, k, v, backend="sdpa"), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("backend", CORE_BACKENDS)
def test_inputs_are_not_modified(backend):
    q, k, v = qkv(1, 2, 20, 20, 40, torch.float32, layout="fused")
    before = [t.clone() for t in (q, k, v)]
    attention(q, k, v, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), before))


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_masks_as_sdpa(backend, tol):
    q, k, v = qkv(2, 2, 9, 13, 16, torch.float32)
    keep = torch.rand(2, 1, 1, 13, generator=torch.Generator().manual_seed(0)) > 0.3
    keep[..., 0] = True
    bias = torch.randn(2, 2, 9, 13, generator=torch.Generator().manual_seed(1))
    for mask in (keep.to(DEVICE), bias.to(DEVICE)):
        torch.testing.assert_close(
            attention(q, k, v, attn_mask=mask, backend=backend),
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            **tol(torch.float32))


def test_dispatch_rule_and_info():
    assert choose_backend("cuda", torch.float16, 16, 4096, 4096, 40)[0] == "triton"
    assert choose_backend("cuda", torch.bfloat16, 16, 1024, 1024, 80)[0] == "triton"
    for args in [("cuda", torch.float16, 16, 4096, 4096, 64), ("cpu", torch.float16, 16, 4096,
                 4096, 40), ("cuda", torch.float32, 16, 4096, 4096, 40),
                 ("cuda", torch.float16, 1, 16, 16, 40)]:
        assert choose_backend(*args)[0] == "sdpa"
    assert choose_backend("cuda", torch.float16, 16, 4096, 4096, 40, has_mask=True)[0] == "sdpa"
    assert choose_backend("cuda", torch.float16, 16, 4096, 4096, 40, needs_grad=True)[0] == "sdpa"
    info = attention_dispatch_info()
    assert set(info) >= {"rule", "triton_available", "cuda_fp16"}
    assert len(info["cuda_fp16"]) >= 4
    assert all(isinstance(v, str) for v in info["cuda_fp16"].values())


def _bad_attention_calls():
    q = torch.zeros(1, 2, 4, 8, device=DEVICE)
    yield "q must have shape", ValueError, dict(q=q[0], k=q, v=q)
    yield "k must be a torch.Tensor", TypeError, dict(q=q, k=1.0, v=q)
    yield "k has dtype", TypeError, dict(q=q, k=q.double(), v=q)
    yield "q must be float16", TypeError, dict(q=q.int(), k=q.int(), v=q.int())
    yield "share batch and heads", ValueError, dict(q=q, k=q[:, :1], v=q[:, :1])
    yield "head dim", ValueError, dict(q=q, k=q[..., :4], v=q[..., :4])
    yield "as many positions", ValueError, dict(q=q, k=q, v=q[:, :, :3])
    yield "at least one key", ValueError, dict(q=q, k=q[:, :, :0], v=q[:, :, :0])
    yield "scale must be a float", TypeError, dict(q=q, k=q, v=q, scale=True)
    yield "scale must be finite", ValueError, dict(q=q, k=q, v=q, scale=float("inf"))
    yield "attn_mask must broadcast", ValueError, dict(q=q, k=q, v=q,
                                                         attn_mask=torch.ones(3, 4, dtype=bool))
    yield "attn_mask must be bool", TypeError, dict(q=q, k=q, v=q, attn_mask=q.double())
    yield "backend must be one of", ValueError, dict(q=q, k=q, v=q, backend="tpu")
    if TRITON:
        yield "triton backend supports float16", TypeError, dict(
            q=q.double(), k=q.double(), v=q.double(), backend="triton")
        yield "takes no attn_mask", ValueError, dict(
            q=q, k=q, v=q, backend="triton", attn_mask=torch.ones(4, 4, dtype=bool))
        yield "needs scale >= 0", ValueError, dict(q=q, k=q, v=q, backend="triton", scale=-1.0)
        g = q.clone().requires_grad_()
        yield "forward only", ValueError, dict(q=g, k=q, v=q, backend="triton")


@pytest.mark.parametrize("needle,exc,kwargs", list(_bad_attention_calls()),
                         ids=lambda v: str(v)[:30])
def test_bad_input_is_a_clear_error(needle, exc, kwargs):
    with pytest.raises(exc, match=needle):
        attention(**kwargs)


def test_bad_block_input_is_a_clear_error():
    x = torch.zeros(1, 8, 3, 3)
    w = torch.zeros(8, 8)
    with pytest.raises(ValueError, match="heads must be a positive int dividing 8"):
        attention_block(x, w, w, w, w, heads=3)
    with pytest.raises(ValueError, match="num_groups must divide"):
        attention_block(x, w, w, w, w, heads=2, num_groups=3)
    with pytest.raises(ValueError, match="k_weight must be"):
        attention_block(x, w, w[:, :4], w, w, heads=2)
    with pytest.raises(ValueError, match="hidden_states must be"):
        attention_block(x[0, 0], w, w, w, w, heads=2)
    with pytest.raises(ValueError, match="encoder_hidden_states must be"):
        attention_block(x, w, w, w, w, heads=2, encoder_hidden_states=torch.zeros(2, 5, 8))


@pytest.mark.parametrize("backend", [b for b in CORE_BACKENDS if b != "triton" or HAS_CUDA]
                         + (["triton"] if TRITON and not HAS_CUDA else []))
def test_opcheck(backend):
    q, k, v = qkv(1, 2, 17, 9, 40, torch.float32, layout="contiguous")
    torch.library.opcheck(torch.ops.fastdiff.attention.default, (q, k, v, None, 0.2, backend))


@needs_triton
def test_torch_compile_traces_the_module_with_the_triton_op(tol):
    module = Attention(64, heads=2, dim_head=32, norm_num_groups=8, residual_connection=True,
                       bias=True, backend="triton").to(DEVICE).eval()
    x = torch.randn(2, 64, 5, 7, device=DEVICE)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), module(x), **tol(torch.float32))


# --- fastdiff.nn.Attention against diffusers' Attention --------------------------------------

# UNet2DModel's AttnDownBlock2D / mid block (AttentionBlock semantics), and
# UNet2DConditionModel's transformer blocks: attn1 (self) and attn2 (cross, 77 x 768 context).
UNET2D = dict(query_dim=64, heads=2, dim_head=32, norm_num_groups=8, residual_connection=True,
              bias=True, upcast_softmax=True, _from_deprecated_attn_block=True, eps=1e-6,
              rescale_output_factor=2.0)
ATTN1 = dict(query_dim=80, heads=2, dim_head=40, bias=False, upcast_attention=False)
ATTN2 = dict(query_dim=80, cross_attention_dim=768, heads=1, dim_head=80, bias=False)
MODULE_BACKENDS = ["reference", "sdpa", "auto"] + (["triton"] if TRITON else [])


def make_pair(cfg, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    theirs = diffusers_attention.Attention(**cfg)
    for p in theirs.parameters():  # random weights, biases and norm affine (not the init)
        torch.nn.init.normal_(p, std=0.3 if p.dim() == 1 else 1.5 / p.shape[-1] ** 0.5)
    ours = Attention(**cfg)
    ours.load_state_dict(theirs.state_dict())
    return ours.to(DEVICE, dtype).eval(), theirs.to(DEVICE, dtype).eval()


def module_inputs(cfg, dtype, seed=1, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    if cfg.get("norm_num_groups"):
        x = torch.randn(2, cfg["query_dim"], 5, 7, generator=g)  # S = 35
    else:
        x = torch.randn(2, 33, cfg["query_dim"], generator=g)
    ctx = (torch.randn(2, 77, cfg["cross_attention_dim"], generator=g)
           if cfg.get("cross_attention_dim") else None)
    x = x.to(DEVICE, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, (ctx.to(DEVICE, dtype) if ctx is not None else None)


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
@pytest.mark.parametrize("cfg", [UNET2D, ATTN1, ATTN2], ids=["unet2d", "attn1", "attn2"])
def test_module_equals_diffusers_fp32(cfg, backend, tol):
    ours, theirs = make_pair(cfg)
    ours.backend = backend
    x, ctx = module_inputs(cfg, torch.float32)
    x0, ctx0 = x.clone(), (ctx.clone() if ctx is not None else None)
    with torch.no_grad():
        got, want = ours(x, ctx), theirs(x, ctx)
    assert torch.equal(x, x0) and (ctx is None or torch.equal(ctx, ctx0))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, **tol(torch.float32))


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
@pytest.mark.parametrize("cfg", [UNET2D, ATTN2], ids=["unet2d", "attn2"])
def test_module_fp16_error_within_2x_diffusers(cfg, backend, tol):
    """Against diffusers in float64: our fp16 error <= 2x diffusers' own fp16 error."""
    ours, theirs = make_pair(cfg, torch.float16)
    ours.backend = backend
    x, ctx = module_inputs(cfg, torch.float16)
    _, exact_module = make_pair(cfg, torch.float64)
    with torch.no_grad():
        got, want = ours(x, ctx), theirs(x, ctx)
        exact = exact_module(x.double(), ctx.double() if ctx is not None else None)
    assert_accurate(got, exact, want, torch.float16, tol)


@pytest.mark.parametrize("backend", ["sdpa"] + (["triton"] if TRITON else []))
def test_module_channels_last_and_layout(backend, tol):
    ours, theirs = make_pair(UNET2D)
    ours.backend = backend
    x, _ = module_inputs(UNET2D, torch.float32, channels_last=True)
    with torch.no_grad():
        got = ours(x)
        torch.testing.assert_close(got, theirs(x), **tol(torch.float32))
        assert ours(x.contiguous()).is_contiguous()  # NCHW in, NCHW out


def test_module_attention_mask_matches_diffusers(tol):
    ours, theirs = make_pair(ATTN2)
    x, ctx = module_inputs(ATTN2, torch.float32)
    keep = torch.ones(2, 77, dtype=torch.bool)
    keep[0, 40:] = False  # diffusers' UNet2DConditionModel turns such a mask into a bias:
    bias = ((1 - keep.float()) * -10000.0).unsqueeze(1).to(DEVICE)  # [B, 1, 77]
    with torch.no_grad():
        torch.testing.assert_close(ours(x, ctx, attention_mask=bias),
                                   theirs(x, ctx, attention_mask=bias), **tol(torch.float32))


def test_module_spatial_norm_and_cross_norm_match_diffusers(tol):
    for cfg, temb in [(dict(query_dim=32, heads=1, dim_head=32, spatial_norm_dim=4,
                            residual_connection=True, bias=True), torch.randn(2, 4, 3, 3)),
                      (dict(query_dim=32, heads=2, dim_head=16, cross_attention_dim=24,
                            cross_attention_norm="layer_norm"), None)]:
        ours, theirs = make_pair(cfg)
        assert set(ours.state_dict()) == set(theirs.state_dict())
        if temb is not None:
            x, ctx, temb = torch.randn(2, 32, 6, 6).to(DEVICE), None, temb.to(DEVICE)
        else:
            x, ctx = torch.randn(2, 10, 32).to(DEVICE), torch.randn(2, 7, 24).to(DEVICE)
        with torch.no_grad():
            torch.testing.assert_close(ours(x, ctx, temb=temb), theirs(x, ctx, temb=temb),
                                       **tol(torch.float32))


def test_module_training_dropout_and_gradients_match_diffusers(tol):
    cfg = dict(ATTN1, dropout=0.5)
    ours, theirs = make_pair(cfg)
    ours.train(), theirs.train()
    x, _ = module_inputs(cfg, torch.float32)
    torch.manual_seed(7)
    want = theirs(x)
    torch.manual_seed(7)
    got = ours(x)  # grad enabled: "auto" takes the differentiable SDPA path
    torch.testing.assert_close(got, want, **tol(torch.float32))
    got.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(ours.to_q.weight.grad, theirs.to_q.weight.grad, rtol=1e-4,
                               atol=1e-4)


def test_module_state_dict_keys_deprecated_names_and_weight_updates(tol):
    ours, theirs = make_pair(UNET2D)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    renames = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    old = {next((k.replace(a, b) for a, b in renames.items() if k.startswith(a)), k): t
           for k, t in theirs.state_dict().items()}
    fresh = Attention(**UNET2D).to(DEVICE)
    fresh.load_state_dict(old)  # diffusers' deprecated AttentionBlock checkpoint names
    x, _ = module_inputs(UNET2D, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), theirs(x), **tol(torch.float32))
        # In-place weight updates reach the fused (cached) QKV weight.
        for m in (fresh, theirs):
            m.to_k.weight.mul_(-0.5)
            m.to_v.bias.add_(1.0)
        torch.testing.assert_close(fresh(x), theirs(x), **tol(torch.float32))


@pytest.mark.parametrize("arg,value", [("qk_norm", "layer_norm"), ("kv_heads", 1),
                                       ("added_kv_proj_dim", 8), ("out_dim", 32),
                                       ("processor", object()), ("is_causal", True),
                                       ("cross_attention_norm", "rms")])
def test_module_unsupported_arguments_raise(arg, value):
    with pytest.raises(ValueError, match=arg):
        Attention(32, heads=2, dim_head=16, **{arg: value})


# --- On a GPU: Stable Diffusion 1.5's shapes ------------------------------------------------

SD_SHAPES = [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80),
             (2, 8, 1024, 77, 80), (2, 8, 256, 256, 160)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_sd_shapes(shape, dtype, tol):
    q, k, v = qkv(*shape, dtype)
    exact = reference(q.float(), k.float(), v.float())  # fp32 error << fp16/bf16 error
    baseline = eager_same_dtype(q, k, v)
    for backend in CORE_BACKENDS:
        assert_accurate(attention(q, k, v, backend=backend), exact, baseline, dtype, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_module_at_sd_shape_and_graph_capture(dtype, tol):
    cfg = dict(query_dim=320, heads=8, dim_head=40, bias=False)
    ours, theirs = make_pair(cfg, dtype)
    _, exact_module = make_pair(cfg, torch.float64)
    x = torch.randn(2, 4096, 320, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        exact = exact_module(x.double())
        want = theirs(x)
        for backend in MODULE_BACKENDS:
            ours.backend = backend
            assert_accurate(ours(x), exact, want, dtype, tol)
        ours.backend = "triton"
        out = ours(x)  # warm-up: autotuning and compilation happen outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ours(x)
        x.normal_()
        graph.replay()
        torch.testing.assert_close(out, ours(x), rtol=0, atol=0)
