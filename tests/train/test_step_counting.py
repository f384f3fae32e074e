"""Everything that counts steps, with gradient accumulation > 1: the learning-rate schedule's
length (diffusers' own get_scheduler is the oracle), warm-up, epochs, log rows, checkpoint
intervals, and the skipped-step fraction exactly at its bound."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.optimization import get_scheduler
from trainer_helpers import poison_losses, read_rows, tiny

from sdpo.train import checkpoint as checkpoints
from sdpo.train.config import LR_SCHEDULERS, config_from_args
from sdpo.train.trainer import NonFiniteLoss, train


def diffusers_learning_rates(name: str, steps: int, warmup: int, base: float) -> list[float]:
    """The LR diffusers' scheduler reports after each of ``steps`` optimizer steps (what the
    trainer logs: get_last_lr() after the update), on an optimizer of one parameter."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    schedule = get_scheduler(
        name, optimizer, num_warmup_steps=warmup, num_training_steps=steps, num_cycles=2, power=2.0
    )
    rates = []
    for _ in range(steps):
        optimizer.step()
        schedule.step()
        rates.append(schedule.get_last_lr()[0])
    return rates


@pytest.mark.parametrize("scheduler", LR_SCHEDULERS)
def test_the_lr_schedule_counts_optimizer_steps_not_micro_batches(tmp_path, scheduler):
    # 3 micro-batches per optimizer step: a schedule stepped per micro-batch, or sized by
    # micro-batches, would reach its end (or its warm-up's) 3x too early.
    config = tiny(
        tmp_path, max_steps=6, gradient_accumulation=3, warmup_steps=2, log_every=1,
        learning_rate=1e-3, lr_scheduler=scheduler, lr_num_cycles=2, lr_power=2.0,
    )  # fmt: skip
    config.scale_lr = False
    train(config)
    logged = [row["lr"] for row in read_rows(config.output_dir)]
    expected = diffusers_learning_rates(scheduler, 6, 2, 1e-3)
    assert logged == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_epochs_checkpoints_and_rows_count_optimizer_steps(tmp_path):
    # 12 pairs of 2 per micro-batch: 6 micro-batches an epoch; 2 epochs at 4 micro-batches per
    # optimizer step are ceil(12 / 4) = 3 optimizer steps.
    config = config_from_args(
        ["--preset", "tiny", "--output-dir", str(tmp_path / "run"), "--no-progress",
         "--num-epochs", "2", "--synthetic-pairs", "12", "--train-batch-pairs", "2",
         "--gradient-accumulation", "4", "--checkpoint-every", "2", "--log-every", "2",
         "--checkpoints-total-limit", "0"]
    )  # fmt: skip
    summary = train(config)
    assert summary["steps"] == 3
    assert [row["step"] for row in read_rows(config.output_dir)] == [2, 3]
    saved = sorted(path.name for path in checkpoints.complete_checkpoints(config.output_dir))
    assert saved == ["checkpoint-2", "checkpoint-3"]


@pytest.mark.parametrize(("fraction", "stops"), [(0.25, False), (0.2499, True)])
def test_the_skipped_fraction_at_its_bound(tmp_path, monkeypatch, fraction, stops):
    # 2 skipped of 8 optimizer steps (2 micro-batches each) is exactly 0.25: "more than the
    # bound" stops, equal to it does not.
    config = tiny(
        tmp_path, max_steps=8, gradient_accumulation=2, log_every=4, on_nonfinite="skip",
        max_skipped_fraction=fraction,
    )  # fmt: skip
    # The first micro-batch of steps 3 and 6 (2 micro-batches each): calls 5 and 11.
    poison_losses(monkeypatch, lambda call: call in (5, 11))
    if stops:
        with pytest.raises(NonFiniteLoss, match=r"2 of 8 optimizer steps \(25.0%\)"):
            train(config)
    else:
        summary = train(config)
        assert summary["steps"] == 8 and summary["skipped_steps"] == 2
        assert (Path(config.output_dir) / "unet.pth").is_file()
