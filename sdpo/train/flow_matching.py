"""Rectified-flow (flow-matching) math for preference training of SD3, FLUX.1 and Wan 2.1.

Forward process and target, as the diffusers SD3 and FLUX DreamBooth scripts train them::

    x_t = (1 - sigma) x_0 + sigma * noise        target = noise - x_0   (the velocity)

For a preference pair (winner i at row i, loser i at row B + i of a (2B, ...) stack) the noise
and sigma are drawn once per pair and shared by both rows, exactly as the DDPM path shares its
noise and timestep. The latents differ, so the target differs per row: the target handed to
``sdpo.preference_loss`` is (2B, ...). With per-row flow-matching errors L = mean (v_theta - v)^2
and R the same for the reference model, the Diffusion-DPO margin
``u = -(beta/2) ((L_w - L_l) - (R_w - R_l))`` is the flow-matching MSE difference against the
reference (the Flow-DPO form for rectified-flow video models), and ``preference_loss`` applies
unchanged, safeguard included (lambda only needs the output-space errors e = pred - target).

Sigma sampling. A density on u in (0, 1) (``compute_density_for_timestep_sampling``: logit-normal
with ``logit_mean``/``logit_std``, "mode" with ``mode_scale``, or uniform) picks an index
``floor(u * T)`` into the scheduler's training table (``scheduler.timesteps``,
``scheduler.sigmas``, T = ``num_train_timesteps`` = 1000), as the scripts do. The table already
carries a static ``shift`` (SD3: sigma = s t / (1 + (s - 1) t)). A scheduler with
``use_dynamic_shifting`` (FLUX) keeps an unshifted table; the FLUX training script trains on it
as is. ``FlowDensity(dynamic_shift=True)`` instead shifts each sigma the way the pipeline does
at inference for the training resolution: ``mu = calculate_shift(image_seq_len, ...)`` from the
scheduler's config and ``sigma <- scheduler.time_shift(mu, 1.0, sigma)``.

Loss weighting and the margin. ``compute_loss_weighting_for_sd3`` gives w(sigma): "none" (1),
"sigma_sqrt" (sigma^-2), "cosmap" (2 / (pi (1 - 2 sigma + 2 sigma^2))). In the SFT loss it
multiplies each row's squared error. In the preference loss it enters *inside* u: a pair's
weight w_i scales both its rows' MSEs, so u_i becomes w_i u_i (an effective per-pair
beta_i = beta w_i) and the pair's gradient is scaled through sigmoid(-w_i u_i). We apply it by
scaling the predictions and the target of both rows by sqrt(w_i), which leaves preference_loss
unchanged. The safeguard: e_w and e_l of a pair are both scaled by sqrt(w_i), so with
``granularity="pair"`` lambda_i = (1 - mu) S_ww / S_wl is invariant; with "batch" or "group:G"
lambda becomes (1 - mu) sum_i w_i S_ww,i / sum_i w_i S_wl,i, while the exact first-order bound
for the weighted winner error sum_i w_i L_w,i would pool with w_i^2: the two agree only when w
is constant over the group, so use "pair" with a non-trivial weighting. Weighting "none", the
SD3 script's default, leaves everything as in the DDPM path. docs/flow_matching.md
has the derivation and the choice for presets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# The densities of diffusers.training_utils.compute_density_for_timestep_sampling ("uniform" is
# its fall-through branch, which the scripts reach with "none", "sigma_sqrt" or "cosmap").
DENSITIES = ("logit_normal", "mode", "uniform")
# The weightings of diffusers.training_utils.compute_loss_weighting_for_sd3.
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


# The mode density's map u -> 1 - u - s (cos^2(pi u / 2) - 1 + u) is a monotonic map of [0, 1]
# onto itself only for -1 <= s <= 2/(pi-2) (the SD3 paper, arXiv 2403.03206, section 3.1): its
# slope is -1 - s at u = 0 and -1 - s + s pi/2 at u = 1/2. Below -1 draws leave [0, 1] (s = -3
# reaches -0.137 and 1.137) and the index clamp would pile them onto the table's two ends.
MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return float(value)


@dataclass(frozen=True)
class FlowDensity:
    """How sigmas are drawn and how the per-pair MSEs are weighted.

    Defaults are the diffusers SD3 DreamBooth script's (``--weighting_scheme logit_normal
    --logit_mean 0 --logit_std 1 --mode_scale 1.29``; logit-normal sampling with no loss
    weighting). The FLUX script's default is ``weighting_scheme="none"``: uniform sampling.

    ``density``: "logit_normal", "mode" or "uniform". ``loss_weighting``: "none", "sigma_sqrt"
    or "cosmap" (the SD3 scripts couple the two into one ``--weighting_scheme``; here they are
    separate so a density and a weighting are never applied by accident together).
    ``dynamic_shift``: shift the sigmas by the training resolution as the pipeline does at
    inference (only for schedulers with ``use_dynamic_shifting``, i.e. FLUX).
    """

    density: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    loss_weighting: str = "none"
    dynamic_shift: bool = False

    def __post_init__(self) -> None:
        if self.density not in DENSITIES:
            raise ValueError(
                f"density: unknown {self.density!r}; expected one of {', '.join(DENSITIES)}"
            )
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"loss_weighting: unknown {self.loss_weighting!r}; expected one of "
                f"{', '.join(LOSS_WEIGHTINGS)}"
            )
        _finite("logit_mean", self.logit_mean)
        if _finite("logit_std", self.logit_std) <= 0:
            raise ValueError(f"logit_std: expected > 0, got {self.logit_std}")
        if not -1.0 <= _finite("mode_scale", self.mode_scale) <= MODE_SCALE_MAX:
            raise ValueError(
                f"mode_scale: expected a number in [-1, {MODE_SCALE_MAX:.4f}] (2/(pi-2), where the "
                f"SD3 paper's mode density is monotonic), got {self.mode_scale}"
            )
        if not isinstance(self.dynamic_shift, bool):
            raise ValueError(f"dynamic_shift: expected a bool, got {self.dynamic_shift!r}")

    @classmethod
    def from_config(cls, config) -> FlowDensity:
        """The density a ``TrainConfig``'s flow settings name (the trainer's flow families and
        the toy flow model both train with it)."""
        return cls(
            density=config.flow_density,
            logit_mean=config.logit_mean,
            logit_std=config.logit_std,
            mode_scale=config.mode_scale,
            loss_weighting=config.flow_loss_weighting,
            dynamic_shift=config.flow_dynamic_shift,
        )


def sample_density(
    density: FlowDensity, batch_pairs: int, generator: torch.Generator | None
) -> Tensor:
    """u in [0, 1] per pair (B,), fp32, drawn on the generator's device by diffusers' function."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    device = generator.device if generator is not None else torch.device("cpu")
    return compute_density_for_timestep_sampling(
        weighting_scheme="none" if density.density == "uniform" else density.density,
        batch_size=batch_pairs,
        logit_mean=density.logit_mean,
        logit_std=density.logit_std,
        mode_scale=density.mode_scale,
        device=device,
        generator=generator,
    )


