"""``sdpo-eval generate``: images for a prompt suite from a base pipeline and a trained UNet.

Seeds are per prompt (``seed + index``), so any sharding or batch size gives the same image for
a prompt. Under torchrun each rank renders the prompts ``index % world_size == rank`` and rank 0
writes the manifest after a barrier. CFG: diffusers computes ``eps_u + s (eps_c - eps_u)``; the
reference evaluation's "7.5" is ``eps_c + 7.5 (eps_c - eps_u)`` = diffusers' 8.5
(eps_u + 8.5 (eps_c - eps_u) is the same sum), so ``--cfg-formula reference`` passes
``guidance + 1`` to diffusers. ``--preset reference-sd15 / reference-sdxl`` is the official
evaluation's whole sampler (see PRESETS).

Flow-matching models (``--model sd3`` / ``flux``): the models' own pipelines
(StableDiffusion3Pipeline, FluxPipeline) with the scheduler they ship (flow-match Euler);
``--transformer`` a trained transformer (``transformer/`` folder or ``transformer.pth`` from
sdpo-train), ``--lora`` LoRA weights (sdpo-train's ``transformer_lora/`` or any diffusers LoRA
folder) applied to the base. SD3 guidance is classifier-free guidance (diffusers' formula);
FLUX.1-dev's ``--guidance`` is its embedded guidance (default 3.5, no CFG).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sdpo.eval.errors import RunFailure
from sdpo.eval.manifest import load_entries, meta_path, save_entries

# The samplers and presets live in sdpo.eval.presets (no torch: `sdpo-eval --help` stays fast).
from sdpo.eval.presets import PRESET_FIXED, PRESETS, SCHEDULERS
from sdpo.train.config import check_output_dir, check_value
from sdpo.train.errors import UsageError


@dataclass
class GenerateSettings:
    pretrained: str
    suite: str
    output_dir: str
    unet: str | None = None
    model: str = "sd15"
    steps: int = 50
    resolution: int | None = None
    guidance: float = 7.5
    cfg_formula: str = "diffusers"
    scheduler: str = "default"
    batch_size: int = 4
    seed: int = 0
    limit: int | None = None
    dtype: str = "bf16"
    preset: str | None = None
    vae: str | None = None
    transformer: str | None = None
    lora: str | None = None


FLOW_PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
# FLUX.1-dev's embedded guidance default (diffusers' FluxPipeline and the FLUX scripts: 3.5).
FLUX_GUIDANCE = 3.5


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((line for line in lines if line.startswith("size mismatch")), None)
    return detail or (lines[0] if lines else type(error).__name__)


def _read_state_dict(path: Path, flag: str) -> dict:
    """A ``.pth`` state dict (what sdpo-train exports): garbage, empty, truncated or non-dict
    files are one line naming the file and the flag, not torch's pickle / zip errors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip, EOF and key errors all mean the same: unreadable
        raise UsageError(
            f"{flag} {path}: not a readable PyTorch state dict ({_first_line(error)})"
        ) from error
    if not isinstance(state, dict) or not state:
        raise UsageError(
            f"{flag} {path}: expected a state dict (parameter name: tensor), got "
            f"{type(state).__name__}{' (empty)' if isinstance(state, dict) else ''}"
        )
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UsageError(
                f"{flag} {path}: entry {key!r} is of type {type(value).__name__}, not a tensor; "
                "expected a state dict (parameter name: tensor)"
            )
    return state


def _check_fits(model: torch.nn.Module, state: dict, what: str) -> None:
    """``state`` has exactly ``model``'s parameter names and shapes (a state dict of another
    architecture would load partly, or as a folder replace the pipeline's model whole)."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong = [
        f"{key} {list(state[key].shape)} (the pipeline's {list(expected[key])})"
        for key in expected
        # torch loads a 1-element tensor into a 0-d parameter (older checkpoints' layout).
        if key in state
        and tuple(state[key].shape) != expected[key]
        and not (expected[key] == () and tuple(state[key].shape) == (1,))
    ]
    if missing or unexpected or wrong:
        found = {"missing": missing, "unexpected": unexpected, "shape of": wrong}
        details = [
            f"{label} {', '.join(items[:3])}{f' and {len(items) - 3} more' if len(items) > 3 else ''}"
            for label, items in found.items()
            if items
        ]
        raise UsageError(
            f"{what} does not fit the pipeline's {type(model).__name__} ({'; '.join(details)}): "
            "was it trained from this --pretrained model?"
        )


def _load_weights(model: torch.nn.Module, path: Path, flag: str) -> torch.nn.Module:
    """The model to use: ``model`` with a state dict file's weights, or a diffusers folder's
    model, refused unless it has ``model``'s architecture (names and shapes)."""
    what = f"{flag} {path}"
    if path.is_dir():
        try:
            loaded = type(model).from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UsageError(
                f"{what}: not a diffusers {type(model).__name__} folder ({_first_line(error)})"
            ) from error
        _check_fits(model, loaded.state_dict(), what)
        return loaded.to(model.device, model.dtype)
    if path.is_file():
        state = _read_state_dict(path, flag)
        _check_fits(model, state, what)
        model.load_state_dict(state)
        return model
    raise FileNotFoundError(f"{flag.removeprefix('--')}: no such file or folder {path}")


