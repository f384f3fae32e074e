"""``sdpo-profile overhead``: what the safeguard costs, and where our step's speed comes from.

In ONE process, on random-initialised models of the real architecture (``--preset sd15|sdxl``,
or the flow-matching ``sd35|flux|wan``; ``tiny``, ``tiny-sd3``, ``tiny-flux``, ``tiny-wan`` for
a CPU smoke run), interleaved rounds time full optimizer steps (one micro-batch of B pairs:
conditioning, the policy forward over 2B rows, the reference forward, the loss, backward,
grad-norm clip, optimizer step). The modes, each ``MODE/VARIANT``:

- ``reference/eager``: the reference trainer's per-step work: the VAE and text encoders run on
  every step, seven ``.item()`` host syncs for logging, eager. For a flow model (no reference
  trainer exists) the same per-step work around the trainer's own flow components (the family's
  noising, velocity target and transformer call), with the reference's loss sequence;
- ``ours-online/eager``: our step, encoding the pixels and captions on every step (the work the
  reference does, done our way);
- ``dpo``, ``sdpo-fused``, ``sdpo-torch``: our step from the cache (latent distributions and
  text embeddings, as ``sdpo-cache`` stores them) with the safeguard off, on the fused Triton
  kernels, or on plain PyTorch. ``sdpo-fused`` runs only where Triton can (a GPU); a row is
  labelled by what ran, and what did not run is listed under ``not_run`` with the reason.

Variants: ``eager``; ``compile`` (torch.compile of both UNets); ``cuda-graphs``
(torch.compile "reduce-overhead"); ``channels-last`` (both UNets NHWC, eager); ``sdpa-flash``,
``sdpa-efficient``, ``sdpa-cudnn`` (eager, one SDPA kernel pinned with
``torch.nn.attention.sdpa_kernel``); ``xformers`` (eager, both UNets' attention through
xformers, as ``sdpo-train --attention xformers``; GPU only, and listed under ``not_run`` where
the package is not installed). The safeguard trio runs in eager, compile and cuda-graphs;
the layout and attention variants time only our SDPO step (the ladder's rung). A variant that
cannot run here (a kernel this GPU lacks) is recorded under ``not_run``, not fatal.
``channels-last`` is a UNet layout: a flow preset refuses it when named in ``variants`` (as the
trainer refuses ``--channels-last``) and lists it under ``not_run`` when it comes from the
default list.

Rounds alternate the mode order (ABBA: reversed every round) and drop each block's first step.
The safeguard's ratio (ours / dpo at the headline variant) comes with a 95% interval: a paired
t interval on the log of each round's block-median ratio (``ratio_interval``); the verdict
against ``SDPO_OVER_DPO_TARGET`` (1.01) says "not resolved" when that interval is wider than the
target's 1% margin or holds the target (``ratio_verdict``).

The attribution ladder reads the modes in order: reference -> ours-online (eager) -> ours
cached (eager) -> compiled -> CUDA-graphed, each with its factor against the rung before it and
against the reference; channels-last, the SDPA kernels and xformers are alternatives to the
cached eager rung and carry their factor against it.

Peak memory: every module (policy, reference copy, VAE, text encoders) stays on the device in
every mode, so the modes differ only by what they run. A LoRA preset (``flux``, ``wan``) has no
reference copy: the reference forward is the policy with its adapters off, uncompiled in the
compiled variants (as the trainer does: compiling it would retrace on every switch).

Model FLOPs (``torch.utils.flop_counter``): the policy forward + backward and the reference
forward, counted with gradient checkpointing off (its recompute is not model work), plus the
VAE encoder and text encoders in the modes that run them. MFU = those FLOPs / step time /
the GPU's dense bf16 peak (``DENSE_BF16_PEAK_FLOPS``, from NVIDIA's datasheets, keyed on the
exact device name; None, with ``mfu_unavailable`` naming the device, for any other or a CPU);
``mfu_vs_matmul`` divides by the bf16 8192^3 matmul rate measured in the same run instead. On a
CPU nothing is a headline: the timings only show the suite runs. On a CPU nothing is a headline: the timings only show the suite runs.

The results JSON is documented in docs/profiling.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import importlib.util
import json
import math
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from sdpo import cuda_backend, objectives, ops
from sdpo.profiling.reference_sequence import reference_trainer_dpo_loss
from sdpo.train.cache import CachedBatch
from sdpo.train.config import (
    TrainConfig,
    channels_last_refusal,
    config_from_args,
    random_flow_architecture,
)
from sdpo.train.data import Batch
from sdpo.train.family import FlowMatchingFamily, repeat_pairs
from sdpo.train.models import Models, build_models, compile_model
from sdpo.train.nvtx_ranges import PhaseRanges
from sdpo.train.optim import make_lr_schedule, make_optimizer, scaled_learning_rate
from sdpo.train.step import (
    align_optimizer_state,
    apply_optimizer_step,
    attention_context,
    autocast,
    clip_and_check_gradients,
    condition_batch,
    encode_images,
    flow_pixels,
    preference_step,
    reference_model,
    reference_prediction,
    to_channels_last,
)

MODES = ("dpo", "sdpo-fused", "sdpo-torch")  # our step from the cache, safeguard off / on
ONLINE_MODE = "ours-online"  # our step encoding pixels and captions every step
REFERENCE_MODE = "reference"
VARIANTS = (
    "eager",
    "compile",
    "cuda-graphs",
    "channels-last",
    "sdpa-flash",
    "sdpa-efficient",
    "sdpa-cudnn",
    "xformers",
)
COMPILED_VARIANTS = ("compile", "cuda-graphs")
# Variants that time only our SDPO step (alternatives to its eager rung), not the safeguard trio.
LADDER_ONLY_VARIANTS = ("channels-last", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "xformers")
GPU_ONLY_VARIANTS = ("cuda-graphs", "sdpa-efficient", "sdpa-cudnn", "xformers")
XFORMERS_MISSING = "xformers is not installed (pip install xformers); not timed"
# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from NVIDIA's datasheets, keyed on the
# exact name torch.cuda.get_device_name reports: H100 SXM5 and H200 SXM 989.4 TFLOP/s ("1,979"
# is with sparsity), H100 NVL and H200 NVL 835.5 ("1,671" with sparsity), H100 PCIe 756, A100
# 312 (every form factor; 624 with sparsity). A name not listed gets no peak: the variants of
# one chip differ by up to 30% (clocks, power), and a substring match would give an H100 NVL
# the SXM's peak.
DENSE_BF16_PEAK_FLOPS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989.4e12,  # SXM5
    "NVIDIA H100 NVL": 835.5e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989.4e12,  # SXM
    "NVIDIA H200 NVL": 835.5e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
}


def trainer_preset(name: str, *flags: str) -> TrainConfig:
    """The trainer's preset ``name`` (validated as ``sdpo-train --preset name`` would be)."""
    return config_from_args(["--preset", name, *flags])


