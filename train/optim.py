"""The optimizer (AdamW, or Adafactor as the SDXL scripts use) and the LR schedule."""

from __future__ import annotations

import torch
from torch import nn

from sdpo.train.config import TrainConfig


def scaled_learning_rate(config: TrainConfig, world_size: int) -> float:
    """``--learning-rate``, times the pairs per optimizer step with ``--scale-lr`` (the
    reference scripts: 1e-8 x 2048 pairs on 8 GPUs for SD1.5)."""
    pairs_per_step = config.train_batch_pairs * config.gradient_accumulation * world_size
    return config.learning_rate * (pairs_per_step if config.scale_lr else 1)


def make_optimizer(
    config: TrainConfig,
    parameters: list[nn.Parameter],
    learning_rate: float,
    device: torch.device,
) -> torch.optim.Optimizer:
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            parameters,
            lr=learning_rate,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(
        parameters,
        lr=learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
        # Fused kernels (CUDA and CPU) take a device ``found_inf`` flag, so a non-finite step is
        # skipped without a host sync (sdpo.train.step.apply_optimizer_step).
        fused=device.type in ("cuda", "cpu"),
    )


def make_lr_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' "constant_with_warmup": the LR rises linearly from 0 over ``warmup_steps``
    optimizer steps, then stays constant (the reference scripts' schedule)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup_steps)
