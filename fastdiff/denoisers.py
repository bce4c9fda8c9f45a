"""Model parameterisations as k-diffusion denoisers, and classifier-free guidance.

Internally every solver sees a *denoiser* `model(x, sigma, **cond) -> E[x0 | x]` in the VE
coordinates of k-diffusion / Karras et al. 2022 (arXiv:2206.00364): `x = x0 + sigma * eps`.
Networks are trained in other spaces and predict other targets; each wrapper here converts with
one affine map (EDM Eq. 7, Table 1)

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma)),

so the fused engine only needs the three coefficients per stage: `Denoiser.scalings(sigma)`
returns them in float64. Coefficients per prediction target (sigma_d = `sigma_data`):

    epsilon  VP network, x_vp = x / sqrt(1 + sigma^2) (Ho et al. 2020):
             c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(1 + sigma^2)
    v        v = alpha eps - sigma_vp x0 (Salimans & Ho 2022, arXiv:2202.00512, Sec. 4):
             c_skip = sigma_d^2 / (sigma^2 + sigma_d^2),
             c_out = -sigma sigma_d / sqrt(sigma^2 + sigma_d^2),
             c_in = 1 / sqrt(sigma^2 + sigma_d^2)            (k-diffusion's VDenoiser)
    x0       "sample" prediction from the VP input:
             c_skip = 0, c_out = 1, c_in = 1 / sqrt(1 + sigma^2)
    edm      Karras et al. 2022, Table 1: c_skip = sigma_d^2 / (sigma^2 + sigma_d^2),
             c_out = sigma sigma_d / sqrt(sigma^2 + sigma_d^2),
             c_in = 1 / sqrt(sigma^2 + sigma_d^2), c_noise = log(sigma) / 4
    flow     velocity v = eps - x0 in x_s = (1 - s) x0 + s eps (Liu et al. 2022, arXiv:2209.03003;
             Lipman et al. 2023). With s = sigma / (1 + sigma), x_s = x / (1 + sigma) and
             x0 = x_s - s v:  c_skip = 1 / (1 + sigma), c_out = -sigma / (1 + sigma),
             c_in = 1 / (1 + sigma)

The network's time input is, by default, the VE sigma (epsilon / v / x0), c_noise = log(sigma) / 4
(edm) or s (flow). With a `schedule` (fastdiff.schedules) it is `schedule.t(sigma)`: for a
discrete DDPM table (`DiscreteVPSchedule`, `Denoiser.from_alphas_cumprod`) the fractional
timestep of k-diffusion's `DiscreteSchedule.sigma_to_t` (log-linear interpolation in the table),
for `FlowSchedule` t = N s as diffusers. Any other mapping is a `timestep` callable.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .schedules import DiscreteVPSchedule, NoiseSchedule, flow_to_sigma, sigma_to_flow

__all__ = [
    "PREDICTIONS",
    "check_denoised",
    "ThresholdedDenoiser",
    "Denoiser",
    "EpsDenoiser",
    "VDenoiser",
    "X0Denoiser",
    "EDMDenoiser",
    "FlowDenoiser",
    "CFGDenoiser",
    "ve_to_flow",
    "flow_to_ve",
]

PREDICTIONS = ("epsilon", "v", "x0", "edm", "flow")

_F64 = torch.float64


# ---- the parameterisations --------------------------------------------------------------------

def check_denoised(out, x: Tensor, what: str = "model", exact_dtype: bool = True) -> None:
    """A model's answer must be a tensor of x's shape and device, and of x's dtype (any float
    dtype when not `exact_dtype`): anything else broadcasts, promotes or reads the wrong memory
    silently. Host metadata only: no device sync."""
    if not isinstance(out, Tensor):
        raise TypeError(f"{what} returned {type(out).__name__}, expected a tensor like its input")
    if out.shape != x.shape:
        raise ValueError(f"{what} returned shape {tuple(out.shape)}, expected {tuple(x.shape)}"
                         " like its input")
    if out.device != x.device:
        raise ValueError(f"{what} returned a tensor on {out.device}, expected {x.device} like"
                         " its input")
    if out.dtype != x.dtype and (exact_dtype or not out.is_floating_point()):
        raise TypeError(f"{what} returned {out.dtype}, expected {x.dtype} like its input")


def _column(c: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
    """A per-sample coefficient [B] or [] as a broadcastable column for x."""
    return c.to(dtype).reshape(c.shape + (1,) * (x.ndim - c.ndim))


class Denoiser(nn.Module):
    """Wraps a network `network(c_in * x, time, **cond) -> F` as a denoiser D(x, sigma, **cond).

    Args:
        network: a callable (usually an nn.Module) taking the scaled input and its time input.
        prediction: one of "epsilon", "v", "x0", "edm", "flow" (see the module docstring).
        sigma_data: data standard deviation for "v" and "edm" (k-diffusion default 1.0; EDM 0.5).
        schedule: optional `fastdiff.schedules.NoiseSchedule` whose `t(sigma)` (or `t_from_s(s)`
            for flow) gives the network's time input, e.g. a `DiscreteVPSchedule` for a
            discrete-timestep DDPM network. Not used by "edm", whose input is c_noise.
        quantize: round a discrete timestep to the nearest table entry (k-diffusion's option).
        timestep: optional callable native noise level (float64) -> network time input; the
            native level is the VE sigma, or s = sigma / (1 + sigma) for "flow".
    """

    def __init__(self, network: Callable, prediction: str = "epsilon", *, sigma_data: float = 1.0,
                 schedule: NoiseSchedule | None = None, quantize: bool = False,
                 timestep: Callable[[Tensor], Tensor] | None = None):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if not callable(network):
            raise TypeError(f"network must be callable, got {type(network).__name__}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        if schedule is not None and timestep is not None:
            raise ValueError("pass either schedule or timestep (the network time input), not both")
        if schedule is not None and prediction == "edm":
            raise ValueError("schedule does not apply to prediction='edm' (its input is c_noise)")
        if schedule is not None and not hasattr(schedule, "t"):
            raise TypeError(f"schedule must be a fastdiff.schedules.NoiseSchedule, got "
                            f"{type(schedule).__name__}")
        self.network = network
        self.prediction = prediction
        self.sigma_data = float(sigma_data)
        self.quantize = quantize
        self.timestep = timestep
        self.schedule = schedule

    # Host-side work kept with the model by helpers (fastdiff.models.digits keeps its engines
    # and noise levels under this name): never pickled or deep-copied, since it can hold device
    # tables and CUDA graphs; a copy rebuilds it on first use.
    HOST_CACHE = "_fastdiff_host_cache"

    def __getstate__(self):
        state = super().__getstate__()
        state.pop(self.HOST_CACHE, None)
        return state

    @staticmethod
    def from_alphas_cumprod(network: Callable, alphas_cumprod: Tensor,
                            prediction: str = "epsilon", quantize: bool = False) -> Denoiser:
        """A discrete-timestep DDPM network (diffusers, CompVis): sigma_t^2 = (1 - abar) / abar."""
        return Denoiser(network, prediction, schedule=DiscreteVPSchedule(alphas_cumprod),
                        quantize=quantize)

    # -- coefficients (float64, host or device) ---------------------------------------------

    def scalings(self, sigma) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) at VE noise level(s) sigma, float64, same shape as sigma."""
        sigma = torch.as_tensor(sigma, dtype=_F64)
        one = torch.ones_like(sigma)
        sd2 = self.sigma_data**2
        if self.prediction == "epsilon":
            return one, -sigma, (1 + sigma**2).rsqrt()
        if self.prediction == "x0":
            return torch.zeros_like(sigma), one, (1 + sigma**2).rsqrt()
        if self.prediction in ("v", "edm"):
            c_in = (sigma**2 + sd2).rsqrt()
            c_out = sigma * self.sigma_data * c_in
            return sd2 / (sigma**2 + sd2), (-c_out if self.prediction == "v" else c_out), c_in
        c = 1 / (1 + sigma)  # flow: 1 - s
        return c, -sigma * c, c

    def flow_scalings(self, s) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) of the flow-space denoiser D(x_s, s), x_s = (1 - s) x0 + s eps.

        D_flow(x_s, s) = D(x_s / (1 - s), s / (1 - s)) (the VE map); for a flow network this is
        (1, -s, 1), finite at s = 1; other targets are singular at s = 1 (pure noise).
        """
        s = torch.as_tensor(s, dtype=_F64)
        if self.prediction == "flow":
            return torch.ones_like(s), -s, torch.ones_like(s)
        c_skip, c_out, c_in = self.scalings(s / (1 - s))
        return c_skip / (1 - s), c_out, c_in / (1 - s)

    def time_input(self, sigma) -> Tensor:
        """The network's time input at VE noise level(s) sigma, float64."""
        sigma = torch.as_tensor(sigma, dtype=_F64)
        if self.prediction == "flow":
            return self._flow_time(sigma_to_flow(sigma))
        if self.timestep is not None:
            return torch.as_tensor(self.timestep(sigma), dtype=_F64)
        if self.schedule is not None:
            kw = {"quantize": True} if self.quantize else {}
            return torch.as_tensor(self.schedule.t(sigma, **kw), dtype=_F64)
        if self.prediction == "edm":  # log(0) avoided: at sigma = 0, c_out = 0 hides the output
            return sigma.clamp_min(torch.finfo(_F64).tiny).log() / 4
        return sigma

    def flow_time_input(self, s) -> Tensor:
        """The network's time input at flow time(s) s (what `flow_forward` passes), float64."""
        s = torch.as_tensor(s, dtype=_F64)
        return self._flow_time(s) if self.prediction == "flow" else \
            self.time_input(flow_to_sigma(s))

    def _flow_time(self, s: Tensor) -> Tensor:
        if self.timestep is not None:
            return torch.as_tensor(self.timestep(s), dtype=_F64)
        if self.schedule is not None:  # t_from_s stays finite at s = 1 (sigma = inf)
            if hasattr(self.schedule, "t_from_s"):
                return torch.as_tensor(self.schedule.t_from_s(s), dtype=_F64)
            return torch.as_tensor(self.schedule.t(flow_to_sigma(s)), dtype=_F64)
        return s

    # -- evaluation ---------------------------------------------------------------------------

    def forward(self, x: Tensor, sigma, **cond) -> Tensor:
        """D(x, sigma) in VE coordinates; sigma a float, 0-dim or [B] tensor."""
        sigma = torch.as_tensor(sigma, dtype=_F64, device=x.device)
        return self._denoise(x, self.scalings(sigma), self.time_input(sigma), cond)

    def flow_forward(self, x: Tensor, s, **cond) -> Tensor:
        """D(x_s, s) in flow coordinates (for solvers with param == "flow")."""
        s = torch.as_tensor(s, dtype=_F64, device=x.device)
        return self._denoise(x, self.flow_scalings(s), self.flow_time_input(s), cond)

    def _denoise(self, x: Tensor, coeffs, time: Tensor, cond: dict) -> Tensor:
        # (not `_apply`: that name is nn.Module's, used by .to(), .half(), .cuda())
        if x.ndim < 1 or time.ndim > 1 or (time.ndim == 1 and time.shape[0] != x.shape[0]):
            raise ValueError(f"sigma must be a scalar or [B={x.shape[0]}], got {tuple(time.shape)}")
        # combine in at least fp32 (DESIGN.md: accumulate in fp32 whatever the storage dtype)
        acc = torch.promote_types(x.dtype, torch.float32)
        c_skip, c_out, c_in = (_column(c, x, acc) for c in coeffs)
        # the network always gets one time value per sample, as k-diffusion's sigma * s_in
        t_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        time = time.to(t_dtype).expand(x.shape[0])
        out = self.network((x * c_in).to(x.dtype), time, **cond)
        check_denoised(out, x, "the Denoiser's network", exact_dtype=False)  # any float: as fp32
        return (c_skip * x + c_out * out).to(x.dtype)


