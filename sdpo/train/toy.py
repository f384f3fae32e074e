"""The toy world: procedural captioned images and a reward computed from pixels.

An image is one coloured shape on a plain background, ``image_size`` pixels square (16 by
default), RGB in [-1, 1] like a diffusion model's pixel space. Its caption names the three
attributes: "a red circle on a white background". The reward reads the pixels back:

- the background colour is the median of the border pixels;
- the foreground is every pixel farther than ``FOREGROUND_DISTANCE`` from that background;
- the foreground's mean colour, the background colour and the fill ratio of the foreground's
  bounding box (1.0 for a square, ~0.8 for a disc) are each turned into the probability of the
  caption's value among the alternatives (a softmax over negative squared distances);
- reward = (P(colour) + P(shape) + P(background)) / 3, times 0 when the foreground is empty or
  fills most of the frame. So 1 is an image that matches its caption, ~2/3 one that gets one
  attribute wrong, ~0 noise: a graded score, so partial improvements show.

Everything is generated from a seed; nothing is downloaded. The trainer's synthetic pairs (no
``--data``) and the tiny tokenizer's vocabulary come from here, and so does ``sdpo-demo``'s world.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

COLORS = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.12, 0.78, 0.20),
    "blue": (0.15, 0.30, 0.92),
    "yellow": (0.95, 0.85, 0.10),
}
SHAPES = ("square", "circle")
BACKGROUNDS = {"black": (0.06, 0.06, 0.06), "white": (0.94, 0.94, 0.94)}
# Fill ratio of the bounding box: a square fills it; a rasterised disc of radius r + 0.5 fills
# 0.84, 0.76, 0.85, 0.80 of its (2r + 1)^2 box for r = 2, 3, 4, 5 (see expected_fill).
SHAPE_FILL = {"square": 1.0, "circle": 0.8}
FOREGROUND_DISTANCE = (
    0.35  # RGB distance in [0, 1] units separating a shape pixel from the background
)
COLOR_TEMPERATURE = 0.02  # squared RGB distance scale of the colour softmax
FILL_TEMPERATURE = 0.004  # squared fill-ratio scale of the shape softmax
MIN_FOREGROUND_FRACTION = 0.02
MAX_FOREGROUND_FRACTION = 0.75


@dataclass(frozen=True)
class ToySpec:
    color: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"

    @staticmethod
    def from_caption(caption: str) -> ToySpec:
        words = caption.split()
        if (
            len(words) != 7
            or words[0] != "a"
            or words[3:5] != ["on", "a"]
            or words[6] != "background"
        ):
            raise ValueError(
                f"caption: expected 'a COLOR SHAPE on a BACKGROUND background', got {caption!r}"
            )
        spec = ToySpec(words[1], words[2], words[5])
        if (
            spec.color not in COLORS
            or spec.shape not in SHAPES
            or spec.background not in BACKGROUNDS
        ):
            raise ValueError(f"caption: unknown attribute in {caption!r}")
        return spec


def all_specs() -> list[ToySpec]:
    return [ToySpec(*values) for values in itertools.product(COLORS, SHAPES, BACKGROUNDS)]


def corrupt(spec: ToySpec, rate: float, generator: torch.Generator) -> ToySpec:
    """Each attribute replaced by a different random value with probability ``rate``."""

    def maybe_swap(value: str, choices) -> str:
        if torch.rand((), generator=generator) >= rate:
            return value
        others = [choice for choice in choices if choice != value]
        return others[int(torch.randint(len(others), (), generator=generator))]

    return ToySpec(
        maybe_swap(spec.color, list(COLORS)),
        maybe_swap(spec.shape, list(SHAPES)),
        maybe_swap(spec.background, list(BACKGROUNDS)),
    )


def render(spec: ToySpec, image_size: int, generator: torch.Generator) -> Tensor:
    """(3, S, S) in [-1, 1]: the shape at a random position and size, slight colour jitter."""
    radius = int(
        torch.randint(max(2, image_size // 5), max(3, image_size // 3) + 1, (), generator=generator)
    )
    low, high = radius + 1, image_size - radius - 1
    center_y = int(torch.randint(low, max(low + 1, high), (), generator=generator))
    center_x = int(torch.randint(low, max(low + 1, high), (), generator=generator))
    coords = torch.arange(image_size, dtype=torch.float32)
    dy = (coords[:, None] - center_y).expand(image_size, image_size)
    dx = (coords[None, :] - center_x).expand(image_size, image_size)
    if spec.shape == "square":
        mask = (dx.abs() <= radius) & (dy.abs() <= radius)
    else:
        mask = dx.square() + dy.square() <= (radius + 0.5) ** 2
    jitter = 0.04 * (torch.rand(3, generator=generator) - 0.5)
    color = (torch.tensor(COLORS[spec.color]) + jitter).clamp(0, 1)
    background = torch.tensor(BACKGROUNDS[spec.background])
    image = torch.where(mask, color[:, None, None], background[:, None, None])
    image = image + 0.02 * torch.randn(image.shape, generator=generator)
    return (image.clamp(0, 1) * 2 - 1).contiguous()


def _softmax_probability(distances_sq: Tensor, index: Tensor, temperature: float) -> Tensor:
    return torch.softmax(-distances_sq / temperature, dim=-1).gather(-1, index[:, None])[:, 0]


def reward(images: Tensor, captions: list[str]) -> Tensor:
    """(N,) rewards in [0, 1] for (N, 3, S, S) images in [-1, 1] (see the module docstring)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected (N, 3, S, S), got {tuple(images.shape)}")
    if len(captions) != images.shape[0]:
        raise ValueError(f"captions: expected {images.shape[0]}, got {len(captions)}")
    specs = [ToySpec.from_caption(caption) for caption in captions]
    pixels = ((images.detach().float().clamp(-1, 1) + 1) / 2).cpu()
    size = pixels.shape[-1]
    border = torch.ones(size, size, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    background = pixels[:, :, border].median(dim=2).values  # (N, 3)
    distance = (pixels - background[:, :, None, None]).norm(dim=1)  # (N, S, S)
    foreground = distance > FOREGROUND_DISTANCE
    fraction = foreground.float().mean(dim=(1, 2))
    weights = foreground.float()
    foreground_color = (pixels * weights[:, None]).sum(dim=(2, 3)) / weights.sum(
        dim=(1, 2)
    ).clamp_min(1)[:, None]

    rows = foreground.any(dim=2)
    cols = foreground.any(dim=1)
    index = torch.arange(size)
    height = (
        torch.where(rows, index, -1).max(1).values
        - torch.where(rows, index, size).min(1).values
        + 1
    ).clamp_min(1)
    width = (
        torch.where(cols, index, -1).max(1).values
        - torch.where(cols, index, size).min(1).values
        + 1
    ).clamp_min(1)
    fill = weights.sum(dim=(1, 2)) / (height * width).float()

    palette = torch.tensor(list(COLORS.values()))
    backgrounds = torch.tensor(list(BACKGROUNDS.values()))
    fills = torch.tensor(list(SHAPE_FILL.values()))
    color_index = torch.tensor([list(COLORS).index(spec.color) for spec in specs])
    shape_index = torch.tensor([list(SHAPES).index(spec.shape) for spec in specs])
    background_index = torch.tensor([list(BACKGROUNDS).index(spec.background) for spec in specs])
    color_probability = _softmax_probability(
        torch.cdist(foreground_color, palette).square(), color_index, COLOR_TEMPERATURE
    )
    background_probability = _softmax_probability(
        torch.cdist(background, backgrounds).square(), background_index, COLOR_TEMPERATURE
    )
    shape_probability = _softmax_probability(
        (fill[:, None] - fills[None]).square(), shape_index, FILL_TEMPERATURE
    )
    present = (
        (fraction >= MIN_FOREGROUND_FRACTION) & (fraction <= MAX_FOREGROUND_FRACTION)
    ).float()
    return (color_probability + shape_probability + background_probability) / 3 * present


@dataclass
class CaptionedImages:
    images: Tensor  # (N, 3, S, S) in [-1, 1]
    captions: list[str]


@dataclass
class PreferencePairs:
    winners: Tensor  # (N, 3, S, S)
    losers: Tensor
    captions: list[str]
    winner_rewards: Tensor
    loser_rewards: Tensor


def captioned_images(count: int, image_size: int, label_noise: float, seed: int) -> CaptionedImages:
    """Pre-training data: each image drawn for a caption, an attribute wrong with ``label_noise``.

    The demo's base model trains on clean captions (``label_noise`` 0): at 0.3 the tiny UNet
    learned to ignore its captions altogether (see sdpo/demo/base.py).
    """
    generator = torch.Generator().manual_seed(seed)
    specs = all_specs()
    images, captions = [], []
    for _ in range(count):
        spec = specs[int(torch.randint(len(specs), (), generator=generator))]
        images.append(render(corrupt(spec, label_noise, generator), image_size, generator))
        captions.append(spec.caption)
    return CaptionedImages(torch.stack(images), captions)


def preference_pairs(count: int, image_size: int, corruption: float, seed: int) -> PreferencePairs:
    """Two images per caption, each with attributes corrupted at ``corruption``; the one with
    the higher reward wins. Pairs whose rewards differ by less than 0.05 are dropped (ties).

    Candidates are rendered and scored in chunks of 256 pairs: one reward call per chunk, not
    per pair (512 pairs: 17 s -> under 1 s on 2 cores).
    """
    generator = torch.Generator().manual_seed(seed)
    specs = all_specs()
    winners, losers, captions, winner_rewards, loser_rewards = [], [], [], [], []
    while len(captions) < count:
        chunk = [specs[int(torch.randint(len(specs), (), generator=generator))] for _ in range(256)]
        firsts = torch.stack(
            [render(corrupt(spec, corruption, generator), image_size, generator) for spec in chunk]
        )
        seconds = torch.stack(
            [render(corrupt(spec, corruption, generator), image_size, generator) for spec in chunk]
        )
        chunk_captions = [spec.caption for spec in chunk]
        first_scores = reward(firsts, chunk_captions)
        second_scores = reward(seconds, chunk_captions)
        for index, caption in enumerate(chunk_captions):
            first, second = first_scores[index], second_scores[index]
            if (first - second).abs() < 0.05 or len(captions) == count:
                continue
            swap = bool(second > first)
            winners.append(seconds[index] if swap else firsts[index])
            losers.append(firsts[index] if swap else seconds[index])
            winner_rewards.append(second if swap else first)
            loser_rewards.append(first if swap else second)
            captions.append(caption)
    return PreferencePairs(
        torch.stack(winners),
        torch.stack(losers),
        captions,
        torch.stack(winner_rewards),
        torch.stack(loser_rewards),
    )


def expected_fill(radius: int) -> float:
    """Fill ratio of a rasterised disc of radius r + 0.5 in its bounding box (for the docs)."""
    coords = torch.arange(-radius, radius + 1, dtype=torch.float32)
    inside = coords[:, None].square() + coords[None, :].square() <= (radius + 0.5) ** 2
    return float(inside.float().mean()) if radius > 0 else math.nan
