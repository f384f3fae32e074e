"""Tiny random-initialised CLIP models, a CLIP BPE tokenizer and an SD pipeline, built in code."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch


def write_clip_tokenizer(folder: Path):
    """A CLIP BPE tokenizer over a small vocabulary: every letter and digit, alone and at the end
    of a word, and a few merges. Built with positional file arguments: transformers 5's
    CLIPTokenizerFast with the keyword ``vocab_file=`` silently builds an empty vocabulary."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + ",.!'-")
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>")]
    tokens += ["th", "the</w>", "an", "and</w>", "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges)
    )
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tokenizer.model_max_length = 77
    assert tokenizer("the cat").input_ids[1] == vocab["the</w>"], "the vocabulary did not load"
    tokenizer.save_pretrained(folder)
    return tokenizer, len(vocab)


def tiny_clip(vocab_size: int, projection_dim: int = 16, seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "max_position_embeddings": 77,
            "vocab_size": vocab_size,
            "hidden_act": "gelu",
            "bos_token_id": vocab_size - 2,
            "eos_token_id": vocab_size - 1,
            "pad_token_id": vocab_size - 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "patch_size": 8,
            "image_size": 32,
            "hidden_act": "gelu",
        },
        projection_dim=projection_dim,
    )
    return CLIPModel(config).eval()


def save_clip_folder(folder: Path, projection_dim: int = 16, seed: int = 0):
    tokenizer, vocab_size = write_clip_tokenizer(folder)
    model = tiny_clip(vocab_size, projection_dim, seed)
    model.save_pretrained(folder)
    return model, tokenizer


def save_tiny_pipeline(folder: Path, seed: int = 0) -> Path:
    """A StableDiffusionPipeline folder: tiny UNet (8x8 latents), VAE, CLIP text encoder."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdpo.train.models import TINY_HIDDEN, build_tiny_unet, build_tiny_vae

    torch.manual_seed(seed)
    tokenizer, vocab_size = write_clip_tokenizer(folder / "tokenizer_source")
    # The trainer's tiny UNet (8 x 8 latents, cross-attention width TINY_HIDDEN) and VAE.
    unet = build_tiny_unet(sample_size=8, in_channels=4)
    vae = build_tiny_vae()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=TINY_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder / "pipeline")
    return folder / "pipeline"
