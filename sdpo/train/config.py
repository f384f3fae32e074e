"""Training configuration: one dataclass, presets, YAML files and command-line flags.

Precedence: preset < YAML file < command-line flags. Every field is a flag (``--field-name``, or
``--field_name``) and a YAML key (``field_name``). ``FIELDS`` below is the one table of every
field's type, range and help: each value is checked against it where it enters (flag, YAML key,
preset, or ``TrainConfig.validate`` for configs built in code), before any model or data loads,
and a bad one is a one-line ``UsageError`` naming the flag or key.

Why argparse and PyYAML, not a dataclass-to-CLI library (issue 13): tyro, simple_parsing and
jsonargparse were weighed against what this layer must do, from their documentation (none is
installed here). tyro builds flags from the dataclass and suggests close matches, but reads no
YAML itself and prints multi-line boxed errors; simple_parsing is argparse underneath and converts
config-file values with the field's type constructor (``int(2.7)`` passes, ``float(True)`` is 1.0);
jsonargparse validates types and reads YAML, but with YAML 1.1 rules (``mu: off`` is false) and
argparse's multi-line usage errors. None knows that ``--mu off`` means None, that ``--beta_dpo``
is half our beta, or that a value must be finite and in range, so each would still need the table,
the alias rewrite, the YAML loader and the error wrapper written here, plus a dependency. The layer
below is those four pieces on the standard library and PyYAML (already a dependency).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import json
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sdpo.settings import METHODS, parse_granularity
from sdpo.train.errors import UsageError

# --mu's default: resolved by TrainConfig.validate to default_mu(config) (below).
MU_AUTO = "auto"


@dataclass
class TrainConfig:
    # What to run.
    preset: str | None = None
    output_dir: str = "runs/train"
    max_steps: int = 10
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    # "latest" (the newest complete checkpoint in output_dir) or a checkpoint folder; None: a
    # fresh run. True/False (YAML, code) mean "latest"/None.
    resume: str | None = None
    seed: int = 0
    # The objective (see sdpo.preference_loss).
    method: str = "diffusion-dpo"
    beta: float = 5000.0
    # MU_AUTO: validate() sets the reference scripts' mu for the method and model (default_mu);
    # None: no safeguard (plain method).
    mu: float | str | None = MU_AUTO
    granularity: str = "batch"
    dmpo_alpha: float = 0.0
    loss_backend: str = "auto"
    # Model and data.
    model: str = "tiny"  # "tiny" (built in code), "sd15" or "sdxl" (diffusers folders)
    pretrained: str | None = None  # a local folder, a cached model id, or "random" (timing)
    allow_download: bool = False
    data: str | None = None  # None with model "tiny": synthetic pairs built in code
    resolution: int = 16
    caption_dropout: float = 0.2
    synthetic_pairs: int = 64
    lora_rank: int = 0
    # Flow-matching models (sd3, flux, wan): the sigma density and the loss weighting
    # (sdpo.train.flow_matching.FlowDensity; defaults: the diffusers SD3 DreamBooth script's).
    flow_density: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    flow_loss_weighting: str = "none"
    # FLUX only: shift the training sigmas by the training resolution's token count, as the
    # pipeline shifts them at inference (off: the diffusers FLUX script's unshifted table).
    flow_dynamic_shift: bool = False
    # FLUX.1-dev only: the value fed to its guidance embedding in training (it is guidance-
    # distilled). 3.5: FluxPipeline's default guidance_scale at inference and the diffusers FLUX
    # DreamBooth script's default; that script's README commands pass 1.
    flux_guidance: float = 3.5
    # EXPERIMENTAL timestep weighting (sdpo.timesteps; DDPM models only): per-pair weights
    # outside the sigmoid, from arXiv 2505.21893, whose v2 reports an error in its main theorem.
    timestep_weighting: str = "none"
    timestep_mask_threshold: float = 0.9
    timestep_clip: float = 0.2
    timestep_range: str | None = None  # "LOW:HIGH": timesteps drawn from and kept in [LOW, HIGH)
    # Optimisation.
    train_batch_pairs: int = 2  # pairs per micro-batch per process
    gradient_accumulation: int = 1
    learning_rate: float = 1e-4
    scale_lr: bool = False  # multiply learning_rate by pairs per optimizer step (all processes)
    warmup_steps: int = 0
    optimizer: str = "adamw"  # "adamw" or "adafactor"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    mixed_precision: str = "bf16"  # "bf16" / "fp16" (loss-scaled) autocast on CUDA, or "no"
    gradient_checkpointing: bool = False
    # FSDP2 (torch.distributed.fsdp.fully_shard) instead of DDP under torchrun: the policy UNet's
    # weights, gradients and optimizer state are sharded over the ranks (SDXL-sized models).
    fsdp: bool = False
    attention: str = "sdpa"  # "sdpa" (PyTorch picks), "sdpa-<kernel>" (pinned) or "xformers"
    channels_last: bool = False  # UNets (policy and reference) in NHWC memory layout
    # Speed and measurement.
    compile: bool = False
    cuda_graphs: bool = False
    nvtx: bool = False
    # "START:STOP": cudaProfilerStart before optimizer step START+1, cudaProfilerStop after step
    # STOP, so `nsys --capture-range=cudaProfilerApi` records only that window (CUDA only).
    profile_steps: str | None = None
    log_every: int = 1
    on_nonfinite: str = "stop"  # "stop" or "skip"
    num_workers: int | None = None  # None: sdpo.train.data.default_num_workers
    progress: bool = True
    # Trainer knobs of issue 16 (see FIELDS): schedule, epochs, augmentation, trackers,
    # validation images.
    lr_scheduler: str = "constant_with_warmup"
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    num_epochs: int | None = None
    hflip: bool = True
    random_crop: bool = False
    report_to: str = "tensorboard"
    validation_prompts: str | None = None
    validation_every: int = 0
    validation_seed: int = 0
    validation_steps: int = 20
    validation_guidance: float = 7.5
    # Run safety (resume, checkpoints, skipped steps): see sdpo/train/checkpoint.py and the README.
    overwrite: bool = False
    checkpoints_total_limit: int = 0  # keep the N newest complete checkpoints; 0 keeps all
    # What the end of the run writes: "full" (a final checkpoint, the diffusers folder and the
    # .pth), "weights" (the diffusers folder alone) or "none". An SD1.5 "full" end writes 17.2 GB
    # (3.44 GB UNet weights in the checkpoint, 6.9 GB of AdamW moments, the folder and the .pth
    # 3.44 GB each); "weights" 3.44 GB: for throughput and smoke runs nobody resumes.
    save_final: str = "full"
    max_skipped_fraction: float = 0.05

    def validate(self) -> None:
        """Checks every field against ``FIELDS`` and the settings against each other and this
        machine; raises UsageError naming the field. Runs before any model or data loads."""
        for name in FIELDS:
            setattr(self, name, check_value(name, getattr(self, name), name))
        if self.mu == MU_AUTO:
            self.mu = default_mu(self)
        if self.resume not in (None, "latest") and not Path(self.resume).expanduser().is_dir():
            raise UsageError(
                f"resume: no checkpoint folder {self.resume}; give latest (the newest checkpoint "
                "in --output-dir) or an existing checkpoint-N folder"
            )
        if self.fsdp and self.lora_rank > 0:
            raise UsageError(
                "fsdp: LoRA adapters are small enough to replicate; drop --fsdp (DDP) or --lora-rank"
            )
        if self.fsdp and self.mixed_precision == "fp16":
            # Each rank's GradScaler would see only its own gradient shard's overflows, so the
            # ranks' loss scales drift apart and the reduce-scatter mixes gradients scaled
            # differently (DDP ranks hold the same all-reduced gradients: no drift there).
            raise UsageError(
                "mixed_precision: fp16 loss scaling is per rank under --fsdp (the ranks' scales "
                "would drift apart); use --mixed-precision bf16 with --fsdp, or DDP (no --fsdp)"
            )
        check_flow_settings(self)
        check_timestep_weighting(self)
        if self.cuda_graphs and self.gradient_accumulation > 1 and self.fsdp:
            # With accumulation the trainer keeps the gradients in buffers outside the graph pool
            # (step.PersistentGradients); under FSDP2 the gradients are FSDP's own sharded
            # buffers, which that mechanism does not cover.
            raise UsageError(
                "cuda_graphs: with --fsdp, CUDA graphs cannot keep accumulated gradients outside "
                "the graph pool; use --gradient-accumulation 1, DDP (no --fsdp), or --compile "
                "without --cuda-graphs"
            )
        if self.model != "tiny" and self.pretrained is None:
            raise UsageError(
                f"pretrained: model {self.model!r} needs --pretrained PATH (a local diffusers folder "
                "with unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
            )
        if (
            self.data is None
            and self.model != "tiny"
            and self.pretrained != "tiny"
            and not is_random(self.pretrained)
        ):
            raise UsageError(
                "data: expected --data PATH (parquet shards, a save_to_disk folder or a JSONL "
                "manifest); synthetic pairs are only for the tiny model and --pretrained "
                "random or tiny"
            )
        check_output_dir(self.output_dir)
        check_knobs(self)
        check_machine(self)


# The reference scripts (AIDC-AI/Diffusion-SDPO scripts/train/*.sh; docs/objectives.md,
# 'The reference scripts' settings'):
# 8 pairs per GPU x 32 accumulation steps (x 8 GPUs = 2048 pairs per optimizer step), 2000 steps,
# constant LR after 500 warmup steps, lr 1e-8 (SD1.5) / 1e-9 (SDXL) scaled by the pairs per step,
# grad-norm clip 1.0, 20% caption dropout, bf16. "group:8" is their one lambda per 8-pair
# micro-batch at any micro-batch size.
_REFERENCE_COMMON: dict[str, Any] = {
    "train_batch_pairs": 8,
    "gradient_accumulation": 32,
    "max_steps": 2000,
    "warmup_steps": 500,
    "scale_lr": True,
    "max_grad_norm": 1.0,
    "caption_dropout": 0.2,
    "mixed_precision": "bf16",
    "granularity": "group:8",
    "checkpoint_every": 500,
}
_SD15: dict[str, Any] = {
    **_REFERENCE_COMMON,
    "model": "sd15",
    "resolution": 512,
    "learning_rate": 1e-8,
    "optimizer": "adamw",
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "weight_decay": 1e-2,
}
_SDXL: dict[str, Any] = {
    **_REFERENCE_COMMON,
    "model": "sdxl",
    "resolution": 1024,
    "learning_rate": 1e-9,
    "optimizer": "adafactor",
    "gradient_checkpointing": True,
}
# Flow-matching presets (docs/flow_matching.md has the memory estimates behind each choice).
# Sourced: the sigma densities (SD3 DreamBooth script: logit-normal(0, 1), weighting none; FLUX
# DreamBooth script: uniform, no weighting), the LoRA rank 8 and learning rate 1e-5 (the diffusers
# Diffusion-DPO LoRA example's SD1.5/SDXL commands), and the full fine-tune's batch structure
# (the reference scripts above). OUR CHOICES, unvalidated: beta 5000 (no flow-DPO beta is sourced;
# we keep the per-element mean-MSE convention of the SD1.5/SDXL presets), mu 0.6 (the SDXL
# presets'), the full fine-tune's learning rate 1e-9 per pair (SDXL's), the LoRA presets' 4 pairs
# x 4 accumulation, gradient checkpointing everywhere, and FSDP2 for SD3.5 Medium.
_FLOW_COMMON: dict[str, Any] = {
    "method": "diffusion-dpo",
    "beta": 5000.0,
    "mu": 0.6,
    "mixed_precision": "bf16",
    "gradient_checkpointing": True,
    "caption_dropout": 0.2,
    "max_grad_norm": 1.0,
    "flow_density": "logit_normal",
    "logit_mean": 0.0,
    "logit_std": 1.0,
    "flow_loss_weighting": "none",
}
_FLOW_LORA: dict[str, Any] = {
    **_FLOW_COMMON,
    "lora_rank": 8,
    "learning_rate": 1e-5,
    "train_batch_pairs": 4,
    "gradient_accumulation": 4,
    "max_steps": 2000,
    "warmup_steps": 0,
    "checkpoint_every": 500,
    "granularity": "pair",
}
PRESETS: dict[str, dict[str, Any]] = {
    # Tiny random-initialised models and synthetic pairs: the SD1.5 code path in well under a
    # second per step on a CPU, with no download. What tests and CI use.
    "tiny": {
        "model": "tiny",
        "resolution": 16,
        "train_batch_pairs": 2,
        "gradient_accumulation": 2,
        "max_steps": 4,
        "learning_rate": 1e-4,
        "warmup_steps": 2,
        "beta": 5000.0,
        "mu": 0.9,
        "mixed_precision": "no",
        "synthetic_pairs": 16,
    },
    "sd15-dpo": {**_SD15, "method": "diffusion-dpo", "beta": 5000.0, "mu": 0.9},
    "sd15-dspo": {**_SD15, "method": "dspo", "beta": 0.001, "mu": 0.2},
    "sd15-dmpo": {**_SD15, "method": "dmpo", "beta": 2000.0, "dmpo_alpha": 0.01, "mu": 0.9},
    "sdxl-dpo": {**_SDXL, "method": "diffusion-dpo", "beta": 5000.0, "mu": 0.6},
    "sdxl-dspo": {**_SDXL, "method": "dspo-sdxl", "beta": 5000.0, "mu": 0.6},
    "sdxl-dmpo": {**_SDXL, "method": "dmpo", "beta": 6000.0, "dmpo_alpha": 0.01, "mu": 0.6},
    "sd35m-dpo": {
        **_REFERENCE_COMMON,
        **_FLOW_COMMON,
        "model": "sd3",
        "resolution": 1024,
        "learning_rate": 1e-9,
        "optimizer": "adamw",
        "fsdp": True,
    },
    "sd35l-dpo-lora": {**_FLOW_LORA, "model": "sd3", "resolution": 1024},
    "flux-dpo-lora": {
        **_FLOW_LORA,
        "model": "flux",
        "resolution": 1024,
        "flow_density": "uniform",
        # FLUX.1-dev is guidance-distilled: its pipeline never evaluates an empty caption (no
        # classifier-free guidance at inference), so a dropped caption would train a condition
        # the model is never used with. The diffusers FLUX scripts drop none either.
        "caption_dropout": 0.0,
    },
    "wan-dpo-lora": {**_FLOW_LORA, "model": "wan", "resolution": 480},
}

PRESET_HELP: dict[str, str] = {
    "tiny": "random-initialised tiny models and synthetic pairs on the CPU; no download (tests, CI)",
    "sd15-dpo": "Diffusion-DPO on SD1.5 as the reference script: beta 5000, mu 0.9, AdamW",
    "sd15-dspo": "DSPO on SD1.5: beta 0.001, mu 0.2, AdamW",
    "sd15-dmpo": "DMPO on SD1.5: beta 2000, alpha 0.01, mu 0.9, AdamW",
    "sdxl-dpo": "Diffusion-DPO on SDXL: beta 5000, mu 0.6, Adafactor, gradient checkpointing",
    "sdxl-dspo": "DSPO's SDXL form (method dspo-sdxl): beta 5000, mu 0.6, Adafactor",
    "sdxl-dmpo": "DMPO on SDXL: beta 6000, alpha 0.01, mu 0.6, Adafactor",
    "sd35m-dpo": "SD3.5 Medium full fine-tune, FSDP2, checkpointing; beta 5000 unvalidated",
    "sd35l-dpo-lora": "SD3.5 Large LoRA rank 8, lr 1e-5; beta 5000 unvalidated",
    "flux-dpo-lora": "FLUX.1-dev LoRA rank 8, uniform sigmas; beta 5000 unvalidated",
    "wan-dpo-lora": "Wan 2.1 T2V 1.3B LoRA on image pairs (one-frame videos); beta unvalidated",
}


FLOW_MODELS = ("sd3", "flux", "wan")
# --pretrained random for a flow model builds a released architecture with random weights
# (sdpo.train.families.PUBLISHED_PIPELINES): "random:NAME" names it; plain "random" builds the
# flow preset's (below), or the model's only one.
FLOW_RANDOM_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "sd3": ("sd3.5-medium", "sd3.5-large"),
    "flux": ("flux.1-dev",),
    "wan": ("wan2.1-t2v-1.3b",),
}
PRESET_RANDOM_ARCHITECTURES: dict[str, str] = {
    "sd35m-dpo": "sd3.5-medium",
    "sd35l-dpo-lora": "sd3.5-large",
    "flux-dpo-lora": "flux.1-dev",
    "wan-dpo-lora": "wan2.1-t2v-1.3b",
}


# --mu's default ("auto"): the reference scripts' mu per method (docs/objectives.md, 'The
# reference scripts' settings'; the sd15-*/sdxl-* presets). SD1.5: diffusion-dpo 0.9, dspo 0.2,
# dmpo 0.9; SDXL: 0.6 for each (its DSPO script is the dspo-sdxl form). The tiny UNet runs
# SD1.5's code path, so it takes SD1.5's values; dspo-sdxl takes the SDXL script's 0.6 on any
# model. The flow models take SDXL's 0.6, as the flow presets do (our choice, unvalidated).
REFERENCE_MU: dict[str, dict[str, float]] = {
    "sd15": {"diffusion-dpo": 0.9, "dspo": 0.2, "dspo-sdxl": 0.6, "dmpo": 0.9},
    "sdxl": {"diffusion-dpo": 0.6, "dspo": 0.6, "dspo-sdxl": 0.6, "dmpo": 0.6},
}
_MU_TABLE_OF_MODEL = {"tiny": "sd15", "sd15": "sd15", "sdxl": "sdxl"}  # the rest (flow): sdxl


def mu_refusal(config: TrainConfig) -> str | None:
    """Why the objective takes no safeguard with these settings (None: it takes one). A weighted
    flow loss bounds the winners' error only with one lambda per pair (docs/flow_matching.md)."""
    if config.flow_loss_weighting != "none" and config.granularity != "pair":
        return (
            f"--flow-loss-weighting {config.flow_loss_weighting} bounds the winners' error only "
            f"per pair (got --granularity {config.granularity}; --granularity pair allows it)"
        )
    return None


