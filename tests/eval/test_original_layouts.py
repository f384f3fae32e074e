"""The scorers against the original architectures: preprocessing against transformers'
CLIPImageProcessor, HPSv2's open_clip checkpoint and ImageReward's BLIP ViT against forward
passes written from the checkpoints' own names (tests/eval/original_models.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from original_models import (
    blip_vit_forward,
    open_clip_encode_image,
    open_clip_encode_text,
    random_blip_vit_state,
    random_open_clip_state,
)
from PIL import Image
from tiny_models import write_clip_tokenizer

from sdpo.eval import imagereward, preprocess, scorers


def _noise_images(count: int, shape: tuple[int, int], seed: int = 0) -> list:
    generator = np.random.default_rng(seed)
    return [
        Image.fromarray(generator.integers(0, 256, (*shape, 3), dtype=np.uint8))
        for _ in range(count)
    ]


@pytest.mark.parametrize("height_width", [(32, 32), (64, 64), (40, 57), (57, 40), (33, 90)])
def test_preprocess_matches_clip_image_processor(height_width):
    from transformers import CLIPImageProcessorPil

    images = _noise_images(2, height_width)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    expected = processor(images=images, return_tensors="pt").pixel_values
    assert torch.allclose(preprocess.clip_processor_preprocess(images, 32), expected, atol=1e-6)


def _tiny_vit_h14_config(vocab_size: int, hidden_act: str = "gelu"):
    """open_clip ViT-H-14's structure (GELU, MLP ratio 4, 77 tokens) at width 32."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 128,
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "hidden_act": hidden_act,
            "max_position_embeddings": 77,
            "vocab_size": vocab_size,
            "bos_token_id": vocab_size - 2,
            "eos_token_id": vocab_size - 1,
            "pad_token_id": vocab_size - 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 128,
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "patch_size": 8,
            "image_size": 32,
            "hidden_act": hidden_act,
        },
        projection_dim=16,
    )


def test_hpsv2_scores_are_open_clips_cosines(tmp_path, monkeypatch):
    tokenizer, vocab_size = write_clip_tokenizer(tmp_path / "tokenizer")
    state = random_open_clip_state(
        vision_width=32, vision_layers=2, patch_size=8, image_size=32, text_width=32,
        text_layers=2, context_length=77, vocab_size=vocab_size, embed_dim=16,
    )  # fmt: skip
    weights = tmp_path / "weights"
    weights.mkdir()
    # As HPSv2 saves it: {"state_dict": ...} with DDP's "module." prefix.
    torch.save(
        {"state_dict": {f"module.{key}": value for key, value in state.items()}},
        weights / "HPS_v2.1_compressed.pt",
    )
    # The real ViT-H-14 (1B parameters) at width 32: the same build_scorer code path.
    monkeypatch.setattr(scorers, "vit_h14_config", lambda: _tiny_vit_h14_config(vocab_size))
    sources = scorers.WeightSources(
        {"pickscore_processor": str(tmp_path / "tokenizer")}, str(weights)
    )
    scorer = scorers.build_scorer("hpsv2", sources, torch.device("cpu"))
    images = _noise_images(3, (48, 48))
    prompts = ["the cat and the dog", "a red owl", "the"]
    values = scorer.score(images, prompts)

    # open_clip's own forward: its tokens are [sot] ... [eot] then zeros (not eot padding).
    tokens = tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    end = (tokens == vocab_size - 1).int().argmax(dim=1)
    tokens[torch.arange(77)[None, :] > end[:, None]] = 0
    image = open_clip_encode_image(state, preprocess.hpsv2_preprocess(images, 32), heads=2)
    text = open_clip_encode_text(state, tokens, heads=2)
    expected = torch.nn.functional.cosine_similarity(image, text)
    assert values == pytest.approx(expected.tolist(), abs=1e-5)
    assert max(values) - min(values) > 0.05  # distinct cosines: the comparison means something

    # The comparison is sensitive to the architecture: quick_gelu (OpenAI's ViTs) differs.
    monkeypatch.setattr(
        scorers, "vit_h14_config", lambda: _tiny_vit_h14_config(vocab_size, "quick_gelu")
    )
    other = scorers.build_scorer("hpsv2", sources, torch.device("cpu")).score(images, prompts)
    assert max(abs(a - b) for a, b in zip(values, other, strict=True)) > 1e-3


def test_imagereward_vision_tower_is_blips_vit():
    state = random_blip_vit_state(width=32, layers=2, patch_size=8, image_size=32, mlp_width=64)
    converted = imagereward.convert_checkpoint(state)
    config = imagereward.vision_config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8,
    )  # fmt: skip
    from transformers import BlipVisionModel

    vision = BlipVisionModel(config).eval()
    vision.load_state_dict(
        {key.removeprefix("vision."): value for key, value in converted.items()}, strict=True
    )
    pixels = preprocess.imagereward_preprocess(_noise_images(2, (40, 40)), 32)
    with torch.no_grad():
        ours = vision(pixel_values=pixels).last_hidden_state
    expected = blip_vit_forward(state, pixels, heads=2)
    assert ours.shape == expected.shape == (2, 17, 32)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()
