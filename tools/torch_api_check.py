"""Checks, from the source, that every torch API the project names exists in the installed torch,
with the keyword arguments the project passes to it.

Why: the GPU check (sdpo/profiling/gpu_check.py) runs on an image whose torch (2.11) is older than the
one CI runs (2.13), and its GPU-only paths (CUDA graphs, the CUDA twin, fp16 loss scaling,
cudagraph_mark_step_begin, cudaProfilerStart) never execute on a CPU. A missing name there would
cost the rare GPU slot; this static check finds it on any machine that can install that torch
(tests/torch_floor.sh runs it under torch 2.11).

    python tools/torch_api_check.py [PATH ...]   # default: sdpo/ kernels/ train/ profiling/ tests/

What is checked: every attribute chain rooted at torch (also through ``import torch.distributed
as dist`` and ``from torch.nn.attention import sdpa_kernel``) resolves by import and getattr;
every call of a resolved callable passes only keyword names its signature takes (unless it takes
``**kwargs``); the instance methods in INSTANCE_METHODS (beyond a static check's reach: called on
a tensor, a module, a scaler) exist on their classes. Exit 1 with one line per problem.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PATHS = ("sdpo", "profiling", "tests", "tools")

# Methods the project calls on instances (a static check cannot see the receiver's type), each
# on the class that defines it, with where the project calls it.
INSTANCE_METHODS: dict[str, tuple[str, ...]] = {
    # sdpo/train/step.py PersistentGradients (CUDA graphs with gradient accumulation)
    "torch.Tensor": ("register_post_accumulate_grad_hook",),
    # sdpo/train/trainer.py, FSDP2 runs: no gradient all-reduce before the last micro-batch
    "torch.distributed.fsdp.FSDPModule": ("set_requires_gradient_sync",),
    # sdpo/train/trainer.py, fp16 loss scaling
    "torch.amp.GradScaler": (
        "scale",
        "unscale_",
        "update",
        "get_scale",
        "state_dict",
        "load_state_dict",
    ),
    # sdpo/ops.py, sdpo/cuda_backend.py: the custom ops' fake and autograd implementations
    "torch.library.CustomOpDef": ("register_fake", "register_autograd"),
    # sdpo/profiling/gpu_check.py, sdpo/profiling/kernel_bench.py: graph replay and event timing
    "torch.cuda.CUDAGraph": ("replay",),
    "torch.cuda.Event": ("record", "elapsed_time", "synchronize"),
    "torch.cuda.Stream": ("wait_stream",),
}


def python_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Each .py file once (sdpo/kernels, sdpo/train, sdpo/profiling are links to the top-level
    folders), resolved."""
    seen: set[Path] = set()
    for path in paths:
        files = [path] if path.is_file() else sorted(path.rglob("*.py"))
        for file in files:
            file = file.resolve()
            if file.suffix == ".py" and "__pycache__" not in file.parts and file not in seen:
                seen.add(file)
                yield file


def torch_aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the torch path it stands for, from every import in the file (a lazy import
    inside a function included)."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for name in node.names:
                if name.name.split(".")[0] != "torch":
                    continue
                if name.asname:
                    aliases[name.asname] = name.name
                else:  # `import torch.x.y` binds `torch`
                    aliases["torch"] = "torch"
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "torch":
                continue
            for name in node.names:
                aliases[name.asname or name.name] = f"{node.module}.{name.name}"
    return aliases


