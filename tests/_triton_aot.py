"""Ahead-of-time compile of every Triton kernel in fastdiff/kernels/ for a GPU target, without a
GPU, from the launches the launchers really make (shared by tests/test_triton_aot.py and the
report `python tests/_triton_aot.py [out.md]`).

1. Record: the public ops (and the Sampler, for every fixed-step solver and model variant) run
   with backend="triton" under the interpreter; every kernel launch's arguments are recorded
   (not executed: bf16 and SD-sized shapes cost nothing that way).
2. Specialise: each launch goes through the binder Triton's own JITFunction.run uses (ints equal
   to 1 become constants, multiples of 16 and 16-byte-aligned pointers get divisibility hints,
   Python floats are typed fp32), against a fresh non-interpreted copy of the kernel module.
   The autotuned attention launch is expanded to every config its pruning keeps for the target.
3. Compile each distinct specialisation with triton.compile(ASTSource(...), target=sm_90) (the
   ptxas that ships with Triton), and read registers / stack (spills) / shared memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("lincomb", "threshold", "group_norm", "attention", "schedule")
ARCH = 90
SMEM_LIMIT = 232448  # sm_90's opt-in shared memory per block (227 KB)
FULL = os.environ.get("FASTDIFF_AOT_FULL", "0") not in ("", "0")  # every combo in every dtype


@dataclasses.dataclass
class Launch:
    module: str  # fastdiff.kernels.<module>
    kernel: str
    args: tuple
    kwargs: dict
    label: str = ""


@contextlib.contextmanager
def record(launches: list[Launch], label: str = ""):
    """Records (instead of running) every interpreted Triton launch made inside."""
    from triton.runtime.interpreter import InterpretedFunction

    def run(self, *args, grid, warmup, **kwargs):
        module = self.fn.__module__.rsplit(".", 1)[-1]
        launches.append(Launch(module, self.fn.__name__, args, dict(kwargs), label))

    saved = InterpretedFunction.run
    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = saved


# --- what the launchers launch ----------------------------------------------------------------

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def lincomb_launches(out: list[Launch]) -> None:
    """Public-op launches: every dtype on the widest combination, and the ints that Triton
    specialises: equal to 1 (one element, row 1, counters 1), and multiples of 16."""
    from fastdiff.ops import lincomb

    for dtype in DTYPES:
        acc = _acc(dtype)
        edges = (((1,), 2, 1, (1, 1)), ((2, 256), 32, 16, (16, 32)))
        for shape, rows, row, counters in ((((3, 5), 4, 2, (2, 3)),) + (
                edges if dtype == torch.float32 or FULL else ())):
            xs = [torch.zeros(shape, dtype=dtype) for _ in range(6)]
            seeds = torch.arange(shape[0], dtype=torch.int64)
            clip = torch.ones(shape[0], 2, dtype=acc)
            coef = torch.zeros(rows, 4, 9, dtype=acc)
            with record(out, f"op {dtype} {shape}"):
                lincomb(xs, coef, row, noise=(seeds, counters), clip=clip, backend="triton")
                lincomb(xs[:1], coef[:, :1, :1].contiguous(), torch.tensor(row),
                        backend="triton")


def engine_launches(out: list[Launch], dtypes=(torch.float32, torch.float16)) -> None:
    """The Sampler's launches (lincomb, and threshold for dynamic thresholding) for every
    fixed-step solver under the model variants that change a stage's inputs."""
    from fastdiff.denoisers import CFGDenoiser, Denoiser, ThresholdedDenoiser
    from fastdiff.reference.solvers import SOLVERS
    from fastdiff.sampler import Sampler
    from fastdiff.spacings import get_sigmas_karras

    def gaussian(x, sigma, **cond):
        return x / (1 + sigma.view(-1, *[1] * (x.dim() - 1)) ** 2)

    def eps_network(x, t, cond=None):
        return x * 0.5

    variants = {
        "plain": (lambda: gaussian, {}),
        "guided eps": (lambda: CFGDenoiser(Denoiser(eps_network, "epsilon"), 2.5), {}),
        # drawn noise tensors are inputs: SA-Solver's stages grow past the kernel's 6 inputs
        # and are lowered as two launches (lowering.split's partial sums T)
        "guided eps drawn noise": (lambda: CFGDenoiser(Denoiser(eps_network, "epsilon"), 2.5),
                                   {"noise": "generator"}),
        "v + guidance": (lambda: Denoiser(eps_network, "v"), {"guidance": 3.0}),
        "dynamic threshold": (lambda: ThresholdedDenoiser(Denoiser(eps_network),
                                                          dynamic_ratio=0.9, max_value=3.0), {}),
        "static clip": (lambda: ThresholdedDenoiser(Denoiser(eps_network), dynamic_ratio=None,
                                                    clip=1.0), {}),
    }
    for name in SOLVERS:  # every entry (dpm_adaptive, data-dependent steps, has none)
        flow = SOLVERS[name].param == "flow"
        sigmas = (torch.linspace(1, 0, 5, dtype=torch.float64) if flow
                  else get_sigmas_karras(4, 0.03, 14.6))
        for variant, (make, options) in variants.items():
            if flow and variant != "plain":
                continue
            try:
                sampler = Sampler(make(), name, sigmas, backend="triton", **options)
            except (RuntimeError, ValueError):  # no plan for this combination
                continue
            call = {"seed": 0} if options.get("noise") != "generator" else {
                "generator": torch.Generator().manual_seed(0)}
            if options.get("guidance") or isinstance(sampler.adapter.guidance, float):
                call.update(cond=torch.zeros(2), uncond=torch.ones(2))
            for dtype in dtypes:
                with record(out, f"{name} {variant} {dtype}"):
                    sampler(torch.zeros(2, 4, 4, 4, dtype=dtype), **call)


