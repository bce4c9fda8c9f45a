"""`fastdiff info`: versions, devices, and every backend with available / unavailable and why."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

import fastdiff
from fastdiff import _native
from fastdiff.ops import _backends


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_revision() -> str:
    root = Path(fastdiff.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "-uno"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _attention_dispatch() -> dict:
    from fastdiff.ops.attention import attention_dispatch_info

    return attention_dispatch_info()


def collect() -> dict:
    """Everything `fastdiff info` prints, as a dict (benchmarks record it with their results)."""
    mod, reason = _native.load()
    native = {"built": mod is not None, "reason": reason}
    if mod is not None:
        native.update(source_hash=mod.source_hash(), cuda=mod.has_cuda(),
                      cuda_archs=mod.cuda_archs(), openmp=mod.has_openmp())
        if mod.has_cuda():
            native.update(cuda_runtime=mod.cuda_runtime_version(),
                          cuda_driver=mod.cuda_driver_version())
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(dict(index=i, name=p.name, capability=f"{p.major}.{p.minor}",
                                memory_gib=round(p.total_memory / 2**30, 1),
                                sms=p.multi_processor_count))
    return dict(
        fastdiff=fastdiff.__version__, git=git_revision(), python=platform.python_version(),
        platform=platform.platform(), torch=torch.__version__, torch_cuda=torch.version.cuda,
        triton=_version("triton"), numpy=_version("numpy"), diffusers=_version("diffusers"),
        cpu_threads=torch.get_num_threads(), cuda_devices=devices, native=native,
        backends=_backends.status(),
        attention=_attention_dispatch(),
        triton_interpret=os.environ.get("TRITON_INTERPRET", ""),
    )


def render(info: dict) -> str:
    lines = [f"fastdiff {info['fastdiff']}" + (f" (git {info['git']})" if info["git"] else "")]
    lines.append(f"python {info['python']}, torch {info['torch']}"
                 f" (CUDA {info['torch_cuda'] or 'none'}), triton {info['triton']},"
                 f" numpy {info['numpy']}, diffusers {info['diffusers']}")
    lines.append(f"platform {info['platform']}, {info['cpu_threads']} CPU threads")
    if info["cuda_devices"]:
        for d in info["cuda_devices"]:
            lines.append(f"cuda:{d['index']} {d['name']} (sm_{d['capability'].replace('.', '')},"
                         f" {d['sms']} SMs, {d['memory_gib']} GiB)")
    else:
        lines.append("no CUDA device visible")
    n = info["native"]
    if n["built"]:
        cuda = (f"CUDA for sm_{n['cuda_archs']}, runtime {n['cuda_runtime']}, driver"
                f" {n['cuda_driver'] or 'none'}" if n["cuda"] else "CPU only (no nvcc at build)")
        lines.append(f"native module fastdiff._C: {cuda}; OpenMP {'yes' if n['openmp'] else 'no'};"
                     f" sources {n['source_hash']}")
    else:
        lines.append(f"native module fastdiff._C: unavailable: {n['reason']}")
    lines.append("backends:")
    for name, why in info["backends"].items():
        lines.append(f"  {name:<20}{'available' if not why else 'unavailable: ' + why}")
    attn = info["attention"]
    lines.append(f"attention dispatch (fp16 CUDA): {attn['rule']}")
    for shape, choice in attn["cuda_fp16"].items():
        lines.append(f"  {shape:<38}{choice}")
    return "\n".join(lines)
