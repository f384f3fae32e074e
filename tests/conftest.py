"""Shared test helpers: independent statements of the objectives and small random inputs."""

from __future__ import annotations

import pytest
import torch

from sdpo.train.runtime import configure_cpu_threads

# One intra-op thread unless OMP_NUM_THREADS says otherwise: the tests' models are tiny, and on
# a shared 2-core machine torch's default of one thread per core made them several times slower
# (see sdpo/train/runtime.py).
configure_cpu_threads(None, program="tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # GPU tests run where a GPU is at hand and are skipped, visibly, elsewhere.
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