def threshold_launches(out: list[Launch]) -> None:
    from fastdiff.ops import dynamic_threshold

    for dtype in DTYPES:
        acc = _acc(dtype)
        cases = [(3, 5, 2, 4, 2)]
        if dtype == torch.float32 or FULL:  # the ints Triton specialises: 1, multiples of 16
            cases += [(1, 1, 1, 2, 1), (2, 256, 6, 32, 16)]
        for batch, numel, nin, rows, row in cases:
            xs = [torch.zeros(batch, numel, dtype=dtype) for _ in range(nin)]
            coef = torch.zeros(rows, 2, nin + 1, dtype=acc)
            with record(out, f"op {dtype}"):
                dynamic_threshold(xs, coef, row, 0.9, 3.0, backend="triton")
                dynamic_threshold(xs, coef, torch.tensor(row), 0.995, 1.0, backend="triton")


# GroupNorm in Stable Diffusion 1.x/2.x/XL's UNet and VAE: (C, H=W) at 32 groups
SD_GROUP_NORM = ((320, 64), (640, 32), (1280, 16), (1280, 8), (128, 256), (512, 64))


def group_norm_launches(out: list[Launch]) -> None:
    from fastdiff.ops import group_norm

    options = (dict(), dict(affine=True), dict(affine=True, silu=True),
               dict(affine=True, scale=True, shift=True, silu=True))
    # every option in fp32, with ints equal to 1 and multiples of 16; all options at once in
    # the other dtypes; the SD shapes (their tiles) in fp16, SD's dtype
    shapes = [((3, 6, 5, 3), 3), ((1, 1, 1, 1), 1), ((2, 64, 8, 8), 32)]
    for dtype in DTYPES:
        for layout in ("nchw", "channels_last"):
            if dtype == torch.float32 or FULL:
                cases = [(s, g, o) for s, g in shapes for o in options]
            else:
                cases = [(shapes[0][0], shapes[0][1], options[3])]
            if dtype == torch.float16 or FULL:
                cases += [((2, c, hw, hw), 32, options[2]) for c, hw in SD_GROUP_NORM]
            for shape, groups, opt in cases:
                n, c = shape[:2]
                x = torch.zeros(shape, dtype=dtype)
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                w = torch.ones(c, dtype=dtype) if opt.get("affine") else None
                b = torch.zeros(c, dtype=dtype) if opt.get("affine") else None
                s = torch.zeros(n, c, dtype=dtype) if opt.get("scale") else None
                t = torch.zeros(n, c, dtype=dtype) if opt.get("shift") else None
                with record(out, f"{dtype} {layout} {shape}"):
                    group_norm(x, groups, w, b, 1e-6, scale=s, shift=t,
                               silu=bool(opt.get("silu")), backend="triton")