def default_mu(config: TrainConfig) -> float | None:
    """What ``--mu auto`` (the default) means for ``config``: the reference scripts' mu for its
    method and model (``REFERENCE_MU``), or None where the objective refuses a safeguard."""
    if mu_refusal(config) is not None:
        return None
    return REFERENCE_MU[_MU_TABLE_OF_MODEL.get(config.model, "sdxl")][config.method]


def describe_mu(config: TrainConfig) -> str:
    """The run's mu for its banner: the value, and whether it is the default and why."""
    default = default_mu(config)
    if config.mu is None:
        if default is None:
            return f"off (the default here: {mu_refusal(config)})"
        return f"off (plain {config.method}; the default would be {default:g})"
    if config.mu == default:
        table = _MU_TABLE_OF_MODEL.get(config.model, "sdxl")
        source = {"sd15": "SD1.5", "sdxl": "SDXL"}[table]
        taken = "" if config.model == table else f", taken for {config.model}"
        return (
            f"{config.mu:g} (the default: the {source} reference scripts' mu for "
            f"{config.method}{taken}; --mu off turns the safeguard off)"
        )
    return f"{config.mu:g}"


def is_random(pretrained: str | None) -> bool:
    """``--pretrained random`` or ``random:NAME``: architectures built with random weights."""
    return pretrained == "random" or (pretrained or "").startswith("random:")


