"""One micro-batch's preference step, and the optimizer step that closes an accumulation.

Per micro-batch of B pairs: encode winners and losers (2B images) once, draw ONE timestep and
ONE noise per pair and share them between its winner and loser, run ONE policy forward over the
2B stacked rows and ONE reference forward (no grad) over the same inputs, then
``sdpo.preference_loss``. The finite check of the loss and gradient norm stays on the device:
fused AdamW skips a non-finite update through its ``found_inf`` input, and the trainer reads the
flags with the logged metrics (so a non-finite loss never reaches the weights, without a host
sync per optimizer step).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

import sdpo
from sdpo.train import torch_hooks
from sdpo.train.cache import CachedBatch
from sdpo.train.config import TrainConfig
from sdpo.train.data import Batch, host_to_device
from sdpo.train.distributed import Distributed
from sdpo.train.family import DiffusionFamily, FlowMatchingFamily, repeat_pairs
from sdpo.train.models import Models
from sdpo.train.nvtx_ranges import PhaseRanges


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


def flow_pixels(flow, pixels: Tensor) -> Tensor:
    """Images (N, 3, H, W) as the family encodes them: Wan takes videos (N, 3, F, H, W), so an
    image is a one-frame video (Wan 2.1 generates single images as num_frames=1)."""
    if flow.pixel_dims == 5 and pixels.dim() == 4:
        return pixels.unsqueeze(2)
    return pixels


def condition_batch(
    models: Models, batch: Batch | CachedBatch, generator: torch.Generator, device: torch.device
) -> tuple[Tensor, Tensor, dict[str, Tensor] | None]:
    """(2B latents, B hidden states, added conditioning) from pixels or from the cache.

    Both paths draw the same noise for the latent sample (mean + std * noise, in the same
    order), so a cached run reproduces an uncached one."""
    if isinstance(batch, CachedBatch):
        mean = host_to_device(batch.latent_mean, device)
        std = host_to_device(batch.latent_std, device)
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
        if models.flow is not None:  # the flow VAE's shift and scale (Wan: per-channel)
            latents = models.flow.normalize_latents(mean + std * noise)
        else:
            latents = (mean + std * noise) * models.vae.config.scaling_factor
        # Non-blocking: from pinned memory (CUDA) the copies overlap the queued work, and
        # none of them waits for the device to drain.
        pooled = host_to_device(batch.pooled, device) if batch.pooled is not None else None
        hidden, added = models.text.conditioning(host_to_device(batch.hidden, device), pooled)
        return latents, hidden, added
    # The loader's pinned winners and losers each go over, then are joined on the device: a
    # host-side torch.cat would be a fresh pageable tensor (a synchronous staged copy, 50 MB
    # for 8 SD1.5 pairs at 512 px).
    pixels = torch.cat(
        [host_to_device(batch.winners, device), host_to_device(batch.losers, device)]
    )
    if models.flow is not None:
        latents = models.flow.encode_images(flow_pixels(models.flow, pixels), generator)
    else:
        latents = encode_images(models, pixels, generator)
    hidden, added = models.text(batch.captions, device)
    return latents, hidden, added


def autocast(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    """bf16 / fp16 autocast on CUDA with ``mixed_precision`` "bf16" / "fp16"; CPU runs fp32."""
    if device.type == "cuda" and mixed_precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


# --attention choices that pin one PyTorch SDPA kernel (torch.nn.attention.sdpa_kernel); "sdpa"
# lets PyTorch pick per call, "xformers" swaps the attention processors (models.py).
SDPA_BACKENDS = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-math": "MATH",
}


def attention_context(attention: str) -> contextlib.AbstractContextManager:
    """Around the forwards (and so their backward): only the chosen SDPA kernel, or no limit."""
    if attention not in SDPA_BACKENDS:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[attention]))


def to_channels_last(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """The module's 4-D weights in channels_last (NHWC: cuDNN's tensor-core convolutions want
    it), and the optimizer state beside them in the same layout: fused AdamW walks a weight and
    its moments as flat memory, so a moment left in the old layout would update the wrong
    elements (measured on the CPU: a 0.15 weight error on a 3x3 conv after one step)."""
    module.to(memory_format=torch.channels_last)
    if optimizer is not None:
        align_optimizer_state(optimizer)


def align_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Each state tensor shaped like its weight takes the weight's memory layout (after a
    layout change, or after loading a state saved from another layout)."""
    for parameter, state in optimizer.state.items():
        layout = (
            torch.channels_last
            if parameter.dim() == 4
            and parameter.is_contiguous(memory_format=torch.channels_last)
            and not parameter.is_contiguous()
            else torch.contiguous_format
        )
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == parameter.shape:
                state[key] = value.contiguous(memory_format=layout)