# Attention in Stable Diffusion's UNets: (heads, head dim, query length, key length)
SD_ATTENTION = ((8, 40, 4096, 4096), (8, 40, 4096, 77), (8, 80, 1024, 1024), (8, 80, 1024, 77),
                (8, 160, 256, 256), (8, 160, 64, 77), (10, 64, 4096, 4096), (20, 64, 1024, 77),
                (1, 512, 4096, 4096))


def attention_launches(out: list[Launch]) -> None:
    """Heads split from [B, S, H * D] projections by views, as fastdiff.nn passes them."""
    from fastdiff.ops import attention
    from fastdiff.ops.attention import TRITON_MAX_HEAD_DIM

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        shapes = SD_ATTENTION if dtype == torch.float16 or FULL else ()  # SD runs fp16
        for h, d, sq, skv in [*shapes, (1, 16, 1, 1), (3, 24, 33, 17)]:
            if d > TRITON_MAX_HEAD_DIM:
                continue
            q = torch.zeros(2, sq, h * d, dtype=dtype).view(2, sq, h, d).transpose(1, 2)
            kv = torch.zeros(2, skv, 2 * h * d, dtype=dtype).view(2, skv, 2, h, d)
            k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
            with torch.no_grad(), record(out, f"{dtype} h{h} d{d} {sq}x{skv}"):
                attention(q, k, v, backend="triton")


def schedule_launches(out: list[Launch]) -> None:
    from fastdiff.ops.schedule import schedule_tables

    for steps, train, grid in ((1, 1000, "discrete"), (16, 1000, "karras"), (50, 1000, "karras"),
                               (1, 2, "discrete"), (999, 1000, "exponential")):
        with record(out, f"{steps} of {train} {grid}"):
            schedule_tables(steps, num_train_timesteps=train, grid=grid, backend="triton")


def selected() -> tuple[str, ...]:
    """The kernel families to compile: FASTDIFF_AOT_ONLY (comma-separated), else all (a subset
    shows one guard fail quickly)."""
    only = os.environ.get("FASTDIFF_AOT_ONLY", "")
    return tuple(only.split(",")) if only else KERNELS


def all_launches() -> list[Launch]:
    families = selected()
    out: list[Launch] = []
    if "lincomb" in families:
        lincomb_launches(out)
    if "lincomb" in families or "threshold" in families:  # the engine launches both
        engine_launches(out, DTYPES if FULL else (torch.float32,))
    if "threshold" in families:
        threshold_launches(out)
    if "group_norm" in families:
        group_norm_launches(out)
    if "attention" in families:
        attention_launches(out)
    if "schedule" in families:
        schedule_launches(out)
    return [la for la in out if la.module in families]


# --- specialise and compile -----------------------------------------------------------------

@dataclasses.dataclass
class Spec:
    kernel: str
    jit: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: object
    label: str
    key: str
    fp_fusion: bool
    nnoise: int = 0
    constexprs_by_name: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Result:
    spec: Spec
    error: str = ""
    regs: int = -1
    stack: int = -1
    spills: int = -1
    shared: int = -1
    ptx: str = ""

    def fma(self, kind: str) -> int:
        return self.ptx.count(f"fma.rn.{kind}")


def compiled_modules() -> dict:
    """The kernel modules, imported in the compile process (TRITON_INTERPRET off, so their
    @triton.jit builds JITFunctions)."""
    assert not _interpreting(), "compile in a process without TRITON_INTERPRET (see compile_all)"
    return {name: importlib.import_module(f"fastdiff.kernels.{name}") for name in KERNELS}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _target():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", ARCH, 32)
    return target, make_backend(target)


def _expand_autotuned(launch: Launch, module) -> list[tuple[dict, str]]:
    """(kwargs, config label) per config the launcher's autotuner would try on the target."""
    tuned = getattr(module, launch.kernel.replace("_kernel", "_tuned"), None)
    if tuned is None:
        return [(launch.kwargs, "")]
    fn = tuned.fn
    nargs = dict(zip(fn.arg_names, launch.args))
    meta = {k: v for k, v in launch.kwargs.items() if k not in ("BLOCK_M", "BLOCK_N")}
    kept = module.keep_configs(tuned.configs, nargs, meta, SMEM_LIMIT)
    return [({**meta, **c.all_kwargs()},
             " ".join(f"{k}={v}" for k, v in c.all_kwargs().items() if v is not None))
            for c in kept]


