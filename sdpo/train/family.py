"""The model family seam: how a batch of latents becomes the model's input, its target, and the
forward call.

The loop and the preference step only call these three methods, so another family can plug in
without touching them. ``DiffusionFamily`` is the DDPM-style family of SD1.5 and SDXL: integer
timesteps, ``x_t = scheduler.add_noise(x_0, noise, t)``, target ``noise`` (epsilon) or the
velocity (v-prediction). ``FlowMatchingFamily`` adapts a flow-matching family of
``sdpo.train.families`` (SD3/SD3.5, FLUX.1, Wan 2.1): it draws one noise and one sigma per pair,
builds ``x_t = (1 - sigma) x_0 + sigma noise`` and the per-row target ``noise - x_0`` (2B, ...),
and calls the transformer the family's way. ``weighted`` is where a family may scale the pair's
predictions and target before the loss (the flow families' SD3 loss weighting).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def repeat_pairs(tensor: Tensor) -> Tensor:
    """(B, ...) -> (2B, ...): row i serves winner i and loser i."""
    return tensor.repeat(2, *([1] * (tensor.dim() - 1)))


class DiffusionFamily:
    """DDPM-style UNets (SD1.5, SDXL, the tiny preset): epsilon or v-prediction targets."""

    def __init__(self, scheduler, prediction_type: str, timestep_weighting=None) -> None:
        """``timestep_weighting``: an ``sdpo.timesteps.TimestepWeighting`` (EXPERIMENTAL) whose
        ``allowed_range`` also bounds the timestep draw; None: all T timesteps, no weights."""
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler: prediction_type {prediction_type!r} is not supported")
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.timestep_weighting = timestep_weighting
        steps = int(scheduler.config.num_train_timesteps)
        allowed = timestep_weighting.allowed_range if timestep_weighting is not None else None
        self.timestep_bounds = allowed or (0, steps)
        if self.timestep_bounds[1] > steps:
            raise ValueError(
                f"timestep_range: HIGH {self.timestep_bounds[1]} exceeds the scheduler's "
                f"{steps} timesteps"
            )

    def sample_noise(self, latents: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One noise and one timestep per pair (B = rows / 2), in this draw order."""
        batch_pairs = latents.shape[0] // 2
        pair_shape = (batch_pairs, *latents.shape[1:])
        noise = torch.randn(
            pair_shape, generator=generator, device=latents.device, dtype=latents.dtype
        )
        timesteps = torch.randint(
            *self.timestep_bounds,
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

    @staticmethod
    def weighted(
        model_pred: Tensor, ref_pred: Tensor, target: Tensor, timesteps: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """No per-pair weighting inside the margin for the DDPM family."""
        return model_pred, ref_pred, target

    def pair_weights(
        self, model_pred: Tensor, ref_pred: Tensor, target: Tensor, timesteps: Tensor
    ) -> Tensor | None:
        """The EXPERIMENTAL timestep weights (B,) for ``preference_loss(pair_weights=...)``."""
        if self.timestep_weighting is None:
            return None
        return self.timestep_weighting.pair_weights(
            model_pred, ref_pred, target, timesteps, self.scheduler.betas
        )


class FlowMatchingFamily:
    """The trainer's seam over a flow-matching family (``sdpo.train.families.FlowFamily``).

    Draws as ``families.flow_preference_inputs`` does (noise, then the sigma density, on the
    step's generator), so a trainer step equals that function followed by preference_loss.
    The conditioning comes in the step's two parts: ``hidden`` = ``prompt_embeds`` and
    ``added`` = ``{"text_embeds": pooled}`` (SD3, FLUX; None for Wan), the SDXL key, so the
    cache and the step handle both model kinds alike."""

    def __init__(self, flow_family, density) -> None:
        self.flow = flow_family
        self.density = density

    def sample_noise(self, latents: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        from sdpo.train import flow_matching

        batch_pairs = latents.shape[0] // 2
        noise = torch.randn(
            (batch_pairs, *latents.shape[1:]),
            generator=generator,
            device=latents.device,
            dtype=latents.dtype,
        )
        sigmas, _ = flow_matching.sample_pair_sigmas(
            self.flow.scheduler,
            batch_pairs,
            self.density,
            generator,
            latents.device,
            image_seq_len=self.flow.image_seq_len(latents),
            table_cache=self.flow.sigma_tables,
        )
        return noise, sigmas

    def noisy_inputs(
        self, latents: Tensor, noise: Tensor, sigmas: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(x_t over 2B rows, sigma per row, target noise - x_0 per row (2B, ...))."""
        from sdpo.train import flow_matching

        noisy = flow_matching.noisy_latents(latents, noise, sigmas)
        target = flow_matching.velocity_target(latents, noise)
        return noisy, repeat_pairs(sigmas), target

    def predict(
        self,
        model: nn.Module,
        noisy: Tensor,
        sigma_rows: Tensor,
        hidden_rows: Tensor,
        added_rows: dict[str, Tensor] | None,
    ) -> Tensor:
        conditioning = {"prompt_embeds": hidden_rows}
        if added_rows:
            conditioning["pooled_projections"] = added_rows["text_embeds"]
        return self.flow.prediction(model, noisy, sigma_rows, conditioning)

    def weighted(
        self, model_pred: Tensor, ref_pred: Tensor, target: Tensor, sigmas: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The SD3 loss weighting w(sigma_i) inside pair i's margin (``flow_loss_weighting``)."""
        if self.density.loss_weighting == "none":
            return model_pred, ref_pred, target
        from sdpo.train import flow_matching

        weights = flow_matching.loss_weights(sigmas, self.density.loss_weighting)
        return flow_matching.apply_pair_weights_inside_margin(model_pred, ref_pred, target, weights)

    @staticmethod
    def pair_weights(
        model_pred: Tensor, ref_pred: Tensor, target: Tensor, sigmas: Tensor
    ) -> Tensor | None:
        """No timestep weights: they are refused for flow models (config validation)."""
        return None