def family_of(models: Models) -> DiffusionFamily | FlowMatchingFamily:
    if models.flow is not None:
        return FlowMatchingFamily(models.flow, models.flow_density)
    return DiffusionFamily(models.scheduler, models.prediction_type)


def family_for(models: Models, config: TrainConfig) -> DiffusionFamily | FlowMatchingFamily:
    """The family with the config's EXPERIMENTAL timestep weighting (DDPM models only)."""
    if models.flow is not None or config.timestep_weighting == "none":
        return family_of(models)
    from sdpo.timesteps import TimestepWeighting
    from sdpo.train.config import parse_timestep_range

    weighting = TimestepWeighting(
        mode=config.timestep_weighting,
        mask_threshold=config.timestep_mask_threshold,
        clip_epsilon=config.timestep_clip,
        allowed_range=parse_timestep_range(config.timestep_range)
        if config.timestep_range
        else None,
    )
    return DiffusionFamily(models.scheduler, models.prediction_type, weighting)


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
    family: DiffusionFamily | FlowMatchingFamily | None = None,
) -> Tensor:
    """The frozen reference's prediction (call under no_grad): inputs cast to its dtype (a
    flow family casts inside its own call)."""
    if isinstance(family, FlowMatchingFamily):
        return family.predict(reference, noisy, timestep_rows, hidden_rows, added_rows)
    added = (
        {key: value.to(reference.dtype) for key, value in added_rows.items()}
        if added_rows
        else None
    )
    return DiffusionFamily.predict(
        reference, noisy.to(reference.dtype), timestep_rows, hidden_rows.to(reference.dtype), added
    )


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
    family: DiffusionFamily | FlowMatchingFamily | None = None,
) -> sdpo.PreferenceLoss:
    """The loss for 2B stacked latents (winners first) and B conditionings, one per pair."""
    family = family or family_for(models, config)
    noise, timesteps = family.sample_noise(latents, generator)
    noisy, timestep_rows, target = family.noisy_inputs(latents, noise, timesteps)
    hidden_rows = repeat_pairs(encoder_hidden_states)
    added_rows = (
        {key: repeat_pairs(value) for key, value in added_cond_kwargs.items()}
        if added_cond_kwargs
        else None
    )
    with ranges("policy forward"), autocast:
        model_pred = family.predict(policy, noisy, timestep_rows, hidden_rows, added_rows)
    with (
        ranges("reference forward"),
        torch.no_grad(),
        autocast,
        reference_model(models) as reference,
    ):
        ref_pred = reference_prediction(
            reference, noisy, timestep_rows, hidden_rows, added_rows, family
        )
    with ranges("loss and safeguard"):
        model_pred, ref_pred, target = family.weighted(model_pred, ref_pred, target, timesteps)
        pair_weights = family.pair_weights(model_pred, ref_pred, target, timesteps)
        return sdpo.preference_loss(
            model_pred,
            ref_pred,
            target,
            method=config.method,
            beta=config.beta,
            mu=config.mu,
            granularity=config.granularity,
            dmpo_alpha=config.dmpo_alpha,
            pair_weights=pair_weights,
            backend=config.loss_backend,
        )


def clip_and_check_gradients(
    parameters: list[nn.Parameter],
    max_grad_norm: float,
    loss_sum: Tensor,
    environment: Distributed | None,
) -> tuple[Tensor, Tensor]:
    """(gradient norm, ``finite``): 0-dim device tensors, ``finite`` (bool) true when the loss
    and the gradient are finite on every rank. No host sync: the all-reduce is a device
    collective, and the flag is read with the logged metrics. ``environment`` None: this
    process alone."""
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor of per-rank parts
        grad_norm = grad_norm.full_tensor()
    finite = torch.isfinite(grad_norm) & torch.isfinite(loss_sum)
    not_finite = (~finite).float().reshape(1)
    if environment is not None:
        not_finite = environment.all_reduce_sum(not_finite)
    return grad_norm, (not_finite == 0).reshape(())


