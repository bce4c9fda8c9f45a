"""ComfyUI's `deis` weights (`deis.tab_coefficients`, diff-sampler's rectangle rule) are computed
a block of steps at a time (issue 14: 10^7 quadrature points at 1000 steps); they must be bit for
bit the numbers of diff-sampler's one-step-at-a-time loop, written out here as it reads, and not
depend on torch's thread count."""

from __future__ import annotations

import math

import pytest
import torch

from fastdiff.reference.solvers.deis import tab_coefficients
from fastdiff.spacings import get_sigmas_exponential, get_sigmas_karras


def one_step_at_a_time(sig, max_order, n_quad=10000, sigma_min=0.002, sigma_max=80.0,
                       eps_s=1e-3):
    t = torch.tensor(sig, dtype=torch.float64)
    lo, hi = math.log(sigma_min**2 + 1), math.log(sigma_max**2 + 1)
    beta_d = 2 * (lo / eps_s - hi) / (eps_s - 1)
    beta_0 = hi - 0.5 * beta_d
    t = ((beta_0**2 + 2 * beta_d * (t**2 + 1).log()).sqrt() - beta_0) / beta_d
    rows = []
    for i in range(len(sig) - 1):
        order = min(i + 1, max_order)
        if order == 1:
            rows.append([])
            continue
        taus = torch.linspace(float(t[i]), float(t[i + 1]), n_quad, dtype=torch.float64)
        alpha = torch.exp(-0.5 * taus**2 * beta_d - taus * beta_0)
        integrand = -0.5 * (-taus * beta_d - beta_0) / torch.sqrt(alpha * (1 - alpha))
        prev = [float(t[i - k]) for k in range(order)]
        row = []
        for j in range(order):
            poly = torch.ones_like(taus)
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
