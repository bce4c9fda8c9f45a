"""ptxas resource reports of fastdiff._C's CUDA kernels (issue 13, section 2): registers, stack,
spills and shared memory per kernel and architecture, parsed from `ptxas -v` output (the build
passes -Xptxas=-v and keeps the log per object). Shared by setup.py (which writes the table next
to the module), scripts/ptxas_report.py and tests/test_ptxas.py. Standard library only.
"""

from __future__ import annotations

import re
import shutil
import subprocess

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(.*)")
_SMEM = re.compile(r"(\d+) bytes smem")
COLUMNS = ("arch", "registers", "stack", "spill_stores", "spill_loads", "smem", "kernel")


def parse(log: str) -> list[dict]:
    """One row per (kernel, arch) compiled in a `ptxas -v` log."""
    rows: list[dict] = []
    current: dict | None = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = {"mangled": m.group(1), "arch": m.group(2), "registers": 0, "stack": 0,
                       "spill_stores": 0, "spill_loads": 0, "smem": 0}
            rows.append(current)
        elif current is not None and (m := _FRAME.search(line)):
            current["stack"], current["spill_stores"], current["spill_loads"] = map(
                int, m.groups())
        elif current is not None and (m := _USED.search(line)):
            current["registers"] = int(m.group(1))
            if s := _SMEM.search(m.group(2)):
                current["smem"] = int(s.group(1))
    names = demangle([r["mangled"] for r in rows])
    for r, name in zip(rows, names):
        r["kernel"] = name
    return rows


def demangle(names: list[str]) -> list[str]:
    """C++ names via c++filt when it exists (else the mangled names)."""
    tool = shutil.which("c++filt")
    if not names or tool is None:
        return list(names)
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    lines = out.splitlines()
    return lines if len(lines) == len(names) else list(names)


def table(rows: list[dict], header: str = "") -> str:
    """Tab-separated table, one kernel per line (read back by `read`)."""
    lines = [f"# {h}" for h in header.splitlines()] + ["\t".join(COLUMNS)]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["arch"])):
        lines.append("\t".join(str(r[c]) for c in COLUMNS))
    return "\n".join(lines) + "\n"


def read(text: str) -> list[dict]:
    rows = []
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    for ln in lines[1:]:
        values = ln.split("\t", len(COLUMNS) - 1)
        row = dict(zip(COLUMNS, values))
        for c in COLUMNS[1:-1]:
            row[c] = int(row[c])
        rows.append(row)
    return rows
