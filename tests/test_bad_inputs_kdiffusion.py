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


class _GuidedInt64:
    """A guided model (the CFG++ samplers need D_u) whose both answers are int64."""

    def __call__(self, x, sigma, **kwargs):
        return _int64(x, sigma)

    def denoise_with_uncond(self, x, sigma, **kwargs):
        return _int64(x, sigma), _int64(x, sigma)


def _sampler_names():
    from fastdiff import k_diffusion as K
    return [n for n in K.__all__ if n.startswith("sample_")]


for _name in _sampler_names():  # (x * 0.5).to(int64) passed silently through all of them
    cases.add(f"kdiffusion_{_name}_int64_model",
              _answers(_name, _GuidedInt64() if "cfg_pp" in _name else _int64), "TypeError",
              "model returned torch.int64")
cases.add("kdiffusion_euler_float64_model", _answers("sample_euler", lambda x, s: x.double()),
          "TypeError", "model returned torch.float64")
cases.add("kdiffusion_heun_model_answers_one_row", _answers("sample_heun", lambda x, s: x[:1]),
          "ValueError", "model returned shape (1, 3)")  # it broadcast silently
cases.add("kdiffusion_dpmpp_2m_model_answers_a_tuple",
          _answers("sample_dpmpp_2m", lambda x, s: (x,)), "TypeError", "model returned tuple")
cases.add("kdiffusion_lms_model_answers_on_another_device",
          _answers("sample_lms", lambda x, s: x.to("meta")), "ValueError", "on meta")


# -- ComfyUI's names (fastdiff's registry entries): fixed options, CFG++'s model, options -----

def _run(name, model=None, **options):
    from fastdiff import k_diffusion as K
    torch = _t()
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * 10
    getattr(K, name)(model or (lambda x, s: x * 0.5), x, torch.tensor([10.0, 5.0, 1.0, 0.0]),
                     disable=True, **options)


def _comfyui(name, model=None, **options):
    from fastdiff import comfyui
    torch = _t()
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * 10
    getattr(comfyui, name)(model or (lambda x, s: x * 0.5), x, torch.tensor([10.0, 5.0, 1.0, 0.0]),
                           disable=True, **options)


for _name, _option in [("sample_res_multistep", "eta"), ("sample_exp_heun_2_x0", "r"),
                       ("sample_exp_heun_2_x0", "noise_sampler"), ("sample_ipndm_v", "weights"),
                       ("sample_exp_heun_2_x0_sde", "r"), ("sample_sa_solver_pece", "use_pece"),
                       ("sample_euler_cfg_pp", "cfg_pp")]:
    cases.add(f"kdiffusion_{_name}_fixed_{_option}",
              lambda keep, n=_name, o=_option: _run(n, **{o: None}), "TypeError",
              f"['{_option}'] fixed by the sampler's name")
cases.add("kdiffusion_euler_cfg_pp_unguided_model", lambda keep: _run("sample_euler_cfg_pp"),
          "TypeError", "model: sample_euler_cfg_pp renoises with the unconditional prediction")
cases.add("comfyui_dpmpp_2m_cfg_pp_unguided_model",
          lambda keep: _comfyui("sample_dpmpp_2m_cfg_pp"),
          "TypeError", "model: sample_dpmpp_2m_cfg_pp renoises with the unconditional prediction")
cases.add("kdiffusion_heunpp2_unknown_option", lambda keep: _run("sample_heunpp2", eta=1.0),
          "TypeError", "'eta'")
cases.add("kdiffusion_seeds_2_bad_model_kind",
          lambda keep: _run("sample_seeds_2", model_kind="const"), "ValueError", "model_kind")
cases.add("kdiffusion_er_sde_bad_max_stage", lambda keep: _run("sample_er_sde", max_stage=4),
          "ValueError", "max_stage")
cases.add("kdiffusion_sa_solver_bad_final", lambda keep: _run("sample_sa_solver", final="x"),
          "ValueError", "final")
cases.add("kdiffusion_res_multistep_ancestral_negative_eta",
          lambda keep: _run("sample_res_multistep_ancestral", eta=-1.0), "ValueError", "eta")


@case("TypeError", "model")
def kdiffusion_model_not_callable(keep):
    from fastdiff import k_diffusion as K
    torch = _t()
    K.sample_euler(None, keep(torch.randn(2, 3)), torch.tensor([1.0, 0.0]), disable=True)

results, test_bad_input = cases.tests(__file__)
