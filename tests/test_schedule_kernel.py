"""The schedule-tables op (fastdiff.ops.schedule_tables): every backend against the host float64
reference (fastdiff/reference/schedule.py) on every setting, the op against diffusers' own
schedulers, the buffer and API contracts, and the errors of bad specs.

Tolerance: the float64 row of the shared table (1e-12 relative + 1e-12 absolute; the absolute
part is for lambda = -log sigma near sigma = 1, whose absolute error is sigma's relative one).
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import pytest
import torch

from fastdiff import _native
from fastdiff import schedules as S
from fastdiff.ops import schedule_tables, unavailable_reason
from fastdiff.ops.schedule import BETAS, FAMILIES, FINAL_SIGMAS, GRIDS, SPACINGS, buffer_numel
from fastdiff.reference.schedule import schedule_tables as reference
from fastdiff.reference.schedule import tables_from_schedule

pytestmark = pytest.mark.filterwarnings(  # diffusers' np.array(copy=False) under numpy 2
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
CPU = torch.device("cpu")
# (backend, device): the native CPU launcher always; cuda and triton where they run here
# (triton on CPU tensors under the interpreter).
KERNELS = [(b, d) for b, d in [("cpu", CPU), ("cuda", DEVICE), ("triton", DEVICE)]
           if not unavailable_reason(b, d)]
INTERPRETED = [(b, d) for b, d in KERNELS if b == "triton" and d.type == "cpu"]
STEPS = (1, 2, 7, 50, 999, 1000)
U = 2.0**-24  # float32 unit roundoff (diffusers computes in float32)


def beta_range(beta_schedule: str) -> dict:
    start, end = (0.00085, 0.012) if beta_schedule == "scaled_linear" else (0.0001, 0.02)
    return dict(beta_start=start, beta_end=end)


def flat(table: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    return torch.cat([table.flatten(), train.flatten()])


def check_backends(want: torch.Tensor, kernels, tol, **spec) -> None:
    n = spec["num_inference_steps"]
    for backend, device in kernels:
        got = schedule_tables(**spec, device=device, backend=backend)
        assert got.buffer.dtype == torch.float64 and got.buffer.device.type == device.type
        assert got.table.shape == (5, n + 1) and got.train.shape == (2, 1000)
        torch.testing.assert_close(got.buffer.cpu(), want, **tol(torch.float64),
                                   msg=lambda m, b=backend: f"{b} {spec}: {m}")


@pytest.mark.parametrize("zero_snr", [False, True], ids=["", "zero_snr"])
@pytest.mark.parametrize("beta_schedule", BETAS)
def test_backends_match_reference(beta_schedule, zero_snr, tol, one_thread):
    """Every spacing x family x grid x final sigma x step count (3 x 3 x 4 x 2 x 6). Under the
    Triton interpreter (slow) each combination of the other settings runs with one family, in
    turn, so all of them meet every family."""
    sched = S.DiscreteVPSchedule.from_betas(beta_schedule, 1000, **beta_range(beta_schedule),
                                            rescale_betas_zero_snr=zero_snr)
    combos = itertools.product(SPACINGS, GRIDS, FINAL_SIGMAS, STEPS)
    for k, (spacing, grid, final, n) in enumerate(combos):
        for f, family in enumerate(FAMILIES):
            settings = dict(spacing=spacing, steps_offset=1, family=family, grid=grid, rho=7.0,
                            final_sigma=final)
            want = flat(*tables_from_schedule(sched, n, **settings,
                                              round_karras=beta_schedule != "squaredcos_cap_v2"))
            kernels = [bd for bd in KERNELS if bd not in INTERPRETED or f == k % 3]
            check_backends(want, kernels, tol, num_inference_steps=n, beta_schedule=beta_schedule,
                           **beta_range(beta_schedule), rescale_betas_zero_snr=zero_snr,
                           **settings)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_other_ranges_offsets_and_rho(spacing, tol, one_thread):
    """Other training lengths (odd ones too), beta ranges, offsets and rho values (under the
    Triton interpreter, one family per combination of the others, in turn)."""
    cases = [
        dict(beta_schedule="linear", num_train_timesteps=17, beta_start=0.001, beta_end=0.2),
        dict(beta_schedule="scaled_linear", num_train_timesteps=333, beta_start=0.0001,
             beta_end=0.03, rescale_betas_zero_snr=True),
        dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=4000),
        dict(beta_schedule="sigmoid", num_train_timesteps=2, beta_start=0.01, beta_end=0.5),
    ]
    combos = itertools.product(cases, [("discrete", 7.0), ("karras", 3.0),
                                       ("polyexponential", 0.5)], (0, 1), FAMILIES)
    for k, (case, (grid, rho), offset, family) in enumerate(combos):
        big_t = case["num_train_timesteps"]
        # one family per (case, grid, offset), in turn
        kernels = [bd for bd in KERNELS if bd not in INTERPRETED or k % 3 == (k // 3) % 3]
        for n in sorted({1, 2, min(13, big_t), min(big_t, 400)}):
            spec = dict(case, num_inference_steps=n, spacing=spacing, steps_offset=offset,
                        family=family, grid=grid, rho=rho)
            want = flat(*reference(**spec))
            for backend, device in kernels:
                got = schedule_tables(**spec, device=device, backend=backend)
                torch.testing.assert_close(got.buffer.cpu(), want, **tol(torch.float64),
                                           msg=lambda m, b=backend, s=spec: f"{b} {s}: {m}")


def test_reference_is_the_checked_host_path():
    """The reference composes the functions tests/test_schedules.py checks against diffusers:
    without a grid it is `diffusers_sigmas` / `diffusers_timesteps` exactly, with one the same
    up to the pinned ends (pow/exp rounding)."""
    from fastdiff import spacings as P

    sched = S.DiscreteVPSchedule.from_betas("scaled_linear", 1000, 0.00085, 0.012,
                                            rescale_betas_zero_snr=True)
    acp = sched.alphas_cumprod.clamp_min(2.0**-24)  # diffusers' zero-SNR clamp
    for family, spacing, n in itertools.product(("euler", "dpmsolver"), SPACINGS, (1, 7, 50)):
        for grid in (None, "karras", "exponential"):
            table, train = tables_from_schedule(sched, n, family=family, spacing=spacing,
                                                steps_offset=1, grid=grid or "discrete")
            sig, ts = P.diffusers_sigmas(acp, n, family=family, timestep_spacing=spacing,
                                         steps_offset=1, sigma_schedule=grid)
            torch.testing.assert_close(table[1], sig, rtol=0 if grid is None else 1e-14, atol=0)
            torch.testing.assert_close(table[0, :-1], ts, rtol=0, atol=0 if grid is None else 1e-9)
    ddim = tables_from_schedule(sched, 7, family="ddim", spacing="linspace")[0][0, :-1]
    torch.testing.assert_close(ddim, P.diffusers_timesteps(7, 1000, "linspace", 0, "ddim"))
    torch.testing.assert_close(train[0], sched.alphas_cumprod, rtol=0, atol=0)


@pytest.fixture(scope="module")
def diffusers_schedulers():
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    return dict(ddim=DDIMScheduler, euler=EulerDiscreteScheduler,
                dpmsolver=DPMSolverMultistepScheduler)


def float32_table_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Largest relative difference of diffusers' float32 training sigmas from ours, after checking
    it is within what tests/test_schedules.py allows their alphas_cumprod (1000 U relative +
    16 U absolute), carried through sigma = sqrt((1 - a) / a): |d sigma| / sigma <=
    |da| / (2 a (1 - a))."""
    a = S.sigma_to_alphas_cumprod(ours)
    err = (S.alphas_cumprod_to_sigma(theirs) / ours - 1).abs()
    assert bool((err <= (1000 * U * a + 16 * U) / (2 * a * (1 - a)) + 4 * U).all())
    return float(err.max())