def load_transformer_into(pipeline, transformer_path: str) -> None:
    """A diffusers transformer folder or a ``transformer.pth`` state dict (sdpo-train's export)."""
    path = Path(transformer_path).expanduser()
    pipeline.transformer = _load_weights(pipeline.transformer, path, "--transformer")


def check_flow_settings(settings: GenerateSettings) -> None:
    """What the UNet-only flags mean nothing for on a flow model, refused in one line."""
    flow = settings.model in FLOW_PIPELINES
    if not flow:
        for flag, value in (("--transformer", settings.transformer), ("--lora", settings.lora)):
            if value is not None:
                raise ValueError(f"{flag}: for --model sd3 or flux; a UNet model takes --unet")
        return
    for flag, bad in (
        ("--unet", settings.unet is not None),
        ("--preset", settings.preset is not None),
        ("--vae", settings.vae is not None),
        ("--scheduler", settings.scheduler != "default"),
    ):
        if bad:
            raise ValueError(
                f"{flag}: not for --model {settings.model} (its pipeline's flow-match Euler "
                "sampler and its own VAE; a trained model goes in --transformer or --lora)"
            )
    if settings.model == "flux" and settings.cfg_formula != "diffusers":
        raise ValueError("--cfg-formula: FLUX.1's guidance is embedded, not CFG; drop it")


