"""A UNet LoRA run exports its adapters alone too (``unet_lora/``, diffusers' LoRA format, as
``transformer_lora/`` for the flow models): diffusers' own loader applies them to a fresh base
and gives the merged export's output."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from trainer_helpers import tiny

from sdpo.train.models import build_tiny
from sdpo.train.trainer import train
from sdpo.train.validation import build_pipeline


def unet_inputs(unet: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    size = unet.config.sample_size
    latents = torch.randn(2, unet.config.in_channels, size, size, generator=generator)
    timesteps = torch.tensor([10, 700])
    text = torch.randn(2, 6, unet.config.cross_attention_dim, generator=generator)
    return latents, timesteps, text


def test_unet_lora_adapters_load_with_diffusers_and_equal_the_merged_export(tmp_path):
    from diffusers import UNet2DConditionModel

    # lr 1e-3 over 3 AdamW steps moves the adapters' B (zero at init) by ~3e-3 per element.
    config = tiny(tmp_path, lora_rank=4, max_steps=3, learning_rate=1e-3, report_to="none")
    train(config)
    run = Path(config.output_dir)
    weights = load_file(run / "unet_lora" / "pytorch_lora_weights.safetensors")
    assert weights and all(name.startswith("unet.") for name in weights), sorted(weights)[:3]

    # A fresh base (the tiny preset's UNet from the same seed) in a diffusers pipeline.
    pipeline = build_pipeline(build_tiny(config.resolution, config.seed), torch.device("cpu"))
    inputs = unet_inputs(pipeline.unet)
    with torch.no_grad():
        base = pipeline.unet(*inputs).sample
        pipeline.load_lora_weights(str(run / "unet_lora"))
        with_adapters = pipeline.unet(*inputs).sample
        merged = UNet2DConditionModel.from_pretrained(run / "unet").eval()
        exported = merged(*inputs).sample

    torch.testing.assert_close(with_adapters, exported, rtol=1e-5, atol=1e-5)
    # The adapters changed the model: the comparison above is not base against base.
    assert (exported - base).abs().max() > 100 * 1e-5


def test_a_full_run_with_overwrite_removes_a_lora_runs_adapters(tmp_path):
    train(tiny(tmp_path, lora_rank=2, max_steps=1, report_to="none"))
    assert (tmp_path / "run" / "unet_lora").is_dir()
    train(tiny(tmp_path, max_steps=1, report_to="none", overwrite=True))
    assert (tmp_path / "run" / "unet").is_dir()
    assert not (tmp_path / "run" / "unet_lora").exists()
