"""backend="triton" (fused kernels) against backend="torch" (the reference).

On the CPU these run under Triton's interpreter (TRITON_INTERPRET=1, as CI sets it); sizes are
kept small because every Triton program is a Python loop there. GPU-only tests are marked.
"""

from __future__ import annotations

import pytest
import torch
from formulas import beta_for, make_inputs

import sdpo
from sdpo import chunking, ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not ops.triton_available(DEVICE),
    reason="needs CUDA or TRITON_INTERPRET=1 with triton installed",
)
GRANULARITIES = ("batch", "pair", "group:2", "group:3")


def run_both(model_pred, ref_pred, target, grad_scale=1.0, **kwargs):
    """Loss, stats and d loss/d model_pred from both backends (inputs are not modified)."""
    results = {}
    for backend in ("torch", "triton"):
        pred = model_pred.detach().clone().requires_grad_(True)
        result = sdpo.preference_loss(pred, ref_pred, target, backend=backend, **kwargs)
        (grad_scale * result.loss).backward()
        results[backend] = (result.loss, result.stats, pred.grad)
    return results["torch"], results["triton"]


def assert_match(expected, actual, rtol=2e-5, atol=1e-6, grad_rtol=2e-5):
    loss, stats, grad = expected
    fused_loss, fused_stats, fused_grad = actual
    torch.testing.assert_close(fused_loss, loss, rtol=rtol, atol=atol)
    assert set(fused_stats) == set(stats)
    for key in stats:
        torch.testing.assert_close(fused_stats[key], stats[key], rtol=rtol, atol=atol, msg=key)
    assert fused_grad.dtype == grad.dtype and fused_grad.shape == grad.shape
    scale = grad.float().abs().max().clamp_min(1e-30)
    error = (fused_grad.float() - grad.float()).abs().max() / scale
    assert error < grad_rtol, f"max grad error {error:.3g} relative to max |grad|"


@pytest.mark.parametrize("method", sdpo.METHODS)
@pytest.mark.parametrize("mu", [None, 0.0, 0.6])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_matches_torch_every_method_and_granularity(method, mu, granularity):
    # B = 5: group:2 and group:3 leave a short last group. D = 60, far below a block of 1024.
    model_pred, ref_pred, target = make_inputs(5, (3, 4, 5), dtype=torch.float32, ref_offset=0.5)
    expected, actual = run_both(
        model_pred.to(DEVICE),
        ref_pred.to(DEVICE),
        target.to(DEVICE),
        method=method,
        beta=beta_for(method),
        mu=mu,
        granularity=granularity,
        dmpo_alpha=0.01,
    )
    assert_match(expected, actual)
    if mu is not None and mu > 0:
        assert (actual[1]["lambda"] < 1).all(), "inputs must make the safeguard act"


@pytest.mark.parametrize("method", sdpo.METHODS)
def test_per_row_targets_and_pair_weights(method):
    model_pred, ref_pred, target = make_inputs(
        4, (2, 7, 3), dtype=torch.float32, shared_target=False
    )
    weights = torch.tensor([0.0, 1.0, 2.5, 0.5], device=DEVICE)
    expected, actual = run_both(
        model_pred.to(DEVICE),
        ref_pred.to(DEVICE),
        target.to(DEVICE),
        method=method,
        beta=beta_for(method),
        mu=0.5,
        granularity="pair",
        dmpo_alpha=0.05,
        pair_weights=weights,
    )
    assert_match(expected, actual)
    # A zero weight silences its pair entirely.
    assert torch.count_nonzero(actual[2][[0, 4]]) == 0


@pytest.mark.parametrize("method", sdpo.METHODS)
def test_single_pair(method):
    model_pred, ref_pred, target = make_inputs(1, (4, 3, 3), dtype=torch.float32, ref_offset=0.5)
    for mu in (None, 0.3):
        expected, actual = run_both(
            model_pred.to(DEVICE),
            ref_pred.to(DEVICE),
            target.to(DEVICE),
            method=method,
            beta=beta_for(method),
            mu=mu,
            dmpo_alpha=0.01,
        )
        assert_match(expected, actual)


def test_dspo_sdxl_switch_both_sides():
    for ref_offset in (0.1, 0.5):  # winners' mean gap^2 ~ 0.01 (below 0.1) and ~ 0.25
        model_pred, ref_pred, target = make_inputs(
            3, (2, 5, 5), dtype=torch.float32, ref_offset=ref_offset
        )
        expected, actual = run_both(
            model_pred.to(DEVICE),
            ref_pred.to(DEVICE),
            target.to(DEVICE),
            method="dspo-sdxl",
            beta=20.0,
            mu=0.5,
        )
        assert_match(expected, actual)