def random_flow_architecture(config: TrainConfig) -> str:
    """The released architecture ``--pretrained random[:NAME]`` builds for a flow model."""
    return resolve_random_architecture(config.model, config.pretrained, config.preset)


def resolve_random_architecture(model: str, pretrained: str, preset: str | None = None) -> str:
    """``random:NAME`` -> NAME (one of the model's); ``random`` -> the flow preset's, or the
    model's only one; UsageError otherwise."""
    choices = FLOW_RANDOM_ARCHITECTURES[model]
    named = ", ".join(f"random:{name}" for name in choices)
    if pretrained.startswith("random:"):
        name = pretrained.removeprefix("random:")
        if name not in choices:
            raise UsageError(
                f"pretrained: {pretrained!r} is not a {model} architecture; expected {named}"
            )
        return name
    from_preset = PRESET_RANDOM_ARCHITECTURES.get(preset or "")
    if from_preset in choices:
        return from_preset
    if len(choices) == 1:
        return choices[0]
    raise UsageError(
        f"pretrained: random is ambiguous for {model} ({len(choices)} released sizes); "
        f"use --pretrained {' or '.join(f'random:{name}' for name in choices)}"
    )


_FLOW_FIELDS = (
    "flow_density", "logit_mean", "logit_std", "mode_scale", "flow_loss_weighting",
    "flow_dynamic_shift", "flux_guidance",
)  # fmt: skip


def parse_timestep_range(text: str) -> tuple[int, int]:
    """ "LOW:HIGH" -> (LOW, HIGH) with 0 <= LOW < HIGH <= 1000 (the SD schedulers' T)."""
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise UsageError(
            f"timestep_range: expected LOW:HIGH integer timesteps (e.g. 200:800), got {text!r}"
        ) from None
    if not 0 <= low < high <= 1000:
        raise UsageError(f"timestep_range: expected 0 <= LOW < HIGH <= 1000, got {text!r}")
    return low, high


def check_timestep_weighting(config: TrainConfig) -> None:
    """Its knobs only with a mode that reads them; refused for flow models (one line)."""
    mode = config.timestep_weighting
    if config.model in FLOW_MODELS:
        from sdpo.train.flow_matching import refuse_timestep_weighting

        try:
            refuse_timestep_weighting(mode)
        except ValueError as error:
            raise UsageError(str(error)) from None
    defaults = TrainConfig.__dataclass_fields__
    unused = []
    if mode == "none":
        unused = ["timestep_mask_threshold", "timestep_clip", "timestep_range"]
    elif mode == "dpo-cm":
        unused = ["timestep_clip"]
    for name in unused:
        if getattr(config, name) != defaults[name].default:
            flag = "--" + name.replace("_", "-")
            needs = "importance" if name == "timestep_clip" else "dpo-cm or importance"
            raise UsageError(
                f"{name.replace('_', '-')}: only read with --timestep-weighting {needs} "
                f"(got {mode}); drop {flag}"
            )