def make_grad_scaler(device: torch.device, mixed_precision: str) -> torch.amp.GradScaler | None:
    """fp16's dynamic loss scaling (None otherwise). On the CPU, where the step runs fp32, the
    scaler still scales and unscales by powers of two (exact), so its path is testable there."""
    if mixed_precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` can skip its update on a device flag: the fused AdamW
    kernels take ``found_inf`` (the mechanism GradScaler uses) and then leave the weights,
    the moments and the step count untouched. Adafactor has no such input."""
    return bool(optimizer.defaults.get("fused")) and hasattr(optimizer, "param_groups")


def uses_persistent_gradients(config: TrainConfig) -> bool:
    """CUDA graphs with gradient accumulation: the gradients must live outside the graph pool
    (``PersistentGradients``). At accumulation 1 the update reads the pool's gradients before
    the next replay, so the extra buffers would only cost memory."""
    return config.cuda_graphs and config.gradient_accumulation > 1


class PersistentGradients:
    """Gradient buffers that live across optimizer steps: what makes torch.compile's CUDA graphs
    ("reduce-overhead") correct with gradient accumulation.

    Why: the compiled backward's outputs live in the CUDA graphs' memory pool, and autograd
    installs an incoming gradient as ``.grad`` without a copy when the parameter has none yet.
    After the first micro-batch ``.grad`` is then pool memory, which the next micro-batch's
    replay overwrites: the sum of 32 micro-batches silently becomes garbage (a known
    torch.compile failure). When ``.grad`` already exists, autograd adds into it in place
    (``grad += new``) and only reads the pool. So every trainable parameter gets a zero buffer
    once, and the buffers are zeroed, not freed, after each update (``zero()``).

    Exact: 0 + g == g bit for bit (up to the sign of a zero, which no update reads), so the
    weights equal those of an eager run whose gradients are freed between steps.

    A parameter that receives no gradient keeps ``.grad`` None in an eager run, and AdamW then
    leaves it alone; a zero buffer would let AdamW decay its moments and apply weight decay. The
    first optimizer step therefore records (post-accumulate-grad hooks) which parameters received
    a gradient, and ``release_unused()`` (before the clip) sets the others' ``.grad`` back to None
    for good: which parameters take part is fixed by the model and its inputs' structure.

    Cost: one more gradient-sized allocation that stays resident (the pool keeps its own copy of
    the backward outputs), i.e. 4 bytes per trainable fp32 parameter: 3.4 GB for SD1.5's 860M,
    a few MB with LoRA."""

    def __init__(self, parameters: list[nn.Parameter]) -> None:
        self.parameters = [parameter for parameter in parameters if parameter.requires_grad]
        for parameter in self.parameters:
            parameter.grad = torch.zeros_like(parameter)
        self.received: set[int] = set()
        self.hooks = [
            parameter.register_post_accumulate_grad_hook(self._record)
            for parameter in self.parameters
        ]

    def _record(self, parameter: Tensor) -> None:
        self.received.add(id(parameter))

    def release_unused(self) -> None:
        """After the first optimizer step's backward passes (a no-op later): parameters that
        received no gradient go back to ``.grad`` None, as in an eager run."""
        if not self.hooks:
            return
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        used = []
        for parameter in self.parameters:
            if id(parameter) in self.received:
                used.append(parameter)
            else:
                parameter.grad = None
        self.parameters = used

    def zero(self) -> None:
        """After the update: the buffers are zeroed in place (one fused launch per device and
        dtype), never replaced, so the next backward adds into them again."""
        grads = [parameter.grad for parameter in self.parameters]
        if any(grad is None for grad in grads):
            raise RuntimeError(
                "a persistent gradient buffer was freed (set to None) between steps; CUDA graphs "
                "with gradient accumulation need the buffers to stay (zero_grad(set_to_none=False))"
            )
        if grads:
            torch._foreach_zero_(grads)


def apply_optimizer_step(
    optimizer: torch.optim.Optimizer,
    lr_schedule: torch.optim.lr_scheduler.LRScheduler,
    finite: Tensor | None = None,
    persistent: PersistentGradients | None = None,
) -> Tensor:
    """The update, skipped when ``finite`` (a 0-dim device bool) is false; returns ``finite``.

    Fused AdamW skips on the device (no host sync). Other optimizers (Adafactor) read the flag
    on the host, once per optimizer step: their update has no device-side skip, and masking it
    would need a copy of the weights and state. The LR schedule advances either way (one tick
    per optimizer step, skipped or not, as the step counter does). The gradients are freed
    afterwards, or zeroed in place when ``persistent`` holds them (CUDA graphs with
    accumulation)."""
    if finite is None:
        finite = torch.ones(
            (), dtype=torch.bool, device=optimizer.param_groups[0]["params"][0].device
        )
    if skips_on_device(optimizer):
        with torch_hooks.skip_flag(optimizer, (~finite).float()):
            optimizer.step()
    elif bool(finite):
        optimizer.step()
    lr_schedule.step()
    if persistent is None:
        optimizer.zero_grad(set_to_none=True)
    else:
        persistent.zero()
    return finite
