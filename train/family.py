"""The model family seam: how a batch of latents becomes the model's input, its target, and the
forward call.

The loop and the preference step only call these three methods, so another family can plug in
without touching them. ``DiffusionFamily`` is the DDPM-style family of SD1.5 and SDXL: integer
timesteps, ``x_t = scheduler.add_noise(x_0, noise, t)``, target ``noise`` (epsilon) or the
velocity (v-prediction). A flow-matching family (SD3, FLUX) would draw sigmas instead, build
``x_t = (1 - sigma) x_0 + sigma noise`` and target ``noise - x_0``, with its transformer's call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def repeat_pairs(tensor: Tensor) -> Tensor:
    """(B, ...) -> (2B, ...): row i serves winner i and loser i."""
    return tensor.repeat(2, *([1] * (tensor.dim() - 1)))


class DiffusionFamily:
    """DDPM-style UNets (SD1.5, SDXL, the tiny preset): epsilon or v-prediction targets."""

    def __init__(self, scheduler, prediction_type: str) -> None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler: prediction_type {prediction_type!r} is not supported")
        self.scheduler = scheduler
        self.prediction_type = prediction_type

    def sample_noise(self, latents: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One noise and one timestep per pair (B = rows / 2), in this draw order."""
        batch_pairs = latents.shape[0] // 2
        pair_shape = (batch_pairs, *latents.shape[1:])
        noise = torch.randn(
            pair_shape, generator=generator, device=latents.device, dtype=latents.dtype
        )
        timesteps = torch.randint(
            0,
            self.scheduler.config.num_train_timesteps,
            (batch_pairs,),
            generator=generator,
            device=latents.device,
        )
        return noise, timesteps

    def noisy_inputs(
        self, latents: Tensor, noise: Tensor, timesteps: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(model input over 2B rows, timestep per row, target). Winner i and loser i share
        their noise and timestep; an epsilon target stays (B, ...), which the loss broadcasts
        over both halves without a copy."""
        noise_rows, timestep_rows = repeat_pairs(noise), timesteps.repeat(2)
        noisy = self.scheduler.add_noise(latents, noise_rows, timestep_rows)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.scheduler.get_velocity(latents, noise_rows, timestep_rows)
        return noisy, timestep_rows, target

    @staticmethod
    def predict(
        model: nn.Module,
        noisy: Tensor,
        timestep_rows: Tensor,
        hidden_rows: Tensor,
        added_rows: dict[str, Tensor] | None,
    ) -> Tensor:
        return model(noisy, timestep_rows, hidden_rows, added_cond_kwargs=added_rows).sample