def channels_last_refusal(model: str) -> str | None:
    """Why the channels-last layout does not apply to ``model`` (None for a UNet): it is a UNet
    convolution layout, and the flow transformers are linear layers around one patch embedding
    (Wan's a Conv3d, whose 5-D weight channels_last cannot take). sdpo-profile says the same."""
    if model not in FLOW_MODELS:
        return None
    return f"for UNets (their convolutions); the {model} transformer has none to speed up"


def check_flow_settings(config: TrainConfig) -> None:
    """Flow settings only with a flow model; ``--pretrained tiny`` only for flow models (the
    tiny UNet preset is ``--model tiny``); a flow model needs ``--pretrained``."""
    flow = config.model in FLOW_MODELS
    if not flow:
        changed = [
            name
            for name in _FLOW_FIELDS
            if getattr(config, name) != TrainConfig.__dataclass_fields__[name].default
        ]
        if changed:
            flag = "--" + changed[0].replace("_", "-")
            raise UsageError(
                f"{changed[0]}: applies to flow-matching models (--model sd3, flux or wan), not "
                f"{config.model!r}; drop {flag}"
            )
        if config.pretrained == "tiny":
            raise UsageError(
                "pretrained: tiny builds tiny flow-matching models (--model sd3, flux or wan); "
                "the tiny UNet is --model tiny without --pretrained"
            )
        if (config.pretrained or "").startswith("random:"):
            raise UsageError(
                f"pretrained: {config.pretrained} names a flow-matching architecture (--model "
                f"sd3, flux or wan); {config.model} takes --pretrained random"
            )
        return
    if (
        config.flux_guidance != TrainConfig.__dataclass_fields__["flux_guidance"].default
        and config.model != "flux"
    ):
        raise UsageError(
            f"flux_guidance: only FLUX.1-dev has a guidance embedding; {config.model} has none, "
            "drop --flux-guidance"
        )
    if config.flow_dynamic_shift and config.model != "flux":
        # SD3/SD3.5 schedulers carry a static shift (3.0) already in their table, Wan's too.
        raise UsageError(
            f"flow_dynamic_shift: only FLUX's scheduler shifts by resolution "
            f"(use_dynamic_shifting); {config.model}'s table is already shifted; drop "
            "--flow-dynamic-shift"
        )
    if config.flow_loss_weighting != "none" and config.mu is not None:
        if config.granularity != "pair":
            # docs/flow_matching.md: a pooled lambda sums w_i S_ww,i / w_i S_wl,i, while the
            # winner-loss bound under w needs w_i^2 in both sums; only per-pair lambda is exact.
            raise UsageError(
                f"granularity: the safeguard's bound holds with --flow-loss-weighting "
                f"{config.flow_loss_weighting} only per pair (a pooled lambda would need w^2 "
                f"weights); give --granularity pair (got {config.granularity})"
            )
    if config.channels_last:
        raise UsageError(
            f"channels_last: {channels_last_refusal(config.model)}: drop --channels-last"
        )
    if config.pretrained is None:
        raise UsageError(
            f"pretrained: model {config.model!r} needs --pretrained PATH (a local diffusers "
            "folder with model_index.json), --pretrained tiny (tiny random models, tests) or "
            "--pretrained random[:NAME] (a released architecture with random weights, timing)"
        )
    if is_random(config.pretrained):
        random_flow_architecture(config)


def parse_profile_steps(text: str) -> tuple[int, int]:
    """ "START:STOP" -> (START, STOP) with 0 <= START < STOP; UsageError otherwise."""
    parts = text.split(":")
    try:
        start, stop = (int(part) for part in parts)
    except ValueError:
        raise UsageError(
            f"profile_steps: expected START:STOP optimizer steps (e.g. 5:8), got {text!r}"
        ) from None
    if not 0 <= start < stop:
        raise UsageError(f"profile_steps: expected 0 <= START < STOP, got {text!r}")
    return start, stop


LR_SCHEDULERS = (
    "constant_with_warmup",
    "constant",
    "cosine",
    "linear",
    "cosine_with_restarts",
    "polynomial",
)


def check_prompts_file(text: str) -> None:
    """The validation prompts file exists and holds at least one prompt."""
    from sdpo.train.validation import read_prompts

    read_prompts(text)


def _granularity(text: str) -> None:
    try:
        parse_granularity(text)
    except ValueError as error:
        raise UsageError(str(error)) from None


@dataclass(frozen=True)
class FieldSpec:
    """One field's type, allowed values and help. ``low``/``high`` bound numbers (inclusive
    unless ``*_open``); ``optional`` fields also take None; ``check`` parses a string's format."""

    kind: type
    help: str
    section: str
    optional: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    check: Callable[[str], object] | None = None


