"""Every CPU-runnable backend against the independent fp64 formulas in formulas.py.

Backends: "torch" (the reference, fed fp32), "triton" (the fused kernels under
TRITON_INTERPRET=1; skipped without it) and "host" (libsdpo_cuda_host.so, the CUDA kernels' math
on the host). Two places where one constant or one decision changes the result:

- DSPO-SDXL's gap switch is decided per lambda group (the reference trainer decides it per
  micro-batch), checked with groups on both sides of the threshold.
- The safeguard's epsilon: at S_wl near 1e-9 N^2/4 the epsilon term moves lambda by a factor of
  about two, so an epsilon off by 1000x in any one backend fails these tests.
"""

from __future__ import annotations

import ctypes

import pytest
import torch
from formulas import (
    dspo_sdxl_split_inputs,
    independent_accuracy,
    independent_loss,
    micro_batch_average_dspo_sdxl,
    switch_case_table,
)
from host_build import cmake_build_dir, host_loss

import sdpo
from sdpo import cuda_backend, ops, reference

BACKENDS = ("torch", "triton", "host")


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> ctypes.CDLL:
    return cuda_backend.host_library(
        cmake_build_dir(tmp_path_factory) / cuda_backend.HOST_LIBRARY_NAME
    )


def run_backend(request, backend, model_pred, ref_pred, target, with_accuracy=False, **kwargs):
    """(loss, lambda (B,), d loss / d model_pred) in fp64 from fp32 inputs, and the implicit
    accuracy after them when ``with_accuracy``."""
    inputs = [t.float() for t in (model_pred, ref_pred, target)]
    batch_pairs = model_pred.shape[0] // 2
    if backend == "host":
        kwargs.pop("dmpo_alpha", None)  # host_loss takes the tests' fixed 0.01
        loss, stats, scale, grad = host_loss(request.getfixturevalue("host"), *inputs, **kwargs)
        outputs = torch.tensor(loss).double(), torch.from_numpy(scale).double(), grad.double()
        accuracy = float(stats[reference.STAT_NAMES.index("implicit_acc")])
        return (*outputs, accuracy) if with_accuracy else outputs
    if backend == "triton" and not ops.triton_available(torch.device("cpu")):
        pytest.skip("the Triton backend needs TRITON_INTERPRET=1 on the CPU")
    pred = inputs[0].clone().requires_grad_(True)
    result = sdpo.preference_loss(pred, inputs[1], inputs[2], backend=backend, **kwargs)
    result.loss.backward()
    scale = result.stats["lambda"].reshape(-1).expand(batch_pairs)
    outputs = result.loss.detach().double(), scale.double(), pred.grad.double()
    accuracy = float(result.stats["implicit_acc"])
    return (*outputs, accuracy) if with_accuracy else outputs


# Where the branches switch: one case table for every backend ------------------------------------

SWITCH_CASES = switch_case_table()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SWITCH_CASES, ids=[name for name, _, _ in SWITCH_CASES])
def test_every_backend_where_the_branches_switch(request, backend, case):
    # Anti-correlated pairs (S_wl <= 0: lambda = 1), ties and policy = reference (u = 0: the
    # accuracy counts one half, as the official trainer counts it), DSPO-SDXL groups on both
    # sides of its switch with a short last group.
    name, (model_pred, ref_pred, target), kwargs = case
    group_size = sdpo.parse_granularity(kwargs["granularity"])
    independent = {key: value for key, value in kwargs.items() if key != "granularity"}
    expected_loss, expected_lambda, expected_grad = expected_independent(
        model_pred, ref_pred, target, group_size, **independent
    )
    if name.startswith("anti-correlated"):
        assert (expected_lambda == 1).any(), "the case must reach the lambda = 1 branch"
    loss, scale, grad, accuracy = run_backend(
        request, backend, model_pred, ref_pred, target, with_accuracy=True, **kwargs
    )
    torch.testing.assert_close(scale, expected_lambda, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, expected_loss, rtol=2e-5, atol=1e-7)
    assert_close_grad(grad, expected_grad, 2e-5)
    assert accuracy == pytest.approx(
        float(independent_accuracy(model_pred.float(), ref_pred.float(), target.float(),
                                   kwargs["beta"])), abs=1e-6
    )  # fmt: skip


def expected_independent(model_pred, ref_pred, target, group_size, **kwargs):
    pred = model_pred.detach().clone().requires_grad_(True)
    loss, lambdas = independent_loss(pred, ref_pred, target, group_size=group_size, **kwargs)
    loss.backward()
    return loss.detach(), lambdas, pred.grad


def assert_close_grad(grad, expected, rtol):
    error = (grad - expected).abs().max() / expected.abs().max()
    assert error < rtol, f"max grad error {error:.3g} relative to max |grad|"