# The flow smoke presets: the trainer's flow presets on tiny models at 16 px, 2 pairs, with
# "batch" granularity (the reference loss sequence's), so the reference mode computes our loss.
_TINY_FLOW = ("--pretrained", "tiny", "--resolution", "16", "--train-batch-pairs", "2")
_TINY_FLOW += ("--granularity", "batch")
# Each overhead preset is the trainer's preset for that model (sdpo.train.config: beta, mu,
# granularity "group:8", 8 pairs per micro-batch, AdamW for SD1.5, Adafactor + gradient
# checkpointing for SDXL; the flow presets as documented there), on random weights of the real
# architecture: sd35 = SD3.5 Medium full fine-tune, flux = FLUX.1-dev LoRA, wan = Wan 2.1 T2V
# 1.3B LoRA (each preset's --pretrained random, sdpo/train/config.py PRESET_RANDOM_ARCHITECTURES).
PRESETS: dict[str, TrainConfig] = {
    "tiny": trainer_preset("tiny"),
    "sd15": trainer_preset("sd15-dpo", "--pretrained", "random"),
    "sdxl": trainer_preset("sdxl-dpo", "--pretrained", "random"),
    "sd35": trainer_preset("sd35m-dpo", "--pretrained", "random"),
    "flux": trainer_preset("flux-dpo-lora", "--pretrained", "random"),
    "wan": trainer_preset("wan-dpo-lora", "--pretrained", "random"),
    "tiny-sd3": trainer_preset("sd35m-dpo", *_TINY_FLOW),  # full fine-tune: a reference copy
    "tiny-flux": trainer_preset("flux-dpo-lora", *_TINY_FLOW),  # LoRA: adapters off
    "tiny-wan": trainer_preset("wan-dpo-lora", *_TINY_FLOW),  # images as one-frame videos
}


# The flow presets on released architectures, and the tiny preset that smoke-tests each on a CPU.
CPU_SMOKE_PRESETS_OF = {"sd35": "tiny-sd3", "flux": "tiny-flux", "wan": "tiny-wan"}


def dense_bf16_peak(name: str) -> float | None:
    """The datasheet dense bf16 peak of the GPU named exactly ``name``, or None (no guess)."""
    return DENSE_BF16_PEAK_FLOPS.get(name.strip())


def mfu_unavailable_reason(name: str, is_cuda: bool) -> str | None:
    """Why MFU against a datasheet peak is not reported for this device, or None if it is."""
    if not is_cuda:
        return "a CPU has no datasheet bf16 peak here; MFU is not reported"
    if dense_bf16_peak(name) is not None:
        return None
    return (
        f"no datasheet dense bf16 peak for {name!r} (known: {', '.join(DENSE_BF16_PEAK_FLOPS)}); "
        "MFU is not reported rather than guessed (mfu_vs_matmul still is)"
    )


# The safeguard's step-time target on a GPU: SDPO's step at most 1% slower than plain DPO's.
SDPO_OVER_DPO_TARGET = 1.01
RATIO_CONFIDENCE = 0.95
# Student's t, two-sided 95% (the 0.975 quantile), for 1..30 degrees of freedom; past 30 the
# value at 30 (slightly wider than the normal's 1.96: the safe side).
_T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def ratio_interval(numerator_blocks: list[float], denominator_blocks: list[float]) -> dict | None:
    """The step-time ratio of two modes timed in the same rounds, with a 95% interval.

    Per round r, the ratio of the two modes' block medians; the estimate is the geometric mean
    of the per-round ratios, the interval mean(log r) +- t(0.975, n - 1) x sd(log r) / sqrt(n),
    exponentiated (a paired t interval on the log ratios: each round's pair shares its drift,
    and ABBA order cancels a linear drift between the two). None with fewer than 2 rounds."""
    pairs = list(zip(numerator_blocks, denominator_blocks, strict=True))
    if len(pairs) < 2:
        return None
    logs = [math.log(top / bottom) for top, bottom in pairs]
    mean = statistics.fmean(logs)
    half = (
        _T_975[min(len(logs) - 1, len(_T_975)) - 1] * statistics.stdev(logs) / math.sqrt(len(logs))
    )
    return {
        "ratio": math.exp(mean),
        "low": math.exp(mean - half),
        "high": math.exp(mean + half),
        "confidence": RATIO_CONFIDENCE,
        "rounds": len(logs),
        "method": "paired t interval on the log of each round's block-median ratio",
    }


