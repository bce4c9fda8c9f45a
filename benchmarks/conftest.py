"""Benchmark fixtures: the device, GPU-correct timing, and the peak measured in the same run.

On a GPU, times come from CUDA events (triton.testing.do_bench: warm-up, L2 flushed between
runs, median) and every result carries GB/s and the fraction of a large device-to-device copy's
bandwidth measured in this same session. On CPU (CI's quick mode, --benchmark-disable) each
benchmark simply executes once, so the suite cannot rot.
"""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def gpu_time_ms(fn) -> float:
    """Median time of fn() in ms from CUDA events, cold L2 (do_bench flushes it)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


@pytest.fixture(scope="session")
def copy_bandwidth() -> float | None:
    """Device-to-device copy bandwidth in GB/s (read + write bytes), measured once per run."""
    if not HAS_CUDA:
        return None
    src = torch.empty(2**28, dtype=torch.uint8, device=DEVICE)  # 256 MiB >> L2
    dst = torch.empty_like(src)
    ms = gpu_time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


@pytest.fixture
def measure(benchmark, copy_bandwidth):
    """measure(fn, nbytes): runs fn under pytest-benchmark; on a GPU also records CUDA-event
    time, GB/s and the fraction of the copy bandwidth in the result's extra_info."""

    def run(fn, nbytes: int):
        if HAS_CUDA:
            ms = gpu_time_ms(fn)
            gbps = nbytes / (ms * 1e-3) / 1e9
            benchmark.extra_info.update(
                gpu_ms=ms, gbps=gbps, copy_gbps=copy_bandwidth,
                fraction_of_copy_bandwidth=gbps / copy_bandwidth,
                device=torch.cuda.get_device_name())

            def synced():
                fn()
                torch.cuda.synchronize()

            return benchmark(synced)
        benchmark.extra_info["nbytes"] = nbytes
        return benchmark(fn)

    return run
