"""Bad-input matrix over the public entry points: every case must end in a Python exception of
the expected type whose message names the offending argument -- never a crash (segfault,
abort), a hang, or a silent success -- and must leave its inputs unmodified.

Crash detection: one subprocess (this file run as a script) imports fastdiff once, then runs
each case in a child made with os.fork(); a case that kills its child (signal, abort) or exits
without reporting is a crash, not a pass. The child reports `type(e).__name__` and the message
through a pipe and exits 3 (exception), 0 (no exception) or 4 (inputs modified).
A few cases are valid-but-unusual inputs (non-contiguous, overlapping-free views) that must
succeed with the right answer: expected type None.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES: dict = {}  # name -> (fn(keep), expected exception type name or None, substring)


def case(exc: str | None, match: str = ""):
    def register(fn):
        CASES[fn.__name__] = (fn, exc, match)
        return fn
    return register


def _t():
    import torch

    return torch


def _cpu_backends():
    from fastdiff.ops import BACKENDS, unavailable_reason
    return [b for b in BACKENDS if not unavailable_reason(b, _t().device("cpu"))]


# -- fastdiff.ops.lincomb --------------------------------------------------------------------

def _coef(n_in, n_out=1, dtype=None):
    torch = _t()
    return torch.ones(1, n_out, n_in, dtype=dtype or torch.float32)


@case("TypeError", "inputs[0]")
def lincomb_int_inputs(keep):
    from fastdiff.ops import lincomb
    lincomb([keep(_t().ones(4, dtype=_t().int32))], _coef(1))


@case("TypeError", "inputs[1]")
def lincomb_mixed_dtypes(keep):
    from fastdiff.ops import lincomb
    torch = _t()
    lincomb([keep(torch.ones(4)), keep(torch.ones(4, dtype=torch.float64))], _coef(2))


@case("ValueError", "inputs[1]")
def lincomb_mismatched_shapes(keep):
    from fastdiff.ops import lincomb
    torch = _t()
    lincomb([keep(torch.ones(4, 3)), keep(torch.ones(3, 4))], _coef(2))


@case("ValueError", "inputs")
def lincomb_no_inputs(keep):
    from fastdiff.ops import lincomb
    lincomb([], _coef(1))


@case("ValueError", "inputs")
def lincomb_too_many_inputs(keep):
    from fastdiff.ops import lincomb
    lincomb([keep(_t().ones(3)) for _ in range(7)], _coef(7))


@case("TypeError", "inputs")
def lincomb_tensor_instead_of_list(keep):
    from fastdiff.ops import lincomb
    lincomb(keep(_t().ones(2, 3)), _coef(2))


@case("TypeError", "coef")
def lincomb_coef_wrong_dtype(keep):
    from fastdiff.ops import lincomb
    lincomb([keep(_t().ones(4))], _coef(1, dtype=_t().float64))


@case("ValueError", "coef")
def lincomb_coef_wrong_width(keep):
    from fastdiff.ops import lincomb
    lincomb([keep(_t().ones(4))], _coef(3))


@case("ValueError", "coef")
def lincomb_coef_wrong_device(keep):
    from fastdiff.ops import lincomb
    lincomb([keep(_t().ones(4))], _coef(1).to("meta"))


@case("ValueError", "coef.shape[1]")
def lincomb_coef_four_outputs(keep):  # at most three per launch
    from fastdiff.ops import lincomb
    lincomb([keep(_t().ones(4))], _coef(1, n_out=4))


@case("ValueError", "row")
def lincomb_row_out_of_range(keep):
    from fastdiff.ops import lincomb
    lincomb([keep(_t().ones(4))], _coef(1), 5)


@case("TypeError", "row")
def lincomb_row_float(keep):
    from fastdiff.ops import lincomb
    lincomb([keep(_t().ones(4))], _coef(1), 0.0)


@case("ValueError", "out[0]")
def lincomb_out_partially_overlaps_input(keep):
    from fastdiff.ops import lincomb
    buf = keep(_t().arange(8.0))
    lincomb([buf[:6]], _coef(1), out=[buf[2:]])


@case("ValueError", "out[0]")
def lincomb_out_expanded_view(keep):
    from fastdiff.ops import lincomb
    torch = _t()
    lincomb([keep(torch.ones(4, 3))], _coef(1), out=[torch.zeros(1, 3).expand(4, 3)])


@case("ValueError", "out[0]")
def lincomb_out_wrong_shape(keep):
    from fastdiff.ops import lincomb
    torch = _t()
    lincomb([keep(torch.ones(4, 3))], _coef(1), out=[torch.zeros(3, 4)])


@case("TypeError", "seeds")
def lincomb_noise_seeds_int32(keep):
    from fastdiff.ops import lincomb
    torch = _t()
    lincomb([keep(torch.ones(2, 3))], _coef(2), noise=(torch.zeros(2, dtype=torch.int32), [0]))


@case("ValueError", "counters")
def lincomb_noise_negative_counter(keep):
    from fastdiff.ops import lincomb
    torch = _t()
    lincomb([keep(torch.ones(2, 3))], _coef(2), noise=(torch.zeros(2, dtype=torch.int64), [-1]))


@case("ValueError", "backend")
def lincomb_unknown_backend(keep):
    from fastdiff.ops import lincomb
    lincomb([keep(_t().ones(4))], _coef(1), backend="fortran")


@case(None)
def lincomb_non_contiguous_inputs_are_right(keep):
    from fastdiff.ops import lincomb
    torch = _t()
    g = torch.Generator().manual_seed(0)
    a = keep(torch.randn(5, 7, generator=g).t())  # transposed
    b = keep(torch.randn(10, 7, generator=g)[::2].t())  # strided slice
    coef = torch.tensor([[[2.0, -3.0]]])
    for backend in _cpu_backends():
        (y,) = lincomb([a, b], coef, backend=backend)
        torch.testing.assert_close(y, 2 * a - 3 * b)


@case("ValueError", "out[1]")
def lincomb_same_out_twice(keep):
    from fastdiff.ops import lincomb
    torch = _t()
    buf = torch.empty(2, 3)
    lincomb([keep(torch.ones(2, 3))], _coef(1, n_out=2), out=[buf, buf])


@case(None)
def lincomb_empty_batch_with_noise_is_empty(keep):
    from fastdiff.ops import lincomb
    torch = _t()
    for backend in _cpu_backends():
        (y,) = lincomb([keep(torch.ones(0, 3))], _coef(2),
                       noise=(torch.zeros(0, dtype=torch.int64), [0]), backend=backend)
        assert y.shape == (0, 3)


@case(None)
def lincomb_in_place_on_a_strided_view_leaves_the_gaps(keep):
    from fastdiff.ops import lincomb
    torch = _t()
    for backend in _cpu_backends():
        base = torch.arange(12.0).reshape(3, 4)
        view = base[:, ::2]  # not dense: the odd columns must stay as they are
        expect = base.clone()
        expect[:, ::2] *= 3
        lincomb([view], torch.full((1, 1, 1), 3.0), out=[view], backend=backend)
        assert torch.equal(base, expect), backend


# -- fastdiff.ops.group_norm -----------------------------------------------------------------

@case("ValueError", "num_groups")
def group_norm_groups_do_not_divide_channels(keep):
    from fastdiff.ops import group_norm
    group_norm(keep(_t().ones(2, 6, 3, 3)), 4)


@case("ValueError", "num_groups")
def group_norm_zero_groups(keep):
    from fastdiff.ops import group_norm
    group_norm(keep(_t().ones(2, 6, 3, 3)), 0)


@case("ValueError", "x")
def group_norm_1d_input(keep):
    from fastdiff.ops import group_norm
    group_norm(keep(_t().ones(6)), 2)


@case("TypeError", "x")
def group_norm_int_input(keep):
    from fastdiff.ops import group_norm
    group_norm(keep(_t().ones(2, 6, 3, dtype=_t().int64)), 2)


@case("ValueError", "weight")
def group_norm_weight_wrong_shape(keep):
    from fastdiff.ops import group_norm
    torch = _t()
    group_norm(keep(torch.ones(2, 6, 3)), 2, weight=keep(torch.ones(5)))


@case("TypeError", "weight")
def group_norm_weight_wrong_dtype(keep):
    from fastdiff.ops import group_norm
    torch = _t()
    group_norm(keep(torch.ones(2, 6, 3)), 2, weight=keep(torch.ones(6, dtype=torch.float64)))


@case("ValueError", "eps")
def group_norm_negative_eps(keep):
    from fastdiff.ops import group_norm
    group_norm(keep(_t().ones(2, 6, 3)), 2, eps=-1e-5)


@case("ValueError", "eps")
def group_norm_nan_eps(keep):
    from fastdiff.ops import group_norm
    group_norm(keep(_t().ones(2, 6, 3)), 2, eps=float("nan"))


@case("ValueError", "scale")
def group_norm_scale_wrong_shape(keep):
    from fastdiff.ops import group_norm
    torch = _t()
    group_norm(keep(torch.ones(2, 6, 3)), 2, scale=keep(torch.ones(3, 6)))


@case("ValueError", "backend")
def group_norm_unknown_backend(keep):
    from fastdiff.ops import group_norm
    group_norm(keep(_t().ones(2, 6, 3)), 2, backend="fortran")


@case(None)
def group_norm_channels_last_and_strided_are_right(keep):
    from fastdiff.ops import group_norm
    from fastdiff.reference.group_norm import group_norm as ref
    torch = _t()
    g = torch.Generator().manual_seed(0)
    x = keep(torch.randn(2, 6, 5, 10, generator=g)[..., ::2])  # strided
    y = keep(torch.randn(2, 6, 5, 5, generator=g).to(memory_format=torch.channels_last))
    for t in (x, y):
        for backend in _cpu_backends():
            torch.testing.assert_close(group_norm(t, 3, backend=backend), ref(t, 3),
                                       atol=1e-5, rtol=1e-5)


@case(None)
def group_norm_expanded_input_is_right(keep):
    from fastdiff.ops import group_norm
    from fastdiff.reference.group_norm import group_norm as ref
    torch = _t()
    x = keep(torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(0)).expand(4, 6, 3))
    for backend in _cpu_backends():
        torch.testing.assert_close(group_norm(x, 2, backend=backend), ref(x, 2),
                                   atol=1e-5, rtol=1e-5)


# -- fastdiff.ops.attention ------------------------------------------------------------------

@case("ValueError", "q")
def attention_3d_query(keep):
    from fastdiff.ops import attention
    torch = _t()
    attention(keep(torch.ones(2, 4, 8)), keep(torch.ones(2, 1, 4, 8)), keep(torch.ones(2, 1, 4, 8)))


@case("TypeError", "k")
def attention_key_dtype_mismatch(keep):
    from fastdiff.ops import attention
    torch = _t()
    q = keep(torch.ones(1, 2, 4, 8))
    attention(q, keep(torch.ones(1, 2, 4, 8, dtype=torch.float64)), q)


@case("ValueError", "head dim")
def attention_head_dim_mismatch(keep):
    from fastdiff.ops import attention
    torch = _t()
    q = keep(torch.ones(1, 2, 4, 8))
    attention(q, keep(torch.ones(1, 2, 4, 4)), keep(torch.ones(1, 2, 4, 4)))


@case("ValueError", "v")
def attention_value_length_mismatch(keep):
    from fastdiff.ops import attention
    torch = _t()
    q = keep(torch.ones(1, 2, 4, 8))
    attention(q, q, keep(torch.ones(1, 2, 5, 8)))


@case("ValueError", "k")
def attention_empty_keys(keep):
    from fastdiff.ops import attention
    torch = _t()
    q = keep(torch.ones(1, 2, 4, 8))
    attention(q, keep(torch.ones(1, 2, 0, 8)), keep(torch.ones(1, 2, 0, 8)))


@case("ValueError", "scale")
def attention_infinite_scale(keep):
    from fastdiff.ops import attention
    q = keep(_t().ones(1, 2, 4, 8))
    attention(q, q, q, scale=float("inf"))


@case("ValueError", "backend")
def attention_unknown_backend(keep):
    from fastdiff.ops import attention
    q = keep(_t().ones(1, 2, 4, 8))
    attention(q, q, q, backend="fortran")


@case("ValueError", "attn_mask")
def attention_mask_wrong_shape(keep):
    from fastdiff.ops import attention
    torch = _t()
    q = keep(torch.ones(1, 2, 4, 8))
    attention(q, q, q, attn_mask=keep(torch.ones(3, 5, dtype=torch.bool)))


# -- fastdiff.Sampler / fastdiff.sampler.sample ----------------------------------------------

def _sampler(sigmas=None, solver="euler", **kw):
    from fastdiff.sampler import Sampler
    torch = _t()
    sig = torch.tensor([10.0, 5.0, 1.0, 0.0], dtype=torch.float64) if sigmas is None else sigmas
    return Sampler(kw.pop("model", lambda x, s, **c: x * 0.5), solver, sig, **kw)


@case("ValueError", "solver")
def sampler_unknown_solver(keep):
    _sampler(solver="euler_but_faster")


@case("ValueError", "sigmas")
def sampler_missing_sigmas(keep):
    from fastdiff.sampler import Sampler
    Sampler(lambda x, s: x, "euler", None)


@case("ValueError", "sigmas")
def sampler_nan_sigmas(keep):
    torch = _t()
    _sampler(keep(torch.tensor([10.0, float("nan"), 1.0, 0.0], dtype=torch.float64)))


@case("ValueError", "sigmas")
def sampler_inf_sigmas(keep):
    torch = _t()
    _sampler(keep(torch.tensor([float("inf"), 5.0, 1.0, 0.0], dtype=torch.float64)))


@case("ValueError", "sigmas")
def sampler_increasing_sigmas(keep):
    torch = _t()
    _sampler(keep(torch.tensor([1.0, 5.0, 10.0, 0.0], dtype=torch.float64)))


@case("ValueError", "sigmas")
def sampler_negative_sigmas(keep):
    torch = _t()
    _sampler(keep(torch.tensor([10.0, 5.0, -1.0], dtype=torch.float64)))


@case("ValueError", "sigmas")
def sampler_zero_steps(keep):
    _sampler(keep(_t().tensor([10.0], dtype=_t().float64)))


@case("ValueError", "sigmas")
def sampler_empty_sigmas(keep):
    _sampler(keep(_t().zeros(0, dtype=_t().float64)))


@case("ValueError", "sigmas")
def sampler_2d_sigmas(keep):
    _sampler(keep(_t().tensor([[10.0, 5.0, 0.0]], dtype=_t().float64)))


@case("TypeError", "bogus")
def sampler_unknown_option(keep):
    _sampler(bogus=3)


@case("ValueError", "noise")
def sampler_unknown_noise_mode(keep):
    _sampler(noise="quantum")


@case("ValueError", "cond")
def sampler_guidance_without_conditioning(keep):
    s = _sampler(guidance=2.0)
    s(keep(_t().randn(2, 3)))


@case("ValueError", "model returned")
def sampler_model_returns_wrong_shape(keep):
    s = _sampler(model=lambda x, s, **c: x[:1])
    s(keep(_t().randn(2, 3)))


@case("TypeError", "model returned")
def sampler_model_returns_wrong_dtype(keep):
    s = _sampler(model=lambda x, s, **c: x.double())
    s(keep(_t().randn(2, 3)))


@case("TypeError", "noise")
def sampler_integer_noise(keep):
    _sampler()(keep(_t().ones(2, 3, dtype=_t().int64)))


@case("ValueError", "noise")
def sampler_empty_batch(keep):
    _sampler()(keep(_t().ones(0, 3)))


@case("ValueError", "seeds")
def sampler_seeds_wrong_shape(keep):
    torch = _t()
    s = _sampler(solver="euler_ancestral")
    s(keep(torch.randn(2, 3)), seeds=keep(torch.zeros(3, dtype=torch.int64)))


@case("ValueError", "guidance")
def sampler_guidance_given_twice(keep):
    from fastdiff.denoisers import CFGDenoiser
    _sampler(model=CFGDenoiser(lambda x, s, **c: x, 2.0), guidance=3.0)


@case("ValueError", "sigmas")
def sample_one_shot_bad_sigmas(keep):
    import fastdiff.sampler as S
    torch = _t()
    S.sample(lambda x, s: x, keep(torch.randn(2, 3)),
             keep(torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)), "dpmpp_2m")


@case("ValueError", "guidance")
def sampler_nan_guidance(keep):
    torch = _t()
    s = _sampler(guidance=float("nan"))
    s(keep(torch.randn(2, 3)), cond=torch.ones(2), uncond=torch.zeros(2))


@case("ValueError", "backend")
def sampler_unknown_backend_at_construction(keep):
    _sampler(backend="fortran")


@case("ValueError", "sigmas")
def sampler_all_zero_sigmas(keep):
    _sampler(keep(_t().zeros(3, dtype=_t().float64)))


@case("TypeError", "sigmas")
def sampler_sigmas_not_numbers(keep):
    _sampler("10,5,0")


@case("ValueError", "s_noise")
def sampler_nan_option(keep):
    _sampler(solver="euler_ancestral", s_noise=float("nan"))


@case(None)
def sampler_infinite_s_tmax_is_kdiffusions_default(keep):
    torch = _t()
    out = _sampler(solver="heun", s_tmax=float("inf"))(keep(torch.randn(2, 3)))
    assert out.shape == (2, 3) and bool(torch.isfinite(out).all())


@case(None)
def sampler_non_contiguous_noise_is_right_and_untouched(keep):
    torch = _t()
    from fastdiff.reference.solvers import sample_euler
    g = torch.Generator().manual_seed(1)
    x = keep(torch.randn(6, 4, generator=g, dtype=torch.float64).t())  # [4, 6] transposed
    sig = torch.tensor([10.0, 5.0, 1.0, 0.0], dtype=torch.float64)

    def model(x, s, **c):
        return x * (1 / (1 + s[:, None] ** 2))
    torch.testing.assert_close(_sampler(sig, model=model)(x),
                               sample_euler(model, x, sig, disable=True))


# -- fastdiff.k_diffusion --------------------------------------------------------------------

@case("AttributeError", "sample_nonexistent")
def kdiffusion_unknown_attribute(keep):
    from fastdiff import k_diffusion as K
    K.sample_nonexistent  # noqa: B018


@case("ValueError", "n")
def kdiffusion_karras_zero_steps(keep):
    from fastdiff import k_diffusion as K
    K.get_sigmas_karras(0, 0.002, 80.0)


@case("ValueError", "sigma_min")
def kdiffusion_karras_negative_sigma_min(keep):
    from fastdiff import k_diffusion as K
    K.get_sigmas_karras(5, -0.1, 80.0)


@case("ValueError", "sigma_max")
def kdiffusion_exponential_inverted_range(keep):
    from fastdiff import k_diffusion as K
    K.get_sigmas_exponential(5, 80.0, 0.002)


@case("ValueError", "rho")
def kdiffusion_karras_zero_rho(keep):
    from fastdiff import k_diffusion as K
    K.get_sigmas_karras(5, 0.002, 80.0, rho=0.0)


@case("ValueError", "n")
def kdiffusion_dpm_fast_zero_calls(keep):
    from fastdiff import k_diffusion as K
    K.sample_dpm_fast(lambda x, s: x, keep(_t().randn(2, 3)), 0.002, 80.0, 0, disable=True)


@case("ValueError", "sigmas")
def kdiffusion_euler_increasing_sigmas(keep):
    from fastdiff import k_diffusion as K
    torch = _t()
    K.sample_euler(lambda x, s: x, keep(torch.randn(2, 3)), keep(torch.tensor([1.0, 10.0, 0.0])),
                   disable=True)


@case("ValueError", "sigmas")
def kdiffusion_dpmpp_2m_nan_sigmas(keep):
    from fastdiff import k_diffusion as K
    torch = _t()
    K.sample_dpmpp_2m(lambda x, s: x, keep(torch.randn(2, 3)),
                      keep(torch.tensor([10.0, float("nan"), 0.0])), disable=True)


@case("TypeError", "x")
def kdiffusion_integer_x(keep):
    from fastdiff import k_diffusion as K
    torch = _t()
    K.sample_heun(lambda x, s: x, keep(torch.ones(2, 3, dtype=torch.int64)),
                  torch.tensor([10.0, 1.0, 0.0]), disable=True)


# -- command line ----------------------------------------------------------------------------

def _cli(argv, module="fastdiff.cli"):
    """Runs a CLI main(); argparse's exit becomes SystemExit with its stderr as the message."""
    import contextlib
    import importlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = importlib.import_module(module).main(argv)
        except SystemExit as e:
            raise SystemExit(f"exit {e.code}: {err.getvalue()}") from None
    if code:
        raise SystemExit(f"exit {code}: {err.getvalue()}")


