"""The trainer's components on their own: LR schedule, model family, running stats, NVTX."""

from __future__ import annotations

import sys

import pytest
import torch

from sdpo.train.family import DiffusionFamily, repeat_pairs
from sdpo.train.metrics import METRIC_KEYS, RunningStats
from sdpo.train.models import build_scheduler
from sdpo.train.nvtx_ranges import PhaseRanges
from sdpo.train.optim import make_lr_schedule


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_lr_schedule_is_the_linear_warmup_then_constant(warmup):
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.5)
    schedule = make_lr_schedule(optimizer, warmup)
    seen = []
    for _ in range(6):
        seen.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    # The trainer's earlier hand-written LambdaLR: min(1, step / warmup), 1 without warmup.
    expected = [0.5 * (min(1.0, step / warmup) if warmup > 0 else 1.0) for step in range(6)]
    assert seen == pytest.approx(expected, abs=0)
    # Resuming restores the position in the schedule.
    restored = make_lr_schedule(torch.optim.SGD([parameter], lr=0.5), warmup)
    restored.load_state_dict(schedule.state_dict())
    assert restored.get_last_lr() == schedule.get_last_lr()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_family_noises_both_halves_alike(prediction_type):
    scheduler = build_scheduler()
    family = DiffusionFamily(scheduler, prediction_type)
    latents = torch.randn(6, 4, 8, 8)
    generator = torch.Generator().manual_seed(0)
    noise, timesteps = family.sample_noise(latents, generator)
    assert noise.shape == (3, 4, 8, 8) and timesteps.shape == (3,)
    # Same draw order as before the split: noise, then timesteps.
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(noise, torch.randn((3, 4, 8, 8), generator=generator))
    noisy, timestep_rows, target = family.noisy_inputs(latents, noise, timesteps)
    torch.testing.assert_close(timestep_rows, torch.cat([timesteps, timesteps]))
    noise_rows = torch.cat([noise, noise])
    torch.testing.assert_close(noisy, scheduler.add_noise(latents, noise_rows, timestep_rows))
    if prediction_type == "epsilon":
        assert target is noise
    else:
        expected = scheduler.get_velocity(latents, noise_rows, timestep_rows)
        torch.testing.assert_close(target, expected)
    assert torch.equal(repeat_pairs(noise)[3:], noise)


def test_unsupported_prediction_type_is_a_clear_error():
    with pytest.raises(ValueError, match="prediction_type 'sample' is not supported"):
        DiffusionFamily(build_scheduler(), "sample")


def test_running_stats_average_over_micro_batches():
    class Single:
        def all_reduce_sum(self, tensor):
            return tensor

    stats = RunningStats(torch.device("cpu"))
    for value in (1.0, 3.0):
        result = type("Result", (), {})()
        result.loss = torch.tensor(value)
        result.stats = {key: torch.tensor([value, value + 2]) for key in METRIC_KEYS[1:]}
        stats.add(result, skipped_images=1)
        stats.end_step(True)
    means, micro_batches, skipped, skipped_steps, elapsed = stats.reduce(Single())
    assert micro_batches == 2 and skipped == 2 and skipped_steps == 0 and elapsed >= 0
    assert means["loss"] == 2.0 and means["lambda"] == 3.0  # per-pair stats: mean over pairs
    stats.reset()
    assert stats.micro_batches == 0 and float(stats.loss_sum) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("granularity", ["batch", "pair"])
def test_running_stats_hold_a_real_results_values_and_count(dtype, granularity):
    import sdpo

    generator = torch.Generator().manual_seed(3)
    model_pred, ref_pred, target = (
        torch.randn(6, 2, 4, 4, generator=generator, dtype=dtype) for _ in range(3)
    )
    result = sdpo.preference_loss(
        model_pred, ref_pred, target, method="diffusion-dpo", beta=500.0, mu=0.5,
        granularity=granularity, backend="torch",
    )  # fmt: skip
    stats = RunningStats(torch.device("cpu"))
    for _ in range(3):
        stats.add(result, skipped_images=0)
    expected = [float(result.loss)] + [float(result.stats[key].mean()) for key in METRIC_KEYS[1:]]
    # Three micro-batches of the same result: 3x each metric, then the count 3 (fp32 sums).
    torch.testing.assert_close(
        stats.step_sums, torch.tensor([3 * value for value in expected] + [3.0])
    )


def test_nvtx_is_optional_with_a_clear_error(monkeypatch):
    assert PhaseRanges(False)("encode") is PhaseRanges(False)("backward")  # free when off
    monkeypatch.setitem(sys.modules, "nvtx", None)
    with pytest.raises(RuntimeError, match=r"diffusion-sdpo\[profile\]"):
        PhaseRanges(True)
