"""The parts import one way: math <- kernels <- api <- train <- profiling / demo / eval <- pairs."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
import_graph = importlib.util.module_from_spec(_spec)
sys.modules["import_graph"] = import_graph
_spec.loader.exec_module(import_graph)

# Each part may import only the parts listed for it (directly).
ALLOWED = {
    "math": set(),
    "kernels": {"math"},
    "api": {"math", "kernels"},
    "train": {"math", "api"},
    "profiling": {"math", "kernels", "api", "train"},
    "demo": {"math", "api", "train"},
    "eval": {"math", "api", "train"},
    "pairs": {"math", "api", "train", "demo", "eval"},
}


def test_parts_import_only_lower_layers():
    edges = import_graph.part_edges(ROOT)
    assert edges, "no imports found: is the tree walked through the sdpo/train links?"
    assert ("demo", "train") in edges and ("profiling", "train") in edges
    wrong = {
        edge: sorted(imports) for edge, imports in edges.items() if edge[1] not in ALLOWED[edge[0]]
    }
    assert not wrong, wrong
    assert import_graph.find_cycle(edges) is None


def test_cycle_detection_finds_a_back_edge():
    edges = {("train", "api"): set(), ("api", "math"): set(), ("math", "train"): set()}
    cycle = import_graph.find_cycle(edges)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"train", "api", "math"}
    assert import_graph.find_cycle({("train", "api"): set(), ("demo", "train"): set()}) is None


def test_a_lazy_import_inside_a_function_counts(tmp_path):
    package = tmp_path / "sdpo"
    (package / "train").mkdir(parents=True)
    (package / "demo").mkdir()
    for init in (package, package / "train", package / "demo"):
        (init / "__init__.py").write_text("")
    (package / "train" / "data.py").write_text("def f():\n    from sdpo.demo import toy\n")
    (package / "demo" / "run.py").write_text("from sdpo.train import data\n")
    edges = import_graph.part_edges(tmp_path)
    assert set(edges) == {("train", "demo"), ("demo", "train")}
    assert import_graph.find_cycle(edges) is not None


def test_part_of_names_each_layer():
    assert import_graph.part_of("sdpo") == "api"
    assert import_graph.part_of("sdpo.reference") == "math"
    assert import_graph.part_of("sdpo.chunking") == "math"  # the fused backends' one plan
    assert import_graph.part_of("sdpo.ops") == "api"
    assert import_graph.part_of("sdpo.kernels.preference") == "kernels"
    assert import_graph.part_of("sdpo.train.trainer") == "train"
    assert import_graph.part_of("torch.nn") is None


def test_command_lines_parse_help_before_importing_torch():
    # `import sdpo` loads the API lazily; sdpo-profile builds its parser from the standard library.
    code = (
        "import sys, sdpo, sdpo.train, sdpo.train.cli, sdpo.profiling.cli\n"
        "try:\n"
        "    sdpo.profiling.cli.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "from sdpo import preference_loss\n"
        "assert 'torch' in sys.modules and callable(preference_loss)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "overhead" in result.stdout


# The console scripts as pyproject.toml declares them (what an install puts on PATH).
SCRIPTS = dict(
    (name, (module, function))
    for name, module, function in re.findall(
        r'^(sdpo-[a-z]+) = "([\w.]+):(\w+)"$', (ROOT / "pyproject.toml").read_text(), re.M
    )
)


@pytest.mark.parametrize(
    ("script", "argv", "status"),
    [
        ("sdpo-train", ["--help"], 0),
        ("sdpo-train", ["--list-presets"], 0),
        ("sdpo-train", ["--no-such-flag"], 2),
        ("sdpo-train", ["--beta", "-1"], 2),
        ("sdpo-train", ["--max-steps", "2.5"], 2),
        ("sdpo-eval", ["--help"], 0),
        ("sdpo-eval", ["generate", "--help"], 0),
        ("sdpo-eval", ["score", "--help"], 0),
        ("sdpo-eval", ["no-such-command"], 2),
        ("sdpo-pairs", ["--help"], 0),
        ("sdpo-pairs", ["--no-such-flag"], 2),
        ("sdpo-demo", ["--help"], 0),
        ("sdpo-demo", ["--no-such-flag"], 2),
        ("sdpo-demo", ["--steps", "7"], 2),
        ("sdpo-profile", ["--help"], 0),
        ("sdpo-cache", ["--help"], 0),
        ("sdpo-cache", ["--output-dir", "unused", "--encode-batch", "0"], 2),
        ("sdpo-cache", ["--output-dir", "unused", "--storage-dtype", "float8"], 2),
        ("sdpo-cache", ["--output-dir", "unused", "--resolution", "12"], 2),
    ],
)
def test_help_and_argument_errors_do_not_import_torch(script, argv, status):
    """Importing torch takes 1.7 s (more on a busy machine): a command line's --help and its
    argument errors answer without it, through the entry point pyproject.toml installs."""
    module, function = SCRIPTS[script]
    code = (
        "import importlib, sys\n"
        f"main = getattr(importlib.import_module({module!r}), {function!r})\n"
        "try:\n"
        f"    status = main({argv!r})\n"
        "except SystemExit as stop:\n"
        "    status = stop.code\n"
        "print('status', status, 'torch imported', 'torch' in sys.modules, file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert f"status {status} torch imported False" in result.stderr, result.stderr
    if status == 0:  # the help (or the preset list) really printed
        expected = "sd15-dpo" if "--list-presets" in argv else f"usage: {script}"
        assert expected in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        # Each of these used to be accepted: 12 built a cache sdpo-train cannot use, 0 crashed
        # deep in torch (resolution: a median over an empty dim; pairs: an empty stack), and
        # shard 0 or seed -1 were silently taken.
        ("--resolution", "12", "expected a multiple of 8"),
        ("--resolution", "0", "expected an integer >= 8, got 0"),
        ("--seed", "-1", "expected an integer in [0, 2**63), got -1"),
        ("--synthetic-pairs", "0", "expected an integer >= 1, got 0"),
        ("--shard-pairs", "0", "expected an integer >= 1, got 0"),
        ("--resolution", "16.5", "expected an integer, got '16.5'"),
    ],
)
def test_sdpo_cache_refuses_out_of_range_numbers_naming_the_flag(capsys, flag, value, message):
    from sdpo.train.cache_cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--output-dir", "unused", flag, value])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {flag}: {message}" in error, error
