"""Models: the tiny preset's random-initialised models, and diffusers folders from local disk.

Weights are only read from local paths or the local Hugging Face cache; nothing is downloaded
unless ``allow_download`` is set.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from sdpo.train import toy
from sdpo.train.config import (
    FLOW_MODELS,
    TrainConfig,
    is_random,
    random_flow_architecture,
    resolve_random_architecture,
)
from sdpo.train.data import host_to_device
from sdpo.train.outputs import replacing, writing

# The tiny preset's vocabulary: the toy world's caption words plus the empty caption.
TINY_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
TINY_MAX_LENGTH = 12
TINY_HIDDEN = 32


def tiny_vocabulary() -> list[str]:
    words = {word for spec in toy.all_specs() for word in spec.caption.split()}
    return TINY_SPECIAL_TOKENS + sorted(words)


def build_tiny_tokenizer():
    """A word-level tokenizer built in code (no download), usable as a transformers tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocabulary = {word: index for index, word in enumerate(tiny_vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        model_max_length=TINY_MAX_LENGTH,
    )


def build_tiny_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TINY_MAX_LENGTH,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        projection_dim=TINY_HIDDEN,
    )
    return CLIPTextModel(config)


def build_tiny_unet(sample_size: int, in_channels: int):
    from diffusers import UNet2DConditionModel

    # 0.25M parameters: attention only at the lower resolution, like SD's deeper blocks.
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TINY_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_tiny_vae():
    from diffusers import AutoencoderKL

    # Downsamples by 2 (16 px images -> 8 x 8 x 4 latents), the SD1.5 path in miniature.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
    )


def build_scheduler():
    from diffusers import DDPMScheduler

    # SD1.5's training schedule.
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )


