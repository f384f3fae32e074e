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


def cmake_build_dir(tmp_path_factory) -> Path:
    """The repository's build/ when CMake has run there (CI does), else a fresh CMake build."""
    if (ROOT / "build" / cuda_backend.HOST_LIBRARY_NAME).is_file():
        return ROOT / "build"
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    build = tmp_path_factory.mktemp("cmake-build")
    for command in (
        ["cmake", "-S", str(ROOT), "-B", str(build)],
        ["cmake", "--build", str(build), "-j", "2"],
    ):
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
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
