"""DPM-Solver++ samplers (Lu et al. 2022, arXiv:2211.01095) in the k-diffusion convention.

x = x0 + sigma * eps, the model is a denoiser D(x, sigma) ~ E[x0 | x] (DPM-Solver++'s data
prediction x_theta with alpha = 1) and lambda = -log(sigma) is the half log-SNR. Between lambda_s
and lambda_t = lambda_s + h the probability-flow ODE has the exact solution (variation of
constants, the data-prediction form of DPM-Solver++)

    x_t = (sigma_t / sigma_s) x_s + sigma_t * int_{lambda_s}^{lambda_t} e^lambda D(lambda) dlambda,

and every solver here replaces D by a low-order expansion in lambda built from denoisings at
the current, earlier (multistep) or intermediate (singlestep) points and integrates it exactly:
  - first order:  x_t = (sigma_t / sigma_s) x_s - expm1(-h) D_s            (DDIM; = Euler here)
  - phi-weights:  phi_1 = expm1(-h), phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2, so that
                  int_0^h e^(tau-h) tau^k / k! dtau = -phi_1, h phi_2, -h^2 phi_3 for k = 0, 1, 2.
At sigma_t = 0 (h = inf) the exact limit of the first-order step is x_t = D_s, and every solver
takes that step there (higher-order differences divide by h and degenerate).

The five k-diffusion samplers (`sample_dpmpp_2s_ancestral`, `_sde`, `_2m`, `_2m_sde`, `_3m_sde`)
keep k-diffusion 0.1.1's signatures and numbers: their arithmetic runs on the `sigmas` tensor in
k-diffusion's operation order (float32 runs round like k-diffusion), while branch decisions use the
host copy from `validate_sigmas` (no device syncs in the loop). With eta = 0 they draw no noise and
need no torchsde (k-diffusion still draws, or seeds a Brownian tree from the global RNG, and
multiplies the noise by 0: same outputs, different global RNG state afterwards). The new
deterministic samplers (`sample_dpmpp_2s`, `_3s`, `_3m`) compute their coefficients on the host in
float64.

The samplers live in `dpmpp_singlestep` (2S ancestral, SDE, 2S, 3S) and `dpmpp_multistep`
(2M, 2M SDE, 3M SDE, 3M); this module re-exports them and holds their registry.
"""

from __future__ import annotations

from ._dpmpp_common import _PAPER
from ._utils import SolverInfo
from .dpmpp_multistep import (
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m,
    sample_dpmpp_3m_sde,
)
from .dpmpp_singlestep import (
    sample_dpmpp_2s,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3s,
    sample_dpmpp_sde,
)

__all__ = [
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_sde",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_2s",
    "sample_dpmpp_3s",
    "sample_dpmpp_3m",
]

