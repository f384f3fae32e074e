"""The README's Python examples run as written, and CI runs the README's set-up blocks."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_python_examples_run():
    blocks = python_blocks()
    assert blocks, "README.md should show the API in a python block"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)


def test_ci_runs_the_readme_blocks():
    text = README.read_text()
    for step in ("install", "test"):
        assert f"<!-- ci:{step} -->\n```bash\n" in text, step
    ci_script = (README.parent / ".ci" / "run").read_text()
    assert "readme_block" in ci_script and "for step in install test" in ci_script
