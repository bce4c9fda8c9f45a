"""ComfyUI's samplers and sigma schedules on fastdiff's reference solvers and fused plans:
ComfyUI's names, option names, defaults and numbers (EPS and flow models). Where ComfyUI's
numbers differ from k-diffusion's, `fastdiff.k_diffusion` keeps k-diffusion's; the README lists
every difference.
"""

from fastdiff.comfyui.samplers import *  # noqa: F401,F403
from fastdiff.comfyui.schedulers import *  # noqa: F401,F403