_ETA0 = {"eta": 0.0}
_CFG_PP = "Chung et al. 2024, CFG++ (arXiv:2406.08070) on "
_FLOW = {"model_kind": "flow"}
SOLVERS = {
    "dpmpp_2m_cfg_pp": SolverInfo(sample_dpmpp_2m, order=2, nfe_per_step=1, stochastic=False,
                                  paper=_CFG_PP + _PAPER + ", Alg. 2",
                                  kwargs={"cfg_pp": True}),
    "dpmpp_2s_ancestral_cfg_pp": SolverInfo(sample_dpmpp_2s_ancestral, order=2, nfe_per_step=2,
                                            stochastic=True,
                                            paper=_CFG_PP + _PAPER + ", Alg. 1, ancestral",
                                            kwargs={"cfg_pp": True},
                                            deterministic_kwargs=_ETA0),
    "dpmpp_2m": SolverInfo(sample_dpmpp_2m, order=2, nfe_per_step=1, stochastic=False,
                           paper=_PAPER + ", Alg. 2"),
    "dpmpp_3m": SolverInfo(sample_dpmpp_3m, order=3, nfe_per_step=1, stochastic=False,
                           paper=_PAPER + ", 3rd-order multistep"),
    "dpmpp_2s": SolverInfo(sample_dpmpp_2s, order=2, nfe_per_step=2, stochastic=False,
                           paper=_PAPER + ", Alg. 1"),
    "dpmpp_3s": SolverInfo(sample_dpmpp_3s, order=3, nfe_per_step=3, stochastic=False,
                           paper="Lu et al. 2022, DPM-Solver-3 (arXiv:2206.00927, Alg. 2) in "
                                 "data prediction, " + _PAPER),
    "dpmpp_2s_ancestral": SolverInfo(sample_dpmpp_2s_ancestral, order=2, nfe_per_step=2,
                                     stochastic=True, paper=_PAPER + ", Alg. 1, ancestral",
                                     deterministic_kwargs=_ETA0),
    "dpmpp_sde": SolverInfo(sample_dpmpp_sde, order=2, nfe_per_step=2, stochastic=True,
                            paper=_PAPER + ", Alg. 1 with Brownian-tree noise (k-diffusion)",
                            deterministic_kwargs=_ETA0),
    "dpmpp_2m_sde": SolverInfo(sample_dpmpp_2m_sde, order=2, nfe_per_step=1, stochastic=True,
                               paper=_PAPER + ", SDE-DPM-Solver++(2M)",
                               kwargs={"solver_type": "midpoint"}, deterministic_kwargs=_ETA0),
    "dpmpp_2m_sde_heun": SolverInfo(sample_dpmpp_2m_sde, order=2, nfe_per_step=1, stochastic=True,
                                    paper=_PAPER + ", SDE-DPM-Solver++(2M), heun",
                                    kwargs={"solver_type": "heun"}, deterministic_kwargs=_ETA0),
    # order 2, not 3: k-diffusion's D2 weight is half the exact one (see sample_dpmpp_3m_sde)
    "dpmpp_3m_sde": SolverInfo(sample_dpmpp_3m_sde, order=2, nfe_per_step=1, stochastic=True,
                               paper=_PAPER + ", 3M SDE (k-diffusion)",
                               deterministic_kwargs=_ETA0),
    # ComfyUI's flow-model (CONST) branches
    "dpmpp_2s_ancestral_RF": SolverInfo(sample_dpmpp_2s_ancestral, order=2, nfe_per_step=2,
                                        stochastic=True, param="flow", kwargs=_FLOW,
                                        paper=_PAPER + ", Alg. 1, ancestral, flow renoising "
                                        "(ComfyUI's _RF)", deterministic_kwargs=_ETA0),
    "dpmpp_sde_flow": SolverInfo(sample_dpmpp_sde, order=2, nfe_per_step=2, stochastic=True,
                                 param="flow", kwargs=_FLOW, deterministic_kwargs=_ETA0,
                                 paper=_PAPER + ", Alg. 1, Brownian noise, flow lambda"),
    "dpmpp_2m_sde_flow": SolverInfo(sample_dpmpp_2m_sde, order=2, nfe_per_step=1,
                                    stochastic=True, param="flow", deterministic_kwargs=_ETA0,
                                    kwargs={**_FLOW, "solver_type": "midpoint"},
                                    paper=_PAPER + ", SDE-DPM-Solver++(2M), flow lambda"),
    "dpmpp_2m_sde_heun_flow": SolverInfo(sample_dpmpp_2m_sde, order=2, nfe_per_step=1,
                                         stochastic=True, param="flow",
                                         deterministic_kwargs=_ETA0,
                                         kwargs={**_FLOW, "solver_type": "heun"},
                                         paper=_PAPER + ", SDE-DPM-Solver++(2M) heun, flow "
                                         "lambda"),
    "dpmpp_3m_sde_flow": SolverInfo(sample_dpmpp_3m_sde, order=2, nfe_per_step=1,
                                    stochastic=True, param="flow", kwargs=_FLOW,
                                    deterministic_kwargs=_ETA0,
                                    paper=_PAPER + ", 3M SDE (k-diffusion), flow lambda"),
}
