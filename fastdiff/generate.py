"""`fastdiff generate`: many samples from the embedded digits model, resumable, on 1..N processes.

    fastdiff generate --model digits --num-samples 10000 --out samples/ --seed 0
    torchrun --nproc_per_node 8 -m fastdiff.generate --model digits --num-samples 10000 --out s/

Determinism: sample k (0 <= k < N) has seed S + k and label k % 10. Its initial noise is drawn
from a CPU `torch.Generator` seeded S + k (float64, as `sample_digits`), and the solver's noise
(stochastic solvers) is the engine's in-kernel Philox noise keyed by the per-sample seed S + k
(`fastdiff.Sampler(..., noise="philox")`). So a sample does not depend on the batch it is in, on
the batch size or on the number of processes: every run with the same settings writes the same
bytes. Work is split in units (one PNG per sample, or one .npz shard of `--shard-size` samples);
rank r of W takes the units r, r + W, r + 2W, ...

Crash safety: every file is written to a temporary name in DIR and `os.replace`d, so a sample
file is either complete or absent. Each rank records what it finished in DIR/.partial-rank<r>.json
(also replaced atomically, after every batch); at the end rank 0 merges those, after a barrier,
into DIR/manifest.json (settings, their hash, versions, seeds, sha256 of every file). A rerun with
the same settings skips the files whose sha256 matches a record, regenerates the rest; a DIR
holding samples made with other settings is an error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import zipfile
from pathlib import Path

import torch

__all__ = ["add_generate_parser", "build_parser", "generate", "main", "SettingsMismatchError"]

MANIFEST = "manifest.json"
# Rows per network call: every call gets exactly this many (the last chunk padded), because CPU
# and GPU GEMMs pick kernels by the row count and their results differ in the last bits; with a
# fixed count each sample's output depends on its own input only, whatever the batch size.
MODEL_BATCH = 16
PARTIAL = ".partial-rank{}.json"
FORMAT_VERSION = 1


class SettingsMismatchError(RuntimeError):
    """DIR already holds samples generated with different settings."""


# -- small pure helpers ------------------------------------------------------------------------

def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def sha256_file(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file next to `path`, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def units(config: dict) -> list[tuple[str, list[int]]]:
    """The work units: (file name, sample indices), in order."""
    n = config["num_samples"]
    if config["format"] == "png":
        width = max(6, len(str(n - 1)))
        return [(f"{k:0{width}d}.png", [k]) for k in range(n)]
    size = config["shard_size"]
    count = -(-n // size)
    width = max(5, len(str(count - 1)))
    return [(f"shard-{j:0{width}d}.npz", list(range(j * size, min(n, (j + 1) * size))))
            for j in range(count)]


def encode_png(image) -> bytes:
    """uint8 [H, W] -> PNG bytes (Pillow writes no timestamp: same image, same bytes)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def encode_npz(images, labels, seeds) -> bytes:
    """An .npz (np.load reads it) with fixed zip timestamps, so the bytes are reproducible
    (np.savez stamps the current time)."""
    import io

    import numpy as np

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in (("images", images), ("labels", labels), ("seeds", seeds)):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _versions() -> dict:
    import numpy
    import PIL
    import torch

    import fastdiff

    return {"fastdiff": fastdiff.__version__, "torch": torch.__version__,
            "numpy": numpy.__version__, "pillow": PIL.__version__,
            "python": sys.version.split()[0]}


# -- distributed -------------------------------------------------------------------------------

