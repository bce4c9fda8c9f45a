"""Per-model tuned plans: the sigmas of a fixed-step solver optimised for one model and NFE.

    plan = fastdiff.tune(model, "dpmpp_2m", nfe=5, noise=noise, cond=cond)
    plan.save("plan.json")
    plan = fastdiff.tuning.load_plan("plan.json", model)     # warns if made for another model
    x = fastdiff.Sampler(model, plan.solver, sigmas=plan)(noise * plan.sigmas[0], **cond)

Method. The objective is LD3's (Tong et al., ICLR 2025, "Learning to Discretize Denoising
Diffusion ODEs", arXiv:2405.15506, Eq. 4): the mean squared distance between the student
solver's output on a candidate schedule and a high-NFE teacher's output *from the same noise*,
over a small set of tuning samples (LD3: ~100). Every fixed-step solver is a plan whose
coefficients depend only on the sigmas, so the schedule is the whole search space; it is
parameterised by the steps - 1 interior levels' positions in normalised log sigma (a candidate
that is not strictly decreasing inside [sigma_min, sigma_max) is rejected unevaluated, so every
schedule tried starts at sigma_max, decreases strictly and ends at 0: valid for every VE
solver). The search is derivative-free
(Nelder & Mead 1965, with the adaptive coefficients of Gao & Han 2012), started from the best of
the fixed schedules Karras (rho 7), log-uniform and AYS-style, restarted with half the simplex
size while budget is left: with 2-9 parameters it converges
in ~100 solver runs, needs no gradient through the model (so it works for every solver, whose
coefficients the reference computes on the host), and is deterministic, so tuning is exactly
reproducible for fixed noise. LD3's slack (a per-sample input relaxation) needs gradients in
the noise and is not used; two cheaper ways to stop demanding a pointwise match the few-step
solver cannot make are options: `features=` measures the distance in a fixed embedding (LD3
uses LPIPS for pixel-space models; for the digits, `tune_cli.digits_features`), and
`tune_start=True` also tunes the first level sigma_0 <= sigma_max (one more parameter; the run
starts from noise * sigma_0, the same noise). Measured (benchmarks/results/cpu-x86-64/
20261202-tuned-start): the first call at sigma_max >> the data's scale sees almost only noise;
moved to sigma_0 ~ 3-10 it informs the sample. On the exact mixture (2-D, 80 -> 0, held-out
RMSE against the exact solution from noise * 80) Euler at NFE 5 goes 0.282 -> 0.196, below its
best fixed NFE 10 (0.221), which no schedule starting at sigma_max reaches (0.2806, 60 random
restarts tuned on the held-out noise itself); iPNDM 0.108 -> 0.055, but its NFE 10 (0.028) is
out of reach of any 5-level schedule (0.047 at best, 40 restarts on the held-out noise).
GITS (Chen et al. 2024) and OSS (2025) also search schedules against a teacher; AYS (Sabour et
al. 2024, arXiv:2404.14507) motivates the AYS-style starting point.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["TunedPlan", "tune", "load_plan", "model_identity", "ays_style_sigmas",
           "fixed_sigmas", "plot_loss"]

FORMAT = "fastdiff.tuned_plan/1"

# Align Your Steps' published 10-step SD1.5 schedule (Sabour et al. 2024, Table/App. "AYS
# schedules"): its shape in normalised log sigma is what "AYS-style" transfers to other models.
_AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)


def ays_style_sigmas(steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """`steps` + 1 sigmas (last 0): AYS's SD1.5 schedule, log-linearly interpolated to `steps`
    levels (AYS's own recipe for other step counts) and mapped affinely in log sigma onto
    [sigma_min, sigma_max]. A fixed schedule, not tuned for the model at hand."""
    import numpy as np

    logs = np.log(np.asarray(_AYS_SD15))
    u = (logs - logs[-1]) / (logs[0] - logs[-1])  # 1 -> 0
    new = np.interp(np.linspace(0, 1, steps), np.linspace(0, 1, len(u)), u[::-1])[::-1]
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    s = torch.tensor(np.exp(lo + new * (hi - lo)), dtype=torch.float64)
    return torch.cat([s, s.new_zeros(1)])


def fixed_sigmas(kind: str, steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """The untuned baselines: "karras" (rho 7), "exponential" (log-uniform) or "ays"."""
    from fastdiff.spacings import get_sigmas_exponential, get_sigmas_karras

    if kind == "karras":
        return get_sigmas_karras(steps, sigma_min, sigma_max, dtype=torch.float64)
    if kind == "exponential":
        return get_sigmas_exponential(steps, sigma_min, sigma_max, dtype=torch.float64)
    if kind == "ays":
        return ays_style_sigmas(steps, sigma_min, sigma_max)
    raise ValueError(f"kind must be 'karras', 'exponential' or 'ays', got {kind!r}")


# ---- model identity --------------------------------------------------------------------------

_HASHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _unwrap(model) -> tuple[object, dict]:
    """The weights-bearing object and the sampling configuration around it."""
    from fastdiff.denoisers import CFGDenoiser, Denoiser, ThresholdedDenoiser

    config: dict = {}
    while True:
        if isinstance(model, CFGDenoiser):
            config["guidance"] = float(model.scale)
            model = model.inner_model
        elif isinstance(model, ThresholdedDenoiser):
            config["threshold"] = [model.dynamic_ratio, model.clip]
            model = model.inner_model
        elif isinstance(model, Denoiser):
            config["denoiser"] = type(model).__name__
            config["prediction"] = model.prediction
            if model.schedule is not None:
                config["schedule"] = repr(model.schedule)
            model = model.network
        else:
            return model, config


def _json_safe(value):
    return json.loads(json.dumps(value, default=str))


def model_identity(model) -> dict:
    """{"hash": sha256 of the weights, "config": sampling and architecture config}: what a
    plan file records to recognise the model it was tuned for."""
    from fastdiff.models.gmm import GaussianMixture

    inner, config = _unwrap(model)
    config["class"] = type(inner).__name__
    h = hashlib.sha256()
    if isinstance(inner, GaussianMixture):
        tensors = [("means", inner.means), ("stds", inner.stds), ("weights", inner.weights)]
    elif isinstance(inner, torch.nn.Module):
        # hashed once per module while its tensors' version counters stand still (in-place
        # updates and load_state_dict bump them): a multi-GB UNet hashes in seconds
        key = sum(p._version for p in inner.state_dict().values())
        cfg = getattr(inner, "config", None) or getattr(getattr(inner, "unet", None), "config",
                                                         None)
        if cfg is not None:  # diffusers' (or fastdiff's) architecture config
            config["network_config"] = {k: v for k, v in _json_safe(dict(cfg)).items()
                                        if not k.startswith("_")}
        cached = _HASHES.get(inner)
        if cached is not None and cached[0] == key:
            return {"hash": cached[1], "config": _json_safe(config)}
        tensors = sorted(inner.state_dict().items())
    else:
        tensors = []
        config["repr"] = repr(inner)
    for name, t in tensors:
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest = "sha256:" + h.hexdigest()
    if isinstance(inner, torch.nn.Module):
        _HASHES[inner] = (key, digest)
    return {"hash": digest, "config": _json_safe(config)}


# ---- the plan file -----------------------------------------------------------------------------

@dataclass
class TunedPlan:
    """A tuned schedule and where it came from. `sigmas` (float64, descending, last 0) is what
    Sampler(sigmas=plan or plan.sigmas), fastdiff.k_diffusion.sample_* and the drop-in
    schedulers' set_timesteps(sigmas=plan.sigmas.tolist()) take."""

    sigmas: Tensor
    solver: str
    nfe: int
    model: dict
    method: dict = field(default_factory=dict)
    seeds: dict = field(default_factory=dict)
    loss: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sigmas"] = self.sigmas.double().tolist()
        return {"format": FORMAT, **_json_safe(d)}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def from_dict(cls, d: dict) -> TunedPlan:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"plan: expected a {FORMAT!r} file, got format "
                             f"{d.get('format') if isinstance(d, dict) else type(d).__name__!r}")
        sigmas = torch.tensor(d["sigmas"], dtype=torch.float64)
        _check_schedule(sigmas, "plan sigmas")
        return cls(sigmas=sigmas, solver=d["solver"], nfe=int(d["nfe"]), model=d["model"],
                   method=d.get("method", {}), seeds=d.get("seeds", {}),
                   loss=d.get("loss", {}), options=d.get("options", {}))

    def check_model(self, model, solver: str | None = None, stacklevel: int = 3) -> bool:
        """Warns (and returns False) if `model` or `solver` is not the one tuned for."""
        ok = True
        ident = model_identity(model)
        if ident["hash"] != self.model.get("hash") or ident["config"] != self.model.get("config"):
            warnings.warn(f"fastdiff: this plan was tuned for another model (weights "
                          f"{self.model.get('hash', '?')[:19]}, config "
                          f"{self.model.get('config')}); this model is {ident['hash'][:19]}"
                          f" {ident['config']}", stacklevel=stacklevel)
            ok = False
        if solver is not None and solver != self.solver:
            warnings.warn(f"fastdiff: this plan was tuned for solver {self.solver!r}, not "
                          f"{solver!r}", stacklevel=stacklevel)
            ok = False
        return ok


