"""``sdpo-profile overhead``: what the safeguard costs, and our step against the reference's work.

In ONE process, on random-initialised models of the real architecture (``--preset sd15|sdxl``;
``tiny`` for a CPU smoke run), interleaved rounds time full optimizer steps (one micro-batch of
B pairs: conditioning, the policy forward over 2B rows, the reference forward, the loss,
backward, grad-norm clip, optimizer step) of:

- ``dpo``: plain Diffusion-DPO (``mu`` off), our step: cached latents and text embeddings,
  through the trainer's own components (``sdpo.train.step``, ``optim``, ``models``) and with
  the trainer's preset for the model (beta, mu, granularity ``group:8``, optimizer);
- ``sdpo-fused``: the same with the safeguard on the fused kernels (``backend="triton"``);
- ``sdpo-torch``: the same with the plain-PyTorch backend;
- ``reference``: the reference trainer's per-step work: the VAE and text encoders run on every
  step, lambda from a separate ``torch.autograd.grad`` pass, seven ``.item()`` host syncs for
  logging, eager (no compile, no CUDA graphs).

Our three modes run in each requested variant: ``eager``, ``compile`` (torch.compile of both
UNets) and ``cuda-graphs`` (torch.compile "reduce-overhead"). All modes share one policy UNet,
one frozen bf16 reference copy and one optimizer (the weights drift a little between steps, which
does not change the work). A mode's peak memory is measured in its own block with only what it
needs on the device: the VAE and text encoders are moved there for ``reference`` only.

Model FLOPs are counted once (torch.utils.flop_counter: policy forward + backward + reference
forward; the reference mode's encoding is extra work, not counted) and divided by the step time
and the bf16 matmul rate measured in the same run: model FLOP utilisation.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
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
from sdpo.train.config import TrainConfig, config_from_args
from sdpo.train.models import Models, build_models, compile_model
from sdpo.train.nvtx_ranges import PhaseRanges
from sdpo.train.optim import make_lr_schedule, make_optimizer, scaled_learning_rate
from sdpo.train.step import (
    apply_optimizer_step,
    autocast,
    clip_and_check_gradients,
    condition_batch,
    encode_images,
    preference_step,
    reference_prediction,
)

MODES = ("dpo", "sdpo-fused", "sdpo-torch")
VARIANTS = ("eager", "compile", "cuda-graphs")
REFERENCE_MODE = "reference"


def trainer_preset(name: str, *flags: str) -> TrainConfig:
    """The trainer's preset ``name`` (validated as ``sdpo-train --preset name`` would be)."""
    return config_from_args(["--preset", name, *flags])


# Each overhead preset is the trainer's preset for that model (sdpo.train.config: beta, mu,
# granularity "group:8", 8 pairs per micro-batch, AdamW for SD1.5, Adafactor + gradient
# checkpointing for SDXL), on random weights of the real architecture.
PRESETS: dict[str, TrainConfig] = {
    "tiny": trainer_preset("tiny"),
    "sd15": trainer_preset("sd15-dpo", "--pretrained", "random"),
    "sdxl": trainer_preset("sdxl-dpo", "--pretrained", "random"),
}