_RUN, _OBJECTIVE, _DATA, _OPTIM, _SPEED = (
    "what to run",
    "objective",
    "model and data",
    "optimisation",
    "speed and measurement",
)
# Every TrainConfig field (a test checks the table covers them all). Ranges: counts of steps,
# pairs and workers are >= 0 or >= 1; rates in [0, 1]; Adam's betas in [0, 1) (1 would freeze the
# moment estimate); beta, the learning rate, epsilon and the clip norm > 0 (a clip norm of 0 zeroes
# every update, a negative one reverses it); resolution a multiple of 8 (the VAE's downsampling).
FIELDS: dict[str, FieldSpec] = {
    "preset": FieldSpec(str, "named settings to start from (--list-presets)", _RUN, True,
                        choices=tuple(PRESETS)),
    "output_dir": FieldSpec(str, "folder for metrics, checkpoints and the trained UNet", _RUN),
    "max_steps": FieldSpec(int, "optimizer steps to train", _RUN, low=1),
    "checkpoint_every": FieldSpec(int, "optimizer steps between checkpoints; 0: only at the end",
                                  _RUN, low=0),
    "resume": FieldSpec(str, "continue a run: latest (the newest complete checkpoint in "
                        "--output-dir; plain --resume) or a checkpoint folder", _RUN, True),
    "seed": FieldSpec(int, "seed of data order, flips, caption dropout, noise and timesteps", _RUN,
                      low=0, high=2**63 - 1),
    "method": FieldSpec(str, "preference objective", _OBJECTIVE, choices=tuple(METHODS)),
    "beta": FieldSpec(float, "preference strength (the diffusers DPO example's beta_dpo x 2)",
                      _OBJECTIVE, low=0, low_open=True),
    "mu": FieldSpec(float, "SDPO safeguard strength in [0, 1]; off/none/false/null: no safeguard "
                    "(plain method); auto: the reference scripts' mu for the method (SD1.5 and "
                    "tiny: 0.9 diffusion-dpo and dmpo, 0.2 dspo; SDXL and the flow models: 0.6; "
                    "dspo-sdxl: 0.6), off where the objective refuses it (--flow-loss-weighting "
                    "without --granularity pair)", _OBJECTIVE, True, low=0, high=1),
    "granularity": FieldSpec(str, "one safeguard lambda per: batch, pair, or group:N pairs",
                             _OBJECTIVE, check=_granularity),
    "dmpo_alpha": FieldSpec(float, "DMPO's alpha in [0, 1] (method dmpo only)", _OBJECTIVE,
                            low=0, high=1),
    "loss_backend": FieldSpec(str, "loss implementation; triton and cuda need a GPU", _OBJECTIVE,
                              choices=("auto", "torch", "triton", "cuda")),
    "model": FieldSpec(str, "architecture: tiny (built in code), sd15, sdxl, or the flow models "
                       "sd3 (SD3/SD3.5), flux (FLUX.1), wan (Wan 2.1 T2V)", _DATA,
                       choices=("tiny", "sd15", "sdxl", "sd3", "flux", "wan")),
    "pretrained": FieldSpec(str, "local diffusers folder, cached model id, random (the real "
                            "architecture, random weights: timing; flow models also random:NAME, "
                            "e.g. random:sd3.5-large), or tiny (tiny flow models)", _DATA, True),
    "allow_download": FieldSpec(bool, "let --pretrained download from the Hugging Face hub", _DATA),
    "data": FieldSpec(str, "parquet shards, a save_to_disk folder, a JSONL manifest or a cache",
                      _DATA, True),
    "resolution": FieldSpec(int, "image side in pixels, a multiple of 8", _DATA, low=8),
    "caption_dropout": FieldSpec(float, "fraction of captions replaced by the empty one", _DATA,
                                 low=0, high=1),
    "synthetic_pairs": FieldSpec(int, "synthetic pairs when there is no --data", _DATA, low=1),
    "lora_rank": FieldSpec(int, "LoRA rank; 0 trains the full UNet", _DATA, low=0),
    # Flow-matching models only (sdpo.train.flow_matching; docs/flow_matching.md).
    "flow_density": FieldSpec(str, "flow models: how sigmas are drawn (diffusers' "
                              "compute_density_for_timestep_sampling)", _DATA,
                              choices=("logit_normal", "mode", "uniform")),
    "logit_mean": FieldSpec(float, "flow models: the logit-normal density's mean", _DATA),
    "logit_std": FieldSpec(float, "flow models: the logit-normal density's std, > 0", _DATA,
                           low=0, low_open=True),
    # flow_matching.MODE_SCALE_MAX (not imported: this module loads without torch): the SD3
    # paper's mode density is a monotonic map of [0, 1] only for -1 <= s <= 2/(pi-2) = 1.752.
    "mode_scale": FieldSpec(float, "flow models: the mode density's scale, in [-1, 2/(pi-2)]",
                            _DATA, low=-1.0, high=2.0 / (math.pi - 2.0)),
    "flow_loss_weighting": FieldSpec(str, "flow models: w(sigma) inside each pair's margin "
                                     "(compute_loss_weighting_for_sd3); none keeps beta as is",
                                     _DATA, choices=("none", "sigma_sqrt", "cosmap")),
    "flow_dynamic_shift": FieldSpec(bool, "FLUX: shift training sigmas by the resolution's token "
                                    "count as the pipeline does at inference (default: the "
                                    "FLUX script's unshifted table)", _DATA),
    "flux_guidance": FieldSpec(float, "FLUX.1-dev: the training value of its guidance embedding "
                               "(default 3.5, FluxPipeline's inference default; diffusers' FLUX "
                               "README commands train at 1)", _DATA, low=0.0),
    "timestep_weighting": FieldSpec(str, "EXPERIMENTAL per-pair timestep weights (sdpo.timesteps"
                                    "; arXiv 2505.21893, whose v2 states its main theorem has a "
                                    "critical error; our own derivation): dpo-cm masks pairs with"
                                    " w < threshold, importance also multiplies by clip(w); DDPM "
                                    "models only", _OBJECTIVE,
                                    choices=("none", "dpo-cm", "importance")),
    "timestep_mask_threshold": FieldSpec(float, "EXPERIMENTAL: the mask's tau (pairs with w < tau"
                                         " get weight 0), >= 0", _OBJECTIVE, low=0),
    "timestep_clip": FieldSpec(float, "EXPERIMENTAL: importance weights clipped to [1 - X, 1 + X]"
                               ", X in [0, 1)", _OBJECTIVE, low=0, high=1, high_open=True),
    "timestep_range": FieldSpec(str, "EXPERIMENTAL: LOW:HIGH, timesteps drawn from and kept in "
                                "[LOW, HIGH)", _OBJECTIVE, True, check=parse_timestep_range),
    "train_batch_pairs": FieldSpec(int, "pairs per micro-batch per process", _OPTIM, low=1),
    "gradient_accumulation": FieldSpec(int, "micro-batches per optimizer step", _OPTIM, low=1),
    "learning_rate": FieldSpec(float, "learning rate (per pair if --scale-lr)", _OPTIM,
                               low=0, low_open=True),
    "scale_lr": FieldSpec(bool, "multiply the learning rate by the pairs per optimizer step",
                          _OPTIM),
    "warmup_steps": FieldSpec(int, "linear warmup steps, then a constant learning rate", _OPTIM,
                              low=0),
    "optimizer": FieldSpec(str, "optimizer; adamw8bit needs bitsandbytes", _OPTIM,
                           choices=("adamw", "adafactor", "adamw8bit")),
    "adam_beta1": FieldSpec(float, "AdamW beta1 in [0, 1)", _OPTIM, low=0, high=1,
                            high_open=True),
    "adam_beta2": FieldSpec(float, "AdamW beta2 in [0, 1)", _OPTIM, low=0, high=1,
                            high_open=True),
    "adam_epsilon": FieldSpec(float, "AdamW epsilon, > 0", _OPTIM, low=0, low_open=True),
    "weight_decay": FieldSpec(float, "decoupled weight decay, >= 0", _OPTIM, low=0),
    "max_grad_norm": FieldSpec(float, "gradient-norm clip, > 0", _OPTIM, low=0, low_open=True),
    # perfstep: fp16 autocast with dynamic loss scaling (torch.amp.GradScaler).
    "mixed_precision": FieldSpec(str, "bf16 or fp16 (loss-scaled) autocast on CUDA, or no (the "
                                 "CPU runs fp32)", _OPTIM, choices=("bf16", "fp16", "no")),
    "gradient_checkpointing": FieldSpec(bool, "recompute activations (less memory)", _OPTIM),
    "fsdp": FieldSpec(bool, "shard the policy UNet with FSDP2 under torchrun (SDXL-sized)", _OPTIM),
    # perfstep: the attention kernel and the UNets' memory layout (measured by sdpo-profile
    # overhead's sdpa-* and channels-last variants; the defaults stay until a GPU run says more).
    "attention": FieldSpec(str, "attention: sdpa (PyTorch picks), sdpa-flash|efficient|cudnn|math "
                           "(one kernel), xformers (needs the package)", _SPEED,
                           choices=("sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn",
                                    "sdpa-math", "xformers")),
    "channels_last": FieldSpec(bool, "UNets in channels_last (NHWC) memory layout", _SPEED),
    "compile": FieldSpec(bool, "torch.compile both UNets", _SPEED),
    "cuda_graphs": FieldSpec(bool, "torch.compile with CUDA graphs (needs a GPU)", _SPEED),
    "nvtx": FieldSpec(bool, "NVTX ranges around each phase, for Nsight", _SPEED),
    "profile_steps": FieldSpec(str, "START:STOP: cudaProfilerStart/Stop around those steps",
                               _SPEED, True, check=parse_profile_steps),
    "log_every": FieldSpec(int, "optimizer steps between metric reads", _SPEED, low=1),
    "on_nonfinite": FieldSpec(str, "on a non-finite loss or gradient: stop, or skip the step",
                              _SPEED, choices=("stop", "skip")),
    # perfstep: none picks 0 where nothing is decoded (synthetic pairs, a cache), else
    # min(8, CPUs per process - 1) (sdpo.train.data.default_num_workers).
    "num_workers": FieldSpec(int, "data-loading worker processes, at most the CPUs this "
                             "process may use; 0 decodes in this one; none: 0 for synthetic or "
                             "cached data, else min(8, CPUs/process - 1)",
                             _SPEED, True, low=0),
    "progress": FieldSpec(bool, "show a progress bar", _SPEED),
    # --- Trainer knobs (issue 16): LR schedule, epochs, augmentation, trackers, validation.
    "lr_scheduler": FieldSpec(str, "LR schedule after --warmup-steps (diffusers' get_scheduler)",
                              _OPTIM, choices=LR_SCHEDULERS),
    "lr_num_cycles": FieldSpec(int, "hard restarts of cosine_with_restarts", _OPTIM, low=1),
    "lr_power": FieldSpec(float, "power of the polynomial schedule", _OPTIM, low=0,
                          low_open=True),
    "num_epochs": FieldSpec(int, "passes over the data; sets max_steps from the data size "
                            "(give this or --max-steps, not both)", _RUN, True, low=1),
    "hflip": FieldSpec(bool, "flip winner and loser horizontally, each at random", _DATA),
    "random_crop": FieldSpec(bool, "random instead of centre crop (not with a sdpo-cache)",
                             _DATA),
    "report_to": FieldSpec(str, "metric tracker besides metrics.jsonl; wandb needs wandb",
                           _SPEED, choices=("tensorboard", "wandb", "none")),
    "validation_prompts": FieldSpec(str, "prompts file (one per line, or sdpo-eval suite JSON) "
                                    "for validation images", _RUN, True,
                                    check=check_prompts_file),
    "validation_every": FieldSpec(int, "optimizer steps between validation images; 0: only "
                                  "at the end (with --validation-prompts)", _RUN, low=0),
    "validation_seed": FieldSpec(int, "seed of the validation images' noise", _RUN, low=0,
                                 high=2**63 - 1),
    "validation_steps": FieldSpec(int, "sampler steps per validation image", _RUN, low=1,
                                  high=1000),
    "validation_guidance": FieldSpec(float, "classifier-free guidance of validation images",
                                     _RUN, low=0),
    # Run safety. max_skipped_fraction: see SKIPPED_STEPS_MINIMUM in sdpo/train/trainer.py.
    "overwrite": FieldSpec(bool, "start a fresh run in an --output-dir that holds one (removes "
                           "its checkpoints, metrics and export first)", _RUN),
    "checkpoints_total_limit": FieldSpec(int, "keep the N newest complete checkpoints; 0 keeps "
                                         "all", _RUN, low=0),
    "save_final": FieldSpec(str, "what the end of the run writes: full (final checkpoint, "
                            "diffusers folder and .pth), weights (the diffusers folder only: "
                            "no optimizer state, nothing to --resume), none (nothing: "
                            "throughput runs)", _RUN, choices=("full", "weights", "none")),
    "max_skipped_fraction": FieldSpec(float, "--on-nonfinite skip: stop when more than this "
                                      "fraction of optimizer steps was skipped", _SPEED,
                                      low=0, high=1),
}  # fmt: skip
FIELD_NAMES = list(FIELDS)

