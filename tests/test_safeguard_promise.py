"""The safeguard's promise on a model whose output is its parameters (identity Jacobian).

pred_w,i = theta_i + a_i and pred_l,i = theta_i + b_i: winner and loser of a pair share the
parameters theta_i, as two images share a UNet, and the Jacobian of each output with respect to
theta is the identity, so output-space and parameter-space inner products coincide (the paper's
approximation is exact here). One small SGD step on the SDPO loss must not raise the winners'
MSE; the plain method raises it in the same setting. DSPO is left out: its winner term is not
proportional to e_w, so the first-order bound does not cover it (the paper applies it anyway).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sdpo


def correlated_setting(batch_pairs: int, elements: int, loser_scale: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    target = torch.randn(batch_pairs, elements, generator=generator, dtype=torch.float64)
    winner_error = torch.randn(batch_pairs, elements, generator=generator, dtype=torch.float64)
    # The loser's error points the same way and is larger (S_wl > S_ww): plain DPO's push on
    # the loser then drags the shared parameters against the winner.
    loser_error = loser_scale * winner_error + 0.3 * torch.randn(
        batch_pairs, elements, generator=generator, dtype=torch.float64
    )
    winner_offset = target + winner_error
    loser_offset = target + loser_error
    return target, winner_offset, loser_offset


def winner_mse(theta, winner_offset, target) -> torch.Tensor:
    return (theta + winner_offset - target).pow(2).mean()


def sgd_step_winner_mse(method, mu, granularity, learning_rate, *, seed=0, reference_shift=0.0):
    batch_pairs, elements = 4, 64
    target, winner_offset, loser_offset = correlated_setting(batch_pairs, elements, 2.0, seed)
    theta = torch.zeros(batch_pairs, elements, dtype=torch.float64, requires_grad=True)
    model_pred = torch.cat([theta + winner_offset, theta + loser_offset])
    # The reference model equals the policy at the start of training (u = 0), optionally shifted.
    ref_pred = model_pred.detach() + reference_shift
    result = sdpo.preference_loss(
        model_pred,
        ref_pred,
        target,
        method=method,
        beta=20.0,
        mu=mu,
        granularity=granularity,
        dmpo_alpha=0.01,
        backend="torch",
    )
    (grad,) = torch.autograd.grad(result.loss, theta)
    before = winner_mse(theta.detach(), winner_offset, target)
    after = winner_mse(theta.detach() - learning_rate * grad, winner_offset, target)
    return before, after, result


@pytest.mark.parametrize("method", ["diffusion-dpo", "dmpo"])
@pytest.mark.parametrize("granularity", ["batch", "pair", "group:2"])
@pytest.mark.parametrize("mu", [0.05, 0.5, 0.9])
def test_one_sgd_step_does_not_raise_winner_mse(method, granularity, mu):
    before, after, result = sgd_step_winner_mse(method, mu, granularity, learning_rate=1.0)
    assert (result.stats["lambda"] < 1).all(), "the setting must make the safeguard act"
    assert after < before


@pytest.mark.parametrize("method", ["diffusion-dpo", "dmpo"])
def test_plain_method_raises_winner_mse_in_the_same_setting(method):
    before, after, _ = sgd_step_winner_mse(method, None, "batch", learning_rate=1.0)
    assert after > before


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    mu=st.floats(0.0, 1.0),
    loser_scale=st.floats(-3.0, 3.0),
    weights=st.lists(st.floats(0.0, 5.0), min_size=3, max_size=3),
    method=st.sampled_from(["diffusion-dpo", "dmpo"]),
)
def test_first_order_change_of_every_winner_is_bounded(seed, mu, loser_scale, weights, method):
    # Per-pair lambda bounds each pair's first-order change for any non-negative pair weights:
    # d/dt L_w,i(theta - t g) at t=0 <= -mu * c_i * |dL_w,i/dtheta_i|^2 with c_i >= 0, so <= 0.
    batch_pairs, elements = 3, 16
    target, winner_offset, loser_offset = correlated_setting(
        batch_pairs, elements, loser_scale, seed
    )
    theta = torch.zeros(batch_pairs, elements, dtype=torch.float64, requires_grad=True)
    model_pred = torch.cat([theta + winner_offset, theta + loser_offset])
    generator = torch.Generator().manual_seed(seed + 1)
    ref_pred = model_pred.detach() + 0.2 * torch.randn(
        model_pred.shape, generator=generator, dtype=torch.float64
    )
    result = sdpo.preference_loss(
        model_pred,
        ref_pred,
        target,
        method=method,
        beta=20.0,
        mu=mu,
        granularity="pair",
        dmpo_alpha=0.01,
        pair_weights=torch.tensor(weights, dtype=torch.float64),
        backend="torch",
    )
    grad, output_grad = torch.autograd.grad(result.loss, [theta, model_pred])
    winner_error = winner_offset - target  # at theta = 0
    winner_grad = 2 * winner_error / elements  # dL_w,i / dtheta_i
    directional = -(winner_grad * grad).sum(dim=1)  # d/dt L_w,i(theta - t grad) at t = 0
    # The pair's weight c_i (>= 0 for DPO; DMPO's is negative once u passes logit(1 - alpha),
    # where it deliberately shrinks the margin): grad of the winner output = c_i * winner_grad.
    winner_grad_norm_sq = (winner_grad * winner_grad).sum(dim=1)
    pair_weight = (output_grad[:batch_pairs] * winner_grad).sum(dim=1) / winner_grad_norm_sq
    bound = -mu * pair_weight * winner_grad_norm_sq
    pulls_margin_up = pair_weight >= 0
    tolerance = 1e-12 + 1e-9 * pair_weight.abs() * winner_grad_norm_sq
    assert torch.all((directional <= bound + tolerance)[pulls_margin_up]), (
        directional,
        bound,
        result.stats["lambda"],
    )