def ratio_verdict(interval: dict | None, target: float = SDPO_OVER_DPO_TARGET) -> str:
    """ "meets" when the whole interval is at or below ``target``, "misses" when it is all above;
    otherwise "not resolved": the interval is wider than the target's margin (target - 1: the
    noise is larger than what is judged) or it holds the target."""
    if interval is None:
        return "not resolved: fewer than 2 rounds"
    low, high = interval["low"], interval["high"]
    span = f"[{low:.4f}, {high:.4f}]"
    margin = target - 1
    if high - low > margin:
        return (
            f"not resolved: the {interval['confidence']:.0%} interval {span} is wider than the "
            f"target's margin ({margin:.2%}); time more rounds or steps"
        )
    if high <= target:
        return f"meets (<= {target:g}): {span}"
    if low > target:
        return f"misses (> {target:g}): {span}"
    return f"not resolved: the interval {span} holds the target {target:g}"


def spread(samples_ms: list[float]) -> dict:
    """Median, quartiles and count of one mode's step times (ms)."""
    ordered = sorted(samples_ms)
    if len(ordered) >= 2:
        first, _, third = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        first = third = ordered[0]
    return {
        "step_ms": statistics.median(ordered),
        "q1_ms": first,
        "q3_ms": third,
        "iqr_ms": third - first,
        "n": len(ordered),
    }


@dataclass
class ModeResult:
    samples_ms: list[float] = field(default_factory=list)
    block_ms: list[float] = field(default_factory=list)  # each round's block median, in order
    peak_mem_gb: float | None = None
    backend: str = ""

    def summary(
        self,
        batch_pairs: int,
        flops_per_step: float,
        peak_flops: float | None,
        matmul_flops: float,
    ) -> dict:
        timing = spread(self.samples_ms)
        achieved = flops_per_step / (timing["step_ms"] * 1e-3)
        return {
            **timing,
            "pairs_per_s": batch_pairs / (timing["step_ms"] * 1e-3),
            "peak_mem_gb": self.peak_mem_gb,
            "flops_per_step": flops_per_step,
            "mfu": achieved / peak_flops if peak_flops else None,
            "mfu_vs_matmul": achieved / matmul_flops,
            "backend": self.backend,
            "steps_timed": timing["n"],
        }


class Workload:
    """The trainer's models for a preset, its optimizer and LR schedule, and one fixed batch
    (pixels + captions, and its cached latents and embeddings)."""

    def __init__(self, preset: TrainConfig, batch_pairs: int, device: torch.device) -> None:
        self.preset, self.batch_pairs, self.device = preset, batch_pairs, device
        cuda = device.type == "cuda"
        with torch.device(device):  # random initialisation on the GPU: seconds, not minutes
            models = build_models(preset, device)
        self.models = models
        # The reference trainer runs its VAE and text encoders in its weight dtype (bf16).
        bf16 = cuda and preset.mixed_precision == "bf16"
        self.encoder_dtype = torch.bfloat16 if bf16 else torch.float32
        if self.encoder_dtype != torch.float32:
            models.vae.to(self.encoder_dtype)
            models.text.to(self.encoder_dtype)
        generator = torch.Generator(device="cpu").manual_seed(0)
        pixels = torch.rand(
            (2 * batch_pairs, 3, preset.resolution, preset.resolution), generator=generator
        )
        self.pixels = (pixels * 2 - 1).pin_memory() if cuda else pixels * 2 - 1
        words = ["red", "blue", "circle", "square", "small", "large", "on", "a", "green"]
        self.captions = [
            " ".join(words[(index + offset) % len(words)] for offset in range(5))
            for index in range(batch_pairs)
        ]
        # The cache sdpo-cache would hold: the latent distribution and the text embeddings.
        with torch.no_grad():
            images = self.pixels.to(device, self.encoder_dtype)
            if models.flow is not None:  # Wan encodes one-frame videos
                images = flow_pixels(models.flow, images)
            distribution = models.vae.encode(images).latent_dist
            hidden, added = models.text(self.captions, device)
        self.cached = CachedBatch(
            latent_mean=_host(distribution.mean.float(), cuda),
            latent_std=_host(distribution.std.float(), cuda),
            hidden=_host(hidden.float(), cuda),
            pooled=_host(added["text_embeds"].float(), cuda) if added else None,
            captions=self.captions,
        )
        self.parameters = [p for p in models.unet.parameters() if p.requires_grad]
        learning_rate = scaled_learning_rate(preset, world_size=1)
        self.optimizer = make_optimizer(preset, self.parameters, learning_rate, device)
        self.lr_schedule = make_lr_schedule(self.optimizer, preset.warmup_steps)
        # The same pixels and captions as a data batch (winners first), for online encoding.
        self.batch = Batch(
            winners=self.pixels[:batch_pairs],
            losers=self.pixels[batch_pairs:],
            captions=self.captions,
            skipped=0,
        )
        # Our steps skip a non-finite update on the device (no host sync); read after timing.
        self.all_finite = torch.ones((), dtype=torch.bool, device=device)


def _host(tensor: Tensor, pin: bool) -> Tensor:
    tensor = tensor.detach().cpu()
    return tensor.pin_memory() if pin else tensor


class _Policies:
    """Compiled wrappers of the shared UNets, made once per variant (as the trainer compiles)."""

    def __init__(self, models: Models) -> None:
        self.models = models
        self.cache: dict[str, tuple[nn.Module, nn.Module]] = {}

    def get(self, variant: str) -> tuple[nn.Module, nn.Module | None]:
        """(policy, reference copy); the copy is None with LoRA (the policy, adapters off)."""
        if variant not in self.cache:
            reference = self.models.reference_unet
            if variant not in COMPILED_VARIANTS:
                pair = (self.models.unet, reference)
            else:
                cuda_graphs = variant == "cuda-graphs"
                pair = (
                    compile_model(self.models.unet, cuda_graphs),
                    None if reference is None else compile_model(reference, cuda_graphs),
                )
            self.cache[variant] = pair
        return self.cache[variant]


