"""The experimental timestep weighting (DPO-C&M / importance weights) in sdpo.timesteps."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

import sdpo
from sdpo.timesteps import (
    TimestepWeighting,
    ddpm_log_ratio_coefficient,
    pair_log_importance_weights,
    sample_timesteps,
)


def sd_scheduler() -> DDPMScheduler:
    # SD1.5's training schedule, built from its config values (no download).
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )


def test_coefficient_matches_diffusers_posterior_variance():
    scheduler = sd_scheduler()
    timesteps = torch.tensor([1, 10, 250, 500, 999])
    coefficient = ddpm_log_ratio_coefficient(scheduler.betas, timesteps)
    for index, step in enumerate(timesteps.tolist()):
        beta = scheduler.betas[step].double()
        variance = scheduler._get_variance(step).double()  # DDPM "fixed_small" posterior variance
        alphabar = scheduler.alphas_cumprod[step].double()
        expected = beta**2 / (2 * variance * (1 - beta) * (1 - alphabar))
        torch.testing.assert_close(coefficient[index].double(), expected, rtol=1e-4, atol=0)


def test_weights_are_one_when_policy_equals_reference():
    scheduler = sd_scheduler()
    pred = torch.randn(6, 4, 8, 8)
    target = torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([5, 400, 900]).repeat(2)
    for mode in ("dpo-cm", "importance"):
        weights = TimestepWeighting(mode=mode).pair_weights(
            pred, pred, target, timesteps, scheduler.betas
        )
        torch.testing.assert_close(weights, torch.ones(3))
    assert TimestepWeighting().pair_weights(pred, pred, target, timesteps, scheduler.betas) is None


def test_mask_and_clip():
    betas = sd_scheduler().betas
    timesteps = torch.tensor([500, 500, 500, 500])
    # Winner-plus-loser MSE gaps that put log w at 0, +0.05, -0.05 and -1 (w ~ 1, 1.05, 0.95, 0.37).
    coefficient = float(ddpm_log_ratio_coefficient(betas, timesteps[:1]))
    elements = 100
    log_targets = torch.tensor([0.0, 0.05, -0.05, -1.0])
    gap = -log_targets / (coefficient * elements)
    model_mse = torch.cat([gap, torch.zeros(4)]) + 1.0
    ref_mse = torch.ones(8)
    log_weight = pair_log_importance_weights(model_mse, ref_mse, timesteps, betas, elements)
    torch.testing.assert_close(log_weight, log_targets, rtol=1e-4, atol=1e-6)
    weight = log_weight.exp()
    keep = (weight >= 0.9).float()
    assert keep.tolist() == [1.0, 1.0, 1.0, 0.0]
    clipped = keep * weight.clamp(0.98, 1.02)
    torch.testing.assert_close(clipped, torch.tensor([1.0, 1.02, 0.98, 0.0]), rtol=1e-4, atol=1e-6)


def test_allowed_range_masks_and_samples():
    generator = torch.Generator().manual_seed(0)
    steps = sample_timesteps(64, 1000, allowed_range=(200, 800), generator=generator)
    assert steps.shape == (128,)
    assert torch.equal(steps[:64], steps[64:])  # a pair shares its timestep
    assert steps.min() >= 200 and steps.max() < 800
    scheduler = sd_scheduler()
    pred = torch.randn(4, 2, 4, 4)
    weighting = TimestepWeighting(mode="dpo-cm", allowed_range=(100, 500))
    weights = weighting.pair_weights(
        pred, pred, torch.randn(2, 2, 4, 4), torch.tensor([50, 300, 50, 300]), scheduler.betas
    )
    assert weights.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="allowed_range"):
        sample_timesteps(4, 1000, allowed_range=(10, 2000))


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="mode: unknown 'clip'"):
        TimestepWeighting(mode="clip")
    with pytest.raises(ValueError, match="clip_epsilon"):
        TimestepWeighting(mode="importance", clip_epsilon=1.5)


def test_weights_plug_into_preference_loss():
    scheduler = sd_scheduler()
    model_pred = torch.randn(4, 2, 4, 4)
    ref_pred = model_pred + 0.01 * torch.randn_like(model_pred)
    target = torch.randn(2, 2, 4, 4)
    timesteps = torch.tensor([100, 600]).repeat(2)
    weights = TimestepWeighting(mode="importance").pair_weights(
        model_pred, ref_pred, target, timesteps, scheduler.betas
    )
    weighted = sdpo.preference_loss(model_pred, ref_pred, target, beta=50.0, pair_weights=weights)
    plain = sdpo.preference_loss(model_pred, ref_pred, target, beta=50.0)
    per_pair = [
        sdpo.preference_loss(
            model_pred[[i, i + 2]], ref_pred[[i, i + 2]], target[i : i + 1], beta=50.0
        ).loss
        for i in range(2)
    ]
    torch.testing.assert_close(weighted.loss, (weights * torch.stack(per_pair)).mean())
    torch.testing.assert_close(plain.loss, torch.stack(per_pair).mean())
