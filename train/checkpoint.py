"""Atomic checkpoints: written to a temporary folder, completed with a marker, then renamed.

A kill during a save leaves at most a ``.tmp-*`` folder, which ``latest_checkpoint`` ignores, so
``--resume`` always picks a complete checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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
