"""The training loop: a small ``Trainer`` wiring the components, with a short ``fit()``.

Where each part lives:

- ``distributed``: torchrun's environment, FSDP2 sharding;
- ``data`` / ``cache``: preference pairs (images or cached latents), ``toy``: synthetic pairs;
- ``models``: building and loading the UNet, VAE and text encoders, ``build_models``;
- ``family``: how latents become the model input and target (the DDPM family of SD1.5/SDXL);
- ``step``: one micro-batch's preference step, the gradient check and the optimizer step;
- ``optim``: the optimizer and LR schedule; ``checkpoint``: save, resume, export;
- ``metrics``: running statistics, metrics.jsonl and TensorBoard; ``nvtx_ranges``: NVTX phases.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from sdpo.train import checkpoint as checkpoints
from sdpo.train.cache import CachedPairBatches, is_cache
from sdpo.train.config import TrainConfig, config_to_json, parse_profile_steps
from sdpo.train.data import (
    PairBatches,
    batch_stream,
    default_num_workers,
    generator_for,
    load_records,
)
from sdpo.train.distributed import (
    Distributed,
    full_model_state,
    load_full_optimizer_state,
    shard_unet,
)
from sdpo.train.metrics import MetricsWriter, RunningStats
from sdpo.train.models import build_models, compile_model
from sdpo.train.nvtx_ranges import PhaseRanges
from sdpo.train.optim import make_lr_schedule, make_optimizer, scaled_learning_rate
from sdpo.train.step import (
    align_optimizer_state,
    apply_optimizer_step,
    attention_context,
    autocast,
    clip_and_check_gradients,
    condition_batch,
    family_of,
    make_grad_scaler,
    preference_step,
    to_channels_last,
)


class NonFiniteLoss(RuntimeError):
    """The loss or gradient of an optimizer step is not finite."""


def make_batches(config: TrainConfig, environment: Distributed) -> PairBatches | CachedPairBatches:
    """This rank's share of the preference pairs: a sdpo-cache folder, files, or synthetic."""
    if is_cache(config.data):
        return CachedPairBatches(
            config.data,
            batch_pairs=config.train_batch_pairs,
            caption_dropout=config.caption_dropout,
            seed=config.seed,
            rank=environment.rank,
            world_size=environment.world_size,
            resolution=config.resolution,
        )
    records = load_records(
        config.data,
        resolution=config.resolution,
        synthetic_pairs=config.synthetic_pairs,
        seed=config.seed,
    )
    return PairBatches(
        records,
        batch_pairs=config.train_batch_pairs,
        resolution=config.resolution,
        caption_dropout=config.caption_dropout,
        seed=config.seed,
        rank=environment.rank,
        world_size=environment.world_size,
    )