class EpsDenoiser(Denoiser):
    """Epsilon-prediction VP network (Ho et al. 2020): D = x - sigma eps(x / sqrt(1 + sigma^2))."""

    def __init__(self, network: Callable, **kwargs):
        super().__init__(network, "epsilon", **kwargs)


class VDenoiser(Denoiser):
    """v-prediction network (Salimans & Ho 2022, arXiv:2202.00512)."""

    def __init__(self, network: Callable, **kwargs):
        super().__init__(network, "v", **kwargs)


class X0Denoiser(Denoiser):
    """Network that predicts x0 from the VP input (diffusers' "sample" prediction)."""

    def __init__(self, network: Callable, **kwargs):
        super().__init__(network, "x0", **kwargs)


class EDMDenoiser(Denoiser):
    """EDM preconditioning (Karras et al. 2022, Table 1), sigma_data defaulting to 0.5."""

    def __init__(self, network: Callable, sigma_data: float = 0.5, **kwargs):
        super().__init__(network, "edm", sigma_data=sigma_data, **kwargs)


class FlowDenoiser(Denoiser):
    """Rectified-flow velocity network v = eps - x0 (Liu et al. 2022; SD3 uses timestep 1000 s)."""

    def __init__(self, network: Callable, **kwargs):
        super().__init__(network, "flow", **kwargs)


