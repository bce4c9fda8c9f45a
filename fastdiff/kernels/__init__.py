"""Triton kernels, one file per op family, each beside its launcher. Imported lazily by
fastdiff.ops (importing triton is slow, and TRITON_INTERPRET must be set before it)."""
