"""The layers of DESIGN.md, from the source: the ops layer (with the kernels and the reference
below it) imports no schedule, and the schedules package imports no op, kernel or native code --
directly, inside a function, or through another module (the transitive closure of every
``import`` statement in the package, read with ast, so a lazy import counts too)."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "fastdiff"

BELOW_SCHEDULES = ("fastdiff.ops", "fastdiff.kernels", "fastdiff.reference")
SCHEDULES = ("fastdiff.schedules", "fastdiff.spacings", "fastdiff.betas")
OPS = ("fastdiff.ops", "fastdiff.kernels", "fastdiff._native", "fastdiff._C")


def module_names(root: pathlib.Path, package: str = "fastdiff") -> dict[str, pathlib.Path]:
    names = {}
    for path in root.rglob("*.py"):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def import_graph(root: pathlib.Path, package: str = "fastdiff") -> dict[str, set[str]]:
    """module -> the package's modules its source imports (at any depth of the file). Importing
    ``a.b.c`` runs ``a.b``'s ``__init__`` too, so that counts as an edge; the root package's own
    ``__init__`` does not (every module has it)."""
    names = module_names(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        is_package = path.name == "__init__.py"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package
                    anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                    base = ".".join([*anchor, *([base] if base else [])])
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
        edges = set()
        for target in found:
            parts = target.split(".")
            for k in range(2, len(parts) + 1):  # the module and the packages above it
                if ".".join(parts[:k]) in names:
                    edges.add(".".join(parts[:k]))
        graph[name] = edges - {name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module ``start`` imports transitively -> the module that imports it (for messages)."""
    seen, queue = {}, [start]
    while queue:  # breadth first, in sorted order: the same answer in every run
        here = queue.pop(0)
        for there in sorted(graph.get(here, ())):
            if there not in seen and there != start:
                seen[there] = here
                queue.append(there)
    return seen


def violations(graph, sources: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    def within(module, prefixes):
        return any(module == p or module.startswith(p + ".") for p in prefixes)

    bad = []
    for module in sorted(graph):
        if within(module, sources):
            for target, via in reachable(graph, module).items():
                if within(target, forbidden):
                    bad.append(f"{module} reaches {target} (imported by {via})")
    return bad


def test_the_ops_layer_imports_no_schedule():
    graph = import_graph(ROOT)
    assert any(m.startswith("fastdiff.schedules.") for m in graph), "no schedules package found"
    assert violations(graph, BELOW_SCHEDULES, SCHEDULES) == []


def test_the_schedules_import_no_op():
    graph = import_graph(ROOT)
    assert violations(graph, SCHEDULES, OPS) == []
    # and they do use the reference below them (the kernels' specification of the betas)
    assert "fastdiff.reference.schedule" in reachable(graph, "fastdiff.schedules.model")


def test_the_check_sees_a_planted_violation(tmp_path):
    """Negative control: a lazy import inside a function, a relative import and one through a
    third module are all found."""
    pkg = tmp_path / "fastdiff"
    for sub in ("ops", "schedules", "reference"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from fastdiff import ops\n")
    (pkg / "ops" / "schedule.py").write_text(
        "def f():\n    from fastdiff.reference import schedule\n    return schedule\n")
    (pkg / "reference" / "schedule.py").write_text("from ..schedules import model\n")
    (pkg / "schedules" / "model.py").write_text("import math\n")
    (pkg / "schedules" / "spacings.py").write_text("from .model import *\n")
    graph = import_graph(pkg)
    assert violations(graph, BELOW_SCHEDULES, SCHEDULES) == [
        "fastdiff.ops.schedule reaches fastdiff.schedules"
        " (imported by fastdiff.reference.schedule)",
        "fastdiff.ops.schedule reaches fastdiff.schedules.model"
        " (imported by fastdiff.reference.schedule)",
        "fastdiff.reference.schedule reaches fastdiff.schedules"
        " (imported by fastdiff.reference.schedule)",
        "fastdiff.reference.schedule reaches fastdiff.schedules.model"
        " (imported by fastdiff.reference.schedule)",
    ]
    assert violations(graph, SCHEDULES, OPS) == []
    (pkg / "schedules" / "model.py").write_text("from fastdiff.ops.schedule import f\n")
    assert "fastdiff.schedules.spacings reaches fastdiff.ops.schedule" in " ".join(
        violations(import_graph(pkg), SCHEDULES, OPS))
