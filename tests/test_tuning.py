"""Tuned plans (fastdiff.tuning): the file round-trips into every consumer, tuning is
reproducible, tuned schedules are valid and beat the fixed ones on held-out noise of the exact
mixture, and a negative control (random targets) does not."""

import json
import warnings
from functools import cache

import pytest
import torch

import fastdiff
from fastdiff.models.gmm import GaussianMixture
from fastdiff.tune_cli import MIXTURE_RANGE, mixture_problem
from fastdiff.tuning import TunedPlan, _run, fixed_sigmas, load_plan, model_identity

pytestmark = pytest.mark.usefixtures("one_thread")
LO, HI = MIXTURE_RANGE
SOLVERS = ["dpmpp_2m", "unipc_bh2_2", "euler", "ipndm"]


@cache
def _problem(seed: int, n: int = 128):
    return mixture_problem(n, seed)


def _tuned(solver="dpmpp_2m", nfe=4, seed=1000, max_evals=40, targets=None,
           **kwargs) -> TunedPlan:
    g, noise, exact = _problem(seed)
    return fastdiff.tune(g, solver, nfe, noise=noise, targets=exact if targets is None else
                         targets, sigma_min=LO, sigma_max=HI, max_evals=max_evals,
                         progress=False, **kwargs)


def _held_out_error(solver: str, sigmas) -> float:
    """RMSE against the exact ODE solution from noise * HI; the run starts from the same noise
    at the schedule's first level (HI unless tuned with tune_start)."""
    g, noise, exact = _problem(7)  # noise never used for tuning
    out = _run(g, solver, noise * float(sigmas[0]), sigmas, {}, 512, {})
    return float((out - exact).pow(2).mean().sqrt())


