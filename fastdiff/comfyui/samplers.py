"""ComfyUI's samplers (`fastdiff.comfyui.sample_<name>`, `SAMPLER_NAMES`) on fastdiff's reference
solvers, with ComfyUI's signatures, option names, defaults and numbers
(comfy/k_diffusion/sampling.py and comfy/samplers.py, read, not copied: GPL-3.0).

    from fastdiff import comfyui
    x = comfyui.sample_euler_ancestral(model, noise * sigmas[0], sigmas)          # EPS model
    x = comfyui.sample_dpmpp_2m_sde(flux_like, noise, sigmas, model_kind="flow")  # CONST model

`model(x, sigma * s_in, **extra_args)` is a denoiser, as in ComfyUI. The **model kind** is
explicit: ComfyUI branches on `isinstance(model_sampling, comfy.model_sampling.CONST)` (flow
models: Flux, SD3, Wan, with flow times s in [0, 1] as sigmas); here it is the keyword
`model_kind` ("ve": EPS / V_PREDICTION / EDM model samplings, "flow": CONST; ComfyUI's class names
"eps", "v_prediction", "edm", "const" are accepted too), else `model.model_kind`, else the kind of
`model.model_sampling` (`fastdiff.comfyui.ModelSampling.kind`, or a ComfyUI object whose class
is CONST), else "ve". `first_sigma` (SDE samplers on flow models) is ComfyUI's
`model_sampling.percent_to_sigma(1e-4)`, taken from the model when it has one.

`sa_solver` / `sa_solver_pece` take their interval of stochasticity from the model's schedule
as ComfyUI does: tau = `eta` (1) from `percent_to_sigma(sde_start_percent)` (0.2) down to
`percent_to_sigma(sde_end_percent)` (0.8), the options of ComfyUI's SamplerSASolver node, or
`tau_func`; the model's own `model_sampling.percent_to_sigma`, a fastdiff schedule there, or
else ComfyUI's default model sampling of the kind (`percent_to_sigma`).

The CFG++ names (`*_cfg_pp`) need the unconditional prediction: a guided denoiser
(`fastdiff.denoisers.CFGDenoiser`) or a model with `denoise_with_uncond(x, sigma,
**extra_args) -> (D, D_u)`; any other model is a TypeError naming what is missing (ComfyUI reads
D_u from its CFG function).

`extra_args["seed"]` seeds the default noise sampler as ComfyUI does and is not passed to the
model. Every name here has a registered reference solver (`fastdiff.reference.solvers.SOLVERS`,
so `fastdiff.Sampler` runs it as a fused plan), except dpm_adaptive: its steps depend on the
data, so it has no plan, and `fastdiff.adaptive.sample_dpm_adaptive` runs each attempted step as
fused kernel launches (option `backend`, "auto" as in `fastdiff.Sampler`); dpm_fast is the
entry "dpm_fast" (ComfyUI's wrapper: n = len(sigmas) - 1 calls from sigmas[0] to the last
positive sigma). Where ComfyUI draws random numbers it never uses (heunpp2, res_multistep at
eta = 0, the ancestral samplers at eta = 0) nothing is drawn: global RNG state after a run can
differ from ComfyUI's, the samples do not.
README lists every difference from `fastdiff.k_diffusion`.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch

__all__ = ["SAMPLER_NAMES", "percent_to_sigma", "resolve_model_kind"]

_S = "fastdiff.reference.solvers"

# ComfyUI name -> (module, function, fixed options, model-kind-dependent?)
_SPECS = {
    "euler": ("euler", "sample_euler", {}, False),
    "euler_cfg_pp": ("euler", "sample_euler", {"cfg_pp": True}, True),
    "euler_ancestral": ("euler", "sample_euler_ancestral", {}, True),
    "euler_ancestral_cfg_pp": ("euler", "sample_euler_ancestral", {"cfg_pp": True}, True),
    "heun": ("euler", "sample_heun", {}, False),
    "heunpp2": ("euler", "sample_heunpp2", {}, False),
    "exp_heun_2_x0": ("exponential", "sample_seeds_2",
                      {"eta": 0.0, "s_noise": 0.0, "r": 1.0, "noise_sampler": None}, True),
    "exp_heun_2_x0_sde": ("exponential", "sample_seeds_2", {"r": 1.0}, True),
    "dpm_2": ("euler", "sample_dpm_2", {}, False),
    "dpm_2_ancestral": ("euler", "sample_dpm_2_ancestral", {}, True),
    "lms": ("lms", "sample_lms", {"denoise_final": True}, False),
    "dpm_fast": ("dpm_solver", "sample_dpm_fast_sigmas", {}, False),
    "dpm_adaptive": ("fastdiff.adaptive", "sample_dpm_adaptive", {}, False),
    "dpmpp_2s_ancestral": ("dpmpp", "sample_dpmpp_2s_ancestral", {}, True),
    "dpmpp_2s_ancestral_cfg_pp": ("dpmpp", "sample_dpmpp_2s_ancestral", {"cfg_pp": "comfyui"},
                                  False),
    "dpmpp_sde": ("dpmpp", "sample_dpmpp_sde", {}, True),
    "dpmpp_sde_gpu": ("dpmpp", "sample_dpmpp_sde", {}, True),
    "dpmpp_2m": ("dpmpp", "sample_dpmpp_2m", {}, False),
    "dpmpp_2m_cfg_pp": ("dpmpp", "sample_dpmpp_2m", {"cfg_pp": True}, False),
    "dpmpp_2m_sde": ("dpmpp", "sample_dpmpp_2m_sde", {}, True),
    "dpmpp_2m_sde_gpu": ("dpmpp", "sample_dpmpp_2m_sde", {}, True),
    "dpmpp_2m_sde_heun": ("dpmpp", "sample_dpmpp_2m_sde", {}, True),
    "dpmpp_2m_sde_heun_gpu": ("dpmpp", "sample_dpmpp_2m_sde", {}, True),
    "dpmpp_3m_sde": ("dpmpp", "sample_dpmpp_3m_sde", {}, True),
    "dpmpp_3m_sde_gpu": ("dpmpp", "sample_dpmpp_3m_sde", {}, True),
    "ddpm": ("ddim", "sample_ddpm", {}, False),
    "lcm": ("ddim", "sample_lcm", {}, True),
    "ipndm": ("pndm", "sample_ipndm", {"denoise_final": True}, False),
    "ipndm_v": ("pndm", "sample_ipndm", {"weights": "diff_sampler", "denoise_final": True},
                False),
    "deis": ("deis", "sample_deis", {}, False),
    "res_multistep": ("exponential", "sample_res_multistep", {"eta": 0.0}, False),
    "res_multistep_cfg_pp": ("exponential", "sample_res_multistep",
                             {"eta": 0.0, "cfg_pp": True}, False),
    "res_multistep_ancestral": ("exponential", "sample_res_multistep", {}, False),
    "res_multistep_ancestral_cfg_pp": ("exponential", "sample_res_multistep", {"cfg_pp": True},
                                       False),
    "gradient_estimation": ("euler", "sample_gradient_estimation", {}, False),
    "gradient_estimation_cfg_pp": ("euler", "sample_gradient_estimation", {"cfg_pp": True},
                                   False),
    "er_sde": ("sde", "sample_er_sde", {}, True),
    "seeds_2": ("exponential", "sample_seeds_2", {}, True),
    "seeds_3": ("sde", "sample_seeds_3", {}, True),
    "sa_solver": ("sa_solver", "sample_sa_solver", {}, True),
    "sa_solver_pece": ("sa_solver", "sample_sa_solver", {"use_pece": True}, True),
    "ddim": ("euler", "sample_euler", {}, False),  # ComfyUI: ksampler("euler")
    "uni_pc": ("unipc", "sample_unipc", {"variant": "bh1"}, False),
    "uni_pc_bh2": ("unipc", "sample_unipc", {"variant": "bh2"}, False),
}

# ComfyUI's SAMPLER_NAMES order (KSAMPLER_NAMES + ddim, uni_pc, uni_pc_bh2); a name without
# a _SPECS entry would be left out, so SAMPLER_NAMES is what works (today: all 44).
_COMFY_ORDER = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2",
    "exp_heun_2_x0", "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast",
    "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde",
    "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp",
    "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece",
    "ddim", "uni_pc", "uni_pc_bh2"]
SAMPLER_NAMES = [n for n in _COMFY_ORDER if n in _SPECS]
__all__ += [f"sample_{n}" for n in SAMPLER_NAMES]

_KIND_ALIASES = {"ve": "ve", "eps": "ve", "v_prediction": "ve", "edm": "ve", "x0": "ve",
                 "flow": "flow", "const": "flow"}


def resolve_model_kind(model, model_kind=None) -> str:
    """"ve" or "flow" for `model` (module docstring: argument, model attribute, model_sampling)."""
    if model_kind is None:
        model_kind = getattr(model, "model_kind", None)
    if model_kind is None:
        ms = getattr(model, "model_sampling", None)
        if ms is not None:
            model_kind = getattr(ms, "kind", None) or \
                ("flow" if any(c.__name__ == "CONST" for c in type(ms).__mro__) else "ve")
            if model_kind == "vp":  # a fastdiff schedule's kind (`ModelSampling.kind`)
                model_kind = "ve"
    if model_kind is None:
        return "ve"
    kind = _KIND_ALIASES.get(str(model_kind).lower()) if isinstance(model_kind, str) else None
    if kind is None:
        raise ValueError(f"model_kind: expected one of {sorted(_KIND_ALIASES)}, got "
                         f"{model_kind!r}")
    return kind


def _first_sigma(model) -> float:
    """ComfyUI's offset_first_sigma_for_snr: the flow time at percent 1e-4 of the model's
    schedule (1 - 1e-4 unshifted; a fastdiff schedule's shift counts, `percent_to_sigma`)."""
    return percent_to_sigma(model, 1e-4, "flow")


@functools.cache
def _default_model_sampling():
    """ComfyUI's ModelSamplingDiscrete without a model config: SD1.x's 1000 betas, linear in
    sqrt(beta) from 0.00085 to 0.012 (diffusers' "scaled_linear")."""
    from fastdiff.schedules.model import DiscreteVPSchedule
    from fastdiff.schedules.model_sampling import ModelSampling

    return ModelSampling.discrete(DiscreteVPSchedule.from_betas("scaled_linear", 1000, 0.00085,
                                                                0.012))


def percent_to_sigma(model, percent: float, model_kind: str) -> float:
    """ComfyUI's `model_sampling.percent_to_sigma(percent)` for `model`: the model's own
    `model_sampling.percent_to_sigma` (a ComfyUI object), else computed for a fastdiff schedule
    or `ModelSampling` as ComfyUI's class of that kind does (discrete: sigma((1 - p) 999); flow:
    the shifted time of 1 - p; EDM: log-linear between sigma_min and sigma_max), else for
    ComfyUI's default model sampling of the kind (VE: SD1.x's discrete table; flow: shift 1,
    1 - p)."""
    ms = getattr(model, "model_sampling", None)
    fn = getattr(ms, "percent_to_sigma", None)
    if fn is not None:
        return float(fn(percent))
    if percent <= 0:
        return 1.0 if model_kind == "flow" else 999999999.9
    if percent >= 1:
        return 0.0
    if ms is None:
        if model_kind == "flow":
            return 1.0 - percent
        ms = _default_model_sampling()
    from fastdiff.schedules.model_sampling import ModelSampling

    ms = ModelSampling.of(ms)
    if ms.kind == "edm":
        lo, hi = math.log(ms.sigma_min), math.log(ms.sigma_max)
        return math.exp(lo + (1.0 - percent) * (hi - lo))
    if ms.kind == "vp":
        return float(ms.sigma(torch.tensor((1.0 - percent) * 999.0, dtype=torch.float64)))
    if ms.kind == "flow":  # the time that maps to the table's last timestep, times 1 - p
        t_max = ms.timestep(torch.tensor(ms.sigma_max, dtype=torch.float64))
        return float(ms.sigma(t_max * (1.0 - percent)))
    raise TypeError(f"model.model_sampling: no percent_to_sigma and kind {ms.kind!r} is not "
                    "'vp', 'flow' or 'edm'")


def _comfy_defaults(name: str, fn, kind: str | None, model, x, sigmas, extra_args, kwargs):
    """ComfyUI's option values where they differ from the reference's defaults."""
    seed = extra_args.pop("seed", None)
    params = inspect.signature(fn).parameters
    if name.startswith("dpmpp_2m_sde_heun"):
        kwargs.setdefault("solver_type", "heun")
    if name == "deis":  # ComfyUI's option names: max_order (default 3), deis_mode ('tab')
        kwargs["order"] = kwargs.pop("max_order", 3)
        kwargs.setdefault("deis_mode", "tab")
    if name.startswith("res_multistep_ancestral"):
        kwargs.setdefault("eta", 1.0)
    if name.startswith("exp_heun_2_x0"):
        kwargs.setdefault("solver_type", "phi_2")
    if name.startswith("sa_solver"):
        # ComfyUI: tau = eta (1) between the model's percent 0.2 and 0.8 (SamplerSASolver's
        # sde_start_percent / sde_end_percent), and a last sigma > 0 returns the corrected
        # sample of the level before it
        sa_kind = kind or "ve"
        start = kwargs.pop("sde_start_percent", 0.2)
        end = kwargs.pop("sde_end_percent", 0.8)
        if "tau_func" not in kwargs:
            kwargs.setdefault("sde_start_sigma", percent_to_sigma(model, start, sa_kind))
            kwargs.setdefault("sde_end_sigma", percent_to_sigma(model, end, sa_kind))
        kwargs.setdefault("final", "corrector")
    if "model_kind" in params and kind == "flow":  # kind None: ComfyUI has no flow branch
        kwargs["model_kind"] = "flow"
        if "first_sigma" in params:
            kwargs.setdefault("first_sigma", _first_sigma(model))
    if "noise_sampler" in params and kwargs.get("noise_sampler", 0) is None:
        kwargs.pop("noise_sampler")
    if "noise_sampler" in params and "noise_sampler" not in kwargs and seed is not None:
        from fastdiff.reference.solvers._utils import (
            BrownianTreeNoiseSampler,
            default_noise_sampler,
        )

        if name.startswith(("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde")):
            positive = sigmas[sigmas > 0]
            kwargs["noise_sampler"] = BrownianTreeNoiseSampler(
                x, positive.min(), sigmas.max(), seed=seed, cpu=not name.endswith("_gpu"))
        else:
            kwargs["noise_sampler"] = default_noise_sampler(
                x, torch.Generator(x.device).manual_seed(seed))
    return kwargs


def _make(name: str):
    module, fn_name, fixed, kind_dependent = _SPECS[name]

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, *,
               model_kind=None, **options):
        import importlib

        from fastdiff.k_diffusion import _CheckedModel, reject_fixed, require_uncond

        fn = getattr(importlib.import_module(module if "." in module else f"{_S}.{module}"),
                     fn_name)
        kind = resolve_model_kind(model, model_kind)
        extra_args = dict(extra_args or {})
        reject_fixed(name, fixed, options)
        if "cfg_pp" in fixed:  # never the base sampler in disguise (D_u = D)
            require_uncond(name, model)
        kwargs = _comfy_defaults(name, fn, kind if kind_dependent is True else None, model, x,
                                 sigmas, extra_args, {**fixed, **options})
        if len(sigmas) <= 1:
            return x
        checked = _CheckedModel(model)
        if name == "dpm_adaptive":  # ComfyUI's wrapper in comfy/samplers.py
            sigma_min = sigmas[-1] if float(sigmas[-1]) > 0 else sigmas[-2]
            return fn(checked, x, sigma_min, sigmas[0], extra_args=extra_args,
                      callback=callback, disable=disable, **kwargs)
        if name.startswith("uni_pc"):
            # ComfyUI: order min(3, steps - 1), lowered at the last steps at every step count,
            # and a final sigma 0 replaced by 0.001 (it returns the sample there, not D)
            kwargs.setdefault("order", min(3, len(sigmas) - 2))
            kwargs.setdefault("lower_order_final", "always")
            if float(sigmas[-1]) == 0:
                sigmas = torch.cat([sigmas[:-1], sigmas.new_full((1,), 0.001)])
        out = fn(checked, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                 **kwargs)
        if name == "heunpp2" and options.get("s_churn", 0.0) <= 0:
            for _ in range(len(sigmas) - 1):  # ComfyUI's unused draws: same global RNG state
                torch.randn_like(x)
        return out

    sample.__name__ = sample.__qualname__ = f"sample_{name}"
    sample.__doc__ = (f"ComfyUI's `{name}` on `{_S}.{module}.{fn_name}` with "
                      f"{fixed or 'its defaults'} (module docstring: model_kind, seed).")
    return sample


@functools.cache
def _sampler(name: str):
    return _make(name)


def __getattr__(attr):
    if attr.startswith("sample_") and attr[7:] in _SPECS:
        value = _sampler(attr[7:])
        globals()[attr] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
