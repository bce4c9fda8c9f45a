#!/usr/bin/env python3
"""ptxas resource report and FMA check of fastdiff._C's CUDA kernels (issue 13, section 2).

    scripts/ptxas_report.py [--out benchmarks/results/ptxas-sm90.txt] [--so fastdiff/_C...so]

Reads the table the build writes beside the module (fastdiff/_C.ptxas.txt: registers, stack,
spill stores/loads and static shared memory per kernel and arch, from `ptxas -v`), copies it to
--out, and checks what tests/test_ptxas.py asserts: the lincomb and group-norm kernels are
spill-free, sm_90 is built, and the lincomb kernels' step math holds no FMA (SASS without FFMA
for the unclipped fp32/fp16/bf16 kernels, their PTX without fma or contractable mul/add.f32).
Exit 1 on a failed check. Standard library only (no torch): it runs before or without a GPU.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ptxas = runpy.run_path(str(ROOT / "fastdiff" / "_ptxas.py"))
SPILL_FREE = ("lincomb_kernel", "group_norm_kernel")


def find_tool(name: str) -> str | None:
    """A CUDA binary tool: PATH, $CUDA_HOME/bin, nvcc's folder, then the copy Triton ships."""
    candidates = [shutil.which(name)]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", name))
    if nvcc := shutil.which("nvcc"):
        candidates.append(os.path.join(os.path.dirname(os.path.realpath(nvcc)), name))
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                       "bin", name))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)),
                None)


def built_module() -> Path | None:
    found = sorted(glob.glob(str(ROOT / "fastdiff" / "_C*.so")))
    return Path(found[0]).resolve() if found else None


def compile_kernels(sources: list[str], arch: str, workdir: Path) -> tuple[list[dict], list[Path]]:
    """`nvcc -cubin -Xptxas=-v` of csrc/<sources> (for a _C built without the report): rows and
    cubins. Same flags as setup.py's device code."""
    nvcc = shutil.which("nvcc") or find_tool("nvcc")
    rows, cubins = [], []
    for src in sources:
        cubin = workdir / (Path(src).stem + ".cubin")
        ptx = workdir / (Path(src).stem + ".ptx")
        common = [nvcc, "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
                  f"-I{ROOT / 'csrc' / 'include'}", "-DFASTDIFF_WITH_CUDA",
                  str(ROOT / "csrc" / src)]
        run = subprocess.run([*common, f"-arch=sm_{arch}", "-cubin", "-Xptxas=-v", "-o",
                              str(cubin)], capture_output=True, text=True, check=True)
        rows += ptxas["parse"](run.stdout + run.stderr)
        subprocess.run([*common, f"-arch=compute_{arch}", "-ptx", "-o", str(ptx)], check=True,
                       capture_output=True)
        cubins += [cubin, ptx]
    return rows, cubins


def sass_functions(binary: Path) -> dict[str, str]:
    """Demangled kernel name -> its SASS (cuobjdump -sass)."""
    tool = find_tool("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found (CUDA toolkit or triton's copy)")
    text = subprocess.run([tool, "-sass", str(binary)], capture_output=True, text=True,
                          check=True).stdout
    parts = re.split(r"^\s*Function : (\S+)\s*$", text, flags=re.M)
    names = ptxas["demangle"](parts[1::2])
    out: dict[str, str] = {}
    for name, body in zip(names, parts[2::2]):
        out[name] = out.get(name, "") + body
    return out


def ptx_text(binary: Path) -> str:
    if binary.suffix == ".ptx":
        return binary.read_text()
    tool = find_tool("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found (CUDA toolkit or triton's copy)")
    return subprocess.run([tool, "-ptx", str(binary)], capture_output=True, text=True,
                          check=True).stdout


def contracted_step_math(ptx: str) -> list[str]:
    """fp32 instructions of the fp32/fp16/bf16 lincomb kernels that are, or that ptxas may turn
    into, an FMA: fma.*.f32, and mul/add/sub.f32 without a rounding modifier (.rn is never
    contracted). Their only fp32 arithmetic is the step math (the noise is fp64, the clip's
    division div.rn), and the fp64 kernels run the same template code."""
    found = []
    for entry in re.split(r"^\s*(?:\.visible\s+)?\.entry\s+", ptx, flags=re.M)[1:]:
        name = entry.split("(", 1)[0].strip()
        if "lincomb_kernel" not in name or "lincomb_kernelId" in name:
            continue
        for line in entry.splitlines():
            op = line.strip().split(" ", 1)[0].split("\t", 1)[0]
            if re.fullmatch(r"fma\.\S*f32|(mul|add|sub)(\.ftz)?(\.sat)?\.f32", op):
                found.append(f"{ptxas['demangle']([name])[0]}: {line.strip()}")
    return found


def check(rows: list[dict], binaries: list[Path]) -> list[str]:
    """The failed checks, as messages (empty: all passed)."""
    failures = []
    if not any(r["arch"].startswith("sm_90") for r in rows):
        archs = sorted({r["arch"] for r in rows})
        failures.append(f"no sm_90 kernels in the report (archs: {archs})")
    for r in rows:
        if any(k in r["kernel"] for k in SPILL_FREE) and (r["spill_stores"] or r["spill_loads"]):
            failures.append(f"spills: {r['kernel']} ({r['arch']}): {r['spill_stores']} B stores,"
                            f" {r['spill_loads']} B loads")
    for b in binaries:
        if b.suffix == ".ptx":
            continue
        lincomb = {n: body for n, body in sass_functions(b).items() if "lincomb_kernel<" in n}
        unclipped = {n: body for n, body in lincomb.items()
                     if ", false, " in n and "<double" not in n}
        if b.suffix == ".so" or "lincomb" in b.name:
            if not unclipped:
                failures.append(f"{b.name}: no unclipped fp32/fp16/bf16 lincomb kernels in SASS")
            for n, body in unclipped.items():
                if re.search(r"\bFFMA\b", body):
                    failures.append(f"FFMA in {n}")
    for b in binaries:
        if b.suffix == ".so" or b.suffix == ".ptx" and "lincomb" in b.name:
            bad = contracted_step_math(ptx_text(b))
            if bad:
                failures.append(f"contractable step math in {b.name}'s PTX ({len(bad)}): "
                                + "; ".join(bad[:5]))
    return failures


def report(so: Path | None = None, workdir: Path | None = None
           ) -> tuple[list[dict], list[Path], str]:
    """(rows, binaries to inspect, header): the build's table and module, or a fresh compile
    of the lincomb and group-norm sources when the module has no table."""
    so = so or built_module()
    table = so.with_name("_C.ptxas.txt") if so else None
    if table is not None and table.is_file():
        text = table.read_text()
        return ptxas["read"](text), [so], "\n".join(
            ln[2:] for ln in text.splitlines() if ln.startswith("# "))
    workdir = workdir or Path(tempfile.mkdtemp(prefix="fastdiff-ptxas-"))
    rows, binaries = compile_kernels(["lincomb_cuda.cu", "group_norm_cuda.cu"], "90a", workdir)
    return rows, binaries, "ptxas -v of csrc/lincomb_cuda.cu, group_norm_cuda.cu (sm_90a)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--so", type=Path, help="the _C module (default: fastdiff/_C*.so)")
    parser.add_argument("--out", type=Path, help="write the table here too")
    args = parser.parse_args()
    rows, binaries, header = report(args.so)
    text = ptxas["table"](rows, header)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text, end="")
    failures = check(rows, binaries)
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    print(f"ptxas_report: {len(rows)} kernels, {len(failures)} failed checks", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
