"""scripts/gpu_check.sh --dry-run in CI (issue 13, section 4): the plan of the one prepared GPU
run names only test files, selections and benchmarks that exist (pytest --collect-only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _dry_run(**env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def test_the_dry_run_checks_the_plan():
    run = _dry_run()
    assert run.returncode == 0, run.stdout + run.stderr
    assert "dry run: ok" in run.stdout
    for tool in ("memcheck", "racecheck", "synccheck"):
        assert f"sanitizer: {tool}" in run.stdout


def test_the_dry_run_fails_on_a_missing_test_file():
    run = _dry_run(GPU_CHECK_EXTRA_TESTS="tests/test_no_such_file.py")
    assert run.returncode != 0
    assert "MISSING: tests/test_no_such_file.py" in run.stdout