class Trainer:
    """Builds everything in ``__init__`` (data first, so a source with no usable pairs fails
    before any model loads), then ``fit()`` runs the optimizer steps."""

    def __init__(self, config: TrainConfig, environment: Distributed) -> None:
        self.config, self.environment = config, environment
        device = self.device = environment.device
        self.output_dir = Path(config.output_dir)
        if config.cuda_graphs and device.type != "cuda":
            raise ValueError("cuda_graphs: needs a CUDA device; drop --cuda-graphs on this machine")
        self.batches = make_batches(config, environment)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.models = build_models(config, device)
        if config.channels_last:  # before the optimizer exists: its state follows the weights
            to_channels_last(self.models.unet)
            if self.models.reference_unet is not None:
                to_channels_last(self.models.reference_unet)
        self.family = family_of(self.models)
        resume = (
            checkpoints.load_resume_state(self.output_dir, self.models.unet)
            if config.resume
            else None
        )
        self.sharded = config.fsdp and environment.enabled
        if self.sharded:
            shard_unet(self.models.unet, device)
        # After sharding: FSDP2 swaps the parameters for sharded ones the optimizer must hold.
        self.parameters = [p for p in self.models.unet.parameters() if p.requires_grad]
        learning_rate = scaled_learning_rate(config, environment.world_size)
        self.optimizer = make_optimizer(config, self.parameters, learning_rate, device)
        self.lr_schedule = make_lr_schedule(self.optimizer, config.warmup_steps)
        self.scaler = make_grad_scaler(device, config.mixed_precision)
        self.step, self.position, self.skipped_images = 0, (0, 0), 0
        self.last_checkpoint: Path | None = None
        if resume is not None:
            if self.sharded:
                load_full_optimizer_state(self.models.unet, self.optimizer, resume.optimizer)
            else:
                self.optimizer.load_state_dict(resume.optimizer)
            align_optimizer_state(self.optimizer)  # saved moments in the weights' layout
            self.lr_schedule.load_state_dict(resume.lr_schedule)
            self.step, self.position = resume.step, resume.position
            self.skipped_images, self.last_checkpoint = resume.skipped_images, resume.path
        if environment.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(config_to_json(config))
        self.policy, self.ddp = self._wrap_policy()
        self.ranges = PhaseRanges(config.nvtx)
        window = parse_profile_steps(config.profile_steps) if config.profile_steps else None
        self.profile_window = window if device.type == "cuda" else None

    def _wrap_policy(self) -> tuple[nn.Module, nn.parallel.DistributedDataParallel | None]:
        """DDP (unless sharded) and torch.compile around the policy; compiles the frozen copy."""
        config, models, device = self.config, self.models, self.device
        policy: nn.Module = models.unet
        ddp = None
        if self.environment.enabled and not self.sharded:
            ddp = nn.parallel.DistributedDataParallel(
                models.unet, device_ids=[device.index] if device.type == "cuda" else None
            )
            policy = ddp
        if config.compile or config.cuda_graphs:
            policy = compile_model(policy, config.cuda_graphs)
            if models.reference_unet is not None:
                # With LoRA the reference is the policy with adapters off: compiling it too would
                # retrace on every switch, so only a separate frozen copy is compiled.
                models.reference_unet = compile_model(models.reference_unet, config.cuda_graphs)
        return policy, ddp

    def _micro_step(self, stream, micro: int, stats: RunningStats) -> int:
        """One micro-batch: read, encode, loss, backward (gradients all-reduced on the last).
        Returns the epoch the batch came from."""
        config, ranges = self.config, self.ranges
        with ranges("data to device"):
            batch_epoch, batch_number, batch = next(stream)
            self.position = self.batches.next_position(batch_epoch, batch_number)
        micro_index = self.step * config.gradient_accumulation + micro
        generator = generator_for(
            config.seed, 3, self.environment.rank, micro_index, device=self.device
        )
        with ranges("encode"):
            latents, hidden, added = condition_batch(self.models, batch, generator, self.device)
        last_micro = micro == config.gradient_accumulation - 1
        if config.cuda_graphs:
            # A new step: earlier graph outputs may be overwritten from here on.
            torch.compiler.cudagraph_mark_step_begin()
        # Gradients are all-reduced once per optimizer step, on its last micro-batch.
        sync_context = (
            self.ddp.no_sync()
            if self.ddp is not None and not last_micro
            else contextlib.nullcontext()
        )
        if self.sharded:
            self.models.unet.set_requires_gradient_sync(last_micro)
        with sync_context, attention_context(config.attention):
            result = preference_step(
                self.models,
                self.policy,
                latents,
                hidden,
                added,
                generator,
                config,
                ranges,
                autocast(self.device, self.config.mixed_precision),
                self.family,
            )
            with ranges("backward"):
                scaled = result.loss / config.gradient_accumulation
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
        stats.add(result, batch.skipped)
        return batch_epoch

    def save(self) -> Path:
        with self.ranges("checkpoint"):
            return checkpoints.save_training_state(
                self.config,
                self.environment,
                self.models.unet,
                self.optimizer,
                self.lr_schedule,
                self.step,
                self.position,
                self.skipped_images,
            )

    def _log_row(self, stats: RunningStats, grad_norm: torch.Tensor, epoch: int) -> dict:
        with self.ranges("all-reduce"):
            means, micro_batches, skipped, elapsed = stats.reduce(self.environment)
        self.skipped_images += skipped
        return {
            "step": self.step,
            **means,
            "lr": self.lr_schedule.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "pairs_per_s": micro_batches * self.config.train_batch_pairs / elapsed,
            "skipped_images": self.skipped_images,
            "epoch": epoch,
        }

    def _profiler(self, boundary: int, start: bool) -> None:
        """cudaProfilerStart/Stop at the --profile-steps window's edges (CUDA only)."""
        if self.profile_window is None or self.step != self.profile_window[boundary]:
            return
        torch.cuda.synchronize()
        if start:
            torch.cuda.cudart().cudaProfilerStart()
        else:
            torch.cuda.cudart().cudaProfilerStop()

    def fit(self) -> dict:
        """Runs the optimizer steps up to ``max_steps``, then the final checkpoint and export."""
        config = self.config
        writer = MetricsWriter(self.output_dir, self.step) if self.environment.is_main else None
        progress = self._progress_bar()
        stream = batch_stream(
            self.batches, self.position, self.num_workers(), self.device.type == "cuda"
        )
        stats = RunningStats(self.device)
        rows: list[dict] = []
        # One 0-dim device bool per optimizer step since the last read (read with the metrics).
        self.pending_finite: list[tuple[int, torch.Tensor]] = []
        logged_norm = torch.zeros((), device=self.device)  # the last finite step's norm
        try:
            while self.step < config.max_steps:
                self._profiler(0, start=True)
                interval_sums = stats.sums.clone()  # to drop a skipped step's metrics
                for micro in range(config.gradient_accumulation):
                    epoch = self._micro_step(stream, micro, stats)
                with self.ranges("optimizer"):
                    if self.scaler is not None:
                        # Unscaled gradients for the clip; an overflow makes the norm non-finite,
                        # so the step is skipped on the device like any non-finite step.
                        self.scaler.unscale_(self.optimizer)
                    grad_norm, finite = clip_and_check_gradients(
                        self.parameters, config.max_grad_norm, stats.loss_sum, self.environment
                    )
                    # With fp16 loss scaling an overflowing gradient (finite loss) is routine: the
                    # scaler halves its scale and the step is skipped, not reported; only a
                    # non-finite loss goes to --on-nonfinite. Otherwise any non-finite step does.
                    healthy = finite if self.scaler is None else torch.isfinite(stats.loss_sum)
                    finite = apply_optimizer_step(self.optimizer, self.lr_schedule, finite)
                    if self.scaler is not None:
                        self.scaler.update()  # halves the scale after an overflow, on the device
                    stats.sums.copy_(torch.where(healthy, stats.sums, interval_sums))
                    logged_norm = torch.where(finite, grad_norm.float(), logged_norm)
                self.step += 1
                self.pending_finite.append((self.step, healthy))
                progress.update(1)
                self._profiler(1, start=False)
                every = config.checkpoint_every
                log_now = self.step % config.log_every == 0 or self.step == config.max_steps
                save_now = every and self.step % every == 0 and self.step < config.max_steps
                if log_now or save_now:
                    # Before any metrics row or checkpoint: a non-finite step stops here.
                    self._read_finite(progress, stats)
                if log_now and stats.micro_batches:
                    rows.append(self._log(stats, logged_norm, epoch, writer, progress))
                if save_now:
                    self.last_checkpoint = self.save()
            self._finish()
        finally:
            progress.close()
            if writer is not None:
                writer.close()
        return {
            "steps": self.step,
            "rows": rows,
            "output_dir": str(self.output_dir),
            "skipped_images": self.skipped_images,
        }

    def num_workers(self) -> int:
        """``--num-workers``, or the default for this data, model and machine."""
        if self.config.num_workers is not None:
            return self.config.num_workers
        return default_num_workers(
            self.config.data,
            isinstance(self.batches, CachedPairBatches),
            self.environment.world_size,
        )

    def _progress_bar(self):
        from tqdm.auto import tqdm

        return tqdm(
            total=self.config.max_steps,
            initial=self.step,
            disable=not (self.config.progress and self.environment.is_main),
            desc="sdpo-train",
            unit="step",
        )

    def _log(
        self,
        stats: RunningStats,
        grad_norm: torch.Tensor,
        epoch: int,
        writer: MetricsWriter | None,
        progress,
    ) -> dict:
        """One metrics row (all ranks reduce; rank 0 writes), then a fresh interval."""
        row = self._log_row(stats, grad_norm, epoch)
        if writer is not None:
            writer.write(row)
        progress.set_postfix(
            loss=f"{row['loss']:.4f}",
            acc=f"{row['implicit_acc']:.2f}",
            lam=f"{row['lambda']:.3f}",
            pairs_s=f"{row['pairs_per_s']:.1f}",
        )
        stats.reset()
        return row

    def _finish(self) -> None:
        """The last checkpoint, then (rank 0) the exported UNet; all ranks wait for it."""
        self.save()
        final_state = full_model_state(self.models.unet) if self.sharded else None
        if self.environment.is_main:
            checkpoints.export_unet(self.models.unet, self.output_dir, final_state)
        self.environment.barrier()

    def _read_finite(self, progress, stats: RunningStats) -> None:
        """Reads the finite flags of the optimizer steps since the last read (one host sync).
        A non-finite step's update was already skipped on the device (weights and optimizer
        state untouched) and its metrics dropped; here ``--on-nonfinite stop`` raises, naming
        the first such step and the last good checkpoint, and ``skip`` reports and goes on.
        Called before every metrics row and checkpoint, so a stop comes at most
        ``--log-every`` - 1 optimizer steps after the bad one, and before anything is written."""
        if not self.pending_finite:
            return
        steps = [step for step, _ in self.pending_finite]
        flags = torch.stack([flag for _, flag in self.pending_finite]).tolist()
        self.pending_finite = []
        bad = [step for step, flag in zip(steps, flags, strict=True) if not flag]
        if not bad:
            return
        stats.micro_batches -= len(bad) * self.config.gradient_accumulation
        last = self.last_checkpoint or "none (no checkpoint written yet)"
        for step in bad:
            message = (
                f"step {step}: the loss or gradient is not finite; last good checkpoint: {last}"
            )
            if self.config.on_nonfinite == "stop":
                raise NonFiniteLoss(message)
            if self.environment.is_main:
                progress.write(message + " (skipped)")


def train(config: TrainConfig) -> dict:
    """Runs the configured training; returns a summary (steps, logged rows, output folder)."""
    config.validate()
    environment = Distributed()
    try:
        return Trainer(config, environment).fit()
    finally:
        environment.close()


def summary_json(summary: dict) -> str:
    return json.dumps({key: value for key, value in summary.items() if key != "rows"}, indent=2)
