"""`fastdiff generate` (fastdiff/generate.py): the same bytes for any process count and batch
size, crash-safe resume, corruption repair, and a clear error on mismatched settings.

CPU only: the distributed run uses torchrun with the gloo backend. A stochastic solver
(dpmpp_2m_sde) so that the per-sample Philox seeds matter.
"""

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastdiff.generate import SettingsMismatchError, build_parser, generate, main

ROOT = Path(__file__).resolve().parent.parent
N = 24
COMMON = ["--num-samples", str(N), "--steps", "3", "--solver", "dpmpp_2m_sde", "--seed", "7",
          "--quiet"]


def run(out: Path, *extra: str) -> dict:
    return generate(build_parser().parse_args([*COMMON, "--out", str(out), *extra]))


def sample_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "manifest.json"}


def env() -> dict:
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    e.pop("WORLD_SIZE", None)
    return e


def check_complete(d: Path, n: int = N) -> dict:
    """Exactly n PNGs named 0..n-1, nothing else but the manifest; every checksum verifies and
    every file decodes as an 8x8 greyscale image."""
    from PIL import Image

    manifest = json.loads((d / "manifest.json").read_text())
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted([f"{k:06d}.png" for k in range(n)] + ["manifest.json"])
    assert sorted(manifest["files"]) == [f"{k:06d}.png" for k in range(n)]
    for name, rec in manifest["files"].items():
        data = (d / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == rec["sha256"], name
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.size == (8, 8) and im.mode == "L"
    return manifest


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "samples"
    manifest = run(out, "--batch-size", "7")
    assert manifest["config"]["labels"] == "k % 10"
    check_complete(out)
    return out


def test_batch_size_does_not_change_the_files(reference, tmp_path):
    run(tmp_path / "b", "--batch-size", "24")
    assert sample_files(tmp_path / "b") == sample_files(reference)
    # the samples are not all alike (the seeds differ per sample)
    assert len(set(sample_files(reference).values())) == N


def test_two_gloo_processes_equal_one_process(reference, tmp_path):
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "fastdiff.generate", *COMMON, "--out", str(out), "--batch-size", "5",
           "--device", "cpu"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = check_complete(out)
    assert manifest["last_run"]["world_size"] == 2
    assert sample_files(out) == sample_files(reference)
    ref = json.loads((reference / "manifest.json").read_text())
    assert manifest["files"] == ref["files"] and manifest["config_hash"] == ref["config_hash"]


def test_killed_run_resumes_to_exactly_n_verified_samples(reference, tmp_path):
    out = tmp_path / "killed"
    # batch size 1: many small batches, so there is time to kill it part-way
    cmd = [sys.executable, "-m", "fastdiff.generate", *COMMON, "--out", str(out),
           "--batch-size", "1"]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and len(list(out.glob("*.png"))) >= 4:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    partial = sorted(out.glob("*.png"))
    assert 4 <= len(partial) < N, f"kill came too late: {len(partial)} files"
    assert not (out / "manifest.json").exists()
    run(out, "--batch-size", "5")
    check_complete(out)
    assert sample_files(out) == sample_files(reference)


def test_corrupt_or_missing_files_are_regenerated_the_rest_skipped(reference, tmp_path):
    out = tmp_path / "repair"
    shutil.copytree(reference, out)
    (out / "000003.png").write_bytes(b"\x89PNG garbage")
    (out / "000010.png").unlink()
    untouched = out / "000005.png"
    before = untouched.stat().st_mtime_ns
    time.sleep(0.01)
    run(out, "--batch-size", "4")
    check_complete(out)
    assert sample_files(out) == sample_files(reference)
    assert untouched.stat().st_mtime_ns == before  # verified, not rewritten


def test_different_settings_in_the_directory_are_a_clear_error(reference, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(reference, out)
    with pytest.raises(SettingsMismatchError, match=r"steps: 3 -> 4"):
        generate(build_parser().parse_args([*COMMON, "--out", str(out), "--steps", "4"]))
    # sample files without any manifest were not made by this command: never overwritten
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "000000.png").write_bytes(b"someone else's")
    with pytest.raises(SettingsMismatchError, match="no manifest"):
        run(foreign)
    assert (foreign / "000000.png").read_bytes() == b"someone else's"
    # the command line prints it and exits with 2; nothing was touched
    argv = [*COMMON, "--out", str(out), "--guidance", "2.0"]
    assert main(argv) == 2
    assert sample_files(out) == sample_files(reference)


def test_npz_shards_are_the_same_samples(reference, tmp_path):
    from PIL import Image

    out = tmp_path / "npz"
    run(out, "--format", "npz", "--shard-size", "10", "--batch-size", "8")
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["shard-00000.npz", "shard-00001.npz", "shard-00002.npz"]
    images, labels, seeds = [], [], []
    for name, rec in sorted(manifest["files"].items()):
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == rec["sha256"]
        with np.load(out / name) as z:
            images.append(z["images"])
            labels.append(z["labels"])
            seeds.append(z["seeds"])
    images, labels, seeds = map(np.concatenate, (images, labels, seeds))
    np.testing.assert_array_equal(labels, np.arange(N) % 10)
    np.testing.assert_array_equal(seeds, 7 + np.arange(N))
    png = np.stack([np.asarray(Image.open(reference / f"{k:06d}.png")) for k in range(N)])
    np.testing.assert_array_equal(images, png)


def test_bad_arguments_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="--num-samples"):
        generate(build_parser().parse_args(["--num-samples", "0", "--out", str(tmp_path)]))
    with pytest.raises(ValueError, match="--solver"):
        generate(build_parser().parse_args(["--num-samples", "2", "--out", str(tmp_path),
                                            "--solver", "nope"]))
