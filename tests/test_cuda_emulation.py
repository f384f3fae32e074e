"""The CUDA kernels of kernels/cuda/sdpo_preference.cu executed on the CPU.

The .cu file is compiled as C++ (g++ -std=c++20) against the small emulation headers in
tests/cuda_emulation/ (blocks run one after another, each CUDA thread of a block is a
std::thread, __syncthreads() a std::barrier, __shared__ one static copy per kernel); the only
rewrite of the source is `kernel<<<grid, block, shared, stream>>>(args)` into a call of the
emulated launch. The library then runs through its real C ABI (sdpo_cuda_forward /
sdpo_cuda_gradient) with host pointers, and is compared with backend="torch" for every method,
granularity, target layout and dtype on small odd shapes, with several chunks per pair so the
shared-memory tree and the chunk reduction both run.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from formulas import beta_for, make_inputs

import sdpo
from sdpo import cuda_backend, reference

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "kernels" / "cuda" / "sdpo_preference.cu"
SHIM = Path(__file__).resolve().parent / "cuda_emulation"
LAUNCH = re.compile(r"(\w+(?:<[^<>;]*>)?)<<<([^;]*?)>>>\((.*?)\);", re.DOTALL)


def emulated_source(text: str) -> str:
    """Each launch `k<<<grid, block, shared, stream>>>(args);` as an emulated launch."""

    def replace(match: re.Match) -> str:
        grid, block = [part.strip() for part in match.group(2).split(",")][:2]
        return f"cuda_emulation::launch({grid}, {block}, [&] {{ {match.group(1)}({match.group(3)}); }});"

    rewritten, count = LAUNCH.subn(replace, text)
    assert count == 3, f"expected the three kernel launches of {SOURCE.name}, found {count}"
    return rewritten


@pytest.fixture(scope="module")
def emulated(tmp_path_factory) -> ctypes.CDLL:
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is not installed")
    build = tmp_path_factory.mktemp("cuda-emulation")
    source = build / "sdpo_preference_emulated.cpp"
    source.write_text(emulated_source(SOURCE.read_text()))
    library = build / "libsdpo_cuda_emulated.so"
    command = [
        compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
        "-I", str(SHIM), "-I", str(SOURCE.parent), "-include", "cuda_runtime.h",
        str(source), "-o", str(library),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    handle = ctypes.CDLL(str(library))
    cuda_backend._declare(handle, cuda_backend.LIBRARY_NAME)  # also checks the ABI version
    return handle


def emulated_loss(library, model_pred, ref_pred, target, *, method, beta, mu, granularity,
                  weights, chunk_elements):  # fmt: skip
    """Loss, stats, lambda and d loss / d model_pred from the emulated CUDA library."""
    group_size = sdpo.parse_granularity(granularity)
    batch_pairs, elements = model_pred.shape[0] // 2, model_pred[0].numel()
    num_chunks = -(-elements // chunk_elements)
    workspace = torch.zeros(library.sdpo_cuda_workspace_floats(batch_pairs, num_chunks))
    loss = torch.zeros(())
    stats = torch.zeros(cuda_backend.NUM_STATS)
    scale = torch.zeros(batch_pairs)
    coefficients = torch.zeros(2, 2 * batch_pairs)
    log_q, log_one_minus_q = reference.dmpo_log_q(0.01)
    dtype_code = cuda_backend.DTYPE_CODES[model_pred.dtype]
    status = library.sdpo_cuda_forward(
        dtype_code, model_pred.data_ptr(), ref_pred.data_ptr(), target.data_ptr(),
        int(target.shape[0] == batch_pairs),
        None if weights is None else weights.data_ptr(),
        batch_pairs, elements, chunk_elements, num_chunks,
        cuda_backend.METHOD_CODES[method], beta, 0.0 if mu is None else mu, int(mu is not None),
        0 if group_size is None else group_size, log_q, log_one_minus_q,
        workspace.data_ptr(), loss.data_ptr(), stats.data_ptr(), scale.data_ptr(),
        coefficients.data_ptr(), None,
    )  # fmt: skip
    assert status == 0, library.sdpo_cuda_last_error()
    grad = torch.empty_like(model_pred)
    grad_output = torch.ones(1)
    status = library.sdpo_cuda_gradient(
        dtype_code, grad_output.data_ptr(), model_pred.data_ptr(), ref_pred.data_ptr(),
        target.data_ptr(), int(target.shape[0] == batch_pairs),
        int(method in ("dspo", "dspo-sdxl")), batch_pairs, elements, coefficients.data_ptr(),
        grad.data_ptr(), None,
    )  # fmt: skip
    assert status == 0, library.sdpo_cuda_last_error()
    return loss, stats, scale, grad


@pytest.mark.parametrize("method", sdpo.METHODS)
@pytest.mark.parametrize(
    ("granularity", "shared_target", "weighted", "dtype"),
    [
        ("batch", True, False, torch.float32),
        ("pair", False, True, torch.float32),
        ("group:2", True, True, torch.bfloat16),
        ("group:2", False, False, torch.float16),
    ],
)
def test_emulated_cuda_kernels_match_torch(
    emulated, method, granularity, shared_target, weighted, dtype
):
    # B = 3 (group:2 leaves a short last group), D = 3 * 7 * 31 = 651 in chunks of 300: three
    # chunks per pair (every one of the 256 threads holds data in the first two), the last
    # chunk partial, and a gradient grid whose last block is partial.
    model_pred, ref_pred, target = (
        t.to(dtype) for t in make_inputs(3, (3, 7, 31), shared_target=shared_target, ref_offset=0.5)
    )
    weights = torch.tensor([0.5, 0.0, 2.0]) if weighted else None
    kwargs = dict(method=method, beta=beta_for(method), mu=0.6, granularity=granularity)
    pred = model_pred.clone().requires_grad_(True)
    expected = sdpo.preference_loss(
        pred, ref_pred, target, backend="torch", dmpo_alpha=0.01, pair_weights=weights, **kwargs
    )
    expected.loss.backward()
    loss, stats, scale, grad = emulated_loss(
        emulated, model_pred, ref_pred, target, weights=weights, chunk_elements=300, **kwargs
    )
    torch.testing.assert_close(loss, expected.loss.detach(), rtol=2e-5, atol=1e-6)
    for index, name in enumerate(reference.STAT_NAMES):
        torch.testing.assert_close(stats[index], expected.stats[name], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(scale, expected.stats["lambda"].expand(3), rtol=2e-5, atol=1e-6)
    assert (scale < 1).any(), "the inputs must exercise the safeguard"
    assert grad.dtype == dtype
    # The kernel writes the gradient in the input dtype: compare within its rounding.
    reference_grad = pred.grad.float()
    error = (grad.float() - reference_grad).abs().max() / reference_grad.abs().max()
    assert error < (2e-5 if dtype == torch.float32 else 8e-3)
