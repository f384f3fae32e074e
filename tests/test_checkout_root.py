"""The README's commands run from the checkout root, where sys.path starts at the checkout: the
trainer (one process and torchrun), the profiler's CLI and the GPU check's entry. Before the
Python code moved under sdpo/, the root's kernels/ package stood in for Hugging Face's
`kernels` (transformers >= 5.25 imports it) and each of these died at the transformers import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--preset", "tiny", "--max-steps", "1", "--no-progress", "--checkpoint-every", "0"]


def _run(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _summary(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{") :])


def test_python_m_sdpo_train_from_the_root(tmp_path):
    result = _run([sys.executable, "-m", "sdpo.train", *TINY, "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert _summary(result.stdout)["steps"] == 1
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


@pytest.mark.slow  # two processes, ~12 s on 2 cores
def test_torchrun_two_processes_from_the_root(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = _run([*torchrun, "-m", "sdpo.train", *TINY, "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert _summary(result.stdout)["steps"] == 1


@pytest.mark.parametrize("module", ["sdpo.profiling.cli", "sdpo.profiling.gpu_check"])
def test_profiling_entry_points_from_the_root(module):
    result = _run([sys.executable, "-m", module, "--help"], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage:"), result.stdout[:200]
