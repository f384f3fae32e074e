"""The training loop: one batched policy/reference step, accumulation, checkpoints, logging.

Per micro-batch of B pairs: encode winners and losers (2B images) once, draw ONE timestep and
ONE noise per pair and share them between its winner and loser, run ONE policy forward over
the 2B stacked rows and ONE reference forward (no grad) over the same inputs, then
``sdpo.preference_loss``. Metrics stay on the device and are read once per log interval;
the one host sync per optimizer step is the finite check of the gradient norm (so a
non-finite loss never reaches the weights).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

import sdpo
from sdpo import reference
from sdpo.train import checkpoint as checkpoints
from sdpo.train.cache import CachedBatch, CachedPairBatches, is_cache
from sdpo.train.config import TrainConfig, config_to_json, parse_profile_steps
from sdpo.train.data import Batch, PairBatches, batch_stream, generator_for, load_records
from sdpo.train.models import (
    Models,
    add_lora,
    build_random,
    build_tiny,
    load_pretrained,
    make_reference,
    merged_state_dict,
)
from sdpo.train.nvtx_ranges import PhaseRanges

# One row of metrics.jsonl per optimizer step: the loss, the mean lambda and the loss statistics.
METRIC_KEYS = ("loss", "lambda", *reference.STAT_NAMES)


class NonFiniteLoss(RuntimeError):
    """The loss or gradient of an optimizer step is not finite."""


class Distributed:
    """torchrun's environment: rank, world size, device. NCCL on GPUs, gloo on CPUs."""

    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.enabled = self.world_size > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def build_models(config: TrainConfig, device: torch.device) -> Models:
    if config.pretrained == "random":
        models = build_random(config.model, config.resolution, config.seed)
    elif config.pretrained is not None:
        models = load_pretrained(
            config.pretrained, config.model, config.resolution, config.allow_download
        )
    else:
        models = build_tiny(config.resolution, config.seed)
    reference_dtype = (
        torch.bfloat16
        if device.type == "cuda" and config.mixed_precision == "bf16"
        else torch.float32
    )
    if config.lora_rank > 0:
        # The reference is the same UNet with its adapters disabled: no second copy in memory.
        add_lora(models.unet, config.lora_rank)
        models.reference_unet = None
    else:
        models.reference_unet = make_reference(models.unet, reference_dtype)
    if config.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
    if config.attention == "xformers":
        try:
            models.unet.enable_xformers_memory_efficient_attention()
            if models.reference_unet is not None:
                models.reference_unet.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError) as error:
            raise RuntimeError(
                f"attention: xformers is not usable here ({error}); use --attention sdpa"
            ) from error
    models.unet.to(device).train()
    if models.reference_unet is not None:
        models.reference_unet.to(device)
    if models.vae is not None:
        models.vae.to(device).requires_grad_(False).eval()
    models.text.to(device).eval()
    return models


def make_optimizer(
    config: TrainConfig, parameters: list[nn.Parameter], learning_rate: float, device: torch.device
):
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            parameters,
            lr=learning_rate,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(
        parameters,
        lr=learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
        fused=device.type == "cuda",
    )


def constant_with_warmup(optimizer, warmup_steps: int):
    """Constant LR after a linear warmup from 0 over ``warmup_steps`` optimizer steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    )


@torch.no_grad()
def encode_images(models: Models, pixels: Tensor, generator: torch.Generator) -> Tensor:
    """Latents sampled from the VAE's distribution (as the reference does), or the pixels."""
    if models.vae is None:
        return pixels
    distribution = models.vae.encode(pixels.to(models.vae.dtype)).latent_dist
    latents = distribution.mean + distribution.std * torch.randn(
        distribution.mean.shape,
        generator=generator,
        device=pixels.device,
        dtype=distribution.mean.dtype,
    )
    return latents * models.vae.config.scaling_factor