@pytest.mark.parametrize("family", ["euler", "dpmsolver"])
@pytest.mark.parametrize("grid", ["discrete", "karras", "exponential"])
def test_matches_diffusers(diffusers_schedulers, family, grid):
    """The op's sigmas and timesteps are diffusers' set_timesteps ones, on the settings
    tests/test_schedules.py checks the host path on. diffusers builds its training table in
    float32: interpolations and karras / exponential grids are weighted means of table sigmas,
    so a step's sigma differs from ours by at most the tables' largest relative difference
    (plus float32 rounding, 4 U); a t(sigma) by that in log sigma over the smallest log step."""
    cases = [("scaled_linear", False), ("scaled_linear", True), ("squaredcos_cap_v2", False)]
    if grid == "discrete":
        cases.append(("linear", True))
    for (beta_schedule, zero_snr), spacing, final in itertools.product(
            cases, SPACINGS, FINAL_SIGMAS):
        kw = dict(beta_schedule=beta_schedule, **beta_range(beta_schedule),
                  rescale_betas_zero_snr=zero_snr, timestep_spacing=spacing, steps_offset=1,
                  final_sigmas_type=final)
        if grid != "discrete":
            kw[f"use_{grid}_sigmas"] = True
        sched = diffusers_schedulers[family](**kw)
        for n in (1, 4, 7, 20):
            sched.set_timesteps(n)
            got = schedule_tables(n, beta_schedule=beta_schedule, **beta_range(beta_schedule),
                                  rescale_betas_zero_snr=zero_snr, spacing=spacing,
                                  steps_offset=1, family=family, grid=grid, final_sigma=final,
                                  backend="cpu")
            rtol = float32_table_error(got.train_sigmas, sched.alphas_cumprod.double()) + 4 * U
            torch.testing.assert_close(got.sigmas, sched.sigmas.double(), rtol=rtol, atol=0)
            ref_t, ts = sched.timesteps.double(), got.timesteps[:-1]
            if grid == "discrete":
                torch.testing.assert_close(ts, ref_t, rtol=0, atol=0)
                continue
            steps = torch.diff(got.train_sigmas.log())
            tol_t = 2 * rtol / float(steps[steps > 0].min())
            if family == "euler":
                torch.testing.assert_close(ts, ref_t, rtol=0, atol=tol_t)
                continue
            # DPM-Solver rounds (karras) or truncates t(sigma): equal unless the exact t is
            # within that tolerance of the threshold, or is T - 1 exactly (t(sigma_max), which
            # diffusers' float32 table can put a hair below and truncate to T - 2).
            raw = S.discrete_sigma_to_t(got.sigmas[:-1], got.train_sigmas.log())
            frac = raw - raw.floor()
            rounds = grid == "karras" and beta_schedule != "squaredcos_cap_v2"
            tie = ((frac - 0.5).abs() < tol_t) if rounds else ((frac < tol_t) | (frac > 1 - tol_t))
            tie |= ts == 999
            assert bool(((ts - ref_t).abs() <= 1).all())
            assert bool(((ts == ref_t) | tie).all()), (beta_schedule, spacing, n)


