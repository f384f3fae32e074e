"""backend="cuda" (kernels/cuda/, the CUDA C++ twin of the fused kernels).

On the CPU: the kernels' math (kernels/cuda/sdpo_preference_math.h) runs in the host build
libsdpo_cuda_host.so and is checked against backend="torch" for every method, mu, granularity,
target layout and pair weights; the CUDA library builds with CMake and exports its C ABI; the
errors. On a GPU (marked ``gpu``): values and gradients of backend="cuda" itself.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from formulas import beta_for, make_inputs
from host_build import cmake_build_dir, host_loss

import sdpo
from sdpo import cuda_backend, reference

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "kernels" / "cuda" / "sdpo_preference_math.h"
ABI_SYMBOLS = {
    "sdpo_cuda_abi_version",
    "sdpo_cuda_last_error",
    "sdpo_cuda_workspace_floats",
    "sdpo_cuda_forward",
    "sdpo_cuda_gradient",
}
GRANULARITIES = ("batch", "pair", "group:2", "group:3")


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    return cmake_build_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def host(build_dir) -> ctypes.CDLL:
    return cuda_backend.host_library(build_dir / cuda_backend.HOST_LIBRARY_NAME)


def torch_loss(model_pred, ref_pred, target, **kwargs):
    pred = model_pred.detach().clone().requires_grad_(True)
    result = sdpo.preference_loss(
        pred, ref_pred, target, backend="torch", dmpo_alpha=0.01, **kwargs
    )
    result.loss.backward()
    return result._replace(loss=result.loss.detach()), pred.grad


@pytest.mark.parametrize("method", sdpo.METHODS)
@pytest.mark.parametrize("mu", [None, 0.0, 0.6])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("shared_target", [True, False])
def test_kernel_math_matches_torch(host, method, mu, granularity, shared_target):
    # B = 5: group:2 and group:3 leave a short last group.
    model_pred, ref_pred, target = make_inputs(
        5, (3, 4, 5), shared_target=shared_target, ref_offset=0.5
    )
    beta = beta_for(method)
    expected, expected_grad = torch_loss(
        model_pred, ref_pred, target, method=method, beta=beta, mu=mu, granularity=granularity
    )
    loss, stats, scale, grad = host_loss(
        host, model_pred, ref_pred, target, method=method, beta=beta, mu=mu, granularity=granularity
    )
    assert loss == pytest.approx(float(expected.loss), rel=2e-5, abs=1e-6)
    for index, name in enumerate(reference.STAT_NAMES):
        assert stats[index] == pytest.approx(float(expected.stats[name]), rel=2e-5, abs=1e-6), name
    lambdas = expected.stats["lambda"].reshape(-1).expand(5)
    np.testing.assert_allclose(scale, lambdas.numpy(), rtol=2e-5, atol=1e-6)
    if mu == 0.6:
        assert (scale < 1).any(), "the inputs must exercise the safeguard"
    error = (grad.double() - expected_grad).abs().max() / expected_grad.abs().max()
    assert error < 2e-5


def test_kernel_math_with_pair_weights_and_dspo_sdxl_switch(host):
    model_pred, ref_pred, target = make_inputs(4, (2, 8, 8), ref_offset=0.2)
    weights = torch.tensor([0.0, 0.5, 1.0, 2.5], dtype=torch.float64)
    expected, expected_grad = torch_loss(
        model_pred, ref_pred, target, method="diffusion-dpo", beta=50.0, mu=0.3,
        granularity="pair", pair_weights=weights,
    )  # fmt: skip
    loss, _, _, grad = host_loss(
        host, model_pred, ref_pred, target, method="diffusion-dpo", beta=50.0, mu=0.3,
        granularity="pair", weights=weights,
    )  # fmt: skip
    assert loss == pytest.approx(float(expected.loss), rel=2e-5)
    assert grad[[0, 4]].abs().max() == 0  # a zero-weight pair gets no gradient
    assert (grad.double() - expected_grad).abs().max() / expected_grad.abs().max() < 2e-5
    # DSPO-SDXL: below the gap threshold the winners' direct term switches off.
    for ref_offset in (0.05, 1.0):
        model_pred, ref_pred, target = make_inputs(3, (2, 4, 4), ref_offset=ref_offset)
        expected, expected_grad = torch_loss(
            model_pred, ref_pred, target, method="dspo-sdxl", beta=20.0, mu=0.5, granularity="batch"
        )
        loss, stats, _, grad = host_loss(
            host, model_pred, ref_pred, target, method="dspo-sdxl", beta=20.0, mu=0.5,
            granularity="batch",
        )  # fmt: skip
        gap_mean = ((model_pred[:3] - ref_pred[:3]) ** 2).mean()
        assert stats[8] == pytest.approx(float(gap_mean), rel=1e-5)
        assert loss == pytest.approx(float(expected.loss), rel=2e-5)
        assert (grad.double() - expected_grad).abs().max() / expected_grad.abs().max() < 2e-5


@pytest.mark.parametrize("batch_pairs", [511, 512, 513, 3 * 512 + 5])
def test_kernel_math_over_more_pairs_than_lanes(host, batch_pairs):
    # The reductions over pairs run in 512 lanes (lane l: pairs l, l + 512, ...) and a tree,
    # in the host build one lane after another: batches around and beyond one pair per lane,
    # with the batch totals in play (batch lambda, the DSPO-SDXL gap mean) and pair weights.
    model_pred, ref_pred, target = make_inputs(batch_pairs, (2, 3, 5), ref_offset=0.5)
    weights = torch.rand(batch_pairs, generator=torch.Generator().manual_seed(0)) + 0.5
    kwargs = dict(method="dspo-sdxl", beta=20.0, mu=0.6, granularity="batch")
    expected, expected_grad = torch_loss(
        model_pred, ref_pred, target, pair_weights=weights, **kwargs
    )
    loss, stats, scale, grad = host_loss(
        host, model_pred, ref_pred, target, weights=weights, **kwargs
    )
    assert loss == pytest.approx(float(expected.loss), rel=2e-5, abs=1e-6)
    for index, name in enumerate(reference.STAT_NAMES):
        assert stats[index] == pytest.approx(float(expected.stats[name]), rel=2e-5, abs=1e-6), name
    gap_mean = ((model_pred[:batch_pairs] - ref_pred[:batch_pairs]) ** 2).mean()
    assert stats[8] == pytest.approx(float(gap_mean), rel=1e-5)
    np.testing.assert_allclose(scale, float(expected.stats["lambda"]), rtol=2e-5)
    assert (scale < 1).all(), "the inputs must exercise the safeguard"
    assert (grad.double() - expected_grad).abs().max() / expected_grad.abs().max() < 2e-5


def test_header_constants_match_the_reference():
    text = HEADER.read_text()

    def constant(name: str) -> float:
        match = re.search(rf"constexpr \w+ {name} = ([0-9.e+-]+)f?;", text)
        assert match, name
        return float(match.group(1))

    assert constant("kSafeguardEpsilon") == reference.SAFEGUARD_EPSILON
    assert constant("kDspoSdxlGapThreshold") == reference.DSPO_SDXL_GAP_THRESHOLD
    assert constant("kNumStats") == len(reference.STAT_NAMES) + 1 == cuda_backend.NUM_STATS
    methods = dict(re.findall(r"k(\w+) = (\d)", text.split("enum Method")[1].split("};")[0]))
    assert {name.lower(): int(code) for name, code in methods.items()} == {
        "diffusiondpo": 0,
        "dspo": 1,
        "dspo" + "sdxl": 2,
        "dmpo": 3,
    }
    assert cuda_backend.METHOD_CODES == {"diffusion-dpo": 0, "dspo": 1, "dspo-sdxl": 2, "dmpo": 3}


def test_cuda_library_builds_and_exports_its_abi(build_dir):
    library = build_dir / cuda_backend.LIBRARY_NAME
    if not library.is_file():
        if shutil.which("nvcc") is None:
            pytest.skip("nvcc is not installed: only the host library was built")
        pytest.fail(f"nvcc is installed but CMake did not build {library}")
    symbols = subprocess.run(
        ["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True
    ).stdout
    exported = {line.split()[-1] for line in symbols.splitlines() if " T " in line}
    assert ABI_SYMBOLS <= exported
    assert not any("pair_sums_kernel" in name for name in exported)  # hidden visibility
    elf = subprocess.run(
        ["strings", str(library)], capture_output=True, text=True, check=True
    ).stdout
    assert "sm_80" in elf and "sm_90" in elf


def test_clear_errors(monkeypatch, tmp_path):
    model_pred, ref_pred, target = make_inputs(2, (4,), dtype=torch.float32)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match='backend="cuda": the inputs are on cpu'):
            sdpo.preference_loss(model_pred, ref_pred, target, backend="cuda")
    monkeypatch.setenv("SDPO_CUDA_LIBRARY", str(tmp_path / "missing.so"))
    monkeypatch.setattr(cuda_backend, "_LIBRARIES", {})
    with pytest.raises(RuntimeError, match=r"missing\.so is not built; run `cmake -S \. -B build"):
        cuda_backend.cuda_library()
    assert not cuda_backend.cuda_available(torch.device("cpu"))


def test_fullgraph_compile_traces_the_library_check(build_dir, monkeypatch):
    # The first call of a process may be a compiled one, before anything loaded the library:
    # require_cuda's library check must still trace without a graph break, and a missing library
    # must still raise the build hint. (The GPU test compiles after eager calls, when it is
    # loaded; require_cuda's device check cannot pass on this machine, hence require_library.)
    path = build_dir / cuda_backend.LIBRARY_NAME
    if not path.is_file():
        pytest.skip("nvcc is not installed: only the host library was built")

    def step(x: torch.Tensor) -> torch.Tensor:
        assert cuda_backend.require_library()
        return x + 1

    for library, loads in ((path, True), (path.parent / "missing.so", False)):
        monkeypatch.setenv("SDPO_CUDA_LIBRARY", str(library))
        monkeypatch.setattr(cuda_backend, "_LIBRARIES", {})
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, backend="eager")
        if loads:
            assert compiled(torch.ones(2)).tolist() == [2.0, 2.0]
            assert cuda_backend.LIBRARY_NAME in cuda_backend._LIBRARIES
        else:
            with pytest.raises(RuntimeError, match=r"missing\.so is not built; run `cmake -S \."):
                compiled(torch.ones(2))
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"pred_dtype": 3}, "dtype: expected 0 (fp32), 1 (bf16) or 2 (fp16)"),
        ({"ref_dtype": -1}, "dtype: expected 0 (fp32), 1 (bf16) or 2 (fp16)"),
        ({"target_dtype": 3}, "dtype: expected 0 (fp32), 1 (bf16) or 2 (fp16)"),
        ({"batch_pairs": 0}, "batch_pairs: expected 1 to 32767 pairs"),
        ({"batch_pairs": 32768}, "batch_pairs: expected 1 to 32767 pairs"),  # 2B rows > 65535
        ({"elements": 0}, "elements: expected >= 1"),
        ({"method": 4}, "method: expected 0 to 3"),
        ({"chunk_elements": 4, "num_chunks": 2}, "chunks: expected 1 to 512 chunks covering"),
        ({"num_chunks": 513}, "chunks: expected 1 to 512 chunks covering"),
        ({"chunk_elements": 12}, "chunk_elements: expected a multiple of 8"),
        ({"group_size": -1}, "group_size: expected >= 0"),
    ],
)
def test_library_errors_become_exceptions(build_dir, monkeypatch, arguments, message):
    # The C ABI checks its arguments on the host before any launch, so this path of the real
    # CUDA library (status code, per-thread message, Python exception) runs without a GPU.
    # Every case here is rejected before a launch: the null pointers are never read.
    path = build_dir / cuda_backend.LIBRARY_NAME
    if not path.is_file():
        pytest.skip("nvcc is not installed: only the host library was built")
    monkeypatch.setenv("SDPO_CUDA_LIBRARY", str(path))
    monkeypatch.setattr(cuda_backend, "_LIBRARIES", {})
    library = cuda_backend.cuda_library()
    assert library.sdpo_cuda_abi_version() == cuda_backend.ABI_VERSION
    # partials (B, chunks, 8) + pair sums (B, 8) + per-pair outputs (B, 8)
    assert library.sdpo_cuda_workspace_floats(3, 5) == 3 * 5 * 8 + 3 * 8 + 3 * 8
    forward = {"pred_dtype": 0, "ref_dtype": 1, "target_dtype": 2, "batch_pairs": 2}
    forward |= {"elements": 10, "chunk_elements": 16, "num_chunks": 1, "method": 0}
    forward |= {"group_size": 0} | arguments
    dtypes = (forward["pred_dtype"], forward["ref_dtype"], forward["target_dtype"])
    status = library.sdpo_cuda_forward(
        *dtypes, None, None, None, 1, None, forward["batch_pairs"], forward["elements"],
        forward["chunk_elements"], forward["num_chunks"], forward["method"], 1.0, 0.0, 0,
        forward["group_size"], 0.0, 0.0, None, None, None, None, None, None,
    )  # fmt: skip
    assert status == 1  # SDPO_CUDA_BAD_ARGUMENT
    expected = re.escape(f'backend="cuda": the forward kernels failed ({message}')
    with pytest.raises(RuntimeError, match=expected):
        cuda_backend._check(status, "the forward kernels")
    gradient_checks = {"pred_dtype", "ref_dtype", "target_dtype", "batch_pairs", "elements"}
    if set(arguments) <= gradient_checks:  # the gradient's own checks
        status = library.sdpo_cuda_gradient(
            *dtypes, None, None, None, None, 1, 0, forward["batch_pairs"], forward["elements"],
            None, None, None,
        )  # fmt: skip
        assert status == 1
        expected = re.escape(f'backend="cuda": the gradient kernel failed ({message}')
        with pytest.raises(RuntimeError, match=expected):
            cuda_backend._check(status, "the gradient kernel")


def test_vector_path_condition(build_dir, monkeypatch):
    # The real library's host-side choice of the 16-byte path: every pointer 16-byte aligned
    # and a row of every input a multiple of 16 bytes (8 bf16/fp16 or 4 fp32 elements).
    path = build_dir / cuda_backend.LIBRARY_NAME
    if not path.is_file():
        pytest.skip("nvcc is not installed: only the host library was built")
    monkeypatch.setenv("SDPO_CUDA_LIBRARY", str(path))
    monkeypatch.setattr(cuda_backend, "_LIBRARIES", {})
    library = cuda_backend.cuda_library()
    aligned, off = 1 << 20, (1 << 20) + 8
    fp32, bf16, fp16 = 0, 1, 2
    assert library.sdpo_cuda_vector_loads(bf16, bf16, fp32, aligned, aligned, aligned, 16)
    assert library.sdpo_cuda_vector_loads(fp32, fp32, fp32, aligned, aligned, aligned, 12)
    assert not library.sdpo_cuda_vector_loads(bf16, bf16, fp32, aligned, aligned, aligned, 12)
    assert not library.sdpo_cuda_vector_loads(fp16, fp16, fp16, aligned, aligned, aligned, 9)
    assert not library.sdpo_cuda_vector_loads(fp32, fp32, fp32, aligned, aligned, off, 16)
    assert not library.sdpo_cuda_vector_loads(bf16, bf16, fp32, off, aligned, aligned, 16)
    assert not library.sdpo_cuda_vector_loads(bf16, bf16, fp32, aligned, off, aligned, 16)


# GPU ---------------------------------------------------------------------------------------


def _gpu_pair(
    method, mu, granularity, dtype, shared_target=True, weights=None, seed=0, batch_pairs=5,
    sample_shape=(4, 16, 16),
):  # fmt: skip
    model_pred, ref_pred, target = make_inputs(
        batch_pairs, sample_shape, dtype=torch.float32, shared_target=shared_target,
        ref_offset=0.5, seed=seed,
    )  # fmt: skip
    device = torch.device("cuda")
    inputs = [tensor.to(device, dtype) for tensor in (model_pred, ref_pred, target)]
    results = {}
    for backend in ("torch", "cuda"):
        pred = inputs[0].clone().requires_grad_(True)
        result = sdpo.preference_loss(
            pred, inputs[1], inputs[2], method=method, beta=beta_for(method), mu=mu,
            granularity=granularity, pair_weights=weights, backend=backend,
        )  # fmt: skip
        result.loss.backward()
        results[backend] = (result, pred.grad)
    return results


def _assert_cuda_matches_torch(results, method, dtype):
    (expected, expected_grad), (actual, grad) = results["torch"], results["cuda"]
    torch.testing.assert_close(actual.loss, expected.loss, rtol=2e-5, atol=1e-6)
    assert set(actual.stats) == set(expected.stats)
    for name in expected.stats:
        # u = -(beta/2)((L_w - L_l) - (R_w - R_l)) multiplies the fp32 rounding of four means
        # (summed in another order than torch's) by beta/2, and the mean margin can sit near 0
        # where rtol gives nothing. On the CPU, three fp32 summation orders of these inputs (the
        # host build, the torch backend, torch on permuted elements; 20 seeds, every method and
        # dtype) differ by up to 4.7x atol=1e-6, and by 0.27x atol=1e-6*beta.
        atol = 1e-6 * beta_for(method) if name == "margin" else 1e-6
        torch.testing.assert_close(actual.stats[name], expected.stats[name], rtol=2e-5, atol=atol)
    assert grad.dtype == dtype
    error = (grad.float() - expected_grad.float()).abs().max() / expected_grad.float().abs().max()
    # Both backends compute in fp32 from the same inputs; the gradient is rounded to `dtype`
    # (bf16 and fp16: at most one ulp apart, 2^-7 and 2^-10 relative). fp32: the host build's
    # sequential sums and torch differ by 2.7e-5 on the (5, 37, 41) inputs below.
    assert error < {torch.float32: 5e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]


def _require_gpu_library():
    if not cuda_backend.cuda_available(torch.device("cuda")):
        pytest.fail(f"build the library first: {cuda_backend.BUILD_COMMAND}")


@pytest.mark.gpu
@pytest.mark.core
@pytest.mark.parametrize("method", sdpo.METHODS)
@pytest.mark.parametrize("mu", [None, 0.6])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_matches_torch(method, mu, granularity, dtype):
    _require_gpu_library()
    _assert_cuda_matches_torch(_gpu_pair(method, mu, granularity, dtype), method, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("batch_pairs", "sample_shape"),
    [
        # Chunks of 2048 as cuda_backend.plan_chunks gives them; odd sizes take the scalar path.
        (1, (97,)),  # one pair; one chunk and one gradient block, both mostly idle threads
        (3, (3, 17, 19)),  # 969 elements: one partial chunk, a partial gradient block
        (5, (5, 37, 41)),  # 7585 elements: 4 chunks (the last 1441), 4 gradient blocks
        (2, (4, 61, 64)),  # 15616 = 8 x 1952: the 16-byte path, 8 chunks (the last 1280)
        (3, (4, 9, 61)),  # 2196: fp32 on the 16-byte path with a 4-element tail; bf16 scalar
        (600, (2, 3, 5)),  # more pairs than a finalize tile (512) and its 512 threads
    ],
)
@pytest.mark.parametrize("method", sdpo.METHODS)
@pytest.mark.parametrize("granularity", ["batch", "group:7"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_odd_shapes_match_torch(batch_pairs, sample_shape, method, granularity, dtype):
    # (4, 16, 16) above is 1024 elements: one chunk, half a gradient block, the 16-byte path.
    # (One element per sample was tried and dropped: u saturates near 12 and fp32's
    # 1 - sigmoid(u) alone differs by 0.5% from fp64 there.)
    _require_gpu_library()
    results = _gpu_pair(
        method, 0.6, granularity, dtype, shared_target=batch_pairs % 2 == 1,
        batch_pairs=batch_pairs, sample_shape=sample_shape,
    )  # fmt: skip
    _assert_cuda_matches_torch(results, method, dtype)


@pytest.mark.gpu
@pytest.mark.core
def test_gpu_layouts_weights_compile_and_graph_capture(monkeypatch):
    _require_gpu_library()
    weights = torch.tensor([0.0, 0.5, 1.0, 2.0, 1.5], device="cuda")
    results = _gpu_pair("dmpo", 0.9, "group:2", torch.float32, shared_target=False, weights=weights)
    (expected, expected_grad), (actual, grad) = results["torch"], results["cuda"]
    torch.testing.assert_close(actual.loss, expected.loss, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=2e-4, atol=1e-7)

    model_pred, ref_pred, target = (
        tensor.cuda() for tensor in make_inputs(4, (4, 8, 8), dtype=torch.float32)
    )

    def loss_and_grad(pred):
        pred = pred.detach().requires_grad_(True)
        loss = sdpo.preference_loss(pred, ref_pred, target, mu=0.9, backend="cuda").loss
        loss.backward()
        return loss.detach(), pred.grad

    _, eager_grad = loss_and_grad(model_pred)
    # Compile as a process whose first call is compiled would: the library not loaded yet.
    monkeypatch.setattr(cuda_backend, "_LIBRARIES", {})
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda pred, ref, tgt: sdpo.preference_loss(pred, ref, tgt, mu=0.9, backend="cuda").loss,
        fullgraph=True,
    )
    pred = model_pred.detach().requires_grad_(True)
    compiled(pred, ref_pred, target).backward()
    torch.testing.assert_close(pred.grad, eager_grad)

    static_pred = model_pred.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        loss_and_grad(static_pred)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_loss, graph_grad = loss_and_grad(static_pred)
    static_pred.copy_(model_pred * 1.01)
    graph.replay()
    replay_loss, replay_grad = loss_and_grad(model_pred * 1.01)
    torch.testing.assert_close(graph_loss, replay_loss)
    torch.testing.assert_close(graph_grad, replay_grad)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.bfloat16, torch.bfloat16, torch.float32),  # the trainer under bf16 autocast
        (torch.float16, torch.float16, torch.float32),
        (torch.bfloat16, torch.float32, torch.float16),
    ],
)
def test_gpu_mixed_dtypes_and_misaligned_views(dtypes):
    # Each input read in its own dtype (no fp32 copies); the same values in views one element
    # off 16-byte alignment take the scalar path and give the same bits (same summation order).
    _require_gpu_library()
    model_pred, ref_pred, target = (
        tensor.to("cuda", dtype)
        for tensor, dtype in zip(
            make_inputs(3, (4, 16, 64), ref_offset=0.5, shared_target=False), dtypes, strict=True
        )
    )

    def misaligned(tensor):
        storage = torch.empty(tensor.numel() + 1, dtype=tensor.dtype, device=tensor.device)
        view = storage[1:].view(tensor.shape)
        view.copy_(tensor)
        assert view.data_ptr() % 16 != 0
        return view

    library = cuda_backend.cuda_library()
    codes = [cuda_backend.DTYPE_CODES[dtype] for dtype in dtypes]
    inputs = (model_pred, ref_pred, target)
    elements = model_pred[0].numel()
    assert library.sdpo_cuda_vector_loads(*codes, *(t.data_ptr() for t in inputs), elements)
    runs = []
    for pred, ref, tgt in (inputs, tuple(misaligned(t) for t in inputs)):
        kwargs = dict(method="dspo", beta=beta_for("dspo"), mu=0.6, granularity="pair")
        results = {}
        for backend in ("torch", "cuda"):
            leaf = pred.detach().requires_grad_(True)  # the same storage: still misaligned
            result = sdpo.preference_loss(leaf, ref, tgt, backend=backend, **kwargs)
            result.loss.backward()
            results[backend] = (result, leaf.grad)
        _assert_cuda_matches_torch(results, "dspo", dtypes[0])
        runs.append(results["cuda"])
    (aligned, aligned_grad), (shifted, shifted_grad) = runs
    assert torch.equal(aligned.loss, shifted.loss)
    assert torch.equal(aligned_grad, shifted_grad)
    for name in aligned.stats:
        assert torch.equal(aligned.stats[name], shifted.stats[name]), name
