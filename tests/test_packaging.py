"""The wheel installs everything under `sdpo` and no top-level `kernels`, `train`, `profiling`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("*.whl")
    return zipfile.ZipFile(wheel).namelist()


def test_subpackages_live_under_sdpo(wheel_names):
    for module in (
        "sdpo/__init__.py",
        "sdpo/kernels/preference.py",
        "sdpo/train/__init__.py",
        "sdpo/profiling/kernel_bench.py",
        "sdpo/objectives.py",
        "sdpo/reference.py",
    ):
        assert module in wheel_names, module
    top_level = {
        name.split("/")[0] for name in wheel_names if not name.split("/")[0].endswith(".dist-info")
    }
    assert top_level == {"sdpo"}, top_level


def test_source_checkout_resolves_subpackages_without_an_editable_finder():
    # As after `pip install .` followed by `python` in the repository root: sdpo comes from the
    # checkout, and only the project's own finder can map sdpo.kernels to kernels/.
    code = (
        "import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in "
        "(type(f).__module__ + type(f).__name__).lower()]; "
        "import sdpo.kernels, sdpo.train, sdpo.profiling; print(sdpo.kernels.__file__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == str(ROOT / "kernels" / "__init__.py")
