"""Kernel benchmarks (pytest-benchmark). GPU: ``pytest profiling/benchmarks --benchmark-only``.

On the CPU (no timings claimed) ``TRITON_INTERPRET=1 pytest profiling/benchmarks
--benchmark-disable`` runs every implementation once at a tiny size: a smoke test of the
benchmark code itself. Every row, the torch backend's included, is first checked against an
independent fp64 statement of the loss (tests/formulas.py, which shares no code with sdpo), so
the oracle the benchmark itself uses (the torch backend) is not checked against itself.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from sdpo import cuda_backend, ops
from sdpo.profiling import kernel_bench

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
SIZES = kernel_bench.SIZES if ON_GPU else kernel_bench.SMOKE_SIZES
CASES = [
    (size, dtype, name)
    for size in SIZES
    for dtype in kernel_bench.DTYPES
    for name in kernel_bench.IMPLEMENTATIONS
]


def load_formulas():
    path = Path(__file__).resolve().parents[2] / "tests" / "formulas.py"
    spec = importlib.util.spec_from_file_location("sdpo_test_formulas", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_against_independent_formula(name: str, dtype: torch.dtype) -> float:
    """The implementation's gradient on the smoke inputs against the fp64 formula's gradient of
    the same (rounded) inputs: max |difference| / max |expected|, asserted within tolerance."""
    batch_pairs, sample_shape = kernel_bench.SMOKE_SIZES["smoke"]
    model_pred, ref_pred, target = kernel_bench.make_input_sets(
        batch_pairs, sample_shape, dtype, DEVICE, copies=1
    )[0]
    actual = kernel_bench.implementation(name)(model_pred, ref_pred, target).double().cpu()
    leaf = model_pred.detach().double().cpu().requires_grad_(True)
    loss, _ = load_formulas().independent_loss(
        leaf,
        ref_pred.double().cpu(),
        target.double().cpu(),
        method="diffusion-dpo",
        beta=kernel_bench.BETA,
        mu=kernel_bench.MU,
    )
    (expected,) = torch.autograd.grad(loss, leaf)
    assert expected.abs().max() > 0
    error = float((actual - expected).abs().max() / expected.abs().max())
    # bf16 inputs are rounded the same for both; the sums run in fp32 (fp64 here).
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert error <= tolerance, f"{name} {dtype}: gradient off the fp64 formula by {error:.3g}"
    return error


@pytest.mark.parametrize(("size", "dtype_name", "name"), CASES)
def test_loss_forward_backward(benchmark, copy_gbps, kernel_rows, size, dtype_name, name):
    if name == "fused" and not ops.triton_available(DEVICE):
        pytest.skip("fused kernels need CUDA or TRITON_INTERPRET=1")
    if name == "cuda" and not cuda_backend.cuda_available(DEVICE):
        pytest.skip(f"the CUDA C++ kernels need a GPU and `{cuda_backend.BUILD_COMMAND}`")
    if name == "torch-compile" and not ON_GPU:
        pytest.skip("inductor compile of the loss is covered by tests/test_compile.py on the CPU")
    batch_pairs, sample_shape = SIZES[size]
    dtype = kernel_bench.DTYPES[dtype_name]
    independent_error = check_against_independent_formula(name, dtype)
    case = kernel_bench.prepare_case(name, batch_pairs, sample_shape, dtype, DEVICE)
    step, bytes_moved, error = case.step, case.bytes_moved, case.error

    phases = {}
    if name in ("fused", "cuda"):
        phases = kernel_bench.fused_phase_steps(batch_pairs, sample_shape, dtype, DEVICE, name)
    if not ON_GPU:
        benchmark.pedantic(step, rounds=1, iterations=1)
        for phase in phases.values():  # each kernel alone runs (smoke test, no timing)
            phase()
        return
    # Each pytest-benchmark round is `inner` back-to-back iterations and one sync, so the sync
    # does not dominate the 30-100 us iterations at the SD1.5 size.
    inner = max(1, min(50, math.ceil(2e9 / bytes_moved)))

    def round_of_iterations():
        for _ in range(inner):
            step()
        torch.cuda.synchronize()

    benchmark.pedantic(round_of_iterations, rounds=20, warmup_rounds=2, iterations=1)
    ms = kernel_bench.time_cuda(step, inner=inner, rounds=20)
    # The fused backends' kernels one at a time (ms each): finalize apart from the data passes.
    phase_ms = {
        f"{phase}_ms": kernel_bench.time_cuda(run_phase, inner=inner, rounds=20)
        for phase, run_phase in phases.items()
    }
    gbps = bytes_moved / (ms * 1e-3) / 1e9
    shape = [2 * batch_pairs, *sample_shape]
    row = kernel_bench.KernelResult(
        name=name,
        shape=shape,
        dtype=dtype_name,
        ms=ms,
        gbps=gbps,
        pct_of_copy_bandwidth=100.0 * gbps / copy_gbps,
        extra={
            "max_grad_error_vs_torch": error,
            "max_grad_error_vs_fp64_formula_smoke": independent_error,
            "counted_bytes": bytes_moved,
            "inner": inner,
            **phase_ms,
        },
    )
    benchmark.extra_info.update(
        {"ms_cuda_events": ms, "gbps": gbps, "pct_copy": row.pct_of_copy_bandwidth}
    )
    kernel_rows.append(row)
