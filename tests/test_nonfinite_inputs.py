"""A non-finite input anywhere gives a non-finite loss, on every backend; bad shapes are errors.

Without this, an inf in ref_pred makes the margin u infinite and softplus(-u) exactly 0, a
finite loss and gradient, so the trainer's finite check on the loss cannot see it.
"""

from __future__ import annotations

import ctypes

import pytest
import torch
from formulas import beta_for, make_inputs
from host_build import cmake_build_dir, host_loss

import sdpo
from sdpo import cuda_backend, ops, reference
from sdpo.objectives import poison_nonfinite

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["torch"] + (["triton"] if ops.triton_available(DEVICE) else [])
BAD_VALUES = (float("inf"), float("-inf"), float("nan"))


def poisoned_inputs(which: str, value: float, row: int, dtype=torch.float32):
    model_pred, ref_pred, target = make_inputs(3, (2, 4, 4), dtype=dtype, ref_offset=0.3)
    tensors = {"model_pred": model_pred, "ref_pred": ref_pred, "target": target}
    tensors[which] = tensors[which].clone()
    tensors[which][row % tensors[which].shape[0], 1, 2, 3] = value
    return tensors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", sdpo.METHODS)
@pytest.mark.parametrize("which", ["model_pred", "ref_pred", "target"])
@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("row", [0, 4])  # a winner, a loser
def test_nonfinite_input_gives_a_nonfinite_loss(backend, method, which, value, row):
    tensors = {k: v.to(DEVICE) for k, v in poisoned_inputs(which, value, row).items()}
    result = sdpo.preference_loss(
        tensors["model_pred"], tensors["ref_pred"], tensors["target"], method=method,
        beta=beta_for(method), mu=0.5, granularity="pair", dmpo_alpha=0.01, backend=backend,
    )  # fmt: skip
    assert not torch.isfinite(result.loss), (backend, method, which, value, row)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_pair_weight_gives_a_nonfinite_loss(backend):
    model_pred, ref_pred, target = make_inputs(3, (2, 4, 4), dtype=torch.float32)
    weights = torch.tensor([1.0, float("inf"), 1.0])
    result = sdpo.preference_loss(
        model_pred.to(DEVICE), ref_pred.to(DEVICE), target.to(DEVICE), beta=50.0,
        pair_weights=weights.to(DEVICE), backend=backend,
    )  # fmt: skip
    assert not torch.isfinite(result.loss)


def test_finite_inputs_keep_the_loss_bit_for_bit_and_the_gradient():
    model_pred, ref_pred, target = make_inputs(3, (2, 4, 4), dtype=torch.float32)
    pred = model_pred.clone().requires_grad_(True)
    result = sdpo.preference_loss(pred, ref_pred, target, beta=50.0, mu=0.5, backend="torch")
    result.loss.backward()
    settings = sdpo.settings.LossSettings.from_arguments(
        method="diffusion-dpo", beta=50.0, mu=0.5, granularity="batch", dmpo_alpha=0.0
    )
    plain = model_pred.clone().requires_grad_(True)
    loss, _ = reference.preference_loss_reference(plain, ref_pred, target, settings)
    loss.backward()
    assert torch.equal(result.loss, loss) and torch.equal(pred.grad, plain.grad)


def test_cuda_kernel_stats_carry_a_nonfinite_input_into_the_loss(tmp_path_factory):
    """The CUDA backend's math (host build on the CPU): with an inf in ref_pred its own loss is
    finite, its stats are not, so the dispatcher's poison_nonfinite makes the loss NaN."""
    host = cuda_backend.host_library(
        cmake_build_dir(tmp_path_factory) / cuda_backend.HOST_LIBRARY_NAME
    )
    assert isinstance(host, ctypes.CDLL)
    for which in ("model_pred", "ref_pred", "target"):
        tensors = poisoned_inputs(which, float("inf"), 4)
        loss, stats, _, _ = host_loss(
            host, tensors["model_pred"], tensors["ref_pred"], tensors["target"],
            method="diffusion-dpo", beta=50.0, mu=0.5, granularity="batch",
        )  # fmt: skip
        named = {name: torch.tensor(float(stats[i])) for i, name in enumerate(reference.STAT_NAMES)}
        guarded = poison_nonfinite(torch.tensor(float(loss)), named, None)
        assert not torch.isfinite(guarded), which


@pytest.mark.parametrize(
    ("shape", "message"),
    [((4,), "at least one more dimension"), ((4, 0), "at least one element per row"),
     ((2, 3, 0), "at least one element per row")],
)  # fmt: skip
def test_one_dimensional_or_empty_rows_are_value_errors(shape, message):
    tensor = torch.zeros(shape)
    with pytest.raises(ValueError, match=message):
        sdpo.preference_loss(tensor, tensor, tensor, backend="torch")
