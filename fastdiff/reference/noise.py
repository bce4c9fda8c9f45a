"""Reference of the in-kernel noise: Philox4x32-10 (Salmon et al. 2011, "Parallel random
numbers: as easy as 1, 2, 3") and Box-Muller, the same function as csrc/include/fastdiff/philox.h
and the Triton kernel.

A value is a pure function of (seed, counter, element): counter words (element lo, element hi,
counter, salt), key (seed lo, seed hi), then a standard normal from the first two output words
in float64. uint32 arithmetic is emulated with int64 tensors.
"""

from __future__ import annotations

import math

import torch

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
SALT = 0x66646966  # "fdif"
MASK = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * b for a 32-bit constant a and uint32 values b (int64)."""
    p1 = b * (a & 0xFFFF)  # < 2^48
    p2 = b * (a >> 16)  # < 2^48
    t = p1 + ((p2 & 0xFFFF) << 16)  # < 2^49
    return ((t >> 32) + (p2 >> 16)) & MASK, t & MASK


def philox4x32_10(counter: list[torch.Tensor], key: tuple[torch.Tensor, torch.Tensor]):
    """Random123's philox4x32 with 10 rounds; counter words and key words as int64 tensors."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r > 0:
            k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
        hi0, lo0 = _mulhilo(M0, c0)
        hi1, lo1 = _mulhilo(M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_normal(seeds: torch.Tensor, counter: int, sample_numel: int) -> torch.Tensor:
    """Standard normals [B, sample_numel] (float64): row b from seeds[b], element e in the row."""
    seeds = seeds.to(torch.int64).reshape(-1, 1)
    element = torch.arange(sample_numel, dtype=torch.int64, device=seeds.device).reshape(1, -1)
    element, seeds = torch.broadcast_tensors(element, seeds)
    words = [element & MASK, element >> 32, torch.full_like(element, counter),
             torch.full_like(element, SALT)]
    out = philox4x32_10(words, (seeds & MASK, (seeds >> 32) & MASK))
    u1 = (out[0].double() + 1.0) * 2.0**-32
    u2 = out[1].double() * 2.0**-32
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
