"""What the trainer says: the ``sdpo.train`` logger's setup, the start banner, the plain
progress lines and the end summary.

The progress bar (tqdm) is drawn only on a terminal: written to a file or a pipe, its carriage
returns become one long line (a 1,400-line wall in a demo log), so there the trainer logs one
plain line per ``--log-every`` optimizer steps instead.
"""

from __future__ import annotations

import logging
import math
import sys

import torch

from sdpo.train.config import FLOW_MODELS, describe_mu

logger = logging.getLogger("sdpo.train")


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record, not the stream that was
    current when the handler was made (a caller that swaps stderr, as pytest's capture does
    between calls of ``main``, would otherwise leave it writing to a closed file)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property wins
        pass


def configure_logging(is_main: bool) -> None:
    """INFO lines on stderr for rank 0, warnings only for the other ranks; a handler is added
    once (a caller that configured ``sdpo.train`` itself keeps its own)."""
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    if not logger.handlers:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False


def progress_bar_wanted(progress: bool, is_main: bool, stream=None) -> bool:
    """A bar only when asked for, on rank 0, and on a terminal."""
    stream = sys.stderr if stream is None else stream
    return progress and is_main and bool(getattr(stream, "isatty", lambda: False)())


def library_progress_bars(enabled: bool) -> None:
    """transformers', diffusers' and huggingface_hub's own bars (the "Loading weights" bars
    of from_pretrained, downloads) follow the trainer's: off under --no-progress and on ranks
    other than 0. Process-wide: these libraries keep the switch in module state."""
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    for module in (transformers_logging, diffusers_logging):
        (module.enable_progress_bar if enabled else module.disable_progress_bar)()
    (hub_utils.enable_progress_bars if enabled else hub_utils.disable_progress_bars)()


def steps_for_epochs(num_epochs: int, batches_per_epoch: int, gradient_accumulation: int) -> int:
    """Optimizer steps for ``num_epochs`` passes: each rank reads ``batches_per_epoch``
    micro-batches per epoch (its share after dropping the remainder), ``gradient_accumulation``
    of them per optimizer step, and the stream runs on across epoch boundaries, so a partial
    last step is rounded up (every pair is seen at least ``num_epochs`` times)."""
    return math.ceil(num_epochs * batches_per_epoch / gradient_accumulation)


def banner_lines(
    config,
    *,
    data_pairs: int,
    world_size: int,
    device,
    resumed_from,
    epochs_note: str,
) -> list[str]:
    dtype = (
        "bf16 autocast" if device.type == "cuda" and config.mixed_precision == "bf16" else "fp32"
    )
    compiled = (
        "torch.compile + CUDA graphs"
        + (
            " (accumulated gradients in buffers outside the graph pool)"
            if config.gradient_accumulation > 1
            else ""
        )
        if config.cuda_graphs
        else "torch.compile"
        if config.compile
        else "nothing (eager)"
    )
    pairs_per_step = config.train_batch_pairs * config.gradient_accumulation * world_size
    mu = describe_mu(config)
    # What the run exports (sdpo.train.models.export_*): flow families their transformer; a
    # LoRA run also its adapters alone, in NAME_lora/.
    name = "transformer" if config.model in FLOW_MODELS else "unet"
    exported = f"{name}/" + (f", {name}_lora/" if config.lora_rank else "")
    lines = [
        f"sdpo-train: {config.method} beta {config.beta:g} mu {mu} granularity "
        f"{config.granularity}; model {config.model}"
        + (f" ({config.pretrained})" if config.pretrained else "")
        + f" at {config.resolution} px"
        + (f", LoRA rank {config.lora_rank}" if config.lora_rank else ""),
        f"data: {config.data or 'synthetic'}: {data_pairs} pairs; "
        f"{pairs_per_step} pairs per optimizer step ({config.train_batch_pairs} per micro-batch "
        f"x {config.gradient_accumulation} accumulation x {world_size} processes)",
        f"steps: {config.max_steps}{epochs_note}; optimizer {config.optimizer}, lr "
        f"{config.learning_rate:g}{' (scaled)' if config.scale_lr else ''}, schedule "
        f"{config.lr_scheduler} ({config.warmup_steps} warmup)",
        f"devices: {world_size} x {device.type}; dtype {dtype}; compiled: {compiled}"
        + ("; FSDP2" if config.fsdp and world_size > 1 else "")
        + (
            f"; CPU threads {torch.get_num_threads()} per process (OMP_NUM_THREADS overrides)"
            if device.type == "cpu"
            else ""
        ),
        f"outputs: {config.output_dir} (metrics.jsonl, checkpoints, {exported}; tracker "
        f"{config.report_to}"
        + (
            f"; validation/ every {config.validation_every} steps"
            if config.validation_prompts
            else ""
        )
        + ")",
        f"resumed: from {resumed_from}" if resumed_from is not None else "resumed: no (fresh run)",
    ]
    return lines


def progress_line(row: dict, max_steps: int) -> str:
    if row.get("loss") is None:  # every step since the last row was skipped (non-finite)
        return (
            f"step {row['step']}/{max_steps}: every step since the last row was skipped "
            f"(skipped_steps {row.get('skipped_steps')}, skipped_images "
            f"{row.get('skipped_images')})"
        )

    def shown(key: str, spec: str) -> str:  # null (e.g. no finite step's norm yet): "n/a"
        return "n/a" if row.get(key) is None else format(row[key], spec)

    return (
        f"step {row['step']}/{max_steps}: loss {shown('loss', '.4f')} acc "
        f"{shown('implicit_acc', '.2f')} lambda {shown('lambda', '.3f')} lr {shown('lr', '.3g')} "
        f"grad_norm {shown('grad_norm', '.3g')} {shown('pairs_per_s', '.1f')} pairs/s "
        f"skipped_images {row.get('skipped_images', 0)}"
    )


def summary_lines(
    *, steps_run: int, total_steps: int, seconds: float, pairs_per_step: int, last_row, outputs
) -> list[str]:
    rate = steps_run * pairs_per_step / seconds if seconds > 0 else float("nan")
    lines = [
        f"done: {steps_run} optimizer steps this run ({total_steps} in all) in {seconds:.1f} s, "
        f"{rate:.1f} pairs/s"
    ]
    if last_row is not None:
        keys = ("loss", "implicit_acc", "lambda", "lr", "grad_norm")
        values = ", ".join(
            f"{key} {last_row[key]:.4g}" for key in keys if last_row.get(key) is not None
        )
        lines.append(f"final (step {last_row['step']}): {values}")
    lines.append("written: " + "; ".join(outputs))
    return lines
