"""The bad-input matrix's machinery, shared by tests/test_bad_inputs_*.py (one file per area).

Every case must end in a Python exception of the expected type whose message names the
offending argument -- never a crash (segfault, abort), a hang, or a silent success -- and must
leave its inputs unmodified. A few cases are valid-but-unusual inputs (non-contiguous views,
...) that must succeed with the right answer: expected type None.

Crash detection: one subprocess (the test file run as a script) imports fastdiff once, then
runs each case in a child made with os.fork(); a case that kills its child (signal, abort) or
exits without reporting is a crash, not a pass. The child reports `type(e).__name__` and the
message through a pipe and exits 3 (exception), 0 (no exception) or 4 (inputs modified).

    cases = Cases()

    @cases.case("TypeError", "inputs[0]")
    def lincomb_int_inputs(keep):          # keep(t) snapshots t, checked unmodified after
        lincomb([keep(torch.ones(4, dtype=torch.int32))], coef)

    results, test_bad_input = cases.tests(__file__)   # the pytest fixture and test

One subprocess runs the cases of every tests/test_bad_inputs_*.py file (this file run as a
script), once per pytest session: each import of fastdiff costs seconds on a shared runner.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


class Cases:
    def __init__(self):
        self.cases: dict = {}  # name -> (fn(keep), expected exception type name or None, text)

    def case(self, exc: str | None, match: str = ""):
        def register(fn):
            self.add(fn.__name__, fn, exc, match)
            return fn
        return register

    def add(self, name: str, fn, exc: str | None, match: str = "") -> None:
        if name in self.cases:
            raise ValueError(f"bad-input case {name!r} defined twice")
        self.cases[name] = (fn, exc, match)

    def tests(self, path: str):
        """(the `results` fixture, the parametrized test) for the test file `path`."""
        area = Path(path).stem

        @pytest.fixture(scope="module", name="results")
        def results():
            return _all_results()[area]

        @pytest.mark.parametrize("name", sorted(self.cases))
        def test_bad_input(results, name):
            _, exc, match = self.cases[name]
            r = results[name]
            if exc is None:
                assert r["status"] == "ok", f"{name}: expected success, got {r}"
                return
            assert r["status"] == "raised", f"{name}: expected {exc}, got {r}"
            got_type, _, msg = r["text"].partition(": ")
            assert got_type == exc, f"{name}: expected {exc}, got {r['text']}"
            assert match in msg, f"{name}: the message should name {match!r}: {r['text']}"

        return results, test_bad_input


AREAS = sorted(p.stem for p in Path(__file__).parent.glob("test_bad_inputs_*.py"))


@functools.cache
def _all_results() -> dict:
    """area -> case name -> result, from one subprocess for all areas."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env,
                          timeout=480, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_backends() -> list[str]:
    import torch

    from fastdiff.ops import BACKENDS, unavailable_reason
    return [b for b in BACKENDS if not unavailable_reason(b, torch.device("cpu"))]


def _snapshot(t):
    return t.detach().cpu().clone() if t.device.type != "meta" else None


def _same(a, b) -> bool:
    import torch

    if b is None:
        return True
    return a.shape == b.shape and torch.equal(torch.nan_to_num(a.detach().cpu()),
                                              torch.nan_to_num(b))


def _child(fn, wfd: int) -> None:
    import traceback

    kept = []

    def keep(t):
        kept.append((t, _snapshot(t)))
        return t

    code, text = 0, ""
    try:
        fn(keep)
    except BaseException as e:  # noqa: BLE001 -- SystemExit too: the CLI cases
        code, text = 3, f"{type(e).__name__}: {e}"
        if type(e).__name__ == "AssertionError":
            text += "\n" + traceback.format_exc()[-1500:]
    if not all(_same(t, snap) for t, snap in kept):
        code, text = 4, f"inputs modified in place ({text})"
    os.write(wfd, text[:4000].encode())
    os.close(wfd)
    os._exit(code)


def run_all(cases: dict, names) -> dict:
    import torch

    import fastdiff.sampler  # noqa: F401 -- import once, before forking
    torch.set_num_threads(1)
    results = {}
    for name in names:
        fn = cases[name][0]
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            _child(fn, wfd)
        os.close(wfd)
        deadline = time.monotonic() + 60
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                status = -1
                break
            time.sleep(0.002)
        chunks = []
        while chunk := os.read(rfd, 65536):
            chunks.append(chunk)
        os.close(rfd)
        text = b"".join(chunks).decode(errors="replace")
        if status == -1:
            results[name] = {"status": "hang", "text": text}
        elif os.WIFSIGNALED(status):
            results[name] = {"status": "crash", "text": f"signal {os.WTERMSIG(status)}"}
        else:
            code = os.WEXITSTATUS(status)
            kind = {0: "ok", 3: "raised", 4: "modified"}.get(code, "crash")
            results[name] = {"status": kind, "text": text, "code": code}
    return results


if __name__ == "__main__":  # the subprocess: every area's cases (or the areas named)
    sys.path.insert(0, str(Path(__file__).parent))
    results = {}
    for area in sys.argv[1:] or AREAS:
        cases = importlib.import_module(area).cases.cases
        results[area] = run_all(cases, sorted(cases))
    print(json.dumps(results))