def load_plan(path: str | Path, model=None, solver: str | None = None) -> TunedPlan:
    """Reads a plan file; with `model` (and `solver`), warns if it was made for another."""
    plan = TunedPlan.from_dict(json.loads(Path(path).read_text()))
    if model is not None:
        plan.check_model(model, solver)
    return plan


def _check_schedule(sigmas: Tensor, what: str) -> None:
    s = sigmas.tolist()
    if len(s) < 2 or s[-1] != 0 or not all(math.isfinite(v) for v in s) or \
            any(b >= a for a, b in zip(s, s[1:])):
        raise ValueError(f"{what}: expected a strictly decreasing finite schedule ending at 0,"
                         f" got {s}")


# ---- the search ------------------------------------------------------------------------------

def _sigmas_of(p: Tensor, sigma_min: float, sigma_max: float,
               free_start: bool = False) -> Tensor | None:
    """Positions p [steps - 1] in normalised log sigma (1 = sigma_max, 0 = sigma_min) -> the
    steps + 1 sigmas (sigma_max, the interior levels, 0), or None unless 1 > p_1 > ... >= 0.
    With `free_start`, p [steps] places the first level too (1 >= p_0 > p_1 > ... >= 0)."""
    p = torch.as_tensor(p, dtype=torch.float64)
    if p.numel() and (p[0] > 1 if free_start else p[0] >= 1) or \
            p.numel() and (p[-1] < 0 or bool((p[1:] >= p[:-1]).any())):
        return None
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    levels = (lo + p * (hi - lo)).exp()
    if not free_start:
        levels = torch.cat([p.new_tensor([sigma_max]), levels])
    return torch.cat([levels, p.new_zeros(1)])


