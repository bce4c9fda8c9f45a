"""Schedule tables: the device kernel against the host float64 path plus its host-to-device copy.

What a sampling request with new settings pays for its tables before the first step. Every
implementation writes the same preallocated float64 buffer on the device: "reference" is the
host path (fastdiff.reference.schedule, from fastdiff.schedules / spacings) and one copy into
it; "cuda" and "triton" are one launch with the settings as kernel arguments; on CPU, "cpu" is
the native launcher. On a GPU the median CUDA-event time is recorded too (gpu_ms).
"""

from __future__ import annotations

import pytest
import torch

from fastdiff.ops import BACKENDS, schedule_tables, unavailable_reason
from fastdiff.ops.schedule import buffer_numel

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
BACKENDS_HERE = [b for b in BACKENDS if b == "reference" or not unavailable_reason(b, DEVICE)]
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SETTINGS = {  # name -> spec: Stable Diffusion's usual requests and a long cosine one
    "sd-euler-trailing-karras-30": dict(num_inference_steps=30, **SD, spacing="trailing",
                                        grid="karras"),
    "sd-zsnr-dpmsolver-leading-50": dict(num_inference_steps=50, **SD, steps_offset=1,
                                         rescale_betas_zero_snr=True, spacing="leading",
                                         family="dpmsolver", grid="exponential"),
    "cosine-ddim-linspace-1000": dict(num_inference_steps=1000,
                                      beta_schedule="squaredcos_cap_v2", family="ddim"),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("backend", BACKENDS_HERE)
def bench_schedule_tables(benchmark, backend, setting):
    if backend == "triton" and not HAS_CUDA:
        pytest.skip("the Triton interpreter is for correctness, not timing")
    spec = SETTINGS[setting]
    out = torch.empty(buffer_numel(spec["num_inference_steps"]), dtype=torch.float64,
                      device=DEVICE)

    def fn():
        return schedule_tables(**spec, out=out, backend=backend)

    fn()  # warm-up (Triton compiles, the reference imports numpy-side modules)
    benchmark.group = f"schedule_tables {setting}"
    if HAS_CUDA:
        from triton.testing import do_bench

        benchmark.extra_info.update(gpu_ms=do_bench(fn, warmup=25, rep=100,
                                                    return_mode="median"),
                                    device=torch.cuda.get_device_name())

        def synced():
            fn()
            torch.cuda.synchronize()

        benchmark(synced)
    else:
        benchmark(fn)