def test_round_trip_into_every_consumer(tmp_path):
    from fastdiff.diffusers import EulerDiscreteScheduler

    plan = _tuned(max_evals=10)
    path = plan.save(tmp_path / "plan.json")
    loaded = load_plan(path)
    assert torch.equal(loaded.sigmas, plan.sigmas) and loaded.sigmas.dtype == torch.float64
    assert loaded.to_dict() == plan.to_dict()
    assert json.loads(path.read_text())["model"]["hash"].startswith("sha256:")
    g, noise, _ = _problem(7)
    x = noise[:8] * HI
    expected = _run(g, "dpmpp_2m", x, plan.sigmas, {}, 8, {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right model: no warning
        engine = fastdiff.Sampler(g, "dpmpp_2m", sigmas=loaded, backend="reference")(x)
        kd = fastdiff.k_diffusion.sample_dpmpp_2m(g, x, loaded, disable=True)
    torch.testing.assert_close(engine, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kd, expected, rtol=1e-12, atol=1e-12)
    sched = EulerDiscreteScheduler()  # diffusers takes the schedule with its final sigma
    sched.set_timesteps(sigmas=loaded.sigmas.tolist())
    torch.testing.assert_close(sched.sigmas.double(), loaded.sigmas.float().double())


def test_another_models_file_warns(tmp_path):
    plan = _tuned(max_evals=5)
    path = plan.save(tmp_path / "plan.json")
    other = GaussianMixture(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), 0.5)
    with pytest.warns(UserWarning, match="another model"):
        load_plan(path, model=other)
    with pytest.warns(UserWarning, match="another model"):
        fastdiff.Sampler(other, "dpmpp_2m", sigmas=load_plan(path))
    with pytest.warns(UserWarning, match="tuned for solver 'dpmpp_2m'"):
        fastdiff.Sampler(_problem(1000)[0], "euler", sigmas=load_plan(path))
    assert model_identity(other)["hash"] != plan.model["hash"]
    with pytest.raises(ValueError, match="format"):
        TunedPlan.from_dict({"sigmas": [1.0, 0.0]})


def test_reproducible_for_a_fixed_seed():
    a, b = _tuned(max_evals=25), _tuned(max_evals=25)
    assert torch.equal(a.sigmas, b.sigmas) and a.loss == b.loss
    c = _tuned(seed=1001, max_evals=25)
    assert not torch.equal(a.sigmas, c.sigmas)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("nfe", [3, 6])
def test_tuned_schedule_is_strictly_decreasing_and_valid(solver, nfe):
    plan = _tuned(solver, nfe, max_evals=15)
    s = plan.sigmas.tolist()
    assert len(s) == nfe + 1 and s[0] == pytest.approx(HI, rel=1e-15) and s[-1] == 0.0
    assert all(b < a for a, b in zip(s, s[1:]))
    assert s[-2] >= LO * (1 - 1e-12)
    assert plan.loss["final"] <= min(plan.loss["start"].values())
    g, noise, _ = _problem(7)
    engine = fastdiff.Sampler(g, solver, sigmas=plan, backend="reference")
    assert bool(torch.isfinite(engine(noise[:4] * HI)).all())
    # the same fused engine at the same per-step cost: as many launches, reading as many inputs
    karras = fastdiff.Sampler(g, solver, sigmas=fixed_sigmas("karras", nfe, LO, HI))
    assert [len(la.inputs) for la in engine.launches] == \
        [len(la.inputs) for la in karras.launches]
    assert engine.plan.nfe == karras.plan.nfe == nfe


def test_tuned_beats_fixed_schedules_on_held_out_noise():
    plan = _tuned("dpmpp_2m", 5, max_evals=120)
    tuned = _held_out_error("dpmpp_2m", plan.sigmas)
    fixed = {k: _held_out_error("dpmpp_2m", fixed_sigmas(k, 5, LO, HI))
             for k in ("karras", "exponential", "ays")}
    assert tuned < 0.8 * min(fixed.values()), (tuned, fixed)


def test_negative_control_random_targets_do_not_improve():
    """Tuning against random targets (same noise, targets unrelated to the model) must not
    improve the held-out error over the fixed schedule it starts from, while tuning against
    the true ODE solution with the same budget does."""
    g, noise, exact = _problem(1000)
    random = torch.randn(exact.shape, generator=torch.Generator().manual_seed(5),
                         dtype=exact.dtype) * exact.std()
    control = _tuned("dpmpp_2m", 5, max_evals=60, targets=random)
    start = fixed_sigmas(control.method["start"], 5, LO, HI)
    real = _tuned("dpmpp_2m", 5, max_evals=60)
    assert control.loss["final"] < min(control.loss["start"].values())  # it did optimise
    assert _held_out_error("dpmpp_2m", control.sigmas) >= _held_out_error("dpmpp_2m", start)
    assert _held_out_error("dpmpp_2m", real.sigmas) < _held_out_error("dpmpp_2m", start)


def test_tiny_diffusers_unet_with_prompts():
    """The API a user points at an SD1.5 UNet: a diffusers UNet2DConditionModel behind an
    epsilon denoiser on its schedule, classifier-free guidance over prompt embeddings."""
    from diffusers import UNet2DConditionModel

    from fastdiff.denoisers import CFGDenoiser, EpsDenoiser
    from fastdiff.schedules import DiscreteVPSchedule

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=8, attention_head_dim=2,
                                norm_num_groups=4).eval().requires_grad_(False)

    class PromptConditioned(torch.nn.Module):  # network(x, t, cond=embeddings)
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, cond):
            return self.unet(x, t, encoder_hidden_states=cond).sample

    network = PromptConditioned(unet)
    schedule = DiscreteVPSchedule.from_betas(beta_schedule="scaled_linear", beta_start=0.00085,
                                             beta_end=0.012, num_train_timesteps=1000)
    model = CFGDenoiser(EpsDenoiser(network, schedule=schedule), 7.5)
    prompts = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(1))  # "embeddings"
    cond = {"cond": prompts, "uncond": torch.zeros_like(prompts)}
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    plan = fastdiff.tune(model, "dpmpp_2m", 3, noise=noise, cond=cond, teacher_steps=8,
                         max_evals=6, progress=False)
    s = plan.sigmas.tolist()
    assert s[0] == pytest.approx(schedule.sigma_max) and all(b < a for a, b in zip(s, s[1:]))
    assert plan.model["config"]["guidance"] == 7.5
    assert plan.model["config"]["network_config"]["cross_attention_dim"] == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model it was tuned for: no warning
        out = fastdiff.Sampler(model, "dpmpp_2m", sigmas=plan)(noise * s[0], **cond)
    assert out.shape == noise.shape and bool(torch.isfinite(out).all())
    with torch.no_grad():  # other weights (e.g. load_state_dict): another model
        unet.conv_in.weight[0, 0, 0, 0] += 1
    with pytest.warns(UserWarning, match="another model"):
        fastdiff.Sampler(model, "dpmpp_2m", sigmas=plan)