def _training_table(scheduler) -> tuple[Tensor, Tensor, int]:
    steps = int(scheduler.config.num_train_timesteps)
    sigmas, timesteps = scheduler.sigmas, scheduler.timesteps
    if sigmas.shape[0] != steps or timesteps.shape[0] != steps:
        raise ValueError(
            f"scheduler: expected the training table of {steps} sigmas (a scheduler on which "
            f"set_timesteps was called has {sigmas.shape[0]}); use a fresh copy for training"
        )
    return sigmas, timesteps, steps


def dynamic_shift_mu(scheduler, image_seq_len: int) -> float:
    """The pipelines' ``calculate_shift`` for ``image_seq_len`` tokens, from the scheduler config."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = scheduler.config
    return calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )


def sample_pair_sigmas(
    scheduler,
    batch_pairs: int,
    density: FlowDensity,
    generator: torch.Generator | None,
    device: torch.device | str,
    image_seq_len: int | None = None,
    table_cache: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """(sigmas, timesteps), each (B,) fp32 on ``device``: one draw per pair.

    ``timesteps`` is what SD3 and Wan transformers take (sigma * T); FLUX takes sigma itself.
    u = 1 (reachable by "mode" when torch.rand returns 0) would index past the table, where the
    scripts would fail; it is clamped to the last entry. The lookup runs on the generator's
    device with no host sync; ``table_cache`` (a dict the caller keeps) holds the table there so
    it is copied once, not every step.
    """
    sigmas_table, timesteps_table, steps = _training_table(scheduler)
    u = sample_density(density, batch_pairs, generator)
    indices = (u * steps).long().clamp_(0, steps - 1)
    cache = table_cache if table_cache is not None else {}
    if indices.device not in cache:
        cache[indices.device] = (
            sigmas_table.to(indices.device, torch.float32),
            timesteps_table.to(indices.device, torch.float32),
        )
    sigmas_on_device, timesteps_on_device = cache[indices.device]
    sigmas = sigmas_on_device[indices]
    timesteps = timesteps_on_device[indices]
    if density.dynamic_shift:
        if not scheduler.config.get("use_dynamic_shifting", False):
            raise ValueError(
                "dynamic_shift: this scheduler has a static shift (use_dynamic_shifting is off, "
                f"shift={scheduler.config.get('shift')}); its table is already shifted, so set "
                "dynamic_shift=False"
            )
        if image_seq_len is None or image_seq_len < 1:
            raise ValueError(f"image_seq_len: expected a positive token count, got {image_seq_len}")
        mu = dynamic_shift_mu(scheduler, image_seq_len)
        sigmas = scheduler.time_shift(mu, 1.0, sigmas).to(torch.float32)
        timesteps = sigmas * steps
    return sigmas.to(device), timesteps.to(device)


def repeat_pairs(tensor: Tensor) -> Tensor:
    """(B, ...) -> (2B, ...): pair i's value at rows i (winner) and B + i (loser)."""
    return tensor.repeat(2, *([1] * (tensor.dim() - 1)))