@case("SystemExit", "--dtype")
def cli_compare_unknown_dtype(keep):
    _cli(["compare", "--dtype", "float8"])


@case("SystemExit", "command")
def cli_unknown_command(keep):
    _cli(["frobnicate"])


@case("SystemExit", "--num-samples")
def cli_generate_zero_samples(keep):
    _cli(["--num-samples", "0", "--out", "/nonexistent/never-made"], "fastdiff.generate")


@case("SystemExit", "--steps")
def cli_generate_non_integer_steps(keep):
    _cli(["--num-samples", "2", "--out", "/nonexistent/x", "--steps", "two"],
         "fastdiff.generate")


@case("SystemExit", "--guidance")
def cli_generate_nan_guidance(keep):
    _cli(["--num-samples", "2", "--out", "/nonexistent/x", "--guidance", "nan"],
         "fastdiff.generate")


@case("SystemExit", "--shape")
def cli_compare_bad_shape(keep):
    _cli(["compare", "--shape", "2xfoo"])


@case("SystemExit", "--guidance")
def cli_sample_nan_guidance(keep):
    _cli(["sample", "--guidance", "nan", "--out", "/nonexistent/x.png"])


@case("SystemExit", "--steps")
def cli_sample_zero_steps(keep):
    _cli(["sample", "--steps", "0", "--out", "/nonexistent/x.png"])


