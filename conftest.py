"""Root pytest configuration shared by tests/ and benchmarks/.

The Triton interpreter must be switched on before `triton` is first imported, so it is set
here, at collection time, whenever no CUDA device is visible: Triton kernels then run on CPU
tensors (small shapes only; the interpreter cannot do bf16 arithmetic).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
