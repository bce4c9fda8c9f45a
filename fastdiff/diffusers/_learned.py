"""Learned variances in the drop-ins (`variance_type="learned"` / `"learned_range"`).

A network that predicts its variance (Nichol & Dhariwal 2021, arXiv:2102.09672, Sec. 3.1;
DeepFloyd IF, unCLIP) returns twice the sample's channels: the mean's parameterisation, then v.
diffusers uses v two ways:

- DPM-Solver (multi- and singlestep) keeps only the mean: `model_output[:, :3]` for epsilon
  prediction ("slice"). That is a view; the step stays linear and fully fused.
- DDPM ("ddpm") and unCLIP ("unclip", its `learned_range` from the step's own beta at
  `prev_timestep`) draw their noise with a per-element std: `learned_range` interpolates the log
  variance, log var = frac log beta_t + (1 - frac) log beta~_t with frac = (v + 1) / 2 (their
  eq. 15), so std = exp(log var / 2) = exp(a_t + b_t v) with a_t = (log beta_t + log beta~_t) / 4
  and b_t = (log beta_t - log beta~_t) / 4; `learned` takes std = sqrt(v). The mean does not
  depend on the variance type, so the step is traced with `fixed_small` (unCLIP:
  `fixed_small_log`) and then the noise
  term's coefficient is set to 1 and its input to std * z: one fused launch still forms the
  whole update, after three elementwise ops form std * z (no host sync).
"""

from __future__ import annotations

import torch

LEARNED = ("learned", "learned_range")


def mode(scheduler) -> str | None:
    """The class's learned-variance handling ("slice" / "ddpm"), when its config asks for it."""
    kind = type(scheduler)._fd_learned
    return kind if kind and scheduler.config.get("variance_type") in LEARNED else None


def trace_overrides(scheduler) -> dict:
    """Config overrides of the twin that is traced: the same step without the variance output."""
    kind = mode(scheduler)
    if kind == "slice":
        return {"variance_type": None}
    if kind == "ddpm":
        return {"variance_type": "fixed_small"}
    if kind == "unclip":
        return {"variance_type": "fixed_small_log"}
    return {}


def split(scheduler, model_output: torch.Tensor, sample: torch.Tensor):
    """(the mean's model output, v or None), as diffusers' step splits them."""
    if mode(scheduler) == "slice":
        if scheduler.config.prediction_type == "epsilon":
            return model_output[:, :3], None
        return model_output, None
    channels = sample.shape[1] if sample.dim() > 1 else -1
    doubled = model_output.dim() >= 2 and model_output.shape[1] == 2 * channels
    if mode(scheduler) == "unclip" and not doubled:  # as diffusers: then no v (its last step
        return model_output, None  # needs none; the others raise in scaled_noise, as in it)
    if not doubled:
        raise ValueError(f"model_output must have twice the sample's channels (the mean, then"
                         f" the predicted variance) for variance_type="
                         f"{scheduler.config.variance_type!r}, got shape"
                         f" {tuple(model_output.shape)} for a sample of shape"
                         f" {tuple(sample.shape)}")
    return model_output.split(channels, dim=1)


def retarget_noise(scheduler, twin, plan, timestep, kwargs: dict) -> None:
    """DDPM / unCLIP: the traced (fixed) noise coefficient becomes 1 and the plan records how
    step() scales the draw: ("exp", a_t, b_t) or ("sqrt",). a_t and b_t come from diffusers'
    own float32 logs (`_get_variance` of the twin, which has the user's schedule; unCLIP's at
    the step's `prev_timestep`, its log variance at v = -1 and v = 1: exactly min_log and
    max_log, as frac is 0 and 1 there)."""
    noisy = False
    for chunk in plan.chunks:
        for col, source in enumerate(chunk.sources):
            if source[0] == "noise":
                chunk.coef[..., col] = (chunk.coef[..., col] != 0).to(chunk.coef.dtype)
                noisy = True
    if not noisy:  # the last step (t = 0) adds no noise
        return
    if scheduler.config.variance_type == "learned":
        plan.learned = ("sqrt",)
        return
    if type(scheduler)._fd_learned == "unclip":
        def log_var(v):
            return float(twin._get_variance(timestep, prev_timestep=kwargs.get("prev_timestep"),
                                            predicted_variance=torch.tensor(v),
                                            variance_type="learned_range"))

        min_log, max_log = log_var(-1.0), log_var(1.0)
        plan.learned = ("exp", 0.25 * (max_log + min_log), 0.25 * (max_log - min_log))
        return
    min_log = float(torch.log(twin._get_variance(timestep, variance_type="fixed_small")))
    max_log = float(twin._get_variance(timestep, variance_type="fixed_large_log"))
    plan.learned = ("exp", 0.25 * (max_log + min_log), 0.25 * (max_log - min_log))


def scaled_noise(learned: tuple, v: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """std(v) * noise. For `learned`, diffusers' sqrt(v) is NaN where v < 0; here the std is 0
    there (finite, like every drop-in where diffusers is not)."""
    if v is None:
        raise ValueError("model_output must have twice the sample's channels (the mean, then the"
                         " predicted variance) for variance_type='learned_range' at a step"
                         " that adds noise")
    if learned[0] == "sqrt":
        return v.to(noise.dtype).clamp(min=0).sqrt_().mul_(noise)
    _, a, b = learned
    return v.to(noise.dtype).mul(b).add_(a).exp_().mul_(noise)
