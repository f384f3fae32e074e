"""The tiny pixel-space flow-matching model: the tiny preset's UNet predicting the velocity.

The same text-conditional UNet as the tiny DDPM preset (``sdpo.train.models.build_tiny_unet``,
3 channels in pixel space), trained as a rectified flow: ``x_t = (1 - sigma) x_0 + sigma noise``,
target ``noise - x_0``, sigma drawn from a ``FlowDensity`` on the 1000-entry training table of a
``FlowMatchEulerDiscreteScheduler`` (shift 1). It plugs into the trainer through the same seam as
SD3, FLUX and Wan (``sdpo.train.family.FlowMatchingFamily``), so the preference step, the noise
and sigma draws and the velocity target are the trainer's own flow-matching code.

A folder is a toy flow model when its ``scheduler/scheduler_config.json`` names
``FlowMatchEulerDiscreteScheduler``; ``sdpo-train --model tiny --pretrained FOLDER`` then trains
it with the flow-matching step (``sdpo-demo --objective flow`` does). The UNet's time input is
``sigma * 1000``, as SD3's and Wan's transformers take it (the scheduler's ``timesteps``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

FLOW_SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"


def build_flow_scheduler():
    """The toy's flow-match schedule: 1000 training sigmas, no shift (sigma = t / 1000)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def is_toy_flow_folder(path: str | Path | None) -> bool:
    """True for a local folder whose scheduler is a FlowMatchEulerDiscreteScheduler."""
    if path is None:
        return False
    config = Path(path).expanduser() / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        return False
    return json.loads(config.read_text()).get("_class_name") == FLOW_SCHEDULER_CLASS


class ToyFlowFamily:
    """The ``FlowFamily`` interface (``sdpo.train.families``) over the tiny pixel-space UNet."""

    name: ClassVar[str] = "toy-flow"
    conditioning_keys: ClassVar[tuple[str, ...]] = ("prompt_embeds",)
    pixel_dims: ClassVar[int] = 4

    def __init__(self, unet: nn.Module, scheduler) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(
                f"scheduler: expected FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}"
            )
        self.transformer = unet
        self.vae = None
        # A fresh copy: its table must stay the 1000-entry training table (set_timesteps on a
        # sampler's copy would shrink it).
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        self.sigma_tables: dict = {}

    def encode_images(self, pixels: Tensor, generator: torch.Generator | None) -> Tensor:
        """Pixel space: the images are the latents (nothing drawn from ``generator``)."""
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(
                f"pixels: {self.name} takes (N, 3, H, W) images in [-1, 1], got "
                f"{tuple(pixels.shape)}"
            )
        return pixels

    @staticmethod
    def normalize_latents(sample: Tensor) -> Tensor:
        return sample

    @staticmethod
    def image_seq_len(latents: Tensor) -> int:
        return latents.shape[-2] * latents.shape[-1]

    def timestep_scale(self) -> float:
        return float(self.scheduler.config.num_train_timesteps)

    def prediction(
        self,
        model: nn.Module,
        noisy_rows: Tensor,
        sigma_rows: Tensor,
        conditioning_rows: dict[str, Tensor],
    ) -> Tensor:
        """The velocity for (2B, 3, H, W) noisy images at sigma per row (time input sigma * 1000)."""
        from sdpo.train.families import base_module

        dtype = base_module(model).dtype
        hidden = conditioning_rows["prompt_embeds"].to(dtype)
        timesteps = sigma_rows * self.timestep_scale()
        return model(noisy_rows.to(dtype), timesteps, hidden).sample


def load_toy_flow(path: str | Path):
    """(unet, tokenizer, text encoder, scheduler) from a toy flow folder; weights in fp32 (a
    packaged folder may store them in fp16)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    root = Path(path).expanduser()
    if not is_toy_flow_folder(root):
        raise FileNotFoundError(
            f"pretrained: {path} is not a toy flow-matching model (expected scheduler/ with a "
            f"{FLOW_SCHEDULER_CLASS}, unet/, tokenizer/, text_encoder/)"
        )
    unet = UNet2DConditionModel.from_pretrained(
        root, subfolder="unet", torch_dtype=torch.float32, local_files_only=True
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        root, subfolder="scheduler", local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(
        root, subfolder="text_encoder", torch_dtype=torch.float32, local_files_only=True
    )
    return unet, tokenizer, encoder, scheduler


def load_toy_flow_models(config):
    """``sdpo.train.models.Models`` for ``--model tiny --pretrained TOY_FLOW_FOLDER``: the UNet,
    the tiny text conditioner, the flow-match scheduler, the family and the config's density."""
    from sdpo.train.flow_matching import FlowDensity, refuse_timestep_weighting
    from sdpo.train.models import Models, TextConditioner

    refuse_timestep_weighting(config.timestep_weighting)
    if config.lora_rank > 0:
        raise ValueError(
            "lora_rank: the toy flow model trains in full (its LoRA export needs a diffusers "
            "flow pipeline); use --lora-rank 0"
        )
    unet, tokenizer, encoder, scheduler = load_toy_flow(config.pretrained)
    flow = ToyFlowFamily(unet, scheduler)
    density = FlowDensity.from_config(config)
    text = TextConditioner([tokenizer], [encoder], sdxl=False, resolution=config.resolution)
    return Models(
        unet=unet,
        reference_unet=None,
        vae=None,
        text=text,
        scheduler=flow.scheduler,
        flow=flow,
        flow_density=density,
    )


def save_toy_flow(
    unet: nn.Module, tokenizer, encoder: nn.Module, folder: str | Path, *, half: bool = False
) -> None:
    """Writes a toy flow folder that ``load_toy_flow`` reads back; ``half`` stores the UNet in
    fp16 (the packaged demo base: 0.5 MB instead of 1.0 MB)."""
    import copy

    root = Path(folder)
    stored = copy.deepcopy(unet).to(torch.float16) if half else unet
    stored.save_pretrained(root / "unet")
    build_flow_scheduler().save_pretrained(root / "scheduler")
    tokenizer.save_pretrained(root / "tokenizer")
    encoder.save_pretrained(root / "text_encoder")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "SDPOToyFlowModel"}))