def test_ddim_timesteps_and_alphas_match_diffusers(diffusers_schedulers):
    for spacing, n in itertools.product(SPACINGS, (1, 7, 50, 999)):
        sched = diffusers_schedulers["ddim"](beta_schedule="scaled_linear", beta_start=0.00085,
                                             beta_end=0.012, timestep_spacing=spacing,
                                             steps_offset=1)
        sched.set_timesteps(n)
        got = schedule_tables(n, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, spacing=spacing, steps_offset=1, family="ddim",
                              backend="cpu")
        ref_t = sched.timesteps.double()
        torch.testing.assert_close(got.timesteps[:-1], ref_t, rtol=0, atol=0)
        abar = sched.alphas_cumprod.double()  # float32 cumprod: <= 1000 U (test_schedules.py)
        torch.testing.assert_close(got.alpha_t[:-1] ** 2, abar[sched.timesteps], rtol=1000 * U,
                                   atol=0)
        torch.testing.assert_close(got.alphas_cumprod, abar, rtol=1000 * U, atol=0)


def test_trailing_keeps_n_steps_where_numpy_adds_one(diffusers_schedulers):
    """np.arange(1000, 0, -1000 / 61) has 62 values (the last rounds to t = -1); diffusers runs
    them all, the op keeps the 61 asked for, equal to diffusers' first 61."""
    sched = diffusers_schedulers["euler"](timestep_spacing="trailing")
    sched.set_timesteps(61)
    assert len(sched.timesteps) == 62
    for backend, device in KERNELS:
        got = schedule_tables(61, spacing="trailing", device=device, backend=backend)
        assert got.timesteps.shape == (62,) and got.timesteps[-1] == 0 and got.sigmas[-1] == 0
        torch.testing.assert_close(got.timesteps[:-1].cpu(), sched.timesteps[:61].double(),
                                   rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Contracts: the rows, the ends, the buffer, the schedule method
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", KERNELS + [("reference", DEVICE)], ids=str)
def test_rows_and_ends(backend, device):
    t = schedule_tables(20, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        rescale_betas_zero_snr=True, spacing="trailing", grid="karras",
                        device=device, backend=backend)
    s = t.sigmas
    torch.testing.assert_close(t.alpha_t**2 + t.sigma_t**2, torch.ones_like(s), rtol=0,
                               atol=4e-16)
    assert t.timesteps[0] == 999 and t.timesteps[-1] == 0  # pinned end: t(sigma_max) = T - 1
    assert s[0] == math.sqrt((1 - 2.0**-24) / 2.0**-24) and s[-1] == 0  # diffusers' clamp
    assert t.lam[-1] == math.inf and t.alpha_t[-1] == 1 and t.sigma_t[-1] == 0
    assert bool(torch.isfinite(t.table[:, :-1]).all()) and bool((torch.diff(s) < 0).all())
    assert t.alphas_cumprod[-1] == 0 and t.train_sigmas[-1] == s[0]
    minimum = schedule_tables(20, final_sigma="sigma_min", device=device, backend=backend)
    assert minimum.sigmas[-1] == minimum.train_sigmas[0] and minimum.timesteps[-1] == 0


@pytest.mark.parametrize("backend,device", KERNELS + [("reference", DEVICE)], ids=str)
def test_out_buffer_is_written_in_place(backend, device, tol):
    n = 9
    out = torch.full((buffer_numel(n),), math.nan, dtype=torch.float64, device=device)
    first = schedule_tables(n, grid="exponential", out=out, backend=backend)
    assert first.buffer is out and first.table.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out.cpu(), flat(*reference(n, grid="exponential")),
                               **tol(torch.float64))
    # new settings, same buffer: one more launch, nothing else
    second = schedule_tables(n, beta_schedule="squaredcos_cap_v2", family="dpmsolver",
                             out=out, backend=backend)
    want = flat(*reference(n, beta_schedule="squaredcos_cap_v2", family="dpmsolver"))
    torch.testing.assert_close(second.buffer.cpu(), want, **tol(torch.float64))
    assert second.buffer.data_ptr() == out.data_ptr()


