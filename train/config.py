"""Training configuration: one dataclass, presets, YAML files and command-line flags.

Precedence: preset < YAML file < command-line flags. Every field is a flag (``--field-name``) and
a YAML key (``field_name``); an unknown YAML key or preset is an error before any model loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdpo.objectives import METHODS, parse_granularity


@dataclass
class TrainConfig:
    # What to run.
    preset: str | None = None
    output_dir: str = "runs/train"
    max_steps: int = 10
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    resume: bool = False
    seed: int = 0
    # The objective (see sdpo.preference_loss).
    method: str = "diffusion-dpo"
    beta: float = 5000.0
    mu: float | None = None
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
    mixed_precision: str = "bf16"  # "bf16" autocast on CUDA, or "no"; CPU runs in fp32
    gradient_checkpointing: bool = False
    # FSDP2 (torch.distributed.fsdp.fully_shard) instead of DDP under torchrun: the policy UNet's
    # weights, gradients and optimizer state are sharded over the ranks (SDXL-sized models).
    fsdp: bool = False
    attention: str = "sdpa"  # "sdpa" (PyTorch) or "xformers"
    # Speed and measurement.
    compile: bool = False
    cuda_graphs: bool = False
    nvtx: bool = False
    # "START:STOP": cudaProfilerStart before optimizer step START+1, cudaProfilerStop after step
    # STOP, so `nsys --capture-range=cudaProfilerApi` records only that window (CUDA only).
    profile_steps: str | None = None
    log_every: int = 1
    on_nonfinite: str = "stop"  # "stop" or "skip"
    num_workers: int = 0
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def validate(self) -> None:
        """Raises ValueError naming the bad field; runs before any model or data loads."""
        if self.method not in METHODS:
            raise ValueError(
                f"method: unknown {self.method!r}; expected one of {', '.join(METHODS)}"
            )
        parse_granularity(self.granularity)
        if self.mu is not None and not 0.0 <= self.mu <= 1.0:
            raise ValueError(
                f"mu: expected a number in [0, 1] (or absent: safeguard off), got {self.mu}"
            )
        if self.beta <= 0:
            raise ValueError(f"beta: expected > 0, got {self.beta}")
        choices = {
            "model": ("tiny", "sd15", "sdxl"),
            "optimizer": ("adamw", "adafactor"),
            "mixed_precision": ("bf16", "no"),
            "attention": ("sdpa", "xformers"),
            "on_nonfinite": ("stop", "skip"),
            "loss_backend": ("auto", "torch", "triton", "cuda"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name}: unknown {getattr(self, name)!r}; expected one of {', '.join(allowed)}"
                )
        for name in (
            "max_steps",
            "train_batch_pairs",
            "gradient_accumulation",
            "log_every",
            "resolution",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        for name in (
            "checkpoint_every",
            "warmup_steps",
            "lora_rank",
            "num_workers",
            "synthetic_pairs",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(
                f"caption_dropout: expected a number in [0, 1], got {self.caption_dropout}"
            )
        if self.fsdp and self.lora_rank > 0:
            raise ValueError(
                "fsdp: LoRA adapters are small enough to replicate; drop --fsdp (DDP) or --lora-rank"
            )
        if self.profile_steps is not None:
            parse_profile_steps(self.profile_steps)
        if self.model != "tiny" and self.pretrained is None:
            raise ValueError(
                f"pretrained: model {self.model!r} needs --pretrained PATH (a local diffusers folder "
                "with unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
            )
        if self.data is None and self.model != "tiny" and self.pretrained != "random":
            raise ValueError(
                "data: expected --data PATH (parquet shards, a save_to_disk folder or a JSONL "
                "manifest); synthetic pairs are only for the tiny model and --pretrained random"
            )


def parse_profile_steps(text: str) -> tuple[int, int]:
    """ "START:STOP" -> (START, STOP) with 0 <= START < STOP; ValueError otherwise."""
    parts = text.split(":")
    try:
        start, stop = (int(part) for part in parts)
    except ValueError:
        raise ValueError(
            f"profile_steps: expected START:STOP optimizer steps (e.g. 5:8), got {text!r}"
        ) from None
    if not 0 <= start < stop:
        raise ValueError(f"profile_steps: expected 0 <= START < STOP, got {text!r}")
    return start, stop


# The reference scripts (AIDC-AI/Diffusion-SDPO scripts/train/*.sh, ALGORITHMS.md section 4):
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
}

FIELD_NAMES = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "extra"]


def _field_type(name: str) -> Any:
    hints = typing.get_type_hints(TrainConfig)
    return hints[name]


def _coerce(name: str, value: Any) -> Any:
    """YAML values into the field's type (YAML reads 1e-8 as a string)."""
    kind = _field_type(name)
    if value is None:
        return None
    base = [arg for arg in typing.get_args(kind) if arg is not type(None)] or [kind]
    target = base[0]
    try:
        if target is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if target in (int, float, str):
            return target(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name}: expected {getattr(target, '__name__', target)}, got {value!r}"
        ) from None
    return value


def apply_mapping(config: TrainConfig, mapping: dict[str, Any], source: str) -> None:
    unknown = sorted(set(mapping) - set(FIELD_NAMES))
    if unknown:
        raise ValueError(
            f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(FIELD_NAMES)}"
        )
    for name, value in mapping.items():
        setattr(config, name, _coerce(name, value))


def load_yaml(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"config: no such file {path}")
    loaded = yaml.safe_load(file.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config: {path} must hold a mapping of keys to values")
    return {str(key).replace("-", "_"): value for key, value in loaded.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdpo-train",
        description="Preference alignment of diffusion models: Diffusion-DPO, DSPO, DMPO, with the SDPO safeguard.",
    )
    parser.add_argument(
        "--config", help="YAML file of settings (keys as the flags, with underscores)"
    )
    for name in FIELD_NAMES:
        kind = _field_type(name)
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None
            )
        else:
            base = [arg for arg in typing.get_args(kind) if arg is not type(None)] or [kind]
            optional = type(None) in typing.get_args(kind)
            parse = _optional(base[0]) if optional else base[0]
            parser.add_argument(flag, dest=name, type=parse, default=None)
    return parser


_EXPLICIT_NONE = "__none__"


def _optional(parse):
    """For optional fields: "none"/"off" on the command line sets None (e.g. --mu off)."""

    def parse_optional(text: str):
        return _EXPLICIT_NONE if text.lower() in ("none", "off") else parse(text)

    parse_optional.__name__ = getattr(parse, "__name__", "value")
    return parse_optional


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Preset, then YAML, then flags; validated. Raises ValueError on any unknown name."""
    arguments = build_parser().parse_args(argv)
    config = TrainConfig()
    given = {
        name: value
        for name, value in vars(arguments).items()
        if name != "config" and value is not None
    }
    given = {name: None if value == _EXPLICIT_NONE else value for name, value in given.items()}
    yaml_values = load_yaml(arguments.config) if arguments.config else {}
    preset = given.get("preset", yaml_values.get("preset"))
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset: unknown {preset!r}; expected one of {', '.join(PRESETS)}")
        apply_mapping(config, PRESETS[preset], f"preset {preset}")
    apply_mapping(config, yaml_values, f"config {arguments.config}")
    apply_mapping(config, given, "command line")
    config.validate()
    return config


def config_to_json(config: TrainConfig) -> str:
    values = dataclasses.asdict(config)
    values.pop("extra", None)
    return json.dumps(values, indent=2, sort_keys=True)
