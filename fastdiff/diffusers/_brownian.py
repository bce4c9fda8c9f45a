"""Brownian-tree noise in the drop-ins (DPMSolverSDEScheduler, CosineDPMSolverMultistepScheduler).

These steps draw their noise from diffusers' `BrownianTreeNoiseSampler` (torchsde's
BrownianInterval; k-diffusion's DPM-Solver++(2M) SDE noise, Karras et al. 2022 Sec. 4 use the
same construction): noise(s, s') = W(t') - W(t) over |t' - t|**0.5, with W a Brownian path fixed
by a seed, t = transform(s). The increment depends on the seed, the interval and the sample's
shape, dtype and device, never on the data, so it is one more input of the linear step: the
trace hands diffusers' step a recording stand-in for the sampler, which returns a fresh symbol
over the divisor and notes the interval; the fused step evaluates the scheduler's real tree on
exactly that interval (the same float values diffusers passes to torchsde), so the noise is
bitwise diffusers' for the same seed and only the final combination is fused.

The sampler is built at the first step, as diffusers builds it there, with the seed diffusers
would use (the config's `noise_sampler_seed`, or the generator's `initial_seed()` for the cosine
scheduler; without one, the same draw from torch's global CPU generator diffusers makes). Its
range comes from the twin's host schedule, so no value of the caller's tensors is read; the
construction's own scalar work is on fastdiff's CPU numbers (torchsde converts its interval to
floats) and runs with the caller's torch modes suspended.
"""

from __future__ import annotations

import torch

_context: list | None = None  # [plan, fresh] of the step being traced


def _identity(x):
    return x


class Recording:
    """Stands in for a BrownianTreeNoiseSampler while a step is traced. Named like diffusers'
    class so that a traced state's key (which names an object by its type) matches the
    caller's state holding the real sampler."""

    def __init__(self, transform=_identity, init: tuple | None = None):
        self.transform = transform
        self.init = init  # (sigma_min, sigma_max, seed, transform) when the step built it

    def __call__(self, sigma, sigma_next):
        plan, fresh = _context
        t0 = self.transform(torch.as_tensor(sigma))
        t1 = self.transform(torch.as_tensor(sigma_next))
        divisor = (t1 - t0).abs().sqrt()  # diffusers' own float32 divisor
        k = len(plan.noise_f32)
        plan.noise_f32.append(False)
        plan.brownian[k] = (float(t0), float(t1))
        return fresh(("noise", k)) / divisor


Recording.__name__ = Recording.__qualname__ = "BrownianTreeNoiseSampler"


def install(module, attrs: dict, plan, fresh):
    """Before a traced step: diffusers' sampler class in `module` and every sampler in the
    twin's state replaced by recording stand-ins. Returns what uninstall() restores."""
    global _context
    real = getattr(module, "BrownianTreeNoiseSampler", None)
    if real is None:
        return None

    def build(x, sigma_min, sigma_max, seed=None, transform=_identity):
        return Recording(transform, (float(sigma_min), float(sigma_max), seed, transform))

    for name, value in list(attrs.items()):
        if isinstance(value, real):
            attrs[name] = Recording(value.transform)
    module.BrownianTreeNoiseSampler = build
    _context = [plan, fresh]
    return module, real


def uninstall(saved) -> None:
    global _context
    if saved is not None:
        module, real = saved
        module.BrownianTreeNoiseSampler = real
        _context = None


def finish(plan) -> None:
    """After the trace: a sampler the step built is not a constant of the plan; the fused
    step builds the real one (plan.sampler_init)."""
    for entry in list(plan.consts):
        target, value = entry
        if isinstance(value, Recording) and value.init is not None:
            plan.consts.remove(entry)
            plan.sampler_init = (target, value.init)


def build(sched, init: tuple, like: torch.Tensor, generator) -> object:
    """The real sampler, as diffusers' step would build it here: BrownianTreeNoiseSampler's own
    three lines, with its range converted to floats on the host first (torchsde converts it
    to floats anyway) so that only the tree's device draws touch the caller's device."""
    from diffusers.schedulers.scheduling_dpmsolver_sde import (
        BatchedBrownianTree,
        BrownianTreeNoiseSampler,
    )

    from fastdiff.diffusers._shared import host_only

    sigma_min, sigma_max, seed, transform = init
    if type(sched)._fd_seed_from_generator:
        seed = None
        if generator is not None:  # CosineDPMSolverMultistep's rule
            seed = ([g.initial_seed() for g in generator] if isinstance(generator, list)
                    else generator.initial_seed())
    with host_only():
        if seed is None:  # the draw BatchedBrownianTree makes, from the global CPU generator
            seed = torch.randint(0, 2**63 - 1, []).item()
        t0 = float(transform(torch.as_tensor(sigma_min)))
        t1 = float(transform(torch.as_tensor(sigma_max)))
    sampler = BrownianTreeNoiseSampler.__new__(BrownianTreeNoiseSampler)
    sampler.transform = transform
    sampler.tree = BatchedBrownianTree(like, t0, t1, seed)
    return sampler


def increment(sampler, t0: float, t1: float) -> torch.Tensor:
    """W(t1) - W(t0) of the sampler's tree (diffusers divides it by |t1 - t0|**0.5; the plan's
    coefficient holds that division): BatchedBrownianTree's own arithmetic, without the
    stack-and-index round trip for a single tree (a sign flip is exact either way)."""
    tree = sampler.tree
    a, b, sign = tree.sort(t0, t1)
    if tree.batched:
        return torch.stack([t(a, b) for t in tree.trees]) * (tree.sign * sign)
    return tree.trees[0](a, b) * (tree.sign * sign)