@contextlib.contextmanager
def variant_context(workload: Workload, variant: str):
    """What an eager variant changes around its steps: the UNets' layout (and the optimizer
    state with them, see ``sdpo.train.step.to_channels_last``) or the pinned SDPA kernel;
    undone on exit, outside the timed steps."""
    if variant == "xformers":
        with xformers_attention(workload):
            yield
        return
    if variant == "channels-last":
        unets = [
            unet
            for unet in (workload.models.unet, workload.models.reference_unet)
            if unet is not None
        ]
        for unet in unets:
            to_channels_last(unet)
        align_optimizer_state(workload.optimizer)
        try:
            yield
        finally:
            for unet in unets:
                unet.to(memory_format=torch.contiguous_format)
            align_optimizer_state(workload.optimizer)
        return
    with attention_context(variant if variant.startswith("sdpa-") else "sdpa"):
        yield


_NO_BACKEND = object()  # a processor without diffusers' _attention_backend attribute


@contextlib.contextmanager
def xformers_attention(workload: Workload):
    """Both UNets' attention through xformers (``enable_xformers_memory_efficient_attention``,
    what ``sdpo-train --attention xformers`` calls), every attention module's processor put
    back as it was on exit. A package or GPU xformers cannot serve is a RuntimeError (the
    warm-up lists it under ``not_run``)."""
    unets = [
        unet for unet in (workload.models.unet, workload.models.reference_unet) if unet is not None
    ]
    # A UNet's Attention swaps its processor; a flow transformer's attention (diffusers'
    # attention dispatch) keeps it and sets the processor's _attention_backend: both put back.
    saved = [
        (module, module.processor, getattr(module.processor, "_attention_backend", _NO_BACKEND))
        for unet in unets
        for module in unet.modules()
        if hasattr(module, "set_processor") and hasattr(module, "processor")
    ]
    try:
        try:
            for unet in unets:
                unet.enable_xformers_memory_efficient_attention()
        except (ImportError, ValueError) as error:
            raise RuntimeError(f"xformers is not usable here ({error})") from error
        yield
    finally:
        for module, processor, backend in saved:
            module.set_processor(processor)
            if backend is not _NO_BACKEND:
                processor._attention_backend = backend


def fused_available(device: torch.device) -> bool:
    return ops.triton_available(device)


def our_step(
    workload: Workload, policies: _Policies, mode: str, variant: str, step: int
) -> tuple[str, Tensor]:
    """One optimizer step of our trainer with its components: the preference step, the
    gradient clip and device-side finite check, the optimizer and LR schedule step. From the
    cache, or (``ours-online``) encoding the pixels and captions. Returns (loss backend, loss).

    Draws its random numbers in the order the reference step does (latent sample noise, then the
    pairs' noise, then their timesteps), so both compute the same loss for the same ``step``."""
    models, device = workload.models, workload.device
    mu = None if mode == "dpo" else workload.preset.mu
    requested = "torch" if mode == "sdpo-torch" else "auto"
    if mode in ("sdpo-fused", ONLINE_MODE) and fused_available(device):
        requested = "triton"
    config = dataclasses.replace(workload.preset, mu=mu, loss_backend=requested)
    policy, reference_unet = policies.get(variant)
    if variant == "cuda-graphs":
        torch.compiler.cudagraph_mark_step_begin()
    generator = torch.Generator(device=device).manual_seed(step)
    source = workload.batch if mode == ONLINE_MODE else workload.cached
    latents, hidden, added = condition_batch(models, source, generator, device)
    if mode == ONLINE_MODE:
        latents = latents.float()
        hidden = hidden.float()
        added = {key: value.float() for key, value in added.items()} if added else None
    saved_reference = models.reference_unet
    models.reference_unet = reference_unet
    try:
        result = preference_step(
            models,
            policy,
            latents,
            hidden,
            added,
            generator,
            config,
            _NO_RANGES,
            autocast(device, config.mixed_precision),
        )
    finally:
        models.reference_unet = saved_reference
    result.loss.backward()
    _, finite = clip_and_check_gradients(
        workload.parameters, config.max_grad_norm, result.loss.detach(), None
    )
    apply_optimizer_step(workload.optimizer, workload.lr_schedule, finite)
    workload.all_finite &= finite
    return objectives.resolve_backend(requested, device), result.loss.detach()


_NO_RANGES = PhaseRanges(enabled=False)  # free no-op ranges: timing runs without NVTX


def reference_step(workload: Workload, step: int) -> tuple[str, Tensor]:
    """One optimizer step of the reference trainer's work (see the module docstring)."""
    if workload.models.flow is not None:
        return reference_flow_step(workload, step)
    models, device, preset = workload.models, workload.device, workload.preset
    generator = torch.Generator(device=device).manual_seed(step)
    pixels = workload.pixels.to(device, non_blocking=True)
    latents = encode_images(models, pixels.to(workload.encoder_dtype), generator).float()
    hidden, added = models.text(workload.captions, device)
    hidden = hidden.float()
    added = {key: value.float() for key, value in added.items()} if added else None
    batch_pairs = workload.batch_pairs
    scheduler = models.scheduler
    noise = torch.randn(
        (batch_pairs, *latents.shape[1:]), generator=generator, device=device
    ).repeat(2, 1, 1, 1)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (batch_pairs,), generator=generator, device=device
    ).repeat(2)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    hidden_rows = hidden.repeat(2, 1, 1)
    added_rows = {key: value.repeat(2, 1) for key, value in added.items()} if added else None
    with autocast(device, preset.mixed_precision):
        model_pred = models.unet(noisy, timesteps, hidden_rows, added_cond_kwargs=added_rows).sample
    with torch.no_grad():
        # The reference runs its bf16 copy without autocast.
        ref_pred = reference_prediction(
            models.reference_unet, noisy, timesteps, hidden_rows, added_rows
        )
    loss, _ = reference_trainer_dpo_loss(
        model_pred, ref_pred, noise, beta=preset.beta, mu=preset.mu
    )
    return _reference_logging_and_update(workload, loss, model_pred, ref_pred, noise)


