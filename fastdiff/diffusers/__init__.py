"""Drop-in diffusers schedulers with a fused, sync-free, CUDA-graph capturable `step`.

    from fastdiff.diffusers import DPMSolverMultistepScheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

Each class subclasses diffusers' class of the same name (same config keys, public methods and
signatures, `from_config`, `save_pretrained`/`from_pretrained`, `compatibles`, state
attributes). Only `step` differs: diffusers' step traced, from the scheduler's state and the
timestep given, into an exact linear form (fastdiff/diffusers/_trace.py; plans shared by equal
settings, _shared.py) and run as one fastdiff.ops.lincomb launch, with no host synchronisation
(fastdiff/diffusers/_fused.py). Noise comes from diffusers' own `randn_tensor` with the
caller's generator, so results match diffusers'.

This package imports the `diffusers` library; `import fastdiff` never does.
"""

from fastdiff.diffusers.schedulers import *  # noqa: F403
from fastdiff.diffusers.schedulers import __all__  # noqa: F401