def condition_batch(
    models: Models, batch: Batch | CachedBatch, generator: torch.Generator, device: torch.device
) -> tuple[Tensor, Tensor, dict[str, Tensor] | None]:
    """(2B latents, B hidden states, added conditioning) from pixels or from the cache.

    Both paths draw the same noise for the latent sample (mean + std * noise, in the same
    order), so a cached run reproduces an uncached one."""
    if isinstance(batch, CachedBatch):
        mean = batch.latent_mean.to(device, non_blocking=True)
        std = batch.latent_std.to(device, non_blocking=True)
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
        latents = (mean + std * noise) * models.vae.config.scaling_factor
        pooled = batch.pooled.to(device) if batch.pooled is not None else None
        hidden, added = models.text.conditioning(batch.hidden.to(device), pooled)
        return latents, hidden, added
    pixels = torch.cat([batch.winners, batch.losers]).to(device, non_blocking=True)
    latents = encode_images(models, pixels, generator)
    hidden, added = models.text(batch.captions, device)
    return latents, hidden, added


def _repeat_pairs(tensor: Tensor) -> Tensor:
    return tensor.repeat(2, *([1] * (tensor.dim() - 1)))


@contextlib.contextmanager
def reference_model(models: Models):
    """The frozen copy, or (LoRA) the policy UNet with its adapters switched off meanwhile."""
    if models.reference_unet is not None:
        yield models.reference_unet
        return
    models.unet.disable_adapters()
    try:
        yield models.unet
    finally:
        models.unet.enable_adapters()


def reference_prediction(
    reference: nn.Module,
    noisy: Tensor,
    timestep_rows: Tensor,
    hidden_rows: Tensor,
    added_rows: dict[str, Tensor] | None,
) -> Tensor:
    """The frozen reference's prediction (call under no_grad): inputs cast to its dtype."""
    return reference(
        noisy.to(reference.dtype),
        timestep_rows,
        hidden_rows.to(reference.dtype),
        added_cond_kwargs=(
            {key: value.to(reference.dtype) for key, value in added_rows.items()}
            if added_rows
            else None
        ),
    ).sample


def preference_step(
    models: Models,
    policy: nn.Module,
    latents: Tensor,
    encoder_hidden_states: Tensor,
    added_cond_kwargs: dict[str, Tensor] | None,
    generator: torch.Generator,
    config: TrainConfig,
    ranges: PhaseRanges,
    autocast: contextlib.AbstractContextManager,
) -> sdpo.PreferenceLoss:
    """The loss for 2B stacked latents (winners first) and B conditionings, one per pair."""
    batch_pairs = latents.shape[0] // 2
    scheduler = models.scheduler
    pair_shape = (batch_pairs, *latents.shape[1:])
    noise = torch.randn(pair_shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(
        0,
        scheduler.config.num_train_timesteps,
        (batch_pairs,),
        generator=generator,
        device=latents.device,
    )
    # Winner i and loser i share their timestep and noise.
    noise_rows, timestep_rows = _repeat_pairs(noise), timesteps.repeat(2)
    noisy = scheduler.add_noise(latents, noise_rows, timestep_rows)
    if models.prediction_type == "epsilon":
        target = noise  # (B, ...): the loss broadcasts it over both halves without a copy
    elif models.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise_rows, timestep_rows)
    else:
        raise ValueError(f"scheduler: prediction_type {models.prediction_type!r} is not supported")
    hidden_rows = _repeat_pairs(encoder_hidden_states)
    added_rows = (
        {key: _repeat_pairs(value) for key, value in added_cond_kwargs.items()}
        if added_cond_kwargs
        else None
    )
    with ranges("policy forward"), autocast:
        model_pred = policy(noisy, timestep_rows, hidden_rows, added_cond_kwargs=added_rows).sample
    with (
        ranges("reference forward"),
        torch.no_grad(),
        autocast,
        reference_model(models) as reference,
    ):
        ref_pred = reference_prediction(reference, noisy, timestep_rows, hidden_rows, added_rows)
    with ranges("loss and safeguard"):
        return sdpo.preference_loss(
            model_pred,
            ref_pred,
            target,
            method=config.method,
            beta=config.beta,
            mu=config.mu,
            granularity=config.granularity,
            dmpo_alpha=config.dmpo_alpha,
            backend=config.loss_backend,
        )


