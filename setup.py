"""Build of fastdiff._C: csrc/ compiled through ninja, with nvcc where it exists.

The native code is torch-free (raw pointers in, no torch headers), so this build needs only a C++
compiler, pybind11 and ninja, and one build serves every torch version. Environment:

    FASTDIFF_CUDA_ARCHS="80;89;90a"  architectures to compile for (default: the visible GPU's,
                                     else 90a, i.e. H100/H200)
    FASTDIFF_NO_CUDA=1               build the CPU-only module even where nvcc exists
    FASTDIFF_NVCC=/path/to/nvcc      nvcc to use (default: $CUDA_HOME/bin/nvcc, then PATH)
    MAX_JOBS=N                       parallel compile jobs (ninja's default otherwise)
    FASTDIFF_EXTRA_CXXFLAGS="..."    appended to the C++ flags (e.g. "-ffp-contract=fast
                                     -march=native" shows what tests/test_lincomb_fma.py catches)

Floating point: the step's element math is never contracted into FMAs (DESIGN.md, Numerics):
-ffp-contract=off on the host, explicit _rn intrinsics on the device (common.h: fd_mul/fd_add).
With nvcc, ptxas reports every kernel's registers, stack, spills and shared memory (-Xptxas=-v);
the build keeps each object's log and writes the table fastdiff/_C.ptxas.txt beside the module
(fastdiff/_ptxas.py; scripts/ptxas_report.py records it under benchmarks/results/).
"""

from __future__ import annotations

import os
import runpy
import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def source_hash() -> str:
    """Hash of csrc/, compiled into _C so Python can tell a stale build from a fresh one."""
    # Loaded by path: importing the fastdiff package here would import torch.
    return runpy.run_path(str(ROOT / "fastdiff" / "_source_hash.py"))["source_hash"](CSRC)