def reference_flow_step(workload: Workload, step: int) -> tuple[str, Tensor]:
    """The reference trainer's per-step work on a flow model: online encoding, the trainer's
    flow components (``FlowMatchingFamily``: one noise and sigma per pair, ``x_t``, the velocity
    target, the transformer call), the reference's loss sequence and its seven host syncs.
    Draws in our step's order (latent sample, noise, sigmas), so the losses match."""
    models, device, preset = workload.models, workload.device, workload.preset
    generator = torch.Generator(device=device).manual_seed(step)
    pixels = workload.pixels.to(device, non_blocking=True).to(workload.encoder_dtype)
    latents = models.flow.encode_images(flow_pixels(models.flow, pixels), generator).float()
    hidden, added = models.text(workload.captions, device)
    hidden = hidden.float()
    added = {key: value.float() for key, value in added.items()} if added else None
    family = FlowMatchingFamily(models.flow, models.flow_density)
    noise, sigmas = family.sample_noise(latents, generator)
    noisy, sigma_rows, target = family.noisy_inputs(latents, noise, sigmas)
    hidden_rows = repeat_pairs(hidden)
    added_rows = {key: repeat_pairs(value) for key, value in added.items()} if added else None
    with autocast(device, preset.mixed_precision):
        model_pred = family.predict(models.unet, noisy, sigma_rows, hidden_rows, added_rows)
    with torch.no_grad(), reference_model(models) as reference:
        # A bf16 copy (or the bf16 LoRA base): the family casts the inputs to its dtype.
        ref_pred = family.predict(reference, noisy, sigma_rows, hidden_rows, added_rows)
    model_pred, ref_pred, target = family.weighted(model_pred, ref_pred, target, sigmas)
    loss, _ = reference_trainer_dpo_loss(
        model_pred, ref_pred, target, beta=preset.beta, mu=preset.mu
    )
    return _reference_logging_and_update(workload, loss, model_pred, ref_pred, target)


def _reference_logging_and_update(
    workload: Workload, loss: Tensor, model_pred: Tensor, ref_pred: Tensor, target: Tensor
) -> tuple[str, Tensor]:
    """The reference's logging (seven host syncs), backward, clip and optimizer step."""
    batch_pairs, preset = workload.batch_pairs, workload.preset
    target = target if target.shape[0] == model_pred.shape[0] else repeat_pairs(target)
    dims = tuple(range(1, model_pred.dim()))
    # The reference logs loss, model and reference MSEs, gaps, accuracy (gathered and read with
    # .item() every micro-step): seven host syncs.
    with torch.no_grad():
        errors = (model_pred.float() - target).pow(2).mean(dim=dims)
        reference_errors = (ref_pred.float() - target).pow(2).mean(dim=dims)
        for value in (
            loss,
            errors.mean(),
            reference_errors.mean(),
            errors[:batch_pairs].mean(),
            errors[batch_pairs:].mean(),
            (errors - reference_errors)[:batch_pairs].mean(),
            (errors < reference_errors).float().mean(),
        ):
            value.item()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(workload.parameters, preset.max_grad_norm)
    workload.optimizer.step()
    workload.optimizer.zero_grad(set_to_none=True)
    return "reference-sequence", loss.detach()


class _Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def measure(self, function: Callable[[], object]) -> float:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        function()
        return (time.perf_counter() - begin) * 1e3


def count_model_flops(workload: Workload) -> float:
    """FLOPs of the policy forward + backward and the reference forward, one micro-batch, with
    gradient checkpointing off while counting (its recompute is not model work)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = workload.models.unet
    checkpointing = bool(getattr(unet, "is_gradient_checkpointing", False))
    if checkpointing:
        unet.disable_gradient_checkpointing()
    counter = FlopCounterMode(display=False)
    policies = _Policies(workload.models)
    try:
        with counter:
            our_step(workload, policies, "dpo", "eager", step=0)
    finally:
        if checkpointing:
            unet.enable_gradient_checkpointing()
    return float(counter.get_total_flops())


def count_encoding_flops(workload: Workload) -> float:
    """FLOPs of encoding one micro-batch online: the VAE encoder over 2B images and the text
    encoders over B captions (what the reference and ``ours-online`` add per step)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    generator = torch.Generator(device=workload.device).manual_seed(0)
    with counter, torch.no_grad():
        condition_batch(workload.models, workload.batch, generator, workload.device)
    return float(counter.get_total_flops())