def test_several_chunks_and_odd_sizes(monkeypatch):
    # D = 2 * 1024 + 37 split into 3 chunks of 1024 (the GPU plan, forced on the CPU), and a
    # gradient pass whose last block is partial.
    from sdpo.kernels import preference

    monkeypatch.setattr(
        preference, "plan_chunks", lambda pairs, elements: (1024, -(-elements // 1024))
    )
    # Cached launch plans were made with the real plan_chunks: an empty cache for this test.
    monkeypatch.setattr(preference, "_PLANS", {})
    model_pred, ref_pred, target = make_inputs(3, (2085,), dtype=torch.float32, ref_offset=0.5)
    for method in sdpo.METHODS:
        expected, actual = run_both(
            model_pred.to(DEVICE),
            ref_pred.to(DEVICE),
            target.to(DEVICE),
            method=method,
            beta=beta_for(method) / 20,
            mu=0.5,
            granularity="group:2",
            dmpo_alpha=0.01,
        )
        assert_match(expected, actual)


def test_many_pairs_group_of_eight():
    # B = 37: the finalize kernel's pair block is 64 wide; group:8 leaves a group of 5.
    model_pred, ref_pred, target = make_inputs(37, (2, 3, 3), dtype=torch.float32)
    expected, actual = run_both(
        model_pred.to(DEVICE),
        ref_pred.to(DEVICE),
        target.to(DEVICE),
        beta=50.0,
        mu=0.9,
        granularity="group:8",
    )
    assert_match(expected, actual)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", sdpo.METHODS)
def test_low_precision_inputs_against_fp64(dtype, method):
    # Both backends read the same rounded inputs and do the math in fp32: judge each against an
    # fp64 evaluation of those rounded inputs; the gradient is stored in the input dtype.
    model_pred, ref_pred, target = make_inputs(4, (3, 6, 6), dtype=torch.float32, ref_offset=0.5)
    low = [tensor.to(dtype).to(DEVICE) for tensor in (model_pred, ref_pred, target)]
    kwargs = dict(method=method, beta=beta_for(method), mu=0.6, dmpo_alpha=0.01)
    exact_pred = low[0].double().requires_grad_(True)
    exact = sdpo.preference_loss(
        exact_pred, low[1].double(), low[2].double(), backend="torch", **kwargs
    )
    exact.loss.backward()
    pred = low[0].detach().clone().requires_grad_(True)
    fused = sdpo.preference_loss(pred, low[1], low[2], backend="triton", **kwargs)
    fused.loss.backward()
    assert fused.loss.dtype == torch.float32 and pred.grad.dtype == dtype
    torch.testing.assert_close(fused.loss.double(), exact.loss, rtol=1e-5, atol=1e-7)
    # Storing the gradient rounds it once: bf16 keeps 8 bits (2^-8 relative), fp16 11 bits.
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    error = (pred.grad.double() - exact_pred.grad).abs() / exact_pred.grad.abs().max()
    assert error.max() < 2 * unit


def test_non_contiguous_and_expanded_inputs():
    base_pred, base_ref, base_target = make_inputs(3, (4, 6, 10), dtype=torch.float32)
    model_pred = base_pred.to(DEVICE)[..., ::2]  # strided view
    ref_pred = base_ref.to(DEVICE).transpose(2, 3).contiguous().transpose(2, 3)[..., ::2]
    target = base_target.to(DEVICE)[:, :, :, :1].expand(3, 4, 6, 5)  # stride-0 last dimension
    assert not model_pred.is_contiguous() and not target.is_contiguous()
    for method in sdpo.METHODS:
        expected, actual = run_both(
            model_pred,
            ref_pred,
            target,
            method=method,
            beta=beta_for(method),
            mu=0.4,
            dmpo_alpha=0.01,
        )
        assert_match(expected, actual)


def test_grad_output_scale_and_sum_backward():
    model_pred, ref_pred, target = (
        t.to(DEVICE) for t in make_inputs(2, (3, 4), dtype=torch.float32)
    )
    expected, actual = run_both(model_pred, ref_pred, target, grad_scale=-2.5, beta=50.0, mu=0.5)
    assert_match(expected, actual)
    # `.sum().backward()` hands the op an expanded grad_output.
    pred = model_pred.clone().requires_grad_(True)
    sdpo.preference_loss(pred, ref_pred, target, beta=50.0, backend="triton").loss.sum().backward()
    reference_pred = model_pred.clone().requires_grad_(True)
    sdpo.preference_loss(
        reference_pred, ref_pred, target, beta=50.0, backend="torch"
    ).loss.backward()
    torch.testing.assert_close(pred.grad, reference_pred.grad, rtol=2e-5, atol=1e-9)


def test_inputs_are_not_modified_and_grad_is_a_new_buffer():
    model_pred, ref_pred, target = (
        t.to(DEVICE) for t in make_inputs(2, (3, 4), dtype=torch.float32)
    )
    copies = [t.clone() for t in (model_pred, ref_pred, target)]
    pred = model_pred.clone().requires_grad_(True)
    sdpo.preference_loss(
        pred, ref_pred, target, beta=50.0, mu=0.5, backend="triton"
    ).loss.backward()
    for original, copy in zip((pred.detach(), ref_pred, target), copies, strict=True):
        assert torch.equal(original, copy)
    assert pred.grad.data_ptr() not in (pred.data_ptr(), ref_pred.data_ptr(), target.data_ptr())


def test_loss_can_be_modified_in_place():
    # `loss /= accumulation_steps` works on every backend's loss: the fused eager loss is not a
    # view made inside the autograd Function (autograd refuses in-place changes to those).
    model_pred, ref_pred, target = (
        t.to(DEVICE) for t in make_inputs(2, (3, 4), dtype=torch.float32)
    )
    grads = {}
    for backend in ("torch", "triton"):
        pred = model_pred.clone().requires_grad_(True)
        loss = sdpo.preference_loss(pred, ref_pred, target, beta=50.0, mu=0.5, backend=backend).loss
        loss /= 4.0
        loss.backward()
        grads[backend] = pred.grad
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=2e-5, atol=1e-9)


def test_opcheck():
    model_pred, ref_pred, target = (
        t.to(DEVICE) for t in make_inputs(2, (3, 4), dtype=torch.float32)
    )
    model_pred.requires_grad_(True)
    weights = torch.tensor([1.0, 0.5], device=DEVICE)
    for method_code in range(4):
        torch.library.opcheck(
            torch.ops.sdpo.fused_preference_forward.default,
            (model_pred, ref_pred, target, weights, method_code, 20.0, 0.5, True, 1, 0.01),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )
    coefficients = torch.randn(2, 4, device=DEVICE)
    torch.library.opcheck(
        torch.ops.sdpo.fused_preference_backward.default,
        (
            torch.tensor(1.0, device=DEVICE),
            model_pred.detach(),
            ref_pred,
            target,
            coefficients,
            True,
        ),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("method", sdpo.METHODS)
def test_fullgraph_compile(method):
    torch._dynamo.reset()
    model_pred, ref_pred, target = (
        t.to(DEVICE) for t in make_inputs(3, (2, 4, 4), dtype=torch.float32)
    )
    kwargs = dict(
        method=method,
        beta=beta_for(method),
        mu=0.6,
        granularity="group:2",
        dmpo_alpha=0.01,
        backend="triton",
    )
    compiled = torch.compile(sdpo.preference_loss, fullgraph=True, backend="aot_eager")
    pred = model_pred.clone().requires_grad_(True)
    traced = compiled(pred, ref_pred, target, **kwargs)
    traced.loss.backward()
    eager_pred = model_pred.clone().requires_grad_(True)
    eager = sdpo.preference_loss(eager_pred, ref_pred, target, **kwargs)
    eager.loss.backward()
    torch.testing.assert_close(traced.loss, eager.loss)
    torch.testing.assert_close(pred.grad, eager_pred.grad)
    for key in eager.stats:
        torch.testing.assert_close(traced.stats[key], eager.stats[key], msg=key)


@pytest.mark.gpu
@pytest.mark.core
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_video_size_on_gpu(dtype):
    # Wan2.1-sized latents: 2 pairs of 16 x 21 x 60 x 104 (8.4M elements across the 4 rows).
    generator = torch.Generator(device="cuda").manual_seed(0)
    shape = (4, 16, 21, 60, 104)
    target = torch.randn((2, *shape[1:]), device="cuda", generator=generator)
    model_pred = (
        torch.cat([target, target]) + 0.3 * torch.randn(shape, device="cuda", generator=generator)
    ).to(dtype)
    ref_pred = (
        model_pred.float() + 0.01 * torch.randn(shape, device="cuda", generator=generator)
    ).to(dtype)
    expected, actual = run_both(model_pred, ref_pred, target.to(dtype), beta=5000.0, mu=0.9)
    assert_match(
        expected, actual, rtol=1e-4, atol=1e-5, grad_rtol=2e-2 if dtype == torch.bfloat16 else 1e-4
    )


@pytest.mark.gpu
@pytest.mark.core
def test_cuda_graph_captures_forward_and_backward():
    model_pred, ref_pred, target = (
        t.cuda() for t in make_inputs(8, (4, 64, 64), dtype=torch.bfloat16)
    )
    static_pred = model_pred.clone().requires_grad_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up compiles the kernels outside the capture
        for _ in range(2):
            static_pred.grad = None
            sdpo.preference_loss(
                static_pred, ref_pred, target, mu=0.9, backend="triton"
            ).loss.backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    static_pred.grad = None
    with torch.cuda.graph(graph):
        result = sdpo.preference_loss(static_pred, ref_pred, target, mu=0.9, backend="triton")
        result.loss.backward()
    new_pred = model_pred + 0.01
    static_pred.data.copy_(new_pred)
    graph.replay()
    reference_pred = new_pred.clone().requires_grad_(True)
    expected = sdpo.preference_loss(reference_pred, ref_pred, target, mu=0.9, backend="torch")
    expected.loss.backward()
    torch.testing.assert_close(result.loss, expected.loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        static_pred.grad.float(), reference_pred.grad.float(), rtol=2e-2, atol=1e-6
    )


class _FakeDeviceProperties:
    def __init__(self, sms: int) -> None:
        self.multi_processor_count = sms


@pytest.mark.parametrize(
    ("batch_pairs", "elements"),
    [(1, 97), (2, 16 * 21 * 60 * 104), (8, 4 * 64 * 64), (37, 18), (700, 4 * 128 * 128)],
)
def test_chunk_plan_depends_on_shapes_only(monkeypatch, batch_pairs, elements):
    # A run resumed on another GPU model must reduce in the same order: the plans of both fused
    # backends must not change with the SM count (A100 108, H100 132, a small part 16).
    from sdpo import cuda_backend
    from sdpo.kernels import preference

    plans = set()
    for sms in (16, 108, 132):
        monkeypatch.setattr(
            torch.cuda, "get_device_properties", lambda *_, sms=sms: _FakeDeviceProperties(sms)
        )
        plans.add(
            (
                preference.plan_chunks(batch_pairs, elements),
                cuda_backend.plan_chunks(batch_pairs, elements),
            )
        )
    assert len(plans) == 1
    (chunk_elements, num_chunks), (cuda_chunk_elements, cuda_num_chunks) = plans.pop()
    # Whole power-of-two runs of blocks that cover the elements, at most 512 / B' chunks per
    # pair (B' = B rounded up to a power of two): the finalize kernel's one-tile read.
    blocks_per_chunk = chunk_elements // preference.SUMS_BLOCK
    assert blocks_per_chunk * preference.SUMS_BLOCK == chunk_elements
    assert blocks_per_chunk & (blocks_per_chunk - 1) == 0
    assert (num_chunks - 1) * chunk_elements < elements <= num_chunks * chunk_elements
    pairs_pow2 = preference.next_power_of_2(batch_pairs)
    assert num_chunks <= max(1, chunking.SUMS_PROGRAMS // pairs_pow2)
    assert (cuda_num_chunks - 1) * cuda_chunk_elements < elements
    assert elements <= cuda_num_chunks * cuda_chunk_elements
    assert cuda_num_chunks <= max(1, chunking.SUMS_PROGRAMS // pairs_pow2)
    if batch_pairs == 2:  # the video size still fills an H100: 2 x 256 programs of 8K elements
        assert (chunk_elements, num_chunks) == (8192, 256)


def test_results_bit_identical_across_simulated_sm_counts(monkeypatch):
    # B = 2, D = 6 * 1024 + 5: seven chunks per pair on the interpreter, whatever the SM count.
    model_pred, ref_pred, target = make_inputs(2, (6 * 1024 + 5,), dtype=torch.float32)
    runs = []
    for sms in (16, 132):
        monkeypatch.setattr(
            torch.cuda, "get_device_properties", lambda *_, sms=sms: _FakeDeviceProperties(sms)
        )
        pred = model_pred.to(DEVICE).detach().clone().requires_grad_(True)
        result = sdpo.preference_loss(
            pred, ref_pred.to(DEVICE), target.to(DEVICE), backend="triton", method="dspo",
            beta=beta_for("dspo"), mu=0.5, granularity="pair",
        )  # fmt: skip
        result.loss.backward()
        runs.append(
            (result.loss.detach(), {k: v.detach() for k, v in result.stats.items()}, pred.grad)
        )
    (loss_a, stats_a, grad_a), (loss_b, stats_b, grad_b) = runs
    assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)
    assert all(torch.equal(stats_a[key], stats_b[key]) for key in stats_a)
    # And the several-chunk result is the reference's to fp32 rounding.
    expected, _ = run_both(
        model_pred.to(DEVICE), ref_pred.to(DEVICE), target.to(DEVICE), method="dspo",
        beta=beta_for("dspo"), mu=0.5, granularity="pair",
    )  # fmt: skip
    assert_match(expected, runs[0])