@pytest.mark.parametrize("flags", [[], ["--tune-start", "--distance", "features"]])
def test_cli_tune_and_sample_with_the_plan(tmp_path, capsys, flags):
    from fastdiff.cli import main

    out = tmp_path / "plan.json"
    assert main(["tune", "--model", "digits", "--nfe", "3", "--per-class", "1",
                 "--teacher-steps", "6", "--max-evals", "3", "--quiet", "--out", str(out),
                 *flags]) == 0
    plan = load_plan(out)
    assert plan.method["tune_start"] is bool(flags)
    assert plan.method["distance"].startswith("L2 in features") is bool(flags)
    assert plan.solver == "dpmpp_2m" and plan.nfe == 3 and plan.seeds["seed"] == 1000
    assert plan.model["config"]["guidance"] == 1.5
    img = tmp_path / "d.png"
    assert main(["sample", "--plan", str(out), "--labels", "0,1", "--quiet",
                 "--out", str(img)]) == 0
    assert img.is_file() and "3 steps (tuned plan)" in capsys.readouterr().out


def test_quality_table_quick_mode(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "quality_tuned.py"
    spec = importlib.util.spec_from_file_location("quality_tuned", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "quality_tuned.md").read_text()
    for kind in ("karras", "ays", "tuned"):
        assert f"| dpmpp_2m | {kind} |" in table
    assert load_plan(tmp_path / "plans" / "dpmpp_2m_nfe3.json").nfe == 3


def _best_untuned(solver: str, nfe: int) -> float:
    return min(_held_out_error(solver, fixed_sigmas(k, nfe, LO, HI))
               for k in ("karras", "exponential", "ays"))


@pytest.mark.parametrize("solver", ["dpmpp_2m", "euler"])
def test_tuned_start_nfe5_matches_untuned_nfe10(solver):
    """With the first level tuned too, a 5-call plan is at least as close to the exact ODE
    solution on held-out noise as the best fixed 10-call schedule of the same solver (Euler:
    not reachable with sigma_max fixed, 0.28 vs 0.22 even tuned on the held-out noise)."""
    plan = _tuned(solver, 5, max_evals=300, tune_start=True, start_levels=())
    s = plan.sigmas.tolist()
    assert s[0] < HI and s[-1] == 0.0 and all(b < a for a, b in zip(s, s[1:]))
    assert s[-2] >= LO * (1 - 1e-12) and plan.method["tune_start"] is True
    assert _held_out_error(solver, plan.sigmas) <= _best_untuned(solver, 10)
    fixed_start = _tuned(solver, 5, max_evals=300)
    assert _held_out_error(solver, plan.sigmas) < _held_out_error(solver, fixed_start.sigmas)


def test_features_distance_and_bad_input():
    g, noise, exact = _problem(1000)
    seen = []

    def features(y):  # a fixed embedding: the distance is measured in it
        seen.append(y.shape)
        return torch.cat([y, y.pow(2)], 1)

    plan = fastdiff.tune(g, "euler", 3, noise=noise, targets=exact, sigma_min=LO, sigma_max=HI,
                         max_evals=10, progress=False, features=features)
    assert seen and all(sh == exact.shape for sh in seen)
    assert plan.method["distance"].startswith("L2 in features")
    assert plan.loss["final"] <= min(plan.loss["start"].values())
    with pytest.raises(TypeError, match="features"):
        fastdiff.tune(g, "euler", 3, noise=noise, targets=exact, sigma_min=LO, sigma_max=HI,
                      max_evals=3, progress=False, features="lpips")
