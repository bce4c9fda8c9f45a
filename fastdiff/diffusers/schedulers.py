"""The drop-in scheduler classes: diffusers' own class (config, schedule, scale_model_input,
save/load, every public method with diffusers' signature) with the fused sync-free `step` of
_fused.FusedStepMixin, and `add_noise` / `scale_noise` (only where diffusers' class has them)
that find the timesteps' sigmas on the device (no per-sample host lookup).

`clip_sample` and dynamic `thresholding` are fused too: the clamp of x0 happens in the step
kernel's registers, and thresholding's per-sample quantile is one fused reduction launch before
it (fastdiff.ops.dynamic_threshold). A learned variance (`variance_type="learned" /
"learned_range"`: the network's extra output channels) is split off as diffusers does; DDPM's
per-element std exp(a_t + b_t v) scales the noise before the fused launch (_learned.py).
Everything else is traced, so it is fused whatever its value. Adding a class is one line here.
"""

from __future__ import annotations

import functools

import diffusers as _d

from fastdiff.diffusers import _direct, _noise
from fastdiff.diffusers._fused import FusedStepMixin

_SIGMA = {"_fd_noise_formula": _noise.SIGMA}
_ALPHA_SIGMA = {"_fd_noise_formula": _noise.ALPHA_SIGMA}
_FLOW = {"_fd_noise_formula": _noise.FLOW}
_ORDER_1_TO_3 = {"_fd_orders": (1, 3)}  # diffusers' updates exist for orders 1, 2 and 3


def fused_class(base: type, doc: str = "", **attrs) -> type:
    """A subclass of diffusers' `base` with the same name, config surface, public methods and
    signatures, and the fused sync-free `step`."""
    cls_dict = dict(_fd_base=base, __module__="fastdiff.diffusers", **attrs)
    cls_dict["__doc__"] = (f"Drop-in for `diffusers.{base.__name__}` with a fused, sync-free"
                           f" `step` (one fastdiff.ops.lincomb launch per step). {doc}")

    def wrap(name, impl):  # diffusers' signature: pipelines inspect it (retrieve_timesteps)
        @functools.wraps(getattr(base, name))
        def method(self, *args, **kwargs):
            return impl(self, *args, **kwargs)

        cls_dict[name] = method

    wrap("__init__", FusedStepMixin._fd_init)
    wrap("set_timesteps", FusedStepMixin._fd_set_timesteps)
    named = attrs.get("_fd_step_inputs") or attrs.get("_fd_step_timesteps")
    wrap("step", FusedStepMixin._fd_step_named if named else FusedStepMixin._fd_step)
    if hasattr(base, "add_noise"):
        wrap("add_noise", FusedStepMixin._fd_add_noise)
    if hasattr(base, "scale_noise"):
        wrap("scale_noise", FusedStepMixin._fd_scale_noise)
    if hasattr(base, "_init_step_index"):
        cls_dict["_init_step_index"] = FusedStepMixin._fd_init_step_index
    return type(base.__name__, (FusedStepMixin, base), cls_dict)


DDIMScheduler = fused_class(_d.DDIMScheduler,
                            doc="Step kwargs eta / use_clipped_model_output are traced per value.")
EulerDiscreteScheduler = fused_class(
    _d.EulerDiscreteScheduler, **_SIGMA,
    doc="Step kwargs s_churn / s_tmin / s_tmax / s_noise are traced per value.")
DPMSolverMultistepScheduler = fused_class(_d.DPMSolverMultistepScheduler, **_ALPHA_SIGMA,
                                          **_ORDER_1_TO_3, _fd_learned="slice")
UniPCMultistepScheduler = fused_class(_d.UniPCMultistepScheduler, **_ALPHA_SIGMA,
                                      _fd_orders=(1, None))
DDPMScheduler = fused_class(_d.DDPMScheduler, _fd_learned="ddpm")
EulerAncestralDiscreteScheduler = fused_class(_d.EulerAncestralDiscreteScheduler, **_SIGMA)
LCMScheduler = fused_class(_d.LCMScheduler)
FlowMatchEulerDiscreteScheduler = fused_class(
    _d.FlowMatchEulerDiscreteScheduler, **_FLOW, _fd_noise_f32=True,
    _fd_direct=staticmethod(_direct.flow_match_euler),
    doc="stochastic_sampling draws float32 noise like diffusers.")
HeunDiscreteScheduler = fused_class(_d.HeunDiscreteScheduler, **_SIGMA)
LMSDiscreteScheduler = fused_class(_d.LMSDiscreteScheduler, **_SIGMA)
DEISMultistepScheduler = fused_class(_d.DEISMultistepScheduler, **_ALPHA_SIGMA, **_ORDER_1_TO_3)
KDPM2DiscreteScheduler = fused_class(_d.KDPM2DiscreteScheduler, **_SIGMA)
KDPM2AncestralDiscreteScheduler = fused_class(_d.KDPM2AncestralDiscreteScheduler, **_SIGMA)
DPMSolverSinglestepScheduler = fused_class(_d.DPMSolverSinglestepScheduler, **_ALPHA_SIGMA,
                                           **_ORDER_1_TO_3, _fd_learned="slice")
EDMEulerScheduler = fused_class(_d.EDMEulerScheduler, **_SIGMA)
EDMDPMSolverMultistepScheduler = fused_class(_d.EDMDPMSolverMultistepScheduler, **_SIGMA,
                                             **_ORDER_1_TO_3)
