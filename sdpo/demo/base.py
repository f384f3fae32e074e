"""The demo's base model: the trainer's tiny text-conditional UNet, in pixel space, pre-trained
with the plain denoising loss on correctly captioned toy images for a short schedule (3000
steps of 32), so that it draws and mostly follows its captions but still gets an attribute
wrong in some samples (reward of its samples 0.85 of 1, measured with seed 0).

Why clean captions: with 30% of captions wrong per attribute the same schedule gave a base
that ignores its captions (reward 0.46, the level of a caption-blind model, and a wrong colour
word changed its denoising error by under 4%), so a preference for images that match their
caption had nothing to sharpen: neither run learned a held-out margin. With clean captions a
wrong colour word raises the error by 40-70% and the preference is learned (the demo's report).

Also the sampler (DDIM with classifier-free guidance) used to measure the reward of what a
model draws before and after preference training.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from sdpo.train import toy
from sdpo.train.models import Models, build_tiny, load_pretrained, save_tiny_pretrained

IMAGE_SIZE = 16
BASE_LABEL_NOISE = 0.0
PACKAGED_BASE = Path(__file__).resolve().parent / "base_model"


class BaseBatch(NamedTuple):
    """One base-training batch."""

    pixels: Tensor  # (B, 3, S, S) toy images in [-1, 1]
    hidden: Tensor  # (B, L, D) the frozen text encoder's states of their captions ("" for ~10%)
    noise: Tensor  # (B, 3, S, S) standard normal, one per image


def draw_base_batch(
    data: toy.CaptionedImages,
    tokenizer,
    encoder: torch.nn.Module,
    batch_size: int,
    generator: torch.Generator,
) -> BaseBatch:
    """Images drawn with replacement, their captions (10% emptied) encoded, and the noise. The
    draws from ``generator`` come in this order: the indices, the caption drops, the noise; the
    callers draw their timesteps after it. The packaged bases were trained with this order:
    ``--objective flow --retrain-base`` reproduces the packaged flow base bit for bit at one
    thread only while it stays."""
    index = torch.randint(len(data.captions), (batch_size,), generator=generator)
    pixels = data.images[index]
    # 10% empty captions: the unconditional model that classifier-free guidance needs.
    captions = [
        "" if draw < 0.1 else data.captions[i]
        for i, draw in zip(
            index.tolist(), torch.rand(batch_size, generator=generator).tolist(), strict=True
        )
    ]
    tokens = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    hidden = encoder(tokens).last_hidden_state
    noise = torch.randn(pixels.shape, generator=generator)
    return BaseBatch(pixels, hidden, noise)


def train_base_unet(
    unet: torch.nn.Module,
    tokenizer,
    encoder: torch.nn.Module,
    data: toy.CaptionedImages,
    denoising_loss: Callable[[BaseBatch, torch.Generator], Tensor],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    log_every: int,
    label: str,
) -> None:
    """The bases' training loop (the DDPM base's and the flow base's): AdamW and a one-cycle
    schedule (5% warm-up), a batch per step from :func:`draw_base_batch` on a generator seeded
    ``seed + 2``, ``denoising_loss(batch, generator)`` (which draws the timesteps), the gradient
    norm clipped to 1. Leaves ``unet`` in eval mode."""
    unet.train()
    parameters = list(unet.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.05
    )
    generator = torch.Generator().manual_seed(seed + 2)
    start = time.perf_counter()
    running = 0.0
    for step in range(1, steps + 1):
        batch = draw_base_batch(data, tokenizer, encoder, batch_size, generator)
        loss = denoising_loss(batch, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item()
        if step % log_every == 0:
            print(
                f"{label} step {step}/{steps}: loss {running / log_every:.4f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
            running = 0.0
    unet.eval()


def pretrain_base(
    output: str | Path,
    *,
    steps: int = 3000,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    images: int = 4096,
    seed: int = 0,
    log_every: int = 100,
) -> Models:
    """Trains the base model from scratch and saves it as a diffusers-style folder."""
    torch.manual_seed(seed)
    models = build_tiny(IMAGE_SIZE, seed, pixel_space=True)
    data = toy.captioned_images(images, IMAGE_SIZE, BASE_LABEL_NOISE, seed=seed + 1)
    # The text encoder stays as built, random and frozen (the trainer's TextConditioner freezes
    # it): 16 captions of 7 words only need distinct embeddings, which a random encoder gives.
    unet, scheduler = models.unet, models.scheduler

    def denoising_loss(batch: BaseBatch, generator: torch.Generator) -> Tensor:
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator
        )
        noisy = scheduler.add_noise(batch.pixels, batch.noise, timesteps)
        return (unet(noisy, timesteps, batch.hidden).sample - batch.noise).square().mean()

    train_base_unet(
        unet, models.text.tokenizers[0], models.text.encoders[0], data, denoising_loss,
        steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
        log_every=log_every, label="base",
    )  # fmt: skip
    save_tiny_pretrained(models, str(output))
    return models


def load_base(path: str | Path = PACKAGED_BASE) -> Models:
    if not (Path(path) / "unet").is_dir():
        raise FileNotFoundError(
            f"demo base model: no model at {path}; run `sdpo-demo --retrain-base` to build it"
        )
    return load_pretrained(str(path), "tiny", IMAGE_SIZE, allow_download=False)


def guided_start(
    models: Models,
    unet: torch.nn.Module,
    captions: list[str],
    seed: int,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """What both demo samplers (DDIM here, flow-match Euler in flow.py) start from, on
    ``unet``'s device: the hidden states of the empty then the given captions (2N rows, for
    classifier-free guidance) and the starting noise (N, 3, S, S), drawn from ``seed`` on the
    CPU so a seed gives the same noise on any device and to either sampler. ``noise``: that
    starting noise given instead (``sdpo-pairs`` draws each image's from its own seed)."""
    device = next(unet.parameters()).device
    conditional, _ = models.text(captions, device)
    unconditional, _ = models.text([""] * len(captions), device)
    if noise is None:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(captions), 3, IMAGE_SIZE, IMAGE_SIZE), generator=generator)
    elif noise.shape != (len(captions), 3, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"noise: expected {(len(captions), 3, IMAGE_SIZE, IMAGE_SIZE)}, got {tuple(noise.shape)}"
        )
    return torch.cat([unconditional, conditional]), noise.to(device)


@torch.no_grad()
def sample(
    models: Models,
    unet: torch.nn.Module,
    captions: list[str],
    *,
    seed: int,
    steps: int = 25,
    guidance: float = 3.0,
    noise: Tensor | None = None,
) -> Tensor:
    """Images (N, 3, S, S) in [-1, 1] by DDIM with classifier-free guidance (diffusers form:
    eps_u + guidance (eps_c - eps_u)); the same seed gives the same starting noise (``noise``:
    the starting noise itself, see guided_start)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(models.scheduler.config)
    scheduler.set_timesteps(steps)
    hidden, images = guided_start(models, unet, captions, seed, noise)
    for timestep in scheduler.timesteps:
        prediction = unet(torch.cat([images, images]), timestep, hidden).sample
        uncond, cond = prediction.chunk(2)
        images = scheduler.step(uncond + guidance * (cond - uncond), timestep, images).prev_sample
    return images.clamp(-1, 1)
