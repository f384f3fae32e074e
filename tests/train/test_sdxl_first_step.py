"""SDXL's first optimizer step rebuilt by hand with diffusers' own SDXL pipeline code for the
text conditioning: both encoders' penultimate states, the second's pooled projection, and the
added time ids shared by the two images of a pair."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_trainer import save_tiny_sdxl, write_manifest

import sdpo
from sdpo.train.config import config_from_args
from sdpo.train.data import generator_for, load_records, preprocess
from sdpo.train.trainer import train


def pipeline_from(folder: Path):
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    return StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(folder / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"),
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=AutoTokenizer.from_pretrained(folder / "tokenizer_2"),
        unet=UNet2DConditionModel.from_pretrained(folder / "unet"),
        scheduler=DDPMScheduler.from_pretrained(folder / "scheduler"),
    )


def test_sdxl_first_step_equals_the_pipelines_conditioning_by_hand(tmp_path):
    save_tiny_sdxl(tmp_path / "sdxl")
    manifest = write_manifest(tmp_path)
    config = config_from_args(
        ["--preset", "sdxl-dpo", "--pretrained", str(tmp_path / "sdxl"), "--data", str(manifest),
         "--output-dir", str(tmp_path / "run"), "--resolution", "16", "--train-batch-pairs", "2",
         "--gradient-accumulation", "1", "--max-steps", "1", "--checkpoint-every", "0",
         "--no-progress", "--mixed-precision", "no", "--caption-dropout", "0.5"]
    )  # fmt: skip
    logged = train(config)["rows"][0]

    pipe = pipeline_from(tmp_path / "sdxl")
    records = load_records(str(manifest), resolution=16, synthetic_pairs=0, seed=config.seed)
    pairs = config.train_batch_pairs
    order = torch.randperm(len(records), generator=generator_for(config.seed, 1, 0))
    chosen = order[:pairs].tolist()
    draws = torch.rand((pairs, 3), generator=generator_for(config.seed, 2, 0, 0, 0))
    winners, losers, captions = [], [], []
    for row, index in enumerate(chosen):
        record = records[index]
        flip = config.hflip
        winners.append(preprocess(record.winner, 16, flip and bool(draws[row, 0] < 0.5)))
        losers.append(preprocess(record.loser, 16, flip and bool(draws[row, 1] < 0.5)))
        captions.append("" if draws[row, 2] < config.caption_dropout else record.caption)
    generator = generator_for(config.seed, 3, 0, 0)
    with torch.no_grad():
        distribution = pipe.vae.encode(torch.stack(winners + losers)).latent_dist
        sample = torch.randn(distribution.mean.shape, generator=generator)
        latents = (distribution.mean + distribution.std * sample) * pipe.vae.config.scaling_factor
        # diffusers' own SDXL conditioning: per caption, penultimate states of both encoders
        # (concatenated) and the second encoder's pooled projection.
        hidden, _, pooled, _ = pipe.encode_prompt(
            captions, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        time_ids = pipe._get_add_time_ids(
            (16, 16), (0, 0), (16, 16), dtype=hidden.dtype,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        ).expand(2 * pairs, 6)  # fmt: skip
    noise = torch.randn((pairs, *latents.shape[1:]), generator=generator)
    timesteps = torch.randint(0, 1000, (pairs,), generator=generator)
    both = torch.cat([timesteps, timesteps])
    noisy = pipe.scheduler.add_noise(latents, torch.cat([noise, noise]), both)
    # A pair's two images share the caption, its pooled embedding and its time ids.
    added = {"text_embeds": torch.cat([pooled, pooled]), "time_ids": time_ids}
    with torch.no_grad():
        prediction = pipe.unet(
            noisy, both, torch.cat([hidden, hidden]), added_cond_kwargs=added
        ).sample
    # Step 1: the policy is the reference (same weights), so both predictions are the same.
    expected = sdpo.preference_loss(
        prediction, prediction.clone(), noise, method=config.method, beta=config.beta,
        mu=config.mu, granularity=config.granularity, backend="torch",
    )  # fmt: skip
    for key in ("model_mse_w", "model_mse_l"):
        assert logged[key] == pytest.approx(float(expected.stats[key]), rel=1e-5), key
