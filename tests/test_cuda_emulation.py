"""The CUDA kernels of kernels/cuda/sdpo_preference.cu executed on the CPU.

The .cu file is compiled as C++ (g++ -std=c++20) against the small emulation headers in
tests/cuda_emulation/ (blocks run one after another, each CUDA thread of a block is a
std::thread, __syncthreads() a std::barrier, __shared__ one static copy per kernel, 16-byte
vector accesses counted and faulting when misaligned, as on a GPU); the only rewrite of the
source is `kernel<<<grid, block, shared, stream>>>(args)` into a call of the emulated launch.
The library then runs through its real C ABI (sdpo_cuda_forward / sdpo_cuda_gradient) with
host pointers, and is compared with backend="torch" for every method, granularity, target
layout and dtype combination on small odd shapes; both load paths (16-byte vectors with a
scalar tail, and the scalar fallback for misaligned views and odd sizes), the finalize
tree's order over the chunks and its reductions over the pairs (strided lanes, one per thread,
then a fixed tree) are checked bit for bit, and so is the independence of every result from
the order of the blocks and from the timing of a block's threads (jittered by the emulation).
"""

from __future__ import annotations

import ctypes
import itertools
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from formulas import (
    beta_for,
    independent_accuracy,
    independent_loss,
    make_inputs,
    switch_case_table,
)

import sdpo
from sdpo import cuda_backend, ops, reference
from sdpo.settings import LossSettings

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "kernels" / "cuda" / "sdpo_preference.cu"
MATH_HEADER = SOURCE.parent / "sdpo_preference_math.h"
SHIM = Path(__file__).resolve().parent / "cuda_emulation"
LAUNCH = re.compile(r"(\w+(?:<[^<>;]*>)?)<<<([^;]*?)>>>\((.*?)\);", re.DOTALL)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
    handle.cuda_emulation_vector_loads.restype = ctypes.c_long
    handle.cuda_emulation_vector_stores.restype = ctypes.c_long
    handle.cuda_emulation_shuffle_blocks.argtypes = [ctypes.c_uint]
    handle.cuda_emulation_jitter_threads.argtypes = [ctypes.c_uint]
    return handle


def cast(inputs, dtypes) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(dtype) for t, dtype in zip(inputs, dtypes, strict=True))


def codes(*tensors: torch.Tensor) -> list[int]:
    return [cuda_backend.DTYPE_CODES[tensor.dtype] for tensor in tensors]