def specialise(launches: list[Launch]) -> list[Spec]:
    """The distinct specialisations the launches compile to, as JITFunction.run derives them."""
    from triton.runtime.jit import create_function_from_signature

    modules = compiled_modules()
    _, backend = _target()
    binders, specs = {}, {}
    for launch in launches:
        module = modules[launch.module]
        jit = getattr(module, launch.kernel)
        if jit not in binders:
            binders[jit] = create_function_from_signature(jit.signature, jit.params, backend)
        for kwargs, config in _expand_autotuned(launch, module):
            kwargs = {"debug": False, **kwargs}
            bound, spec, options = binders[jit](*launch.args, **kwargs)
            options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, spec,
                                                                   options)
            key = f"{launch.kernel} {spec} {options}"
            if key in specs:
                continue
            consts = {jit.arg_names[p[0]]: v for p, v in constexprs.items()}
            data = next(t for t in signature.values() if t.startswith("*"))[1:]
            label = data + " " + ", ".join(f"{k}={v}" for k, v in consts.items()) + (
                f"; {config}" if config else f"; num_warps={options.num_warps}")
            specs[key] = Spec(launch.kernel, jit, signature, constexprs, attrs, options, label,
                              key, options.enable_fp_fusion, int(consts.get("NNOISE", 0)),
                              consts)
    return list(specs.values())


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack-frame bytes) of the cubin's kernel, from cuobjdump
    --dump-resource-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return int(m.group(1)), int(m.group(2))


def spill_bytes(ptx: str, fp_fusion: bool) -> int:
    """Spill-store bytes from ptxas -v on the kernel's PTX, with Triton's own ptxas flags (a
    stack frame alone is not a spill: libdevice's trig reduction keeps a local array)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(ARCH).path, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]),
               "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(ARCH)}",
               str(src), "-o", str(Path(tmp) / "k.o")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    return int(re.search(r"(\d+) bytes spill stores", log).group(1))


def compile_spec(spec: Spec) -> Result:
    import triton
    from triton.compiler import ASTSource

    target, _ = _target()
    try:
        kernel = triton.compile(ASTSource(spec.jit, spec.signature, spec.constexprs, spec.attrs),
                                target=target, options=spec.options.__dict__)
    except Exception as e:  # noqa: BLE001 - reported per specialisation
        return Result(spec, error=f"{type(e).__name__}: {str(e).strip()[:600]}")
    regs, stack = resources(kernel.asm["cubin"])
    spills = spill_bytes(kernel.asm["ptx"], spec.fp_fusion) if stack else 0
    return Result(spec, regs=regs, stack=stack, spills=spills, shared=kernel.metadata.shared,
                  ptx=kernel.asm["ptx"])


NOISE_SRC = """
import triton
import triton.language as tl
from fastdiff.kernels.lincomb import philox_normal


@triton.jit
def one_normal(OUT, seed, counter, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK).to(tl.int64)
    tl.store(OUT + offs, philox_normal(seed, counter, offs).to(tl.float32))
