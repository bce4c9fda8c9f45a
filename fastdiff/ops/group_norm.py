"""The fused GroupNorm op: validation (once, here), layout handling and dispatch to
{reference, cpu, cuda, triton}, registered with torch.library so torch.compile traces it.

    y = GN(x) * weight + bias                (Wu & He 2018)
    y = y * (1 + scale[n, c]) + shift[n, c]  (ADM scale-shift norm, Dhariwal & Nichol 2021)
    y = silu(y)                              (optional)

Forward only. x is [N, C, *spatial], NCHW-contiguous or channels-last (channels innermost);
other layouts are copied into NCHW first. The result has x's layout.
"""

from __future__ import annotations

import math
import warnings

import torch

from fastdiff import _native
from fastdiff.ops._backends import resolve, traced
from fastdiff.reference.group_norm import group_norm as group_norm_reference

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_param(name, t, shape, x, allow_expanded=False):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {x.dtype} like x")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device}, expected {x.device} like x")
    ok = tuple(t.shape) == shape
    if allow_expanded:  # [N, C] or [N, C, 1, ...] as produced by emb[..., None, None]
        ok = ok or (t.dim() == x.dim() and tuple(t.shape[:2]) == shape
                    and all(s == 1 for s in t.shape[2:]))
    if not ok:
        want = f"{list(shape)}" + (f" or {list(shape) + [1] * (x.dim() - 2)}"
                                   if allow_expanded and x.dim() > 2 else "")
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    return t.reshape(shape).contiguous()


