"""Validation images during training: a fixed-seed grid from the current policy UNet.

Every ``--validation-every`` optimizer steps (and after the last), the policy (never the frozen
reference) draws one image per prompt of ``--validation-prompts`` with diffusers' own pipeline
(``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``) built from the trainer's loaded
UNet, VAE, text encoders and tokenizers, and a DDIM sampler made from the training scheduler's
config. The same seed every time, so the grids of a run differ only by the training between them.
The grid goes to ``validation/step-XXXXXX.png`` (prompts in ``validation/prompts.txt``, in grid
order) and to the tracker (TensorBoard or wandb).

Cost: prompts x ``--validation-steps`` UNet calls (x2 with guidance > 1), e.g. 4 prompts x 20
steps x 2 = 160 forwards, a few seconds on a GPU for SD1.5. The draw runs under
``torch.random.fork_rng`` with its own generator, and the UNet goes back to training mode, so
training's losses are the same with and without it (tests/train/test_knobs.py checks).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from sdpo.train.errors import UsageError
from sdpo.train.outputs import replacing, writing

logger = logging.getLogger("sdpo.train")

# More prompts than this would make validation a second job; a suite file is cut to its first 16.
MAX_PROMPTS = 16


def read_prompts(path: str) -> list[str]:
    """The prompts of a text file (one per non-empty line) or an sdpo-eval suite JSON (a list of
    objects with a string "prompt"). UsageError when missing, unreadable or empty."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"validation_prompts: no such file {path}")
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"validation_prompts: cannot read {path} ({error})") from None
    if file.suffix == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as error:
            raise UsageError(f"validation_prompts: {path} is not JSON ({error})") from None
        if not isinstance(entries, list) or not all(
            isinstance(entry, dict) and isinstance(entry.get("prompt"), str) for entry in entries
        ):
            raise UsageError(
                f'validation_prompts: {path} must be a list of objects with a string "prompt" '
                "(an sdpo-eval suite), or a text file with one prompt per line"
            )
        prompts = [entry["prompt"].strip() for entry in entries]
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [prompt for prompt in prompts if prompt]
    if not prompts:
        raise UsageError(f"validation_prompts: {path} holds no prompt; give one per line")
    return prompts


def build_pipeline(models, device: torch.device):
    """A diffusers pipeline over the trainer's own modules (no copies, nothing loaded)."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    if models.vae is None:
        raise UsageError(
            "validation_prompts: this model has no VAE (a pixel-space model, as sdpo-demo's); "
            "validation images need an SD1.5/SDXL-style model with a VAE"
        )
    if not isinstance(models.scheduler, DDPMScheduler):
        raise UsageError(
            "validation_prompts: validation images support the DDPM family (SD1.5, SDXL, tiny), "
            f"not a {type(models.scheduler).__name__} model"
        )
    # SD1.5's shipped sampler settings (steps_offset 1, no clipping, final alpha from the
    # schedule); the pipeline warns about any other.
    sampler = DDIMScheduler.from_config(
        models.scheduler.config, clip_sample=False, steps_offset=1, set_alpha_to_one=False
    )
    tokenizers, encoders = models.text.tokenizers, list(models.text.encoders)
    if models.text.sdxl:
        pipeline = StableDiffusionXLPipeline(
            vae=models.vae,
            text_encoder=encoders[0],
            text_encoder_2=encoders[1],
            tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1],
            unet=models.unet,
            scheduler=sampler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    else:
        pipeline = StableDiffusionPipeline(
            vae=models.vae,
            text_encoder=encoders[0],
            tokenizer=tokenizers[0],
            unet=models.unet,
            scheduler=sampler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def image_grid(images: list[np.ndarray], columns: int) -> np.ndarray:
    """(H, W, 3) uint8 images, row-major into one (rows H, columns W, 3) grid."""
    height, width, _ = images[0].shape
    rows = -(-len(images) // columns)
    grid = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid[row * height : (row + 1) * height, column * width : (column + 1) * width] = image
    return grid


class Validator:
    """Draws the validation grid; ``run(step)`` on the ranks that hold the policy's weights."""

    def __init__(self, config, models, device: torch.device, output_dir: Path) -> None:
        prompts = read_prompts(config.validation_prompts)
        if len(prompts) > MAX_PROMPTS:
            logger.info(
                "validation: using the first %d of %d prompts in %s",
                MAX_PROMPTS,
                len(prompts),
                config.validation_prompts,
            )
        self.prompts = prompts[:MAX_PROMPTS]
        self.config, self.models, self.device = config, models, device
        self.pipeline = build_pipeline(models, device)
        self.folder = output_dir / "validation"

    def images(self) -> list[np.ndarray]:
        """One (H, W, 3) uint8 image per prompt from the policy, the same noise every call."""
        config, unet = self.config, self.models.unet
        was_training = unet.training
        unet.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                generator = torch.Generator(self.device).manual_seed(config.validation_seed)
                autocast = torch.autocast(
                    self.device.type,
                    dtype=torch.bfloat16,
                    enabled=self.device.type == "cuda" and config.mixed_precision == "bf16",
                )
                with autocast:
                    output = self.pipeline(
                        self.prompts,
                        height=config.resolution,
                        width=config.resolution,
                        num_inference_steps=config.validation_steps,
                        guidance_scale=config.validation_guidance,
                        generator=generator,
                        output_type="np",
                    )
        finally:
            unet.train(was_training)
        pixels = np.asarray(output.images, dtype=np.float32)
        if not np.isfinite(pixels).all():
            logger.warning("validation: the policy's images hold non-finite pixels")
        return list((np.nan_to_num(pixels).clip(0, 1) * 255).round().astype(np.uint8))

    def run(self, step: int, tracker=None, write: bool = True) -> Path | None:
        """Draws the grid; with ``write`` saves it (and the prompts) and hands it to ``tracker``.
        Returns the PNG's path (None when not writing)."""
        from PIL import Image

        images = self.images()
        if not write:
            return None
        columns = min(len(images), 4)
        grid = image_grid(images, columns)
        prompts_file = self.folder / "prompts.txt"
        with writing("validation", prompts_file):
            self.folder.mkdir(parents=True, exist_ok=True)
            if not prompts_file.exists():
                prompts_file.write_text("".join(prompt + "\n" for prompt in self.prompts))
        path = self.folder / f"step-{step:06d}.png"
        with writing("validation", path), replacing(path) as temporary:
            Image.fromarray(grid).save(temporary, format="PNG")
        if tracker is not None:
            tracker.log_image("validation", grid, step, caption=" | ".join(self.prompts))
        logger.info("validation: step %d: %d images -> %s", step, len(images), path)
        return path
