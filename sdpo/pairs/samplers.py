"""What ``sdpo-pairs`` draws images from: anything with ``images(prompts, seeds) -> [PIL]``.

- diffusers pipelines, loaded exactly as ``sdpo-eval generate`` loads them
  (``sdpo.eval.generate.load_pipeline``: SD1.5, SDXL, SD3, FLUX; a trained ``--unet``,
  ``--transformer`` or ``--lora``), sampled with a CPU generator per image;
- the toy world's pixel-space model (``--model toy``): the demo's base (``demo``: DDPM,
  ``demo-flow``: flow matching) or any folder of that kind, with a trainer export in ``--unet``,
  sampled by the demo's own samplers (DDIM / flow-match Euler, classifier-free guidance) with
  each image's starting noise drawn from its seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch


class ImageSampler(Protocol):
    def images(self, prompts: list[str], seeds: list[int]) -> list: ...


TOY_DEFAULT_STEPS, TOY_DEFAULT_GUIDANCE = 25, 3.0  # the demo's reward sampler (sdpo/demo/base.py)


@dataclass
class ToySampler:
    """The toy model (``sdpo.train.models.Models`` of a demo base) and its sampler settings."""

    models: object
    unet: torch.nn.Module
    steps: int = TOY_DEFAULT_STEPS
    guidance: float = TOY_DEFAULT_GUIDANCE

    @torch.no_grad()
    def images(self, prompts: list[str], seeds: list[int]) -> list:
        from PIL import Image

        from sdpo.demo import base, flow

        noise = torch.stack(
            [
                torch.randn(
                    (3, base.IMAGE_SIZE, base.IMAGE_SIZE),
                    generator=torch.Generator().manual_seed(seed),
                )
                for seed in seeds
            ]
        )
        sampler = flow.sample if self.models.flow is not None else base.sample
        pixels = sampler(
            self.models, self.unet, prompts, seed=0, steps=self.steps, guidance=self.guidance,
            noise=noise.to(next(self.unet.parameters()).device),
        )  # fmt: skip
        values = ((pixels.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in values]


def load_toy_sampler(
    pretrained: str,
    unet: str | None = None,
    *,
    steps: int = TOY_DEFAULT_STEPS,
    guidance: float = TOY_DEFAULT_GUIDANCE,
    device: torch.device | None = None,
) -> ToySampler:
    """``pretrained``: "demo", "demo-flow" or a toy model folder; ``unet``: the trainer's export
    of a run from it (``unet/`` or ``unet.pth``; a flow run's ``transformer/`` or
    ``transformer.pth``)."""
    from sdpo.demo import base, flow
    from sdpo.eval.generate import load_unet_into
    from sdpo.train import toy_flow

    if steps < 1:
        raise ValueError(f"--steps: expected >= 1, got {steps}")
    folder = {"demo": base.PACKAGED_BASE, "demo-flow": flow.PACKAGED_FLOW_BASE}.get(pretrained)
    folder = Path(pretrained).expanduser() if folder is None else folder
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--pretrained {pretrained}: no such folder; for --model toy give demo, demo-flow or "
            "a toy model folder (sdpo/demo/base_model's layout)"
        )
    try:
        models = (
            flow.load_flow_base(folder)
            if toy_flow.is_toy_flow_folder(folder)
            else base.load_base(folder)
        )
    except (OSError, ValueError, KeyError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"--pretrained {folder}: not a toy model folder ({first})") from error
    if unet is not None:
        holder = _UnetHolder(models.unet)
        load_unet_into(holder, unet)
        models.unet = holder.unet
        if models.flow is not None:
            models.flow.transformer = holder.unet
    device = device or torch.device("cpu")
    models.unet.to(device).eval()
    models.text.encoders[0].to(device)
    return ToySampler(models, models.unet, steps, guidance)


class _UnetHolder:
    """What ``load_unet_into`` expects of a pipeline: a ``unet`` attribute."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
