"""CI guard without a GPU (issue 13, section 2): _C's CUDA kernels as ptxas built them.

The build records `ptxas -v` per kernel (fastdiff/_C.ptxas.txt; scripts/ptxas_report.py copies
it under benchmarks/results/). Asserted: sm_90 is among the built archs, the lincomb and
group-norm kernels spill nothing, and the step math is never an FMA: no FFMA in the SASS of the
unclipped fp32/fp16/bf16 lincomb kernels (the clipped ones divide, and IEEE division is FFMA
Newton steps), and no fma.f32 / unrounded mul/add.f32 in their PTX (nvcc's default
--fmad=true made `acc += c * x` an FFMA; ptxas fuses a plain mul.f32 + add.f32 too, never the
.rn forms). Skipped only where nvcc is absent.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("ptxas_report",
                                                  ROOT / "scripts" / "ptxas_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows, binaries, _ = mod.report(workdir=tmp_path_factory.mktemp("ptxas"))
    return mod, rows, binaries


def test_sm90_is_built_and_lincomb_and_group_norm_are_spill_free(report):
    mod, rows, binaries = report
    kernels = {r["kernel"] for r in rows}
    assert any("lincomb_kernel" in k for k in kernels)
    assert any("group_norm_kernel" in k for k in kernels)
    failures = [f for f in mod.check(rows, []) if "spills" in f or "sm_90" in f]
    assert failures == []


def test_the_step_math_has_no_fma(report):
    mod, rows, binaries = report
    assert mod.check([dict(r, spill_stores=0, spill_loads=0) for r in rows], binaries) == []


def test_the_checks_catch_a_contracted_step():
    """The PTX check on a contracted sum (what nvcc emits for `acc += c * x` by default) and on
    the rounded one the kernels use."""
    spec = importlib.util.spec_from_file_location("ptxas_report",
                                                  ROOT / "scripts" / "ptxas_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    entry = ".visible .entry _ZN8fastdiff14lincomb_kernelIfLi4ELb0ELi2EEEvNS_11LincombArgsIT_EE(\n"
    fused = entry + "\tfma.rn.f32 \t%f3, %f1, %f2, %f3;\n"
    plain = entry + "\tmul.f32 \t%f3, %f1, %f2;\n"
    rounded = entry + "\tmul.rn.f32 \t%f3, %f1, %f2;\n\tadd.rn.f32 \t%f4, %f3, %f3;\n"
    noise = entry + "\tfma.rn.f64 \t%fd3, %fd1, %fd2, %fd3;\n"  # Box-Muller's libdevice math
    assert len(mod.contracted_step_math(fused)) == 1
    assert len(mod.contracted_step_math(plain)) == 1
    assert mod.contracted_step_math(rounded) == []
    assert mod.contracted_step_math(noise) == []
