"""Drop-in replacement for `k_diffusion.sampling` (Crowson, github.com/crowsonkb/k-diffusion).

Same names, signatures and numbers:

    from fastdiff import k_diffusion as K      # instead of `from k_diffusion import sampling as K`
    sigmas = K.get_sigmas_karras(20, 0.002, 80.0)
    x = K.sample_dpmpp_2m(model, torch.randn(4, 3, 64, 64) * sigmas[0], sigmas)

`model(x, sigma * s_in, **extra_args)` is a denoiser (returns E[x0 | x]), as in k-diffusion.
Besides k-diffusion's samplers this module also exposes fastdiff's extra ones with the same
signature (`sample_dpmpp_3m`, `sample_unipc`, `sample_deis`, `sample_ipndm`, `sample_ddim`,
`sample_ddpm`, `sample_lcm`). Attributes are resolved lazily on first access, so importing this
module costs nothing and does not need scipy, torchsde or k-diffusion. Not provided:
`log_likelihood` (needs torchdiffeq; use k-diffusion's).
"""

from __future__ import annotations

import functools
import importlib

_SOLVERS = "fastdiff.reference.solvers"

# public name -> module that defines it
_WHERE = {
    **dict.fromkeys(
        ("get_sigmas_karras", "get_sigmas_exponential", "get_sigmas_polyexponential",
         "get_sigmas_vp"), "fastdiff.schedules.spacings"),
    **dict.fromkeys(
        ("append_dims", "append_zero", "to_d", "get_ancestral_step", "default_noise_sampler",
         "BatchedBrownianTree", "BrownianTreeNoiseSampler"), f"{_SOLVERS}._utils"),
    **dict.fromkeys(
        ("sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2",
         "sample_dpm_2_ancestral"), f"{_SOLVERS}.euler"),
    **dict.fromkeys(("sample_lms", "linear_multistep_coeff"), f"{_SOLVERS}.lms"),
    **dict.fromkeys(
        ("sample_dpm_fast", "sample_dpm_adaptive", "DPMSolver", "PIDStepSizeController"),
        f"{_SOLVERS}.dpm_solver"),
    **dict.fromkeys(
        ("sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", "sample_dpmpp_2m",
         "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_dpmpp_3m"), f"{_SOLVERS}.dpmpp"),
    "sample_unipc": f"{_SOLVERS}.unipc",
    "sample_deis": f"{_SOLVERS}.deis",
    "sample_ipndm": f"{_SOLVERS}.pndm",
    **dict.fromkeys(("sample_ddim", "sample_ddpm", "sample_lcm"), f"{_SOLVERS}.ddim"),
}

__all__ = sorted(_WHERE)


class _CheckedModel:
    """The model, its every answer checked (fastdiff.denoisers.check_denoised: x's shape, dtype
    and device; host metadata, no sync): k-diffusion would broadcast a wrong shape or promote
    another dtype (an int64 answer silently becomes a float result). Attributes pass through."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x, sigma, **kwargs):
        from fastdiff.denoisers import check_denoised

        out = self.model(x, sigma, **kwargs)
        check_denoised(out, x)
        return out

    def __getattr__(self, name):
        value = getattr(self.model, name)
        if name == "denoise_with_uncond":  # CFG++'s call: both answers are checked
            from fastdiff.denoisers import check_denoised

            def both(x, sigma, **kwargs):
                d, d_u = value(x, sigma, **kwargs)
                check_denoised(d, x)
                check_denoised(d_u, x, "model (its unconditional output)")
                return d, d_u

            return both
        return value


def _checking(sample):
    @functools.wraps(sample)
    def checked(model, *args, **kwargs):
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, sigma, **extra_args), got"
                            f" {type(model).__name__}")
        # a tuned plan (fastdiff.tuning.TunedPlan) as sigmas: its schedule in x's dtype, as
        # k-diffusion's get_sigmas_* make them (after a warning if made for another model)
        plan = kwargs.get("sigmas", args[1] if len(args) > 1 else None)
        if hasattr(plan, "check_model"):
            from fastdiff.reference.solvers import SOLVERS

            info = SOLVERS.get(plan.solver)
            same = info is not None and info.fn.__name__ == sample.__name__
            plan.check_model(model, plan.solver if same else sample.__name__)
            x = kwargs.get("x", args[0] if args else None)
            sigmas = plan.sigmas.to(x.dtype if hasattr(x, "dtype") else plan.sigmas.dtype)
            if "sigmas" in kwargs:
                kwargs["sigmas"] = sigmas
            else:
                args = (args[0], sigmas, *args[2:])
        return sample(_CheckedModel(model), *args, **kwargs)

    return checked


def __getattr__(name):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    if name.startswith("sample_"):
        value = _checking(value)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
