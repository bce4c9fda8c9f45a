"""Shared helpers for the reference solvers: the registry record, k-diffusion's small pure
helpers (same numbers as `k_diffusion.sampling`), noise samplers and input validation.

Conventions (k-diffusion / Karras et al. 2022, arXiv:2206.00364): `x = x0 + sigma * eps`, the
model is a denoiser `model(x, sigma * s_in, **extra_args) -> E[x0 | x]`, and the probability-flow
ODE is `dx/dsigma = (x - D(x, sigma)) / sigma` (EDM eq. 3 with sigma(t) = t).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "SolverInfo",
    "append_dims",
    "append_zero",
    "to_d",
    "get_ancestral_step",
    "default_noise_sampler",
    "denoise_with_uncond",
    "BatchedBrownianTree",
    "BrownianTreeNoiseSampler",
    "validate_sigmas",
    "validate_x",
    "MODEL_KINDS",
    "check_model_kind",
    "half_log_snr",
    "half_log_snr_to_sigma",
    "offset_first_sigma",
]


@dataclass(frozen=True)
class SolverInfo:
    """One registry entry: a `sample_*` function plus the facts tests need about it."""

    fn: Callable  # the sample_* function
    order: int  # theoretical convergence order (deterministic ODE mode)
    nfe_per_step: int  # model calls per step (interval)
    stochastic: bool  # True if it injects noise by default
    paper: str  # short citation, e.g. "Lu et al. 2022, DPM-Solver++ (arXiv:2211.01095)"
    kwargs: dict = field(default_factory=dict)  # kwargs that select this variant
    # kwargs that make a stochastic solver an ODE solver (e.g. {"eta": 0.0}); empty if none
    deterministic_kwargs: dict = field(default_factory=dict)
    # "ve": k-diffusion sigma, x = x0 + sigma * eps; "flow": x = (1 - s) x0 + s eps, s in [0, 1]
    param: str = "ve"


def append_dims(x: Tensor, target_dims: int) -> Tensor:
    """Appends trailing singleton dimensions to `x` until it has `target_dims` dimensions."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(
            f"append_dims: input has {x.ndim} dims but target_dims is {target_dims}, which is less"
        )
    return x[(...,) + (None,) * dims_to_append]


def append_zero(x: Tensor) -> Tensor:
    """Appends a final 0 to a 1-D sigma schedule (the clean end of sampling)."""
    return torch.cat([x, x.new_zeros([1])])


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """Converts a denoiser output to the Karras ODE derivative dx/dsigma = (x - D) / sigma."""
    if not isinstance(sigma, Tensor):
        sigma = x.new_tensor(sigma)
    return (x - denoised) / append_dims(sigma, x.ndim)


def get_ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
    """Splits an ancestral step sigma_from -> sigma_to into a deterministic step down to
    `sigma_down` plus fresh noise of std `sigma_up`, sigma_down^2 + sigma_up^2 = sigma_to^2.

    eta=1 is DDPM's posterior variance (Ho et al. 2020 eq. 7 in the VE parameterisation), eta=0
    is deterministic (DDIM, Song et al. 2021). Works on host floats or 0-d tensors; on host
    floats it never touches the device.
    """
    if not eta:
        return sigma_to, 0.0
    sigma_up = eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    if isinstance(sigma_up, Tensor):
        # torch.minimum instead of Python min(): no host sync on device tensors.
        sigma_up = torch.minimum(torch.as_tensor(sigma_to, dtype=sigma_up.dtype,
                                                 device=sigma_up.device), sigma_up)
    else:
        sigma_up = min(sigma_to, sigma_up)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def default_noise_sampler(x: Tensor, generator: torch.Generator | None = None):
    """Returns `noise_sampler(sigma, sigma_next) -> N(0, I)` shaped like `x`.

    Without `generator` it draws `torch.randn_like(x)` from the global RNG (as k-diffusion does);
    with one, draws come from that generator, which makes runs reproducible and comparable.
    """
    if generator is None:
        return lambda sigma, sigma_next: torch.randn_like(x)
    return lambda sigma, sigma_next: torch.randn(
        x.shape, generator=generator, dtype=x.dtype, device=x.device
    )


