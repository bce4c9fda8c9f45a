"""An exact Gaussian-mixture data model: closed-form denoiser, score, density and ODE solutions.

The data distribution is an isotropic-component mixture in R^d,

    p0(x0) = sum_k w_k N(x0; mu_k, s_k^2 I).

Every noising used in fastdiff is linear, x = alpha * x0 + sigma * eps with eps ~ N(0, I):
VE / k-diffusion (alpha = 1), VP (alpha = 1 / sqrt(1 + sigma_ve^2), sigma = alpha * sigma_ve) and
rectified flow (alpha = 1 - s, sigma = s). Gaussians are closed under that map, so the noisy
marginal is again a mixture,

    p(x) = sum_k w_k N(x; alpha mu_k, v_k I),   v_k = alpha^2 s_k^2 + sigma^2,

and the posterior mean (the ideal denoiser, Tweedie / Bayes for a Gaussian prior) is

    E[x0 | x] = sum_k r_k(x) [mu_k + alpha s_k^2 / v_k (x - alpha mu_k)],
    r_k(x)    = w_k N(x; alpha mu_k, v_k I) / p(x)   (the posterior responsibilities).

All of it is computed in float64 with a log-sum-exp over components, so it is exact to rounding at
every noise level, including sigma = 0 (returns x) and sigma = 1e4. This model is the ground truth
for the convergence-order and distribution tests (Karras et al. 2022, arXiv:2206.00364, use the
same ideal-denoiser construction, Sec. 2 and Appendix B.3).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["GaussianMixture"]


def _as_batch(v, batch: int, name: str, device: torch.device) -> Tensor:
    """A scalar, 0-dim, [1] or [B]-shaped noise level as a float64 column [B or 1, 1] on x's
    device (a Python number is filled in there: no host-to-device copy)."""
    if isinstance(v, int | float):
        return torch.full((1, 1), float(v), dtype=torch.float64, device=device)
    t = torch.as_tensor(v, dtype=torch.float64).to(device)
    if t.numel() == 1:
        return t.reshape(1, 1)
    if t.numel() != batch:
        raise ValueError(f"{name} must be a scalar or have one entry per batch element "
                         f"({batch}), got shape {tuple(t.shape)}")
    return t.reshape(batch, 1)


class GaussianMixture:
    """Mixture of K isotropic Gaussians in R^d with exact noisy-data quantities.

    Args:
        means: [K, d] component means.
        stds: [K] component standard deviations (> 0), or one float for all components.
        weights: [K] mixture weights (normalised here), default uniform.

    `x` arguments may be [B, d] or [B, *shape] with prod(shape) == d (flattened internally).
    Noise levels may be Python floats, 0-dim tensors or [B] tensors (one per batch element).
    """

    def __init__(self, means: Tensor, stds: Tensor | float, weights: Tensor | None = None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2 or not bool(torch.isfinite(means).all()):
            raise ValueError(f"means must be a finite [K, d] tensor, got {tuple(means.shape)}")
        k = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64).flatten()
        if stds.numel() == 1:
            stds = stds.expand(k).clone()
        if stds.shape != (k,) or not bool((stds > 0).all()):
            raise ValueError(f"stds must be a positive float or a [K={k}] tensor of positives")
        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64).flatten()
        if weights.shape != (k,) or not bool((weights > 0).all()):
            raise ValueError(f"weights must be a [K={k}] tensor of positive values")
        self.means = means
        self.stds = stds
        self.weights = weights / weights.sum()
        self.dim = means.shape[1]
        self._on_device: dict = {}

    # ---- construction -------------------------------------------------------------------------

    @staticmethod
    def default(d: int = 2, dtype: torch.dtype = torch.float64) -> GaussianMixture:
        """A fixed 4-component mixture: separated modes, unequal weights and widths.

        The widths (0.4-0.7) keep the probability-flow ODE non-stiff down to sigma ~ 0.05 so that
        convergence orders are measurable with a few dozen steps; the unequal weights and widths
        make the denoiser genuinely nonlinear (a single Gaussian would make every solver exact).
        `dtype` is accepted for interface symmetry; the parameters are kept in float64.
        """
        del dtype
        if d < 1:
            raise ValueError(f"d must be a positive integer, got {d}")
        means_2d = torch.tensor([[-2.0, -1.0], [2.0, -0.5], [0.0, 2.0], [1.5, 1.5]])
        if d == 1:
            means = torch.tensor([[-2.5], [-0.5], [1.5], [3.5]])
        elif d == 2:
            means = means_2d
        else:  # embed the 2-D layout and spread the other coordinates deterministically
            g = torch.Generator().manual_seed(0)
            rest = torch.randn(4, d - 2, generator=g, dtype=torch.float64)
            means = torch.cat([means_2d.double(), rest], dim=1)
        stds = torch.tensor([0.4, 0.6, 0.5, 0.7])
        weights = torch.tensor([0.3, 0.2, 0.35, 0.15])
        return GaussianMixture(means, stds, weights)

    # ---- moments and sampling ---------------------------------------------------------------

    @property
    def mean(self) -> Tensor:
        """Mixture mean sum_k w_k mu_k, [d] float64."""
        return self.weights @ self.means

    def covariance(self, sigma: float = 0.0) -> Tensor:
        """Covariance of x0 + sigma * eps (law of total covariance), [d, d] float64."""
        m = self.mean
        within = (self.weights * self.stds**2).sum() + sigma**2
        centred = self.means - m
        between = (self.weights[:, None] * centred).T @ centred
        return between + within * torch.eye(self.dim, dtype=torch.float64)

    def sample(self, n: int, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float64, sigma: float = 0.0) -> Tensor:
        """Exact samples of x0 (or of x0 + sigma * eps when sigma > 0), shape [n, d]."""
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[comp] + self.stds[comp, None] * z
        if sigma:
            x = x + sigma * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return x.to(dtype)

    # ---- the general x = alpha * x0 + sigma * eps posterior ----------------------------------

    def _params(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(means, stds, weights) on x's device, copied there once (per fake mode for fake
        tensors, which cannot be shared between modes)."""
        key = (x.device, getattr(x, "fake_mode", None))
        if key not in self._on_device:
            self._on_device[key] = tuple(t.to(x.device) for t in (self.means, self.stds,
                                                                  self.weights))
        return self._on_device[key]

    def _flatten(self, x: Tensor) -> Tensor:
        if x.ndim < 2 or x[0].numel() != self.dim:
            raise ValueError(f"x must have shape [B, d={self.dim}] or [B, *shape] with "
                             f"prod(shape) == {self.dim}, got {tuple(x.shape)}")
        return x.reshape(x.shape[0], self.dim).to(torch.float64)

    def _posterior(self, x: Tensor, alpha: Tensor, sigma: Tensor):
        """log p(x), responsibilities r [B, K] and variances v [B or 1, K] for x = a x0 + s eps."""
        means, stds, weights = self._params(x)
        var = alpha**2 * stds**2 + sigma**2  # [B or 1, K]
        diff = x[:, None, :] - alpha[:, :, None] * means  # [B, K, d]
        sq = (diff**2).sum(-1)  # [B, K]
        log_comp = (weights.log() - 0.5 * sq / var
                    - 0.5 * self.dim * torch.log(2 * math.pi * var))
        log_p = torch.logsumexp(log_comp, dim=-1)
        return log_p, torch.exp(log_comp - log_p[:, None]), var, diff

    def posterior_mean(self, x: Tensor, alpha, sigma) -> Tensor:
        """E[x0 | alpha * x0 + sigma * eps = x] for any linear noising (VE, VP, flow)."""
        shape, dtype = x.shape, x.dtype
        xf = self._flatten(x)
        a = _as_batch(alpha, xf.shape[0], "alpha", xf.device)
        s = _as_batch(sigma, xf.shape[0], "sigma", xf.device)
        _, r, var, diff = self._posterior(xf, a, s)
        # Per-component Gaussian posterior mean, in two algebraically equal forms:
        # mu_k + alpha s_k^2 / v_k (x - alpha mu_k) = (x - sigma^2 / v_k (x - alpha mu_k)) / alpha.
        # The second returns x exactly at sigma = 0; the first stays finite at alpha = 0 (flow s=1).
        means, stds, _ = self._params(xf)
        shrink = (r * s**2 / var)[:, :, None] * diff  # [B, K, d]
        near_data = (xf - shrink.sum(1)) / a.clamp_min(0.5)
        near_noise = (r[:, :, None] * (means + (a * stds**2 / var)[:, :, None] * diff))
        out = torch.where(a >= 0.5, near_data, near_noise.sum(1))
        return out.reshape(shape).to(dtype)

    def posterior_score(self, x: Tensor, alpha, sigma) -> Tensor:
        """grad_x log p(x) of the marginal of alpha * x0 + sigma * eps."""
        xf = self._flatten(x)
        a = _as_batch(alpha, xf.shape[0], "alpha", xf.device)
        s = _as_batch(sigma, xf.shape[0], "sigma", xf.device)
        _, r, var, diff = self._posterior(xf, a, s)
        out = -(r[:, :, None] * diff / var[:, :, None]).sum(1)
        return out.reshape(x.shape).to(x.dtype)

    # ---- VE / k-diffusion convention: x = x0 + sigma * eps -----------------------------------

    def denoiser(self, x: Tensor, sigma) -> Tensor:
        """Exact D(x, sigma) = E[x0 | x0 + sigma * eps = x]; sigma scalar or [B]."""
        return self.posterior_mean(x, 1.0, sigma)

    def __call__(self, x: Tensor, sigma, **kwargs) -> Tensor:
        """k-diffusion model interface; conditioning kwargs are accepted and ignored."""
        return self.denoiser(x, sigma)

    def log_prob(self, x: Tensor, sigma=0.0) -> Tensor:
        """log density of x0 + sigma * eps at x (the mixture convolved with N(0, sigma^2 I)), [B].

        Differentiable in x (autograd), float64.
        """
        xf = self._flatten(x)
        s = _as_batch(sigma, xf.shape[0], "sigma", xf.device)
        return self._posterior(xf, torch.ones_like(s), s)[0]

    def score(self, x: Tensor, sigma) -> Tensor:
        """grad_x log p_sigma(x); Tweedie: D(x, sigma) = x + sigma^2 * score."""
        return self.posterior_score(x, 1.0, sigma)

    def eps(self, x: Tensor, sigma) -> Tensor:
        """Exact E[eps | x] = (x - D) / sigma = -sigma * score (no 0/0 at sigma = 0)."""
        s = _as_batch(sigma, x.shape[0], "sigma", x.device).reshape(-1, *([1] * (x.ndim - 1)))
        return (-s * self.score(x, sigma).double()).to(x.dtype)

    def vp_denoiser(self, x_vp: Tensor, sigma) -> Tensor:
        """E[x0 | x_vp] for the VP convention x_vp = x / sqrt(1 + sigma^2) (sigma the VE level)."""
        s = _as_batch(sigma, x_vp.shape[0], "sigma", x_vp.device)
        a = 1.0 / torch.sqrt(1.0 + s**2)
        return self.posterior_mean(x_vp, a, a * s)

    # ---- rectified flow: x_s = (1 - s) x0 + s eps, s in [0, 1] -------------------------------

    def flow_denoiser(self, x: Tensor, s) -> Tensor:
        """Exact E[x0 | x_s = x]; s = 0 returns x, s = 1 returns the mixture mean."""
        st = _as_batch(s, x.shape[0], "s", x.device)
        return self.posterior_mean(x, 1.0 - st, st)

    def flow_velocity(self, x: Tensor, s) -> Tensor:
        """Exact E[eps - x0 | x_s = x] = (x - D) / s, written as -s * score - D (finite at s=0)."""
        st = _as_batch(s, x.shape[0], "s", x.device)
        score = self.posterior_score(x, 1.0 - st, st).double()
        d = self.posterior_mean(x, 1.0 - st, st).double()
        col = st.reshape(-1, *([1] * (x.ndim - 1)))
        return (-col * score - d).to(x.dtype)

    # ---- exact ODE solutions (tests; scipy imported lazily) ---------------------------------

    def ode_solution(self, x: Tensor, sigma_from: float, sigma_to: float,
                     rtol: float = 1e-12, atol: float = 1e-12) -> Tensor:
        """Probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma = -sigma * score (Karras
        et al. 2022, Eq. 4 with s(t) = 1, sigma(t) = t), solved with scipy's DOP853."""

        def rhs(sigma: float, y: Tensor) -> Tensor:
            return -sigma * self.score(y, sigma)

        return self._solve(rhs, x, sigma_from, sigma_to, rtol, atol)

    def flow_ode_solution(self, x: Tensor, s_from: float, s_to: float,
                          rtol: float = 1e-12, atol: float = 1e-12) -> Tensor:
        """Rectified-flow ODE dx/ds = E[eps - x0 | x_s] (Liu et al. 2022, arXiv:2209.03003),
        solved with scipy's DOP853."""
        return self._solve(lambda s, y: self.flow_velocity(y, s), x, s_from, s_to, rtol, atol)

    @staticmethod
    def _solve(rhs, x: Tensor, t0: float, t1: float, rtol: float, atol: float) -> Tensor:
        import numpy as np
        from scipy.integrate import solve_ivp

        shape, dtype = x.shape, x.dtype

        def f(t, y):
            yt = torch.from_numpy(y).reshape(shape)
            return rhs(float(t), yt).double().reshape(-1).numpy()

        y0 = x.detach().to(torch.float64).reshape(-1).cpu().numpy()
        sol = solve_ivp(f, (float(t0), float(t1)), y0, method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"reference ODE solve failed: {sol.message}")
        return torch.from_numpy(np.ascontiguousarray(sol.y[:, -1])).reshape(shape).to(dtype)