_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _describe(spec: FieldSpec) -> str:
    """What a field accepts, in words: 'an integer >= 1', 'a number in [0, 1)', ..."""
    if spec.choices:
        return "one of " + ", ".join(spec.choices)
    words = _KIND_WORDS[spec.kind]
    if spec.kind is float:
        words = "a finite number"
    if spec.low is not None and spec.high is not None:
        low = int(spec.low) if float(spec.low).is_integer() else spec.low
        high = int(spec.high) if float(spec.high).is_integer() else spec.high
        if spec.high > 2**62:
            words += f" in [{low}, 2**63)"
        else:
            words += (
                f" in {'(' if spec.low_open else '['}{low}, {high}{')' if spec.high_open else ']'}"
            )
    elif spec.low is not None:
        low = int(spec.low) if float(spec.low).is_integer() else spec.low
        words += f" {'>' if spec.low_open else '>='} {low}"
    if spec.optional:
        words += " (or none)"
    return words


def check_value(name: str, value: Any, label: str) -> Any:
    """``value`` if it has ``name``'s type and range (an int becomes a float for a float field);
    otherwise UsageError('LABEL: expected ..., got ...'). A bool is never a number and a float
    never an integer, so ``max_steps: 2.7`` or ``beta: true`` are refused, not coerced."""
    spec = FIELDS[name]
    expected = _describe(spec)
    if name == "mu":
        expected = "a finite number in [0, 1], off (no safeguard) or auto (the method's default)"
    if name == "resume" and isinstance(value, bool):
        value = "latest" if value else None  # resume: true (YAML, code) is the newest checkpoint

    def refuse(got: str) -> UsageError:
        return UsageError(f"{label}: expected {expected}, got {got}")

    if value is None:
        if spec.optional:
            return None
        raise refuse("nothing (null)")
    if name == "mu" and isinstance(value, str) and value.lower() == MU_AUTO:
        return MU_AUTO  # resolved by TrainConfig.validate (default_mu)
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise refuse(repr(value))
        return value
    if spec.kind in (int, float):
        allowed = (int,) if spec.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, allowed):
            raise refuse(f"{value!r} ({type(value).__name__})")
        if spec.kind is float:
            value = float(value)
            if not math.isfinite(value):
                raise refuse(repr(value))
        too_low = spec.low is not None and (
            value <= spec.low if spec.low_open else value < spec.low
        )
        too_high = spec.high is not None and (
            value >= spec.high if spec.high_open else value > spec.high
        )
        if too_low or too_high:
            raise refuse(repr(value))
        if name == "resolution" and value % 8:
            raise UsageError(
                f"{label}: expected a multiple of 8 (the VAE's downsampling), got {value}"
            )
        return value
    if not isinstance(value, str):
        raise refuse(f"{value!r} ({type(value).__name__})")
    if not value.strip():
        raise refuse("an empty string")
    if spec.choices and value not in spec.choices:
        listing = " (sdpo-train --list-presets)" if name == "preset" else ""
        raise UsageError(
            f"{label}: unknown {value!r}; expected one of {', '.join(spec.choices)}{listing}"
        )
    if spec.check is not None:
        try:
            spec.check(value)
        except UsageError as error:
            message = str(error).removeprefix(f"{name}: ")
            raise UsageError(f"{label}: {message}") from None
    return value


