"""ComfyUI's `deis` weights (`deis.tab_coefficients`, diff-sampler's rectangle rule) are computed
a block of steps at a time (issue 14: 10^7 quadrature points at 1000 steps). They must be bit for
bit the numbers of a one-step-at-a-time loop of the same arithmetic, written out here as it
reads, not depend on torch's thread count, and stay within round-off of diff-sampler's own
arithmetic (a division per point and factor of the Lagrange basis, where fastdiff divides the
sum once per weight)."""

from __future__ import annotations

import math

import pytest
import torch

from fastdiff.reference.solvers.deis import tab_coefficients
from fastdiff.spacings import get_sigmas_exponential, get_sigmas_karras


def vp_times(sig, sigma_min=0.002, sigma_max=80.0, eps_s=1e-3):
    """diff-sampler's edm2t: the VP time of each sigma and the linear schedule's beta_0, beta_d."""
    t = torch.tensor(sig, dtype=torch.float64)
    lo, hi = math.log(sigma_min**2 + 1), math.log(sigma_max**2 + 1)
    beta_d = 2 * (lo / eps_s - hi) / (eps_s - 1)
    beta_0 = hi - 0.5 * beta_d
    t = ((beta_0**2 + 2 * beta_d * (t**2 + 1).log()).sqrt() - beta_0) / beta_d
    return t.tolist(), beta_0, beta_d


def one_step_at_a_time(sig, max_order, n_quad=10000):
    """weight_j = -dt / prod_{k != j} (t_j - t_k) * sum(f prod_{k != j} (tau - t_k)),
    f = (u + beta_0 / 2) / sqrt(alpha (1 - alpha)), alpha = exp(u tau), u = -beta_d tau / 2 - beta_0
    (diff-sampler's integrand -dlog(alpha)/dtau / (2 sqrt(alpha (1 - alpha))) is -f)."""
    t, beta_0, beta_d = vp_times(sig)
    rows = []
    for i in range(len(sig) - 1):
        order = min(i + 1, max_order)
        if order == 1:
            rows.append([])
            continue
        taus = torch.linspace(t[i], t[i + 1], n_quad, dtype=torch.float64)
        u = taus * (-0.5 * beta_d) - beta_0
        alpha = torch.exp(u * taus)
        f = (u + 0.5 * beta_0) / torch.sqrt(alpha * (1 - alpha))
        prev = [t[i - k] for k in range(order)]
        row = []
        for j in range(order):
            poly = f
            denominator = 1.0
            for k in range(order):
                if k != j:
                    poly = poly * (taus - prev[k])
                    denominator = denominator * (prev[j] - prev[k])
            row.append(float(poly.sum()) * ((t[i] - t[i + 1]) / n_quad / denominator))
        rows.append(row)
    return rows


def diff_sampler_arithmetic(sig, max_order, n_quad=10000):
    """As ComfyUI's comfy/k_diffusion/deis.py (diff-sampler) computes it, in float64: the
    integrand -0.5 dlog(alpha)/dtau / sqrt(alpha (1 - alpha)), the Lagrange basis a division per
    factor and point (cal_poly), the rectangle-rule sum times dtau."""
    t, beta_0, beta_d = vp_times(sig)
    rows = []
    for i in range(len(sig) - 1):
        order = min(i + 1, max_order)
        if order == 1:
            rows.append([])
            continue
        taus = torch.linspace(t[i], t[i + 1], n_quad, dtype=torch.float64)
        alpha = torch.exp(-0.5 * taus**2 * beta_d - taus * beta_0)
        integrand = -0.5 * (-taus * beta_d - beta_0) / torch.sqrt(alpha * (1 - alpha))
        prev = [t[i - k] for k in range(order)]
        row = []
        for j in range(order):
            poly = 1
            for k in range(order):
                if k != j:
                    poly = poly * (taus - prev[k]) / (prev[j] - prev[k])
            row.append(float((integrand * poly).sum() * ((t[i + 1] - t[i]) / n_quad)))
        rows.append(row)
    return rows


SCHEDULES = {
    "karras 10": get_sigmas_karras(10, 0.03, 14.6, dtype=torch.float64),
    "karras 40 (no final 0)": get_sigmas_karras(40, 0.002, 80.0, dtype=torch.float64)[:-1],
    "exponential 25": get_sigmas_exponential(25, 0.0292, 80.0, dtype=torch.float64),
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
def test_blocked_weights_are_the_per_step_numbers(schedule, max_order):
    sig = SCHEDULES[schedule].tolist()
    assert tab_coefficients(sig, max_order) == one_step_at_a_time(sig, max_order)


def one_thread(fn, *args):
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return fn(*args)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("n_quad", [1001, 40000])  # a ragged vector tail; one step per block
def test_other_point_counts(n_quad):
    """(Over 32768 points torch sums on several threads in another order: the per-step numbers
    are those of one thread, as the blocked ones always are.)"""
    sig = SCHEDULES["karras 10"].tolist()
    assert tab_coefficients(sig, 3, n_quad) == one_thread(one_step_at_a_time, sig, 3, n_quad)


def test_weights_do_not_depend_on_the_thread_count():
    sig = SCHEDULES["exponential 25"].tolist()
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = tab_coefficients(sig, 3)
        assert torch.get_num_threads() == 2  # restored after its one-thread section
    finally:
        torch.set_num_threads(saved)
    assert one_thread(tab_coefficients, sig, 3) == two


@pytest.mark.parametrize("kind", ["karras", "exponential"])
@pytest.mark.parametrize("steps", [10, 50, 1000])
def test_within_round_off_of_diff_samplers_arithmetic(kind, steps):
    """Every weight within 1e-13 relative (measured: at most 1.7e-15) of the per-point
    divisions', orders 2-4."""
    get = get_sigmas_karras if kind == "karras" else get_sigmas_exponential
    # (no final 0: the sampler takes an Euler step there; the weights into t = 0 are infinite)
    sig = get(steps, 0.0292, 14.6, dtype=torch.float64)[:-1].tolist()
    for max_order in (2, 3, 4):
        ours = tab_coefficients(sig, max_order)
        theirs = one_thread(diff_sampler_arithmetic, sig, max_order)
        assert [len(row) for row in ours] == [len(row) for row in theirs]
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            for c, d in zip(a, b, strict=True):
                assert math.isfinite(d) and abs(c - d) <= 1e-13 * abs(d), (max_order, i, c, d)
