"""The benchmarks' restatement of the reference trainer computes what preference_loss does."""

from __future__ import annotations

import pytest
import torch
from formulas import make_inputs

import sdpo
from sdpo.profiling.reference_sequence import reference_trainer_dpo_loss


@pytest.mark.parametrize("mu", [None, 0.9, 0.3])
def test_reference_sequence_matches_preference_loss(mu):
    model_pred, ref_pred, target = make_inputs(4, (4, 8, 8), dtype=torch.float32)
    pred = model_pred.clone().requires_grad_(True)
    loss, scale = reference_trainer_dpo_loss(pred, ref_pred, target, beta=50.0, mu=mu)
    loss.backward()
    ours_pred = model_pred.clone().requires_grad_(True)
    ours = sdpo.preference_loss(ours_pred, ref_pred, target, beta=50.0, mu=mu, backend="torch")
    ours.loss.backward()
    torch.testing.assert_close(loss, ours.loss)
    torch.testing.assert_close(pred.grad, ours_pred.grad)
    assert scale == pytest.approx(float(ours.stats["lambda"]), rel=1e-5)
    if mu is not None:
        assert scale < 1
