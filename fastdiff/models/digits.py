"""The embedded default model: a class-conditional UNet on scikit-learn's handwritten digits.

Data: `sklearn.datasets.load_digits` (1797 greyscale 8x8 images, 17 levels 0..16, bundled with
scikit-learn, no download), scaled to [-1, 1]. A fixed seeded split keeps `HELD_OUT` images out
of every training run (diffusion model and classifier) for evaluation.

Model: `fastdiff.models.UNet` (diffusers `UNet2DModel` layout) trained with the DDPM objective
(Ho et al. 2020, arXiv:2006.11239, Algorithm 1) on the linear beta schedule of that paper
(1000 steps, 1e-4 .. 0.02), epsilon prediction, with 10% of the labels replaced by the null class
`NULL_LABEL` so one network gives both halves of classifier-free guidance (Ho & Salimans 2022,
arXiv:2207.12598). Weights: `fastdiff/weights/digits.safetensors`, reproduced by `TRAIN_COMMAND`.

    model = load_digits_model()                     # a k-diffusion denoiser D(x, sigma, cond=y)
    x = sample_digits(model, labels=range(10))      # [10, 1, 8, 8] in [-1, 1]
"""

from __future__ import annotations

import json
import math
import numbers
import operator
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fastdiff.denoisers import CFGDenoiser, EpsDenoiser
from fastdiff.schedules import DiscreteVPSchedule

__all__ = [
    "NUM_CLASSES", "NULL_LABEL", "IMAGE_SIZE", "HELD_OUT", "UNET_CONFIG", "SCHEDULE",
    "TRAIN_COMMAND", "WEIGHTS", "load_dataset", "digits_schedule", "build_unet",
    "load_digits_model", "read_metadata", "LabelConditioned", "guided", "digits_sigmas",
    "sample_digits", "to_uint8", "make_grid",
]

NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES  # the "no label" class of classifier-free guidance
IMAGE_SIZE = 8
HELD_OUT = 400  # images kept out of all training, for evaluation
SPLIT_SEED = 0
WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "digits.safetensors"
TRAIN_COMMAND = "fastdiff train digits"  # with the defaults of fastdiff/train.py

# 8x8 -> 4x4 (attention at 4x4 and in the middle); 0.7M parameters
UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE, in_channels=1, out_channels=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=32,
    norm_num_groups=8, num_class_embeds=NUM_CLASSES + 1,
)
# DDPM's linear schedule (Ho et al. 2020, Sec. 4)
SCHEDULE = dict(beta_schedule="linear", num_train_timesteps=1000, beta_start=1e-4,
                beta_end=0.02)


def load_dataset(split: str = "train", dtype: torch.dtype = torch.float32
                 ) -> tuple[Tensor, Tensor]:
    """(images [N, 1, 8, 8] in [-1, 1], labels [N] int64) of the digits data.

    split: "train" (1397 images), "test" (the `HELD_OUT` = 400 held-out images) or "all".
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    from sklearn.datasets import load_digits

    data = load_digits()
    images = data.images.astype(np.float64) / 16.0 * 2.0 - 1.0
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    idx = {"test": order[:HELD_OUT], "train": order[HELD_OUT:], "all": np.arange(len(images))}
    idx = np.sort(idx[split])
    x = torch.from_numpy(images[idx]).to(dtype)[:, None]
    return x, torch.from_numpy(data.target[idx]).long()


def digits_schedule() -> DiscreteVPSchedule:
    """The model's training schedule (DDPM linear betas, 1000 steps)."""
    return DiscreteVPSchedule.from_betas(**SCHEDULE)


def build_unet(**overrides):
    """A freshly initialised digits UNet (`UNET_CONFIG`, with overrides)."""
    from fastdiff.models.unet import UNet

    return UNet(**{**UNET_CONFIG, **overrides})