def apply_preset(values: dict) -> dict:
    """``values`` (GenerateSettings fields given explicitly) with ``preset``'s settings; a flag
    that the preset fixes is an error (the images would no longer be the reference's)."""
    preset = values.get("preset")
    if preset is None:
        return values
    if preset not in PRESETS:
        raise ValueError(f"--preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    fixed = PRESET_FIXED | PRESETS[preset]
    clashes = [
        "--" + key.replace("_", "-") for key in fixed if values.get(key) not in (None, fixed[key])
    ]
    if clashes:
        raise ValueError(
            f"--preset {preset} fixes {', '.join(clashes)}; drop them (or drop --preset)"
        )
    return values | fixed


def diffusers_guidance(guidance: float, cfg_formula: str) -> float:
    """The guidance_scale to give diffusers for ``guidance`` under ``cfg_formula``."""
    if cfg_formula == "diffusers":
        return guidance
    if cfg_formula == "reference":
        return guidance + 1.0
    raise ValueError(f"cfg_formula: expected 'reference' or 'diffusers', got {cfg_formula!r}")


def load_unet_into(pipeline, unet_path: str) -> None:
    """A diffusers UNet folder or a ``unet.pth`` state dict (as sdpo-train exports both)."""
    path = Path(unet_path).expanduser()
    pipeline.unet = _load_weights(pipeline.unet, path, "--unet")


def check_settings(settings: GenerateSettings) -> None:
    """Every number and name of ``settings`` (flags, or settings built in code) in range, by
    the trainer's own checks (sdpo.train.config.FIELDS' specs), before anything loads."""
    # FIELDS entries of the same type and range: max_steps is "an integer >= 1".
    for flag, value in (("--steps", settings.steps), ("--batch-size", settings.batch_size)):
        check_value("max_steps", value, flag)
    if settings.limit is not None:
        check_value("max_steps", settings.limit, "--limit")
    if settings.resolution is not None:
        check_value("resolution", settings.resolution, "--resolution")
    check_value("validation_guidance", settings.guidance, "--guidance")  # finite, >= 0
    check_value("seed", settings.seed, "--seed")
    for flag, value, choices in (
        ("--model", settings.model, ("sd15", "sdxl", *FLOW_PIPELINES)),
        ("--dtype", settings.dtype, ("bf16", "fp32")),
    ):
        if value not in choices:
            raise UsageError(f"{flag}: expected one of {', '.join(choices)}, got {value!r}")
    check_output_dir(settings.output_dir, "--output-dir")
    for flag, value in (("--unet", settings.unet), ("--transformer", settings.transformer),
                        ("--lora", settings.lora), ("--vae", settings.vae)):  # fmt: skip
        if value is not None and not Path(value).expanduser().exists():
            raise FileNotFoundError(f"{flag.removeprefix('--')}: no such file or folder {value}")
    if settings.vae is not None and not Path(settings.vae).expanduser().is_dir():
        raise UsageError(f"--vae {settings.vae}: expected a diffusers AutoencoderKL folder")


def _scheduler(pipeline, name: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {
        "ddim": DDIMScheduler,
        "euler": EulerDiscreteScheduler,
        "dpm": DPMSolverMultistepScheduler,
    }
    if name == "default":
        return pipeline.scheduler
    if name not in classes:
        raise ValueError(f"scheduler: expected one of {', '.join(SCHEDULERS)}, got {name!r}")
    return classes[name].from_config(pipeline.scheduler.config)


@torch.no_grad()
def _reference_images(pipeline, prompts, settings, guidance_scale, resolution) -> list:
    """The official evaluation's images (see PRESETS): its noise, its negative prompt, diffusers'
    denoising loop (the same Euler steps and CFG), and its fp32 decode."""
    from PIL import Image

    device = pipeline.unet.device
    size = 2 * math.ceil(resolution / 16)  # the reference's latent size: 64 at 512, 128 at 1024
    latents = torch.randn(
        (len(prompts), pipeline.unet.config.in_channels, size, size),
        device=device,
        dtype=pipeline.unet.dtype,
        generator=torch.Generator(device=device).manual_seed(settings.seed),
    )
    latents = pipeline(
        prompt=prompts,
        negative_prompt=[""] * len(prompts),
        num_inference_steps=settings.steps,
        guidance_scale=guidance_scale,
        height=resolution,
        width=resolution,
        latents=latents,
        output_type="latent",
    ).images
    vae = pipeline.vae
    latents = latents.float() / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None) is not None:
        latents = latents + vae.config.shift_factor
    decoded = vae.decode(latents.to(vae.dtype), return_dict=False)[0].float()
    pixels = (decoded / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(image) for image in (pixels * 255).round().astype("uint8")]


def check_pretrained(settings: GenerateSettings) -> Path:
    """``--pretrained`` is a local diffusers pipeline folder; its path, or a one-line error."""
    pretrained = Path(settings.pretrained).expanduser()
    layout = "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
    if not pretrained.is_dir():
        raise FileNotFoundError(
            f"--pretrained: no such folder {pretrained}; pass a local diffusers pipeline folder "
            f"{layout}, e.g. from `hf download stable-diffusion-v1-5/stable-diffusion-v1-5 "
            "--local-dir DIR`"
        )
    if not (pretrained / "model_index.json").is_file():
        raise ValueError(
            f"--pretrained {pretrained}: not a diffusers pipeline folder (no model_index.json); "
            f"expected {layout}"
        )
    return pretrained


@dataclass
class LoadedPipeline:
    """A pipeline loaded as ``settings`` say (trained weights applied, on its device), with the
    sampling settings resolved: what ``generate`` and ``sdpo-pairs`` draw images from."""

    pipeline: object
    settings: GenerateSettings
    guidance_scale: float  # what diffusers is given (see diffusers_guidance)
    resolution: int
    device: torch.device

    def images(self, prompts: list[str], seeds: list[int]) -> list:
        """One PIL image per prompt, each from its own CPU generator seeded ``seeds[i]`` (so an
        image's noise does not depend on the other prompts of the call)."""
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        return self.pipeline(
            prompt=prompts,
            num_inference_steps=self.settings.steps,
            guidance_scale=self.guidance_scale,
            height=self.resolution,
            width=self.resolution,
            generator=generators,
        ).images


def load_pipeline(settings: GenerateSettings, device: torch.device | None = None) -> LoadedPipeline:
    """The pipeline of ``settings`` (``--pretrained`` with ``--unet`` / ``--transformer`` /
    ``--lora`` / ``--vae`` applied, its scheduler, on ``device``); every flag checked first."""
    import diffusers
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    check_flow_settings(settings)  # first: a flag for the other kind of model says so
    check_settings(settings)
    flow = settings.model in FLOW_PIPELINES
    pretrained = check_pretrained(settings)
    guidance_scale = diffusers_guidance(settings.guidance, settings.cfg_formula)
    if device is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    # bf16 on CUDA; on a CPU fp32, except under a preset (the reference's bf16 noise and UNet).
    use_bf16 = settings.dtype == "bf16" and (device.type == "cuda" or settings.preset is not None)
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    if flow:
        pipeline_class = getattr(diffusers, FLOW_PIPELINES[settings.model])
    else:
        pipeline_class = (
            StableDiffusionXLPipeline if settings.model == "sdxl" else StableDiffusionPipeline
        )
    extra = {} if flow else {"safety_checker": None}
    try:
        pipeline = pipeline_class.from_pretrained(
            pretrained, dtype=dtype, local_files_only=True, **extra
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"--pretrained {pretrained}: cannot load a {pipeline_class.__name__} from it "
            f"({first}); is --model {settings.model} right?"
        ) from error
    if settings.unet:
        load_unet_into(pipeline, settings.unet)
    if settings.transformer:
        load_transformer_into(pipeline, settings.transformer)
    if settings.lora:
        lora = Path(settings.lora).expanduser()
        try:
            pipeline.load_lora_weights(str(lora))
        except RuntimeError as error:  # peft's load_state_dict: adapters of other shapes
            raise ValueError(
                f"--lora {lora} does not fit the pipeline's transformer ({_first_line(error)}): "
                f"was it trained from this --pretrained model (--model {settings.model})?"
            ) from error
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UsageError(
                f"--lora {lora}: not LoRA weights diffusers can read ({_first_line(error)})"
            ) from error
    if settings.vae:
        from diffusers import AutoencoderKL

        try:
            pipeline.vae = AutoencoderKL.from_pretrained(
                Path(settings.vae).expanduser(), local_files_only=True
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UsageError(
                f"--vae {settings.vae}: not a diffusers AutoencoderKL folder ({_first_line(error)})"
            ) from error
    pipeline.scheduler = _scheduler(pipeline, settings.scheduler)
    pipeline.to(device)
    if settings.preset:
        pipeline.vae.to(torch.float32)  # the reference decodes in fp32
    pipeline.set_progress_bar_config(disable=True)
    if flow:
        resolution = settings.resolution or pipeline.default_sample_size * pipeline.vae_scale_factor
        if settings.model == "flux" and settings.guidance == GenerateSettings.guidance:
            guidance_scale = FLUX_GUIDANCE  # the 7.5 CFG default means nothing for FLUX
    else:
        resolution = (
            settings.resolution or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
        )
    return LoadedPipeline(pipeline, settings, guidance_scale, resolution, device)


def generate(settings: GenerateSettings, device: torch.device | None = None) -> Path:
    check_flow_settings(settings)  # first: a flag for the other kind of model says so
    check_settings(settings)
    check_pretrained(settings)
    entries = load_entries(settings.suite, "--suite")
    if settings.limit is not None:
        entries = entries[: settings.limit]
    loaded = load_pipeline(settings, device)
    device = loaded.device
    pipeline, guidance_scale, resolution = loaded.pipeline, loaded.guidance_scale, loaded.resolution
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))

    # Absolute image paths: `score` may run from another directory.
    output = Path(settings.output_dir).expanduser().resolve()
    images_dir = output / "images"
    try:
        _render(loaded, entries, images_dir)
    except OSError as error:
        raise RunFailure(
            f"generate: writing the images into {images_dir} failed ({error})"
        ) from error
    except torch.OutOfMemoryError as error:
        raise RunFailure(
            f"generate: out of memory on {device} ({_first_line(error)}); try a smaller "
            "--batch-size"
        ) from error
    manifest = output / "manifest.json"
    if rank == 0:
        written = [
            {**entry, "gen_image_path": str(images_dir / f"{index:05d}.png")}
            for index, entry in enumerate(entries)
        ]
        save_entries(manifest, written)
        meta = asdict(settings) | {
            "diffusers_guidance_scale": guidance_scale,
            "resolution": resolution,
            "scheduler_class": type(pipeline.scheduler).__name__,
            "world_size": world_size,
        }
        try:
            meta_path(manifest).write_text(json.dumps(meta, indent=2) + "\n")
        except OSError as error:
            raise RunFailure(f"generate: writing {meta_path(manifest)} failed ({error})") from error
    return manifest


def _render(loaded: LoadedPipeline, entries: list[dict], images_dir: Path) -> None:
    """This rank's images, then (torchrun) a barrier so rank 0 writes the manifest last."""
    settings = loaded.settings
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    images_dir.mkdir(parents=True, exist_ok=True)
    mine = [index for index in range(len(entries)) if index % world_size == rank]
    print(
        f"generate: rank {rank} of {world_size}: prompts {','.join(map(str, mine))}",
        file=sys.stderr,
    )
    for start in range(0, len(mine), settings.batch_size):
        indices = mine[start : start + settings.batch_size]
        prompts = [entries[index]["prompt"] for index in indices]
        if settings.preset:
            images = _reference_images(
                loaded.pipeline, prompts, settings, loaded.guidance_scale, loaded.resolution
            )
        else:
            images = loaded.images(prompts, [settings.seed + index for index in indices])
        for index, image in zip(indices, images, strict=True):
            image.save(images_dir / f"{index:05d}.png")
    if world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if loaded.device.type == "cuda" else "gloo")
        dist.barrier()