def test_tables_from_schedule_object():
    """ops.tables_from_schedule reads a schedule object (the ops layer imports no schedule):
    a closed-form one is the kernel's launch, bit for bit; one given as a table, the host path."""
    from fastdiff.ops import tables_from_schedule as op_from_schedule

    sched = S.DiscreteVPSchedule.from_betas("scaled_linear", 1000, 0.00085, 0.012)
    settings = dict(spacing="leading", steps_offset=1, grid="karras")
    via_schedule = op_from_schedule(sched, 12, **settings, backend="cpu")
    via_op = schedule_tables(12, beta_schedule="scaled_linear", beta_start=0.00085,
                             beta_end=0.012, **settings, backend="cpu")
    torch.testing.assert_close(via_schedule.buffer, via_op.buffer, rtol=0, atol=0)
    # a schedule given as a table has no closed form: the host path
    as_table = S.DiscreteVPSchedule(sched.alphas_cumprod)
    torch.testing.assert_close(op_from_schedule(as_table, 12, **settings).buffer,
                               flat(*tables_from_schedule(as_table, 12, **settings)),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="backend"):
        op_from_schedule(as_table, 12, backend="cpu")


def test_import_fastdiff_stays_light():
    code = ("import sys, fastdiff; bad = [m for m in ('fastdiff.schedules', 'fastdiff.spacings',"
            " 'fastdiff.reference.schedule', 'fastdiff.kernels.schedule', 'triton')"
            " if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_codes_match_the_schedules_module():
    from fastdiff import spacings as P

    assert BETAS == S.BETA_SCHEDULES
    assert set(FINAL_SIGMAS) <= set(P.FINAL_SIGMAS) and set(FAMILIES) == set(P.TIMESTEP_FAMILIES)


def test_torch_compile_traces_the_op(tol):
    out = torch.empty(buffer_numel(7), dtype=torch.float64)

    def run(buffer):
        return schedule_tables(7, grid="karras", out=buffer, backend="cpu").sigmas * 2

    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(out), 2 * reference(7, grid="karras")[0][1],
                               **tol(torch.float64))
    ints = [0, 1000, 0, 0, 0, 1, 7, 1, 0, 1]
    torch.library.opcheck(torch.ops.fastdiff.schedule_tables_out.default,
                          (out, ints, [0.0001, 0.02, 7.0], "cpu"))


