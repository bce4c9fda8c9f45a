"""fastdiff's schedules, in float64 (DESIGN.md layer 5: imports no op; no op imports it).

- `fastdiff.schedules.model`: model noise schedules (discrete and continuous VP, VE, EDM, flow)
  and the conversions between sigma, alpha, lambda and flow time (the meaning of each name);
- `fastdiff.schedules.betas`: the betas of discrete VP schedules (diffusers' names);
- `fastdiff.schedules.spacings`: k-diffusion's and DPM-Solver's spacings, beta, flow shifts;
- `fastdiff.schedules.diffusers`: the timesteps and sigmas of diffusers' ``set_timesteps``;
- `fastdiff.schedules.model_sampling`: ComfyUI's schedulers, which read a model's sigma table
  (simple, normal, sgm_uniform, ddim_uniform, beta, linear_quadratic, kl_optimal, sd_turbo,
  laplace);
- `fastdiff.schedules.published`: published schedules (Align Your Steps, GITS, OptimalSteps).

Every name is importable from here; `fastdiff.betas` and `fastdiff.spacings` re-export theirs.
"""

from fastdiff.schedules import betas, diffusers, model, model_sampling, published, spacings
from fastdiff.schedules.betas import *  # noqa: F401,F403
from fastdiff.schedules.diffusers import *  # noqa: F401,F403
from fastdiff.schedules.model import *  # noqa: F401,F403
from fastdiff.schedules.model import _check_count, _f64  # noqa: F401
from fastdiff.schedules.model_sampling import *  # noqa: F401,F403
from fastdiff.schedules.published import *  # noqa: F401,F403
from fastdiff.schedules.spacings import *  # noqa: F401,F403

__all__ = sorted({*model.__all__, *betas.__all__, *spacings.__all__, *diffusers.__all__,
                  *model_sampling.__all__, *published.__all__})
