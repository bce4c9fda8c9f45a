"""Bad-input matrix: fastdiff.k_diffusion (machinery and rules: tests/_bad_inputs.py)."""

from __future__ import annotations

from _bad_inputs import Cases

cases = Cases()
case = cases.case


def _t():
    import torch

    return torch


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



# -- what the model answers: every sampler checks it (host metadata, no sync) ---------------

_RANGE = {"sample_dpm_fast": (0.1, 10.0, 3), "sample_dpm_adaptive": (0.1, 10.0)}


def _answers(name: str, model):
    """A case running fastdiff.k_diffusion.`name` with `model`."""

    def run(keep):
        from fastdiff import k_diffusion as K
        torch = _t()
        x = keep(torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * 10)
        args = _RANGE.get(name) or (keep(torch.tensor([10.0, 5.0, 1.0, 0.0])),)
        getattr(K, name)(model, x, *args, disable=True)

    return run


def _int64(x, sigma, **kwargs):
    return (x * 0.5).to(_t().int64)


def _sampler_names():
    from fastdiff import k_diffusion as K
    return [n for n in K.__all__ if n.startswith("sample_")]


for _name in _sampler_names():  # (x * 0.5).to(int64) passed silently through all of them
    cases.add(f"kdiffusion_{_name}_int64_model", _answers(_name, _int64), "TypeError",
              "model returned torch.int64")
cases.add("kdiffusion_euler_float64_model", _answers("sample_euler", lambda x, s: x.double()),
          "TypeError", "model returned torch.float64")
cases.add("kdiffusion_heun_model_answers_one_row", _answers("sample_heun", lambda x, s: x[:1]),
          "ValueError", "model returned shape (1, 3)")  # it broadcast silently
cases.add("kdiffusion_dpmpp_2m_model_answers_a_tuple",
          _answers("sample_dpmpp_2m", lambda x, s: (x,)), "TypeError", "model returned tuple")
cases.add("kdiffusion_lms_model_answers_on_another_device",
          _answers("sample_lms", lambda x, s: x.to("meta")), "ValueError", "on meta")


@case("TypeError", "model")
def kdiffusion_model_not_callable(keep):
    from fastdiff import k_diffusion as K
    torch = _t()
    K.sample_euler(None, keep(torch.randn(2, 3)), torch.tensor([1.0, 0.0]), disable=True)

results, test_bad_input = cases.tests(__file__)
