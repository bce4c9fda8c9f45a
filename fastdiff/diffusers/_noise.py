"""`add_noise` / `scale_noise` of the sigma-indexed drop-ins, without a host sync.

diffusers' sigma-based schedulers look each timestep up with `nonzero()` + `.item()` (one sync
per sample) and index `sigmas` with a host list. Here the lookup is a comparison against the
schedule on the device and a gather; the arithmetic after it is diffusers' own expression, so
the result is bitwise diffusers'. The schedule's device copies are made once per (schedule,
device, dtype) from pinned memory without blocking, and the NaN of an unknown timestep is a fill
on the device, so a loop of add_noise calls makes no host-device copy after the first.
(DDIM/DDPM/PNDM/LCM index `alphas_cumprod` with the device timesteps directly: already
sync-free after diffusers' own first copy, left as diffusers has them.)
"""

from __future__ import annotations

import torch

# how the noised sample is formed once sigma is found
SIGMA = "sigma"  # x + noise * sigma
ALPHA_SIGMA = "alpha_sigma"  # alpha_t x + sigma_t noise
FLOW = "flow"  # scale_noise: sigma noise + (1 - sigma) x


def device_key(device) -> torch.device:
    """torch.device("cuda") and "cuda:0" are one device: an index is always filled in."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device()
                              if torch.cuda.is_available() else 0)
    return device


def upload(host: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(device copy, host buffer to keep alive). On CUDA the copy is non-blocking from pinned
    memory (no host sync); the buffer is kept as long as the copy is, so a CUDA graph that
    captured the copy can be replayed."""
    if device.type == "cpu":
        return host.to(device), host
    if torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing():
        host = host.pin_memory()
    return host.to(device, non_blocking=True), host


class _Tables:
    """Device copies of one host tensor, per (device, dtype)."""

    def __init__(self, source: torch.Tensor):
        self.source = source
        self.copies: dict = {}

    def get(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        copy = self.copies.get(key)
        if copy is None:
            if self.source.device == device:
                copy = (self.source.to(dtype), None)
            elif self.source.device.type == "cpu":
                copy = upload(self.source.to(dtype), device)
            else:  # a schedule on another GPU: a device-to-device copy, no host involved
                copy = (self.source.to(device=device, dtype=dtype), None)
            self.copies[key] = copy
        return copy[0]


def _tables(sched, name: str, source: torch.Tensor) -> _Tables:
    """The cached device copies of the scheduler's `name` tensor. The one set_timesteps made
    is the same for every scheduler with these settings: its copies are shared (a pipeline
    calls set_timesteps on every call; the copies are made once); another tensor set from
    outside gets its own."""
    state = sched._fd_state()
    shared = state.shared
    if shared is not None and state.made.get(name) is source:
        cached = shared.noise_tables.get(name)
        if cached is None:
            cached = shared.noise_tables[name] = _Tables(shared.fresh[name])
        return cached
    cached = state.noise_tables.get(name)
    if cached is None or cached.source is not source:
        cached = state.noise_tables[name] = _Tables(source)
    return cached


def missing_index(sched) -> int | None:
    """What diffusers' index_for_timestep answers for a timestep not in the schedule: the last
    index (DPM-Solver family) or an IndexError (Euler family, None here). Asked of diffusers
    once per class, on a 2-element host schedule that cannot hold the probe."""
    from fastdiff.diffusers._shared import host_only

    cls = type(sched)
    if not hasattr(sched._fd_base, "index_for_timestep"):  # the inverse DPM-Solver: inline,
        cls._fd_missing_last = True  # the last index (its add_noise and _init_step_index)
    if "_fd_missing_last" not in cls.__dict__:
        with host_only():
            try:
                sched._fd_base.index_for_timestep(sched, torch.tensor(0.5),
                                                  torch.tensor([0., 1.]))
                cls._fd_missing_last = True
            except IndexError:
                cls._fd_missing_last = False
    return len(sched.timesteps) - 1 if cls._fd_missing_last else None


def step_indices(sched, timesteps, device: torch.device) -> torch.Tensor:
    """diffusers' per-sample step indices as an int64 device tensor, without a sync; -1 for a
    timestep diffusers would reject."""
    timesteps = torch.as_tensor(timesteps).reshape(-1)
    begin = sched.__dict__.get("_begin_index")  # (the inverse DPM-Solver has none)
    if begin is not None:  # diffusers: [step_index or begin_index] * batch
        index = sched.step_index if sched.step_index is not None else begin
        return torch.full((timesteps.shape[0],), index, dtype=torch.int64, device=device)
    schedule = sched.timesteps
    if not isinstance(schedule, torch.Tensor):
        schedule = torch.as_tensor(schedule)
    schedule = _tables(sched, "timesteps", schedule).get(device, schedule.dtype)
    # (unsqueeze / index_select rather than indexing: the same ops, and they also run on
    # FakeTensorMode's "cuda" tensors on a CPU-only build, where the CI checks this path)
    eq = schedule.unsqueeze(0) == timesteps.to(device).unsqueeze(1)
    count = eq.sum(1)
    # index_for_timestep: the second match when the timestep repeats, else the first
    want = torch.where(count > 1, 2, 1)
    index = (eq & (eq.cumsum(1) == want.unsqueeze(1))).int().argmax(1).long()
    fallback = missing_index(sched)
    if fallback is None and device.type == "cpu" and bool((count == 0).any()):
        bad = timesteps[(count == 0).cpu()].tolist()
        raise ValueError(f"timesteps {bad} are not in the scheduler's timesteps")
    # On a GPU an unknown timestep cannot raise without a sync: -1 makes its sigma NaN
    # (loud, like an out-of-range device row of the fused kernel).
    return torch.where(count == 0, -1 if fallback is None else fallback, index)


def sigma_at(sched, timesteps, like: torch.Tensor) -> torch.Tensor:
    sigmas = _tables(sched, "sigmas", sched.sigmas).get(like.device, like.dtype)
    index = step_indices(sched, timesteps, like.device)
    nan = torch.full((), float("nan"), dtype=like.dtype, device=like.device)
    sigma = torch.where(index >= 0, sigmas.index_select(0, index.clamp(min=0)), nan).flatten()
    while len(sigma.shape) < len(like.shape):
        sigma = sigma.unsqueeze(-1)
    return sigma


def add_noise(sched, original_samples, noise, timesteps):
    sigma = sigma_at(sched, timesteps, original_samples)
    if sched._fd_noise_formula == SIGMA:
        return original_samples + noise * sigma
    alpha_t, sigma_t = sched._sigma_to_alpha_sigma_t(sigma)
    return alpha_t * original_samples + sigma_t * noise


def scale_noise(sched, sample, timestep, noise=None):
    sigma = sigma_at(sched, timestep, sample)
    return sigma * noise + (1.0 - sigma) * sample