def forward_call(library, model_pred, ref_pred, target, *, method, beta, mu, granularity,
                 weights, chunk_elements, workspace=None):  # fmt: skip
    """sdpo_cuda_forward's arguments for these inputs, the workspace (new when None) and the
    outputs (loss, stats, lambda, coefficients) they point into: keep all three alive."""
    group_size = sdpo.parse_granularity(granularity)
    batch_pairs, elements = model_pred.shape[0] // 2, model_pred[0].numel()
    num_chunks = -(-elements // chunk_elements)
    if workspace is None:
        workspace = torch.zeros(library.sdpo_cuda_workspace_floats(batch_pairs, num_chunks))
    loss = torch.zeros(())
    stats = torch.zeros(cuda_backend.NUM_STATS)
    scale = torch.zeros(batch_pairs)
    coefficients = torch.zeros(2, 2 * batch_pairs)
    log_q, log_one_minus_q = reference.dmpo_log_q(0.01)
    dtype_codes = codes(model_pred, ref_pred, target)
    arguments = (
        *dtype_codes, model_pred.data_ptr(), ref_pred.data_ptr(), target.data_ptr(),
        int(target.shape[0] == batch_pairs),
        None if weights is None else weights.data_ptr(),
        batch_pairs, elements, chunk_elements, num_chunks,
        cuda_backend.METHOD_CODES[method], beta, 0.0 if mu is None else mu, int(mu is not None),
        0 if group_size is None else group_size, log_q, log_one_minus_q,
        workspace.data_ptr(), loss.data_ptr(), stats.data_ptr(), scale.data_ptr(),
        coefficients.data_ptr(), None,
    )  # fmt: skip
    return arguments, workspace, (loss, stats, scale, coefficients)


def emulated_loss(library, model_pred, ref_pred, target, *, method, beta, mu, granularity,
                  weights, chunk_elements, workspace=None, split_phases=False):  # fmt: skip
    """Loss, stats, lambda and d loss / d model_pred from the emulated CUDA library."""
    arguments, workspace, (loss, stats, scale, coefficients) = forward_call(
        library, model_pred, ref_pred, target, method=method, beta=beta, mu=mu,
        granularity=granularity, weights=weights, chunk_elements=chunk_elements,
        workspace=workspace,
    )  # fmt: skip
    batch_pairs, elements = model_pred.shape[0] // 2, model_pred[0].numel()
    dtype_codes = codes(model_pred, ref_pred, target)
    if split_phases:  # the benchmarks' way: the sums kernel, then the finalize kernel alone
        for phase in (1, 2):
            status = library.sdpo_cuda_forward_phases(phase, *arguments)
            assert status == 0, library.sdpo_cuda_last_error()
    else:
        status = library.sdpo_cuda_forward(*arguments)
        assert status == 0, library.sdpo_cuda_last_error()
    grad = torch.empty_like(model_pred)
    grad_output = torch.ones(1)
    status = library.sdpo_cuda_gradient(
        *dtype_codes, grad_output.data_ptr(), model_pred.data_ptr(), ref_pred.data_ptr(),
        target.data_ptr(), int(target.shape[0] == batch_pairs),
        int(method in ("dspo", "dspo-sdxl")), batch_pairs, elements, coefficients.data_ptr(),
        grad.data_ptr(), None,
    )  # fmt: skip
    assert status == 0, library.sdpo_cuda_last_error()
    return loss, stats, scale, grad


def misaligned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """The same values in a contiguous view one element past a 16-byte aligned start."""
    storage = torch.empty(tensor.numel() + 1, dtype=tensor.dtype)
    assert storage.data_ptr() % 16 == 0
    view = storage[1:].view(tensor.shape)
    view.copy_(tensor)
    assert view.data_ptr() % 16 != 0 and view.is_contiguous()
    return view


def assert_matches_torch(outputs, model_pred, ref_pred, target, weights, **kwargs):
    loss, stats, scale, grad = outputs
    pred = model_pred.detach().clone().requires_grad_(True)
    expected = sdpo.preference_loss(
        pred, ref_pred, target, backend="torch", dmpo_alpha=0.01, pair_weights=weights, **kwargs
    )
    expected.loss.backward()
    batch_pairs = model_pred.shape[0] // 2
    torch.testing.assert_close(loss, expected.loss.detach(), rtol=2e-5, atol=1e-6)
    for index, name in enumerate(reference.STAT_NAMES):
        atol = 1e-6 * kwargs["beta"] if name == "margin" else 1e-6
        torch.testing.assert_close(stats[index], expected.stats[name], rtol=2e-5, atol=atol)
    expected_scale = expected.stats["lambda"].float().expand(batch_pairs)
    torch.testing.assert_close(scale, expected_scale, rtol=2e-5, atol=1e-6)
    assert grad.dtype == model_pred.dtype
    # The kernel writes the gradient in the prediction's dtype: compare within its rounding.
    reference_grad = pred.grad.float()
    error = (grad.float() - reference_grad).abs().max() / reference_grad.abs().max()
    assert error < (2e-5 if model_pred.dtype == torch.float32 else 8e-3)
    return scale


@pytest.mark.parametrize("method", sdpo.METHODS)
@pytest.mark.parametrize(
    ("granularity", "shared_target", "weighted", "dtypes"),
    [
        ("batch", True, False, (torch.float32,) * 3),
        ("pair", False, True, (torch.float32,) * 3),
        ("group:2", True, True, (torch.bfloat16, torch.bfloat16, torch.float32)),
        ("group:2", False, False, (torch.float16, torch.float16, torch.float16)),
        ("batch", False, True, (torch.bfloat16, torch.float32, torch.float16)),
    ],
)
def test_emulated_cuda_kernels_match_torch(
    emulated, method, granularity, shared_target, weighted, dtypes
):
    # B = 3 (group:2 leaves a short last group), D = 3 * 7 * 31 = 651 (odd: the scalar path) in
    # chunks of 304: three chunks per pair, the last partial and ending inside a group of 8.
    model_pred, ref_pred, target = cast(
        make_inputs(3, (3, 7, 31), shared_target=shared_target, ref_offset=0.5), dtypes
    )
    weights = torch.tensor([0.5, 0.0, 2.0]) if weighted else None
    kwargs = dict(method=method, beta=beta_for(method), mu=0.6, granularity=granularity)
    outputs = emulated_loss(
        emulated, model_pred, ref_pred, target, weights=weights, chunk_elements=304, **kwargs
    )
    scale = assert_matches_torch(outputs, model_pred, ref_pred, target, weights, **kwargs)
    assert (scale < 1).any(), "the inputs must exercise the safeguard"


SWITCH_CASES = switch_case_table()


@pytest.mark.parametrize("case", SWITCH_CASES, ids=[name for name, _, _ in SWITCH_CASES])
def test_emulated_kernels_where_the_branches_switch(emulated, case):
    # The case table every backend runs (tests/test_backends_against_formulas.py): lambda = 1
    # for anti-correlated pairs, ties and u = 0 (accuracy one half), DSPO-SDXL's switch per
    # group. D = 42 in chunks of 16: three chunks, the last partial.
    _, (model_pred, ref_pred, target), kwargs = case
    kwargs = dict(kwargs)
    kwargs.pop("dmpo_alpha", None)  # the emulated call takes the tests' fixed 0.01
    inputs = tuple(t.float() for t in (model_pred, ref_pred, target))
    loss, stats, scale, grad = emulated_loss(
        emulated, *inputs, weights=None, chunk_elements=16, **kwargs
    )
    group_size = sdpo.parse_granularity(kwargs["granularity"])
    pred = model_pred.clone().requires_grad_(True)
    expected_loss, expected_lambda = independent_loss(
        pred, ref_pred, target, group_size=group_size, dmpo_alpha=0.01,
        **{key: value for key, value in kwargs.items() if key != "granularity"},
    )  # fmt: skip
    expected_loss.backward()
    torch.testing.assert_close(scale.double(), expected_lambda, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss.double(), expected_loss.detach(), rtol=2e-5, atol=1e-7)
    error = (grad.double() - pred.grad).abs().max() / pred.grad.abs().max()
    assert error < 2e-5
    accuracy = stats[reference.STAT_NAMES.index("implicit_acc")]
    assert float(accuracy) == pytest.approx(
        float(independent_accuracy(*inputs, kwargs["beta"])), abs=1e-6
    )


@pytest.mark.parametrize(
    "dtypes",
    list(itertools.product(DTYPES, repeat=3)),
    ids=lambda dtypes: "-".join(str(dtype).removeprefix("torch.") for dtype in dtypes),
)
def test_every_dtype_combination_matches_torch(emulated, dtypes):
    # Each input in its own dtype, all 27 combinations (the trainer's are fp32, or bf16 / fp16
    # predictions with an fp32 or same-dtype target), on the vector path (D = 64) with DSPO,
    # whose gradient also reads ref_pred.
    model_pred, ref_pred, target = cast(make_inputs(2, (4, 16), ref_offset=0.5), dtypes)
    kwargs = dict(method="dspo", beta=beta_for("dspo"), mu=0.6, granularity="pair")
    emulated.cuda_emulation_vector_loads()  # reset
    outputs = emulated_loss(
        emulated, model_pred, ref_pred, target, weights=None, chunk_elements=64, **kwargs
    )
    assert emulated.cuda_emulation_vector_loads() > 0
    assert_matches_torch(outputs, model_pred, ref_pred, target, None, **kwargs)


def vector_count(dtype: torch.dtype) -> int:
    """16-byte accesses per group of 8 elements: one for 16-bit values, two for fp32."""
    return 2 if dtype == torch.float32 else 1


@pytest.mark.parametrize(
    ("dtypes", "sample_shape", "method"),
    [
        # 4 x 9 x 61 = 2196 = 8 * 274 + 4: fp32 rows are whole 16-byte lines (the vector path)
        # whose last group is 4 elements (the scalar tail); chunks of 1024 cut rows at groups.
        ((torch.float32,) * 3, (4, 9, 61), "dspo"),
        ((torch.bfloat16, torch.bfloat16, torch.float32), (8, 5, 55), "diffusion-dpo"),
        ((torch.float16, torch.bfloat16, torch.float32), (8, 5, 55), "dspo-sdxl"),
        ((torch.bfloat16,) * 3, (8, 5, 55), "dmpo"),
    ],
)
def test_vector_path_tail_and_scalar_fallback_agree_bitwise(emulated, dtypes, sample_shape, method):
    batch_pairs, chunk_elements = 2, 1024
    model_pred, ref_pred, target = cast(
        make_inputs(batch_pairs, sample_shape, shared_target=False, ref_offset=0.5), dtypes
    )
    elements = model_pred[0].numel()
    kwargs = dict(method=method, beta=beta_for(method), mu=0.6, granularity="pair")
    inputs = (model_pred, ref_pred, target)
    assert emulated.sdpo_cuda_vector_loads(
        *codes(*inputs), *(t.data_ptr() for t in inputs), elements
    )
    emulated.cuda_emulation_vector_loads(), emulated.cuda_emulation_vector_stores()  # reset
    vector = emulated_loss(emulated, *inputs, weights=None, chunk_elements=chunk_elements, **kwargs)
    # Every whole group of 8 is read with 16-byte loads: 6 rows per pair in the sums kernel;
    # in the gradient, the prediction and the target of each row, and the reference of the
    # winners with the gap term (DSPO, DSPO-SDXL); the gradient is stored the same way.
    groups = elements // 8
    with_gap = method in ("dspo", "dspo-sdxl")
    pred_n, ref_n, target_n = (vector_count(dtype) for dtype in dtypes)
    sums_loads = batch_pairs * groups * 2 * (pred_n + ref_n + target_n)
    gradient_loads = 2 * batch_pairs * groups * (pred_n + target_n) + with_gap * (
        batch_pairs * groups * ref_n
    )
    assert emulated.cuda_emulation_vector_loads() == sums_loads + gradient_loads
    assert emulated.cuda_emulation_vector_stores() == 2 * batch_pairs * groups * pred_n
    assert_matches_torch(vector, *inputs, None, **kwargs)

    # The same values one element off alignment, one input at a time and all at once: the
    # scalar fallback, no vector access (a misaligned one would fault), the same bits.
    for moved in ((0,), (1,), (2,), (0, 1, 2)):
        shifted = tuple(misaligned_copy(t) if i in moved else t for i, t in enumerate(inputs))
        pointers = (t.data_ptr() for t in shifted)
        assert not emulated.sdpo_cuda_vector_loads(*codes(*shifted), *pointers, elements)
        scalar = emulated_loss(
            emulated, *shifted, weights=None, chunk_elements=chunk_elements, **kwargs
        )
        loads = emulated.cuda_emulation_vector_loads()
        if moved == (1,) and not with_gap:
            # The gradient does not read ref_pred without the gap term: it stays vectorized.
            assert loads == gradient_loads
        else:
            assert loads == 0
        emulated.cuda_emulation_vector_stores()
        for expected, actual in zip(vector, scalar, strict=True):
            assert torch.equal(expected, actual), moved


def test_results_do_not_depend_on_block_order_or_split_launches(emulated):
    # A GPU runs blocks in no fixed order: the partials and every output must not depend on it.
    # The last run launches the sums and the finalize kernels one call each (the benchmarks').
    model_pred, ref_pred, target = (
        t.to(torch.bfloat16) for t in make_inputs(3, (8, 5, 55), ref_offset=0.5)
    )
    kwargs = dict(method="dspo", beta=beta_for("dspo"), mu=0.6, granularity="group:2")
    runs = []
    for seed in (0, 7, 12345):
        emulated.cuda_emulation_shuffle_blocks(seed)
        try:
            outputs = emulated_loss(
                emulated, model_pred, ref_pred, target, weights=None, chunk_elements=512, **kwargs
            )
            runs.append(outputs)
        finally:
            emulated.cuda_emulation_shuffle_blocks(0)
    runs.append(
        emulated_loss(
            emulated, model_pred, ref_pred, target, weights=None, chunk_elements=512,
            split_phases=True, **kwargs,
        )
    )  # fmt: skip
    nothing = (None,) * 6  # rejected before a launch: never read
    bad = (0, 0, 0, 0, None, None, None, 1, None, 1, 8, 8, 1, 0, 1.0, 0.0, 0, 0, 0.0, 0.0)
    assert emulated.sdpo_cuda_forward_phases(*bad, *nothing) == 1
    assert "phases: expected 1 (sums), 2 (finalize) or 3 (both)" in str(
        emulated.sdpo_cuda_last_error()
    )
    for run in runs[1:]:
        for expected, actual in zip(runs[0], run, strict=True):
            assert torch.equal(expected, actual)


def finalize_tree(partials: np.ndarray) -> np.ndarray:
    """The finalize kernel's documented order, in fp32: the chunks in slots of the next power
    of two, zero-padded, then a halving tree (slot c += slot c + width, width = slots / 2 ...
    1): a function of the chunk count alone."""
    pairs, chunks, sums = partials.shape
    slots = 1 << (chunks - 1).bit_length()
    tile = np.zeros((pairs, slots, sums), np.float32)
    tile[:, :chunks] = partials
    width = slots // 2
    while width > 0:
        tile[:, :width] += tile[:, width : 2 * width]  # fp32 + fp32 stays fp32 in numpy
        width //= 2
    return tile[:, 0]


@pytest.mark.parametrize(
    ("batch_pairs", "sample_shape", "chunk_elements"),
    [
        (3, (8, 5, 55), 512),  # 5 chunks: 8 slots, three of them zero
        # 33 chunks: 64 slots, so a tile of 4096 floats holds 8 pairs: two tiles, 8 + 1 pairs
        (9, (264,), 8),
    ],
)
def test_finalize_reduces_partials_in_a_fixed_tree(
    emulated, batch_pairs, sample_shape, chunk_elements
):
    model_pred, ref_pred, target = make_inputs(batch_pairs, sample_shape, dtype=torch.float32)
    elements = model_pred[0].numel()
    num_chunks = -(-elements // chunk_elements)
    workspace = torch.zeros(emulated.sdpo_cuda_workspace_floats(batch_pairs, num_chunks))
    kwargs = dict(method="dspo", beta=beta_for("dspo"), mu=0.6, granularity="batch")
    outputs = emulated_loss(
        emulated, model_pred, ref_pred, target, weights=None, chunk_elements=chunk_elements,
        workspace=workspace, **kwargs,
    )  # fmt: skip
    split = batch_pairs * num_chunks * 8
    partials = workspace[:split].numpy().reshape(batch_pairs, num_chunks, 8)
    pair_sums = workspace[split : split + batch_pairs * 8].numpy().reshape(batch_pairs, 8)
    np.testing.assert_array_equal(pair_sums, finalize_tree(partials))
    # The sums themselves are those of the inputs (fp64 sums, fp32 tolerance).
    error_w = (model_pred[:batch_pairs] - target[:batch_pairs]).double().reshape(batch_pairs, -1)
    np.testing.assert_allclose(pair_sums[:, 0], (error_w**2).sum(1).numpy(), rtol=1e-5)
    assert_matches_torch(outputs, model_pred, ref_pred, target, None, **kwargs)


def test_the_plan_fits_one_finalize_tile():
    # cuda_backend.plan_chunks' chunk counts keep the partials of B <= 512 pairs in one tile
    # of 4096 floats (pairs x next power of two of the chunks x 8), chunks whole groups of 8.
    for batch_pairs, elements in itertools.product(
        (1, 2, 3, 8, 64, 300, 512, 513), (1, 7, 2048, 2049, 16384, 2096640, 1 << 26)
    ):
        chunk_elements, num_chunks = cuda_backend.plan_chunks(batch_pairs, elements)
        assert chunk_elements % cuda_backend.VECTOR_ELEMENTS == 0
        assert (num_chunks - 1) * chunk_elements < elements <= num_chunks * chunk_elements
        slots = 1 << (num_chunks - 1).bit_length()
        assert num_chunks <= 512  # the library's limit (one tile slot per chunk)
        if batch_pairs <= 512:
            assert batch_pairs * slots * 8 <= 4096, (batch_pairs, elements)
        else:
            assert num_chunks == 1


def finalize_lanes() -> int:
    """sdpo::kFinalizeLanes, the finalize kernel's threads, read out of the math header."""
    match = re.search(r"constexpr int kFinalizeLanes = (\d+);", MATH_HEADER.read_text())
    assert match, "kFinalizeLanes"
    return int(match.group(1))


def lane_tree(values: np.ndarray) -> np.ndarray:
    """The finalize kernel's documented order of a reduction over pairs (the rows of
    ``values``), in fp32: lane l of kFinalizeLanes adds rows l, l + lanes, l + 2 lanes ... in
    order, then a halving tree over the lanes (lane l += lane l + width, width = lanes / 2 ...
    1): a function of the pair count alone."""
    lanes = finalize_lanes()
    sums = np.zeros((lanes, *values.shape[1:]), np.float32)
    for start in range(0, values.shape[0], lanes):
        rows = values[start : start + lanes]
        sums[: len(rows)] += rows  # fp32 + fp32 stays fp32 in numpy
    width = lanes // 2
    while width > 0:
        sums[:width] += sums[width : 2 * width]
        width //= 2
    return sums[0]


def test_finalize_lanes_are_its_threads():
    # The lane count is the block size, a compile-time constant (never the SM count).
    assert finalize_lanes() == 512
    assert "constexpr int kFinalizeThreads = sdpo::kFinalizeLanes;" in SOURCE.read_text()


# B = 1; one pair short of a pair per thread (511), one each (512), one over (513: lane 0 adds
# two); 3 x 512 + 5: three rounds of the lanes and a partial fourth.
FINALIZE_BATCHES = (1, 511, 512, 513, 3 * 512 + 5)


@pytest.mark.parametrize("batch_pairs", FINALIZE_BATCHES)
def test_finalize_reduces_pairs_in_lanes_then_a_fixed_tree(emulated, batch_pairs):
    # The finalize kernel's reductions over the pairs run on all its threads: the batch totals
    # (lambda under batch granularity; the DSPO-SDXL gap mean) and the loss and statistics.
    # Every output against backend="torch"; the reductions bit for bit against their documented
    # order (lane_tree), from the pair sums and per-pair outputs the kernel left in its
    # workspace. D = 8: one chunk and one group of 8 per sample (the sums kernel is not the
    # subject here, and the emulation starts a thread per CUDA thread).
    model_pred, ref_pred, target = make_inputs(
        batch_pairs, (8,), dtype=torch.float32, ref_offset=0.5, seed=batch_pairs
    )
    weights = torch.rand(batch_pairs, generator=torch.Generator().manual_seed(1)) + 0.5
    kwargs = dict(method="dspo-sdxl", beta=beta_for("dspo-sdxl"), mu=0.6, granularity="batch")
    workspace = torch.zeros(emulated.sdpo_cuda_workspace_floats(batch_pairs, 1))
    outputs = emulated_loss(
        emulated, model_pred, ref_pred, target, weights=weights, chunk_elements=8,
        workspace=workspace, **kwargs,
    )  # fmt: skip
    scale = assert_matches_torch(outputs, model_pred, ref_pred, target, weights, **kwargs)
    assert (scale < 1).all(), "the inputs must exercise the safeguard"
    loss, stats = outputs[0], outputs[1]

    # workspace: partials (B, 1 chunk, 8), pair sums (B, 8), per-pair outputs (B, 8)
    pair_sums = workspace[8 * batch_pairs : 16 * batch_pairs].numpy().reshape(batch_pairs, 8)
    per_pair = workspace[16 * batch_pairs :].numpy().reshape(batch_pairs, 8)
    elements, pairs = np.float32(8), np.float32(batch_pairs)
    ww, wl, gap_sum = lane_tree(pair_sums[:, [0, 2, 6]] / np.array([1, 1, elements], np.float32))
    assert stats[8].item() == gap_sum / pairs  # the DSPO-SDXL gap mean
    # lambda = clip((1 - mu) S_ww / (S_wl + eps)) from the totals (fp32, up to contraction)
    group_elements = pairs * elements
    epsilon = np.float32(reference.SAFEGUARD_EPSILON) * group_elements * group_elements / 4
    lam = np.clip(np.float32(1 - 0.6) * ww / (wl + epsilon), 0, 1)
    np.testing.assert_allclose(scale.numpy(), np.full(batch_pairs, lam), rtol=1e-6, atol=0)
    sums = lane_tree(per_pair)
    assert loss.item() == sums[0]
    means = np.array([*sums[1:7], sums[3] - sums[5], sums[4] - sums[6]], np.float32) / pairs
    np.testing.assert_array_equal(stats[:8].numpy(), means)


def test_finalize_does_not_depend_on_thread_timing(emulated):
    # The finalize kernel's threads share its tile (partials, then the lanes' sums): with every
    # thread waiting a pseudo-random 0-63 us after each barrier (another seed, another order of
    # the shared-memory reads and writes), every output and the workspace keep their bits.
    # Only the finalize kernel runs, on random positive partials (B = 3 x 512 + 5, one chunk);
    # the NaN-filled outputs must all be written again.
    batch_pairs = FINALIZE_BATCHES[-1]
    model_pred, ref_pred, target = make_inputs(batch_pairs, (8,), dtype=torch.float32)
    kwargs = dict(method="dspo-sdxl", beta=beta_for("dspo-sdxl"), mu=0.6, granularity="batch")
    arguments, workspace, outputs = forward_call(
        emulated, model_pred, ref_pred, target, weights=None, chunk_elements=8, **kwargs
    )
    partials = torch.rand(batch_pairs, 8, generator=torch.Generator().manual_seed(0)) * 8
    partials[:, 7] = 0  # the padding sum
    runs = []
    for seed in (0, 1, 2):
        workspace.fill_(float("nan"))
        workspace[: 8 * batch_pairs] = partials.reshape(-1)
        for output in outputs:
            output.fill_(float("nan"))
        emulated.cuda_emulation_jitter_threads(seed)
        try:
            status = emulated.sdpo_cuda_forward_phases(2, *arguments)
        finally:
            emulated.cuda_emulation_jitter_threads(0)
        assert status == 0, emulated.sdpo_cuda_last_error()
        runs.append([tensor.clone() for tensor in (*outputs, workspace)])
    assert not any(tensor.isnan().any() for tensor in runs[0])
    for run in runs[1:]:
        for expected, actual in zip(runs[0], run, strict=True):
            assert torch.equal(expected, actual)


@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float32,) * 3,
        (torch.bfloat16, torch.bfloat16, torch.float32),  # autocast predictions, fp32 target
        (torch.float16, torch.float16, torch.float32),
        (torch.bfloat16,) * 3,
        (torch.float64,) * 3,  # read as fp32
    ],
)
def test_eager_autograd_path_and_compiled_op(emulated, monkeypatch, dtypes):
    # backend="cuda"'s Python side with the emulated library in place of libsdpo_cuda.so:
    # each input goes to the kernels in its own dtype (no fp32 copies), and eager calls take the
    # same eager autograd path as backend="triton" (not the custom-op dispatcher), while
    # torch.compile traces the custom ops; both give the same bits.
    monkeypatch.setitem(cuda_backend._LIBRARIES, cuda_backend.LIBRARY_NAME, emulated)
    model_pred, ref_pred, target = cast(make_inputs(2, (8, 5, 55), ref_offset=0.5), dtypes)
    settings = LossSettings(method="dspo", beta=beta_for("dspo"), mu=0.6, group_size=1)
    weights = torch.tensor([0.5, 2.0])
    seen = []
    original = cuda_backend.cuda_forward

    def spy(*arguments):
        seen.append(tuple(t.dtype for t in arguments[:3]))
        return original(*arguments)

    # The eager twin (cuda_forward_eager) looks cuda_forward up at call time: the spy sees it.
    monkeypatch.setattr(cuda_backend, "cuda_forward", spy)
    assert ops._EAGER_IMPLEMENTATIONS[cuda_backend.cuda_preference_forward] == (
        cuda_backend.cuda_forward_eager,
        cuda_backend.cuda_backward_eager,
    )
    pred = model_pred.clone().requires_grad_(True)
    loss, stats = cuda_backend.preference_loss_cuda(pred, ref_pred, target, settings, weights)
    assert type(loss.grad_fn).__name__ == "_EagerFusedBackward"
    loss.backward()
    read = tuple(torch.float32 if d == torch.float64 else d for d in dtypes)
    assert seen == [read]
    assert pred.grad.dtype == model_pred.dtype
    kwargs = dict(method="dspo", beta=beta_for("dspo"), mu=0.6, granularity="pair")
    reference_pred = model_pred.detach().clone().requires_grad_(True)
    expected = sdpo.preference_loss(
        reference_pred, ref_pred, target, backend="torch", pair_weights=weights, **kwargs
    )
    expected.loss.backward()
    torch.testing.assert_close(loss.detach(), expected.loss.detach().float(), rtol=2e-5, atol=1e-6)
    for name in reference.STAT_NAMES:
        atol = 1e-6 * kwargs["beta"] if name == "margin" else 1e-6
        torch.testing.assert_close(stats[name], expected.stats[name].float(), rtol=2e-5, atol=atol)
    reference_grad = reference_pred.grad.double()
    error = (pred.grad.double() - reference_grad).abs().max() / reference_grad.abs().max()
    assert error < (2e-5 if read[0] == torch.float32 else 8e-3)

    torch._dynamo.reset()
    compiled = torch.compile(
        lambda p: cuda_backend.preference_loss_cuda(p, ref_pred, target, settings, weights)[0],
        fullgraph=True,
        backend="eager",
    )
    compiled_pred = model_pred.clone().requires_grad_(True)
    compiled_loss = compiled(compiled_pred)
    assert type(compiled_loss.grad_fn).__name__ != "_EagerFusedBackward"
    compiled_loss.backward()
    torch._dynamo.reset()
    assert torch.equal(compiled_loss.detach(), loss.detach())
    assert torch.equal(compiled_pred.grad, pred.grad)


