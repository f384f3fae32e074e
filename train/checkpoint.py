"""Checkpoints (save, resume) and the final export of the trained UNet.

Atomic checkpoints: written to a temporary folder, completed with a marker, then renamed.

A kill during a save leaves at most a ``.tmp-*`` folder, which ``latest_checkpoint`` ignores, so
``--resume`` always picks a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sdpo.train.config import TrainConfig, config_to_json
from sdpo.train.distributed import Distributed, full_model_state, full_optimizer_state
from sdpo.train.models import merged_state_dict

COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
MODEL_FILE = "unet_state.safetensors"
STATE_FILE = "training_state.pt"


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def _fsync_tree(folder: Path) -> None:
    for file in folder.iterdir():
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def save_checkpoint(
    output_dir: str | Path, step: int, model_state: dict, training_state: dict
) -> Path:
    """Writes checkpoint-STEP atomically and returns its path (rank 0 only)."""
    final = checkpoint_path(output_dir, step)
    temporary = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model_state.items()}
    save_file(tensors, str(temporary / MODEL_FILE))
    torch.save(training_state, temporary / STATE_FILE)
    (temporary / COMPLETE_MARKER).write_text(str(step))
    _fsync_tree(temporary)
    if final.exists():  # a checkpoint of the same step from an earlier, interrupted run
        shutil.rmtree(final)
    os.replace(temporary, final)
    return final


def load_checkpoint(path: str | Path) -> tuple[dict, dict]:
    folder = Path(path)
    if not (folder / COMPLETE_MARKER).is_file():
        raise ValueError(
            f"resume: {folder} is not a complete checkpoint (no {COMPLETE_MARKER} marker)"
        )
    model_state = load_file(str(folder / MODEL_FILE))
    training_state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    return model_state, training_state


@dataclass
class ResumeState:
    """Where a resumed run continues: the optimizer step done, the next (epoch, batch index) to
    read, the skipped images so far, and the optimizer and LR schedule states."""

    path: Path
    step: int
    position: tuple[int, int]
    skipped_images: int
    optimizer: dict
    lr_schedule: dict


def load_resume_state(output_dir: str | Path, unet: nn.Module) -> ResumeState | None:
    """Loads the newest complete checkpoint's weights into ``unet`` (the full weights, before
    any sharding; every rank reads the checkpoint itself); None when there is none."""
    path = latest_checkpoint(output_dir)
    if path is None:
        return None
    model_state, state = load_checkpoint(path)
    unet.load_state_dict(model_state)
    return ResumeState(
        path=path,
        step=state["step"],
        position=tuple(state["position"]),
        skipped_images=state["skipped_images"],
        optimizer=state["optimizer"],
        lr_schedule=state["lr_schedule"],
    )


def save_training_state(
    config: TrainConfig,
    environment: Distributed,
    unet: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_schedule: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    position: tuple[int, int],
    skipped_images: int,
) -> Path:
    """Checkpoint at an optimizer-step boundary (accumulation position 0); all ranks barrier.

    ``position`` is the next (epoch, batch index) to read: a resumed run continues from there.
    """
    environment.barrier()
    sharded = config.fsdp and environment.enabled
    # With FSDP2 every rank takes part in gathering the full states (collectives); rank 0
    # receives them on the CPU and writes.
    model_state = full_model_state(unet) if sharded else None
    optimizer_state = full_optimizer_state(unet, optimizer) if sharded else None
    if environment.is_main:
        state = {
            "step": step,
            "position": list(position),
            "optimizer": optimizer_state if sharded else optimizer.state_dict(),
            "lr_schedule": lr_schedule.state_dict(),
            "skipped_images": skipped_images,
            "config": json.loads(config_to_json(config)),
        }
        save_checkpoint(
            config.output_dir, step, model_state if sharded else unet.state_dict(), state
        )
    environment.barrier()
    return checkpoint_path(config.output_dir, step)


def export_unet(
    unet: nn.Module,
    output_dir: Path,
    state: dict[str, Tensor] | None = None,
    name: str = "unet",
) -> None:
    """DIR/NAME/ (diffusers, safetensors) and DIR/NAME.pth (a plain state dict); LoRA adapters
    are merged into the weights first, so both load into a plain model. ``state``: the full
    weights when the model is sharded. ``name``: "unet", or "transformer" for a flow model."""
    if state is None:
        state = merged_state_dict(unet)
    plain = type(unet).from_config(unet.config)
    plain.load_state_dict(state)
    plain.save_pretrained(output_dir / name, safe_serialization=True)
    torch.save(state, output_dir / f"{name}.pth")