def matmul_flops_per_s(device: torch.device) -> float:
    """The dense matmul rate this device reaches: bf16 8192^3 on a GPU, fp32 512^3 on a CPU."""
    size, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    left = torch.randn(size, size, device=device, dtype=dtype)
    right = torch.randn(size, size, device=device, dtype=dtype)
    timer = _Timer(device)
    for _ in range(3):
        left @ right
    samples = [timer.measure(lambda: left @ right) for _ in range(10)]
    return 2 * size**3 / (statistics.median(samples) * 1e-3)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_read(device: torch.device) -> float | None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def versions() -> dict:
    info = {"torch": torch.__version__}
    for package in ("triton", "diffusers"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    return info


def default_variants(device: torch.device) -> list[str]:
    """The variants a run without ``--variants`` times: all of them on a GPU, eager on a CPU."""
    return list(VARIANTS) if device.type == "cuda" else ["eager"]


def plan_modes(
    variants: list[str], device: torch.device, unavailable: dict[str, str] | None = None
) -> tuple[list[tuple[str, str]], dict]:
    """(the (mode, variant) schedule, {mode: why it does not run here}); ``unavailable``: the
    variants of the list that this model cannot run, with the reason (not scheduled)."""
    unavailable = unavailable or {}
    not_run: dict[str, str] = {}
    trio = list(MODES)
    if not fused_available(device):
        trio.remove("sdpo-fused")
        not_run["sdpo-fused"] = "the fused Triton kernels need a GPU with Triton; not timed here"
    ours = "sdpo-fused" if "sdpo-fused" in trio else "sdpo-torch"
    schedule = [(REFERENCE_MODE, "eager"), (ONLINE_MODE, "eager")]
    for variant in variants:
        modes = [ours] if variant in LADDER_ONLY_VARIANTS else trio
        if variant in unavailable:
            not_run.update({f"{mode}/{variant}": unavailable[variant] for mode in modes})
            continue
        schedule += [(mode, variant) for mode in modes]
    return schedule, not_run


def attribution_ladder(modes: dict[str, dict], ours: str) -> list[dict]:
    """The rungs from the reference's work to our fastest step, each with its factor (the
    step time of the rung it is compared with over its own: > 1 is faster) and its factor
    against the reference. Rungs whose mode did not run are left out."""
    reference_ms = modes[f"{REFERENCE_MODE}/eager"]["step_ms"]
    chain = [
        ("reference: online encoding, eager, host syncs", f"{REFERENCE_MODE}/eager"),
        ("ours, online encoding, eager", f"{ONLINE_MODE}/eager"),
        ("ours, cached, eager", f"{ours}/eager"),
        ("ours, cached, compiled", f"{ours}/compile"),
        ("ours, cached, CUDA graphs", f"{ours}/cuda-graphs"),
    ]
    rows, previous = [], None
    for rung, key in chain:
        if key not in modes:
            continue
        step_ms = modes[key]["step_ms"]
        rows.append(
            {
                "rung": rung,
                "mode": key,
                "step_ms": step_ms,
                "compared_with": previous,
                "factor": modes[previous]["step_ms"] / step_ms if previous else None,
                "factor_vs_reference": reference_ms / step_ms,
            }
        )
        previous = key
    base = f"{ours}/eager"
    for variant in LADDER_ONLY_VARIANTS:
        key = f"{ours}/{variant}"
        if key in modes and base in modes:
            step_ms = modes[key]["step_ms"]
            rows.append(
                {
                    "rung": f"ours, cached, eager, {variant} (alternative)",
                    "mode": key,
                    "step_ms": step_ms,
                    "compared_with": base,
                    "factor": modes[base]["step_ms"] / step_ms,
                    "factor_vs_reference": reference_ms / step_ms,
                }
            )
    return rows


def unavailable_variants(preset: TrainConfig) -> dict[str, str]:
    """{variant: why it is not timed} for the variants this preset's model or this install
    cannot run: channels-last for a flow model (as the trainer refuses --channels-last: a UNet
    convolution layout), xformers without the package."""
    unavailable = {}
    channels_last_reason = channels_last_refusal(preset.model)
    if channels_last_reason is not None:
        unavailable["channels-last"] = f"channels-last is {channels_last_reason}; not timed"
    if importlib.util.find_spec("xformers") is None:
        unavailable["xformers"] = XFORMERS_MISSING
    return unavailable


def run_overhead(
    preset_name: str,
    *,
    device: torch.device,
    variants: list[str] | None,
    rounds: int,
    steps_per_round: int,
    warmup_steps: int,
    batch_pairs: int | None = None,
    log: Callable[[str], None] = print,
    on_round: Callable[[dict], None] | None = None,
) -> dict:
    """Measures every mode (see the module docstring); returns the ``overhead`` JSON object.
    ``variants`` None: :func:`default_variants`, less those the preset's model cannot run (listed
    under ``not_run`` with the reason); a variant named explicitly that it cannot run is refused.
    ``on_round``: called with the object as it stands after every round (``complete`` False
    until the last), so a run killed part-way keeps the rounds it finished."""
    if preset_name not in PRESETS:
        raise ValueError(f"preset: unknown {preset_name!r}; expected one of {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    unavailable = unavailable_variants(preset)
    channels_last_reason = channels_last_refusal(preset.model)
    if variants is None:
        variants = default_variants(device)
    elif "channels-last" in variants and channels_last_reason is not None:
        raise ValueError(
            f"variants: channels-last is {channels_last_reason}; drop it for --preset {preset_name}"
        )
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise ValueError(
            f"variants: unknown {', '.join(unknown) or '(none given)'}; "
            f"expected some of {', '.join(VARIANTS)}"
        )
    if device.type != "cuda":
        gpu_only = [variant for variant in variants if variant in GPU_ONLY_VARIANTS]
        if gpu_only:
            raise ValueError(
                f"variants: {', '.join(gpu_only)} needs a CUDA device; drop it on this machine"
            )
    # Types too: a float or a bool would run (range(2.0) fails late, True counts as 1).
    counts = (("rounds", rounds, 1), ("steps", steps_per_round, 1), ("warmup", warmup_steps, 0))
    if batch_pairs is not None:
        counts += (("batch_pairs", batch_pairs, 1),)
    for name, value, least in counts:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: expected an integer >= {least}, got {value!r}")
        if value < least:
            raise ValueError(f"{name}: expected >= {least}, got {value}")
    if device.type != "cuda" and preset_name in CPU_SMOKE_PRESETS_OF:
        # SD3.5 Medium with T5-XXL is 7.8B parameters; full fine-tuning state on top: > 60 GB.
        raise ValueError(
            f"preset: {preset_name} builds the released {random_flow_architecture(preset)} "
            f"pipeline (billions of parameters with its text encoders) and needs a CUDA device; "
            f"on this machine use --preset {CPU_SMOKE_PRESETS_OF[preset_name]}"
        )
    batch_pairs = preset.train_batch_pairs if batch_pairs is None else batch_pairs
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log(f"building {preset_name} models (random weights) on {device}")
    workload = Workload(preset, batch_pairs, device)
    policies = _Policies(workload.models)
    timer = _Timer(device)
    schedule, not_run = plan_modes(variants, device, unavailable)
    results = {key: ModeResult() for key in schedule}
    counter = {"step": 0}

    def run_one(key: tuple[str, str]) -> tuple[str, Tensor]:
        counter["step"] += 1
        mode, variant = key
        if mode == REFERENCE_MODE:
            return reference_step(workload, counter["step"])
        return our_step(workload, policies, mode, variant, counter["step"])

    # Counted before the rounds (one untimed eager step) so each round's results are complete.
    model_flops = count_model_flops(workload)
    encoding_flops = count_encoding_flops(workload)
    matmul_flops = matmul_flops_per_s(device)
    peak_flops = dense_bf16_peak(device_name(device)) if device.type == "cuda" else None
    mfu_unavailable = mfu_unavailable_reason(device_name(device), device.type == "cuda")

    def _document(rounds_completed: int) -> dict:
        modes = {}

        for (mode, variant), result in results.items():
            encodes = mode in (REFERENCE_MODE, ONLINE_MODE)
            flops = model_flops + (encoding_flops if encodes else 0.0)
            modes[f"{mode}/{variant}"] = result.summary(
                batch_pairs, flops, peak_flops, matmul_flops
            )
        ours = "sdpo-fused" if "sdpo-fused" not in not_run else "sdpo-torch"
        ladder = attribution_ladder(modes, ours)
        meaningful = device.type == "cuda"
        headline = None
        if meaningful:
            # Our most optimised variant that ran for all three of the safeguard comparison.
            headline = next(
                (
                    variant
                    for variant in reversed(("eager", "compile", "cuda-graphs"))
                    if variant in variants
                    and all(f"{mode}/{variant}" in modes for mode in ("dpo", ours, "sdpo-torch"))
                ),
                None,
            )
        document = {
            "preset": preset_name,
            "batch_pairs": batch_pairs,
            "resolution": preset.resolution,
            "headline_variant": headline,
            "ours": ours,
            "dpo_step_ms": None,
            "sdpo_step_ms": None,
            "sdpo_over_dpo_step_ratio": None,
            "sdpo_torch_over_dpo_step_ratio": None,
            "reference_step_ms": modes[f"{REFERENCE_MODE}/eager"]["step_ms"],
            "speedup_vs_reference": None,
            "sdpo_over_dpo_interval": None,
            "sdpo_over_dpo_verdict": None,
            "sdpo_over_dpo_target": SDPO_OVER_DPO_TARGET,
            "peak_mem_gb": {key: mode["peak_mem_gb"] for key, mode in modes.items()},
            "mfu": {key: mode["mfu"] for key, mode in modes.items()},
            "flops_per_step": model_flops,
            "encoding_flops_per_step": encoding_flops,
            "matmul_flops_per_s": matmul_flops,
            "dense_bf16_peak_flops": peak_flops,
            "mfu_unavailable": mfu_unavailable,
            "rounds": rounds,
            "rounds_completed": rounds_completed,
            "complete": rounds_completed == rounds,
            "steps_per_round": steps_per_round,
            "modes": modes,
            "ladder": ladder,
            "not_run": not_run,
        }
        if headline is not None:
            dpo, sdpo = modes[f"dpo/{headline}"], modes[f"{ours}/{headline}"]
            document.update(
                dpo_step_ms=dpo["step_ms"],
                sdpo_step_ms=sdpo["step_ms"],
                sdpo_over_dpo_step_ratio=sdpo["step_ms"] / dpo["step_ms"],
                sdpo_torch_over_dpo_step_ratio=modes[f"sdpo-torch/{headline}"]["step_ms"]
                / dpo["step_ms"],
                speedup_vs_reference=document["reference_step_ms"] / sdpo["step_ms"],
            )
            interval = ratio_interval(
                results[(ours, headline)].block_ms, results[("dpo", headline)].block_ms
            )
            document.update(
                sdpo_over_dpo_interval=interval, sdpo_over_dpo_verdict=ratio_verdict(interval)
            )
        return document

    for key in list(schedule):  # warm-up (and compilation) outside the timed rounds
        log(f"warm-up {key[0]}/{key[1]}")
        try:
            with variant_context(workload, key[1]):
                for _ in range(warmup_steps):
                    results[key].backend = run_one(key)[0]
        except RuntimeError as error:
            if key[1] == "eager":
                raise  # our plain step failing is a bug, not a missing kernel
            # A pinned kernel or a compile this GPU / build lacks: recorded, the rest runs.
            reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            not_run[f"{key[0]}/{key[1]}"] = reason[:300]
            schedule.remove(key)
            del results[key]
            log(f"not run {key[0]}/{key[1]}: {reason[:200]}")
    for round_index in range(rounds):
        # ABBA: the order reverses every round, so a drift over the run (clocks, temperature,
        # the allocator) weighs on every mode alike instead of on whichever runs last.
        order = schedule if round_index % 2 == 0 else schedule[::-1]
        for key in order:
            with variant_context(workload, key[1]):
                # Each block's first step is dropped (run untimed): the switch from the previous
                # mode leaves other kernels' caches and allocations, and a compiled mode whose
                # weights moved (channels-last converts them there and back) re-records here.
                run_one(key)
                _peak_reset(device)
                samples = [
                    timer.measure(lambda key=key: run_one(key)) for _ in range(steps_per_round)
                ]
                peak = _peak_read(device)
            results[key].samples_ms.extend(samples)
            results[key].block_ms.append(statistics.median(samples))
            if peak is not None:
                results[key].peak_mem_gb = max(results[key].peak_mem_gb or 0.0, peak)
        log(f"round {round_index + 1}/{rounds} done")
        if on_round is not None and round_index + 1 < rounds:
            on_round(_document(round_index + 1))
    if not bool(workload.all_finite):
        raise RuntimeError("overhead: one of our timed steps had a non-finite loss or gradient")
    return _document(rounds)


def measure_kernels(device: torch.device, log: Callable[[str], None] = print) -> list[dict]:
    """The fused loss forward + backward at the kernel benchmarks' sizes (bf16), as the
    ``kernels`` rows of the results file. Empty on a CPU, where no timing is claimed."""
    if device.type != "cuda" or not ops.triton_available(device):
        return []
    from sdpo.profiling import kernel_bench

    copy_gbps = kernel_bench.copy_bandwidth_gbps(device)
    rows = []
    for size, (batch_pairs, sample_shape) in kernel_bench.SIZES.items():
        names = ["fused", "torch-eager", "reference"]
        if cuda_backend.cuda_available(device):
            names.insert(1, "cuda")
        for name in names:
            case = kernel_bench.prepare_case(
                name, batch_pairs, sample_shape, torch.bfloat16, device
            )
            ms = kernel_bench.time_cuda(case.step, 10, 20)
            gbps = case.bytes_moved / (ms * 1e-3) / 1e9
            rows.append(
                {
                    "name": f"{name}-{size}",
                    "shape": [2 * batch_pairs, *sample_shape],
                    "dtype": "bf16",
                    "ms": ms,
                    "gbps": gbps,
                    "pct_of_copy_bandwidth": 100 * gbps / copy_gbps,
                }
            )
            log(f"kernel {name}-{size}: {ms:.4f} ms, {gbps:.0f} GB/s")
    return rows


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def results_document(overhead: dict, kernels: list[dict], device: torch.device) -> dict:
    """The results file: the schema in the profiling issue, plus versions and a CPU caveat."""
    info = versions()
    document = {
        "device": device_name(device),
        "date": datetime.date.today().isoformat(),
        "torch": info["torch"],
        "triton": info["triton"],
        "diffusers": info["diffusers"],
        "timings_meaningful": device.type == "cuda",
        "overhead": overhead,
        "kernels": kernels,
    }
    if device.type != "cuda":
        document["note"] = (
            "CPU smoke run: checks the suite runs; its timings claim nothing (no headline, "
            "no ladder factors)."
        )
    return document


def _format(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def markdown_report(document: dict) -> str:
    overhead = document["overhead"]
    meaningful = document["timings_meaningful"]
    lines = [
        f"# Overhead: preset {overhead['preset']}, {overhead['batch_pairs']} pairs, "
        f"{overhead['resolution']} px",
        "",
        f"{document['device']}, torch {document['torch']}, triton {document['triton']}, "
        f"{document['date']}. Median, interquartile range and count of the step times over "
        f"{overhead['rounds']} interleaved rounds (order reversed every round) of "
        f"{overhead['steps_per_round']} steps, each block's first step dropped.",
        "",
    ]
    if not overhead.get("complete", True):
        lines += [
            f"**Partial: {overhead['rounds_completed']} of {overhead['rounds']} rounds** (the "
            "run ended before the rest; written after every round).",
            "",
        ]
    if not meaningful:
        # Said first, and no headline figure follows: CPU timings only show the suite runs.
        lines += [document["note"], ""]
    elif overhead["headline_variant"] is not None:
        interval = overhead.get("sdpo_over_dpo_interval")
        span = (
            f", {interval['confidence']:.0%} interval [{interval['low']:.4f}, "
            f"{interval['high']:.4f}] over {interval['rounds']} rounds ({interval['method']})"
            if interval
            else ""
        )
        lines += [
            f"- safeguard overhead ({overhead['ours']} / dpo, {overhead['headline_variant']}): "
            f"{overhead['sdpo_over_dpo_step_ratio']:.4f} (median ratio){span}",
            f"- verdict against <= {overhead.get('sdpo_over_dpo_target', SDPO_OVER_DPO_TARGET):g}"
            f": {overhead.get('sdpo_over_dpo_verdict')}",
            f"- speed-up against the reference's per-step work: "
            f"{overhead['speedup_vs_reference']:.2f}x",
            "",
        ]
    lines += [
        "| mode | step ms | IQR ms | n | pairs/s | peak GiB | MFU (peak) | MFU (matmul) | "
        "loss backend |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, mode in overhead["modes"].items():
        lines.append(
            f"| {name} | {mode['step_ms']:.2f} | {mode['iqr_ms']:.2f} | {mode['n']} | "
            f"{mode['pairs_per_s']:.2f} | {_format(mode['peak_mem_gb'], '{:.2f}')} | "
            f"{_format(mode['mfu'] and 100 * mode['mfu'], '{:.1f}%')} | "
            f"{100 * mode['mfu_vs_matmul']:.1f}% | {mode['backend']} |"
        )
    if meaningful and overhead["ladder"]:
        lines += ["", "| rung | mode | step ms | factor | vs reference |", "|---|---|---|---|---|"]
        for row in overhead["ladder"]:
            lines.append(
                f"| {row['rung']} | {row['mode']} | {row['step_ms']:.2f} | "
                f"{_format(row['factor'], '{:.2f}x')} | {row['factor_vs_reference']:.2f}x |"
            )
    if meaningful and overhead.get("mfu_unavailable"):
        lines.append(f"- MFU (peak) unavailable: {overhead['mfu_unavailable']}")
    for name, reason in overhead["not_run"].items():
        lines.append(f"- not run: {name}: {reason}")
    if document["kernels"]:
        lines += ["", "| kernel case | shape | ms | GB/s | % copy bw |", "|---|---|---|---|---|"]
        for row in document["kernels"]:
            lines.append(
                f"| {row['name']} | {'x'.join(map(str, row['shape']))} | {row['ms']:.4f} | "
                f"{row['gbps']:.0f} | {row['pct_of_copy_bandwidth']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def write_results(document: dict, path: Path) -> tuple[Path, Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    markdown = path.with_suffix(".md")
    markdown.write_text(markdown_report(document))
    return path, markdown
