"""Drop-in replacement for `k_diffusion.sampling` (Crowson, github.com/crowsonkb/k-diffusion).

Same names, signatures and numbers:

    from fastdiff import k_diffusion as K      # instead of `from k_diffusion import sampling as K`
    sigmas = K.get_sigmas_karras(20, 0.002, 80.0)
    x = K.sample_dpmpp_2m(model, torch.randn(4, 3, 64, 64) * sigmas[0], sigmas)

`model(x, sigma * s_in, **extra_args)` is a denoiser (returns E[x0 | x]), as in k-diffusion.
Besides k-diffusion's samplers this module also exposes fastdiff's extra ones with the same
signature (`sample_dpmpp_3m`, `sample_unipc`, `sample_deis`, `sample_ipndm`, `sample_ddim`,
`sample_ddpm`, `sample_lcm`), and ComfyUI's samplers that k-diffusion has no function for
(`_COMFYUI_NAMES`: heunpp2, exp_heun_2_x0(_sde), ipndm_v, res_multistep(_ancestral),
gradient_estimation, er_sde, seeds_2, seeds_3, sa_solver(_pece) and the CFG++ family). Each of
those runs fastdiff's registry entry of its name (`fastdiff.reference.solvers.SOLVERS[name]`:
the reference solver and options that `fastdiff.Sampler(model, name, sigmas)` lowers to a fused
plan, and that `fastdiff.comfyui.sample_<name>` runs with ComfyUI's defaults), with the options
ComfyUI's name fixes (`fastdiff.comfyui.samplers._SPECS`) fixed and k-diffusion's conventions:
the model kind is the argument `model_kind` ("ve", the default, or "flow") where the sampler
branches on it, never read from the model; no seed in `extra_args`; `sa_solver`'s tau is `eta`
on [sde_end_sigma, sde_start_sigma] (default: everywhere) unless `tau_func` is given;
`ipndm_v` has the exact variable-step weights and `dpmpp_2s_ancestral_cfg_pp` the paper's update
(the registry's; ComfyUI's numbers differ there, README "Solvers"). The CFG++
samplers need the unconditional prediction: a guided denoiser (`fastdiff.denoisers.CFGDenoiser`,
called with extra_args={"cond": ..., "uncond": ...}) or any model with
`denoise_with_uncond(x, sigma, **extra_args) -> (D, D_u)`. Not provided: ComfyUI's aliases
(`*_gpu`: a Brownian tree on the device, here `BrownianTreeNoiseSampler(..., cpu=False)` as
noise_sampler; `dpmpp_2m_sde_heun`: `sample_dpmpp_2m_sde(solver_type="heun")`; `uni_pc`,
`uni_pc_bh2`: ComfyUI's own order lowering and final sigma, here `sample_unipc(variant=...)`)
and `log_likelihood` (needs torchdiffeq; use k-diffusion's). `sample_dpm_adaptive` (steps
accepted on the host from an error norm, so no plan) runs every attempted step as fused kernel
launches (`fastdiff.adaptive`; keyword `backend`, "auto" as in `fastdiff.Sampler`). Attributes
are resolved lazily on first access, so importing this module costs nothing and does not need
scipy, torchsde or k-diffusion.
"""

from __future__ import annotations

import functools
import importlib
import inspect

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
        ("sample_dpm_fast", "DPMSolver", "PIDStepSizeController"), f"{_SOLVERS}.dpm_solver"),
    # data-dependent steps, no plan: each attempted step as fused lincomb launches
    "sample_dpm_adaptive": "fastdiff.adaptive",
    **dict.fromkeys(
        ("sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", "sample_dpmpp_2m",
         "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_dpmpp_3m"), f"{_SOLVERS}.dpmpp"),
    "sample_unipc": f"{_SOLVERS}.unipc",
    "sample_deis": f"{_SOLVERS}.deis",
    "sample_ipndm": f"{_SOLVERS}.pndm",
    **dict.fromkeys(("sample_ddim", "sample_ddpm", "sample_lcm"), f"{_SOLVERS}.ddim"),
}

# ComfyUI's samplers that k-diffusion lacks, each its fastdiff registry entry (module docstring)
_COMFYUI_NAMES = (
    "heunpp2", "exp_heun_2_x0", "exp_heun_2_x0_sde", "ipndm_v", "res_multistep",
    "res_multistep_ancestral", "gradient_estimation", "er_sde", "seeds_2", "seeds_3",
    "sa_solver", "sa_solver_pece", "euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2m_cfg_pp",
    "dpmpp_2s_ancestral_cfg_pp", "res_multistep_cfg_pp", "res_multistep_ancestral_cfg_pp",
    "gradient_estimation_cfg_pp")

__all__ = sorted([*_WHERE, *(f"sample_{n}" for n in _COMFYUI_NAMES)])


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


def reject_fixed(name: str, fixed, options) -> None:
    """A TypeError naming the options a sampler's name fixes, if `options` sets any."""
    bad = set(fixed) & set(options)
    if bad:
        raise TypeError(f"sample_{name}: {sorted(bad)} fixed by the sampler's name")


def require_uncond(name: str, model) -> None:
    """A TypeError naming what is missing if `model` cannot give CFG++'s unconditional
    prediction: the reference solvers would take D_u = D (`_utils.denoise_with_uncond`) and run
    the base sampler, which a CFG++ name must not do silently."""
    if not callable(getattr(model, "denoise_with_uncond", None)):
        raise TypeError(
            f"model: sample_{name} renoises with the unconditional prediction; pass a guided"
            " denoiser (fastdiff.denoisers.CFGDenoiser) or a model with"
            " denoise_with_uncond(x, sigma, **extra_args) -> (D, D_u), got"
            f" {type(getattr(model, 'model', model)).__name__} without one")


def _registry_sampler(name: str):
    """`sample_<name>` for a registry entry: its reference solver with the entry's options, those
    fixed by ComfyUI's name rejected (not in the signature), the others defaults."""
    from fastdiff.comfyui.samplers import _SPECS
    from fastdiff.reference.solvers import SOLVERS

    info = SOLVERS[name]
    fixed = set(_SPECS[name][2])
    needs_uncond = "cfg_pp" in fixed

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        reject_fixed(name, fixed, options)
        if needs_uncond:
            require_uncond(name, model)
        return info.fn(model, x, sigmas, extra_args, callback, disable,
                       **{**info.kwargs, **options})

    signature = inspect.signature(info.fn)
    sample.__signature__ = signature.replace(parameters=[
        p.replace(default=info.kwargs.get(p.name, p.default))
        for p in signature.parameters.values() if p.name not in fixed])
    sample.__name__ = sample.__qualname__ = f"sample_{name}"
    shown = {k: v for k, v in info.kwargs.items() if k in fixed} or "its defaults"
    sample.__doc__ = (f"{info.paper}.\n\n`{info.fn.__module__}.{info.fn.__name__}` with {shown}:"
                      f" fastdiff's registry entry {name!r} (`fastdiff.Sampler(model, {name!r},"
                      " sigmas)` is its fused plan); the module docstring says what differs from"
                      f" `fastdiff.comfyui.sample_{name}`.\n\n{info.fn.__doc__ or ''}")
    return sample


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
            same = plan.solver == sample.__name__[len("sample_"):] or \
                (info is not None and info.fn.__name__ == sample.__name__)
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
    if name.startswith("sample_") and name[len("sample_"):] in _COMFYUI_NAMES:
        value = _registry_sampler(name[len("sample_"):])
    elif module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    else:
        value = getattr(importlib.import_module(module), name)
    if name.startswith("sample_"):
        value = _checking(value)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
