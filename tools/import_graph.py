"""Prints the import graph between the project's parts, from the source (ast, nothing imported).

Parts, lowest layer first: ``math`` (sdpo/reference.py, settings.py, timesteps.py, chunking.py: the plain-PyTorch
statement of the objectives), ``kernels`` (the Triton kernels, which read the method codes from
the math), ``api`` (sdpo/__init__.py, objectives.py, ops.py, cuda_backend.py: the public
``preference_loss`` and the op layer that dispatches to the kernels), ``train``, then ``profiling``,
``demo`` and ``eval``, and ``pairs`` (which samples with demo's and eval's code). ``math`` and ``api`` together are the core in sdpo/. Every import counts, also one inside a function (a lazy
import is still a dependency). ``python tools/import_graph.py`` prints one ``part -> part`` line
per edge with the modules that make it; ``--check`` exits 1 when the parts form a cycle.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("math", "kernels", "api", "train", "profiling", "demo", "eval", "pairs")
SUBPACKAGE_PARTS = ("kernels", "train", "profiling", "demo", "eval", "pairs")
MATH_MODULES = ("sdpo.reference", "sdpo.settings", "sdpo.timesteps", "sdpo.chunking")


def part_of(module: str) -> str | None:
    """The part a module ``sdpo...`` belongs to; None for a module outside the project."""
    names = module.split(".")
    if names[0] != "sdpo":
        return None
    if len(names) > 1 and names[1] in SUBPACKAGE_PARTS:
        return names[1]
    return "math" if ".".join(names[:2]) in MATH_MODULES else "api"


def project_modules(root: Path = ROOT) -> Iterator[tuple[str, Path]]:
    """(module name, file) for every module under sdpo/, following the sdpo/train etc. links."""
    package = root / "sdpo"
    for folder, _, names in os.walk(package, followlinks=True):
        for name in sorted(names):
            if not name.endswith(".py"):
                continue
            parts = Path(folder, name).relative_to(package).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(("sdpo", *parts)), Path(folder, name)


def imported_modules(module: str, path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from sdpo import reference` names a module; `from x import name` the package x.
            for alias in node.names:
                yield f"{base}.{alias.name}" if base == "sdpo" else base


def part_edges(root: Path = ROOT) -> dict[tuple[str, str], set[str]]:
    """(importing part, imported part) -> the importing modules, for edges between parts."""
    edges: dict[tuple[str, str], set[str]] = {}
    for module, path in project_modules(root):
        source = part_of(module)
        for imported in imported_modules(module, path):
            target = part_of(imported)
            if target is not None and target != source:
                edges.setdefault((source, target), set()).add(f"{module} -> {imported}")
    return edges


def find_cycle(edges: dict[tuple[str, str], set[str]]) -> list[str] | None:
    """One cycle of parts (first part repeated at the end), or None."""
    graph: dict[str, list[str]] = {}
    for source, target in edges:
        graph.setdefault(source, []).append(target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(part: str) -> list[str] | None:
        state[part] = 1
        path.append(part)
        for target in graph.get(part, []):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[part] = 2
        path.pop()
        return None

    for part in sorted(graph):
        if part not in state and (cycle := visit(part)):
            return cycle
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on a cycle between parts")
    parser.add_argument("--verbose", action="store_true", help="list the imports of each edge")
    parser.add_argument("--root", type=Path, default=ROOT, help="a checkout (default: this one)")
    args = parser.parse_args(argv)
    edges = part_edges(args.root)
    for (source, target), imports in sorted(edges.items()):
        print(f"{source} -> {target}")
        if args.verbose:
            for line in sorted(imports):
                print(f"    {line}")
    cycle = find_cycle(edges)
    if cycle:
        print("cycle: " + " -> ".join(cycle), file=sys.stderr)
    return 1 if cycle and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
