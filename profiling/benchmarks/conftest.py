"""Collects the kernel benchmark rows and writes them to a JSON + markdown file at the end.

Output: ``--kernel-results PATH`` (default: profiling/results/kernels-<device>-<date>.json on a
GPU; nothing is written on the CPU, where the run is only a smoke test and claims no timings).
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import pytest
import torch

from sdpo.profiling import kernel_bench

ROWS: list[kernel_bench.KernelResult] = []
STATE: dict = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kernel-results", default=None, help="where to write the kernel results JSON"
    )


@pytest.fixture(scope="session")
def copy_gbps() -> float | None:
    if not torch.cuda.is_available():
        return None
    STATE["copy_gbps"] = kernel_bench.copy_bandwidth_gbps(torch.device("cuda"))
    return STATE["copy_gbps"]


@pytest.fixture(scope="session")
def kernel_rows() -> list[kernel_bench.KernelResult]:
    return ROWS


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not ROWS or not torch.cuda.is_available():
        return
    path = session.config.getoption("--kernel-results")
    if path is None:
        device = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower()
        date = datetime.date.today().isoformat()
        path = str(
            Path(__file__).resolve().parent.parent / "results" / f"kernels-{device}-{date}.json"
        )
    kernel_bench.write_results(path, ROWS, STATE.get("copy_gbps"))
    Path(path).with_suffix(".md").write_text(kernel_bench.markdown_table(ROWS) + "\n")
    print(f"\nkernel results: {path}\n{kernel_bench.markdown_table(ROWS)}")