PNDMScheduler = fused_class(_d.PNDMScheduler)
# Issue 15 item 5: every other class whose update is linear in the model outputs, in the order
# of pipe.scheduler.compatibles popularity (README: "Every scheduler class").
DPMSolverSDEScheduler = fused_class(
    _d.DPMSolverSDEScheduler, **_SIGMA,
    doc="Brownian-tree noise: diffusers' own tree, seed and intervals (fastdiff/diffusers/"
        "_brownian.py).")
TCDScheduler = fused_class(_d.TCDScheduler, doc="Step kwarg eta is traced per value.")
SASolverScheduler = fused_class(_d.SASolverScheduler)
IPNDMScheduler = fused_class(_d.IPNDMScheduler)
FlowMatchHeunDiscreteScheduler = fused_class(
    _d.FlowMatchHeunDiscreteScheduler,
    doc="Step kwargs s_churn / s_tmin / s_tmax / s_noise are traced per value.")
FlowMatchLCMScheduler = fused_class(_d.FlowMatchLCMScheduler, **_FLOW)
DDIMInverseScheduler = fused_class(_d.DDIMInverseScheduler)
DPMSolverMultistepInverseScheduler = fused_class(_d.DPMSolverMultistepInverseScheduler,
                                                 **_ALPHA_SIGMA, **_ORDER_1_TO_3)
CMStochasticIterativeScheduler = fused_class(
    _d.CMStochasticIterativeScheduler, **_SIGMA,
    doc="clip_denoised is the step kernel's fused clamp of x0.")
CosineDPMSolverMultistepScheduler = fused_class(
    _d.CosineDPMSolverMultistepScheduler, **_SIGMA, _fd_orders=(1, 2),
    _fd_seed_from_generator=True,
    doc="Brownian-tree noise seeded by the generator, as diffusers seeds it.")
CogVideoXDDIMScheduler = fused_class(_d.CogVideoXDDIMScheduler)
DDIMParallelScheduler = fused_class(_d.DDIMParallelScheduler)
DDPMParallelScheduler = fused_class(_d.DDPMParallelScheduler, _fd_learned="ddpm")
DDPMWuerstchenScheduler = fused_class(
    _d.DDPMWuerstchenScheduler, _fd_batched_timestep=True,
    doc="The pipelines' per-sample timestep `t.expand(batch)` is one schedule entry: located by"
        " its storage, without reading it.")
def _cogvideox_next(kind, t_value, **_):
    """CogVideoX's loop: the next step gets this step's x0 and this timestep back."""
    return ("old_pred_original_sample",), (("timestep_back", kind, t_value),)


def _unclip_next(kind, t_value, upcoming, schedule):
    """unCLIP's / Kandinsky's prior loops: `prev_timestep` is the schedule entry after the
    step's timestep (a tensor of the same kind), None at the last step."""
    position = upcoming[1] + 1
    if position < len(schedule):
        return (), (("prev_timestep", kind, schedule[position]),)
    return (), (("prev_timestep", None, None),)


def _flow_map_next(kind, t_value, **_):
    """AnyFlow's loop: `r_timestep` left to its default, the next schedule entry."""
    return (), (("r_timestep", None, None),)


CogVideoXDPMScheduler = fused_class(
    _d.CogVideoXDPMScheduler, _fd_step_inputs=("old_pred_original_sample",),
    _fd_step_timesteps=("timestep_back",), _fd_next_arguments=staticmethod(_cogvideox_next),
    doc="The history the pipeline passes back (old_pred_original_sample, timestep_back) is an"
        " input of the fused step.")

UnCLIPScheduler = fused_class(
    _d.UnCLIPScheduler, _fd_learned="unclip", _fd_step_timesteps=("prev_timestep",),
    _fd_next_arguments=staticmethod(_unclip_next),
    doc="The prev_timestep its pipelines pass (an entry of `timesteps`) is located by its"
        " storage, without reading it; learned_range scales the noise by exp(a_t + b_t v).")
LTXEulerAncestralRFScheduler = fused_class(
    _d.LTXEulerAncestralRFScheduler,
    doc="Euler-ancestral for rectified-flow models (ComfyUI's sample_euler_ancestral_RF).")
FlowMapEulerDiscreteScheduler = fused_class(
    _d.FlowMapEulerDiscreteScheduler, _fd_step_timesteps=("r_timestep",),
    _fd_next_arguments=staticmethod(_flow_map_next), _fd_index_nearest=True,
    doc="An r_timestep (number or tensor) is traced per value; the step index is diffusers'"
        " nearest-timestep rule, on the host schedule.")

__all__ = [
    "DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler", "DDPMScheduler", "EulerAncestralDiscreteScheduler", "LCMScheduler",
    "FlowMatchEulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
    "DEISMultistepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DPMSolverSinglestepScheduler", "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler",
    "PNDMScheduler", "DPMSolverSDEScheduler", "TCDScheduler", "SASolverScheduler",
    "IPNDMScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler",
    "DDIMInverseScheduler", "DPMSolverMultistepInverseScheduler",
    "CMStochasticIterativeScheduler", "CosineDPMSolverMultistepScheduler",
    "CogVideoXDDIMScheduler", "DDIMParallelScheduler", "DDPMParallelScheduler",
    "DDPMWuerstchenScheduler", "CogVideoXDPMScheduler", "UnCLIPScheduler",
    "LTXEulerAncestralRFScheduler", "FlowMapEulerDiscreteScheduler",
]