class _Dist:
    """torch.distributed when WORLD_SIZE > 1 (NCCL on GPUs, gloo on CPU), else a no-op."""

    def __init__(self, device_type: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owned = False
        if self.world > 1:
            import torch
            import torch.distributed as dist

            if not dist.is_initialized():
                backend = "nccl" if device_type == "cuda" else "gloo"
                if device_type == "cuda":
                    torch.cuda.set_device(self.local_rank)
                dist.init_process_group(backend)
                self.owned = True

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True when `ok` on every rank (so that a failure on one rank stops all of them)."""
        if self.world == 1:
            return ok
        import torch
        import torch.distributed as dist

        dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([0 if ok else 1], device=dev)
        dist.all_reduce(t)
        return int(t.item()) == 0

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


# -- records of finished files -----------------------------------------------------------------

def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent, or (never for our own atomic writes) unreadable


def load_records(out: Path, config: dict) -> dict[str, str]:
    """file name -> sha256 from manifest.json and every rank's partial record; raises
    SettingsMismatchError when one of them was made with other settings, or when sample files
    lie in `out` without any record (not made by this command: never overwritten)."""
    want = config_hash(config)
    records: dict[str, str] = {}
    sources = [out / MANIFEST, *sorted(out.glob(PARTIAL.format("*")))]
    if not any(p.exists() for p in sources):
        names = {name for name, _ in units(config)}
        foreign = sorted(p.name for p in out.glob("*") if p.name in names)
        if foreign:
            raise SettingsMismatchError(
                f"{out} holds {len(foreign)} sample files (e.g. {foreign[0]}) but no manifest:"
                " they were not made by `fastdiff generate`; use another --out directory")
    for path in sources:
        data = _read_json(path)
        if data is None:
            if path.exists():
                raise SettingsMismatchError(f"{path} is not a fastdiff manifest: --out must be a"
                                            " new directory or one made by `fastdiff generate`")
            continue
        if data.get("config_hash") != want:
            old = data.get("config", {})
            diff = sorted(k for k in {*old, *config} if old.get(k) != config.get(k))
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff)
            raise SettingsMismatchError(
                f"{out} holds samples generated with different settings ({changes or 'config'}"
                f" differs; {path.name} has config hash {str(data.get('config_hash'))[:12]}, this"
                f" run {want[:12]}): use another --out directory, or delete {out} to start over")
        for name, rec in data.get("files", {}).items():
            records[name] = rec["sha256"]
    return records


# -- generation --------------------------------------------------------------------------------

class FixedBatch(torch.nn.Module):
    """network(x, t, **cond) evaluated in chunks of exactly `rows` samples (the last padded with
    copies of the final row), so the result of a row is independent of the batch it came in."""

    def __init__(self, network, rows: int):
        super().__init__()
        self.inner, self.rows = network, rows

    def forward(self, x, t, **cond):
        import torch

        n = x.shape[0]
        pad = -n % self.rows

        def padded(v):
            if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != n or not pad:
                return v
            return torch.cat([v, v[-1:].expand(pad, *v.shape[1:])])

        x, t = padded(x), padded(t)
        cond = {k: padded(v) for k, v in cond.items()}
        outs = [self.inner(x[i: i + self.rows], t[i: i + self.rows],
                           **{k: v[i: i + self.rows] if isinstance(v, torch.Tensor) and v.dim()
                              and v.shape[0] == n + pad else v for k, v in cond.items()})
                for i in range(0, n + pad, self.rows)]
        return torch.cat(outs)[:n]


def _make_engine(config: dict, device):
    import torch

    from fastdiff.models.digits import digits_sigmas, guided, load_digits_model
    from fastdiff.sampler import Sampler

    model = load_digits_model(device=device, dtype=getattr(torch, config["dtype"]))
    model.network = FixedBatch(model.network, config["model_batch"])
    sigmas = digits_sigmas(model, config["steps"], config["spacing"]).to(device)
    g = config["guidance"]
    denoiser = model if g == 1.0 else guided(model, g)
    engine = Sampler(denoiser, config["solver"], sigmas, backend=config["backend"],
                     noise="philox")
    return engine, sigmas


def _sample(engine, sigmas, ks: list[int], config: dict, device):
    """uint8 images [len(ks), 8, 8] of samples ks (each independent of the others)."""
    import torch

    from fastdiff.models.digits import IMAGE_SIZE, NULL_LABEL, NUM_CLASSES, to_uint8

    seed = config["seed"]
    dtype = getattr(torch, config["dtype"])
    noise = torch.cat([torch.randn(1, 1, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float64,
                                   generator=torch.Generator().manual_seed(seed + k))
                       for k in ks])
    x = (noise * sigmas[0].cpu()).to(device=device, dtype=dtype)
    labels = torch.tensor([k % NUM_CLASSES for k in ks], dtype=torch.long, device=device)
    seeds = torch.tensor([seed + k for k in ks], dtype=torch.int64, device=device)
    cond = {"cond": labels}
    if config["guidance"] != 1.0:
        cond["uncond"] = torch.full_like(labels, NULL_LABEL)
    with torch.no_grad():
        out = engine(x, seeds=seeds, **cond)
    return to_uint8(out.clamp(-1, 1))


def _write_unit(path: Path, images: list, ks: list[int], config: dict) -> dict:
    """Writes one file atomically; returns its record."""
    import numpy as np

    seed = config["seed"]
    if config["format"] == "png":
        data = encode_png(images[0])
    else:
        data = encode_npz(np.stack(images), np.asarray([k % 10 for k in ks], dtype=np.int64),
                          np.asarray([seed + k for k in ks], dtype=np.int64))
    atomic_write(path, data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "samples": [ks[0], ks[-1] + 1],
            "seeds": [seed + ks[0], seed + ks[-1] + 1]}


def _validate_args(args) -> None:
    from fastdiff.reference.solvers import SOLVERS

    if args.model != "digits":
        raise ValueError(f"--model must be 'digits', got {args.model!r}")
    for name in ("num_samples", "batch_size", "steps", "shard_size"):
        v = getattr(args, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {v!r}")
    if args.solver not in SOLVERS or SOLVERS[args.solver].param != "ve":
        ve = sorted(k for k, v in SOLVERS.items() if v.param == "ve")
        raise ValueError(f"--solver must be one of {ve}, got {args.solver!r}")
    if not math.isfinite(args.guidance):
        raise ValueError(f"--guidance must be a finite number, got {args.guidance!r}")
    if args.format not in ("png", "npz"):
        raise ValueError(f"--format must be 'png' or 'npz', got {args.format!r}")
    if not isinstance(args.seed, int) or not 0 <= args.seed < 2**62:
        raise ValueError(f"--seed must be an int in [0, 2**62), got {args.seed!r}")


def _config(args, device) -> dict:
    """The settings that determine the output bytes (not batch size or process count)."""
    return {"model": args.model, "num_samples": args.num_samples, "seed": args.seed,
            "solver": args.solver, "steps": args.steps, "guidance": float(args.guidance),
            "spacing": args.spacing, "format": args.format,
            "shard_size": args.shard_size if args.format == "npz" else None,
            "dtype": args.dtype, "backend": args.backend, "device": device.type,
            "model_batch": MODEL_BATCH, "labels": "k % 10", "sample_seed": "seed + k"}


def generate(args: argparse.Namespace) -> dict:
    """Runs `fastdiff generate` (on this rank); returns the manifest on rank 0, else {}."""
    import numpy as np
    import torch

    _validate_args(args)
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist = _Dist(device.type)
    if device.type == "cuda" and dist.world > 1 and device.index is None:
        device = torch.device("cuda", dist.local_rank)
    try:
        out = Path(args.out)
        config = _config(args, device)
        chash = config_hash(config)
        if dist.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        error = None
        try:
            records = load_records(out, config)
        except SettingsMismatchError as e:
            error = e
        if not dist.all_ok(error is None):
            raise error or SettingsMismatchError(f"{out}: another rank found a settings mismatch")
        dist.barrier()  # every rank has read the old records before any rank rewrites its own

        all_units = units(config)
        mine = all_units[dist.rank::dist.world]
        done: dict[str, dict] = {}
        todo = []
        for name, ks in mine:
            sha = records.get(name)
            if sha is not None and sha256_file(out / name) == sha:
                done[name] = {"sha256": sha, "samples": [ks[0], ks[-1] + 1],
                              "seeds": [args.seed + ks[0], args.seed + ks[-1] + 1]}
            else:
                todo.append((name, ks))
        partial = out / PARTIAL.format(dist.rank)

        def save_partial() -> None:
            atomic_write(partial, json.dumps({"config_hash": chash, "config": config,
                                              "files": done}, indent=1).encode())

        save_partial()
        from tqdm.auto import tqdm

        total = sum(len(ks) for _, ks in mine)
        bar = tqdm(total=total, initial=total - sum(len(ks) for _, ks in todo), unit="sample",
                   desc=f"generate (rank 0 of {dist.world})",
                   disable=dist.rank != 0 or args.quiet or None)
        if todo:
            engine, sigmas = _make_engine(config, device)
        pending = [k for _, ks in todo for k in ks]
        ready: dict[int, np.ndarray] = {}
        queue = list(todo)
        for i in range(0, len(pending), args.batch_size):
            ks = pending[i: i + args.batch_size]
            ready.update(zip(ks, _sample(engine, sigmas, ks, config, device)))
            while queue and all(k in ready for k in queue[0][1]):
                name, uks = queue.pop(0)
                done[name] = _write_unit(out / name, [ready.pop(k) for k in uks], uks, config)
                bar.update(len(uks))
            # once per batch (a file written but not yet recorded is regenerated on resume,
            # with the same bytes)
            save_partial()
        bar.close()
        dist.barrier()
        if dist.rank != 0:
            return {}
        return _finish(out, config, chash, all_units, dist.world)
    finally:
        dist.close()


def _finish(out: Path, config: dict, chash: str, all_units, world: int) -> dict:
    """Rank 0, after the barrier: merge the partial records into manifest.json."""
    merged: dict[str, dict] = {}
    partials = sorted(out.glob(PARTIAL.format("*")))
    for path in partials:
        data = _read_json(path) or {}
        if data.get("config_hash") == chash:
            merged.update(data.get("files", {}))
    missing = [name for name, _ in all_units if name not in merged]
    if missing:
        raise RuntimeError(f"{len(missing)} files were not generated (first: {missing[0]})")
    files = {name: merged[name] for name, _ in all_units}
    manifest = {"format_version": FORMAT_VERSION, "config": config, "config_hash": chash,
                "versions": _versions(),
                "seeds": {"first": config["seed"], "count": config["num_samples"],
                          "rule": "sample k: seed + k (initial noise: CPU torch.Generator; "
                                  "solver noise: Philox), label k % 10"},
                "last_run": {"world_size": world},
                "files": files}
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    for path in partials:
        path.unlink(missing_ok=True)
    for path in out.glob(".*.tmp-*"):  # left by a killed run
        path.unlink(missing_ok=True)
    return manifest


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `generate` to the `fastdiff` CLI (fastdiff/cli.py)."""
    p = subparsers.add_parser("generate", help="many samples to a directory (resumable, "
                              "torchrun-able)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=_cmd_generate)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="digits", choices=["digits"])
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="sample k gets seed S + k (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per model batch "
                   "(does not change the output)")
    p.add_argument("--solver", default="dpmpp_2m", help="a VE solver (default dpmpp_2m)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--spacing", default="karras", choices=["karras", "exponential"])
    p.add_argument("--format", default="png", choices=["png", "npz"],
                   help="one PNG per sample, or .npz shards (images uint8, labels, seeds)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per .npz shard")
    p.add_argument("--backend", default="auto", help="kernel backend of the fused engine")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32",
                                                          "float64"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The stand-alone parser (`python -m fastdiff.generate`, torchrun)."""
    parser = argparse.ArgumentParser(prog="fastdiff generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return parser


def _cmd_generate(args: argparse.Namespace) -> int:
    """Runs generate(); bad settings are a one-line error and exit status 2."""
    try:
        generate(args)
    except (SettingsMismatchError, ValueError) as e:
        print(f"fastdiff generate: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return _cmd_generate(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