@case("ArgumentTypeError", "--labels")
def cli_sample_bad_labels(keep):
    from fastdiff.sample_cli import _parse_labels
    _parse_labels("3,12")


# -- the runner (subprocess; one fork per case) ----------------------------------------------

def _snapshot(t):
    return t.detach().cpu().clone() if t.device.type != "meta" else None


def _same(a, b) -> bool:
    torch = _t()
    if b is None:
        return True
    return a.shape == b.shape and torch.equal(torch.nan_to_num(a.detach().cpu()),
                                              torch.nan_to_num(b))


def _child(fn, wfd: int) -> None:
    import traceback

    kept = []

    def keep(t):
        kept.append((t, _snapshot(t)))
        return t

    code, text = 0, ""
    try:
        fn(keep)
    except BaseException as e:  # noqa: BLE001 -- SystemExit too: the CLI cases
        code, text = 3, f"{type(e).__name__}: {e}"
        if type(e).__name__ == "AssertionError":
            text += "\n" + traceback.format_exc()[-1500:]
    if not all(_same(t, snap) for t, snap in kept):
        code, text = 4, f"inputs modified in place ({text})"
    os.write(wfd, text[:4000].encode())
    os.close(wfd)
    os._exit(code)


def run_all(names) -> dict:
    import time

    import torch

    import fastdiff.sampler  # noqa: F401 -- import once, before forking
    torch.set_num_threads(1)
    results = {}
    for name in names:
        fn = CASES[name][0]
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            _child(fn, wfd)
        os.close(wfd)
        deadline = time.monotonic() + 60
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                status = -1
                break
            time.sleep(0.002)
        chunks = []
        while chunk := os.read(rfd, 65536):
            chunks.append(chunk)
        os.close(rfd)
        text = b"".join(chunks).decode(errors="replace")
        if status == -1:
            results[name] = {"status": "hang", "text": text}
        elif os.WIFSIGNALED(status):
            results[name] = {"status": "crash", "text": f"signal {os.WTERMSIG(status)}"}
        else:
            code = os.WEXITSTATUS(status)
            kind = {0: "ok", 3: "raised", 4: "modified"}.get(code, "crash")
            results[name] = {"status": kind, "text": text, "code": code}
    return results


# -- pytest ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def results():
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env,
                          timeout=240, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_matrix_is_large_enough():
    assert sum(exc is not None for _, exc, _ in CASES.values()) >= 30


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(results, name):
    _, exc, match = CASES[name]
    r = results[name]
    if exc is None:
        assert r["status"] == "ok", f"{name}: expected success, got {r}"
        return
    assert r["status"] == "raised", f"{name}: expected {exc}, got {r}"
    got_type, _, msg = r["text"].partition(": ")
    assert got_type == exc, f"{name}: expected {exc}, got {r['text']}"
    assert match in msg, f"{name}: the message should name {match!r}: {r['text']}"


if __name__ == "__main__":
    print(json.dumps(run_all(sys.argv[1:] or sorted(CASES))))