# DSPO-SDXL: one switch per group ---------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mu", [None, 0.6])
def test_dspo_sdxl_switch_per_group_is_the_reference_micro_batch_average(request, backend, mu):
    # B = 16 pairs in two groups of 8: group 0's winners have mean gap^2 ~ 0.01 (below 0.1),
    # group 1's ~ 0.25. The reference, run as two micro-batches of 8 whose losses are averaged,
    # uses mean(s^2) for the first and mean((s pred2)^2) for the second.
    model_pred, ref_pred, target = dspo_sdxl_split_inputs(8, 2, (2, 5, 5))
    gaps = (model_pred - ref_pred)[:16].pow(2).mean(dim=(1, 2, 3))
    assert gaps[:8].mean() < 0.1 <= gaps[8:].mean()
    pred = model_pred.clone().requires_grad_(True)
    expected = micro_batch_average_dspo_sdxl(
        pred, ref_pred, target, beta=20.0, mu=mu, micro_batch_pairs=8
    )
    expected.backward()
    loss, _, grad = run_backend(
        request, backend, model_pred, ref_pred, target,
        method="dspo-sdxl", beta=20.0, mu=mu, granularity="group:8",
    )  # fmt: skip
    torch.testing.assert_close(loss, expected.detach(), rtol=2e-5, atol=1e-7)
    assert_close_grad(grad, pred.grad, 2e-5)
    # One switch for the whole call would differ by far more than the tolerance here.
    one_switch, _, _ = run_backend(
        request, backend, model_pred, ref_pred, target,
        method="dspo-sdxl", beta=20.0, mu=mu, granularity="batch",
    )  # fmt: skip
    expected = float(expected.detach())
    assert abs(float(one_switch) - expected) > 0.2 * expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", ["group:3", "pair", "batch"])
def test_dspo_sdxl_switch_per_group_with_a_short_last_group(request, backend, granularity):
    # B = 8 in groups of 3 alternating around the threshold (3 + 3 + 2 pairs): the loss is the
    # mean over pairs, each term switched by its own group's mean gap.
    model_pred, ref_pred, target = dspo_sdxl_split_inputs(3, 3, (2, 4, 5))
    model_pred, ref_pred = (
        torch.cat([t[:8], t[9:17]]) for t in (model_pred, ref_pred)
    )  # drop pair 8: the last group has 2 pairs
    target = target[:8]
    group_size = sdpo.parse_granularity(granularity)
    expected_loss, _, expected_grad = expected_independent(
        model_pred, ref_pred, target, group_size, method="dspo-sdxl", beta=20.0, mu=0.6
    )
    loss, _, grad = run_backend(
        request, backend, model_pred, ref_pred, target,
        method="dspo-sdxl", beta=20.0, mu=0.6, granularity=granularity,
    )  # fmt: skip
    torch.testing.assert_close(loss, expected_loss, rtol=2e-5, atol=1e-7)
    assert_close_grad(grad, expected_grad, 2e-5)


# The safeguard's epsilon -----------------------------------------------------------------------

EPSILON_SAMPLE = (4, 64, 64)  # D = 16384: 1e-9 N^2 / 4 = 0.067 per pair, 0.27 for two pairs


def epsilon_inputs(winner_sq: float, winner_loser: float, batch_pairs: int = 2):
    """fp64 inputs whose per-pair sums are exactly S_ww = ``winner_sq`` and S_wl =
    ``winner_loser`` (and S_ll = S_ww), both of the order of the epsilon term."""
    generator = torch.Generator().manual_seed(7)
    elements = torch.Size(EPSILON_SAMPLE).numel()
    rows = []
    for _ in range(batch_pairs):
        basis, _ = torch.linalg.qr(
            torch.randn(elements, 2, generator=generator, dtype=torch.float64)
        )
        first, second = basis[:, 0], basis[:, 1]  # orthonormal
        cosine = winner_loser / winner_sq
        rows.append(
            (
                winner_sq**0.5 * first,
                winner_sq**0.5 * (cosine * first + (1 - cosine**2) ** 0.5 * second),
            )
        )
    error_w = torch.stack([w for w, _ in rows])
    error_l = torch.stack([loser for _, loser in rows])
    target = torch.randn((batch_pairs, elements), generator=generator, dtype=torch.float64)
    model_pred = torch.cat([target + error_w, target + error_l])
    ref_pred = model_pred + 0.01 * torch.randn(
        model_pred.shape, generator=generator, dtype=torch.float64
    )
    shape = (-1, *EPSILON_SAMPLE)
    return model_pred.reshape(shape), ref_pred.reshape(shape), target.reshape(shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", ["pair", "batch"])
def test_safeguard_epsilon_term_in_every_backend(request, backend, granularity):
    # S_ww = 0.1, S_wl = 0.05 per pair, mu = 0.5: without the epsilon term lambda would clip to
    # 1; with it lambda = 0.05 / (0.05 + 0.067) = 0.43 per pair, 0.1 / (0.1 + 0.27) = 0.27 for the
    # batch. An epsilon of 1e-6 would give 0.0007 and 0.0004.
    model_pred, ref_pred, target = epsilon_inputs(0.1, 0.05)
    group_size = sdpo.parse_granularity(granularity)
    expected_loss, expected_lambda, expected_grad = expected_independent(
        model_pred, ref_pred, target, group_size, method="diffusion-dpo", beta=2000.0, mu=0.5
    )
    assert 0.2 < float(expected_lambda.min()) and float(expected_lambda.max()) < 0.5
    loss, scale, grad = run_backend(
        request, backend, model_pred, ref_pred, target,
        method="diffusion-dpo", beta=2000.0, mu=0.5, granularity=granularity,
    )  # fmt: skip
    torch.testing.assert_close(scale, expected_lambda, rtol=1e-4, atol=0)
    torch.testing.assert_close(loss, expected_loss, rtol=2e-5, atol=1e-7)
    # The losers' half of the gradient carries lambda.
    assert_close_grad(grad[2:], expected_grad[2:], 1e-4)
