"""Attention: the core (Triton vs torch SDPA vs the reference) and the whole block
(fastdiff.nn.Attention vs diffusers' Attention = eager PyTorch with SDPA, vs the reference).

GPU shapes are Stable Diffusion 1.5's at 512x512 with classifier-free guidance (batch 2, 8
heads): self-attention at 64x64 latents (S 4096, head dim 40) and 32x32 (S 1024, head dim 80),
cross-attention to 77 CLIP tokens (768 channels). Each result records TFLOP/s (4 * B * H * Sq *
Skv * D flops for the core) and the kernel torch's SDPA dispatches to (`sdpa_kernel`). On CPU
(CI quick mode) each benchmark runs once at a tiny shape so the suite cannot rot.
"""

from __future__ import annotations

import pytest
import torch

from fastdiff.nn import Attention
from fastdiff.ops import attention, unavailable_reason
from fastdiff.reference.attention import attention_block as block_reference
from fastdiff.reference.attention import scaled_dot_product_attention as core_reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPE = torch.float16 if HAS_CUDA else torch.float32
TRITON = not unavailable_reason("triton", DEVICE)

# (B, H, Sq, Skv, D)
CORE_SHAPES = ([(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80),
                (2, 8, 1024, 77, 80), (2, 8, 256, 256, 160)] if HAS_CUDA
               else [(1, 2, 64, 64, 40)])
# name -> (Attention kwargs, hidden_states shape, context shape or None)
BLOCKS = {
    "sd15_attn1_64x64": (dict(query_dim=320, heads=8, dim_head=40), (2, 4096, 320), None),
    "sd15_attn2_64x64": (dict(query_dim=320, heads=8, dim_head=40, cross_attention_dim=768),
                         (2, 4096, 320), (2, 77, 768)),
    "sd15_attn1_32x32": (dict(query_dim=640, heads=8, dim_head=80), (2, 1024, 640), None),
    "unet2d_gn_block_64x64": (dict(query_dim=320, heads=8, dim_head=40, norm_num_groups=32,
                                   residual_connection=True, bias=True),
                              (2, 320, 64, 64), None),
} if HAS_CUDA else {
    "tiny_gn_block": (dict(query_dim=32, heads=2, dim_head=16, norm_num_groups=8,
                           residual_connection=True, bias=True), (1, 32, 4, 4), None),
}


def sdpa_kernel_name(q, k, v) -> str:
    """The kernel torch's scaled_dot_product_attention picks for these inputs."""
    try:
        from torch.nn.attention import SDPBackend

        names = {int(b.value): n for n, b in SDPBackend.__members__.items()}
        return names.get(int(torch._fused_sdp_choice(q, k, v)), "unknown")
    except (AttributeError, RuntimeError, TypeError):
        return "unknown"


def record_tflops(benchmark, flops: float) -> None:
    if "gpu_ms" in benchmark.extra_info:
        benchmark.extra_info["tflops"] = flops / (benchmark.extra_info["gpu_ms"] * 1e-3) / 1e12


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
@pytest.mark.parametrize("shape", CORE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def bench_attention_core(benchmark, measure, backend, shape):
    if backend == "triton" and not TRITON:
        pytest.skip(unavailable_reason("triton", DEVICE))
    b, h, sq, skv, d = shape
    q = torch.randn(b, h, sq, d, device=DEVICE, dtype=DTYPE)
    k, v = (torch.randn(b, h, skv, d, device=DEVICE, dtype=DTYPE) for _ in range(2))
    if backend == "reference":
        def fn():
            return core_reference(q, k, v)
    else:
        fn = lambda: attention(q, k, v, backend=backend)  # noqa: E731
        fn()  # Triton autotunes and compiles outside the timing
    benchmark.group = f"attention core {'x'.join(map(str, shape))} {DTYPE}"
    benchmark.extra_info.update(sdpa_kernel=sdpa_kernel_name(q, k, v), backend=backend)
    measure(fn, (q.numel() * 2 + k.numel() * 2) * q.element_size())
    record_tflops(benchmark, 4.0 * b * h * sq * skv * d)


def _block_flops(cfg, x_shape, ctx_shape) -> float:
    inner, c = cfg["heads"] * cfg["dim_head"], cfg["query_dim"]
    b = x_shape[0]
    s = x_shape[1] if len(x_shape) == 3 else x_shape[2] * x_shape[3]
    skv, ckv = (ctx_shape[1], ctx_shape[2]) if ctx_shape else (s, c)
    return 2.0 * b * (s * c * inner * 2 + skv * ckv * inner * 2) + 4.0 * b * s * skv * inner


@pytest.mark.parametrize("impl", ["diffusers", "reference", "fastdiff-auto", "fastdiff-sdpa",
                                  "fastdiff-triton"])
@pytest.mark.parametrize("name", list(BLOCKS))
def bench_attention_block(benchmark, measure, impl, name):
    cfg, x_shape, ctx_shape = BLOCKS[name]
    if impl == "fastdiff-triton" and not TRITON:
        pytest.skip(unavailable_reason("triton", DEVICE))
    torch.manual_seed(0)
    ours = Attention(**cfg).to(DEVICE, DTYPE).eval()
    x = torch.randn(x_shape, device=DEVICE, dtype=DTYPE)
    ctx = torch.randn(ctx_shape, device=DEVICE, dtype=DTYPE) if ctx_shape else None
    if impl == "diffusers":
        diffusers = pytest.importorskip("diffusers.models.attention_processor")
        module = diffusers.Attention(**cfg).to(DEVICE, DTYPE).eval()
        module.load_state_dict(ours.state_dict())
    elif impl == "reference":
        gn = ours.group_norm

        def module(x, ctx):
            return block_reference(
                x, ours.to_q.weight, ours.to_k.weight, ours.to_v.weight, ours.to_out[0].weight,
                heads=ours.heads, q_bias=ours.to_q.bias, k_bias=ours.to_k.bias,
                v_bias=ours.to_v.bias, out_bias=ours.to_out[0].bias, encoder_hidden_states=ctx,
                norm_weight=gn.weight if gn else None, norm_bias=gn.bias if gn else None,
                num_groups=gn.num_groups if gn else None, eps=gn.eps if gn else 1e-5,
                residual=x if ours.residual_connection else None)
    else:
        ours.backend = impl.split("-")[1]
        module = ours

    def fn():
        with torch.no_grad():
            return module(x, ctx)

    fn()  # warm-up (Triton autotuning, weight concatenation cache)
    benchmark.group = f"attention block {name} {DTYPE}"
    benchmark.extra_info.update(impl=impl)
    if HAS_CUDA:
        b = x_shape[0]
        s = x.numel() // (b * cfg["query_dim"])
        dh = cfg["dim_head"]
        probe = torch.empty(b, cfg["heads"], s, dh, device=DEVICE, dtype=DTYPE)
        kv = torch.empty(b, cfg["heads"], ctx_shape[1] if ctx_shape else s, dh, device=DEVICE,
                         dtype=DTYPE)
        benchmark.extra_info["sdpa_kernel"] = sdpa_kernel_name(probe, kv, kv)
    measure(fn, 2 * x.numel() * x.element_size())
    record_tflops(benchmark, _block_flops(cfg, x_shape, ctx_shape))
