"""Guard without a GPU: every Triton kernel in fastdiff/kernels/ compiles ahead of time for
Hopper (sm_90, Triton's own ptxas) over the specialisations its launcher really produces
(recorded from the public ops and the Sampler, tests/_triton_aot.py), within the target's
shared memory, with the step math not FMA-contracted and fp64 kernels given no fp32 scalars.
`python tests/_triton_aot.py` writes the registers / spills / shared-memory table."""

from __future__ import annotations

import importlib

import pytest

triton = pytest.importorskip("triton")
if not hasattr(importlib.import_module("triton.runtime.jit").JITFunction, "_pack_args"):
    pytest.skip(f"triton {triton.__version__} lacks the launch binder this guard reuses (CI runs"
                " triton 3.9)", allow_module_level=True)

from _triton_aot import DTYPES, SMEM_LIMIT, all_launches, compile_recorded, selected  # noqa: E402

TYPE = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32",
        "torch.float64": "fp64"}
# the data dtypes each family's triton backend takes (attention: no fp64; schedule: fp64 tables)
FAMILY_DTYPES = {"lincomb": DTYPES, "threshold": DTYPES, "group_norm": DTYPES,
                 "attention": DTYPES[:3], "schedule": DTYPES[3:]}
STEP_KERNELS = ("lincomb_kernel", "dynamic_threshold_kernel")


@pytest.fixture(scope="module")
def compiled():
    launches = all_launches()
    return launches, compile_recorded(launches)


def _entry_points(family: str) -> list[str]:
    """The kernels a family's launcher launches: its *_kernel functions."""
    module = importlib.import_module(f"fastdiff.kernels.{family}")
    return [name for name in vars(module) if name.endswith("_kernel")]


def _data_type(result) -> str:
    """The element type of the kernel's first pointer argument (its data)."""
    return next(t[1:] for t in result["signature"].values() if t.startswith("*"))


def test_every_kernel_compiles_for_sm90(compiled):
    _, out = compiled
    errors = [f"{r['kernel']} [{r['label']}]: {r['error']}" for r in out["results"] if r["error"]]
    assert not errors, "\n".join(errors)


def test_every_kernel_is_compiled_in_every_dtype(compiled):
    _, out = compiled
    for family in selected():
        for kernel in _entry_points(family):
            seen = {_data_type(r) for r in out["results"] if r["kernel"] == kernel}
            wanted = {TYPE[str(d)] for d in FAMILY_DTYPES[family]}
            if kernel in ("finalize_kernel",):  # reads the fp32 / fp64 partial moments
                wanted = {"fp32", "fp64"}
            assert wanted <= seen, f"{kernel}: compiled for {sorted(seen)}"


def test_launches_include_ints_equal_to_one(compiled):
    """Triton turns an int argument equal to 1 into a constant: the recorded launches must
    contain them (the engine's second noise draw has counter 1, a one-step plan row 1)."""
    launches, _ = compiled
    if "lincomb" not in selected():
        pytest.skip("lincomb is not compiled in this run (FASTDIFF_AOT_ONLY)")
    engine = [la for la in launches if la.kernel == "lincomb_kernel" and " " in la.label
              and not la.label.startswith("op ")]
    names = ("counter0", "counter1", "row")
    for name in names:
        index = 16 + names.index(name) if name != "row" else 11
        assert any(la.args[index] == 1 for la in engine), f"no engine launch with {name} = 1"


def test_shared_memory_within_the_target(compiled):
    _, out = compiled
    over = [(r["kernel"], r["label"], r["shared"]) for r in out["results"]
            if not r["error"] and r["shared"] > SMEM_LIMIT]
    assert not over, over


def test_step_kernels_are_not_fma_contracted(compiled):
    """No fma.rn.f32 in the step kernels' PTX, and no fma.rn.f64 but libdevice's, inside the
    in-kernel normal draws: NNOISE times the count of one draw (measured on a kernel of that
    draw alone, same BLOCK and warps). A contracted product-sum adds to either count."""
    _, out = compiled
    assert out["noise_fma"] > 0  # libdevice's log/cos are FMA-based: the count is measured
    step = [r for r in out["results"] if r["kernel"] in STEP_KERNELS and not r["error"]]
    if {"lincomb", "threshold"} <= set(selected()):
        assert {r["kernel"] for r in step} == set(STEP_KERNELS)
    for r in step:
        where = f"{r['kernel']} [{r['label']}]"
        assert not r["fp_fusion"], f"{where} launched with FP fusion"
        assert r["fma_f32"] == 0, f"{where}: {r['fma_f32']} fma.rn.f32"
        assert r["fma_f64"] == r["nnoise"] * r["draw_fma"], (
            f"{where}: {r['fma_f64']} fma.rn.f64 with {r['nnoise']} normal draws of"
            f" {r['draw_fma']} each")


def test_group_norm_is_not_fma_contracted(compiled):
    _, out = compiled
    for r in out["results"]:
        if r["kernel"] in _entry_points("group_norm") and not r["error"]:
            assert not r["fp_fusion"] and r["fma_f32"] == 0, (r["kernel"], r["label"])


def test_fp64_kernels_take_no_fp32_scalars(compiled):
    """A Python float argument is typed fp32 by a compiled launch (the interpreter keeps it
    float64): kernels on fp64 data must take float64 values as their bit patterns."""
    _, out = compiled
    for r in out["results"]:
        types = r["signature"].values()
        if "*fp64" in types:
            assert "fp32" not in types, f"{r['kernel']} [{r['label']}]: {r['signature']}"


def test_split_stages_are_among_the_compiled_launches(compiled):
    """A stage wider than the kernel's inputs runs as two launches (a partial sum T first,
    fastdiff.solvers.lowering's split): with a guided epsilon network and drawn noise some
    solvers have such stages (PLMS at the recorded 4 steps), and every launch of their plans,
    the partial sums included, is among the recorded (so compiled) ones."""
    from fastdiff.denoisers import CFGDenoiser, Denoiser
    from fastdiff.reference.solvers import SOLVERS
    from fastdiff.sampler import Sampler
    from fastdiff.spacings import get_sigmas_karras

    launches, _ = compiled
    if "lincomb" not in selected():
        pytest.skip("lincomb is not compiled in this run (FASTDIFF_AOT_ONLY)")
    cfg = CFGDenoiser(Denoiser(lambda x, t, cond=None: x * 0.5, "epsilon"), 2.5)
    split = {}
    for name, solver in SOLVERS.items():
        if solver.param == "flow":
            continue
        try:
            sampler = Sampler(cfg, name, get_sigmas_karras(4, 0.03, 14.6), backend="triton",
                              noise="generator")
        except (RuntimeError, ValueError):  # no plan for this combination
            continue
        if any(o.startswith("T") for la in sampler.launches for o in la.outputs):
            split[name] = len(sampler.launches)
    assert "plms" in split, f"no split stage at 4 steps any more (split: {sorted(split)})"
    for name, count in split.items():
        recorded = [la for la in launches if la.module == "lincomb"
                    and la.label == f"{name} guided eps drawn noise torch.float32"]
        assert len(recorded) == count, name