def _positions_of(sigmas: Tensor, sigma_min: float, sigma_max: float,
                  free_start: bool = False) -> Tensor:
    """The inverse of `_sigmas_of`."""
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    levels = sigmas[:-1] if free_start else sigmas[1:-1]
    return ((levels.double().log() - lo) / (hi - lo)).clamp(0, 1)


def _nelder_mead(f: Callable, x0: Tensor, step: float, max_evals: int, tol: float, bar,
                 directions: Tensor | None = None):
    """Nelder-Mead with the dimension-adaptive coefficients (Gao & Han 2012), the first simplex
    x0 + step * directions[i]; returns (best x, best value, the best value after every
    evaluation)."""
    n = x0.numel()
    alpha, gamma, rho, shrink = 1.0, 1 + 2 / n, 0.75 - 1 / (2 * n), 1 - 1 / n
    curve: list[float] = []

    def ev(x):
        v = f(x)
        curve.append(min(v, curve[-1]) if curve else v)
        bar.update()
        bar.set_postfix(loss=f"{curve[-1]:.4g}")
        return v

    dirs = torch.eye(n, dtype=x0.dtype) if directions is None else directions
    pts = [x0.clone()] + [x0 + step * dirs[i] for i in range(n)]
    vals = [ev(p) for p in pts]
    while len(curve) < max_evals:
        order = sorted(range(n + 1), key=vals.__getitem__)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if vals[-1] - vals[0] <= tol * max(abs(vals[0]), 1e-30):
            break
        centre = torch.stack(pts[:-1]).mean(0)
        xr = centre + alpha * (centre - pts[-1])
        fr = ev(xr)
        if fr < vals[0]:
            xe = centre + gamma * (xr - centre)
            fe = ev(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            outside = fr < vals[-1]
            xc = centre + rho * ((xr if outside else pts[-1]) - centre)
            fc = ev(xc)
            if fc < (fr if outside else vals[-1]):
                pts[-1], vals[-1] = xc, fc
            else:
                pts = [pts[0]] + [pts[0] + shrink * (p - pts[0]) for p in pts[1:]]
                vals = [vals[0]] + [ev(p) for p in pts[1:]]
    best = min(range(len(vals)), key=vals.__getitem__)
    return pts[best], vals[best], curve


def _guarded(loss: Callable, sigma_min: float, sigma_max: float,
             free_start: bool = False) -> Callable:
    def f(p):
        sigmas = _sigmas_of(p, sigma_min, sigma_max, free_start)
        return math.inf if sigmas is None else loss(sigmas)

    return f


def _run(model, solver: str, x: Tensor, sigmas: Tensor, cond: dict, batch: int,
         options: dict) -> Tensor:
    """The reference solver (the specification the fused engine equals) over `x` in chunks."""
    from fastdiff.reference.solvers import SOLVERS

    info = SOLVERS[solver]
    kwargs = {**info.kwargs, **info.deterministic_kwargs, **options}
    outs = []
    s = sigmas.to(x.device, torch.promote_types(x.dtype, torch.float32))
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            c = {k: v[i:i + batch] if isinstance(v, Tensor) and v.shape[:1] == x.shape[:1]
                 else v for k, v in cond.items()}
            outs.append(info.fn(model, x[i:i + batch], s, extra_args=c, disable=True, **kwargs))
    return torch.cat(outs)


def _schedule_range(model, sigma_min, sigma_max) -> tuple[float, float]:
    from fastdiff.denoisers import CFGDenoiser, Denoiser

    inner = model
    while isinstance(inner, CFGDenoiser):
        inner = inner.inner_model
    sched = getattr(inner, "schedule", None) if isinstance(inner, Denoiser) else None
    if sigma_min is None or sigma_max is None:
        if sched is None:
            raise ValueError("sigma_min and sigma_max are required for a model without a"
                             " schedule (a fastdiff Denoiser with schedule= brings its own)")
        sigma_min = sched.sigma_min if sigma_min is None else sigma_min
        sigma_max = sched.sigma_max if sigma_max is None else sigma_max
    sigma_min, sigma_max = float(sigma_min), float(sigma_max)
    if not 0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max, got"
                         f" {sigma_min}, {sigma_max}")
    return sigma_min, sigma_max


