"""The optimizer (AdamW, 8-bit AdamW from bitsandbytes, or Adafactor as the SDXL scripts use)
and the LR schedule (diffusers' ``get_scheduler``)."""

from __future__ import annotations

import torch
from torch import nn

from sdpo.train.config import TrainConfig
from sdpo.train.errors import UsageError


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
    if config.optimizer == "adamw8bit":
        return make_adamw8bit(config, parameters, learning_rate)
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


def make_adamw8bit(
    config: TrainConfig, parameters: list[nn.Parameter], learning_rate: float
) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit (the diffusers example's ``--use_8bit_adam``): the two moment
    estimates in 8 bits, about a quarter of AdamW's optimizer memory."""
    try:
        import bitsandbytes
    except ImportError:
        raise UsageError(
            "optimizer: adamw8bit needs bitsandbytes (pip install bitsandbytes); use --optimizer "
            "adamw"
        ) from None
    return bitsandbytes.optim.AdamW8bit(
        parameters,
        lr=learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
    )


def make_lr_schedule(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    name: str = "constant_with_warmup",
    total_steps: int | None = None,
    num_cycles: int = 1,
    power: float = 1.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' ``get_scheduler(name)``: the LR rises linearly from 0 over ``warmup_steps``
    optimizer steps, then stays constant (``constant_with_warmup``, the reference scripts'
    schedule), decays to 0 at ``total_steps`` (``linear``, ``cosine``, ``polynomial`` to
    diffusers' end LR 1e-7) or restarts ``num_cycles`` times (``cosine_with_restarts``).
    ``constant`` ignores the warmup."""
    from diffusers.optimization import get_scheduler

    try:
        return get_scheduler(
            name,
            optimizer,
            num_warmup_steps=warmup_steps,
            num_training_steps=total_steps,
            num_cycles=num_cycles,
            power=power,
        )
    except ValueError as error:  # polynomial: the LR must start above its end LR (1e-7)
        raise UsageError(f"lr_scheduler: {name}: {error}") from None
