"""The drop-in schedulers' hot loop on "cuda" tensors, without a GPU: FakeTensorMode makes
tensors on device "cuda" on a CPU-only build, and raises on any data-dependent host read
(.item(), bool(), nonzero()) of them and on a device mix-up. A TorchDispatchMode on top counts
every host<->device copy. For every class: scale_model_input / step / add_noise (scale_noise
for flow matching) over two loops after set_timesteps on the host. Each loop reads no device
value and makes no device-to-host copy; the first loop's only host-to-device copies are the
coefficient uploads of the steps it traces (one per traced batch: about log2(steps)), the
second loop (same settings, as a pipeline's next call) makes none at all.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

F = pytest.importorskip("fastdiff.diffusers")
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from fastdiff.diffusers._loops import Stepper, loop_timesteps  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops on a shared runner
aten = torch.ops.aten
SHAPE = (2, 4, 8, 8)
STEPS = 9
THRESH = dict(thresholding=True, sample_max_value=2.5)
CASES = [(name, {}) for name in F.__all__] + [
    ("DPMSolverMultistepScheduler", THRESH), ("DDPMScheduler", dict(clip_sample=False, **THRESH)),
    ("UniPCMultistepScheduler", dict(solver_order=3))]


class Transfers(TorchDispatchMode):
    """Records host<->device copies and value reads of device tensors."""

    def __init__(self):
        super().__init__()
        self.h2d, self.d2h, self.reads = [], [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten._to_copy.default, aten.copy_.default):
            src = args[0] if func is aten._to_copy.default else args[1]
            dst = kwargs.get("device") or (args[0].device if func is aten.copy_.default
                                           else src.device)
            dst = torch.device(dst)
            if src.device.type == "cpu" and dst.type == "cuda":
                self.h2d.append(tuple(src.shape))
            elif src.device.type == "cuda" and dst.type == "cpu":
                self.d2h.append(tuple(src.shape))
        if func in (aten._local_scalar_dense.default, aten.nonzero.default,
                    aten.is_nonzero.default):
            if any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args):
                self.reads.append(func)
        return func(*args, **kwargs)


def uploads(sched, device) -> int:
    windows = {id(p.window): p.window for p in sched._fd_state().shared.plans.values()
               if getattr(p, "window", None) is not None}
    return sum((device, torch.float32) in w.copies for w in windows.values())


BROWNIAN = {"DPMSolverSDEScheduler", "CosineDPMSolverMultistepScheduler"}


def seedless_tree_draws(monkeypatch) -> None:
    """torchsde seeds a torch.Generator on the sample's device for every draw of its Brownian
    tree, which a CPU-only build cannot create for "cuda" (test below): for the two Brownian
    classes the draw is replaced by an unseeded one of the same shape, dtype and device; the
    tree walk, the sampler's construction and the fused step run as they do on a GPU."""
    from torchsde._brownian import brownian_interval

    monkeypatch.setattr(brownian_interval, "_randn",
                        lambda size, dtype, device, seed: torch.randn(size, dtype=dtype,
                                                                      device=device))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the reason only holds without CUDA")
def test_why_the_brownian_draws_are_replaced():
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.Generator("cuda")


@pytest.mark.parametrize("name,config", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_loop_on_fake_cuda_is_sync_and_copy_free(name, config, monkeypatch):
    import fastdiff.diffusers._shared as shared

    if name in BROWNIAN:
        seedless_tree_draws(monkeypatch)

    shared._SHARED.clear()  # a cold start: the first loop traces
    sched = getattr(F, name)(**config)
    device = torch.device("cuda", 0)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        x0 = torch.randn(SHAPE, device=device)
        eps = torch.randn(SHAPE, device=device)
        noised_t = None
    flow = hasattr(sched, "scale_noise")
    own_noise = sched._fd_noise_formula is not None
    per_loop = []
    for loop in range(2):
        sched.set_timesteps(STEPS)  # on the host, before the loop
        with mode:
            if noised_t is None:  # the caller's device timesteps (its own copy, not counted)
                noised_t = sched.timesteps[:1].to(device).expand(SHAPE[0])
            with Transfers() as seen:
                # (DDIM/DDPM/PNDM/LCM keep diffusers' own add_noise, an alphas_cumprod gather
                # that fake "cuda" tensors cannot index on a CPU-only build)
                x = x0
                if own_noise:
                    x = (sched.scale_noise(x0, noised_t, eps) if flow
                         else sched.add_noise(x0, eps, noised_t))
                assert x.device == device
                step = Stepper(sched)
                for t in loop_timesteps(sched):
                    inp = (sched.scale_model_input(x, t)
                           if hasattr(sched, "scale_model_input") else x)
                    assert inp.device == device
                    kwargs = ({"generator": None}
                              if "generator" in inspect.signature(sched.step).parameters else {})
                    x = step(eps * 0.5 + inp * 0.1, t, x, **kwargs).prev_sample
                    assert x.device == device and x.shape == SHAPE
        per_loop.append(seen)
        if loop == 0:
            after_first = uploads(sched, device)
        assert seen.reads == [] and seen.d2h == [], (seen.reads, seen.d2h)
    first, second = per_loop
    tables = uploads(sched, device)
    schedule_copies = 2 if own_noise else 0  # add_noise's sigmas and timesteps, once
    assert 0 < tables <= len(sched.timesteps).bit_length() + 1
    assert len(first.h2d) == after_first + schedule_copies, first.h2d
    assert second.h2d == [] and tables == after_first, second.h2d


def test_the_watch_sees_what_the_old_add_noise_did():
    """Positive control: the per-call `self.sigmas.to(device)` of the old add_noise is an H2D
    copy the mode records, and a device read raises under FakeTensorMode."""
    sched = F.EulerDiscreteScheduler()
    sched.set_timesteps(4)
    device = torch.device("cuda", 0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(SHAPE, device=device)
        with Transfers() as seen:
            sched.sigmas.to(device=device, dtype=x.dtype)
        assert seen.h2d == [tuple(sched.sigmas.shape)]
        with pytest.raises(Exception, match="item|[Dd]ata.dependent|_local_scalar_dense"):
            x.sum().item()
