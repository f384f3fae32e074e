"""`sdpo-demo --objective flow`: the demo's toy as a rectified flow.

The same tiny text-conditional UNet in pixel space and the same toy world as the DDPM demo
(sdpo/demo/base.py), trained as a flow-matching model (``sdpo.train.toy_flow``):
``x_t = (1 - sigma) x_0 + sigma noise``, the model predicts the velocity ``noise - x_0``.

- The base model: pre-trained with the flow-matching loss on correctly captioned toy images,
  the DDPM base's schedule (3000 steps of 32, lr 2e-3, one-cycle, 10% empty captions), sigmas
  drawn as the trainer draws them (logit-normal(0, 1) on the 1000-entry table,
  ``flow_matching.sample_pair_sigmas``), the noisy image by diffusers'
  ``FlowMatchEulerDiscreteScheduler.scale_noise``. Packaged in ``flow_base_model`` with its
  UNet stored in fp16 (0.5 MB; loaded back in fp32); ``--retrain-base`` rebuilds it.
- The held-out errors: the trainer's ``FlowMatchingFamily`` builds ``x_t`` and the per-row
  target from the evaluation set's fixed noise and sigmas, and predicts as in training.
- The sampler: Euler on the flow ODE over the sigmas of diffusers'
  ``FlowMatchEulerDiscreteScheduler.set_timesteps`` (``x <- x + (sigma_next - sigma) v``, what
  its ``step`` does), with classifier-free guidance ``v_u + g (v_c - v_u)``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torch import Tensor, nn

from sdpo.demo.base import (
    BASE_LABEL_NOISE,
    IMAGE_SIZE,
    BaseBatch,
    guided_start,
    train_base_unet,
)
from sdpo.train import toy, toy_flow
from sdpo.train.family import FlowMatchingFamily
from sdpo.train.flow_matching import FlowDensity, sample_pair_sigmas
from sdpo.train.models import Models, TextConditioner, build_tiny

PACKAGED_FLOW_BASE = Path(__file__).resolve().parent / "flow_base_model"


def pretrain_flow_base(
    output: str | Path,
    *,
    steps: int = 3000,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    images: int = 4096,
    seed: int = 0,
    log_every: int = 100,
    half: bool = False,
) -> Models:
    """Trains the flow base from scratch (deterministic for a seed at a fixed thread count) and
    saves it as a toy flow folder (``half``: the UNet stored in fp16, as packaged)."""
    torch.manual_seed(seed)
    # The same random initial UNet and frozen random text encoder as the DDPM base for a seed.
    initial = build_tiny(IMAGE_SIZE, seed, pixel_space=True)
    unet, encoder = initial.unet, initial.text.encoders[0]
    tokenizer = initial.text.tokenizers[0]
    scheduler = toy_flow.build_flow_scheduler()
    density = FlowDensity()  # the trainer's default: logit-normal(0, 1), no loss weighting
    data = toy.captioned_images(images, IMAGE_SIZE, BASE_LABEL_NOISE, seed=seed + 1)
    sigma_table: dict = {}

    def velocity_loss(batch: BaseBatch, generator: torch.Generator) -> Tensor:
        _, timesteps = sample_pair_sigmas(
            scheduler, batch_size, density, generator, batch.pixels.device, table_cache=sigma_table
        )
        noisy = scheduler.scale_noise(batch.pixels, timesteps, batch.noise)
        velocity = batch.noise - batch.pixels
        return (unet(noisy, timesteps, batch.hidden).sample - velocity).square().mean()

    train_base_unet(
        unet, tokenizer, encoder, data, velocity_loss,
        steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
        log_every=log_every, label="flow base",
    )  # fmt: skip
    toy_flow.save_toy_flow(unet, tokenizer, encoder, output, half=half)
    return load_flow_base(output)


def load_flow_base(path: str | Path = PACKAGED_FLOW_BASE) -> Models:
    """The flow base as ``Models`` (``flow`` = its ``ToyFlowFamily``), the UNet in eval mode."""
    if not toy_flow.is_toy_flow_folder(path):
        raise FileNotFoundError(
            f"demo flow base model: no model at {path}; run `sdpo-demo --objective flow "
            "--retrain-base` to build it"
        )
    unet, tokenizer, encoder, scheduler = toy_flow.load_toy_flow(path)
    flow = toy_flow.ToyFlowFamily(unet.eval(), scheduler)
    text = TextConditioner([tokenizer], [encoder], sdxl=False, resolution=IMAGE_SIZE)
    return Models(
        unet=flow.transformer,
        reference_unet=None,
        vae=None,
        text=text,
        scheduler=flow.scheduler,
        flow=flow,
        flow_density=FlowDensity(),
    )


def evaluation_sigmas(models: Models, timesteps: Tensor) -> Tensor:
    """The training table's sigma at each DDPM-style timestep t in [1, 1000): sigma = t / 1000
    (table index 1000 - t), so the flow demo measures at the noise levels the DDPM demo draws."""
    table = models.flow.scheduler.sigmas
    return table[table.shape[0] - timesteps.long()].float()


@torch.no_grad()
def velocity_errors(
    models: Models, unet: nn.Module, pixels: Tensor, captions: list[str], noise: Tensor, sigmas
) -> tuple[Tensor, Tensor]:
    """Per-pair winner and loser velocity MSE of ``unet``: ``pixels`` (2N, ...) winners then
    losers, ``noise`` (N, ...) and ``sigmas`` (N,) shared by a pair, as the trainer's step."""
    family = FlowMatchingFamily(models.flow, models.flow_density)
    noisy, sigma_rows, target = family.noisy_inputs(pixels, noise, sigmas)
    hidden, _ = models.text(captions, torch.device("cpu"))
    prediction = family.predict(unet, noisy, sigma_rows, torch.cat([hidden, hidden]), None)
    mse = (prediction - target).square().flatten(1).mean(1)
    return mse.chunk(2)


def sampling_sigmas(models: Models, steps: int) -> Tensor:
    """(steps + 1,) sigmas from 1 to 0: those of diffusers' ``set_timesteps(steps)`` on a copy
    of the model's flow-match scheduler (the pipelines' default schedule, final 0 included)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sampler = FlowMatchEulerDiscreteScheduler.from_config(models.flow.scheduler.config)
    sampler.set_timesteps(steps)
    return sampler.sigmas.float()


def euler_step(sample: Tensor, velocity: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """One Euler step of dx/dsigma = v from sigma to sigma_next."""
    return sample + (sigma_next - sigma) * velocity


@torch.no_grad()
def sample(
    models: Models,
    unet: nn.Module,
    captions: list[str],
    *,
    seed: int,
    steps: int = 25,
    guidance: float = 3.0,
    noise: Tensor | None = None,
) -> Tensor:
    """Images (N, 3, S, S) in [-1, 1] by the flow-match Euler sampler with classifier-free
    guidance (v_u + guidance (v_c - v_u)); the same seed gives the same starting noise
    (``noise``: the starting noise itself, see guided_start)."""
    hidden, images = guided_start(models, unet, captions, seed, noise)
    sigmas = sampling_sigmas(models, steps).to(images.device)
    for sigma, sigma_next in itertools.pairwise(sigmas):
        sigma_rows = sigma.expand(2 * len(captions))
        velocity = models.flow.prediction(
            unet, torch.cat([images, images]), sigma_rows, {"prompt_embeds": hidden}
        )
        uncond, cond = velocity.chunk(2)
        images = euler_step(images, uncond + guidance * (cond - uncond), sigma, sigma_next)
    return images.clamp(-1, 1)
