"""The drop-in scheduler classes: diffusers' own class (config, schedule, scale_model_input,
save/load) with the fused sync-free `step` of _fused.FusedStepMixin, and `add_noise` /
`scale_noise` that find the timesteps' sigmas on the device (no per-sample host lookup).

`clip_sample` and dynamic `thresholding` are fused too: the clamp of x0 happens in the step
kernel's registers, and thresholding's per-sample quantile is one fused reduction launch before
it (fastdiff.ops.dynamic_threshold). A learned variance (`variance_type="learned" /
"learned_range"`: the network's extra output channels) is split off as diffusers does; DDPM's
per-element std exp(a_t + b_t v) scales the noise before the fused launch (_learned.py).
Everything else is traced, so it is fused whatever its value.
"""

from __future__ import annotations

import diffusers as _d

from fastdiff.diffusers._fused import fused_class

# add_noise / scale_noise formulas reimplemented without diffusers' per-sample host lookup
_SIGMA = {"_fd_noise_formula": "sigma"}  # x + noise * sigma
_ALPHA_SIGMA = {"_fd_noise_formula": "alpha_sigma"}  # alpha_t x + sigma_t noise
_FLOW = {"_fd_noise_formula": "flow"}  # scale_noise: sigma noise + (1 - sigma) x

DDIMScheduler = fused_class(_d.DDIMScheduler,
                            doc="Step kwargs eta / use_clipped_model_output are traced per value.")
EulerDiscreteScheduler = fused_class(
    _d.EulerDiscreteScheduler, **_SIGMA,
    doc="Step kwargs s_churn / s_tmin / s_tmax / s_noise are traced per value.")
DPMSolverMultistepScheduler = fused_class(_d.DPMSolverMultistepScheduler, **_ALPHA_SIGMA,
                                          _fd_learned="slice")
UniPCMultistepScheduler = fused_class(_d.UniPCMultistepScheduler, **_ALPHA_SIGMA)
DDPMScheduler = fused_class(_d.DDPMScheduler, _fd_learned="ddpm")
EulerAncestralDiscreteScheduler = fused_class(_d.EulerAncestralDiscreteScheduler, **_SIGMA)
LCMScheduler = fused_class(_d.LCMScheduler)
FlowMatchEulerDiscreteScheduler = fused_class(
    _d.FlowMatchEulerDiscreteScheduler, **_FLOW, _fd_noise_f32=True,
    doc="stochastic_sampling draws float32 noise like diffusers.")
HeunDiscreteScheduler = fused_class(_d.HeunDiscreteScheduler, **_SIGMA)
LMSDiscreteScheduler = fused_class(_d.LMSDiscreteScheduler, **_SIGMA)
DEISMultistepScheduler = fused_class(_d.DEISMultistepScheduler, **_ALPHA_SIGMA)
KDPM2DiscreteScheduler = fused_class(_d.KDPM2DiscreteScheduler, **_SIGMA)
KDPM2AncestralDiscreteScheduler = fused_class(_d.KDPM2AncestralDiscreteScheduler, **_SIGMA)
DPMSolverSinglestepScheduler = fused_class(_d.DPMSolverSinglestepScheduler, **_ALPHA_SIGMA,
                                           _fd_learned="slice")
EDMEulerScheduler = fused_class(_d.EDMEulerScheduler, **_SIGMA)
EDMDPMSolverMultistepScheduler = fused_class(_d.EDMDPMSolverMultistepScheduler, **_SIGMA)
PNDMScheduler = fused_class(_d.PNDMScheduler, _fd_row_attr="counter")

__all__ = [
    "DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler", "DDPMScheduler", "EulerAncestralDiscreteScheduler", "LCMScheduler",
    "FlowMatchEulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
    "DEISMultistepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DPMSolverSinglestepScheduler", "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler",
    "PNDMScheduler",
]