class LabelConditioned(nn.Module):
    """network(x, t, cond=labels) = unet(x, t, class_labels=labels): the conditioning under the
    name `cond`, as `CFGDenoiser` and `fastdiff.Sampler` pass it by default."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.unet(x, t, class_labels=cond)


def load_digits_model(device=None, dtype: torch.dtype = torch.float32,
                      path: str | Path | None = None) -> EpsDenoiser:
    """The shipped digits model as a k-diffusion denoiser `D(x, sigma, cond=labels)`.

    x [B, 1, 8, 8] in VE coordinates (x = x0 + sigma * eps, x0 in [-1, 1]); labels [B] in 0..9,
    or `NULL_LABEL` for the unconditional model. `guided(model, scale)` (a `CFGDenoiser`) gives
    classifier-free guidance: call it with cond=labels, uncond=full_like(labels, NULL_LABEL).
    The network (`model.network.unet`, a `fastdiff.models.UNet`) gets the fractional DDPM
    timestep of sigma (`DiscreteVPSchedule.t`).
    """
    from safetensors.torch import load_file

    path = Path(path) if path is not None else WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"digits weights not found at {path}; make them with "
                                f"`{TRAIN_COMMAND}`")
    meta = read_metadata(path)
    unet = build_unet(**json.loads(meta["unet_config"])) if "unet_config" in meta else build_unet()
    unet.load_state_dict(load_file(str(path)))
    unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
    schedule = (DiscreteVPSchedule.from_betas(**json.loads(meta["schedule"]))
                if "schedule" in meta else digits_schedule())
    return EpsDenoiser(LabelConditioned(unet), schedule=schedule)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata (config, training command, ...) of a weights file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def guided(model: EpsDenoiser, scale: float) -> CFGDenoiser:
    """Classifier-free guidance D_u + scale (D_c - D_u): call with cond=labels,
    uncond=full_like(labels, NULL_LABEL) (what `sample_digits` does)."""
    return CFGDenoiser(model, scale)


def digits_sigmas(model: EpsDenoiser, steps: int, spacing: str = "karras") -> Tensor:
    """`steps` + 1 noise levels (float64, last 0) between the schedule's extremes: Karras et al.
    2022 (Eq. 5, rho = 7) or "exponential" (uniform in log sigma)."""
    from fastdiff.spacings import get_sigmas_exponential, get_sigmas_karras

    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    fns = {"karras": get_sigmas_karras, "exponential": get_sigmas_exponential}
    if spacing not in fns:
        raise ValueError(f"spacing must be one of {tuple(fns)}, got {spacing!r}")
    s = model.schedule
    return fns[spacing](steps, s.sigma_min, s.sigma_max, dtype=torch.float64)


def sample_digits(model: EpsDenoiser, labels: Sequence[int] | Tensor, steps: int = 20,
                  solver: str = "dpmpp_2m", guidance: float = 1.5, seed: int = 0,
                  spacing: str = "karras", backend: str | None = None, graph: bool = False,
                  disable: bool | None = True, callback=None, sigmas=None,
                  options: dict | None = None) -> Tensor:
    """Generate one digit per label: [N, 1, 8, 8] in [-1, 1] (clamped).

    solver: a name in `fastdiff.reference.solvers.SOLVERS` (a "ve" one); guidance: the
    classifier-free guidance scale (1 = conditional model only, 0 = unconditional); seed: the
    initial noise (drawn on the CPU in float64, so it is the same on every device and dtype) and
    the solver's noise. backend (or graph=True): run the fused engine `fastdiff.Sampler` with
    that kernel backend ("auto", "cuda", "triton", "cpu", "reference"); None: the reference
    solver function (the specification; `disable`/`callback` go to it). options: the solver's
    keyword options over its registry entry's (e.g. {"eta": 0.0}).

    Everything computed on the host (noise levels, the engine's plan) is built once per setting
    and kept with the model, so a later call's device work starts at once and, with the fused
    engine, makes no host read inside the loop.
    """
    from fastdiff.reference.solvers import SOLVERS

    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
    info = SOLVERS[solver]
    if info.param != "ve":
        raise ValueError(f"solver {solver!r} works in {info.param!r} coordinates; the digits "
                         "model is sampled with VE (k-diffusion) solvers")
    labels = _checked_labels(labels)
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or \
            not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}")
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an int, got {type(seed).__name__}") from None
    if not -(2**63) <= seed < 2**63 - 1:  # torch generators take int64 seeds (and seed + 1)
        raise ValueError(f"seed must be in [-2**63, 2**63 - 1), got {seed}")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    fused = backend is not None or graph
    options = dict(options or {})
    plain = _unguided(solver, guidance, options)
    if sigmas is not None:
        if hasattr(sigmas, "check_model"):  # a TunedPlan
            sigmas.check_model(model if plain else guided(model, guidance), solver)
            sigmas = sigmas.sigmas
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
        steps, spacing = len(sigmas) - 1, tuple(sigmas.tolist())  # the cache key
    engine, sigma_max = _prepared(model, solver, steps, spacing, float(guidance),
                                  (backend or "auto") if fused else None, graph, options)
    # The initial noise and the labels are made on the host, then moved: nothing the host
    # makes meets a device tensor (a CPU tensor times a CUDA sigma fails on a GPU).
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), 1, IMAGE_SIZE, IMAGE_SIZE, generator=gen, dtype=torch.float64)
    x = (noise * sigma_max).to(device=device, dtype=dtype)
    cond = torch.tensor(labels, dtype=torch.long, device=device)
    extra = {"cond": cond}
    if not plain:
        extra["uncond"] = torch.full_like(cond, NULL_LABEL)
    with torch.no_grad():
        if fused:  # the solver's noise: in-kernel Philox, seeded from seed + 1
            seeds = torch.randint(-(2**63), 2**63 - 1, (len(labels),), dtype=torch.int64,
                                  generator=torch.Generator().manual_seed(seed + 1))
            out = _with_progress(engine, model.network, disable)(x, seeds=seeds.to(device),
                                                                 **extra)
        else:  # the reference draws from the global generators: seed them, restore the caller's
            sigmas = _sigmas_of(model, steps, spacing).to(
                device, torch.promote_types(dtype, torch.float32))
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed + 1)
                out = info.fn(model if plain else guided(model, guidance), x, sigmas,
                              extra_args=extra, callback=callback, disable=disable,
                              **{**info.kwargs, **options})
    return out.clamp(-1, 1)


def _checked_labels(labels) -> list[int]:
    """The labels as host ints, checked (a tensor is read once, before any sampling)."""
    try:
        values = labels.reshape(-1).tolist() if isinstance(labels, Tensor) else list(labels)
        if any(isinstance(v, bool) for v in values):
            raise TypeError
        values = [operator.index(v) for v in values]  # ints (numpy's too), never floats
    except TypeError:
        values = []
    if not values or not all(0 <= v <= NULL_LABEL for v in values):
        raise ValueError(f"labels must be a non-empty sequence of ints in 0..{NULL_LABEL},"
                         f" got {labels!r}")
    return values


def _unguided(solver: str, guidance: float, options: dict) -> bool:
    """Whether the conditional model alone serves: guidance 1, unless the solver is CFG++, which
    renoises with the unconditional prediction at every scale (without it, D_u = D and CFG++
    would silently be its base solver)."""
    from fastdiff.reference.solvers import SOLVERS

    return guidance == 1.0 and not {**SOLVERS[solver].kwargs, **options}.get("cfg_pp")


def _prepared(model: EpsDenoiser, solver: str, steps: int, spacing: str, guidance: float,
              backend: str | None, graph: bool, options: dict):
    """(fused engine or None, sigma_max) for these settings, built once and kept with the model
    (plans and noise levels are host work: a traced or captured run must find them ready)."""
    cache = model.__dict__.setdefault(model.HOST_CACHE, {})
    key = (solver, steps, spacing, guidance, backend, graph, id(model.schedule),
           tuple(sorted(options.items())))
    if key not in cache:
        sigmas = _sigmas_of(model, steps, spacing)
        engine = None
        if backend is not None:
            from fastdiff.sampler import Sampler

            denoiser = model if _unguided(solver, guidance, options) else \
                guided(model, guidance)
            engine = Sampler(denoiser, solver, sigmas, backend=backend, graph=graph, **options)
        cache[key] = (engine, float(sigmas[0]))
    return cache[key]


def _sigmas_of(model: EpsDenoiser, steps: int, spacing) -> Tensor:
    """A spacing's name, or the schedule itself as a tuple (given sigmas)."""
    if isinstance(spacing, tuple):
        return torch.tensor(spacing, dtype=torch.float64)
    return digits_sigmas(model, steps, spacing)


def _with_progress(engine, network: nn.Module, disable: bool | None):
    """engine(x, **cond) with a tqdm bar over its model calls (a forward hook on the network)."""
    from tqdm.auto import tqdm

    def run(x: Tensor, **cond) -> Tensor:
        # (a replayed CUDA graph runs no Python: no hook would count its calls)
        bar = tqdm(total=engine.plan.nfe, disable=disable or engine.graph, unit="call")
        hook = network.register_forward_hook(lambda *_: bar.update())
        try:
            return engine(x, **cond)
        finally:
            hook.remove()
            bar.close()

    return run


def to_uint8(x: Tensor) -> np.ndarray:
    """[N, 1, H, W] in [-1, 1] -> uint8 [N, H, W] (0 = background, as the data: white ink on
    black)."""
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 1:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a [N, 1, H, W] tensor of images, got {got}")
    x = x.detach().double().cpu()
    if not bool(torch.isfinite(x).all()):  # (NaN would become an arbitrary byte)
        raise ValueError("x has non-finite values: no image to make")
    x = ((x.clamp(-1, 1) + 1) * 127.5).round()
    return x[:, 0].numpy().astype(np.uint8)


def make_grid(images: np.ndarray, nrow: int = 10, scale: int = 4, pad: int = 1) -> np.ndarray:
    """uint8 [N, H, W] -> one uint8 image of `nrow` columns, each cell upscaled `scale` times."""
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[0] == 0 or images.dtype != np.uint8:
        raise ValueError(f"images must be a non-empty uint8 array [N, H, W] (see to_uint8), got"
                         f" {images.dtype} {images.shape}")
    for name, value, low in (("nrow", nrow, 1), ("scale", scale, 1), ("pad", pad, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    n, h, w = images.shape
    ncol = min(nrow, n)
    rows = -(-n // ncol)
    big = images.repeat(scale, axis=1).repeat(scale, axis=2)
    hh, ww = h * scale + pad, w * scale + pad
    grid = np.full((rows * hh + pad, ncol * ww + pad), 64, dtype=np.uint8)
    for i in range(n):
        top, left = pad + (i // ncol) * hh, pad + (i % ncol) * ww
        grid[top: top + h * scale, left: left + w * scale] = big[i]
    return grid