def check_output_dir(text: str, label: str = "output_dir") -> None:
    """The output folder exists and is writable, or can be created (before any model loads);
    ``label`` names it in the message (another command's flag, e.g. ``--output-dir``)."""
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{label}: {path} is a file, not a folder; choose another")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{label}: cannot write into {path} (permission denied)")
        return
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{label}: cannot create {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{label}: cannot create {path}: {ancestor} is not writable")


def check_knobs(config: TrainConfig) -> None:
    """The issue-16 settings against each other: epochs vs steps, random crops vs a cache,
    validation images vs a model with no VAE, the optional packages."""
    if config.random_crop and config.data is not None:
        from sdpo.train.cache import is_cache

        if is_cache(config.data):
            raise UsageError(
                "random_crop: a sdpo-cache stores centre crops and cannot reproduce random ones; "
                "drop --random-crop or train from the images (--data the parquet/JSONL source)"
            )
    if config.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise UsageError(
            "report_to: wandb is not installed (pip install wandb); use --report-to tensorboard"
        )
    if config.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(
            "optimizer: adamw8bit needs bitsandbytes (pip install bitsandbytes); use --optimizer "
            "adamw"
        )
    if config.validation_every and config.validation_prompts is None:
        raise UsageError("validation_every: needs --validation-prompts FILE (the prompts to draw)")


def check_machine(config: TrainConfig) -> None:
    """Settings this machine cannot run: a GPU-only loss backend or CUDA graphs without a GPU,
    xformers attention without the package."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.loss_backend in ("triton", "cuda"):
        from sdpo.objectives import resolve_backend

        try:
            resolve_backend(config.loss_backend, device)
        except RuntimeError as error:
            reason = re.split(r"; (?:use )?backend=", str(error))[0]
            raise UsageError(
                f"loss_backend: {config.loss_backend} cannot run here ({reason}); "
                "use --loss-backend auto or torch"
            ) from None
    if config.cuda_graphs and device.type != "cuda":
        raise UsageError("cuda_graphs: needs a CUDA device; drop --cuda-graphs on this machine")
    if config.attention in ("sdpa-efficient", "sdpa-cudnn") and device.type != "cuda":
        raise UsageError(
            f"attention: {config.attention} needs a CUDA device; use --attention sdpa here"
        )
    if config.attention == "xformers" and importlib.util.find_spec("xformers") is None:
        raise UsageError(
            "attention: xformers is not installed (pip install xformers); use --attention sdpa"
        )


# --- YAML -----------------------------------------------------------------------------------


class _StrictYamlLoader(yaml.SafeLoader):
    """YAML 1.2 core-schema scalars: only true/false are booleans (YAML 1.1's off/no/yes are
    strings, so ``mu: off`` is not False), ``1e-8`` is a float (1.1 reads it as a string), ``5:8``
    is a string (1.1 reads it as the base-60 integer 308), and a key given twice is an error."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise UsageError(f"{self.name}: line {line}: the key {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictYamlLoader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in (
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("int", r"^[-+]?[0-9]+$", list("-+0123456789")),
    (
        "float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        list("-+0123456789."),
    ),
):
    _StrictYamlLoader.add_implicit_resolver(
        f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), _first
    )


def _yaml_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    return int(loader.construct_scalar(node))


def _yaml_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    text = str(loader.construct_scalar(node)).lower()
    if text.endswith(".inf"):
        return -math.inf if text.startswith("-") else math.inf
    return math.nan if text == ".nan" else float(text)


_StrictYamlLoader.add_constructor("tag:yaml.org,2002:int", _yaml_int)
_StrictYamlLoader.add_constructor("tag:yaml.org,2002:float", _yaml_float)


def load_yaml(path: str) -> dict[str, Any]:
    """The file's keys (dashes read as underscores) and values, typed by YAML 1.2's core schema."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"config: no such file {path}")
    try:
        loaded = yaml.load(file.read_text(), Loader=_StrictYamlLoader) or {}
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = error.problem or error.context or "not valid YAML"
        raise UsageError(f"config: {path}{line}: {problem}") from None
    except yaml.YAMLError as error:
        raise UsageError(f"config: {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise UsageError(f"config: {path} must hold a mapping of keys to values")
    return {str(key).replace("-", "_"): value for key, value in loaded.items()}


# --- Aliases --------------------------------------------------------------------------------

# The diffusers Diffusion-DPO example's flag names (what its users type), as our flags. Its loss is
# -logsigmoid(-beta_dpo * (model_diff - ref_diff)); ours halves that margin, so beta = 2 beta_dpo.
ALIASES: dict[str, list[str]] = {
    "learning-rate": ["--learning-rate"],
    "train-batch-size": ["--train-batch-pairs"],
    "gradient-accumulation-steps": ["--gradient-accumulation"],
    "max-train-steps": ["--max-steps"],
    "checkpointing-steps": ["--checkpoint-every"],
    "lr-warmup-steps": ["--warmup-steps"],
    "adam-weight-decay": ["--weight-decay"],
    "dataloader-num-workers": ["--num-workers"],
    "pretrained-model-name-or-path": ["--pretrained"],
    "use-adafactor": ["--optimizer", "adafactor"],
    "enable-xformers-memory-efficient-attention": ["--attention", "xformers"],
}
# Handled after parsing: --beta_dpo X sets beta 2X; --resume_from_checkpoint X is --resume X.
_SPECIAL_ALIASES = ("beta-dpo", "resume-from-checkpoint")
_YAML_ALIASES = {
    "train_batch_size": "train_batch_pairs",
    "gradient_accumulation_steps": "gradient_accumulation",
    "max_train_steps": "max_steps",
    "checkpointing_steps": "checkpoint_every",
    "lr_warmup_steps": "warmup_steps",
    "adam_weight_decay": "weight_decay",
    "dataloader_num_workers": "num_workers",
    "pretrained_model_name_or_path": "pretrained",
}
_ALIAS_HELP = """aliases (the diffusers DPO example's spellings):
  every --foo-bar flag is also --foo_bar
  --train_batch_size N                  --train-batch-pairs N
  --gradient_accumulation_steps N       --gradient-accumulation N
  --max_train_steps N                   --max-steps N
  --checkpointing_steps N               --checkpoint-every N
  --lr_warmup_steps N                   --warmup-steps N
  --adam_weight_decay X                 --weight-decay X
  --dataloader_num_workers N            --num-workers N
  --pretrained_model_name_or_path P     --pretrained P
  --use_adafactor                       --optimizer adafactor
  --enable_xformers_memory_efficient_attention   --attention xformers
  --resume_from_checkpoint latest|PATH  --resume latest|PATH
  --beta_dpo X                          --beta 2X (their loss has no 1/2 on the margin; ours
                                        has, so their beta_dpo 2500 is our beta 5000)
"""


def _rewrite_aliases(argv: list[str]) -> list[str]:
    """Underscore spellings to dashes, diffusers names to ours; values are left alone."""
    rewritten: list[str] = []
    for token in argv:
        if not token.startswith("--") or token == "--":
            rewritten.append(token)
            continue
        name, equals, value = token[2:].partition("=")
        name = name.replace("_", "-")
        replacement = ALIASES.get(name, [f"--{name}"])
        if equals:
            replacement = [*replacement[:-1], f"{replacement[-1]}={value}"]
        rewritten.extend(replacement)
    return rewritten


# --- Command line ---------------------------------------------------------------------------

_NONE_WORDS = ("none", "off")
_MU_OFF_WORDS = ("none", "off", "null", "false", "no")
_EXPLICIT_NONE = "__none__"


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors raise UsageError (one line: the command prints it and
    exits 2) instead of printing the usage and exiting; its subcommands' parsers do the same."""

    def error(self, message: str):  # one line through UsageError, not usage + exit
        raise UsageError(message)


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _command_line_type(name: str, spec: FieldSpec) -> Callable[[str], Any]:
    parse = {int: _parse_int, float: _parse_float, str: str}[spec.kind]
    if not spec.optional:
        return parse
    none_words = _MU_OFF_WORDS if name == "mu" else _NONE_WORDS

    def parse_optional(text: str) -> Any:
        if name == "mu" and text.lower() == MU_AUTO:
            return MU_AUTO
        return _EXPLICIT_NONE if text.lower() in none_words else parse(text)

    return parse_optional


def integer_at_least(least: int) -> Callable[[str], int]:
    """An argparse type for a count flag of a command that is not the trainer (sdpo-cache,
    sdpo-profile): an integer >= ``least``, refused at parse time (exit 2, before torch loads)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {least}, got {text!r}"
            ) from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {value}")
        return value

    parse.__name__ = f"integer >= {least}"  # argparse names the type in its messages
    return parse


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a SLURM or taskset share, not the
    machine's count), or os.cpu_count() where the platform has no affinity call."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_num_workers(num_workers: int, default_text: str = "", cpus: int | None = None) -> None:
    """Refuses a ``--num-workers`` above the CPUs this process may use. Decoding is CPU-bound, so
    workers beyond that only compete for the same cores, and each one is a process with its own
    prefetched batches: a typo such as 100000 would fork until the machine stalls (sdpo-train
    did, before this check: torch only warns). ``default_text``: what leaving the flag out
    gives, for the message."""
    cpus = cpus if cpus is not None else available_cpus()
    if num_workers > cpus:
        default = f", or leave it out for the default ({default_text})" if default_text else ""
        raise UsageError(
            f"--num-workers {num_workers}: this process may use {cpus} CPUs, and more decoding "
            f"workers than CPUs only compete for them; use --num-workers {cpus} or fewer{default}"
        )


def setting_argument_type(name: str) -> Callable[[str], Any]:
    """An argparse type for trainer setting ``name`` taken by another command (sdpo-cache): the
    trainer's command-line parsing, then its type and range check (``check_value``), refused as
    an argparse error (exit 2) instead of after the command has done its work."""
    parse = _command_line_type(name, FIELDS[name])

    def parse_and_check(text: str) -> Any:
        try:
            return check_value(name, parse(text), name)
        except UsageError as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix(f"{name}: ")) from None

    parse_and_check.__name__ = name  # argparse names the type in "invalid NAME value"
    return parse_and_check


def _default_text(name: str) -> str:
    default = TrainConfig.__dataclass_fields__[name].default
    if default is None:
        return "none"
    return str(default).lower() if isinstance(default, bool) else str(default)


class _ListPresets(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(presets_text())
        parser.exit()


def presets_text() -> str:
    width = max(len(name) for name in PRESETS)
    return "\n".join(f"{name:<{width}}  {PRESET_HELP[name]}" for name in PRESETS)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="sdpo-train",
        usage="sdpo-train [--preset NAME] [--config FILE.yaml] [--FLAG VALUE ...]",
        description="Preference alignment of diffusion models: Diffusion-DPO, DSPO, DMPO, with "
        "the SDPO safeguard. Settings come from a --preset, then a --config YAML file (keys as "
        "the flags, with underscores), then these flags.",
        epilog="presets:\n"
        + "\n".join(f"  {line}" for line in presets_text().splitlines())
        + "\n\n"
        + _ALIAS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # --learn is not silently --learning-rate: it gets a did-you-mean
    )
    parser.add_argument(
        "--config", metavar="FILE", help="YAML file of settings (keys as the flags)"
    )
    parser.add_argument("--list-presets", action=_ListPresets, help="list the presets and exit")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, spec in FIELDS.items():
        group = groups.get(spec.section) or parser.add_argument_group(spec.section)
        groups[spec.section] = group
        flag = "--" + name.replace("_", "-")
        choices = f"; one of {', '.join(spec.choices)}" if spec.choices else ""
        help_text = f"{spec.help} (default: {_default_text(name)}{choices})"
        if name == "resume":
            # --resume alone is "latest" (as before); --resume PATH a checkpoint folder.
            group.add_argument(
                flag,
                dest=name,
                nargs="?",
                const="latest",
                default=None,
                metavar="PATH|latest",
                help=help_text.replace("%", "%%"),
            )
            group.add_argument(
                "--no-resume", dest=name, action="store_const", const=_EXPLICIT_NONE,
                help="a fresh run (the default)",
            )  # fmt: skip
        elif spec.kind is bool:
            group.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text.replace("%", "%%"),
            )
        else:
            metavar = {int: "N", float: "X", str: "TEXT"}[spec.kind]
            if spec.choices:
                metavar = name.upper()  # the choices are in the help text
            group.add_argument(
                flag,
                dest=name,
                type=_command_line_type(name, spec),
                default=None,
                metavar=metavar,
                help=help_text.replace("%", "%%"),
            )
    parser.add_argument("--beta-dpo", type=_parse_float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--resume-from-checkpoint", default=None, help=argparse.SUPPRESS)
    return parser


def _known_flags(parser: argparse.ArgumentParser) -> list[str]:
    flags = [flag for action in parser._actions for flag in action.option_strings]
    return flags + [f"--{name}" for name in (*ALIASES, *_SPECIAL_ALIASES)]


def _unknown_flag_error(parser: argparse.ArgumentParser, extras: list[str]) -> UsageError:
    token = extras[0]
    if not token.startswith("-"):
        return UsageError(f"unexpected argument {token!r} (every setting is a --flag VALUE)")
    flag = token.partition("=")[0]
    close = difflib.get_close_matches(flag, _known_flags(parser), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else "; sdpo-train --help lists the flags"
    return UsageError(f"unknown flag {flag}{hint}")


def _unknown_key_error(source: str, key: str) -> UsageError:
    close = difflib.get_close_matches(key, [*FIELD_NAMES, *_YAML_ALIASES, "beta_dpo"], n=1)
    hint = f"; did you mean {close[0]}?" if close else f"; known keys: {', '.join(FIELD_NAMES)}"
    return UsageError(f"{source}: unknown key {key}{hint}")


def apply_mapping(config: TrainConfig, mapping: dict[str, Any], source: str) -> None:
    """Checks each value (see ``check_value``) and sets it; ``source`` prefixes any error."""
    for key in mapping:
        if key not in FIELDS:
            raise _unknown_key_error(source, key)
    for key, value in mapping.items():
        setattr(config, key, check_value(key, value, f"{source}: {key}"))


def _from_yaml(path: str) -> dict[str, Any]:
    """The YAML file's settings with its aliases resolved and ``mu: off/false`` read as None."""
    values: dict[str, Any] = {}
    for key, value in load_yaml(path).items():
        if key == "beta_dpo":
            value = check_value("beta", value, f"{path}: beta_dpo") * 2.0
            key = "beta"
        key = _YAML_ALIASES.get(key, key)
        if key not in FIELDS:
            raise _unknown_key_error(path, key)
        if key == "mu" and (
            value is False or (isinstance(value, str) and value.lower() in _MU_OFF_WORDS)
        ):
            value = None
        values[key] = value
    return values


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Preset, then YAML, then flags; validated. Raises UsageError on any bad name or value."""
    parser = build_parser()
    arguments, extras = parser.parse_known_args(
        _rewrite_aliases(list(sys.argv[1:] if argv is None else argv))
    )
    if extras:
        raise _unknown_flag_error(parser, extras)
    given = {
        name: None if value == _EXPLICIT_NONE else value
        for name, value in vars(arguments).items()
        if name in FIELDS and value is not None
    }
    if arguments.beta_dpo is not None:
        if "beta" in given:
            raise UsageError("give --beta or --beta_dpo (= beta / 2), not both")
        check_value("beta", arguments.beta_dpo, "--beta_dpo")
        given["beta"] = 2.0 * arguments.beta_dpo
    if arguments.resume_from_checkpoint is not None:
        given["resume"] = arguments.resume_from_checkpoint
    yaml_values = _from_yaml(arguments.config) if arguments.config else {}
    # --num-epochs wins over a preset's max_steps; both given by the user is ambiguous.
    chosen = {**yaml_values, **given}
    if chosen.get("num_epochs") is not None and chosen.get("max_steps") is not None:
        raise UsageError(
            "num_epochs: give --num-epochs or --max-steps (--max_train_steps), not both; epochs "
            "set max_steps from the data size"
        )
    config = TrainConfig()
    if "preset" in given:
        preset = check_value("preset", given["preset"], "--preset")
    else:
        preset = check_value("preset", yaml_values.get("preset"), f"{arguments.config}: preset")
    if preset is not None:
        apply_mapping(config, PRESETS[preset], f"preset {preset}")
    apply_mapping(config, yaml_values, arguments.config or "config")
    for name, value in given.items():
        setattr(config, name, check_value(name, value, "--" + name.replace("_", "-")))
    config.validate()
    return config


def config_to_json(config: TrainConfig) -> str:
    values = dataclasses.asdict(config)
    return json.dumps(values, indent=2, sort_keys=True)
