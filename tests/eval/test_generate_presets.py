"""``generate --preset reference-sd15 / reference-sdxl`` against a loop written from the official
evaluation's sampler (AIDC-AI/Diffusion-SDPO test_sd15.py), on a tiny pipeline on the CPU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import save_tiny_pipeline

from sdpo.eval import generate as generate_module
from sdpo.eval.cli import main as eval_main
from sdpo.eval.generate import GenerateSettings, apply_preset, generate

STEPS, RESOLUTION = 3, 32  # the preset's 50 steps and 512 px, cut down for a CPU test


@torch.no_grad()
def official_sd15_loop(pipeline_folder, prompt, seed, cfg):
    """test_sd15.py's pipe(): Euler from the scheduler config, bf16 text encoder and UNet, noise
    (1, C, 2 ceil(h/16), 2 ceil(w/16)) in bf16 from a Generator on the device seeded with the
    run's seed, eps_c + cfg (eps_c - eps_u) with eps_u from "", fp32 VAE decode, round."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_folder, safety_checker=None)
    scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    text_encoder, unet = pipe.text_encoder.to(torch.bfloat16), pipe.unet.to(torch.bfloat16)

    def encode(text):
        ids = pipe.tokenizer(
            text, padding="max_length", max_length=pipe.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids  # fmt: skip
        return text_encoder(ids)[0]

    conditional, unconditional = encode([prompt]), encode("")
    size = 2 * math.ceil(RESOLUTION / 16)
    latents = torch.randn(
        1, 4, size, size, dtype=torch.bfloat16, generator=torch.Generator("cpu").manual_seed(seed)
    )
    scheduler.set_timesteps(STEPS)
    latents = latents * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, timestep).repeat(2, 1, 1, 1)
        prediction = unet(
            model_input, timestep, encoder_hidden_states=torch.cat([conditional, unconditional])
        ).sample
        win, lose = prediction.chunk(2)
        latents = scheduler.step(win + cfg * (win - lose), timestep, latents).prev_sample
    x = latents.float() / pipe.vae.config.scaling_factor
    x = pipe.vae.float().decode(x).sample
    x = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()
    return (x * 255).round().astype("uint8")[0]


@pytest.fixture
def small_preset(monkeypatch):
    monkeypatch.setitem(generate_module.PRESET_FIXED, "steps", STEPS)
    for name in generate_module.PRESETS:
        monkeypatch.setitem(
            generate_module.PRESETS,
            name,
            generate_module.PRESETS[name] | {"resolution": RESOLUTION},
        )


def test_reference_sd15_preset_is_the_official_sampler(tmp_path, small_preset):
    from diffusers import UNet2DConditionModel

    pipeline = save_tiny_pipeline(tmp_path)
    unet = UNet2DConditionModel.from_pretrained(pipeline / "unet")
    with torch.no_grad():  # a random tiny UNet barely reads the text: strengthen it
        for name, parameter in unet.named_parameters():
            if "attn2.to_out.0.weight" in name:
                parameter.mul_(30.0)
    unet.save_pretrained(pipeline / "unet")
    prompts = ["the cat", "a red dog", "the cat"]
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps([{"prompt": prompt} for prompt in prompts]))
    settings = apply_preset(
        {"pretrained": str(pipeline), "suite": str(suite), "output_dir": str(tmp_path / "o"),
         "preset": "reference-sd15", "seed": 3}
    )  # fmt: skip
    manifest = generate(GenerateSettings(**settings))
    entries = json.loads(manifest.read_text())
    images = [np.asarray(Image.open(entry["gen_image_path"])) for entry in entries]
    meta = json.loads((tmp_path / "o" / "manifest.json.meta.json").read_text())
    assert meta["scheduler_class"] == "EulerDiscreteScheduler"
    assert meta["diffusers_guidance_scale"] == 8.5 and meta["preset"] == "reference-sd15"
    for prompt, image in zip(prompts, images, strict=True):
        expected = official_sd15_loop(pipeline, prompt, seed=3, cfg=7.5)
        difference = np.abs(image.astype(int) - expected.astype(int))
        # bf16 UNet: batched (cond + uncond) kernels may round differently from the loop's.
        assert difference.max() <= 2, (prompt, difference.max())
    # One seed for every prompt, as the official script: a repeated prompt repeats its image.
    assert np.array_equal(images[0], images[2])
    assert np.abs(images[0].astype(int) - images[1].astype(int)).mean() > 1.0


def test_preset_rejects_flags_it_fixes(tmp_path, capsys):
    command = ["generate", "--pretrained", str(tmp_path), "--suite", "x.json", "--output-dir",
               str(tmp_path / "o"), "--preset", "reference-sd15", "--steps", "20"]  # fmt: skip
    capsys.readouterr()
    assert eval_main(command) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "sdpo-eval: error: --preset reference-sd15 fixes --steps; drop them (or drop --preset)"
    )
    # Flags equal to the preset's values are fine, and the SDXL preset is 1024 px.
    values = apply_preset({"preset": "reference-sdxl", "steps": 50, "model": "sdxl"})
    assert values["resolution"] == 1024 and values["batch_size"] == 1


def test_reference_sdxl_preset_passes_the_empty_negative_prompt(
    tmp_path, monkeypatch, small_preset
):
    """diffusers' SDXL pipeline uses zeros for the unconditional branch when no negative prompt
    is given (force_zeros_for_empty_prompt); the official script encodes "". The preset must
    pass negative_prompt="" (checked on a recording SD pipeline standing in for SDXL)."""
    import inspect

    import diffusers

    default = inspect.signature(diffusers.StableDiffusionXLPipeline.__init__).parameters
    assert default["force_zeros_for_empty_prompt"].default is True
    calls = []

    class Recording(diffusers.StableDiffusionPipeline):
        def __call__(self, *args, **kwargs):
            calls.append(kwargs)
            return super().__call__(*args, **kwargs)

    monkeypatch.setattr(diffusers, "StableDiffusionXLPipeline", Recording)
    pipeline = save_tiny_pipeline(tmp_path)
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps([{"prompt": "the cat"}, {"prompt": "a dog"}]))
    settings = apply_preset(
        {"pretrained": str(pipeline), "suite": str(suite), "output_dir": str(tmp_path / "o"),
         "preset": "reference-sdxl"}
    )  # fmt: skip
    generate(GenerateSettings(**settings))
    assert [call["negative_prompt"] for call in calls] == [[""], [""]]
