"""The README's Python examples run as written, and CI runs the README's set-up blocks."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_python_examples_run():
    blocks = python_blocks()
    assert blocks, "README.md should show the API in a python block"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)


def readme_block(name: str) -> str:
    """The fenced block after ``<!-- ci:NAME -->``, read here with a regular expression."""
    match = re.search(rf"<!-- ci:{name} -->\n```bash\n(.*?)```", README.read_text(), re.DOTALL)
    assert match, f"README.md has no ci:{name} block"
    return match.group(1)


@pytest.mark.parametrize("name", ["install", "test"])
def test_ci_reads_exactly_the_readme_blocks(name):
    # .ci/run's own reader (its readme_block shell function, run as CI runs it) must print the
    # block the README shows, so CI runs what a user reads.
    script = README.parent / ".ci" / "run"
    reader = re.search(r"^readme_block\(\) \{.*?^\}", script.read_text(), re.DOTALL | re.MULTILINE)
    assert reader, ".ci/run defines no readme_block function"
    result = subprocess.run(
        ["bash", "-c", f"{reader.group(0)}\nreadme_block {name}"],
        cwd=README.parent, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == readme_block(name)
    assert "for step in install test" in script.read_text()


@pytest.mark.slow  # ~25 s on 2 busy cores
def test_the_readme_cpu_smoke_run_of_the_overhead_suite_runs_as_written(tmp_path):
    # The README's `sdpo-profile overhead --preset tiny-flux --device cpu ...` line, run as
    # written but for its --output path: it must finish (CPU defaults: 2 rounds x 2 steps).
    import json
    import shlex
    import sys

    lines = [
        line.split("#")[0].strip()
        for line in README.read_text().splitlines()
        if line.startswith("sdpo-profile overhead --preset tiny-flux --device cpu")
    ]
    assert lines, "README.md shows no CPU smoke run of the overhead suite"
    words = shlex.split(lines[0])
    words[words.index("--output") + 1] = str(tmp_path / "tf.json")
    command = [sys.executable, "-m", "sdpo.profiling.cli", *words[1:]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads((tmp_path / "tf.json").read_text())
    assert written["overhead"]["preset"] == "tiny-flux"
    assert written["overhead"]["complete"] and written["overhead"]["reference_step_ms"] > 0


def test_the_readme_suite_example_is_a_suite_generate_reads(tmp_path):
    from sdpo.eval.manifest import load_entries

    match = re.search(r"<!-- suite-example -->\n```json\n(.*?)```", README.read_text(), re.DOTALL)
    assert match, "README.md shows no example suite"
    suite = tmp_path / "suite.json"
    suite.write_text(match.group(1))
    entries = load_entries(suite, "--suite")
    assert len(entries) == 2 and entries[0]["prompt"].startswith("a red fox")
