"""Bad-input matrix: the ops lincomb, group_norm, attention (see tests/_bad_inputs.py)."""

from __future__ import annotations

from _bad_inputs import Cases, cpu_backends

cases = Cases()
case = cases.case


def _t():
    import torch

    return torch


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
    for backend in cpu_backends():
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
    for backend in cpu_backends():
        (y,) = lincomb([keep(torch.ones(0, 3))], _coef(2),
                       noise=(torch.zeros(0, dtype=torch.int64), [0]), backend=backend)
        assert y.shape == (0, 3)


@case(None)
def lincomb_in_place_on_a_strided_view_leaves_the_gaps(keep):
    from fastdiff.ops import lincomb
    torch = _t()
    for backend in cpu_backends():
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
        for backend in cpu_backends():
            torch.testing.assert_close(group_norm(t, 3, backend=backend), ref(t, 3),
                                       atol=1e-5, rtol=1e-5)


@case(None)
def group_norm_expanded_input_is_right(keep):
    from fastdiff.ops import group_norm
    from fastdiff.reference.group_norm import group_norm as ref
    torch = _t()
    x = keep(torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(0)).expand(4, 6, 3))
    for backend in cpu_backends():
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


results, test_bad_input = cases.tests(__file__)
