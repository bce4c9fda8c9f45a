"""The embedded digits model: weights, quality (classifier accuracy, FD-digits), training, CLI."""

import argparse
import functools
import json

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("safetensors")

from fastdiff.models import classifier as clf  # noqa: E402
from fastdiff.models import digits  # noqa: E402

GUIDANCE = 1.5  # the CLI default scale


pytestmark = pytest.mark.usefixtures("one_thread")  # small convolutions: see conftest


@pytest.fixture(scope="module")
def model():
    return digits.load_digits_model()


@pytest.fixture(scope="module")
def classifier():
    return clf.load_classifier()


def test_dataset_split():
    x_tr, y_tr = digits.load_dataset("train")
    x_te, y_te = digits.load_dataset("test")
    x_all, _ = digits.load_dataset("all")
    assert x_tr.shape == (1397, 1, 8, 8) and x_te.shape == (digits.HELD_OUT, 1, 8, 8)
    assert x_all.min() == -1 and x_all.max() == 1
    assert set(y_te.tolist()) == set(range(10))
    # disjoint: no held-out image appears in the training split (the data has no duplicates
    # across these two splits, so compare the images themselves)
    tr = {bytes(a.numpy().tobytes()) for a in x_tr}
    assert not any(bytes(a.numpy().tobytes()) in tr for a in x_te)


def test_shipped_weights(model):
    for path, limit in ((digits.WEIGHTS, 5e6), (clf.CLASSIFIER_WEIGHTS, 1e6)):
        assert path.is_file() and path.stat().st_size <= limit
        meta = digits.read_metadata(path)
        assert meta["command"].startswith("fastdiff train ")
    meta = digits.read_metadata(digits.WEIGHTS)
    assert json.loads(meta["unet_config"])["num_class_embeds"] == digits.NULL_LABEL + 1
    # a VE denoiser: D(x, 0) = x (c_skip = 1, c_out = -sigma), finite at the largest sigma
    x = torch.randn(2, 1, 8, 8)
    y = torch.tensor([3, digits.NULL_LABEL])
    torch.testing.assert_close(model(x, torch.zeros(2), cond=y), x)
    assert model(x * model.schedule.sigma_max, model.schedule.sigma_max,
                 cond=y).isfinite().all()


def test_classifier_held_out_accuracy(classifier):
    x, y = digits.load_dataset("test")
    with torch.no_grad():
        acc = (classifier(x).argmax(1) == y).double().mean().item()
    assert acc >= 0.95


