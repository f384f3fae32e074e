"""Checkpoints (save, resume, what a resume may change) and the final export of the UNet.

Atomic checkpoints: written to a temporary folder ``checkpoint-N.tmp-PID``, completed with a
marker listing each file's size, then renamed. A kill during a save leaves at most a temporary
folder, which ``--resume`` ignores and the next run removes. A checkpoint whose files do not
match its marker or do not load (a damaged disk, a copy cut short) is passed over, with a
warning, for the previous complete one. A failed write (a full disk) removes the temporary
folder and keeps every earlier checkpoint. Only when every checkpoint of the folder is damaged
is ``--resume`` refused (``NoUsableCheckpoint``): starting afresh there would cut metrics.jsonl.

A checkpoint stores the run's settings and world size: ``--resume`` refuses a run whose settings
change the math or the data order (``RESUME_RULES``), so a resumed run is the same run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sdpo.train.config import TrainConfig, config_to_json, default_mu
from sdpo.train.distributed import Distributed, full_model_state, full_optimizer_state
from sdpo.train.errors import UsageError
from sdpo.train.models import merged_state_dict
from sdpo.train.outputs import WriteError, replacing, save_torch, write_failure, writing

COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# What an interrupted save leaves: a checkpoint's temporary folder, or the temporary name of an
# export or of metrics.jsonl (sdpo.train.outputs.replacing).
TEMPORARY_PATTERN = re.compile(
    r"^(checkpoint-\d+|unet|unet\.pth|transformer|transformer\.pth|transformer_lora|"
    r"metrics\.jsonl)\.tmp-\d+$"
)
MODEL_FILE = "unet_state.safetensors"
STATE_FILE = "training_state.pt"
METRICS_FILE = "metrics.jsonl"

# Every TrainConfig field, classified for --resume. "same": it changes the math or the data order,
# so a checkpoint continues only with the value it was written with. "free": it changes only how
# the run is watched, saved or how fast it goes (results equal to float rounding), so it may
# change between the interrupted run and its resume. A test checks every field is here; a field
# missing from the table counts as "same" (refusing is the safe side).
RESUME_RULES: dict[str, str] = {
    "preset": "free",  # a name for starting values; the values themselves are compared
    "output_dir": "free",  # a run may be moved
    "max_steps": "free",  # where to stop (a resume past it is refused separately)
    "checkpoint_every": "free",
    "resume": "free",
    "seed": "same",
    "method": "same",
    "beta": "same",
    "mu": "same",
    "granularity": "same",
    "dmpo_alpha": "same",
    "loss_backend": "free",  # the backends agree to float rounding (tested)
    "model": "same",
    "pretrained": "same",
    "allow_download": "free",
    "data": "same",
    "resolution": "same",
    "caption_dropout": "same",
    "synthetic_pairs": "same",
    "lora_rank": "same",
    "train_batch_pairs": "same",
    "gradient_accumulation": "same",
    "learning_rate": "same",
    "scale_lr": "same",
    "warmup_steps": "same",
    "optimizer": "same",
    "adam_beta1": "same",
    "adam_beta2": "same",
    "adam_epsilon": "same",
    "weight_decay": "same",
    "max_grad_norm": "same",
    "mixed_precision": "same",  # bf16 autocast vs fp32 on CUDA
    "gradient_checkpointing": "free",  # recomputes the same activations
    "fsdp": "free",  # full-state checkpoints; reduce-scatter vs all-reduce: rounding only
    "attention": "free",  # sdpa vs xformers: rounding only
    "compile": "free",
    "cuda_graphs": "free",
    "nvtx": "free",
    "profile_steps": "free",
    "log_every": "free",  # the running statistics are in the checkpoint
    "on_nonfinite": "free",  # what to do on a non-finite step; finite steps are unchanged
    "num_workers": "free",  # the data order does not depend on it (tested)
    "progress": "free",
    "overwrite": "free",
    "checkpoints_total_limit": "free",
    "save_final": "free",  # what the end writes, not what is trained
    "max_skipped_fraction": "free",
    "lr_scheduler": "same",
    "lr_num_cycles": "same",
    "lr_power": "same",
    "num_epochs": "free",  # sets max_steps, which may change
    "hflip": "same",
    "random_crop": "same",
    "report_to": "free",
    # Validation draws from its own seeded generator (fork_rng) and leaves training's draws alone.
    "validation_prompts": "free",
    "validation_every": "free",
    "validation_seed": "free",
    "validation_steps": "free",
    "validation_guidance": "free",
    "flow_density": "same",
    "logit_mean": "same",
    "logit_std": "same",
    "mode_scale": "same",
    "flow_loss_weighting": "same",
    "flow_dynamic_shift": "same",
    "flux_guidance": "same",  # the guidance embedding's input: changes every prediction
    "timestep_weighting": "same",
    "timestep_mask_threshold": "same",
    "timestep_clip": "same",
    "timestep_range": "same",
    "channels_last": "free",  # a memory layout: the same math, rounding only (tested on CPU)
}


class CheckpointError(WriteError):
    """A checkpoint could not be written (a full disk, no permission); earlier ones are kept."""


class NoUsableCheckpoint(UsageError):
    """``--resume`` found checkpoints in the folder, and every one is damaged."""


def warn(message: str) -> None:
    print(f"sdpo-train: warning: {message}", file=sys.stderr, flush=True)


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The folders with a completion marker, oldest step first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        step = checkpoint_step(child)
        if step is not None and (child / COMPLETE_MARKER).is_file():
            found.append((step, child))
    return [path for _, path in sorted(found)]


def checkpoint_entries(output_dir: str | Path) -> list[Path]:
    """Everything named ``checkpoint-N`` in the folder (complete or not, folder or file), newest
    step first: what ``--resume latest`` tries, in order."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(checkpoint_step(child), child) for child in root.iterdir()]
    found = sorted((step, path) for step, path in found if step is not None)
    return [path for _, path in reversed(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def remove_temporary_folders(output_dir: str | Path) -> list[Path]:
    """Removes the ``NAME.tmp-PID`` folders and files an interrupted save left; returns them."""
    root = Path(output_dir)
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if not TEMPORARY_PATTERN.match(child.name):
                continue
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed.append(child)
    return removed


def prune_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Removes all but the ``keep`` newest complete checkpoints (``keep`` 0: none removed)."""
    if keep <= 0:
        return []
    old = complete_checkpoints(output_dir)[:-keep]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def _fsync_tree(folder: Path) -> None:
    for file in folder.iterdir():
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def save_checkpoint(
    output_dir: str | Path, step: int, model_state: dict, training_state: dict
) -> Path:
    """Writes checkpoint-STEP atomically and returns its path (rank 0 only). On a failed write
    the temporary folder is removed and CheckpointError names the cause and the file (a full
    disk, a read-only file system, torch's zip writer failing: see sdpo.train.outputs)."""
    final = checkpoint_path(output_dir, step)
    temporary = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    current = temporary
    try:
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir(parents=True)
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model_state.items()}
        current = temporary / MODEL_FILE
        save_file(tensors, str(current))
        current = temporary / STATE_FILE
        save_torch(training_state, current)
        sizes = {name: (temporary / name).stat().st_size for name in (MODEL_FILE, STATE_FILE)}
        current = temporary / COMPLETE_MARKER
        current.write_text(json.dumps({"step": step, "sizes": sizes}))
        _fsync_tree(temporary)
        current = final
        # A checkpoint of the same step from an earlier, interrupted run, or a damaged entry of
        # that name (a file where a folder belongs).
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        elif final.exists() or final.is_symlink():
            final.unlink()
        os.replace(temporary, final)
    except Exception as error:
        reason = write_failure(error, current)
        shutil.rmtree(temporary, ignore_errors=True)
        if reason is None:
            raise
        file = final / current.relative_to(temporary) if current != final else final
        raise CheckpointError(f"checkpoint: {reason} while writing {file}") from error
    return final


def _check_sizes(folder: Path) -> None:
    """The files the marker lists have the sizes it recorded (markers from before sizes were
    recorded hold just the step)."""
    try:
        marker = json.loads((folder / COMPLETE_MARKER).read_text())
    except ValueError:
        marker = None
    if not isinstance(marker, dict):
        return
    for name, size in marker.get("sizes", {}).items():
        file = folder / name
        if not file.is_file():
            raise ValueError(f"{file} is missing")
        if file.stat().st_size != size:
            raise ValueError(f"{file} has {file.stat().st_size} bytes, {size} were written")


def load_checkpoint(path: str | Path) -> tuple[dict, dict]:
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"resume: {folder} is a file, not a checkpoint folder")
    if not (folder / COMPLETE_MARKER).is_file():
        raise ValueError(
            f"resume: {folder} is not a complete checkpoint (no {COMPLETE_MARKER} marker)"
        )
    _check_sizes(folder)
    model_state = load_file(str(folder / MODEL_FILE))
    training_state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    return model_state, training_state


@dataclass
class ResumeState:
    """Where a resumed run continues: the optimizer step done, the next (epoch, batch index) to
    read, the skipped images and steps so far (to the last log row), the running statistics
    since that row (one row per rank), the optimizer, LR schedule and fp16 loss scaler states,
    and the last finite step's gradient norm (the next log row's ``grad_norm`` when every step
    between the checkpoint and that row is skipped).

    Nothing else carries state between steps: every random draw comes from a generator seeded by
    the position (``data.generator_for``), never from torch's global generator (tested)."""

    path: Path
    step: int
    position: tuple[int, int]
    skipped_images: int
    skipped_steps: int
    running_stats: Tensor | None
    optimizer: dict
    lr_schedule: dict
    model_state: dict
    config: dict | None
    world_size: int | None
    grad_scaler: dict | None = None  # None: not an fp16 run, or written before it was saved
    last_grad_norm: float = float("nan")


def read_checkpoint(path: Path) -> ResumeState:
    model_state, state = load_checkpoint(path)
    return ResumeState(
        path=path,
        step=state["step"],
        position=tuple(state["position"]),
        skipped_images=state["skipped_images"],
        skipped_steps=state.get("skipped_steps", 0),
        running_stats=state.get("running_stats"),
        optimizer=state["optimizer"],
        lr_schedule=state["lr_schedule"],
        model_state=model_state,
        config=state.get("config"),
        world_size=state.get("world_size"),
        grad_scaler=state.get("grad_scaler"),
        last_grad_norm=state.get("last_grad_norm", float("nan")),
    )


def find_resume_state(config: TrainConfig, warn_here: bool) -> ResumeState | None:
    """The checkpoint ``--resume`` names, loaded: a given folder, or (latest) the newest one in
    --output-dir that loads, passing over damaged ones (no marker, wrong sizes, not loadable, a
    file where the folder belongs) with a warning; None when latest finds no checkpoint at all.
    A given folder that does not load is a UsageError; a folder whose every checkpoint is
    damaged is NoUsableCheckpoint (a fresh run there would cut the history in metrics.jsonl)."""
    if config.resume not in (None, "latest"):
        path = Path(config.resume).expanduser()
        try:
            return read_checkpoint(path)
        except Exception as error:
            raise UsageError(f"resume: cannot load checkpoint {path}: {error}") from None
    damaged: list[tuple[Path, Exception]] = []
    for path in checkpoint_entries(config.output_dir):
        try:
            state = read_checkpoint(path)
        except Exception as error:
            damaged.append((path, error))
            continue
        if warn_here:  # only once one loads: a refusal below stays one line
            for passed_over, error in damaged:
                warn(f"checkpoint {passed_over} is damaged ({error}); resuming from {path}")
        return state
    if damaged:
        listed = "; ".join(f"{path.name}: {error}" for path, error in damaged)
        raise NoUsableCheckpoint(
            f"resume: every checkpoint in {config.output_dir} is damaged ({listed}); nothing to resume from. Restore one, or give --overwrite "
            "to start a new run there (it removes them and metrics.jsonl)"
        )
    return None


def config_differences(saved: dict, config: TrainConfig) -> list[str]:
    """'name: old -> new' for each setting that must stay the same and differs."""
    current = json.loads(config_to_json(config))
    differences = []
    for name, value in current.items():
        if RESUME_RULES.get(name, "same") == "free" or name not in saved:
            continue
        if saved[name] != value:
            differences.append(f"{name} {saved[name]!r} -> {value!r}")
    return differences


def check_same_run(state: ResumeState, config: TrainConfig, world_size: int) -> None:
    """UsageError (one line, every difference) unless the checkpoint continues as this run."""
    differences = config_differences(state.config or {}, config)
    if state.world_size is not None and state.world_size != world_size:
        # The data each rank reads and the per-rank random streams depend on the world size, so
        # a resume across world sizes would not be the interrupted run: refused.
        differences.append(f"world size (processes) {state.world_size} -> {world_size}")
    if differences:
        hint = ""
        saved = state.config or {}
        defaulted_on = config.mu is not None and config.mu == default_mu(config)
        if "mu" in saved and saved["mu"] is None and defaulted_on:
            # Checkpoints written while --mu defaulted to off store mu null; the default is now
            # the method's safeguard, so resuming one unchanged would switch the safeguard on.
            hint = (
                f" (mu now defaults to {config.mu:g}; this checkpoint trained without the "
                "safeguard: add --mu off to continue it)"
            )
        raise UsageError(
            f"resume: {state.path} was written by a different run; these settings differ "
            f"(checkpoint -> now): {'; '.join(differences)}{hint}. Resume with the checkpoint's "
            "values, or start a new run in another --output-dir"
        )
    if state.step > config.max_steps:
        raise UsageError(
            f"resume: {state.path} is at step {state.step}, past --max-steps {config.max_steps}; "
            f"give --max-steps above {state.step} to train further"
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
    skipped_steps: int = 0,
    running_stats: Tensor | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
    last_grad_norm: float = float("nan"),
) -> Path:
    """Checkpoint at an optimizer-step boundary (accumulation position 0); all ranks barrier.

    ``position`` is the next (epoch, batch index) to read: a resumed run continues from there.
    ``running_stats``: (world size, n) statistics since the last log row, one row per rank.
    ``grad_scaler``: fp16's loss scaler (its scale and growth tracker; the same on every rank,
    which all see the same all-reduced gradients). ``last_grad_norm``: the last finite step's
    gradient norm, as the trainer carries it to the next log row.
    A failed write raises CheckpointError on every rank (none waits at a barrier forever).
    """
    environment.barrier()
    sharded = config.fsdp and environment.enabled
    # With FSDP2 every rank takes part in gathering the full states (collectives); rank 0
    # receives them on the CPU and writes.
    model_state = full_model_state(unet) if sharded else None
    optimizer_state = full_optimizer_state(unet, optimizer) if sharded else None
    failure: CheckpointError | None = None
    if environment.is_main:
        state = {
            "step": step,
            "position": list(position),
            "optimizer": optimizer_state if sharded else optimizer.state_dict(),
            "lr_schedule": lr_schedule.state_dict(),
            "skipped_images": skipped_images,
            "skipped_steps": skipped_steps,
            "running_stats": running_stats,
            "world_size": environment.world_size,
            "config": json.loads(config_to_json(config)),
            "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
            "last_grad_norm": last_grad_norm,
        }
        try:
            save_checkpoint(
                config.output_dir, step, model_state if sharded else unet.state_dict(), state
            )
            prune_checkpoints(config.output_dir, config.checkpoints_total_limit)
        except CheckpointError as error:
            failure = error
    failed = environment.all_reduce_sum(
        torch.tensor([float(failure is not None)], device=environment.device)
    )
    if float(failed) > 0:
        raise failure or CheckpointError(f"checkpoint: rank 0 could not write step {step}")
    environment.barrier()
    return checkpoint_path(config.output_dir, step)


def nonfinite_weights(module: nn.Module, environment: Distributed | None = None) -> bool:
    """Whether any weight of ``module`` (this rank's shard under FSDP2) is inf or NaN, on any
    rank: one fused max-|w| over all tensors (inf or NaN exactly when one is), one host read."""
    tensors = [
        tensor.to_local() if hasattr(tensor, "to_local") else tensor
        for tensor in module.state_dict().values()
        if torch.is_floating_point(tensor)
    ]
    tensors = [tensor for tensor in tensors if tensor.numel()]
    if tensors:
        bad = (~torch.stack(torch._foreach_norm(tensors, float("inf"))).isfinite()).any()
    else:
        bad = torch.zeros((), dtype=torch.bool)
    flag = bad.float().reshape(1)
    if environment is not None:
        flag = environment.all_reduce_sum(flag.to(environment.device))
    return bool(flag.item() > 0)


def export_unet(
    unet: nn.Module,
    output_dir: Path,
    state: dict[str, Tensor] | None = None,
    name: str = "unet",
    plain_state_dict: bool = True,
) -> None:
    """DIR/NAME/ (diffusers, safetensors) and DIR/NAME.pth (a plain state dict); LoRA adapters
    are merged into the weights first, so both load into a plain model. ``state``: the full
    weights when the model is sharded. ``name``: "unet", or "transformer" for a flow model.
    ``plain_state_dict`` False: the folder alone (``--save-final weights``). Each is written
    under a temporary name and renamed, so a failed write (WriteError, one line) never leaves a
    half-written export."""
    if state is None:
        state = merged_state_dict(unet)
    plain = type(unet).from_config(unet.config)
    plain.load_state_dict(state)
    with writing("export", output_dir / name), replacing(output_dir / name) as folder:
        plain.save_pretrained(folder, safe_serialization=True)
    if not plain_state_dict:
        return
    with (
        writing("export", output_dir / f"{name}.pth"),
        replacing(output_dir / f"{name}.pth") as file,
    ):
        save_torch(state, file)
