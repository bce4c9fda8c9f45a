"""fastdiff.diffusers has diffusers' API, surface and state, for every class: signatures that
pipelines inspect, exactly diffusers' public methods, diffusers' state after every step, steps
computed from the timestep given (img2img starts, timesteps outside the schedule, steps before
set_timesteps), validation where diffusers would fail later, twins built without diffusers'
__init__ or its warnings, save/load, and options the trace cannot express running diffusers'
own step (with a warning) rather than failing."""

from __future__ import annotations

import inspect
import logging
import warnings

import pytest
import torch

D = pytest.importorskip("diffusers")
F = pytest.importorskip("fastdiff.diffusers")
from fastdiff.diffusers._loops import Stepper, loop_timesteps  # noqa: E402

SHAPE = (2, 3, 8, 8)
pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops on a shared runner
RTOL = 1e-5
NAMES = list(F.__all__)
EXTRA = {"fastdiff_backend"}  # the one public name fastdiff adds (which implementation runs)


def fake_model(x, t):
    return torch.tanh(x) * 0.5 + 0.1 * x * (float(t) / 1000.0) + 0.05


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def both(name, **config):
    return getattr(D, name)(**config), getattr(F, name)(**config)


def step_kwargs(sched, seed=0):
    if "generator" in inspect.signature(sched.step).parameters:
        return {"generator": torch.Generator().manual_seed(seed)}
    return {}


def snapshot(attrs: dict) -> dict:
    """A copy that later in-place updates do not change (diffusers updates lists and PNDM's
    cur_model_output in place)."""
    def copy(v):
        if isinstance(v, torch.Tensor):
            return v.clone()
        return [copy(e) for e in v] if isinstance(v, list) else v

    return {k: copy(v) for k, v in attrs.items()}