def test_frechet_distance_exact():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T, b @ b.T + np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    cross = np.trace(scipy_linalg.sqrtm(s1 @ s2)).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross
    assert clf.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert abs(clf.frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    # commuting (diagonal) covariances: |mu1 - mu2|^2 + |sqrt(d1) - sqrt(d2)|^2
    d1, d2 = rng.uniform(0.5, 2, 4), rng.uniform(0.5, 2, 4)
    exact = ((mu1[:4] - mu2[:4]) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    fd = clf.frechet_distance(mu1[:4], np.diag(d1), mu2[:4], np.diag(d2))
    assert fd == pytest.approx(exact, rel=1e-12)
    # a rank-deficient covariance (as ReLU features give) stays finite and non-negative
    assert clf.frechet_distance(mu1, np.zeros((6, 6)), mu1, s2) == pytest.approx(np.trace(s2))


def test_samples_are_recognised(model, classifier):
    """Acceptance: 20 steps of DPM-Solver++(2M), Karras sigmas, guidance 1.5: 200 digits (20 per
    class) classified as requested >= 90%, FD-digits far below that of noise."""
    labels = torch.arange(10).repeat(20)
    x = digits.sample_digits(model, labels, steps=20, solver="dpmpp_2m", guidance=GUIDANCE,
                             seed=0)
    assert x.shape == (200, 1, 8, 8)
    gen = clf.evaluate_digits(x, labels, classifier)
    g = torch.Generator().manual_seed(1)
    noise = clf.evaluate_digits(torch.randn(200, 1, 8, 8, generator=g).clamp(-1, 1), labels,
                                classifier)
    # the floor: 200 real training digits against the held-out ones (same sample size)
    x_tr, y_tr = digits.load_dataset("train")
    idx = torch.randperm(len(x_tr), generator=g)[:200]
    real = clf.evaluate_digits(x_tr[idx], y_tr[idx], classifier)
    print(f"accuracy {gen['accuracy']:.3f}; FD generated {gen['fd']:.1f}, real {real['fd']:.1f}, "
          f"noise {noise['fd']:.1f}")
    assert gen["accuracy"] >= 0.9
    assert gen["fd"] < noise["fd"] / 10
    assert noise["accuracy"] < 0.5  # the metric is not trivially satisfied


def test_sampling_float64_and_seed(model):
    labels = [0, 7]
    a = digits.sample_digits(model, labels, steps=8, seed=3)
    b = digits.sample_digits(model, labels, steps=8, seed=3)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    m64 = digits.load_digits_model(dtype=torch.float64)
    c = digits.sample_digits(m64, labels, steps=8, seed=3)
    assert c.dtype == torch.float64
    torch.testing.assert_close(c.float(), a, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="labels"):
        digits.sample_digits(model, [11], steps=2)
    with pytest.raises(ValueError, match="solver"):
        digits.sample_digits(model, [1], steps=2, solver="nope")


def test_fused_engine_matches_reference(model):
    """`sample_digits(backend=...)` runs the fused engine (fastdiff.Sampler) and gives the
    reference solver's samples, guidance on."""
    pytest.importorskip("fastdiff.sampler")
    labels = [1, 4, 9]
    ref = digits.sample_digits(model, labels, steps=6, guidance=GUIDANCE, seed=5)
    fused = digits.sample_digits(model, labels, steps=6, guidance=GUIDANCE, seed=5,
                                 backend="auto")
    # x starts at sigma_max ~ 157: fp32 rounding there is ~1e-5 absolute; allow ~10 ulps of it
    torch.testing.assert_close(fused, ref, atol=1e-4, rtol=0)


def test_solver_options(model):
    """`options` go to the solver on both paths (and key the engine's cache): ancestral Euler
    with eta = 0 is Euler, with its default eta = 1 it is not."""
    pytest.importorskip("fastdiff.sampler")
    labels = [2, 7]
    for backend in (None, "auto"):
        run = functools.partial(digits.sample_digits, model, labels, steps=5, seed=5,
                                backend=backend)
        euler = run(solver="euler")
        torch.testing.assert_close(run(solver="euler_ancestral", options={"eta": 0.0}), euler,
                                   atol=1e-4, rtol=0)
        assert (run(solver="euler_ancestral") - euler).abs().max() > 0.1


def test_cfg_pp_at_guidance_one_reads_the_unconditional_prediction(model):
    """At guidance 1 the conditional model alone serves every solver but CFG++, which renoises
    with D_u: it must still get the unconditional half, not run as its base solver (D_u = D),
    and the fused engine must agree with the reference."""
    pytest.importorskip("fastdiff.sampler")
    labels = [2, 7]
    run = functools.partial(digits.sample_digits, model, labels, steps=5, seed=5, guidance=1.0)
    ref = run(solver="euler_cfg_pp")
    assert (ref - run(solver="euler")).abs().max() > 0.1
    torch.testing.assert_close(run(solver="euler_cfg_pp", backend="auto"), ref, atol=1e-4,
                               rtol=0)


def test_train_smoke_and_deterministic(tmp_path):
    from fastdiff.train import train_classifier, train_digits

    a = train_digits(tmp_path / "a.safetensors", steps=2, batch_size=8, disable=True)
    b = train_digits(tmp_path / "b.safetensors", steps=2, batch_size=8, disable=True)
    assert a["loss"] == b["loss"]
    ma = digits.load_digits_model(path=a["path"])
    mb = digits.load_digits_model(path=b["path"])
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(pa, pb)
    meta = digits.read_metadata(a["path"])
    assert "--steps 2 --batch-size 8" in meta["command"]
    r = train_classifier(tmp_path / "c.safetensors", steps=2, disable=True)
    assert 0 <= r["accuracy"] <= 1
    clf.load_classifier(path=r["path"])


def _cli(add_parser, argv):
    parser = argparse.ArgumentParser(prog="fastdiff")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_sample(tmp_path, capsys):
    from PIL import Image

    from fastdiff.sample_cli import add_sample_parser

    png, npz = tmp_path / "g.png", tmp_path / "s.npz"
    rc = _cli(add_sample_parser, ["sample", "--labels", "0-2,7", "--solver", "euler",
                                  "--steps", "4", "--out", str(png), "--npz", str(npz),
                                  "--quiet"])
    assert rc == 0 and "4 digits" in capsys.readouterr().out
    data = np.load(npz)
    assert data["images"].shape == (4, 8, 8) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [0, 1, 2, 7]
    assert Image.open(png).size[0] > 4 * 8
    with pytest.raises(SystemExit):
        _cli(add_sample_parser, ["sample", "--labels", "12"])


def test_cli_train(tmp_path, capsys):
    from fastdiff.train import add_train_parser

    out = tmp_path / "d.safetensors"
    rc = _cli(add_train_parser, ["train", "digits", "--steps", "2", "--batch-size", "4",
                                 "--out", str(out), "--quiet"])
    assert rc == 0 and out.is_file()
    cmd = digits.read_metadata(out)["command"]
    assert cmd.startswith("fastdiff train digits --steps 2 --batch-size 4") and str(out) in cmd