def _import_torchsde():
    try:
        import torchsde
    except ImportError as e:  # optional extra
        raise ImportError(
            "BrownianTreeNoiseSampler needs torchsde: `pip install fastdiff[sde]` "
            "(or pass your own noise_sampler)"
        ) from e
    return torchsde


class BatchedBrownianTree:
    """torchsde.BrownianTree with one tree per batch item when a list of seeds is given
    (a port of k-diffusion's class: same seeds give the same increments)."""

    def __init__(self, x: Tensor, t0, t1, seed=None, **kwargs):
        torchsde = _import_torchsde()
        t0, t1, self.sign = self.sort(t0, t1)
        w0 = kwargs.pop("w0", torch.zeros_like(x))
        if seed is None:
            # Same draw from the global RNG as k-diffusion, so seeded runs agree.
            seed = torch.randint(0, 2**63 - 1, []).item()
        self.batched = isinstance(seed, (list, tuple))
        if self.batched:
            if len(seed) != x.shape[0]:
                raise ValueError(
                    f"seed: expected one seed per batch item ({x.shape[0]}), got {len(seed)}"
                )
            w0 = w0[0]
        else:
            seed = [seed]
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s, **kwargs) for s in seed]

    @staticmethod
    def sort(a, b):
        return (a, b, 1) if a < b else (b, a, -1)

    def __call__(self, t0, t1) -> Tensor:
        t0, t1, sign = self.sort(t0, t1)
        w = torch.stack([tree(t0, t1) for tree in self.trees]) * (self.sign * sign)
        return w if self.batched else w[0]


class BrownianTreeNoiseSampler:
    """A noise sampler backed by a torchsde.BrownianTree (k-diffusion compatible).

    Returns (W(t1) - W(t0)) / sqrt|t1 - t0|, i.e. unit-variance noise that is *consistent across
    step sizes*: the same seed gives the same Brownian path whatever the sigma grid, which is what
    makes SDE samplers (DPM-Solver++ SDE, Lu et al. 2022, arXiv:2211.01095) converge as steps grow.

    Args:
        x: tensor whose shape, device and dtype the samples take.
        sigma_min, sigma_max: the valid interval.
        seed: int, or one int per batch item (one tree each). None draws one from the global RNG.
        transform: maps sigma to the tree's internal time.
        cpu: build the tree on the CPU (reproducible across devices) and move samples to x.device.
    """

    def __init__(self, x: Tensor, sigma_min, sigma_max, seed=None, transform=lambda x: x,
                 cpu: bool = False):
        self.transform = transform
        self.device = x.device
        self.cpu = cpu
        t0 = self.transform(torch.as_tensor(sigma_min))
        t1 = self.transform(torch.as_tensor(sigma_max))
        if cpu:
            x, t0, t1 = x.cpu(), t0.cpu(), t1.cpu()
        self.tree = BatchedBrownianTree(x, t0, t1, seed)

    def __call__(self, sigma, sigma_next) -> Tensor:
        t0 = self.transform(torch.as_tensor(sigma))
        t1 = self.transform(torch.as_tensor(sigma_next))
        if self.cpu:
            t0, t1 = t0.cpu(), t1.cpu()
        w = self.tree(t0, t1) / (t1 - t0).abs().sqrt()
        return w.to(self.device) if self.cpu else w


def denoise_with_uncond(model, x: Tensor, sigma, **extra_args) -> tuple[Tensor, Tensor]:
    """The guided and the unconditional denoised outputs (D, D_u) of one model call, for CFG++
    (Chung et al. 2024, arXiv:2406.08070), whose samplers renoise with D_u.

    A guided denoiser (`fastdiff.denoisers.CFGDenoiser`, or any model with a method
    `denoise_with_uncond(x, sigma, **extra_args) -> (D, D_u)`) gives both from its one batched
    call. A model without guidance is its own unconditional prediction: D_u = D, and every
    CFG++ sampler is then exactly its base sampler.
    """
    both = getattr(model, "denoise_with_uncond", None)
    if both is None:
        d = model(x, sigma, **extra_args)
        return d, d
    return both(x, sigma, **extra_args)