# ---- coordinate changes between VE and flow denoisers -----------------------------------------

def ve_to_flow(model: Callable) -> Callable:
    """A flow-space denoiser D_f(x_s, s) = D(x_s / (1 - s), s / (1 - s)) from a VE denoiser
    (s < 1; a `Denoiser` uses its `flow_forward`, finite at s = 1 for flow networks)."""
    if isinstance(model, Denoiser):
        return model.flow_forward

    def flow_model(x: Tensor, s, **cond) -> Tensor:
        s = torch.as_tensor(s, dtype=_F64, device=x.device)
        scale = _column(1 / (1 - s), x, x.dtype)
        return model(x * scale, (s / (1 - s)).to(x.dtype), **cond)

    return flow_model


def flow_to_ve(model: Callable) -> Callable:
    """A VE denoiser D(x, sigma) = D_f(x / (1 + sigma), sigma / (1 + sigma)) from a flow one."""

    def ve_model(x: Tensor, sigma, **cond) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=_F64, device=x.device)
        scale = _column(1 / (1 + sigma), x, x.dtype)
        return model(x * scale, (sigma / (1 + sigma)).to(x.dtype), **cond)

    return ve_model


# ---- classifier-free guidance ----------------------------------------------------------------

def _cat(uncond, cond, where: str = ""):
    """[uncond; cond] along the batch: the two halves of one guided call."""
    if isinstance(cond, dict):
        if not isinstance(uncond, dict) or uncond.keys() != cond.keys():
            raise ValueError("uncond must be a dict with the same keys as cond")
        return {k: _cat(uncond[k], cond[k], f"[{k!r}]") for k in cond}
    if not isinstance(cond, Tensor) or not isinstance(uncond, Tensor):
        bad = cond if not isinstance(cond, Tensor) else uncond
        raise TypeError(f"cond and uncond must be tensors or dicts of tensors, got"
                        f" {type(bad).__name__}")
    if uncond.shape != cond.shape:  # else the halves and x's rows no longer line up
        raise ValueError(f"uncond{where} has shape {tuple(uncond.shape)}, expected"
                         f" {tuple(cond.shape)} like cond{where}")
    return torch.cat([uncond, cond])


