"""EXPERIMENTAL: timestep clipping/masking (DPO-C&M) and importance weights for pair_weights.

Status, stated plainly: these follow arXiv 2505.21893 ("importance-sampled Diffusion-DPO" /
DPO-C&M). Version 2 of that paper states that its main theorem contains a critical error and
version 3 is retitled (SIPO). The paper does not pin down the normalisation of the importance
weight, its epsilon or the final loss; what is here is our own derivation (docs/objectives.md,
'Experimental: importance-sampled DPO and DPO-C&M'). Everything is off by default and reaches the
objective only through ``sdpo.preference_loss(..., pair_weights=...)``, so a better reading of the
paper can replace this module without touching the losses or the kernels.

The derivation. For DDPM with epsilon prediction, the policy's reverse step and the forward
posterior share their variance sigma_t^2 and their means differ by
``beta_t / (sqrt(alpha_t) sqrt(1 - alphabar_t)) * (eps - eps_theta)``, so the step-wise log
ratio of the policy against the reference model is, per image,

    log w = -k_t * D * (L - R),   k_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - alphabar_t))

with L, R the policy's and the reference's mean squared errors over the D elements of a sample
(so w = 1 at initialisation, where policy = reference). A pair's weight is the product of its
winner's and loser's ratios (both trajectories are sampled). Then, per pair:

- DPO-C&M: ``m_i = 1[w_i >= tau]`` (tau = 0.9 as reviewers quote it) masks uninformative
  timesteps, optionally restricted to an allowed timestep range;
- importance weighting: ``m_i * clip(w_i, 1 - epsilon, 1 + epsilon)``, detached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

WEIGHTING_MODES = ("none", "dpo-cm", "importance")


def ddpm_log_ratio_coefficient(betas: Tensor, timesteps: Tensor) -> Tensor:
    """k_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - alphabar_t)) for each timestep, fp32.

    ``betas`` is the scheduler's (T,) noise schedule (``scheduler.betas``); sigma_t^2 is the
    DDPM posterior variance beta_t (1 - alphabar_{t-1}) / (1 - alphabar_t). At t = 0 that
    variance is 0 and the ratio is undefined: there k_t is taken from t = 1.
    """
    betas = betas.to(torch.float64)
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    previous_cumprod = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - previous_cumprod) / (1.0 - alphas_cumprod)
    coefficient = betas.square() / (2.0 * posterior_variance * alphas * (1.0 - alphas_cumprod))
    coefficient[0] = coefficient[1]
    return coefficient.to(torch.float32)[timesteps.to(device=betas.device, dtype=torch.long)]


def pair_log_importance_weights(
    model_mse: Tensor,
    ref_mse: Tensor,
    timesteps: Tensor,
    betas: Tensor,
    elements_per_sample: int,
) -> Tensor:
    """log w_i of each pair (B,): the sum of its winner's and loser's log ratios.

    ``model_mse`` and ``ref_mse`` are (2B,) per-row mean squared errors (winners first), as
    ``(pred - target).square().flatten(1).mean(1)``; ``timesteps`` is (B,) or (2B,) (a pair
    shares its timestep). Detached.
    """
    batch_pairs = model_mse.shape[0] // 2
    pair_timesteps = timesteps[:batch_pairs]
    coefficient = ddpm_log_ratio_coefficient(betas.to(model_mse.device), pair_timesteps)
    gap = (model_mse.detach().float() - ref_mse.detach().float()).view(2, batch_pairs).sum(0)
    return -coefficient.to(gap.device) * elements_per_sample * gap


def timestep_range_mask(timesteps: Tensor, allowed_range: tuple[int, int] | None) -> Tensor:
    """1 where ``low <= t < high`` (or everywhere when ``allowed_range`` is None), else 0."""
    if allowed_range is None:
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    low, high = allowed_range
    return ((timesteps >= low) & (timesteps < high)).to(torch.float32)


def sample_timesteps(
    batch_pairs: int,
    num_train_timesteps: int,
    *,
    allowed_range: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """One timestep per pair, uniform over ``allowed_range`` (default: all T), repeated for the
    two halves: (2B,) long, pair i at rows i and B + i."""
    low, high = allowed_range if allowed_range is not None else (0, num_train_timesteps)
    if not 0 <= low < high <= num_train_timesteps:
        raise ValueError(
            f"allowed_range: expected 0 <= low < high <= {num_train_timesteps}, got {allowed_range}"
        )
    per_pair = torch.randint(low, high, (batch_pairs,), generator=generator, device="cpu")
    return per_pair.repeat(2).to(device)


@dataclass(frozen=True)
class TimestepWeighting:
    """Per-pair weights for ``preference_loss(pair_weights=...)``. EXPERIMENTAL (see module doc).

    ``mode``: "none" (weights are None), "dpo-cm" (mask only) or "importance" (mask times the
    clipped ratio). ``mask_threshold`` is tau, ``clip_epsilon`` the half-width of the clip range,
    ``allowed_range`` an optional [low, high) range of timesteps kept (also used for sampling).
    """

    mode: str = "none"
    mask_threshold: float = 0.9
    clip_epsilon: float = 0.2
    allowed_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.mode not in WEIGHTING_MODES:
            raise ValueError(
                f"mode: unknown {self.mode!r}; expected one of {', '.join(WEIGHTING_MODES)}"
            )
        if self.mask_threshold < 0:
            raise ValueError(f"mask_threshold: expected >= 0, got {self.mask_threshold}")
        if not 0 <= self.clip_epsilon < 1:
            raise ValueError(f"clip_epsilon: expected a number in [0, 1), got {self.clip_epsilon}")
        if self.allowed_range is not None:
            low, high = self.allowed_range
            if not 0 <= low < high:
                raise ValueError(
                    f"allowed_range: expected 0 <= low < high, got {self.allowed_range}"
                )

    def pair_weights(
        self,
        model_pred: Tensor,
        ref_pred: Tensor,
        target: Tensor,
        timesteps: Tensor,
        betas: Tensor,
    ) -> Tensor | None:
        """(B,) detached weights for this batch, or None when ``mode == "none"``.

        Reads the predictions once more to form the per-row errors (an extra read pass over
        the batch: the price of keeping the weighting outside the fused kernels).
        """
        if self.mode == "none":
            return None
        batch_pairs = model_pred.shape[0] // 2
        with torch.no_grad():
            full_target = (
                target
                if target.shape[0] == model_pred.shape[0]
                else target.repeat(2, *([1] * (target.dim() - 1)))
            )
            model_mse = (model_pred.float() - full_target.float()).square().flatten(1).mean(1)
            ref_mse = (ref_pred.float() - full_target.float()).square().flatten(1).mean(1)
            log_weight = pair_log_importance_weights(
                model_mse, ref_mse, timesteps, betas, model_pred[0].numel()
            )
            weight = log_weight.exp()
            keep = (weight >= self.mask_threshold).float()
            keep = keep * timestep_range_mask(timesteps[:batch_pairs], self.allowed_range)
            if self.mode == "dpo-cm":
                return keep
            clipped = weight.clamp(1.0 - self.clip_epsilon, 1.0 + self.clip_epsilon)
            return keep * clipped