def check_value(got, want, where, scale=1.0, exact=None):
    """Tensors within RTOL of the data's scale (history tensors such as Heun's derivative are
    differences of the data: diffusers' own float32 rounding is relative to the data). Beyond
    that, `exact()` (diffusers' same state in float64) decides: fastdiff's value must be no
    farther from it than diffusers' float32 value is (FlowMatchHeun's last derivative,
    (x - x0) / sigma at a small sigma, carries 1e-4 of diffusers' own cancellation error)."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.shape == want.shape, where
        if want.is_floating_point() and want.numel():
            assert torch.equal(got.isnan(), want.isnan()), where
            got, want = got.nan_to_num(), want.nan_to_num()
            bound = RTOL * max(scale, want.abs().max().item())
            error = (got.double() - want.double()).abs().max().item()
            if error > bound and exact is not None:
                truth = exact().nan_to_num().double()
                assert ((got.double() - truth).abs().max()
                        <= (want.double() - truth).abs().max()), where
            else:
                assert error <= bound, where
        else:
            assert torch.equal(got.cpu(), want.cpu()), where
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            check_value(g, w, f"{where}[{i}]", scale,
                        exact and (lambda i=i: exact()[i]))
    elif isinstance(want, (int, float, bool, str, type(None))):
        assert got == want or (got != got and want != want), (where, got, want)


@pytest.mark.parametrize("name", NAMES)
def test_signatures_and_public_surface_are_diffusers(name):
    ref, ours = both(name)
    for method in ("__init__", "set_timesteps", "step", "scale_model_input", "add_noise",
                   "scale_noise", "set_begin_index", "index_for_timestep"):
        assert hasattr(ours, method) == hasattr(ref, method), method
        if hasattr(ref, method):
            assert (inspect.signature(getattr(type(ours), method))
                    == inspect.signature(getattr(type(ref), method))), method
    public = {n for n in dir(ours) if not n.startswith("_")}
    assert public - EXTRA == {n for n in dir(ref) if not n.startswith("_")}


def test_no_method_that_only_raises():
    """hasattr does not lie (diffusers' WanVideoToVideoPipeline picks by hasattr(add_noise))."""
    flow = F.FlowMatchEulerDiscreteScheduler()
    assert not hasattr(flow, "add_noise") and hasattr(flow, "scale_noise")
    for name in NAMES:
        ours, theirs = getattr(F, name)(), getattr(D, name)()
        for method in ("add_noise", "scale_noise"):
            assert hasattr(ours, method) == hasattr(theirs, method), (name, method)
        assert not (hasattr(ours, "add_noise") and hasattr(ours, "scale_noise")), name


@pytest.mark.parametrize("name", NAMES)
def test_state_is_diffusers_after_every_step(name):
    """model_outputs, timestep_list, lower_order_nums, step_index, last_sample, ets, counter,
    dt, ...: diffusers' values after each step of a loop."""
    ref, ours = both(name)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    xs = [loop_states(s, x0) for s in (ref, ours)]
    assert rel_err(xs[1][0], xs[0][0]) <= RTOL
    scale = float(x0.abs().max()) * float(getattr(ref, "init_noise_sigma", 1.0))
    exact = []  # diffusers' loop in float64, run only where a value needs it

    def exact_state(i, key):
        if not exact:
            exact.append(loop_states(getattr(D, name)(), x0.double(), torch.float64)[1])
        return exact[0][i][key]

    for i, (mine, theirs) in enumerate(zip(xs[1][1], xs[0][1])):
        for key, want in theirs.items():
            if key not in ("_internal_dict", "is_scale_input_called"):
                assert key in mine, f"step {i}: {key} missing"
                check_value(mine[key], want, f"step {i}: {key}", scale,
                            lambda i=i, key=key: exact_state(i, key))


def loop_states(s, x0, dtype=None):
    """(the final sample, the scheduler's state after every step) of a 6-step loop; with
    `dtype`, every floating schedule tensor is cast to it after set_timesteps. (The global
    seed: DPMSolverSDE without noise_sampler_seed seeds its Brownian tree from it.)"""
    torch.manual_seed(0)
    s.set_timesteps(6)
    if dtype is not None:
        for k, v in vars(s).items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                setattr(s, k, v.to(dtype))
    kwargs, x = step_kwargs(s), x0 * getattr(s, "init_noise_sigma", 1.0)
    states, step = [], Stepper(s)
    for t in loop_timesteps(s):
        inp = s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x
        x = step(fake_model(inp, t), t, x, **kwargs).prev_sample
        states.append(snapshot(vars(s)))
    return x, states


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("start", [3, 7])
def test_loop_started_mid_schedule(name, start):
    """img2img/inpaint at strength < 1: the loop starts at timesteps[start] -- with
    set_begin_index where the class has it (as pipelines do), without for PNDM/DDIM/DDPM/LCM
    -- and every step is diffusers' for the timestep it is given."""
    ref, ours = both(name)
    outs = []
    for s in (ref, ours):
        torch.manual_seed(0)  # (DPMSolverSDE's Brownian seed)
        s.set_timesteps(10)
        begin = start * getattr(s, "order", 1)  # (DDPMWuerstchen has none)
        if hasattr(s, "set_begin_index"):
            s.set_begin_index(begin)
        x, kwargs = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)), step_kwargs(s)
        step = Stepper(s)
        for t in loop_timesteps(s, s.timesteps[begin:]):
            inp = s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x
            x = step(fake_model(inp, t), t, x, **kwargs).prev_sample
        outs.append(x)
    assert rel_err(outs[1], outs[0]) <= RTOL


@pytest.mark.parametrize("name", NAMES)
def test_step_wrapped_on_the_instance(name):
    """A user's wrapper put on the instance (`sched.step = logged(sched.step)`, before
    set_timesteps) is called, and the loop is still fused and diffusers': the twin that is
    traced runs diffusers' class's step, not the wrapper it copied (that recursed, or ran the
    fused step on the trace's symbols)."""
    ref, ours = both(name)
    outs, calls = [], []
    for s in (ref, ours):
        torch.manual_seed(0)  # (DPMSolverSDE's Brownian seed)
        real = s.step

        def logged(*args, _real=real, **kwargs):
            calls.append(1)
            return _real(*args, **kwargs)

        s.step = logged
        s.set_timesteps(10)
        x, kwargs = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)), step_kwargs(s)
        step = Stepper(s)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="fastdiff")  # nothing falls back
            for t in loop_timesteps(s):
                inp = s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x
                x = step(fake_model(inp, t), t, x, **kwargs).prev_sample
        outs.append(x)
    assert len(calls) == 2 * len(loop_timesteps(ref))
    plans = list(ours._fd_state().shared.plans.values())
    assert plans and all(hasattr(p, "chunks") for p in plans)
    assert rel_err(outs[1], outs[0]) <= RTOL