class CFGDenoiser(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598, Eq. 6):

        D = D_u + scale * (D_c - D_u),

    with the unconditional and conditional halves batched into ONE call of the inner denoiser
    (torch.cat along the batch). Guidance is linear, so guiding D equals guiding the network
    output F (same c_skip, c_out for both halves). Called as model(x, sigma, cond=..., uncond=...);
    cond/uncond are tensors or dicts of tensors, passed to the inner denoiser as `cond_key`.
    """

    def __init__(self, denoiser: Callable, scale: float, cond_key: str = "cond"):
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or \
                not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        self.inner_model = denoiser
        self.scale = float(scale)
        self.cond_key = cond_key

    def weights(self) -> tuple[float, float]:
        """(w_uncond, w_cond) with D = w_uncond * D_u + w_cond * D_c, for the fused engine."""
        return 1.0 - self.scale, self.scale

    def forward(self, x: Tensor, sigma, cond=None, uncond=None, **kwargs) -> Tensor:
        return self.denoise_with_uncond(x, sigma, cond, uncond, **kwargs)[0]

    def denoise_with_uncond(self, x: Tensor, sigma, cond=None, uncond=None,
                            **kwargs) -> tuple[Tensor, Tensor]:
        """(D, D_u) of one batched call: the guided and the unconditional denoised outputs.
        CFG++ samplers (Chung et al. 2024, arXiv:2406.08070) renoise with D_u."""
        if cond is None:
            raise ValueError("CFGDenoiser needs the conditioning: pass cond=... (got None)")
        if uncond is None:
            raise ValueError("CFGDenoiser needs the unconditional embedding: pass uncond=... "
                             "(got None)")
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma_in = torch.cat([sigma, sigma]) if sigma.ndim else sigma
        both = self.inner_model(torch.cat([x, x]), sigma_in,
                                **{self.cond_key: _cat(uncond, cond)}, **kwargs)
        d_u, d_c = both.chunk(2)
        return d_u + self.scale * (d_c - d_u), d_u


# ---- thresholding of the denoised prediction -------------------------------------------------

class ThresholdedDenoiser(nn.Module):
    """Dynamic thresholding (Saharia et al. 2022, Imagen, arXiv:2205.11487, Sec. 2.3) and static
    clipping of the denoised prediction x0 = D(x, sigma), as diffusers' schedulers do with
    `thresholding=True` / `clip_sample=True`; works with every solver and the fused engine.

    Dynamic: s = quantile(|x0|, ratio) per sample, clamped to [1, max_value]; x0 is clipped to
    [-s, s] and divided by s. Static: x0 is clamped to [-clip, clip] (applied after).
    """

    def __init__(self, denoiser: Callable, *, dynamic_ratio: float | None = 0.995,
                 max_value: float = 1.0, clip: float | None = None):
        super().__init__()
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable, got {type(denoiser).__name__}")
        if dynamic_ratio is not None and not 0 < dynamic_ratio <= 1:
            raise ValueError(f"dynamic_ratio must be in (0, 1], got {dynamic_ratio}")
        if not max_value >= 1:
            raise ValueError(f"max_value must be >= 1, got {max_value}")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be positive, got {clip}")
        self.inner_model, self.dynamic_ratio = denoiser, dynamic_ratio
        self.max_value, self.clip = float(max_value), clip

    def forward(self, x: Tensor, sigma, **cond) -> Tensor:
        return self._threshold(self.inner_model(x, sigma, **cond))

    def denoise_with_uncond(self, x: Tensor, sigma, **cond) -> tuple[Tensor, Tensor]:
        """(thresholded D, D_u) for CFG++: only the guided prediction is thresholded, the
        unconditional one renoises as it is (the fused kernel does the same)."""
        from fastdiff.reference.solvers._utils import denoise_with_uncond

        d, d_u = denoise_with_uncond(self.inner_model, x, sigma, **cond)
        return self._threshold(d), d_u

    def _threshold(self, d: Tensor) -> Tensor:
        if self.dynamic_ratio is not None:
            # quantile needs fp32 or fp64 (as diffusers upcasts); per-sample over all other dims
            acc = torch.promote_types(d.dtype, torch.float32)
            flat = d.reshape(d.shape[0], -1).to(acc)
            s = torch.quantile(flat.abs(), self.dynamic_ratio, dim=1)
            s = s.clamp(min=1.0, max=self.max_value).reshape(-1, *([1] * (d.ndim - 1)))
            d = (torch.clamp(d.to(acc), -s, s) / s).to(d.dtype)
        if self.clip is not None:
            d = d.clamp(-self.clip, self.clip)
        return d