def stats_vector(result: sdpo.PreferenceLoss) -> Tensor:
    """The metrics of one micro-batch as one device vector (in METRIC_KEYS order)."""
    values = [result.loss.detach().float()]
    for key in METRIC_KEYS[1:]:
        value = result.stats[key].float()
        values.append(value.mean() if value.dim() else value)
    return torch.stack(values)


class MetricsWriter:
    """metrics.jsonl (one row per logged optimizer step) and TensorBoard events, rank 0 only."""

    def __init__(self, output_dir: Path, resume_step: int) -> None:
        self.path = output_dir / "metrics.jsonl"
        if self.path.exists():
            # Keep the rows up to the resumed step, so the file reads as one uninterrupted run.
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line and json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.board = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(output_dir / "tensorboard"))
        except ImportError:
            pass

    def write(self, row: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.board is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="sdpo-train", unit="step")


def train(config: TrainConfig) -> dict:
    """Runs the configured training; returns a summary. See the module docstring."""
    config.validate()
    environment = Distributed()
    try:
        return _train(config, environment)
    finally:
        environment.close()


def _pair_batches(config: TrainConfig, environment: Distributed) -> PairBatches:
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


def _train(config: TrainConfig, environment: Distributed) -> dict:
    device = environment.device
    output_dir = Path(config.output_dir)
    if config.cuda_graphs and device.type != "cuda":
        raise ValueError("cuda_graphs: needs a CUDA device; drop --cuda-graphs on this machine")
    # Data first: a source with no usable pairs fails before any model loads.
    if is_cache(config.data):
        batches = CachedPairBatches(
            config.data,
            batch_pairs=config.train_batch_pairs,
            caption_dropout=config.caption_dropout,
            seed=config.seed,
            rank=environment.rank,
            world_size=environment.world_size,
            resolution=config.resolution,
        )
    else:
        batches = _pair_batches(config, environment)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    models = build_models(config, device)
    start_step, position, skipped_total = 0, (0, 0), 0
    resume_from = checkpoints.latest_checkpoint(output_dir) if config.resume else None
    state = None
    if resume_from is not None:
        # The full weights go in before any sharding; every rank reads the checkpoint itself.
        model_state, state = checkpoints.load_checkpoint(resume_from)
        models.unet.load_state_dict(model_state)
    sharded = config.fsdp and environment.enabled
    if sharded:
        shard_unet(models.unet, device)
    # After sharding: FSDP2 swaps the parameters for sharded ones the optimizer must hold.
    parameters = [parameter for parameter in models.unet.parameters() if parameter.requires_grad]
    pairs_per_step = (
        config.train_batch_pairs * config.gradient_accumulation * environment.world_size
    )
    learning_rate = config.learning_rate * (pairs_per_step if config.scale_lr else 1)
    optimizer = make_optimizer(config, parameters, learning_rate, device)
    lr_schedule = constant_with_warmup(optimizer, config.warmup_steps)

    if state is not None:
        if sharded:
            load_full_optimizer_state(models.unet, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        start_step, position, skipped_total = (
            state["step"],
            tuple(state["position"]),
            state["skipped_images"],
        )
        torch.set_rng_state(state["torch_rng"])
    if environment.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(config_to_json(config))

    policy: nn.Module = models.unet
    ddp: nn.parallel.DistributedDataParallel | None = None
    if environment.enabled and not sharded:
        ddp = nn.parallel.DistributedDataParallel(
            models.unet, device_ids=[device.index] if device.type == "cuda" else None
        )
        policy = ddp
    if config.compile or config.cuda_graphs:
        # CUDA graphs through torch.compile's "reduce-overhead" mode (static shapes per run).
        compile_mode = "reduce-overhead" if config.cuda_graphs else None
        policy = torch.compile(policy, mode=compile_mode)
        if models.reference_unet is not None:
            # With LoRA the reference is the policy with adapters off: compiling it too would
            # retrace on every switch, so only a separate frozen copy is compiled.
            models.reference_unet = torch.compile(models.reference_unet, mode=compile_mode)
    profile_window = parse_profile_steps(config.profile_steps) if config.profile_steps else None
    profiling_cuda = profile_window is not None and device.type == "cuda"
    ranges = PhaseRanges(config.nvtx)
    use_autocast = device.type == "cuda" and config.mixed_precision == "bf16"

    def autocast():
        return (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if use_autocast
            else contextlib.nullcontext()
        )

    writer = MetricsWriter(output_dir, start_step) if environment.is_main else None
    progress = _progress(config.max_steps, start_step, config.progress and environment.is_main)
    epoch, batch_index = position  # the next micro-batch to read
    stream = batch_stream(batches, position, config.num_workers, pin_memory=device.type == "cuda")
    last_checkpoint = resume_from
    interval_stats = torch.zeros(len(METRIC_KEYS), device=device)
    interval_micro_batches, interval_skipped, interval_start = 0, 0, time.perf_counter()
    step = start_step
    rows: list[dict] = []

    def save_now() -> Path:
        return _save(
            config,
            environment,
            models,
            optimizer,
            lr_schedule,
            step,
            (epoch, batch_index),
            skipped_total,
            ranges,
        )

    try:
        while step < config.max_steps:
            if profiling_cuda and step == profile_window[0]:
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaProfilerStart()
            for micro in range(config.gradient_accumulation):
                with ranges("data to device"):
                    batch_epoch, batch_number, batch = next(stream)
                    epoch, batch_index = batches.next_position(batch_epoch, batch_number)
                micro_index = step * config.gradient_accumulation + micro
                generator = generator_for(
                    config.seed, 3, environment.rank, micro_index, device=device
                )
                with ranges("encode"):
                    latents, hidden, added = condition_batch(models, batch, generator, device)
                last_micro = micro == config.gradient_accumulation - 1
                if config.cuda_graphs:
                    # A new step: earlier graph outputs may be overwritten from here on.
                    torch.compiler.cudagraph_mark_step_begin()
                # Gradients are all-reduced once per optimizer step, on its last micro-batch.
                sync_context = (
                    ddp.no_sync()
                    if ddp is not None and not last_micro
                    else contextlib.nullcontext()
                )
                if sharded:
                    models.unet.set_requires_gradient_sync(last_micro)
                with sync_context:
                    result = preference_step(
                        models,
                        policy,
                        latents,
                        hidden,
                        added,
                        generator,
                        config,
                        ranges,
                        autocast(),
                    )
                    with ranges("backward"):
                        (result.loss / config.gradient_accumulation).backward()
                interval_stats += stats_vector(result)
                interval_micro_batches += 1
                interval_skipped += batch.skipped
            with ranges("optimizer"):
                grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
                if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor of per-rank parts
                    grad_norm = grad_norm.full_tensor()
                finite = torch.isfinite(grad_norm) & torch.isfinite(interval_stats[0])
                finite = environment.all_reduce_sum((~finite).float().reshape(1)) == 0
                if not bool(finite):  # the one host sync of an optimizer step
                    optimizer.zero_grad(set_to_none=True)
                    message = (
                        f"step {step + 1}: the loss or gradient is not finite; "
                        f"last good checkpoint: {last_checkpoint or 'none (no checkpoint written yet)'}"
                    )
                    if config.on_nonfinite == "stop":
                        raise NonFiniteLoss(message)
                    if environment.is_main:
                        progress.write(message + " (skipped)")
                    interval_stats.zero_()
                    interval_micro_batches, interval_skipped = 0, 0
                    interval_start = time.perf_counter()
                    step += 1
                    progress.update(1)
                    continue
                optimizer.step()
                lr_schedule.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            if profiling_cuda and step == profile_window[1]:
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaProfilerStop()
            if step % config.log_every == 0 or step == config.max_steps:
                with ranges("all-reduce"):
                    reduced = torch.cat(
                        [
                            interval_stats,
                            torch.tensor(
                                [interval_micro_batches, interval_skipped],
                                device=device,
                                dtype=interval_stats.dtype,
                            ),
                        ]
                    )
                    reduced = environment.all_reduce_sum(reduced).tolist()
                micro_batches = reduced[-2]
                skipped_total += int(reduced[-1])
                elapsed = time.perf_counter() - interval_start
                row = {
                    "step": step,
                    **{
                        key: reduced[index] / micro_batches for index, key in enumerate(METRIC_KEYS)
                    },
                }
                row.update(
                    lr=lr_schedule.get_last_lr()[0],
                    grad_norm=float(grad_norm),
                    pairs_per_s=micro_batches * config.train_batch_pairs / elapsed,
                    skipped_images=skipped_total,
                    epoch=batch_epoch,
                )
                rows.append(row)
                if writer is not None:
                    writer.write(row)
                progress.set_postfix(
                    loss=f"{row['loss']:.4f}",
                    acc=f"{row['implicit_acc']:.2f}",
                    lam=f"{row['lambda']:.3f}",
                    pairs_s=f"{row['pairs_per_s']:.1f}",
                )
                interval_stats.zero_()
                interval_micro_batches, interval_skipped, interval_start = 0, 0, time.perf_counter()
            if (
                config.checkpoint_every
                and step % config.checkpoint_every == 0
                and step < config.max_steps
            ):
                last_checkpoint = save_now()
        save_now()
        final_state = full_model_state(models.unet) if sharded else None
        if environment.is_main:
            _export(models.unet, output_dir, final_state)
        environment.barrier()
    finally:
        progress.close()
        if writer is not None:
            writer.close()
    return {
        "steps": step,
        "rows": rows,
        "output_dir": str(output_dir),
        "skipped_images": skipped_total,
    }


def _save(
    config, environment, models, optimizer, lr_schedule, step, position, skipped_total, ranges
) -> Path:
    """Checkpoint at an optimizer-step boundary (accumulation position 0); all ranks barrier.

    ``position`` is the next (epoch, batch index) to read: a resumed run continues from there.
    """
    checkpoint = checkpoints.checkpoint_path(config.output_dir, step)
    with ranges("checkpoint"):
        environment.barrier()
        sharded = config.fsdp and environment.enabled
        # With FSDP2 every rank takes part in gathering the full states (collectives); rank 0
        # receives them on the CPU and writes.
        model_state = full_model_state(models.unet) if sharded else None
        optimizer_state = full_optimizer_state(models.unet, optimizer) if sharded else None
        if environment.is_main:
            state = {
                "step": step,
                "position": list(position),
                "optimizer": optimizer_state if sharded else optimizer.state_dict(),
                "lr_schedule": lr_schedule.state_dict(),
                "skipped_images": skipped_total,
                "torch_rng": torch.get_rng_state(),
                "config": json.loads(config_to_json(config)),
            }
            checkpoints.save_checkpoint(
                config.output_dir,
                step,
                model_state if sharded else models.unet.state_dict(),
                state,
            )
        environment.barrier()
    return checkpoint


def _export(unet: nn.Module, output_dir: Path, state: dict[str, Tensor] | None = None) -> None:
    """DIR/unet/ (diffusers, safetensors) and DIR/unet.pth (a plain state dict); LoRA adapters
    are merged into the weights first, so both load into a plain UNet. ``state``: the full
    weights when the UNet is sharded."""
    if state is None:
        state = merged_state_dict(unet)
    plain = type(unet).from_config(unet.config)
    plain.load_state_dict(state)
    plain.save_pretrained(output_dir / "unet", safe_serialization=True)
    torch.save(state, output_dir / "unet.pth")


def shard_unet(unet: nn.Module, device: torch.device) -> None:
    """FSDP2: each down/mid/up block its own unit (its weights gathered just for its forward and
    backward), then the rest (embeddings, conv_in/out) at the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for blocks in (unet.down_blocks, unet.up_blocks):
        for block in blocks:
            fully_shard(block, mesh=mesh)
    if unet.mid_block is not None:
        fully_shard(unet.mid_block, mesh=mesh)
    fully_shard(unet, mesh=mesh)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(unet: nn.Module) -> dict[str, Tensor]:
    """The sharded UNet's full weights on rank 0's CPU (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(unet, options=_full_options())


def full_optimizer_state(unet: nn.Module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(unet, optimizer, options=_full_options())


def load_full_optimizer_state(unet: nn.Module, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(unet, optimizer, state, options=StateDictOptions(full_state_dict=True))


def summary_json(summary: dict) -> str:
    return json.dumps({key: value for key, value in summary.items() if key != "rows"}, indent=2)
