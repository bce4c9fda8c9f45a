"""Shared test configuration: the tolerance table (as the `tol` fixture; test modules do not
import conftest, whose name is shared with benchmarks/), the gpu marker's skip and the
cuda_graph marker.

(TRITON_INTERPRET is set in the root conftest.py, before triton can be imported.)
"""

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# One tolerance table per dtype, for fused-vs-reference comparisons of elementwise ops that
# accumulate in fp32. Low-precision rows follow FlashAttention's rule of thumb (error at most
# ~2x the dtype's own rounding error): a few ulps of the output dtype.
TOLERANCES = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


@pytest.fixture
def tol():
    """tol(dtype) -> dict(atol=..., rtol=...) for torch.testing.assert_close."""
    return TOLERANCES.__getitem__


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of many small ops: on a shared 2-core runner, intra-op
    threads waiting for each other make them several times slower than one thread."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def pytest_collection_modifyitems(config, items):
    # CUDA-graph tests (their names say so: test_graph.py, *graph*): scripts/sanitize.sh runs them
    # without PYTORCH_NO_CUDA_MEMORY_CACHING=1, under which every allocation in a capture fails.
    for item in items:
        module = getattr(getattr(item, "module", None), "__name__", "")
        if "graph" in item.name.lower() or module.endswith("test_graph"):
            item.add_marker(pytest.mark.cuda_graph)
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