def test_benchmark_phase_launches(emulated, monkeypatch):
    # The benchmarks time the CUDA twin's sums, finalize and gradient kernels one at a time
    # (kernel_bench.fused_phase_steps(..., "cuda")); here with the emulated library: each phase
    # runs, and the split forward writes the same bits as the one-call forward.
    from sdpo.profiling import kernel_bench

    monkeypatch.setitem(cuda_backend._LIBRARIES, cuda_backend.LIBRARY_NAME, emulated)
    batch_pairs, sample_shape = kernel_bench.SMOKE_SIZES["smoke"]
    cpu = torch.device("cpu")
    phases = kernel_bench.fused_phase_steps(batch_pairs, sample_shape, torch.bfloat16, cpu, "cuda")
    assert set(phases) == {"sums", "finalize", "gradient"}
    for run in phases.values():
        run()
    inputs = kernel_bench.make_input_sets(batch_pairs, sample_shape, torch.bfloat16, cpu, 1)[0]
    op_arguments = (reference.METHOD_CODES["diffusion-dpo"], 5000.0, 0.9, True, 0, 0.0)
    (sums, finalize), split = cuda_backend.forward_launches(*inputs, None, op_arguments)
    sums()
    finalize()
    whole = cuda_backend.cuda_forward(*inputs, None, op_arguments)
    for expected, actual in zip(whole, split, strict=True):
        assert torch.equal(expected, actual)