@pytest.mark.gpu
def test_cuda_graph_capture_replays_without_host_work(tol):
    """A capture fails on any host-device copy or sync: the launch is pure device work."""
    out = torch.empty(buffer_numel(30), dtype=torch.float64, device="cuda")
    for backend in ("cuda", "triton"):
        schedule_tables(30, grid="karras", out=out, backend=backend)  # warm-up (compiles)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            schedule_tables(30, grid="karras", out=out, backend=backend)
        out.zero_()
        graph.replay()
        torch.testing.assert_close(out.cpu(), flat(*reference(30, grid="karras")),
                                   **tol(torch.float64))


# ----------------------------------------------------------------------------------------------
# Bad specs: a clear error naming the argument
# ----------------------------------------------------------------------------------------------
BAD_SPECS = [
    (dict(beta_schedule="quadratic"), "beta_schedule"),
    (dict(beta_schedule=None), "beta_schedule"),
    (dict(num_train_timesteps=1), "num_train_timesteps"),
    (dict(num_train_timesteps=1000.0), "num_train_timesteps"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=1001), "num_inference_steps"),
    (dict(num_inference_steps=True), "num_inference_steps"),
    (dict(num_inference_steps=7.0), "num_inference_steps"),
    (dict(beta_start=0.0), "beta_start"),
    (dict(beta_start=math.nan), "beta_start"),
    (dict(beta_end=1.5), "beta_end"),
    (dict(beta_end="0.02"), "beta_end"),
    (dict(rescale_betas_zero_snr=1), "rescale_betas_zero_snr"),
    (dict(spacing="uniform"), "spacing"),
    (dict(steps_offset=-1), "steps_offset"),
    (dict(steps_offset=1000), "steps_offset"),
    (dict(family="heun"), "family"),
    (dict(grid="beta"), "grid"),
    (dict(grid="karras", rho=0.0), "rho"),
    (dict(rho=math.inf), "rho"),
    (dict(final_sigma="none"), "final_sigma"),
    (dict(backend="gpu"), "backend"),
]


@pytest.mark.parametrize("bad,name", BAD_SPECS, ids=lambda v: str(v) if isinstance(v, dict) else v)
def test_bad_specs_name_the_argument(bad, name):
    spec = dict(num_inference_steps=7) | bad
    with pytest.raises(ValueError, match=name):
        schedule_tables(**spec)


def test_bad_buffers_and_devices():
    n = 5
    with pytest.raises(ValueError, match="out"):
        schedule_tables(n, out=torch.empty(buffer_numel(n), dtype=torch.float32))
    with pytest.raises(ValueError, match="out"):
        schedule_tables(n, out=torch.empty(buffer_numel(n) + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="out"):
        schedule_tables(n, out=torch.empty(2 * buffer_numel(n), dtype=torch.float64)[::2])
    with pytest.raises(TypeError, match="out"):
        schedule_tables(n, out=[0.0] * buffer_numel(n))
    with pytest.raises(ValueError, match="device"):
        schedule_tables(n, out=torch.empty(buffer_numel(n), dtype=torch.float64), device="meta")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable for cpu"):
        schedule_tables(n, backend="cuda")
    # the binding checks its codes too (it may be called directly)
    mod = _native.module()
    buf = torch.empty(buffer_numel(n), dtype=torch.float64)
    args = dict(device=-1, out=buf.data_ptr(), stream=0, betas=0, num_train_timesteps=1000,
                beta_start=1e-4, beta_end=0.02, rescale_zero_snr=False, spacing=0, family=0,
                steps_offset=0, num_inference_steps=n, grid=0, rho=7.0, final_sigma=0,
                round_karras=True)
    with pytest.raises(ValueError, match="grid"):
        mod.schedule_tables(**(args | dict(grid=9)))
    with pytest.raises(ValueError, match="num_inference_steps"):
        mod.schedule_tables(**(args | dict(num_inference_steps=1001)))
