"""diffusers' own scheduler test suite, run on fastdiff's drop-in classes.

The suite (diffusers' tests/schedulers and the helpers it imports, with its licence) lives
outside the project, in shared/peer/diffusers beside the repository (or $FASTDIFF_PEER_DIR); it
is copied to a temporary folder and run twice, at the same time, in two pytest processes:
once as it is (diffusers' classes) and once with tests/_peer_swap.py, which replaces every name
fastdiff.diffusers exports in `diffusers` and `diffusers.schedulers` before the suite's modules
are imported. Every test that passes with diffusers' classes must pass with fastdiff's, and
the swap must have taken effect for every fastdiff class the suite tests (it has no
FlowMatchEuler tests: tests/test_diffusers_flow_match.py has them). Skipped when the folder is
absent. Two tests need the Hub and are deselected (offline machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
F = pytest.importorskip("fastdiff.diffusers")

ROOT = Path(__file__).resolve().parents[1]
# fastdiff classes diffusers' suite has no tests for (tests/test_diffusers_flow_match.py and
# tests/test_diffusers_more_classes.py test them against diffusers' classes)
UNTESTED = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
            "FlowMatchLCMScheduler", "CogVideoXDDIMScheduler", "CogVideoXDPMScheduler",
            "CosineDPMSolverMultistepScheduler", "DDPMWuerstchenScheduler",
            "LTXEulerAncestralRFScheduler"]
HUB_TESTS = ["test_schedulers.py::SchedulerBaseTests::test_default_arguments_not_in_config",
             "test_schedulers.py::SchedulerBaseTests::test_default_solver_type_after_switch"]


def peer_folder() -> Path | None:
    if os.environ.get("FASTDIFF_PEER_DIR"):
        return Path(os.environ["FASTDIFF_PEER_DIR"])
    for parent in ROOT.parents:
        candidate = parent / "shared" / "peer" / "diffusers"
        if (candidate / "tests" / "schedulers").is_dir():
            return candidate
    return None


def run_suite(source: Path, work: Path, swap: bool) -> dict:
    folder = work / ("fastdiff" if swap else "diffusers")
    shutil.copytree(source, folder)
    for path in folder.rglob("*"):  # shared/ is read-only
        path.chmod(path.stat().st_mode | 0o200)
    report, junit = folder / "classes.json", folder / "junit.xml"
    env = dict(os.environ, HF_HUB_OFFLINE="1", DIFFUSERS_TEST_DEVICE="cpu", OMP_NUM_THREADS="1",
               FASTDIFF_PEER_REPORT=str(report), FASTDIFF_PEER_SWAP="1" if swap else "0",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                           os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "pytest", "tests/schedulers", "-q", "-p", "no:cacheprovider",
               "-p", "_peer_swap", "-W", "ignore", f"--junitxml={junit}"]
    command += [f"--deselect=tests/schedulers/{t}" for t in HUB_TESTS]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcomes[name] = ("failed" if kinds & {"failure", "error"} else
                          "skipped" if "skipped" in kinds else "passed")
    return dict(outcomes=outcomes, classes=json.loads(report.read_text()), seconds=seconds,
                tail=done.stdout[-3000:] + done.stderr[-2000:])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    source = peer_folder()
    if source is None:
        pytest.skip("diffusers' scheduler suite (shared/peer/diffusers) is not here")
    work = tmp_path_factory.mktemp("peer")
    with ThreadPoolExecutor(2) as pool:
        stock, swapped = pool.map(lambda swap: run_suite(source, work, swap), (False, True))
    print(f"\ndiffusers' scheduler suite: {stock['seconds']:.0f} s with diffusers' classes,"
          f" {swapped['seconds']:.0f} s with fastdiff's (run side by side)")
    return stock, swapped


def test_the_swap_took_effect(runs):
    stock, swapped = runs
    ours = {f"fastdiff.diffusers:{name}" for name in F.__all__}
    used = {c for classes in swapped["classes"].values() for c in classes}
    untested = {f"fastdiff.diffusers:{name}" for name in UNTESTED}
    assert used & ours == ours - untested  # every other fastdiff class is what the suite runs
    # no test class still runs diffusers' own class of a swapped name
    assert not {c for c in used if c.split(":")[1] in F.__all__} - ours
    stock_used = {c for classes in stock["classes"].values() for c in classes}
    assert not stock_used & ours  # and the stock run really ran diffusers' classes


def test_every_test_passing_with_diffusers_passes_with_fastdiff(runs):
    stock, swapped = runs
    passed = {n for n, o in stock["outcomes"].items() if o == "passed"}
    assert len(passed) > 900, stock["tail"]  # the suite ran
    lost = sorted(n for n in passed if swapped["outcomes"].get(n) != "passed")
    assert not lost, f"{len(lost)} tests fail with fastdiff's classes: {lost[:20]}\n" \
                     f"{swapped['tail']}"