class TextConditioner(nn.Module):
    """Captions -> (encoder_hidden_states, added_cond_kwargs) for the UNet, frozen.

    SD1.5 (and tiny): the CLIP text encoder's last hidden state. SDXL: the penultimate hidden
    states of both encoders concatenated on the feature axis, the second encoder's pooled output
    as ``text_embeds``, and ``time_ids = [res, res, 0, 0, res, res]``.
    """

    def __init__(
        self, tokenizers: list, encoders: list[nn.Module], sdxl: bool, resolution: int
    ) -> None:
        super().__init__()
        self.tokenizers = tokenizers
        self.encoders = nn.ModuleList(encoders)
        self.sdxl = sdxl
        self.resolution = resolution
        self._time_ids: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def forward(
        self, captions: list[str], device: torch.device
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        hidden_states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders, strict=True):
            tokens = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            tokens = host_to_device(tokens, device)  # pinned: no wait for the queued GPU work
            output = encoder(tokens, output_hidden_states=self.sdxl)
            if self.sdxl:
                hidden_states.append(output.hidden_states[-2])
                if getattr(output, "text_embeds", None) is not None:  # the projection encoder
                    pooled = output.text_embeds
            else:
                hidden_states.append(output.last_hidden_state)
        return self.conditioning(torch.cat(hidden_states, dim=-1), pooled)

    def conditioning(
        self, encoder_hidden_states: Tensor, pooled: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        """(hidden states, added_cond_kwargs): SDXL adds the pooled embedding and time_ids."""
        if not self.sdxl:
            return encoder_hidden_states, None
        device = encoder_hidden_states.device
        captions = encoder_hidden_states.shape[0]
        size = self.resolution
        # Built once per device and dtype: a fresh torch.tensor(list, device=cuda) each step is a
        # blocking host->device copy.
        key = (device, encoder_hidden_states.dtype)
        if key not in self._time_ids:
            self._time_ids[key] = torch.tensor(
                [size, size, 0, 0, size, size], device=device, dtype=encoder_hidden_states.dtype
            )
        time_ids = self._time_ids[key]
        added = {"text_embeds": pooled, "time_ids": time_ids.expand(captions, 6)}
        return encoder_hidden_states, added


class FlowTextConditioner(nn.Module):
    """Captions -> (prompt_embeds, {"text_embeds": pooled} or None) through a flow family's own
    ``encode_text`` (the pipeline's ``encode_prompt``); frozen. The SDXL key ``text_embeds``
    carries the pooled projection, so the cache stores both model kinds the same way."""

    def __init__(self, flow) -> None:
        super().__init__()
        self.flow = flow
        self.encoders = nn.ModuleList(flow.text_encoders())
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def forward(
        self, captions: list[str], device: torch.device
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        if not self.encoders:
            raise RuntimeError(
                "text: the text encoders were not loaded (training from an sdpo-cache folder)"
            )
        encoded = self.flow.encode_text(list(captions), device)
        return self.conditioning(encoded["prompt_embeds"], encoded.get("pooled_projections"))

    def conditioning(
        self, prompt_embeds: Tensor, pooled: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        if "pooled_projections" not in self.flow.conditioning_keys:
            return prompt_embeds, None
        if pooled is None:
            raise ValueError(f"conditioning: {self.flow.name} needs the pooled text embedding")
        return prompt_embeds, {"text_embeds": pooled}


@dataclass
class Models:
    """``unet`` is the trained network: a UNet, or a flow family's transformer (then ``flow`` is
    the ``sdpo.train.families`` family and ``flow_density`` its sigma density)."""

    unet: nn.Module
    reference_unet: nn.Module | None  # None with LoRA: the policy with its adapters disabled
    vae: nn.Module | None  # None: pixel-space model (latents are the images)
    text: TextConditioner | FlowTextConditioner
    scheduler: object
    flow: object | None = None
    flow_density: object | None = None

    @property
    def prediction_type(self) -> str:
        if self.flow is not None:
            return "flow"
        return self.scheduler.config.prediction_type

    @property
    def export_name(self) -> str:
        """The exported folder's name: ``unet`` or, for a flow model, ``transformer``."""
        return "transformer" if self.flow is not None else "unet"


# LoRA targets: the attention projections; MMDiT (SD3, FLUX) blocks also project the text
# stream (add_q/k/v_proj, to_add_out). Names absent from a model (Wan has no to_add_out) are
# skipped by peft as long as one name matches.
UNET_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
FLOW_LORA_TARGETS = (*UNET_LORA_TARGETS, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def flow_family_class(model: str):
    from sdpo.train import families

    return {"sd3": families.SD3Family, "flux": families.FluxFamily, "wan": families.WanFamily}[
        model
    ]


def load_flow_family(
    model: str,
    pretrained: str,
    resolution: int,
    seed: int,
    allow_download: bool,
    text_encoders: bool = True,
    random_architecture: str | None = None,
    transformer: bool = True,
):
    """A flow family: ``tiny`` builds tiny random models in code; ``random[:NAME]`` builds the
    released ``random_architecture`` (default: ``config.resolve_random_architecture``) with
    random weights, on the current default device; otherwise a local diffusers folder whose
    model_index.json must name the ``model`` family. ``text_encoders=False`` (training from an
    sdpo-cache folder): the text encoders are not loaded (or built) at all, so T5-XXL never
    occupies memory. ``transformer=False`` (sdpo-cache, which runs only the VAE and the text
    encoders): the released transformer is not loaded or built (FLUX.1-dev's is 11.9B
    parameters); the tiny one is built (a few thousand parameters) and dropped."""
    from sdpo.train import families

    expected = flow_family_class(model)
    if is_random(pretrained):
        random_architecture = random_architecture or resolve_random_architecture(model, pretrained)
        spec = families.PUBLISHED_PIPELINES.get(random_architecture)
        if spec is not None and spec.family != expected.name:  # checked before billions are built
            raise ValueError(
                f"pretrained: random:{random_architecture} is a {spec.family} model, not {model}"
            )
        flow = families.build_random(
            random_architecture, resolution, seed, text_encoders, transformer
        )
    elif pretrained == "tiny":
        flow = expected.build_tiny(resolution, seed)
        if not text_encoders:
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
                if getattr(flow.pipeline, name, None) is not None:
                    setattr(flow.pipeline, name, None)
        if not transformer:
            flow.pipeline.transformer = flow.transformer = None
    else:
        flow = families.load(
            pretrained,
            resolution,
            allow_download,
            dtype=torch.float32,
            text_encoders=text_encoders,
            transformer=transformer,
        )
        if not isinstance(flow, expected):
            raise ValueError(
                f"pretrained: {pretrained!r} holds a {flow.pipeline_class_name} "
                f"({flow.name}), not {expected.pipeline_class_name}; use --model {flow.name}"
            )
    return flow


def load_flow_models(config: TrainConfig, device: torch.device | None = None) -> Models:
    """The flow family of ``--model``/``--pretrained`` with the config's sigma density; from an
    sdpo-cache folder without its text encoders. ``--pretrained random`` initialises on
    ``device`` (FLUX.1-dev's 11.9B parameters: seconds on a GPU, minutes and 48 GB on a CPU)."""
    from sdpo.train.cache import is_cache
    from sdpo.train.flow_matching import FlowDensity

    random = is_random(config.pretrained)
    place = torch.device(device) if random and device is not None else contextlib.nullcontext()
    with place:
        flow = load_flow_family(
            config.model,
            config.pretrained,
            config.resolution,
            config.seed,
            config.allow_download,
            text_encoders=not is_cache(config.data),
            random_architecture=random_flow_architecture(config) if random else None,
        )
    density = FlowDensity.from_config(config)
    if hasattr(flow, "guidance_scale"):  # FLUX: its guidance embedding's training input
        flow.guidance_scale = config.flux_guidance
    return Models(
        unet=flow.transformer,
        reference_unet=None,
        vae=flow.vae,
        text=FlowTextConditioner(flow),
        scheduler=flow.scheduler,
        flow=flow,
        flow_density=density,
    )


def _looks_like_local_path(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") > 1


def missing_weights_error(path: str, detail: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"pretrained: cannot load {path!r} ({detail}). Weights are read from local disk only: "
        "pass --pretrained with a local diffusers folder (unet/, vae/, text_encoder/, tokenizer/, "
        "scheduler/), or a model id already in the local Hugging Face cache "
        "(e.g. put there by `huggingface-cli download` on a machine with network), or add "
        "--allow-download to let the trainer download it."
    )


def load_pretrained(path: str, model: str, resolution: int, allow_download: bool) -> Models:
    """Loads a diffusers SD1.5- or SDXL-style folder (or a cached model id) without downloading."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    if _looks_like_local_path(path) and not Path(path).expanduser().is_dir():
        raise missing_weights_error(path, "no such folder")
    root = str(Path(path).expanduser()) if Path(path).expanduser().is_dir() else path
    local_only = not allow_download
    subfolders = Path(root)
    try:
        unet = UNet2DConditionModel.from_pretrained(
            root, subfolder="unet", local_files_only=local_only
        )
        scheduler = DDPMScheduler.from_pretrained(
            root, subfolder="scheduler", local_files_only=local_only
        )
        has_vae = not subfolders.is_dir() or (subfolders / "vae").is_dir()
        vae = (
            AutoencoderKL.from_pretrained(root, subfolder="vae", local_files_only=local_only)
            if has_vae
            else None
        )
        tokenizers = [
            AutoTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=local_only)
        ]
        encoders = [
            CLIPTextModel.from_pretrained(
                root, subfolder="text_encoder", local_files_only=local_only
            )
        ]
        if model == "sdxl":
            tokenizers.append(
                AutoTokenizer.from_pretrained(
                    root, subfolder="tokenizer_2", local_files_only=local_only
                )
            )
            encoders.append(
                CLIPTextModelWithProjection.from_pretrained(
                    root, subfolder="text_encoder_2", local_files_only=local_only
                )
            )
    except (OSError, ValueError) as error:
        raise missing_weights_error(path, str(error).splitlines()[0]) from error
    text = TextConditioner(tokenizers, encoders, sdxl=model == "sdxl", resolution=resolution)
    return Models(unet=unet, reference_unet=None, vae=vae, text=text, scheduler=scheduler)


def build_tiny(resolution: int, seed: int, pixel_space: bool = False) -> Models:
    """The tiny preset: every model random-initialised from ``seed``, built in code."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        tokenizer = build_tiny_tokenizer()
        encoder = build_tiny_text_encoder(len(tiny_vocabulary()))
        vae = None if pixel_space else build_tiny_vae()
        channels = 3 if pixel_space else 4
        sample_size = resolution if pixel_space else resolution // 2
        unet = build_tiny_unet(sample_size, channels)
    finally:
        torch.random.set_rng_state(generator_state)
    text = TextConditioner([tokenizer], [encoder], sdxl=False, resolution=resolution)
    return Models(unet=unet, reference_unet=None, vae=vae, text=text, scheduler=build_scheduler())


def save_tiny_pretrained(models: Models, folder: str) -> None:
    """Writes a tiny model as a diffusers-style folder that ``load_pretrained`` reads back."""
    root = Path(folder)
    models.unet.save_pretrained(root / "unet")
    models.scheduler.save_pretrained(root / "scheduler")
    if models.vae is not None:
        models.vae.save_pretrained(root / "vae")
    models.text.tokenizers[0].save_pretrained(root / "tokenizer")
    models.text.encoders[0].save_pretrained(root / "text_encoder")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))


def make_reference(unet: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A frozen copy of the policy for the reference forward (no grad, eval mode)."""
    reference = copy.deepcopy(unet)
    if next(reference.parameters()).dtype != dtype:
        reference = reference.to(dtype)
    reference.requires_grad_(False)
    reference.eval()
    return reference


def add_lora(
    unet: nn.Module, rank: int, target_modules: tuple[str, ...] = UNET_LORA_TARGETS
) -> None:
    """LoRA adapters on the attention projections (peft); the base weights are frozen."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            init_lora_weights="gaussian",
            target_modules=list(target_modules),
        )
    )


def merged_state_dict(unet: nn.Module) -> dict[str, Tensor]:
    """The UNet's weights as a plain state dict on the CPU, LoRA adapters merged in."""
    state = {name: tensor.detach().cpu().clone() for name, tensor in unet.state_dict().items()}
    if not any(".lora_" in name for name in state):
        return state
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(unet).cpu()
    for module in merged.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    plain = {}
    for name, tensor in merged.state_dict().items():
        if ".lora_" in name:
            continue
        plain[name.replace(".base_layer.", ".")] = tensor.detach().clone()
    return plain


# The real architectures with random weights, for timing and profiling without any download
# (``--pretrained random``). The configurations are those of the public SD1.5 and SDXL
# checkpoints' config.json files; the weights are noise, so the model draws nothing.
RANDOM_TEXT_LENGTH = 77


def _random_word_tokenizer(max_length: int):
    tokenizer = build_tiny_tokenizer()
    tokenizer.model_max_length = max_length
    return tokenizer


def _clip_text_config(hidden: int, layers: int, heads: int, intermediate: int, act: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=RANDOM_TEXT_LENGTH,
        hidden_act=act,
        projection_dim=hidden,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )


def _sd_vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        scaling_factor=scaling_factor,
    )


def build_random(model: str, resolution: int, seed: int) -> Models:
    """SD1.5 (860M-parameter UNet) or SDXL (2.6B) architectures, random-initialised from
    ``seed`` on the current default device (``with torch.device("cuda"):`` builds on the GPU)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if model not in ("sd15", "sdxl"):
        raise ValueError(f"pretrained: random weights exist for sd15 and sdxl, not {model!r}")
    if resolution % 8:
        raise ValueError(
            f"resolution: expected a multiple of 8 (the VAE's factor), got {resolution}"
        )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if model == "sd15":
            unet = UNet2DConditionModel(
                sample_size=resolution // 8,
                in_channels=4,
                out_channels=4,
                layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=(
                    "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                    "DownBlock2D",
                ),
                up_block_types=(
                    "UpBlock2D",
                    "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D",
                ),
                cross_attention_dim=768,
                attention_head_dim=8,
            )
            vae = _sd_vae(0.18215)
            encoders = [CLIPTextModel(_clip_text_config(768, 12, 12, 3072, "quick_gelu"))]
        else:
            unet = UNet2DConditionModel(
                sample_size=resolution // 8,
                in_channels=4,
                out_channels=4,
                layers_per_block=2,
                block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10),
                attention_head_dim=(5, 10, 20),
                cross_attention_dim=2048,
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
            )
            vae = _sd_vae(0.13025)
            encoders = [
                CLIPTextModel(_clip_text_config(768, 12, 12, 3072, "quick_gelu")),
                CLIPTextModelWithProjection(_clip_text_config(1280, 32, 20, 5120, "gelu")),
            ]
    finally:
        torch.random.set_rng_state(generator_state)
    tokenizers = [_random_word_tokenizer(RANDOM_TEXT_LENGTH) for _ in encoders]
    text = TextConditioner(tokenizers, encoders, sdxl=model == "sdxl", resolution=resolution)
    return Models(unet=unet, reference_unet=None, vae=vae, text=text, scheduler=build_scheduler())


def build_models(config: TrainConfig, device: torch.device) -> Models:
    """The configured models on ``device``: the policy UNet (training mode), its frozen
    reference (a copy in bf16 on CUDA with bf16 mixed precision, or the policy with LoRA
    adapters off), the VAE and the text encoders (frozen)."""
    from sdpo.train.toy_flow import is_toy_flow_folder, load_toy_flow_models

    if config.model in FLOW_MODELS:
        models = load_flow_models(config, device)
    elif config.pretrained == "random":
        models = build_random(config.model, config.resolution, config.seed)
    elif config.model == "tiny" and is_toy_flow_folder(config.pretrained):
        # The tiny UNet trained as a rectified flow (sdpo-demo --objective flow).
        models = load_toy_flow_models(config)
    elif config.pretrained is not None:
        models = load_pretrained(
            config.pretrained, config.model, config.resolution, config.allow_download
        )
    else:
        models = build_tiny(config.resolution, config.seed)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
    reference_dtype = half if device.type == "cuda" and half is not None else torch.float32
    if config.lora_rank > 0:
        # The reference is the same UNet with its adapters disabled: no second copy in memory.
        targets = FLOW_LORA_TARGETS if models.flow is not None else UNET_LORA_TARGETS
        # Seeded: peft's gaussian init draws A from the global generator, so an unseeded run
        # gets different adapters each time and a rerun (or a resumed run's reference) differs.
        if models.flow is not None and reference_dtype == torch.bfloat16:
            # The frozen flow transformer in bf16 (the base is also the reference): 2 bytes per
            # parameter, 24 GB for FLUX.1-dev instead of 48 (docs/flow_matching.md); the
            # adapters stay fp32 below, as the diffusers LoRA scripts' cast_training_params.
            models.unet.to(torch.bfloat16)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            add_lora(models.unet, config.lora_rank, targets)
        for parameter in models.unet.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
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


def compile_model(module: nn.Module, cuda_graphs: bool) -> nn.Module:
    """torch.compile; with ``cuda_graphs`` through its "reduce-overhead" mode (CUDA graphs,
    static shapes per run)."""
    return torch.compile(module, mode="reduce-overhead" if cuda_graphs else None)


def export_lora(models: Models, output_dir: Path) -> Path:
    """A LoRA run's adapters alone, in the diffusers LoRA format of the model's pipeline:
    ``DIR/NAME_lora/pytorch_lora_weights.safetensors`` (NAME ``unet`` or ``transformer``, as the
    merged export), keys ``unet.*`` / ``transformer.*``: what ``pipeline.load_lora_weights(DIR)``
    applies to the base model (StableDiffusionPipeline / StableDiffusionXLPipeline for a UNet,
    the flow family's pipeline for a transformer). The adapters' alpha equals their rank
    (``add_lora``), which is what the loader assumes when a file stores no alphas (scale 1)."""
    from peft.utils import get_peft_model_state_dict

    folder = Path(output_dir) / f"{models.export_name}_lora"
    layers = {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in get_peft_model_state_dict(models.unet).items()
    }
    with writing("export", folder), replacing(folder) as temporary:
        if models.flow is not None:
            type(models.flow.pipeline).save_lora_weights(
                str(temporary), transformer_lora_layers=layers
            )
            return folder
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        # peft's lora_A / lora_B names to diffusers' own, as diffusers' UNet LoRA training
        # scripts save them; the loaders read either.
        pipeline = StableDiffusionXLPipeline if models.text.sdxl else StableDiffusionPipeline
        pipeline.save_lora_weights(
            str(temporary),
            unet_lora_layers=convert_state_dict_to_diffusers(layers),
            safe_serialization=True,
        )
    return folder