def tune(model, solver: str = "dpmpp_2m", nfe: int = 5, *, noise: Tensor | None = None,
         shape: tuple[int, ...] | None = None, num_samples: int = 100, seed: int = 0,
         cond: dict | None = None, sigma_min: float | None = None,
         sigma_max: float | None = None, targets: Tensor | None = None,
         teacher_solver: str = "dpmpp_2m", teacher_steps: int = 100,
         clamp: tuple[float, float] | None = None, max_evals: int = 100, tol: float = 1e-4,
         batch_size: int = 256, progress: bool = True, options: dict | None = None,
         features: Callable | None = None, tune_start: bool = False,
         multistart: int = 1, start_levels: tuple[float, ...] = (0.2, 0.35)) -> TunedPlan:
    """Tunes the sigmas of `solver` at `nfe` model calls for `model` (see the module docstring).

    Args:
        model: a k-diffusion denoiser `model(x, sigma, **cond) -> x0` (a fastdiff Denoiser,
            CFGDenoiser, GaussianMixture, k-diffusion wrapper of a diffusers UNet, ...).
        noise: unit-variance tuning noise [N, ...] (x_T = sigma_max * noise); else drawn from
            `seed` with `shape` (one sample's shape) for `num_samples` samples.
        cond: per-sample conditioning (tensors with N rows are sliced with the batch; anything
            else, e.g. uncond embeddings of batch 1, is passed as is).
        targets: the teacher's outputs [N, ...] from this noise (e.g. the exact ODE solution);
            default: `teacher_solver` with `teacher_steps` Karras steps from the same noise.
        clamp: compare outputs clamped to this range (images: (-1, 1), as they are saved).
        max_evals: the budget of student runs (each `nfe` calls on N samples).
        features: a fixed embedding `features(y) -> [N, F]` the distance is measured in
            (after `clamp`); default the outputs themselves (LD3's L2). LD3 measures
            pixel-space models in LPIPS, a feature distance, not L2 (Tong et al. 2025, Sec. 5):
            the L2-optimal few-step output is the teacher's blurred conditional mean, a
            feature distance rewards a sharp sample that differs from the teacher's in detail.
        tune_start: tune the first level too (sigma_0 <= sigma_max; the run starts from
            noise * sigma_0). The prior N(0, sigma_0^2) differs from the true marginal by the
            data's variance, negligible while sigma_0 >> the data's scale, and a first model
            call at sigma_max >> data sees almost only noise (D ~ the mean): a lower start
            spends it where it informs the sample.
        start_levels: with `tune_start`, the fixed schedules are also tried from first levels
            this far down in normalised log sigma (digits at NFE 3: needed, FD 54-105 -> 16-17
            for dpmpp_2m/UniPC/iPNDM; exact mixture, Euler NFE 5: () gives held-out 0.196,
            the default 0.230: a basin with the last level near sigma_min).
        multistart: descend from the best start of this many first levels (with `tune_start`:
            sigma_max and two lower ones), `max_evals` split between them; keeps the best.
    """
    from tqdm.auto import tqdm

    from fastdiff.reference.solvers import SOLVERS

    if isinstance(multistart, bool) or not isinstance(multistart, int) or multistart < 1:
        raise ValueError(f"multistart must be an int >= 1, got {multistart!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
    info = SOLVERS[solver]
    if info.param != "ve" or info.stochastic and not info.deterministic_kwargs:
        raise ValueError(f"solver {solver!r}: tuning needs a deterministic VE (k-diffusion)"
                         " solver")
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < info.nfe_per_step:
        raise ValueError(f"nfe must be an int >= {info.nfe_per_step} for {solver!r}, got {nfe!r}")
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, sigma, **cond), got"
                        f" {type(model).__name__}")
    steps = nfe // info.nfe_per_step
    sigma_min, sigma_max = _schedule_range(model, sigma_min, sigma_max)
    drawn = noise is None
    if drawn:
        if shape is None:
            raise ValueError("give noise=[N, ...] or shape=(one sample's shape)")
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(num_samples, *shape, generator=gen, dtype=torch.float64)
    if not isinstance(noise, Tensor) or not noise.is_floating_point() or noise.dim() < 1:
        raise TypeError("noise must be a floating-point tensor [N, ...]")
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    dtype = param.dtype if param is not None else noise.dtype
    device = param.device if param is not None else noise.device
    x = (noise.double() * sigma_max).to(device, dtype)
    cond = dict(cond or {})
    options = dict(options or {})
    clamped = (lambda y: y.clamp(*clamp)) if clamp is not None else (lambda y: y)
    if features is not None and not callable(features):
        raise TypeError(f"features must be callable as features(y) -> [N, F], got"
                        f" {type(features).__name__}")

    def post(y):
        y = clamped(y)
        if features is None:
            return y
        with torch.no_grad():
            return torch.cat([features(y[i:i + batch_size])
                              for i in range(0, y.shape[0], batch_size)])
    teacher = {"targets": "given"}
    if targets is None:
        t_sig = fixed_sigmas("karras", teacher_steps, sigma_min, sigma_max)
        targets = _run(model, teacher_solver, x, t_sig, cond, batch_size, {})
        teacher = {"solver": teacher_solver, "steps": teacher_steps, "spacing": "karras"}
    if targets.shape != x.shape:
        raise ValueError(f"targets must have the noise's shape {tuple(x.shape)}, got"
                         f" {tuple(targets.shape)}")
    targets = post(targets.to(device, dtype)).double()
    if targets.shape[0] != x.shape[0]:
        raise ValueError(f"features must keep the batch dimension {x.shape[0]}, got"
                         f" {tuple(targets.shape)}")

    unit = noise.double().to(device)

    def loss(sigmas: Tensor) -> float:
        x0 = x if not tune_start else (unit * float(sigmas[0])).to(dtype)
        y = post(_run(model, solver, x0, sigmas, cond, batch_size, options)).double()
        v = float((y - targets).pow(2).flatten(1).mean(1).mean())
        return v if math.isfinite(v) else math.inf

    starts = {k: fixed_sigmas(k, steps, sigma_min, sigma_max)
              for k in ("karras", "exponential", "ays")}
    if tune_start:  # the same shapes from lower first levels (20% and 35% down in log sigma):
        # at NFE 3 the basins from sigma_max and from sigma_0 ~ 3-10 are far apart (measured)
        for q in start_levels:
            top = math.exp(math.log(sigma_max) - q * math.log(sigma_max / sigma_min))
            starts |= {f"{k}@{top:.3g}": fixed_sigmas(k, steps, sigma_min, top)
                       for k in ("karras", "exponential", "ays")}
    total = max_evals + (len(starts) if steps > 1 or tune_start else 1)
    with tqdm(total=total, disable=not progress, desc=f"tune {solver} NFE {nfe}",
              unit="run") as bar:
        start_loss = {}
        for k, s in starts.items():
            start_loss[k] = loss(s)
            bar.update()
            if steps == 1 and not tune_start:
                break
        best_start = min(start_loss, key=start_loss.get)
        if steps == 1 and not tune_start:  # one step from sigma_max to 0: nothing to choose
            sigmas, final, curve = starts[best_start], start_loss[best_start], []
        else:
            # the first level starts at its upper bound (sigma_max): step it inwards
            dirs = torch.eye(steps - 1 + tune_start, dtype=torch.float64)
            if tune_start:
                dirs[0, 0] = -1.0
            firsts: dict = {}  # the best start of each first level, best first
            for k in sorted(start_loss, key=start_loss.get):
                firsts.setdefault(k.partition("@")[2], k)
            chosen = list(firsts.values())[:multistart]
            best_p, final, curve = None, start_loss[best_start], []
            for i, k in enumerate(chosen):  # one descent per chosen start, the budget split
                limit = max_evals * (i + 1) // len(chosen)
                p, local = _positions_of(starts[k], sigma_min, sigma_max, tune_start), \
                    start_loss[k]
                step = 0.1
                while len(curve) < limit:  # restarts: a fresh simplex around the best point
                    p_new, v, c = _nelder_mead(_guarded(loss, sigma_min, sigma_max, tune_start),
                                               p, step, limit - len(curve), tol, bar, dirs)
                    curve += [min(x, final, local) for x in c]
                    if v < local:
                        p, local = p_new, v
                    step /= 2
                    if step < 1e-3:
                        break
                if best_p is None or local < final:
                    best_p, final = p, local
            p = best_p
            sigmas = _sigmas_of(p, sigma_min, sigma_max, tune_start)
            if final > start_loss[best_start]:  # (never: the start is a simplex vertex)
                sigmas, final = starts[best_start], start_loss[best_start]
    _check_schedule(sigmas, "tuned sigmas")
    return TunedPlan(
        sigmas=sigmas, solver=solver, nfe=steps * info.nfe_per_step, model=model_identity(model),
        method={"name": "LD3 objective (arXiv:2405.15506), no slack; Nelder-Mead on log-sigma"
                        " positions", "teacher": teacher, "clamp": list(clamp) if clamp else None,
                "distance": "L2" if features is None else f"L2 in features"
                            f" {getattr(features, '__qualname__', type(features).__name__)}",
                "max_evals": max_evals, "sigma_min": sigma_min, "sigma_max": sigma_max,
                "start": best_start, "tune_start": tune_start, "multistart": multistart},
        seeds={"seed": seed if drawn else "given", "num_samples": int(x.shape[0])},
        loss={"final": final, "start": start_loss, "curve": curve}, options=options)


def plot_loss(plan: TunedPlan, path: str | Path) -> Path:
    """The loss curve (best loss after each solver run) as a PNG (matplotlib, optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    curve = plan.loss.get("curve") or [plan.loss.get("final")]
    ax.plot(range(1, len(curve) + 1), curve, marker=".")
    for k, v in plan.loss.get("start", {}).items():
        ax.axhline(v, ls=":", lw=1, color="grey")
        ax.annotate(k, (len(curve), v), fontsize=7, color="grey", ha="right", va="bottom")
    ax.set(yscale="log", xlabel="solver runs", ylabel="MSE to teacher (best so far)",
           title=f"tune {plan.solver}, NFE {plan.nfe}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
