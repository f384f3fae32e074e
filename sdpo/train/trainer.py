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
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

from sdpo.train import checkpoint as checkpoints
from sdpo.train import torch_hooks
from sdpo.train.cache import CachedPairBatches, is_cache, source_identity
from sdpo.train.config import (
    TrainConfig,
    check_num_workers,
    config_to_json,
    parse_profile_steps,
)
from sdpo.train.data import (
    PairBatches,
    SkipReporter,
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
from sdpo.train.errors import UsageError
from sdpo.train.metrics import MetricsWriter, RunningStats
from sdpo.train.models import build_models, compile_model, export_lora
from sdpo.train.nvtx_ranges import PhaseRanges
from sdpo.train.optim import make_lr_schedule, make_optimizer, scaled_learning_rate
from sdpo.train.outputs import OutputLock, WriteError, lock_output_dir, writing
from sdpo.train.paths import check_run_paths
from sdpo.train.preemption import Preempted, StopRequests
from sdpo.train.runlog import (
    banner_lines,
    library_progress_bars,
    logger,
    progress_bar_wanted,
    progress_line,
    steps_for_epochs,
    summary_lines,
)
from sdpo.train.step import (
    PersistentGradients,
    align_optimizer_state,
    apply_optimizer_step,
    attention_context,
    autocast,
    clip_and_check_gradients,
    condition_batch,
    family_for,
    make_grad_scaler,
    preference_step,
    to_channels_last,
    uses_persistent_gradients,
)
from sdpo.train.trackers import open_tracker
from sdpo.train.validation import Validator


class NonFiniteLoss(RuntimeError):
    """The loss, gradient or weights are not finite, or too many steps were skipped."""


# --on-nonfinite skip stops the run when more than --max-skipped-fraction of the optimizer
# steps so far were skipped, checked at each log row once this many steps have run (and always
# at the last step, where a run that skipped every step also stops whatever the fraction). Why
# 20: at the default fraction 0.05 it is the first step count at which one skipped step is
# allowed (1/20 = 5%) and two are not, so a single early overflow (common in the first steps of
# bf16 runs) never stops a healthy run, while a loss that is non-finite on every step stops
# after 20 steps instead of exporting untrained weights. 5%: an occasional overflow skips well
# under 1% of steps; a rate of 5% means the run is systematically broken (a bad learning rate,
# bad data, a diverged policy) and its result is not the configured training.
SKIPPED_STEPS_MINIMUM = 20

# What --overwrite removes from the output folder before a fresh run: what a run writes besides
# its checkpoints (--overwrite clears them): the UNet or, for a flow model, the transformer
# export (folder + .pth), and a LoRA run's adapters (unet_lora/, transformer_lora/).
RUN_FILES = (
    "metrics.jsonl", "tensorboard", "unet", "unet.pth", "unet_lora", "transformer",
    "transformer.pth", "transformer_lora",
)  # fmt: skip


def make_batches(config: TrainConfig, environment: Distributed) -> PairBatches | CachedPairBatches:
    """This rank's share of the preference pairs: a sdpo-cache folder, files, or synthetic."""
    # What both sources take: the batch size, this rank's share and the random draws.
    shared = dict(
        batch_pairs=config.train_batch_pairs,
        caption_dropout=config.caption_dropout,
        seed=config.seed,
        rank=environment.rank,
        world_size=environment.world_size,
        resolution=config.resolution,
        hflip=config.hflip,
    )
    if is_cache(config.data):
        # The weights this run's --pretrained loads, as the cache's index records its own.
        identity = source_identity(config.model, config.pretrained, config.seed, config.preset)
        return CachedPairBatches(
            config.data,
            model=config.model,
            pretrained=config.pretrained,
            identity=identity,
            **shared,
        )
    records = load_records(
        config.data,
        resolution=config.resolution,
        synthetic_pairs=config.synthetic_pairs,
        seed=config.seed,
    )
    return PairBatches(records, random_crop=config.random_crop, **shared)


class Trainer:
    """Builds everything in ``__init__`` (data first, so a source with no usable pairs fails
    before any model loads), then ``fit()`` runs the optimizer steps."""

    def __init__(self, config: TrainConfig, environment: Distributed) -> None:
        self.config, self.environment = config, environment
        device = self.device = environment.device
        self.output_dir = Path(config.output_dir)
        if config.cuda_graphs and device.type != "cuda":
            raise ValueError("cuda_graphs: needs a CUDA device; drop --cuda-graphs on this machine")
        if config.num_workers is not None:
            check_num_workers(
                config.num_workers,
                "0 for synthetic or cached data, else min(8, CPUs per process - 1)",
            )
        self.batches = make_batches(config, environment)
        self.epochs_note = ""
        if config.num_epochs is not None:
            # --num-epochs wins over max_steps (a preset's): the steps follow from this rank's
            # share of the data, so every process stops at the same step.
            config.max_steps = steps_for_epochs(
                config.num_epochs, self.batches.batches_per_epoch, config.gradient_accumulation
            )
            self.epochs_note = (
                f" ({config.num_epochs} epochs of {self.batches.batches_per_epoch} micro-batches "
                "per process)"
            )
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.stop_requests = StopRequests(environment)
        # After the checks and the data (a refusal there leaves no folder behind), before the
        # folder is touched or any model loads. fit() releases it; so does a failure below.
        self.output_lock = hold_output_dir(config, environment)
        try:
            self._set_up(self._prepare_output())
        except BaseException:
            self.output_lock.release()
            raise

    def _set_up(self, resume: checkpoints.ResumeState | None) -> None:
        """The models, optimizer, schedule and the resumed state; then the wrapped policy."""
        config, environment, device = self.config, self.environment, self.device
        self.models = build_models(config, device)
        if config.channels_last:  # before the optimizer exists: its state follows the weights
            to_channels_last(self.models.unet)
            if self.models.reference_unet is not None:
                to_channels_last(self.models.reference_unet)
        self.family = family_for(self.models, config)
        if resume is not None:
            # The full weights, before any sharding; every rank read the checkpoint itself.
            self.models.unet.load_state_dict(resume.model_state)
            resume.model_state = {}
        self.sharded = config.fsdp and environment.enabled
        if self.sharded:
            shard_unet(self.models.unet, device)
        # After sharding: FSDP2 swaps the parameters for sharded ones the optimizer must hold.
        self.parameters = [p for p in self.models.unet.parameters() if p.requires_grad]
        learning_rate = scaled_learning_rate(config, environment.world_size)
        self.optimizer = make_optimizer(config, self.parameters, learning_rate, device)
        self.lr_schedule = make_lr_schedule(
            self.optimizer,
            config.warmup_steps,
            config.lr_scheduler,
            config.max_steps,
            config.lr_num_cycles,
            config.lr_power,
        )
        self.scaler = make_grad_scaler(device, config.mixed_precision)
        # Last, after every layout change of the weights (channels_last), so the buffers match.
        self.persistent_gradients = (
            PersistentGradients(self.parameters) if uses_persistent_gradients(config) else None
        )
        self.step, self.position, self.skipped_images, self.skipped_steps = 0, (0, 0), 0, 0
        # The last finite step's gradient norm, logged with the next row (NaN until one is; a
        # skipped step's norm is not logged), on the device: no host sync per step.
        self.logged_norm = torch.full((), float("nan"), device=device)
        self.last_checkpoint: Path | None = None
        self.saved_step: int | None = None  # the step of this output folder's newest checkpoint
        self.resumed_stats: torch.Tensor | None = None
        self.resumed_from = resume.path if resume is not None else None
        # Built on every rank (so a model it cannot draw fails everywhere, before step 1).
        self.validator = (
            Validator(config, self.models, device, self.output_dir)
            if config.validation_prompts
            else None
        )
        self.validated_step = -1
        if resume is not None:
            if self.sharded:
                load_full_optimizer_state(self.models.unet, self.optimizer, resume.optimizer)
            else:
                self.optimizer.load_state_dict(resume.optimizer)
            align_optimizer_state(self.optimizer)  # saved moments in the weights' layout
            self.lr_schedule.load_state_dict(resume.lr_schedule)
            self.step, self.position = resume.step, resume.position
            self.skipped_images, self.last_checkpoint = resume.skipped_images, resume.path
            self.skipped_steps = resume.skipped_steps
            self.logged_norm.fill_(resume.last_grad_norm)
            if self.scaler is not None:
                self._load_scaler(resume)
            if resume.running_stats is not None:
                self.resumed_stats = resume.running_stats[environment.rank]
            if resume.path.resolve().parent == self.output_dir.resolve():
                self.saved_step = resume.step
        self.policy, self.ddp = self._wrap_policy()
        # Unreadable images named as they are met (each rank its own: they read different rows).
        self.skip_reporter = SkipReporter(
            logger.warning, f"rank {environment.rank}: " if environment.world_size > 1 else ""
        )
        self.ranges = PhaseRanges(config.nvtx)
        window = parse_profile_steps(config.profile_steps) if config.profile_steps else None
        self.profile_window = window if device.type == "cuda" else None

    def _load_scaler(self, resume: checkpoints.ResumeState) -> None:
        """fp16's loss scale and growth tracker as the checkpoint left them. A checkpoint from
        before they were saved restarts from the initial scale (said so: not an exact resume)."""
        if resume.grad_scaler:
            self.scaler.load_state_dict(resume.grad_scaler)
        elif self.environment.is_main:
            checkpoints.warn(
                f"{resume.path} holds no fp16 loss-scaler state (written by an older version); "
                f"the scale restarts from {self.scaler.get_scale():g}, so this resume is not "
                "exact"
            )

    def _prepare_output(self) -> checkpoints.ResumeState | None:
        """Refuses what would mix two runs in one folder, finds and checks the checkpoint to
        resume, removes what an interrupted save left and (--overwrite) the old run. All ranks
        decide the same from the same files; rank 0 changes them; then all ranks wait."""
        config, environment, output = self.config, self.environment, self.output_dir
        say = environment.is_main
        resume = None
        remove: list[Path] = []
        replace_old_run = config.overwrite and config.resume is None
        if config.resume is not None:
            try:
                resume = checkpoints.find_resume_state(config, warn_here=say)
            except checkpoints.NoUsableCheckpoint:
                if not config.overwrite:
                    raise  # metrics.jsonl and the checkpoints stay as they are
                replace_old_run = True
                if say:
                    checkpoints.warn(
                        f"every checkpoint in {output} is damaged; --overwrite: removing them and "
                        "starting a new run"
                    )
            if resume is None:
                if say and not replace_old_run:
                    print(
                        f"sdpo-train: --resume: no complete checkpoint in {output}; starting a "
                        "fresh run",
                        file=sys.stderr,
                        flush=True,
                    )
            else:
                checkpoints.check_same_run(resume, config, environment.world_size)
                newer = [
                    path
                    for path in checkpoints.complete_checkpoints(output)
                    if checkpoints.checkpoint_step(path) > resume.step and config.resume != "latest"
                ]
                if newer and not config.overwrite:
                    raise UsageError(
                        f"resume: {output} holds checkpoints newer than {resume.path} "
                        f"({', '.join(path.name for path in newer)}); continuing from step "
                        f"{resume.step} would leave them from another run: give --overwrite to "
                        "remove them, or --resume latest"
                    )
                remove += newer
                if resume.step == config.max_steps and say:
                    print(
                        f"sdpo-train: --resume: {resume.path} is already at --max-steps "
                        f"{config.max_steps}; nothing to train, exporting its weights",
                        file=sys.stderr,
                        flush=True,
                    )
        elif output.is_dir():
            existing = sorted(
                child.name
                for child in output.iterdir()
                if checkpoints.checkpoint_step(child) is not None
                or child.name == checkpoints.METRICS_FILE
            )
            if existing and not config.overwrite:
                raise UsageError(
                    f"output_dir: {output} already holds a run ({', '.join(existing[:4])}"
                    f"{', ...' if len(existing) > 4 else ''}); give --resume to continue it, "
                    "--overwrite to replace it, or another --output-dir"
                )
        if replace_old_run and output.is_dir():
            remove += [
                child
                for child in output.iterdir()
                if checkpoints.checkpoint_step(child) is not None or child.name in RUN_FILES
            ]
        if say:
            for path in remove:
                with writing("output_dir", path, "removing"):
                    if path.is_dir():
                        shutil.rmtree(path)
                    elif path.exists():
                        path.unlink()
            for path in checkpoints.remove_temporary_folders(output):
                checkpoints.warn(f"removed {path}, left by an interrupted save")
            with writing("output_dir", output / "config.json"):
                output.mkdir(parents=True, exist_ok=True)
                (output / "config.json").write_text(config_to_json(config))
        environment.barrier()
        return resume

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
        if batch.skipped:
            self.skip_reporter.report(batch.skipped, getattr(batch, "skip_notes", []))
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

    def _check_weights(self) -> None:
        """Before any checkpoint or export: the weights are finite on every rank."""
        if checkpoints.nonfinite_weights(self.models.unet, self.environment):
            last = self.last_checkpoint or "none (no checkpoint written yet)"
            raise NonFiniteLoss(
                f"step {self.step}: the weights are not finite (not written); last good "
                f"checkpoint: {last}"
            )

    def _gathered_stats(self, stats: RunningStats) -> torch.Tensor:
        """Every rank's running statistics as (world size, n) on the CPU (a collective; the
        rows are summed with zeros, so each is exact)."""
        own = stats.state()
        table = torch.zeros(self.environment.world_size, own.numel(), dtype=own.dtype)
        table[self.environment.rank] = own
        return self.environment.all_reduce_sum(table.to(self.device)).cpu()

    def save(self, stats: RunningStats | None = None) -> Path:
        self._check_weights()
        running = self._gathered_stats(stats) if stats is not None else None
        with self.ranges("checkpoint"):
            try:
                path = checkpoints.save_training_state(
                    self.config,
                    self.environment,
                    self.models.unet,
                    self.optimizer,
                    self.lr_schedule,
                    self.step,
                    self.position,
                    self.skipped_images,
                    self.skipped_steps,
                    running,
                    self.scaler,
                    float(self.logged_norm),
                )
            except checkpoints.CheckpointError as error:
                last = self.last_checkpoint or "none"
                raise checkpoints.CheckpointError(
                    f"{error}; the last good checkpoint ({last}) is kept"
                ) from error
        self.last_checkpoint, self.saved_step = path, self.step
        return path

    def _log_row(self, stats: RunningStats, grad_norm: torch.Tensor, epoch: int) -> dict:
        with self.ranges("all-reduce"):
            means, micro_batches, skipped, skipped_steps, elapsed = stats.reduce(self.environment)
        self.skipped_images += skipped
        self.skipped_steps += skipped_steps
        grad_norm_value = float(grad_norm)
        return {
            "step": self.step,
            **means,
            "lr": self.lr_schedule.get_last_lr()[0],
            # The last finite step's norm; null when every step of the row was skipped (a
            # skipped step's norm is inf or NaN, which JSON cannot hold).
            "grad_norm": grad_norm_value
            if means.get("loss") is not None
            and grad_norm_value == grad_norm_value
            and abs(grad_norm_value) != float("inf")
            else None,
            "pairs_per_s": micro_batches * self.config.train_batch_pairs / elapsed,
            "skipped_images": self.skipped_images,
            "skipped_steps": self.skipped_steps,
            "epoch": epoch,
        }

    def _check_skipped_steps(self) -> None:
        """Stops when too many optimizer steps were skipped (see SKIPPED_STEPS_MINIMUM)."""
        if not self.skipped_steps:
            return
        bound = self.config.max_skipped_fraction
        fraction = self.skipped_steps / self.step
        final = self.step >= self.config.max_steps
        every = self.skipped_steps == self.step
        if (fraction > bound and (final or self.step >= SKIPPED_STEPS_MINIMUM)) or (
            final and every
        ):
            last = self.last_checkpoint or "none (no checkpoint written yet)"
            raise NonFiniteLoss(
                f"step {self.step}: {self.skipped_steps} of {self.step} optimizer steps "
                f"({fraction:.1%}) were skipped for a non-finite loss or gradient, more than "
                f"--max-skipped-fraction {bound}{' (every step)' if every else ''}; nothing "
                f"exported; last good checkpoint: {last}"
            )

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
        writer = None
        if self.environment.is_main:
            tracker = open_tracker(
                config.report_to, self.output_dir, json.loads(config_to_json(config))
            )
            writer = MetricsWriter(self.output_dir, self.step, tracker)
        self._banner()
        first_step, started = self.step, time.perf_counter()
        progress = self._progress_bar()
        stream = batch_stream(
            self.batches, self.position, self.num_workers(), self.device.type == "cuda"
        )
        stats = RunningStats(self.device)
        if self.resumed_stats is not None:
            stats.load_state(self.resumed_stats)
        rows: list[dict] = []
        self.stop_requests.install()
        # One 0-dim device bool per optimizer step since the last read (read with the metrics).
        self.pending_finite: list[tuple[int, torch.Tensor]] = []
        # Optimizer steps of this run that updated the weights (fp16 overflow skips included
        # in what did not), on the device; read once at the end.
        applied = torch.zeros((), dtype=torch.int64, device=self.device)
        completed = False
        try:
            while self.step < config.max_steps:
                self._profiler(0, start=True)
                for micro in range(config.gradient_accumulation):
                    epoch = self._micro_step(stream, micro, stats)
                with self.ranges("optimizer"):
                    if self.persistent_gradients is not None:
                        self.persistent_gradients.release_unused()
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
                    # Routine while the scale is above 1: at a scale <= 1 the scaled gradient is no
                    # larger than the true one, so scaling cannot be what overflowed.
                    healthy = (
                        finite
                        if self.scaler is None
                        else torch.isfinite(stats.loss_sum)
                        & (finite | (torch_hooks.scale_on_device(self.scaler) > 1.0).reshape(()))
                    )
                    finite = apply_optimizer_step(
                        self.optimizer, self.lr_schedule, finite, self.persistent_gradients
                    )
                    applied += finite
                    if self.scaler is not None:
                        self.scaler.update()  # halves the scale after an overflow, on the device
                    self.logged_norm = torch.where(finite, grad_norm.float(), self.logged_norm)
                # A non-finite step's metrics leave the row and it counts as skipped, on the
                # device; the flag itself is read with the metrics (_read_finite).
                stats.end_step(healthy)
                self.step += 1
                self.pending_finite.append((self.step, healthy))
                progress.update(1)
                self._profiler(1, start=False)
                every = config.checkpoint_every
                log_now = self.step % config.log_every == 0 or self.step == config.max_steps
                save_now = every and self.step % every == 0 and self.step < config.max_steps
                if log_now or save_now:
                    # Before any metrics row or checkpoint: a non-finite step stops here.
                    self._read_finite()
                if log_now:
                    rows.append(self._log(stats, self.logged_norm, epoch, writer, progress))
                if save_now:
                    self.save(stats)
                every = config.validation_every
                if every and self.step % every == 0:
                    self._validate(writer)
                signal_number = self.stop_requests.agreed()
                if signal_number and self.step < config.max_steps:
                    self._stop(signal_number, stats)
            self._read_finite()
            self._check_some_step_applied(self.step - first_step, applied)
            if self.validator is not None and self.validated_step != self.step:
                self._validate(writer)  # the trained policy's grid, always
            self._finish(stats)
            completed = True
        finally:
            self.stop_requests.restore()
            progress.close()
            if writer is not None:
                writer.close(quiet=not completed)
            self.output_lock.release()
        self._summary(first_step, time.perf_counter() - started, rows)
        return {
            "steps": self.step,
            "rows": rows,
            "output_dir": str(self.output_dir),
            "skipped_images": self.skipped_images,
            "skipped_steps": self.skipped_steps,
        }

    def _check_some_step_applied(self, steps_run: int, applied: torch.Tensor) -> None:
        """Stops (nothing exported) when no optimizer step of this run updated the weights:
        with fp16 every step can be skipped as an overflow before the loss scale falls to 1
        (16 halvings from 2**16) without counting as non-finite, and untrained weights must not
        leave as a result."""
        if steps_run == 0 or int(applied):
            return
        last = self.last_checkpoint or "none (no checkpoint written yet)"
        scale = f" (fp16 loss scale now {self.scaler.get_scale():g})" if self.scaler else ""
        raise NonFiniteLoss(
            f"step {self.step}: none of this run's {steps_run} optimizer steps updated the "
            f"weights: every one was skipped for a non-finite gradient{scale}; nothing exported; "
            f"last good checkpoint: {last}"
        )

    def _stop(self, signal_number: int, stats: RunningStats) -> None:
        """After the optimizer step in flight: a checkpoint (unless this step has one), then
        Preempted (the command line prints where and exits 128 + the signal)."""
        self._read_finite()
        path = self.last_checkpoint if self.saved_step == self.step else self.save(stats)
        self.stop_requests.checkpoint = path
        name = signal.Signals(signal_number).name
        raise Preempted(
            signal_number,
            f"stopped by {name} after step {self.step}; checkpoint: {path}; continue with --resume",
        )

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

        # Off a terminal tqdm's carriage returns pile up into one line; _log writes lines there.
        self.bar_shown = progress_bar_wanted(self.config.progress, self.environment.is_main)
        return tqdm(
            total=self.config.max_steps,
            initial=self.step,
            disable=not self.bar_shown,
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
        if row["loss"] is not None:
            progress.set_postfix(
                loss=f"{row['loss']:.4f}",
                acc=f"{row['implicit_acc']:.2f}",
                lam=f"{row['lambda']:.3f}",
                pairs_s=f"{row['pairs_per_s']:.1f}",
                skipped=row["skipped_images"],
            )
        if not self.bar_shown:
            logger.info(progress_line(row, self.config.max_steps))
        stats.reset()
        self._check_skipped_steps()
        return row

    def _validate(self, writer: MetricsWriter | None) -> None:
        """The validation grid from the policy: drawn by rank 0 while the others wait, or by every
        rank when the UNet is sharded (its forward gathers weights: a collective)."""
        self.validated_step = self.step
        if self.validator is None:
            return
        if self.sharded or self.environment.is_main:
            tracker = writer.tracker if writer is not None else None
            self.validator.run(self.step, tracker, write=self.environment.is_main)
        self.environment.barrier()

    def _banner(self) -> None:
        for line in banner_lines(
            self.config,
            data_pairs=self._data_pairs(),
            world_size=self.environment.world_size,
            device=self.device,
            resumed_from=self.resumed_from,
            epochs_note=self.epochs_note,
        ):
            logger.info(line)

    def _data_pairs(self) -> int:
        batches = self.batches
        return len(batches.locations if isinstance(batches, CachedPairBatches) else batches.records)

    def _summary(self, first_step: int, seconds: float, rows: list[dict]) -> None:
        config = self.config
        outputs = [
            f"{self.output_dir / 'metrics.jsonl'}",
            f"{self.output_dir / self.models.export_name}",
        ]
        final_checkpoint = self.output_dir / f"checkpoint-{self.step}"
        if final_checkpoint.is_dir():
            outputs.append(f"checkpoint {final_checkpoint}")
        if config.report_to != "none":
            outputs.append(f"tracker {config.report_to}")
        if self.validator is not None:
            outputs.append(f"{self.validator.folder}")
        pairs_per_step = (
            config.train_batch_pairs * config.gradient_accumulation * self.environment.world_size
        )
        for line in summary_lines(
            steps_run=self.step - first_step,
            total_steps=self.step,
            seconds=seconds,
            pairs_per_step=pairs_per_step,
            last_row=rows[-1] if rows else None,
            outputs=outputs,
        ):
            logger.info(line)

    def _finish(self, stats: RunningStats) -> None:
        """The last checkpoint, then (rank 0) the exported UNet; all ranks wait for it. Neither
        is written from non-finite weights. ``--save-final weights``: the export's folder alone;
        ``none``: nothing (the weights are still checked)."""
        self._read_finite()
        save_final = self.config.save_final
        if save_final == "full" and self.saved_step != self.step:
            self.save(stats)
        self._check_weights()
        if save_final == "none":
            self.environment.barrier()
            return
        final_state = full_model_state(self.models.unet) if self.sharded else None
        if self.environment.is_main:
            checkpoints.export_unet(
                self.models.unet,
                self.output_dir,
                final_state,
                self.models.export_name,
                plain_state_dict=save_final == "full",
            )
            if self.config.lora_rank > 0:
                export_lora(self.models, self.output_dir)
        self.environment.barrier()

    def _read_finite(self) -> None:
        """Reads the finite flags of the optimizer steps since the last read (one host sync).
        A non-finite step's update was already skipped on the device (weights and optimizer
        state untouched) and its metrics left out of the row (RunningStats.end_step); here ``--on-nonfinite stop`` raises, naming
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
        last = self.last_checkpoint or "none (no checkpoint written yet)"
        for step in bad:
            message = (
                f"step {step}: the loss or gradient is not finite; last good checkpoint: {last}"
            )
            if self.config.on_nonfinite == "stop":
                raise NonFiniteLoss(message)
            if self.environment.is_main:
                logger.warning(message + " (skipped)")


def train(config: TrainConfig) -> dict:
    """Runs the configured training; returns a summary (steps, logged rows, output folder)."""
    config.validate()
    check_run_paths(config)  # before the process group, the data and the models
    environment = Distributed()
    library_progress_bars(config.progress and environment.is_main)
    try:
        return Trainer(config, environment).fit()  # holds the output folder's lock throughout
    finally:
        environment.close()


def hold_output_dir(config: TrainConfig, environment: Distributed) -> OutputLock:
    """One run per output folder: rank 0 takes its lock (sdpo.train.outputs.lock_output_dir)
    before any model loads; the other ranks learn the outcome from one all-reduce, so a
    refused rank 0 never leaves them waiting at a collective, and they never take it themselves
    (they would be refused by their own rank 0)."""
    lock, failure = OutputLock(None, Path(config.output_dir)), None
    if environment.is_main:
        try:
            lock = lock_output_dir(config.output_dir)
        except (UsageError, WriteError) as error:
            failure = error
    refused = environment.all_reduce_sum(
        torch.tensor([float(failure is not None)], device=environment.device)
    )
    if failure is not None:
        raise failure
    if float(refused) > 0:
        raise UsageError(
            f"output_dir: rank 0 could not take {config.output_dir} for this run (its line says "
            "why)"
        )
    return lock


def summary_json(summary: dict) -> str:
    return json.dumps({key: value for key, value in summary.items() if key != "rows"}, indent=2)
