"""The fused step's launch: a traced StepPlan applied to the tensors of one `step` call.

Host bookkeeping only (no value is read back, see _fused.py): the inputs the plan reads (sample,
model output, history in diffusers' attributes, drawn noise, a Brownian increment), the
clip_sample / thresholding bounds, one fastdiff.ops.lincomb launch per chunk, then diffusers'
attributes and output written from the results. Split from _fused.py, which finds the plan.
"""

from __future__ import annotations

import torch

from fastdiff.diffusers import _brownian, _learned
from fastdiff.diffusers._trace import Clip, StepPlan, get_slot, set_slot
from fastdiff.ops import dynamic_threshold
from fastdiff.ops._backends import resolve
from fastdiff.ops.lincomb import MAX_INPUTS, launch_unchecked, lincomb, same_dense_layout
from fastdiff.ops.threshold import static_bounds


def run(self, plan: StepPlan, model_output, timestep, sample, generator, variance_noise,
        return_dict, inputs: dict | None = None):
    """`plan` applied to this call's tensors (self: the scheduler, a FusedStepMixin)."""
    predicted_variance = None
    if _learned.mode(self) is not None:
        model_output, predicted_variance = _learned.split(self, model_output, sample)
    if model_output.device != sample.device:
        raise ValueError(f"model_output is on {model_output.device}, the sample on"
                         f" {sample.device}: expected one device")
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output has shape {tuple(model_output.shape)}, expected the"
                         f" sample's {tuple(sample.shape)}")
    dtype = (model_output.dtype if sample.dtype == model_output.dtype
             else torch.promote_types(sample.dtype, model_output.dtype))
    device = model_output.device
    coef_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tables = plan.window.tables(device, coef_dtype)[plan.slot_in_window]

    values = {("sample",): sample if sample.dtype == dtype else sample.to(dtype),
              ("model_output",): model_output if model_output.dtype == dtype
              else model_output.to(dtype), ("timestep",): timestep}
    for name, tensor in (inputs or {}).items():
        if tensor is None:
            continue
        if tensor.shape != sample.shape or tensor.device != sample.device:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} on {tensor.device},"
                             f" expected the sample's {tuple(sample.shape)} on"
                             f" {sample.device}")
        values[("arg", name)] = tensor if tensor.dtype == dtype else tensor.to(dtype)
    sampler = None
    if plan.sampler_init is not None:  # the step builds its Brownian tree (_brownian.py)
        sampler = _brownian.build(self, plan.sampler_init[1], values[("sample",)], generator)
        set_slot(self, plan.sampler_init[0], sampler)
    for k, f32 in enumerate(plan.noise_f32):
        if k in plan.brownian:
            sampler = sampler if sampler is not None else self.noise_sampler
            noise = _brownian.increment(sampler, *plan.brownian[k])
            values[("noise", k)] = noise.to(device=device, dtype=dtype)
            continue
        if variance_noise is not None and len(plan.noise_f32) == 1:
            noise = variance_noise
        else:
            from diffusers.utils.torch_utils import randn_tensor

            noise_dtype = torch.float32 if (f32 or self._fd_noise_f32) else model_output.dtype
            noise = randn_tensor(model_output.shape, generator=generator, device=device,
                                 dtype=noise_dtype)
        values[("noise", k)] = noise.to(device=device, dtype=dtype)
    if plan.learned is not None:  # DDPM's learned std, per element
        values[("noise", 0)] = _learned.scaled_noise(plan.learned, predicted_variance,
                                                     values[("noise", 0)])

    def read(source):
        return values[source] if source in values else get_slot(self, source)

    results = {}  # targets; every source is read before anything is written
    for chunk, coef in zip(plan.chunks, tables):
        inputs = [read(s) for s in chunk.sources]
        clip = clip_bounds(self, chunk.clip, inputs, coef) if chunk.clip else None
        results.update(zip(chunk.targets,
                           launch(inputs, coef, self.fastdiff_backend, clip)))
    for target, source in plan.moves:
        results[target] = read(source)
        if (source == ("timestep",) and isinstance(timestep, torch.Tensor)
                and timestep.dim() == 0 and isinstance(plan.timestep, torch.Tensor)):
            known = self._fd_state().host_values  # its value, for later traces
            known[id(timestep)] = (timestep, plan.timestep)
            while len(known) > 64:  # (older entries have left the state)
                del known[next(iter(known))]
    for target, value in plan.consts:
        results[target] = value
    attrs = self.__dict__
    for name, length in plan.list_lengths.items():
        current = attrs.get(name)
        if isinstance(current, list):
            current[:] = [None] * length  # in place, as diffusers updates its lists
        else:
            attrs[name] = [None] * length
    fields = {}
    for target, value in results.items():
        if target[0] == "field":
            fields[target[1]] = value
        else:
            set_slot(self, target, value)
    for name in plan.deleted:
        attrs.pop(name, None)
    result = [fields.get(name) for name in plan.out_fields]
    if not return_dict or plan.out_cls is tuple:  # (CogVideoXDPM returns bare tuples)
        return tuple(result)
    return plan.out_cls(**dict(zip(plan.out_fields, result)))