def validate_sigmas(sigmas) -> list[float]:
    """Checks a sigma schedule and returns it as host floats (one device sync per run).

    Expected: a 1-D floating tensor, length >= 2, finite, non-negative, non-increasing. Solvers
    take their branch decisions (e.g. "is the next sigma 0?") from the returned list, so the step
    loop never branches on device values.
    """
    if not isinstance(sigmas, Tensor):
        raise TypeError(f"sigmas: expected a 1-D torch.Tensor, got {type(sigmas).__name__}")
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas: expected a 1-D tensor of length >= 2, got shape "
                         f"{tuple(sigmas.shape)}")
    if not sigmas.is_floating_point():
        raise TypeError(f"sigmas: expected a floating dtype, got {sigmas.dtype}")
    values = sigmas.detach().double().tolist()
    if not all(v == v and abs(v) != float("inf") for v in values):
        raise ValueError("sigmas: expected finite values, got NaN or inf")
    if min(values) < 0:
        raise ValueError(f"sigmas: expected non-negative values, got min {min(values)}")
    if any(values[k + 1] > values[k] for k in range(len(values) - 1)):
        raise ValueError("sigmas: expected a non-increasing schedule (sigma_max first)")
    return values


def validate_x(x) -> None:
    """Checks the initial sample: a floating tensor with a leading batch dimension."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 1:
        raise ValueError("x: expected at least one (batch) dimension, got a 0-d tensor")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating dtype, got {x.dtype}")


# ---- model kinds (ComfyUI's `isinstance(model_sampling, CONST)` made an explicit option) ------

# "ve": k-diffusion sigma, x = x0 + sigma eps (ComfyUI's EPS / V_PREDICTION / EDM samplings);
# "flow": flow time s in [0, 1], x = (1 - s) x0 + s eps (ComfyUI's CONST: Flux, SD3, Wan).
MODEL_KINDS = ("ve", "flow")


def check_model_kind(model_kind) -> str:
    if model_kind not in MODEL_KINDS:
        raise ValueError(f"model_kind: expected one of {MODEL_KINDS}, got {model_kind!r}")
    return model_kind


def half_log_snr(sigma: Tensor, model_kind: str) -> Tensor:
    """lambda = log(alpha / sigma): -log(sigma) (VE, alpha = 1), log((1 - s) / s) (flow,
    alpha = 1 - s). The two agree under the flow -> VE map sigma_ve = s / (1 - s)."""
    return sigma.logit().neg() if model_kind == "flow" else sigma.log().neg()


def half_log_snr_to_sigma(lam: Tensor, model_kind: str) -> Tensor:
    """The inverse of `half_log_snr`: exp(-lambda) (VE), sigmoid(-lambda) (flow)."""
    return lam.neg().sigmoid() if model_kind == "flow" else lam.neg().exp()


def offset_first_sigma(sigmas: Tensor, sig: list[float], model_kind: str, first_sigma: float
                       ) -> tuple[Tensor, list[float]]:
    """For a flow model a first time s >= 1 has lambda = -inf: it is replaced by `first_sigma`
    (ComfyUI's `offset_first_sigma_for_snr`: model_sampling.percent_to_sigma(1e-4), which is
    1 - 1e-4 at shift 1). The model is then called at that time too, as in ComfyUI."""
    if model_kind != "flow" or sig[0] < 1:
        return sigmas, sig
    if not 0 < first_sigma < 1:
        raise ValueError(f"first_sigma: expected a flow time in (0, 1), got {first_sigma!r}")
    sigmas = sigmas.clone()
    sigmas[0] = first_sigma
    return sigmas, [float(first_sigma)] + sig[1:]