def _validate(x, num_groups, weight, bias, eps, scale, shift, silu):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape [N, C, *spatial], got {list(x.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    C = x.shape[1]
    if num_groups < 1 or C % num_groups != 0:
        raise ValueError(f"num_groups must be a positive divisor of the number of channels"
                         f" x.shape[1] = {C}, got {num_groups}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    if not isinstance(silu, bool):
        raise TypeError(f"silu must be a bool, got {type(silu).__name__}")
    weight = _check_param("weight", weight, (C,), x)
    bias = _check_param("bias", bias, (C,), x)
    scale = _check_param("scale", scale, (x.shape[0], C), x, allow_expanded=True)
    shift = _check_param("shift", shift, (x.shape[0], C), x, allow_expanded=True)
    return weight, bias, float(eps), scale, shift


def _kind(t: torch.Tensor) -> str | None:
    """'nchw' (contiguous), 'cl' (channels innermost, spatial dims in order) or None."""
    if t.is_contiguous():
        return "nchw"
    if t.dim() > 2 and t.movedim(1, -1).is_contiguous():
        return "cl"
    return None


def _in_kind(t: torch.Tensor, kind: str) -> torch.Tensor:
    if _kind(t) == kind:
        return t
    if kind == "nchw":
        return t.contiguous()
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


# Zero-filled CUDA workspaces, one per (device, stream): the kernels return their counters to
# zero, so a buffer is reused by every later call in the same stream order.
_WORKSPACES: dict[tuple[int, int], torch.Tensor] = {}


def _workspace(nbytes: int, device: torch.device) -> torch.Tensor:
    if torch.cuda.is_current_stream_capturing():  # graph-private memory, zeroed inside the graph
        return torch.zeros(max(nbytes, 1), dtype=torch.uint8, device=device)
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    ws = _WORKSPACES.get(key)
    if ws is None or ws.numel() < nbytes:
        ws = torch.zeros(max(nbytes, 4096), dtype=torch.uint8, device=device)
        _WORKSPACES[key] = ws
    return ws


def _ptr(t):
    return t.data_ptr() if t is not None else 0


def _launch_native(x, y, kind, G, weight, bias, eps, scale, shift, silu, mode) -> bool:
    """Runs the native kernel; False if it does not support this channels-last shape."""
    mod = _native.module()
    N, C = x.shape[0], x.shape[1]
    HW = math.prod(x.shape[2:])
    code = _native.DTYPE_CODES[x.dtype]
    cl = kind == "cl"
    ptrs = [_ptr(t) for t in (weight, bias, scale, shift)]
    if x.device.type == "cuda":
        index = x.device.index
        nbytes = mod.group_norm_workspace(code, index, x.data_ptr(), y.data_ptr(), N, C, HW, G, cl)
        if nbytes < 0:
            return False
        ws = _workspace(nbytes, x.device)
        stream = torch.cuda.current_stream(x.device).cuda_stream
        mod.group_norm(code, index, x.data_ptr(), y.data_ptr(), *ptrs, N, C, HW, G, eps, silu, cl,
                       ws.data_ptr(), ws.numel(), mode, stream)
    else:
        mod.group_norm(code, -1, x.data_ptr(), y.data_ptr(), *ptrs, N, C, HW, G, eps, silu, cl,
                       0, 0, 0, 0)
    return True


def _launch_triton(x, y, kind, G, weight, bias, eps, scale, shift, silu, mode) -> bool:
    from fastdiff.kernels.group_norm import group_norm as group_norm_triton

    group_norm_triton(x, y, G, weight, bias, eps, scale, shift, silu, kind == "cl")
    return True


_LAUNCHERS = {"cpu": _launch_native, "cuda": _launch_native, "triton": _launch_triton}


def _run(x, num_groups, weight, bias, eps, scale, shift, silu, backend, cuda_mode=0):
    """Validated arguments in, y out (with torch.empty_like(x)'s layout). cuda_mode (tests):
    0 auto, 1 two-pass, 2 fused."""
    requested = backend
    if backend == "auto" and x.device.type == "cpu":
        # torch's own CPU group_norm (AVX2/AVX-512 dispatch) beats the portable native build:
        # 2.1 vs 5.7 ms at 2x320x64x64 fp32 + SiLU on one core, and the native fp16 path pays
        # for software half conversions. The native "cpu" backend stays selectable (CI parity).
        backend = "reference"
    backend = resolve(backend, x.device)
    if backend == "reference":
        return group_norm_reference(x, num_groups, weight, bias, eps, scale, shift, silu)
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    kind = _kind(y) or "nchw"
    for attempt in (kind, "nchw"):
        out = y if _kind(y) == attempt else torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if _LAUNCHERS[backend](_in_kind(x, attempt), out, attempt, num_groups, weight, bias, eps,
                               scale, shift, silu, cuda_mode):
            break
    else:  # no layout plan accepts a group (e.g. one of >= 2**31 elements): y was never written
        shape = (f"x of shape {tuple(x.shape)} with num_groups={num_groups}"
                 f" ({x.numel() // max(x.shape[0] * num_groups, 1)} elements per group)")
        if requested != "auto":
            raise ValueError(f"group_norm: the {backend} kernels cannot run {shape}; use"
                             " backend='reference' (or 'auto')")
        warnings.warn(f"fastdiff: group_norm's {backend} kernels cannot run {shape}; using the"
                      " reference", stacklevel=3)
        return group_norm_reference(x, num_groups, weight, bias, eps, scale, shift, silu)
    if out is not y:
        y.copy_(out)
    return y


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    silu: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused ``silu?((group_norm(x) * weight + bias) * (1 + scale) + shift)``, forward only.

    Args:
        x: [N, C, *spatial] (fp16/bf16/fp32/fp64), any strides; NCHW-contiguous and
            channels-last run without a copy.
        num_groups: number of groups G; must divide C.
        weight, bias: optional [C] affine parameters (x's dtype and device).
        eps: added to the biased variance, as torch.nn.GroupNorm.
        scale, shift: optional [N, C] (or [N, C, 1, ...]) per-sample modulation from the time
            embedding (ADM's AdaGN: y * (1 + scale) + shift), x's dtype and device.
        silu: apply SiLU last.
        backend: "auto", "reference", "cpu", "cuda" or "triton" (see `fastdiff info`).

    Returns:
        A new tensor with x's shape, dtype and layout. Statistics are computed in fp32 (fp64
        for fp64 data); x is never modified.
    """
    weight, bias, eps, scale, shift = _validate(x, num_groups, weight, bias, eps, scale, shift,
                                                silu)
    if traced(x):
        return torch.ops.fastdiff.group_norm(x, num_groups, weight, bias, eps, scale, shift, silu,
                                             backend)
    return _run(x, num_groups, weight, bias, eps, scale, shift, silu, backend)


# torch.library registration: torch.compile traces this instead of the Python above.
@torch.library.custom_op("fastdiff::group_norm", mutates_args=())
def _group_norm_op(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
    eps: float, scale: torch.Tensor | None, shift: torch.Tensor | None, silu: bool, backend: str,
) -> torch.Tensor:
    return _run(x, num_groups, weight, bias, eps, scale, shift, silu, backend)


@_group_norm_op.register_fake
def _(x, num_groups, weight, bias, eps, scale, shift, silu, backend):
    return torch.empty_like(x)
