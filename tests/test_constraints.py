"""constraints.txt: written by its tool, pins every dependency, agrees with the README's pins."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY / "tools"))
import constraints  # noqa: E402

CONSTRAINTS = REPOSITORY / "constraints.txt"


def pinned() -> dict[str, str]:
    return constraints.parse_pins(CONSTRAINTS.read_text(encoding="utf-8"), "constraints.txt")


def readme_install_block() -> str:
    text = (REPOSITORY / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- ci:install -->\n```bash\n(.*?)```", text, flags=re.DOTALL)
    assert match, "README.md has no ci:install block"
    return match.group(1)


def test_the_file_is_what_the_tool_writes():
    # Sorted, normalised names, the header: a hand edit that breaks the format shows here.
    assert CONSTRAINTS.read_text(encoding="utf-8") == constraints.render(pinned())


def test_every_declared_dependency_is_pinned():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (CI's)
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text(encoding="utf-8"))
    declared = (
        project["project"]["dependencies"] + project["project"]["optional-dependencies"]["dev"]
    )
    names = {
        constraints.normalized_name(re.match(r"[A-Za-z0-9._-]+", spec).group(0))
        for spec in declared
    }
    missing = sorted(names - set(pinned()))
    assert not missing, f"constraints.txt pins none of {missing}: rerun tools/constraints.py"


def test_the_readme_installs_with_the_constraints_and_their_torch():
    block = readme_install_block()
    assert re.search(r'pip install -e "\.\[dev\]" -c constraints\.txt', block), block
    pins = pinned()
    for package in ("torch", "triton"):
        readme_version = re.search(rf"\b{package}==(\S+)", block)
        assert readme_version, f"the README's install block pins no {package}"
        assert readme_version.group(1) == pins[package], (
            f"README installs {package}=={readme_version.group(1)}, constraints.txt pins "
            f"{pins[package]}: change both together"
        )


def test_local_labels_are_dropped_and_bad_lines_named():
    assert constraints.parse_pins("torch==2.13.0+cpu\nPyYAML==6.0\n", "f") == {
        "torch": "2.13.0",
        "pyyaml": "6.0",
    }
    with pytest.raises(ValueError, match=r"f:2: expected 'name==version'"):
        constraints.parse_pins("torch==2.13.0\n-e git+https://x\n", "f")
    with pytest.raises(ValueError, match="pinned twice"):
        constraints.parse_pins("numpy==1\nnumpy==2\n", "f")
    # pip's own tools and the project are never pinned.
    assert "setuptools" not in constraints.render({"setuptools": "80", "numpy": "2"})
