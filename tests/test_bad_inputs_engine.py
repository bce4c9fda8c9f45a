"""Bad-input matrix: fastdiff.Sampler, fastdiff.sample, denoisers, models (see _bad_inputs.py)."""

from __future__ import annotations

from _bad_inputs import Cases

cases = Cases()
case = cases.case


def _t():
    import torch

    return torch


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



@case("TypeError", "model returned torch.int64")
def sampler_model_returns_int64(keep):
    torch = _t()
    for backend in ("reference", "cpu"):
        s = _sampler(model=lambda x, s, **c: (x * 0.5).to(torch.int64), backend=backend)
        s(keep(torch.randn(2, 3)))


@case("ValueError", "model returned a tensor on meta")
def sampler_model_answers_on_another_device(keep):  # the cpu kernel read a null pointer
    torch = _t()
    s = _sampler(model=lambda x, s, **c: torch.empty_like(x, device="meta"), backend="cpu")
    s(keep(torch.randn(2, 3)))


@case("TypeError", "seed must be an int")
def sampler_seed_string(keep):
    _sampler(solver="euler_ancestral")(keep(_t().randn(2, 3)), seed="3")


@case("TypeError", "seed must be an int")
def sampler_seed_float(keep):  # it was truncated silently
    _sampler(solver="euler_ancestral")(keep(_t().randn(2, 3)), seed=1.5)


@case("ValueError", "seed must be in")
def sampler_seed_overflows_int64(keep):
    _sampler(solver="euler_ancestral")(keep(_t().randn(2, 3)), seed=2**63 - 1)


@case("TypeError", "generator must be a torch.Generator")
def sampler_generator_not_a_generator(keep):
    _sampler(solver="euler_ancestral", noise="generator")(keep(_t().randn(2, 3)), generator=3)


@case("TypeError", "eta must be a number")
def sampler_option_of_the_wrong_type(keep):
    _sampler(solver="euler_ancestral", eta="1")


@case("TypeError", "guidance must be a number")
def sampler_guidance_string(keep):
    _sampler(guidance="2")


@case("ValueError", "scale must be a finite number")
def cfg_denoiser_nan_scale(keep):
    from fastdiff.denoisers import CFGDenoiser
    CFGDenoiser(lambda x, s, **c: x, float("nan"))


@case("ValueError", "uncond has shape (1,)")
def sampler_uncond_shaped_unlike_cond(keep):  # the halves no longer lined up with x's rows
    torch = _t()
    _sampler(guidance=2.0)(keep(torch.randn(2, 3)), cond=keep(torch.ones(2)),
                           uncond=keep(torch.zeros(1)))


@case("TypeError", "cond and uncond must be tensors")
def sampler_cond_a_list(keep):
    _sampler(guidance=2.0)(keep(_t().randn(2, 3)), cond=[1, 2], uncond=[0, 0])


@case("TypeError", "extra_args must be a dict")
def sample_extra_args_a_list(keep):
    import fastdiff.sampler as S
    torch = _t()
    S.sample(lambda x, s, **c: x, keep(torch.randn(2, 3)), torch.tensor([1.0, 0.0]), "euler",
             extra_args=[1])


@case("TypeError", "network returned torch.int64")
def denoiser_network_returns_int64(keep):
    from fastdiff.denoisers import Denoiser
    torch = _t()
    Denoiser(lambda x, t: (x * 2).to(torch.int64))(keep(torch.randn(2, 3)), 1.0)


@case("ValueError", "network returned shape (1, 3)")
def denoiser_network_answers_one_row(keep):  # it broadcast against x silently
    from fastdiff.denoisers import Denoiser
    Denoiser(lambda x, t: x[:1])(keep(_t().randn(2, 3)), 1.0)


def _digits():
    from fastdiff.models.digits import load_digits_model
    return load_digits_model()


@case("ValueError", "labels")
def sample_digits_fractional_labels(keep):  # 1.5 was truncated to 1 silently
    from fastdiff.models.digits import sample_digits
    sample_digits(_digits(), [1.5, 2], steps=2)


@case("ValueError", "seed must be in")
def sample_digits_seed_overflow(keep):
    from fastdiff.models.digits import sample_digits
    sample_digits(_digits(), [1, 2], steps=2, seed=2**64)


@case("ValueError", "guidance must be a finite number")
def sample_digits_guidance_string(keep):  # the message named CFGDenoiser's "scale"
    from fastdiff.models.digits import sample_digits
    sample_digits(_digits(), [1, 2], steps=2, guidance="2")


@case("ValueError", "x must be a [N, 1, H, W]")
def to_uint8_without_the_channel_dim(keep):  # it returned each image's first row
    from fastdiff.models.digits import to_uint8
    to_uint8(keep(_t().zeros(3, 8, 8)))


@case("ValueError", "non-finite")
def to_uint8_nan_images(keep):  # NaN became an arbitrary byte
    from fastdiff.models.digits import to_uint8
    to_uint8(keep(_t().full((1, 1, 8, 8), float("nan"))))


@case("ValueError", "images must be a non-empty uint8")
def make_grid_no_images(keep):  # ZeroDivisionError
    import numpy as np

    from fastdiff.models.digits import make_grid
    make_grid(np.zeros((0, 8, 8), np.uint8))


@case("ValueError", "images must be a non-empty uint8")
def make_grid_float_images(keep):  # [0, 1] floats became a black grid
    import numpy as np

    from fastdiff.models.digits import make_grid
    make_grid(np.full((2, 8, 8), 0.5))


@case("ValueError", "nrow")
def make_grid_zero_columns(keep):  # ZeroDivisionError
    import numpy as np

    from fastdiff.models.digits import make_grid
    make_grid(np.zeros((2, 8, 8), np.uint8), nrow=0)


@case("TypeError", "class_labels must be an integer tensor")
def unet_float_class_labels(keep):  # 3.7 was truncated to 3
    torch = _t()
    _digits().network.unet(keep(torch.zeros(2, 1, 8, 8)), torch.zeros(2),
                           keep(torch.tensor([3.7, 1.2])))


@case("ValueError", "means must be a finite")
def gaussian_mixture_nan_means(keep):  # every answer was NaN
    from fastdiff.models.gmm import GaussianMixture
    torch = _t()
    GaussianMixture(keep(torch.tensor([[float("nan"), 0.0]])), 1.0)

results, test_bad_input = cases.tests(__file__)