def dotted(node: ast.AST) -> list[str] | None:
    """``a.b.c`` as ["a", "b", "c"]; None when the chain does not start at a plain name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


class Resolver:
    """Resolves torch paths by import + getattr, remembering each answer."""

    def __init__(self) -> None:
        self.cache: dict[str, tuple[object | None, str | None]] = {}

    def resolve(self, path: str) -> tuple[object | None, str | None]:
        """(object, None), or (None, why it does not resolve). A module that needs a package
        this machine lacks (``torch.utils.tensorboard`` without tensorboard) is not a problem:
        (None, None)."""
        if path not in self.cache:
            self.cache[path] = self._resolve(path)
        return self.cache[path]

    @staticmethod
    def _resolve(path: str) -> tuple[object | None, str | None]:
        parts = path.split(".")
        for split in range(len(parts), 0, -1):
            module_name = ".".join(parts[:split])
            try:
                spec = importlib.util.find_spec(module_name)
            except (ImportError, ValueError):  # a parent is no package, or cannot import
                spec = None
            if spec is None:
                continue  # not a module: an attribute of a shorter prefix
            try:
                obj = importlib.import_module(module_name)
            except ImportError:  # the module exists, but needs a package this machine lacks
                return None, None
            for index, attribute in enumerate(parts[split:], start=split):
                if not hasattr(obj, attribute):
                    where = ".".join(parts[:index])
                    return None, f"{where} has no attribute {attribute!r}"
                obj = getattr(obj, attribute)
            return obj, None
        return None, f"cannot import {parts[0]}"


def unknown_keywords(function: object, call: ast.Call) -> list[str]:
    """Keyword names ``call`` passes that ``function``'s signature does not take."""
    names = [keyword.arg for keyword in call.keywords if keyword.arg is not None]
    if not names:
        return []
    try:
        signature = inspect.signature(function)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # a builtin without a signature: nothing to compare
        return []
    parameters = signature.parameters.values()
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return []
    accepted = {
        parameter.name
        for parameter in parameters
        if parameter.kind is not inspect.Parameter.POSITIONAL_ONLY
    }
    return [name for name in names if name not in accepted]


def check_source(source: str, label: str, resolver: Resolver) -> list[str]:
    """Problems in one file's source, each ``label:line: what``."""
    tree = ast.parse(source)
    aliases = torch_aliases(tree)
    if not aliases:
        return []
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    problems: dict[tuple[int, str], str] = {}

    def torch_path(node: ast.AST) -> str | None:
        parts = dotted(node)
        if not parts or parts[0] not in aliases:
            return None
        return ".".join([aliases[parts[0]], *parts[1:]])

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "torch":
                for name in node.names:
                    path = f"{node.module}.{name.name}" if name.name != "*" else node.module
                    _, why = resolver.resolve(path)
                    if why:
                        problems[(node.lineno, path)] = f"{label}:{node.lineno}: {path}: {why}"
        elif isinstance(node, ast.Attribute) and id(node) not in inner:
            path = torch_path(node)
            if path and not path.startswith("torch.ops.sdpo."):  # ours, registered at import
                _, why = resolver.resolve(path)
                if why:
                    problems[(node.lineno, path)] = f"{label}:{node.lineno}: {path}: {why}"
        elif isinstance(node, ast.Call):
            path = torch_path(node.func)
            if path is None:
                continue
            function, _ = resolver.resolve(path)
            if function is None:
                continue
            for name in unknown_keywords(function, node):
                problems[(node.lineno, f"{path}:{name}")] = (
                    f"{label}:{node.lineno}: {path}() takes no keyword argument {name!r}"
                )
    return [problems[key] for key in sorted(problems)]


def check_instance_methods(resolver: Resolver) -> list[str]:
    problems = []
    for class_path, methods in INSTANCE_METHODS.items():
        cls, why = resolver.resolve(class_path)
        if why:
            problems.append(f"INSTANCE_METHODS: {class_path}: {why}")
            continue
        if cls is None:
            continue
        problems.extend(
            f"INSTANCE_METHODS: {class_path} has no method {method!r}"
            for method in methods
            if not hasattr(cls, method)
        )
    return problems


def check(paths: Iterable[Path]) -> list[str]:
    resolver = Resolver()
    problems = check_instance_methods(resolver)
    for file in python_files(paths):
        label = str(file.relative_to(ROOT)) if file.is_relative_to(ROOT) else str(file)
        problems.extend(check_source(file.read_text(), label, resolver))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", help="files or folders (default: the project's)")
    arguments = parser.parse_args(argv)
    paths = [Path(path).resolve() for path in arguments.paths] or [
        ROOT / name for name in DEFAULT_PATHS
    ]
    import torch

    problems = check(paths)
    for problem in problems:
        print(problem)
    print(
        f"torch_api_check: torch {torch.__version__}: "
        f"{len(problems)} problem(s) in {', '.join(str(path) for path in paths)}"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
