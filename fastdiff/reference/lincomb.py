"""Reference of the fused linear combination: the specification every backend must match.

    out_j = sum_k coef[row, j, k] * in_k        (j < num_out <= 2, k < num_in <= 6)

Accumulation happens in the coefficients' dtype (float32, or float64 for float64 data), in the
order k = 0, 1, ... starting from the first term, as the kernels do; each output is rounded
once to the data dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def lincomb(
    inputs: Sequence[torch.Tensor], coef: torch.Tensor, row: int | torch.Tensor = 0
) -> list[torch.Tensor]:
    rows, num_out, num_in = coef.shape
    if isinstance(row, torch.Tensor):
        # A device-resident row is not checked on the host (that would sync); out of range
        # gives NaN coefficients, exactly as the kernels do.
        r = row.reshape(())
        valid = (r >= 0) & (r < rows)
        c = torch.where(valid, coef[r.clamp(0, rows - 1)], torch.full_like(coef[0], float("nan")))
    else:
        c = coef[row]
    outputs = []
    for j in range(num_out):
        acc = c[j, 0] * inputs[0].to(coef.dtype)
        for k in range(1, num_in):
            acc = acc + c[j, k] * inputs[k].to(coef.dtype)
        outputs.append(acc.to(inputs[0].dtype))
    return outputs