def find_nvcc() -> str | None:
    if os.environ.get("FASTDIFF_NO_CUDA", "0") not in ("", "0"):
        return None
    candidates = [os.environ.get("FASTDIFF_NVCC")]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        candidates.append(os.path.join(cuda_home, "bin", "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def cuda_lib_dir(nvcc: str) -> Path:
    """The folder holding libcudart_static.a (nvcc may be a wrapper script outside the toolkit)."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             str(Path(nvcc).resolve().parent.parent), "/usr/local/cuda"]
    for root in filter(None, roots):
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            if (Path(root) / sub / "libcudart_static.a").is_file():
                return Path(root) / sub
    raise RuntimeError(f"libcudart_static.a not found for {nvcc}; set CUDA_HOME")


def cuda_archs() -> list[str]:
    """Architectures: FASTDIFF_CUDA_ARCHS, else the visible GPUs' (via nvidia-smi), else 90a."""
    env = os.environ.get("FASTDIFF_CUDA_ARCHS", "").strip()
    if env:
        archs = [a.strip().replace(".", "") for a in env.replace(",", ";").split(";") if a.strip()]
    else:
        archs = []
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout
            archs = sorted({ln.strip().replace(".", "") for ln in out.splitlines() if ln.strip()})
        except (OSError, subprocess.SubprocessError):
            pass
        # Hopper gets the arch-specific target (wgmma/TMA-capable), as the default does.
        archs = [a + "a" if a == "90" else a for a in archs] or ["90a"]
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # PTX of the newest portable arch lets the driver JIT for GPUs newer than the list.
    portable = sorted({a.rstrip("af") for a in archs}, key=int)[-1]
    flags.append(f"-gencode=arch=compute_{portable},code=compute_{portable}")
    return flags


def openmp_flag(cxx: str) -> list[str]:
    if os.environ.get("FASTDIFF_NO_OPENMP", "0") not in ("", "0"):
        return []
    probe = subprocess.run(
        [cxx, "-fopenmp", "-x", "c++", "-E", "-"], input="#include <omp.h>\n",
        capture_output=True, text=True,
    )
    return ["-fopenmp"] if probe.returncode == 0 else []


def q(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


class NinjaBuildExt(build_ext):
    """Writes a build.ninja for csrc/ and runs ninja: incremental, parallel, no torch."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        build_dir = Path(self.build_temp).resolve() / "fastdiff_C"
        build_dir.mkdir(parents=True, exist_ok=True)
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)

        cxx = os.environ.get("CXX", "c++")
        nvcc = find_nvcc()
        omp = openmp_flag(cxx)
        # The hash goes to bindings.cpp alone: on every object's command line it made ninja
        # rebuild all of csrc/ (minutes of nvcc) for a one-line change anywhere.
        hash_define = f'-DFASTDIFF_SOURCE_HASH="{source_hash()}"'
        defines: list[str] = []
        includes = [f"-I{CSRC / 'include'}"]
        cu_sources = sorted(CSRC.glob("*.cu")) if nvcc else []
        archs = cuda_archs() if nvcc else []
        if nvcc:
            defines += ["-DFASTDIFF_WITH_CUDA", f'-DFASTDIFF_CUDA_ARCHS="{";".join(archs)}"']

        extra = shlex.split(os.environ.get("FASTDIFF_EXTRA_CXXFLAGS", ""))
        cflags = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", *omp,
                  *includes, *defines, f"-I{pybind11.get_include()}",
                  f"-I{sysconfig.get_paths()['include']}", *extra]
        ldflags = [*omp]
        lines = [
            "ninja_required_version = 1.3",
            f"cxx = {cxx}",
            f"cflags = {q(cflags)}",
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $cflags $extra -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = CXX $in",
        ]
        if nvcc:
            cuflags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler",
                       "-fvisibility=hidden", "-Xcompiler", "-ffp-contract=off",
                       "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=-v",
                       f"-ccbin={cxx}", *includes, *defines, *gencode_flags(archs)]
            ldflags += [f"-L{cuda_lib_dir(nvcc)}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"]
            lines += [
                f"nvcc = {nvcc}",
                f"cuflags = {q(cuflags)}",
                "rule cu",
                # ptxas -v's report kept per object ($out.ptxas); shown only on failure
                "  command = $nvcc -MD -MF $out.d $cuflags -c $in -o $out > $out.ptxas 2>&1"
                " || { cat $out.ptxas; exit 1; }",
                "  depfile = $out.d",
                "  deps = gcc",
                "  description = NVCC $in",
            ]
        lines += [
            f"ldflags = {q(ldflags)}",
            "rule link",
            "  command = $cxx -shared $in -o $out $ldflags",
            "  description = LINK $out",
        ]
        objects = []
        for src in sorted(CSRC.glob("*.cpp")) + cu_sources:
            obj = build_dir / (src.name + ".o")
            objects.append(obj)
            lines.append(f"build {obj}: {'cu' if src.suffix == '.cu' else 'cxx'} {src}")
            if src.name == "bindings.cpp":
                lines.append(f"  extra = {q([hash_define])}")
        lines.append(f"build {target}: link {' '.join(map(str, objects))}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")

        ninja = shutil.which("ninja")
        if ninja is None:
            import ninja as ninja_pkg

            ninja = os.path.join(ninja_pkg.BIN_DIR, "ninja")
        cmd = [ninja, "-C", str(build_dir)]
        if os.environ.get("MAX_JOBS"):
            cmd += ["-j", os.environ["MAX_JOBS"]]
        print(f"fastdiff: building _C ({'CUDA ' + ';'.join(archs) if nvcc else 'CPU only'})")
        subprocess.run(cmd, check=True)
        if nvcc:
            write_ptxas_table(build_dir, cu_sources, target.parent, archs)

    def copy_extensions_to_source(self) -> None:
        """--inplace / editable: the ptxas table travels with the module."""
        super().copy_extensions_to_source()
        table = Path(self.build_lib).resolve() / "fastdiff" / "_C.ptxas.txt"
        if table.is_file():
            shutil.copyfile(table, ROOT / "fastdiff" / "_C.ptxas.txt")


def write_ptxas_table(build_dir: Path, sources: list[Path], folder: Path,
                      archs: list[str]) -> None:
    """fastdiff/_C.ptxas.txt: every CUDA kernel's resources, from the objects' ptxas logs."""
    ptxas = runpy.run_path(str(ROOT / "fastdiff" / "_ptxas.py"))
    rows = []
    for src in sources:
        log = build_dir / (src.name + ".o.ptxas")
        if log.is_file():
            rows += [dict(r, source=src.name) for r in ptxas["parse"](log.read_text())]
    header = (f"ptxas -v resource usage of fastdiff._C ({';'.join(archs)}), csrc {source_hash()}\n"
              "registers per thread; stack, spill stores/loads in bytes per thread; smem in"
              " bytes per block (static)")
    (folder / "_C.ptxas.txt").write_text(ptxas["table"](rows, header))
    print(f"fastdiff: ptxas report of {len(rows)} kernels -> {folder / '_C.ptxas.txt'}")


setup(
    ext_modules=[Extension("fastdiff._C", sources=[])],
    cmdclass={"build_ext": NinjaBuildExt},
)