def test_pndm_step_from_the_timestep_given():
    """The issue's minimal case: SD's PNDM config, one step at timesteps[4] (0.76 before)."""
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  skip_prk_steps=True, steps_offset=1)
    ref, ours = both("PNDMScheduler", **config)
    eps, x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3))
    got = []
    for s in (ref, ours):
        s.set_timesteps(10)
        got.append(s.step(eps, s.timesteps[4], x).prev_sample)
    assert rel_err(got[1], got[0]) <= RTOL


def test_ddim_step_at_any_integer_timestep():
    ref, ours = both("DDIMScheduler", steps_offset=1)
    eps, x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(4))
    for s in (ref, ours):
        s.set_timesteps(10)
    for t in (0, 1, 37, 500, 999, torch.tensor(123), torch.tensor(501)):
        want = ref.step(eps, t, x, eta=0.3, generator=torch.Generator().manual_seed(0))
        got = ours.step(eps, t, x, eta=0.3, generator=torch.Generator().manual_seed(0))
        assert rel_err(got.prev_sample, want.prev_sample) <= RTOL
        assert rel_err(got.pred_original_sample, want.pred_original_sample) <= RTOL


def test_ddpm_training_timesteps_loop_without_set_timesteps():
    """`for t in reversed(range(num_train_timesteps))` with no set_timesteps, as diffusers
    allows (its training schedule)."""
    ref, ours = both("DDPMScheduler", num_train_timesteps=40)
    outs = []
    for s in (ref, ours):
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(6)
        for t in reversed(range(40)):
            x = s.step(fake_model(x, t), t, x, generator=g).prev_sample
        outs.append(x)
    assert rel_err(outs[1], outs[0]) <= RTOL


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                  "EDMEulerScheduler",
                                  "FlowMatchEulerDiscreteScheduler", "LMSDiscreteScheduler",
                                  "HeunDiscreteScheduler"])
def test_scale_model_input_and_step_before_set_timesteps(name):
    """Their construction schedule works in diffusers without set_timesteps (AttributeError
    in fastdiff before)."""
    ref, ours = both(name)
    x, eps = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(7))
    got = []
    for s in (ref, ours):
        t = s.timesteps[0]
        inp = s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x
        got.append((inp, s.step(eps, t, x, **step_kwargs(s)).prev_sample))
    assert torch.equal(got[1][0], got[0][0])
    assert rel_err(got[1][1], got[0][1]) <= RTOL


def test_validation_where_diffusers_fails_later():
    for name in ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                 "DEISMultistepScheduler", "EDMDPMSolverMultistepScheduler"):
        for order in (0, 4, 7):
            with pytest.raises(ValueError, match="solver_order"):
                getattr(F, name)(solver_order=order)
        getattr(F, name)(solver_order=3)
    with pytest.raises(ValueError, match="solver_order"):
        F.UniPCMultistepScheduler(solver_order=0)
    F.UniPCMultistepScheduler(solver_order=4)  # UniPC's update is general in the order
    with pytest.raises(ValueError, match="solver_order"):
        F.DPMSolverMultistepScheduler.from_config(D.DDIMScheduler().config, solver_order=5)
    for name in NAMES:
        for steps in (0, -3, 2.5):
            with pytest.raises(ValueError, match="num_inference_steps"):
                getattr(F, name)().set_timesteps(steps)


def test_twins_without_init_and_without_repeated_warnings(monkeypatch):
    """set_timesteps + a loop build no diffusers scheduler (KDPM2's __init__ builds a 1000-step
    schedule) and repeat none of diffusers' config warnings."""
    import fastdiff.diffusers._shared as shared

    monkeypatch.setattr(shared, "_SHARED", shared.collections.OrderedDict())
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("diffusers")
    handler = Keep()
    logger.addHandler(handler)
    try:
        sched = F.KDPM2DiscreteScheduler.from_config({**D.KDPM2DiscreteScheduler().config,
                                                      "not_a_key": 1})
        before = len(records)
        assert any("will be ignored" in r for r in records)
        inits = []
        real = D.KDPM2DiscreteScheduler.__init__
        monkeypatch.setattr(D.KDPM2DiscreteScheduler, "__init__",
                            lambda *a, **k: inits.append(1) or real(*a, **k))
        sched.set_timesteps(8)
        x = torch.randn(SHAPE)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for t in sched.timesteps:
                x = sched.step(fake_model(sched.scale_model_input(x, t), t), t, x).prev_sample
        assert inits == [] and records[before:] == []
    finally:
        logger.removeHandler(handler)


