"""The host build of the CUDA kernels' math (libsdpo_cuda_host.so), for the CPU tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import sdpo
from sdpo import cuda_backend, reference

ROOT = Path(__file__).resolve().parents[1]


_BUILT: list[Path] = []


def _cmake(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def _configured_here(build: Path) -> bool:
    """build/ was configured by CMake for THIS checkout (a copied build/ names another)."""
    cache = build / "CMakeCache.txt"
    if not cache.is_file():
        return False
    for line in cache.read_text(errors="replace").splitlines():
        if line.startswith("CMAKE_HOME_DIRECTORY:"):
            return Path(line.partition("=")[2]).resolve() == ROOT
    return False


def cmake_build_dir(tmp_path_factory) -> Path:
    """The repository's build/ when CMake has configured it (CI does), else a fresh CMake build.

    Either way the libraries are brought up to date with the sources first (an incremental
    ``cmake --build``: ~1 s when nothing changed), once per test session: tests must never run
    against a library built from older kernels (an edited header would otherwise go unseen).
    """
    if _BUILT:
        return _BUILT[0]
    if shutil.which("cmake") is None:
        if (ROOT / "build" / cuda_backend.HOST_LIBRARY_NAME).is_file():
            pytest.skip("cmake is not installed: build/ cannot be checked against the sources")
        pytest.skip("cmake is not installed")
    build = ROOT / "build"
    if not _configured_here(build):
        build = tmp_path_factory.mktemp("cmake-build")
        _cmake(["cmake", "-S", str(ROOT), "-B", str(build)])
    _cmake(["cmake", "--build", str(build), "-j", "2"])
    _BUILT.append(build)
    return build


def _pointer(array: np.ndarray) -> int:
    return array.ctypes.data


def host_loss(host, model_pred, ref_pred, target, *, method, beta, mu, granularity, weights=None):
    """Loss, stats, lambda and d loss / d model_pred from the host build of the kernels' math."""
    group_size = sdpo.parse_granularity(granularity)
    batch_pairs = model_pred.shape[0] // 2
    arrays = [np.ascontiguousarray(t.detach().float().numpy()) for t in (model_pred, ref_pred)]
    target_array = np.ascontiguousarray(target.float().numpy())
    weight_array = None if weights is None else np.ascontiguousarray(weights.float().numpy())
    elements = model_pred[0].numel()
    loss = np.zeros(1, np.float32)
    stats = np.zeros(cuda_backend.NUM_STATS, np.float32)
    scale = np.zeros(batch_pairs, np.float32)
    coefficients = np.zeros((2, 2 * batch_pairs), np.float32)
    log_q, log_one_minus_q = reference.dmpo_log_q(0.01)
    status = host.sdpo_host_forward(
        _pointer(arrays[0]),
        _pointer(arrays[1]),
        _pointer(target_array),
        int(target.shape[0] == batch_pairs),
        None if weight_array is None else _pointer(weight_array),
        batch_pairs,
        elements,
        cuda_backend.METHOD_CODES[method],
        beta,
        0.0 if mu is None else mu,
        int(mu is not None),
        0 if group_size is None else group_size,
        log_q,
        log_one_minus_q,
        _pointer(loss),
        _pointer(stats),
        _pointer(scale),
        _pointer(coefficients),
    )
    assert status == 0
    grad = np.zeros_like(arrays[0])
    with_gap = method in ("dspo", "dspo-sdxl")
    status = host.sdpo_host_gradient(
        1.0,
        _pointer(arrays[0]),
        _pointer(arrays[1]),
        _pointer(target_array),
        int(target.shape[0] == batch_pairs),
        int(with_gap),
        batch_pairs,
        elements,
        _pointer(coefficients),
        _pointer(grad),
    )
    assert status == 0
    return float(loss[0]), stats, scale, torch.from_numpy(grad)
