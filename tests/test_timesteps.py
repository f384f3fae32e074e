"""The experimental timestep weighting (DPO-C&M / importance weights) in sdpo.timesteps."""

from __future__ import annotations

import math

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


def independent_log_weights(scheduler, timesteps, gaps, elements):
    """log w per pair from the module's documented definition, with diffusers' own schedule:
    -k_t * D * gap, k_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - alphabar_t)), sigma_t^2 the DDPM
    posterior ("fixed_small") variance; gap = (L_w - R_w) + (L_l - R_l)."""
    values = []
    for step, gap in zip(timesteps, gaps, strict=True):
        beta = scheduler.betas[step].double()
        variance = scheduler._get_variance(step).double()
        alphabar = scheduler.alphas_cumprod[step].double()
        k = beta**2 / (2 * variance * (1 - beta) * (1 - alphabar))
        values.append(float(-k * elements * gap))
    return values


@pytest.mark.parametrize(
    ("mask_threshold", "clip_epsilon", "allowed_range"),
    [(0.9, 0.2, None), (0.8, 0.1, (100, 700)), (0.5, 0.05, (0, 1000))],
)
def test_weighting_mask_and_clip_through_pair_weights(mask_threshold, clip_epsilon, allowed_range):
    # TimestepWeighting itself, on predictions whose errors put each pair's log w where wanted:
    # target 0, every element of a row equal, so a row's MSE is its value squared.
    scheduler = sd_scheduler()
    timesteps = [50, 150, 300, 450, 600, 650, 800, 999]
    wanted_log_w = [0.0, 0.35, -0.15, -0.3, 0.08, -1.5, 0.15, -0.02]
    shape, elements = (2, 4, 4), 32
    k = [-value for value in independent_log_weights(scheduler, timesteps, [1.0] * 8, 1)]
    pairs = len(timesteps)
    # gap = log w / (-k D); the winner carries it: L_w = R_w + gap, the loser has L = R = 0.5.
    gaps = [log_w / (-k_t * elements) for log_w, k_t in zip(wanted_log_w, k, strict=True)]
    reference_mse = 1.0 + 2 * max(abs(gap) for gap in gaps)
    model_rows = [math.sqrt(reference_mse + gap) for gap in gaps] + [math.sqrt(0.5)] * pairs
    ref_rows = [math.sqrt(reference_mse)] * pairs + [math.sqrt(0.5)] * pairs
    model_pred = torch.tensor(model_rows).view(-1, 1, 1, 1).expand(-1, *shape).contiguous()
    ref_pred = torch.tensor(ref_rows).view(-1, 1, 1, 1).expand(-1, *shape).contiguous()
    target = torch.zeros(pairs, *shape)
    log_w = independent_log_weights(scheduler, timesteps, gaps, elements)
    assert log_w == pytest.approx(wanted_log_w, abs=1e-9)
    w = [math.exp(value) for value in log_w]
    low, high = allowed_range if allowed_range is not None else (0, 1000)
    mask = [
        float(weight >= mask_threshold and low <= step < high)
        for weight, step in zip(w, timesteps, strict=True)
    ]
    clipped = [min(max(weight, 1 - clip_epsilon), 1 + clip_epsilon) for weight in w]
    steps = torch.tensor(timesteps).repeat(2)
    settings = dict(
        mask_threshold=mask_threshold, clip_epsilon=clip_epsilon, allowed_range=allowed_range
    )
    masks = TimestepWeighting(mode="dpo-cm", **settings).pair_weights(
        model_pred, ref_pred, target, steps, scheduler.betas
    )
    weights = TimestepWeighting(mode="importance", **settings).pair_weights(
        model_pred, ref_pred, target, steps, scheduler.betas
    )
    assert masks.tolist() == mask
    expected = torch.tensor([m * c for m, c in zip(mask, clipped, strict=True)])
    torch.testing.assert_close(weights, expected, rtol=1e-4, atol=1e-6)
    # The cases are informative: some pairs masked, some clipped at each end, some kept as is.
    assert 0.0 in mask and 1.0 in mask
    assert any(m and weight > 1 + clip_epsilon for m, weight in zip(mask, w, strict=True))
    if mask_threshold < 1 - clip_epsilon:  # else no kept pair can reach the lower clip
        assert any(m and weight < 1 - clip_epsilon for m, weight in zip(mask, w, strict=True))
