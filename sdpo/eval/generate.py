"""``sdpo-eval generate``: images for a prompt suite from a base pipeline and a trained UNet.

Seeds are per prompt (``seed + index``), so any sharding or batch size gives the same image for
a prompt. Under torchrun each rank renders the prompts ``index % world_size == rank`` and rank 0
writes the manifest after a barrier. CFG: diffusers computes ``eps_u + s (eps_c - eps_u)``; the
reference evaluation's "7.5" is ``eps_c + 7.5 (eps_c - eps_u)`` = diffusers' 8.5
(ALGORITHMS.md section 7), so ``--cfg-formula reference`` passes ``guidance + 1`` to diffusers.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sdpo.eval.manifest import load_entries, meta_path, save_entries

SCHEDULERS = ("default", "ddim", "euler", "dpm")


@dataclass
class GenerateSettings:
    pretrained: str
    suite: str
    output_dir: str
    unet: str | None = None
    model: str = "sd15"
    steps: int = 50
    resolution: int | None = None
    guidance: float = 7.5
    cfg_formula: str = "diffusers"
    scheduler: str = "default"
    batch_size: int = 4
    seed: int = 0
    limit: int | None = None
    dtype: str = "bf16"


def diffusers_guidance(guidance: float, cfg_formula: str) -> float:
    """The guidance_scale to give diffusers for ``guidance`` under ``cfg_formula``."""
    if cfg_formula == "diffusers":
        return guidance
    if cfg_formula == "reference":
        return guidance + 1.0
    raise ValueError(f"cfg_formula: expected 'reference' or 'diffusers', got {cfg_formula!r}")


def load_unet_into(pipeline, unet_path: str) -> None:
    """A diffusers UNet folder or a ``unet.pth`` state dict (as sdpo-train exports both)."""
    from diffusers import UNet2DConditionModel

    path = Path(unet_path).expanduser()
    if path.is_dir():
        unet = UNet2DConditionModel.from_pretrained(path, local_files_only=True)
        pipeline.unet = unet.to(pipeline.unet.device, pipeline.unet.dtype)
    elif path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = pipeline.unet.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"unet: {path} does not fit the pipeline's UNet (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}): was it trained from this --pretrained model?"
            )
    else:
        raise FileNotFoundError(f"unet: no such file or folder {path}")


def _scheduler(pipeline, name: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {
        "ddim": DDIMScheduler,
        "euler": EulerDiscreteScheduler,
        "dpm": DPMSolverMultistepScheduler,
    }
    if name == "default":
        return pipeline.scheduler
    if name not in classes:
        raise ValueError(f"scheduler: expected one of {', '.join(SCHEDULERS)}, got {name!r}")
    return classes[name].from_config(pipeline.scheduler.config)


def generate(settings: GenerateSettings, device: torch.device | None = None) -> Path:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pretrained = Path(settings.pretrained).expanduser()
    layout = "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
    if not pretrained.is_dir():
        raise FileNotFoundError(
            f"--pretrained: no such folder {pretrained}; pass a local diffusers pipeline folder "
            f"{layout}, e.g. from `hf download stable-diffusion-v1-5/stable-diffusion-v1-5 "
            "--local-dir DIR`"
        )
    if not (pretrained / "model_index.json").is_file():
        raise ValueError(
            f"--pretrained {pretrained}: not a diffusers pipeline folder (no model_index.json); "
            f"expected {layout}"
        )
    entries = load_entries(settings.suite, "--suite")
    if settings.limit is not None:
        if settings.limit < 1:
            raise ValueError(f"--limit: expected >= 1, got {settings.limit}")
        entries = entries[: settings.limit]
    guidance_scale = diffusers_guidance(settings.guidance, settings.cfg_formula)
    for name, value in (("--steps", settings.steps), ("--batch-size", settings.batch_size)):
        if value < 1:
            raise ValueError(f"{name}: expected >= 1, got {value}")
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if settings.dtype == "bf16" and device.type == "cuda" else torch.float32
    pipeline_class = (
        StableDiffusionXLPipeline if settings.model == "sdxl" else StableDiffusionPipeline
    )
    try:
        pipeline = pipeline_class.from_pretrained(
            pretrained, dtype=dtype, local_files_only=True, safety_checker=None
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"--pretrained {pretrained}: cannot load a {pipeline_class.__name__} from it "
            f"({first}); is --model {settings.model} right?"
        ) from error
    if settings.unet:
        load_unet_into(pipeline, settings.unet)
    pipeline.scheduler = _scheduler(pipeline, settings.scheduler)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    resolution = settings.resolution or pipeline.unet.config.sample_size * pipeline.vae_scale_factor

    # Absolute image paths: `score` may run from another directory.
    output = Path(settings.output_dir).expanduser().resolve()
    images_dir = output / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    mine = [index for index in range(len(entries)) if index % world_size == rank]
    for start in range(0, len(mine), settings.batch_size):
        indices = mine[start : start + settings.batch_size]
        generators = [
            torch.Generator(device="cpu").manual_seed(settings.seed + index) for index in indices
        ]
        result = pipeline(
            prompt=[entries[index]["prompt"] for index in indices],
            num_inference_steps=settings.steps,
            guidance_scale=guidance_scale,
            height=resolution,
            width=resolution,
            generator=generators,
        )
        for index, image in zip(indices, result.images, strict=True):
            image.save(images_dir / f"{index:05d}.png")
    if world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        dist.barrier()
    manifest = output / "manifest.json"
    if rank == 0:
        written = [
            {**entry, "gen_image_path": str(images_dir / f"{index:05d}.png")}
            for index, entry in enumerate(entries)
        ]
        save_entries(manifest, written)
        meta = asdict(settings) | {
            "diffusers_guidance_scale": guidance_scale,
            "resolution": resolution,
            "scheduler_class": type(pipeline.scheduler).__name__,
            "world_size": world_size,
        }
        meta_path(manifest).write_text(json.dumps(meta, indent=2) + "\n")
    return manifest