"""


@functools.cache
def noise_fma_count(block: int = 2048, num_warps: int = 8) -> int:
    """fma.rn.f64 in the PTX of one in-kernel normal draw (Philox + Box-Muller) per element of a
    BLOCK on num_warps, compiled without FP fusion: libdevice's log and cos use FMAs by design
    (inlined per element); the step's own math must add none."""
    import triton
    from triton.compiler import ASTSource

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "_fastdiff_aot_noise.py"
        path.write_text(NOISE_SRC)
        spec = importlib.util.spec_from_file_location("_fastdiff_aot_noise", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        target, _ = _target()
        kernel = triton.compile(
            ASTSource(module.one_normal, {"OUT": "*fp32", "seed": "i64", "counter": "i32"},
                      {"BLOCK": block}),
            target=target, options=dict(num_warps=num_warps, enable_fp_fusion=False))
    return kernel.asm["ptx"].count("fma.rn.f64")


def _portable(value):
    """A recorded argument as the compile process rebuilds it: tensors by dtype and 16-byte
    alignment (all the binder reads of a pointer), everything else as is."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, value.data_ptr() % 16 == 0)
    return value


def _rebuilt(value):
    if isinstance(value, tuple) and len(value) == 3 and value[0] == "tensor":
        t = torch.empty(32, dtype=value[1])
        return t if value[2] else t[1:]
    return value


def compile_recorded(launches: list[Launch]) -> dict:
    """Compiles the launches in a fresh process with TRITON_INTERPRET off (a process that ran
    the interpreter keeps state that breaks real compiles); returns {"results": [dict per
    specialisation], "noise_fma": int}."""
    portable = [(la.module, la.kernel, tuple(_portable(a) for a in la.args), la.kwargs,
                 la.label) for la in launches]
    workers = max(1, min(4, os.cpu_count() or 1))  # ptxas and LLVM are CPU-bound: shard
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "launches.pkl"
        src.write_bytes(pickle.dumps(portable))
        env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join(
            [str(ROOT), os.environ.get("PYTHONPATH", "")])}
        shards = [subprocess.Popen([sys.executable, __file__, "--compile", str(src),
                                    str(Path(tmp) / f"{k}.pkl"), str(k), str(workers)],
                                   env=env, cwd=ROOT) for k in range(workers)]
        if any(p.wait() for p in shards):
            raise RuntimeError("a compile shard failed (see its output above)")
        parts = [pickle.loads((Path(tmp) / f"{k}.pkl").read_bytes()) for k in range(workers)]
    return dict(results=[r for p in parts for r in p["results"]], noise_fma=parts[0]["noise_fma"])


def _compile_process(src: Path, dst: Path, shard: int, shards: int) -> None:
    launches = [Launch(module, kernel, tuple(_rebuilt(a) for a in args), kwargs, label)
                for module, kernel, args, kwargs, label in pickle.loads(src.read_bytes())]
    results = []
    verbose = os.environ.get("FASTDIFF_AOT_VERBOSE")
    for spec in specialise(launches)[shard::shards]:
        start = time.perf_counter()
        r = compile_spec(spec)
        if verbose:
            print(f"{time.perf_counter() - start:6.2f} s {spec.kernel} [{spec.label}]"
                  f" {r.error[:200] or (r.regs, r.stack, r.spills, r.shared)}",
                  file=sys.stderr, flush=True)
        results.append(dict(
            kernel=spec.kernel, label=spec.label, error=r.error, regs=r.regs, stack=r.stack,
            spills=r.spills,
            shared=r.shared, fma_f32=r.fma("f32"), fma_f64=r.fma("f64"),
            fp_fusion=spec.fp_fusion, nnoise=spec.nnoise, signature=dict(spec.signature),
            draw_fma=noise_fma_count(spec.constexprs_by_name.get("BLOCK", 2048),
                                     spec.options.num_warps) if spec.nnoise else 0))
    noise_fma = noise_fma_count() if shard == 0 else -1
    dst.write_bytes(pickle.dumps(dict(results=results, noise_fma=noise_fma)))


def table(results: list[dict]) -> str:
    import triton

    lines = [f"# Triton kernels compiled ahead of time for sm_{ARCH}", "",
             f"triton {triton.__version__}, target cuda:{ARCH}, shared-memory limit "
             f"{SMEM_LIMIT} bytes; every specialisation the launchers produce for the recorded"
             " launches (tests/_triton_aot.py). Written by `python tests/_triton_aot.py`;"
             " tests/test_triton_aot.py compiles the same set. Registers and stack frame from"
             " cuobjdump, spill stores from ptxas -v (a 40-byte frame without spills is"
             " libdevice's cos reduction array).", "",
             "| kernel | specialisation | registers | stack bytes | spill-store bytes |"
             " shared bytes |",
             "|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["kernel"], r["label"])):
        if r["error"]:
            lines.append(f"| {r['kernel']} | {r['label']} | compile error | | | |")
        else:
            lines.append(f"| {r['kernel']} | {r['label']} | {r['regs']} | {r['stack']} |"
                         f" {r['spills']} | {r['shared']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--compile"]:
        _compile_process(Path(argv[1]), Path(argv[2]), int(argv[3]), int(argv[4]))
        return 0
    out = Path(argv[0]) if argv else ROOT / "benchmarks" / "results" / f"triton-aot-sm{ARCH}.md"
    results = compile_recorded(all_launches())["results"]
    out.write_text(table(results))
    errors = [r for r in results if r["error"]]
    print(f"{len(results)} specialisations, {len(errors)} compile errors -> {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["--compile"]:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # record under the interpreter
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