def clip_bounds(self, clip: Clip, inputs, coef) -> torch.Tensor:
    """Per-sample (bound, divisor) of the kernel's clip: clip_sample's fixed range, or
    dynamic thresholding's s from the fused quantile reduction (no host sync)."""
    x = inputs[0]
    if clip.kind == "dynamic":
        ratio, max_value = clip.params
        if is_fake(x):  # FakeTensorMode: through the torch.library op's fake
            return torch.ops.fastdiff.dynamic_threshold(list(inputs), coef, None, 0, ratio,
                                                        max_value, self.fastdiff_backend)
        return dynamic_threshold(inputs, coef, 0, ratio, max_value,
                                 backend=self.fastdiff_backend)
    key = (clip.params, x.shape[0], coef.dtype, x.device)
    cache = self._fd_state().clips
    if key not in cache:
        cache[key] = static_bounds(clip.params[0], x.shape[0], coef.dtype, x.device)
    return cache[key]


_BACKENDS: dict = {}


_FAKE: list = []  # FakeTensor, imported at the first launch


def is_fake(t: torch.Tensor) -> bool:
    if not _FAKE:
        from torch._subclasses.fake_tensor import FakeTensor

        _FAKE.append(FakeTensor)
    return isinstance(t, _FAKE[0])


def launch(inputs: list[torch.Tensor], coef: torch.Tensor, backend: str = "auto",
            clip: torch.Tensor | None = None) -> list[torch.Tensor]:
    """lincomb, split into a partial sum when there are more inputs than one launch takes.
    step() already guarantees what lincomb validates (one shape, dtype and device, coef in the
    accumulation dtype on that device), so a shared dense layout goes straight to the kernel.
    Fake tensors (FakeTensorMode, torch.compile) go through the torch.library op."""
    x0 = inputs[0]
    if len(inputs) <= MAX_INPUTS and (torch.compiler.is_compiling() or is_fake(x0)):
        return list(torch.ops.fastdiff.lincomb(list(inputs), coef, None, 0, backend, None, [],
                                               clip))
    if len(inputs) <= MAX_INPUTS:
        if same_dense_layout(inputs, batch_outermost=clip is not None):
            key = (backend, x0.device)
            kernel = _BACKENDS.get(key)
            if kernel is None:
                kernel = _BACKENDS[key] = resolve(backend, x0.device)
            outs = [torch.empty_like(x0) for _ in range(coef.shape[1] - (clip is not None))]
            if x0.numel():
                launch_unchecked(inputs, coef, 0, outs, kernel, clip=clip)
            return outs
        return lincomb(inputs, coef, 0, clip=clip, backend=backend)
    if clip is not None:  # never split: the clip row must see every input (DPM-Solver order 3
        # with thresholding reads 4)
        raise RuntimeError(f"fastdiff.diffusers: a clipped step reading {len(inputs)} tensors;"
                           f" the fused kernel takes {MAX_INPUTS}")
    nout, head = coef.shape[1], MAX_INPUTS
    partial = lincomb(inputs[:head], coef[:, :, :head].contiguous(), 0, backend=backend)
    ident = torch.eye(nout, dtype=coef.dtype, device=coef.device).unsqueeze(0)
    rest = torch.cat([ident, coef[:, :, head:]], dim=2).contiguous()
    return launch(partial + inputs[head:], rest, backend)
