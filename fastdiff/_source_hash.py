"""Hash of the native sources, shared by setup.py (compiled into _C) and the loader (compared at
run time), so a _C built from older sources is detected as stale. Standard library only."""

from __future__ import annotations

import hashlib
from pathlib import Path

SUFFIXES = {".h", ".cpp", ".cu", ".cuh"}


def source_hash(csrc: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(csrc.rglob("*")):
        if path.is_file() and path.suffix in SUFFIXES:
            h.update(path.relative_to(csrc).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]