@dataclass
class ModeResult:
    samples_ms: list[float] = field(default_factory=list)
    peak_mem_gb: float | None = None
    backend: str = ""

    def summary(self, batch_pairs: int, flops_per_step: float | None, peak_flops: float | None):
        step_ms = statistics.median(self.samples_ms)
        mfu = None
        if flops_per_step and peak_flops:
            mfu = flops_per_step / (step_ms * 1e-3) / peak_flops
        return {
            "step_ms": step_ms,
            "pairs_per_s": batch_pairs / (step_ms * 1e-3),
            "peak_mem_gb": self.peak_mem_gb,
            "mfu": mfu,
            "backend": self.backend,
            "steps_timed": len(self.samples_ms),
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
            distribution = models.vae.encode(self.pixels.to(device, self.encoder_dtype)).latent_dist
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
        self.encoders_on_device = True

    def place_encoders(self, on_device: bool) -> None:
        """The VAE and text encoders on the device (reference mode) or on the host (ours)."""
        if on_device == self.encoders_on_device:
            return
        target = self.device if on_device else torch.device("cpu")
        self.models.vae.to(target)
        self.models.text.to(target)
        self.encoders_on_device = on_device


def _host(tensor: Tensor, pin: bool) -> Tensor:
    tensor = tensor.detach().cpu()
    return tensor.pin_memory() if pin else tensor


class _Policies:
    """Compiled wrappers of the shared UNets, made once per variant (as the trainer compiles)."""

    def __init__(self, models: Models) -> None:
        self.models = models
        self.cache: dict[str, tuple[nn.Module, nn.Module]] = {}

    def get(self, variant: str) -> tuple[nn.Module, nn.Module]:
        if variant not in self.cache:
            if variant == "eager":
                pair = (self.models.unet, self.models.reference_unet)
            else:
                cuda_graphs = variant == "cuda-graphs"
                pair = (
                    compile_model(self.models.unet, cuda_graphs),
                    compile_model(self.models.reference_unet, cuda_graphs),
                )
            self.cache[variant] = pair
        return self.cache[variant]


def our_step(
    workload: Workload, policies: _Policies, mode: str, variant: str, step: int
) -> tuple[str, Tensor]:
    """One optimizer step of our trainer from the cache, with its components: the preference
    step, the gradient clip and finite check, the optimizer and LR schedule step. Returns
    (loss backend used, loss).

    Draws its random numbers in the order the reference step does (latent sample noise, then the
    pairs' noise, then their timesteps), so both compute the same loss for the same ``step``."""
    models, device = workload.models, workload.device
    mu = None if mode == "dpo" else workload.preset.mu
    requested = "torch" if mode == "sdpo-torch" else "auto"
    if mode == "sdpo-fused" and ops.triton_available(device):
        requested = "triton"
    config = dataclasses.replace(workload.preset, mu=mu, loss_backend=requested)
    policy, reference_unet = policies.get(variant)
    if variant == "cuda-graphs":
        torch.compiler.cudagraph_mark_step_begin()
    generator = torch.Generator(device=device).manual_seed(step)
    latents, hidden, added = condition_batch(models, workload.cached, generator, device)
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
    if not finite:
        raise RuntimeError(f"overhead: step {step} ({mode}/{variant}) has a non-finite loss")
    apply_optimizer_step(workload.optimizer, workload.lr_schedule)
    return objectives.resolve_backend(requested, device), result.loss.detach()


_NO_RANGES = PhaseRanges(enabled=False)  # free no-op ranges: timing runs without NVTX


def reference_step(workload: Workload, step: int) -> tuple[str, Tensor]:
    """One optimizer step of the reference trainer's work (see the module docstring)."""
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
    # The reference logs loss, model and reference MSEs, gaps, accuracy (gathered and read with
    # .item() every micro-step): seven host syncs.
    with torch.no_grad():
        errors = (model_pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
        reference_errors = (ref_pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
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
    """FLOPs of the policy forward + backward and the reference forward, one micro-batch."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    policies = _Policies(workload.models)
    with counter:
        our_step(workload, policies, "dpo", "eager", step=0)
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


def run_overhead(
    preset_name: str,
    *,
    device: torch.device,
    variants: list[str],
    rounds: int,
    steps_per_round: int,
    warmup_steps: int,
    batch_pairs: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Measures every mode (see the module docstring); returns the ``overhead`` JSON object."""
    if preset_name not in PRESETS:
        raise ValueError(f"preset: unknown {preset_name!r}; expected one of {', '.join(PRESETS)}")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise ValueError(
            f"variants: unknown {', '.join(unknown) or '(none given)'}; "
            f"expected some of {', '.join(VARIANTS)}"
        )
    if device.type != "cuda" and "cuda-graphs" in variants:
        raise ValueError("variants: cuda-graphs needs a CUDA device; drop it on this machine")
    for name, value in (("rounds", rounds), ("steps", steps_per_round)):
        if value < 1:
            raise ValueError(f"{name}: expected >= 1, got {value}")
    preset = PRESETS[preset_name]
    batch_pairs = batch_pairs or preset.train_batch_pairs
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log(f"building {preset_name} models (random weights) on {device}")
    workload = Workload(preset, batch_pairs, device)
    policies = _Policies(workload.models)
    timer = _Timer(device)
    schedule = [(mode, variant) for variant in variants for mode in MODES]
    schedule.append((REFERENCE_MODE, "eager"))
    results = {key: ModeResult() for key in schedule}
    counter = {"step": 0}

    def run_one(key: tuple[str, str]) -> tuple[str, Tensor]:
        counter["step"] += 1
        mode, variant = key
        if mode == REFERENCE_MODE:
            return reference_step(workload, counter["step"])
        return our_step(workload, policies, mode, variant, counter["step"])

    for key in schedule:  # warm-up (and compilation) outside the timed rounds
        workload.place_encoders(key[0] == REFERENCE_MODE)
        log(f"warm-up {key[0]}/{key[1]}")
        for _ in range(warmup_steps):
            results[key].backend = run_one(key)[0]
    for round_index in range(rounds):
        for key in schedule:
            workload.place_encoders(key[0] == REFERENCE_MODE)
            _peak_reset(device)
            samples = [timer.measure(lambda key=key: run_one(key)) for _ in range(steps_per_round)]
            results[key].samples_ms.extend(samples)
            peak = _peak_read(device)
            if peak is not None:
                results[key].peak_mem_gb = max(results[key].peak_mem_gb or 0.0, peak)
        log(f"round {round_index + 1}/{rounds} done")
    workload.place_encoders(False)
    flops_per_step = count_model_flops(workload)
    peak_flops = matmul_flops_per_s(device)

    modes = {
        f"{mode}/{variant}": result.summary(batch_pairs, flops_per_step, peak_flops)
        for (mode, variant), result in results.items()
    }
    # The headline: our most optimised requested variant against the reference's work.
    headline = next(variant for variant in reversed(VARIANTS) if variant in variants)
    dpo = modes[f"dpo/{headline}"]
    sdpo_fused = modes[f"sdpo-fused/{headline}"]
    reference = modes[f"{REFERENCE_MODE}/eager"]
    return {
        "preset": preset_name,
        "batch_pairs": batch_pairs,
        "resolution": preset.resolution,
        "headline_variant": headline,
        "dpo_step_ms": dpo["step_ms"],
        "sdpo_step_ms": sdpo_fused["step_ms"],
        "sdpo_over_dpo_step_ratio": sdpo_fused["step_ms"] / dpo["step_ms"],
        "sdpo_torch_over_dpo_step_ratio": modes[f"sdpo-torch/{headline}"]["step_ms"]
        / dpo["step_ms"],
        "reference_step_ms": reference["step_ms"],
        "speedup_vs_reference": reference["step_ms"] / sdpo_fused["step_ms"],
        "peak_mem_gb": {name: mode["peak_mem_gb"] for name, mode in modes.items()},
        "mfu": {name: mode["mfu"] for name, mode in modes.items()},
        "flops_per_step": flops_per_step,
        "matmul_flops_per_s": peak_flops,
        "rounds": rounds,
        "steps_per_round": steps_per_round,
        "modes": modes,
    }


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
        document["note"] = "CPU smoke run: checks the suite runs; its timings claim nothing."
    return document


def markdown_report(document: dict) -> str:
    overhead = document["overhead"]
    lines = [
        f"# Overhead: preset {overhead['preset']}, {overhead['batch_pairs']} pairs, "
        f"{overhead['resolution']} px",
        "",
        f"{document['device']}, torch {document['torch']}, triton {document['triton']}, "
        f"{document['date']}. Median over {overhead['rounds']} interleaved rounds of "
        f"{overhead['steps_per_round']} steps.",
        "",
        f"- safeguard overhead (sdpo-fused / dpo, {overhead['headline_variant']}): "
        f"{overhead['sdpo_over_dpo_step_ratio']:.4f}",
        f"- speed-up against the reference's per-step work: "
        f"{overhead['speedup_vs_reference']:.2f}x",
        "",
        "| mode | step ms | pairs/s | peak GiB | MFU | loss backend |",
        "|---|---|---|---|---|---|",
    ]
    for name, mode in overhead["modes"].items():
        peak = "-" if mode["peak_mem_gb"] is None else f"{mode['peak_mem_gb']:.2f}"
        mfu = "-" if mode["mfu"] is None else f"{100 * mode['mfu']:.1f}%"
        lines.append(
            f"| {name} | {mode['step_ms']:.2f} | {mode['pairs_per_s']:.2f} | {peak} | {mfu} | "
            f"{mode['backend']} |"
        )
    if document["kernels"]:
        lines += ["", "| kernel case | shape | ms | GB/s | % copy bw |", "|---|---|---|---|---|"]
        for row in document["kernels"]:
            lines.append(
                f"| {row['name']} | {'x'.join(map(str, row['shape']))} | {row['ms']:.4f} | "
                f"{row['gbps']:.0f} | {row['pct_of_copy_bandwidth']:.1f} |"
            )
    if "note" in document:
        lines += ["", document["note"]]
    return "\n".join(lines) + "\n"


def write_results(document: dict, path: Path) -> tuple[Path, Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    markdown = path.with_suffix(".md")
    markdown.write_text(markdown_report(document))
    return path, markdown