def test_scheduler_save_and_load_round_trip(tmp_path):
    """save_pretrained / from_pretrained is exact, both ways between the libraries."""
    for name in NAMES:
        # (DDPMWuerstchen's schedule is continuous: its config has scaler and s instead)
        config = (dict(scaler=1.5, s=0.01) if name == "DDPMWuerstchenScheduler"
                  else dict(num_train_timesteps=500))
        ours = getattr(F, name)(**config)
        ours.save_pretrained(tmp_path / name)
        for cls in (getattr(F, name), getattr(D, name)):
            loaded = cls.from_pretrained(tmp_path / name)
            assert type(loaded) is cls
            assert dict(loaded.config) == {k: v for k, v in ours.config.items()
                                           if k != "_use_default_values"} | {
                k: v for k, v in loaded.config.items() if k.startswith("_")}
            loaded.set_timesteps(7)
            ref = getattr(D, name)(**config)
            ref.set_timesteps(7)
            assert torch.equal(loaded.timesteps, ref.timesteps)


def test_a_tensor_option_runs_diffusers_step_with_a_warning():
    """FlowMatch's per_token_timesteps (a tensor) cannot be traced: diffusers' own step runs,
    said once, with diffusers' numbers."""
    ref, ours = both("FlowMatchEulerDiscreteScheduler")
    x, eps = torch.randn(2, 2, 5, 3, generator=torch.Generator().manual_seed(8))
    got = []
    for s in (ref, ours):
        s.set_timesteps(4)
        t = s.timesteps[0]
        per_token = torch.full((2, 5), float(t))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got.append(s.step(eps, t, x, per_token_timesteps=per_token).prev_sample)
        if s is ours:
            assert any("per_token_timesteps" in str(w.message) for w in caught)
    assert torch.equal(got[1], got[0])


def test_set_timesteps_arguments_are_bound_as_inspect_binds_them():
    """_arguments.bind (the by-hand binding of every first set_timesteps) names what inspect's
    bind names, and raises what it raises, for every class's signature."""
    from fastdiff.diffusers._arguments import bind

    calls = [((10,), {}), ((), dict(num_inference_steps=10)), ((10,), dict(device="cpu")),
             ((10, "cpu"), {}), ((), dict(sigmas=[1.0, 0.5])), ((), dict(timesteps=[999, 10])),
             ((), {}), ((1, 2, 3, 4, 5, 6, 7, 8), {}), ((10,), dict(num_inference_steps=10)),
             ((), dict(not_an_argument=1))]
    for name in NAMES:
        fn = getattr(D, name).set_timesteps
        for args, kwargs in calls:
            try:
                want = dict(inspect.signature(fn).bind(None, *args, **kwargs).arguments)
                want.pop("self")
            except TypeError as error:
                with pytest.raises(TypeError, match=str(error)):
                    bind(fn, None, args, kwargs)
                continue
            assert bind(fn, None, args, kwargs) == want, (name, args, kwargs)


def test_a_config_changed_after_construction_gets_its_own_plans():
    """register_to_config replaces the config object: the plan cache's key follows it (a
    stale key would reuse plans traced for the old config, as the sibling's here)."""
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sibling = F.DDIMScheduler(**config)
    sibling.set_timesteps(10)
    x, eps = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(5))
    sibling.step(eps, sibling.timesteps[0], x)
    ref, ours = both("DDIMScheduler", **config)
    got = []
    for s in (ref, ours):
        s.register_to_config(timestep_spacing="trailing", set_alpha_to_one=False)
        s.set_timesteps(10)
        got.append(s.step(eps, s.timesteps[0], x).prev_sample)
    assert rel_err(got[1], got[0]) <= RTOL
