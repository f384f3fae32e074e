"""One way to import each module, and no shadow of another package from the checkout root.

Every sdpo.* module lives in the sdpo/ folder; the top-level kernels/, train/ and profiling/
folders hold what is not Python (CUDA sources, launch scripts, shell scripts, results) and have no
__init__.py, so from the checkout root they are at most namespace portions, which the import
system passes over for a regular package later on sys.path (Hugging Face's `kernels`, which
transformers imports). These tests install a copy of the checkout three ways (a wheel, an
editable install, and an editable install seen from a second checkout) in throwaway venvs that
borrow this interpreter's site-packages for the dependencies, resolve every sdpo.* module there
with importlib.util.find_spec (no module body runs), and import look-alike top-level packages
from the checkout root.
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Prints "name<TAB>file" for every sdpo.* module below the sdpo package it imports.
RESOLVE_ALL = r"""
import importlib.util, os, pathlib
import sdpo
root = pathlib.Path(sdpo.__file__).parent
print("sdpo\t" + sdpo.__file__)
found = [
    pathlib.Path(folder, name)
    for folder, _, names in os.walk(root)
    for name in names
    if name.endswith(".py")
]
for path in sorted(found):
    parts = path.relative_to(root).with_suffix("").parts
    if any(not (root.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(len(parts))):
        continue  # not inside a package (e.g. benchmarks run by pytest only)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if parts and parts[-1] == "__main__":
        continue
    name = ".".join(("sdpo", *parts))
    print(name + "\t" + importlib.util.find_spec(name).origin)
"""


def _copy_checkout(destination: Path) -> Path:
    """The tracked and untracked (not ignored) files of this checkout (a symlink stays a link)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree, not yet committed
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(source.readlink())
        else:
            shutil.copy2(source, target)
    return destination


def _make_venv(folder: Path) -> Path:
    """A venv whose own site-packages comes first, then this interpreter's (the dependencies)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    borrowed = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    borrowed += [entry for entry in sys.path if entry.endswith("site-packages")]
    # A .pth file adds paths but does not run the .pth files inside them: this interpreter's
    # own editable install of ROOT stays invisible to the venv.
    Path(purelib, "zz_borrowed_site_packages.pth").write_text("\n".join(dict.fromkeys(borrowed)))
    return python


def _pip_install(python: Path, *arguments: str) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            *arguments,
        ],
        check=True,
        capture_output=True,
    )


def _resolved(python: Path, cwd: Path) -> dict[str, Path]:
    result = subprocess.run(
        [str(python), "-c", RESOLVE_ALL],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cwd)},
    )
    assert result.returncode == 0, result.stderr
    return {
        name: Path(file)
        for name, file in (line.split("\t") for line in result.stdout.strip().splitlines())
    }


def _assert_all_under(modules: dict[str, Path], sdpo_folder: Path) -> None:
    assert {"sdpo.kernels.preference", "sdpo.train.trainer", "sdpo.profiling.cli"} <= set(
        modules
    ), sorted(modules)
    assert "sdpo.eval.cli" in modules and "sdpo.demo.run" in modules
    strays = {
        name: str(file) for name, file in modules.items() if not file.is_relative_to(sdpo_folder)
    }
    assert not strays, f"not from {sdpo_folder}: {strays}"


@pytest.fixture(scope="module")
def checkouts(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("checkouts")
    return _copy_checkout(base / "first"), _copy_checkout(base / "second")


@pytest.fixture(scope="module")
def wheel(checkouts, tmp_path_factory) -> Path:
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
            str(checkouts[0]),
        ],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("*.whl")
    return built


def test_wheel_installs_everything_under_sdpo(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for module in (
        "sdpo/__init__.py",
        "sdpo/kernels/preference.py",
        "sdpo/train/__init__.py",
        "sdpo/train/trainer.py",
        "sdpo/profiling/kernel_bench.py",
        "sdpo/objectives.py",
        "sdpo/reference.py",
        "sdpo/demo/base_model/unet/config.json",
        "sdpo/demo/flow_base_model/unet/diffusion_pytorch_model.safetensors",
        "sdpo/demo/flow_base_model/scheduler/scheduler_config.json",
    ):
        assert module in names, module
    top_level = {
        name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")
    }
    assert top_level == {"sdpo"}, top_level


def test_wheel_install_resolves_every_module_from_site_packages(wheel, tmp_path):
    python = _make_venv(tmp_path / "venv")
    _pip_install(python, str(wheel))
    site_packages = next((tmp_path / "venv").glob("lib/python*/site-packages"))
    _assert_all_under(_resolved(python, tmp_path), site_packages / "sdpo")


def test_editable_install_resolves_every_module_from_the_checkout_it_is_run_in(checkouts, tmp_path):
    first, second = checkouts
    python = _make_venv(tmp_path / "venv")
    _pip_install(python, "-e", str(first))
    _assert_all_under(_resolved(python, tmp_path), first / "sdpo")
    # `python -m pytest` in a second checkout with the first one's editable install active: the
    # working directory comes first on sys.path, so everything comes from the second checkout
    # (before, sdpo came from the second and sdpo.train from the first).
    _assert_all_under(_resolved(python, second), second / "sdpo")


def test_source_tree_resolves_every_module_from_its_own_sdpo_folder():
    _assert_all_under(_resolved(Path(sys.executable), ROOT), ROOT / "sdpo")


# Top-level names a dependency imports or might: each folder of the checkout root with such a
# name must lose to an installed package of that name, whatever the working directory.
SHADOW_NAMES = ("kernels", "train", "profiling", "tests", "tools", "docs")


def test_no_top_level_folder_of_the_checkout_is_a_regular_package():
    regular = sorted(
        folder.name
        for folder in ROOT.iterdir()
        if folder.is_dir() and folder.name != "sdpo" and (folder / "__init__.py").exists()
    )
    assert regular == [], f"top-level folders with __init__.py (they shadow packages): {regular}"
    links = sorted(str(path) for path in (ROOT / "sdpo").rglob("*") if path.is_symlink())
    assert links == [], links


def test_installed_packages_win_over_the_checkouts_folders_from_its_root(tmp_path):
    """From the checkout root (sys.path[0] == ''), an installed `kernels` (and every other name
    above) is the one imported, as Python's path finder takes a regular package found later on
    the path over a folder without __init__.py it met first."""
    installed = tmp_path / "site"
    for name in SHADOW_NAMES:
        (installed / name).mkdir(parents=True)
        (installed / name / "__init__.py").write_text("INSTALLED = True\n")
    probe = (
        "import importlib, sys\n"
        f"for name in {SHADOW_NAMES!r}:\n"
        "    module = importlib.import_module(name)\n"
        "    print(name, getattr(module, 'INSTALLED', False), module.__file__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(installed)},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    for name, line in zip(SHADOW_NAMES, lines, strict=False):
        assert line.startswith(f"{name} True {installed}"), result.stdout


def test_hugging_face_kernels_is_the_one_imported_from_the_checkout_root():
    """transformers >= 5.25 imports Hugging Face's `kernels`; where it is installed, the checkout
    root's kernels/ folder (CUDA sources) must not stand in for it."""
    spec = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('kernels').origin)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if spec.returncode != 0 or spec.stdout.strip() in ("", "None"):
        pytest.skip("Hugging Face's kernels is not installed here")
    result = subprocess.run(
        [sys.executable, "-c", "import kernels; print(kernels.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert not Path(result.stdout.strip()).is_relative_to(ROOT / "kernels"), result.stdout
    assert "site-packages" in result.stdout, result.stdout