def _broadcast_rows(values: Tensor, like: Tensor) -> Tensor:
    return values.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


def noisy_latents(latents: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """(1 - sigma) x_0 + sigma noise for (2B, ...) latents, with (B, ...) noise and (B,) sigmas
    shared by each pair."""
    _check_pairs(latents, noise, sigmas)
    sigma_rows = _broadcast_rows(repeat_pairs(sigmas), latents)
    return (1.0 - sigma_rows) * latents + sigma_rows * repeat_pairs(noise)


def velocity_target(latents: Tensor, noise: Tensor) -> Tensor:
    """noise - x_0 per row, (2B, ...): winner and loser latents differ, so do their targets."""
    if noise.shape[0] * 2 != latents.shape[0] or noise.shape[1:] != latents.shape[1:]:
        raise ValueError(
            f"noise: expected (B, ...) = ({latents.shape[0] // 2}, *{tuple(latents.shape[1:])}) "
            f"for latents {tuple(latents.shape)}, got {tuple(noise.shape)}"
        )
    return repeat_pairs(noise) - latents


def loss_weights(sigmas: Tensor, loss_weighting: str) -> Tensor:
    """w(sigma) per pair (B,), fp32, by diffusers' ``compute_loss_weighting_for_sd3``."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(
            f"loss_weighting: unknown {loss_weighting!r}; expected one of "
            f"{', '.join(LOSS_WEIGHTINGS)}"
        )
    return compute_loss_weighting_for_sd3(loss_weighting, sigmas.float()).float()


def apply_pair_weights_inside_margin(
    model_pred: Tensor, ref_pred: Tensor, target: Tensor, weights: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Scales both rows of pair i by sqrt(w_i), so each per-row MSE (and so u_i) is w_i times
    the unweighted one; preference_loss then needs no change. See the module docstring for
    what this does to lambda."""
    scale = repeat_pairs(weights.float().sqrt())
    return (
        model_pred * _broadcast_rows(scale, model_pred),
        ref_pred * _broadcast_rows(scale, ref_pred),
        target * _broadcast_rows(scale, target),
    )


def _check_pairs(latents: Tensor, noise: Tensor, sigmas: Tensor) -> None:
    if latents.dim() < 2 or latents.shape[0] < 2 or latents.shape[0] % 2:
        raise ValueError(
            f"latents: expected (2B, ...) with winners first, got {tuple(latents.shape)}"
        )
    batch_pairs = latents.shape[0] // 2
    if tuple(noise.shape) != (batch_pairs, *latents.shape[1:]):
        raise ValueError(
            f"noise: expected {(batch_pairs, *latents.shape[1:])} (one draw per pair), got "
            f"{tuple(noise.shape)}"
        )
    if tuple(sigmas.shape) != (batch_pairs,):
        raise ValueError(
            f"sigmas: expected ({batch_pairs},), one per pair, got {tuple(sigmas.shape)}"
        )


def refuse_timestep_weighting(mode: str) -> None:
    """The trainer's ``--timestep-weighting`` (sdpo.timesteps: DPO-C&M, importance weights) is
    derived for DDPM's Gaussian reverse steps; refuse it for flow-matching models."""
    if mode != "none":
        raise ValueError(
            f"timestep_weighting: {mode!r} is derived for DDPM's Gaussian reverse steps (it needs "
            "scheduler.betas); flow-matching models (SD3, FLUX, Wan) sample with a deterministic "
            "ODE, where that ratio is undefined: use --timestep-weighting none"
        )
