"""Image and text preprocessing of each original scorer, one function per original pipeline.

Each function turns PIL images into the (N, 3, 224, 224) normalised tensor that the original
scorer's own code feeds its model; tests/eval/fixtures holds the originals' outputs (made with
their packages by tests/eval/fixtures/make_fixtures.py) and the tests compare against them.

| function | original | steps |
|---|---|---|
| ``clip_processor_preprocess`` | transformers ``CLIPImageProcessor`` (PickScore, CLIP score, the reference evaluation's aesthetics) | PIL bicubic resize of the short side, crop at ``(L - 224) // 2``, /255, normalise |
| ``torchvision_clip_preprocess`` | torchvision ``Resize(224, BICUBIC), CenterCrop(224), ToTensor, Normalize`` on PIL: ImageReward's transform, OpenAI CLIP's (LAION aesthetics' original pipeline) and open_clip's default eval transform | as above, crop at ``int(round((L - 224) / 2))`` |
| ``hpsv2_preprocess`` | the hpsv2 package's ``preprocess_val`` (``ToTensor``, open_clip's ``ResizeMaxSize``, ``Normalize``) | tensor bicubic (antialiased) resize of the LONG side to 224, zero padding to a square, normalise |
"""

from __future__ import annotations

import html
import re

import torch
from torch import Tensor

# OpenAI CLIP's normalisation; the LAION ViT-H-14 models (PickScore, HPSv2), BLIP (ImageReward)
# and the transformers CLIP processors use the same numbers.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_unit_tensor(image) -> Tensor:
    """A PIL image -> (3, H, W) float in [0, 1] (torchvision's ToTensor: uint8 / 255)."""
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255.0


def _normalise(batch: Tensor) -> Tensor:
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (batch - mean) / std


def _resize_short_side(image, size: int):
    """PIL bicubic resize of the short side to ``size``; the long side becomes
    ``int(size * long / short)`` (truncated, as both CLIPImageProcessor and torchvision compute it;
    rounding moves the crop of a 57x40 image by a pixel)."""
    from PIL import Image

    short = min(image.size)
    width = size if image.width == short else int(size * image.width / short)
    height = size if image.height == short else int(size * image.height / short)
    return image.resize((width, height), Image.BICUBIC)


def clip_processor_preprocess(images: list, size: int = 224) -> Tensor:
    """transformers' CLIPImageProcessor (the slow, PIL one that PickScore's and the reference
    evaluation's code call): its centre crop starts at ``(L - size) // 2``."""
    batch = []
    for image in images:
        image = _resize_short_side(image.convert("RGB"), size)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        batch.append(_to_unit_tensor(image.crop((left, top, left + size, top + size))))
    return _normalise(torch.stack(batch))


def torchvision_clip_preprocess(images: list, size: int = 224) -> Tensor:
    """torchvision's ``Resize(size, BICUBIC), CenterCrop(size), ToTensor, Normalize`` on PIL
    images: ImageReward's transform, OpenAI CLIP's ``clip.load`` transform (which the LAION
    aesthetics head was trained on) and open_clip's default eval transform. torchvision's
    CenterCrop starts at ``int(round((L - size) / 2))`` (Python's round: half to even), one pixel
    later than ``(L - size) // 2`` when ``L - size`` is 3 mod 4 (1216x832 -> 327x224)."""
    batch = []
    for image in images:
        image = _resize_short_side(image.convert("RGB"), size)
        left = round((image.width - size) / 2.0)
        top = round((image.height - size) / 2.0)
        batch.append(_to_unit_tensor(image.crop((left, top, left + size, top + size))))
    return _normalise(torch.stack(batch))


imagereward_preprocess = torchvision_clip_preprocess
openai_clip_preprocess = torchvision_clip_preprocess
open_clip_preprocess = torchvision_clip_preprocess


def hpsv2_preprocess(images: list, size: int = 224) -> Tensor:
    """The hpsv2 package's ``preprocess_val``: ``ToTensor``, then open_clip's ``ResizeMaxSize``
    on the float tensor (the LONG side to ``size``, the other ``round(dim * size / long)``,
    bicubic with antialiasing, no clamping, as torchvision's tensor resize), zero padding (left /
    top get ``pad // 2``), then ``Normalize``: a 768x512 image is 224x149 plus 75 rows of zeros."""
    batch = []
    for image in images:
        pixels = _to_unit_tensor(image.convert("RGB"))
        height, width = pixels.shape[1:]
        scale = size / float(max(height, width))
        if scale != 1.0:
            new_height, new_width = round(height * scale), round(width * scale)
            pixels = torch.nn.functional.interpolate(
                pixels[None],
                size=(new_height, new_width),
                mode="bicubic",
                align_corners=False,
                antialias=True,
            )[0]
            pad_h, pad_w = size - new_height, size - new_width
            pixels = torch.nn.functional.pad(
                pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
            )
        batch.append(pixels)
    return _normalise(torch.stack(batch))


def open_clip_clean_text(text: str) -> str:
    """open_clip's tokenizer cleaning before BPE: ``ftfy.fix_text`` (mojibake such as "Ã©" -> "é"),
    ``html.unescape`` twice ("&amp;amp;" -> "&"), whitespace runs to one space, strip. Lower-casing
    is left to the tokenizer (transformers' CLIP tokenizer lower-cases, as open_clip does)."""
    try:
        import ftfy
    except ImportError as error:  # a dependency of this package; say so rather than mis-tokenise
        raise ValueError(
            "open_clip's prompt cleaning (HPSv2, reference CLIP score) needs ftfy: pip install ftfy"
        ) from error
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()
