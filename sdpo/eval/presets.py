"""The samplers ``sdpo-eval generate`` offers and the official evaluation's presets: plain data,
importing no torch, so that the command line builds its parser (and answers ``--help``) fast."""

from __future__ import annotations

SCHEDULERS = ("default", "ddim", "euler", "dpm")
# The official evaluation's sampler (AIDC-AI/Diffusion-SDPO test_sd15.py / test_sdxl.py with
# scripts/eval/test_sd15.sh / test_sdxl.sh): EulerDiscreteScheduler from the pipeline's
# scheduler config, 50 steps, "cfg 7.5" as eps_c + 7.5 (eps_c - eps_u), the unconditional
# branch from the encoded empty prompt (also for SDXL, where diffusers would use zeros), UNet and
# text encoders in bf16, batch size 1, the SAME seed for every prompt, the initial noise drawn in
# bf16 by a torch.Generator on the device, the VAE decode in fp32, (x / 2 + 0.5) * 255 rounded.
PRESETS: dict[str, dict] = {
    "reference-sd15": {"model": "sd15", "resolution": 512},
    "reference-sdxl": {"model": "sdxl", "resolution": 1024},
}
PRESET_FIXED = {
    "scheduler": "euler",
    "steps": 50,
    "guidance": 7.5,
    "cfg_formula": "reference",
    "dtype": "bf16",
    "batch_size": 1,
}
