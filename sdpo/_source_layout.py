"""Maps the top-level folders kernels/, train/, profiling/ onto sdpo.* in a source checkout.

Installed (``pip install .``) or editable (``pip install -e .``), setuptools' package-dir
mapping provides ``sdpo.kernels`` and friends. But Python puts the working directory first on
``sys.path``, so ``python -m pytest`` from the repository root after a non-editable install
imports ``sdpo`` from the checkout, where ``sdpo/kernels`` does not exist. This finder, placed
last on ``sys.meta_path``, resolves exactly those three names from the checkout in that case.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

SUBPACKAGE_FOLDERS = {
    "sdpo.kernels": "kernels",
    "sdpo.train": "train",
    "sdpo.profiling": "profiling",
}


class SourceLayoutFinder(importlib.abc.MetaPathFinder):
    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        folder = SUBPACKAGE_FOLDERS.get(fullname)
        if folder is None:
            return None
        init = self.root / folder / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(
            fullname, init, submodule_search_locations=[str(init.parent)]
        )


def install_if_source_checkout(package_dir: Path) -> None:
    root = package_dir.parent
    if not (root / "pyproject.toml").is_file() or (package_dir / "kernels").exists():
        return
    if any(isinstance(finder, SourceLayoutFinder) for finder in sys.meta_path):
        return
    sys.meta_path.append(SourceLayoutFinder(root))


install_if_source_checkout(Path(__file__).resolve().parent)
