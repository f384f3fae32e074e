"""Flow-matching model families (SD3/SD3.5, FLUX.1, Wan 2.1 T2V) behind one interface.

Every family wraps the diffusers pipeline it ships as (so text encoding is the pipeline's own
``encode_prompt``) and offers what the trainer's step needs:

- ``load(path, resolution, allow_download)`` (module level): a local diffusers folder, the family
  read from ``model_index.json`` ``_class_name``; ``Family.build_tiny(resolution, seed)``:
  tiny random models with tokenizers built in code (no download).
- ``encode_text(captions, device) -> dict[str, Tensor]``: one row per caption.
- ``encode_images(pixels, generator) -> latents``: a VAE sample with the model's shift/scale.
  Images (B, 3, H, W) -> (B, 16, h, w); Wan videos (B, 3, F, H, W) -> (B, 16, f, h, w).
- ``prediction(model, noisy_rows, sigma_rows, conditioning_rows) -> Tensor``: the velocity in
  the latent layout of ``noisy_rows`` (FLUX packs, builds ids and guidance, unpacks inside).
- ``scheduler``: a fresh training copy of the flow-match scheduler (see ``flow_matching``).

:func:`flow_preference_inputs` is the whole step up to ``sdpo.preference_loss``.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from sdpo.train import flow_matching
from sdpo.train.flow_matching import FlowDensity, repeat_pairs

# Tiny models: the tiny preset's word-level vocabulary (sdpo.train.models), 12-token CLIP inputs.
TINY_CLIP_LENGTH = 12
TINY_T5_LENGTH = 16
TINY_HIDDEN = 32


class FlowFamily:
    """Base: subclasses set the pipeline class, text keys and the transformer call."""

    name: ClassVar[str] = ""
    pipeline_class_name: ClassVar[str] = ""
    # T5 tokens per caption: the pipelines' defaults (SD3 256, FLUX 512, Wan 512 = its text_len).
    default_max_sequence_length: ClassVar[int] = 256

    def __init__(self, pipeline, resolution: int, max_sequence_length: int | None = None) -> None:
        self.pipeline = pipeline
        self.transformer: nn.Module = pipeline.transformer
        self.vae: nn.Module = pipeline.vae
        self.resolution = resolution
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        self.scheduler = self.training_scheduler(pipeline.scheduler)
        self.sigma_tables: dict = {}  # the scheduler's training table per device
        self.check_resolution(resolution)
        # Frozen and in eval mode: T5's dropout (0.1 by default) would otherwise perturb every
        # text embedding of a freshly built model.
        for module in (self.vae, *self.text_encoders()):
            module.requires_grad_(False)
            module.eval()

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_pipeline(
        cls, pipeline, resolution: int, max_sequence_length: int | None = None
    ) -> FlowFamily:
        return cls(pipeline, resolution, max_sequence_length)

    @staticmethod
    def training_scheduler(shipped):
        """A fresh copy of the shipped FlowMatchEulerDiscreteScheduler (its training table)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if not isinstance(shipped, FlowMatchEulerDiscreteScheduler):
            raise ValueError(
                f"scheduler: expected FlowMatchEulerDiscreteScheduler, got {type(shipped).__name__}"
            )
        return FlowMatchEulerDiscreteScheduler.from_config(shipped.config)

    def text_encoders(self) -> list[nn.Module]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [getattr(self.pipeline, n) for n in names if getattr(self.pipeline, n, None)]

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def check_resolution(self, resolution: int) -> None:
        multiple = self.spatial_factor * 2  # the VAE's factor times the 2x2 patch
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
            raise ValueError(f"resolution: expected a positive integer, got {resolution!r}")
        if resolution % multiple:
            raise ValueError(
                f"resolution: expected a multiple of {multiple} for {self.name} (VAE factor "
                f"{self.spatial_factor} x patch 2), got {resolution}"
            )

    # --- the interface --------------------------------------------------------------------
    # What the pipeline's encode_prompt takes besides the prompt, device and T5 length, and
    # which of its outputs are ``conditioning_keys``, in that order.
    encode_prompt_options: ClassVar[dict] = {}
    encode_prompt_outputs: ClassVar[tuple[int, ...]] = (0, 2)

    @torch.no_grad()
    def encode_text(self, captions: list[str], device: torch.device) -> dict[str, Tensor]:
        _check_captions(captions)
        outputs = self.pipeline.encode_prompt(
            prompt=list(captions),
            device=device,
            max_sequence_length=self.max_sequence_length,
            **self.encode_prompt_options,
        )
        return {
            key: outputs[index]
            for key, index in zip(self.conditioning_keys, self.encode_prompt_outputs, strict=True)
        }

    @torch.no_grad()
    def encode_images(self, pixels: Tensor, generator: torch.Generator | None) -> Tensor:
        layout = "(N, 3, F, H, W) videos" if self.pixel_dims == 5 else "(N, 3, H, W) images"
        if pixels.dim() != self.pixel_dims or pixels.shape[1] != 3:
            raise ValueError(
                f"pixels: {self.name} encodes {layout} in [-1, 1], got {tuple(pixels.shape)}"
            )
        distribution = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        sample = distribution.mean + distribution.std * torch.randn(
            distribution.mean.shape,
            generator=generator,
            device=distribution.mean.device,
            dtype=distribution.mean.dtype,
        )
        return self.normalize_latents(sample)

    def normalize_latents(self, sample: Tensor) -> Tensor:
        shift = self.vae.config.shift_factor or 0.0
        return (sample - shift) * self.vae.config.scaling_factor

    def image_seq_len(self, latents: Tensor) -> int:
        """Transformer image tokens per sample (what the pipelines' dynamic shift reads)."""
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    def prediction(
        self,
        model: nn.Module,
        noisy_rows: Tensor,
        sigma_rows: Tensor,
        conditioning_rows: dict[str, Tensor],
    ) -> Tensor:
        """The velocity: inputs cast to the model's dtype, then the family's transformer call."""
        dtype = base_module(model).dtype
        rows = _cast(conditioning_rows, dtype)
        return self.transformer_call(model, noisy_rows.to(dtype), sigma_rows, rows)

    def transformer_call(
        self, model: nn.Module, noisy: Tensor, sigma_rows: Tensor, rows: dict[str, Tensor]
    ) -> Tensor:
        """SD3 and Wan: timestep ``sigma * 1000``, the text states (and SD3's pooled
        projection) by name."""
        pooled = (
            {"pooled_projections": rows["pooled_projections"]}
            if "pooled_projections" in self.conditioning_keys
            else {}
        )
        return model(
            hidden_states=noisy,
            timestep=sigma_rows * self.timestep_scale(),
            encoder_hidden_states=rows["prompt_embeds"],
            **pooled,
            return_dict=False,
        )[0]

    # What encode_text returns, and the pixel tensor rank encode_images takes.
    conditioning_keys: ClassVar[tuple[str, ...]] = ("prompt_embeds", "pooled_projections")
    pixel_dims: ClassVar[int] = 4

    def check_conditioning(self, conditioning: dict[str, Tensor], rows: int) -> None:
        missing = [key for key in self.conditioning_keys if key not in conditioning]
        if missing:
            raise ValueError(
                f"conditioning: {self.name} needs {', '.join(self.conditioning_keys)}; missing "
                f"{', '.join(missing)} (use family.encode_text)"
            )
        for key in self.conditioning_keys:
            if conditioning[key].shape[0] != rows:
                raise ValueError(
                    f"conditioning[{key!r}]: expected {rows} rows (one per pair), got "
                    f"{conditioning[key].shape[0]}"
                )

    def timestep_scale(self) -> float:
        return float(self.scheduler.config.num_train_timesteps)

    # --- tiny models --------------------------------------------------------------------
    @classmethod
    def build_tiny(cls, resolution: int, seed: int) -> FlowFamily:
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            pipeline = cls.tiny_pipeline(resolution)
        finally:
            torch.random.set_rng_state(state)
        return cls(pipeline, resolution, max_sequence_length=TINY_T5_LENGTH)

    @classmethod
    def tiny_pipeline(cls, resolution: int):
        raise NotImplementedError

    # --- what the released folders ship (the tiny and random pipelines use the same) -------
    published_vae: ClassVar[str] = ""  # a PUBLISHED_VAES key

    @staticmethod
    def shipped_scheduler():
        """The scheduler a released folder ships (scheduler/scheduler_config.json)."""
        raise NotImplementedError

    @classmethod
    def vae_shift_and_scale(cls) -> tuple[float, float]:
        """The released VAE's (shift_factor, scaling_factor)."""
        config = PUBLISHED_VAES[cls.published_vae][1]
        return config["shift_factor"], config["scaling_factor"]


def base_module(model: nn.Module) -> nn.Module:
    """The diffusers model inside DDP (``.module``) or torch.compile (``._orig_mod``) wrappers:
    its ``dtype`` and ``config`` are read there, while the forward goes through the wrapper."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _check_captions(captions: list[str]) -> None:
    if (
        isinstance(captions, str)
        or not captions
        or not all(isinstance(caption, str) for caption in captions)
    ):
        raise ValueError(
            f"captions: expected a non-empty list of strings, got {type(captions).__name__}"
        )


def _cast(conditioning: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {key: value.to(dtype) for key, value in conditioning.items()}


class SD3Family(FlowFamily):
    """SD3 / SD3.5: CLIP-L + CLIP-G (penultimate states, pooled) + T5, MMDiT on 16-ch latents."""

    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    default_max_sequence_length = 256
    # encode_prompt -> (prompt_embeds, negative, pooled, negative pooled).
    encode_prompt_options: ClassVar[dict] = {
        "prompt_2": None,
        "prompt_3": None,
        "do_classifier_free_guidance": False,
    }
    encode_prompt_outputs = (0, 2)
    published_vae = "sd3"

    @staticmethod
    def shipped_scheduler():
        from diffusers import FlowMatchEulerDiscreteScheduler

        # The SD3/SD3.5 folders ship FlowMatchEulerDiscreteScheduler with shift 3.0.
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)

    @classmethod
    def tiny_pipeline(cls, resolution: int):
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
        from transformers import CLIPTextModelWithProjection

        vocabulary = _tiny_vocab_size()
        t5_width = 2 * TINY_HIDDEN  # >= CLIP-L + CLIP-G widths, which the pipeline pads to it
        transformer = SD3Transformer2DModel(
            sample_size=resolution // 2,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=t5_width,
            caption_projection_dim=16,
            pooled_projection_dim=2 * TINY_HIDDEN,
            pos_embed_max_size=max(resolution // 4, 4),
            dual_attention_layers=(0,),  # the SD3.5 Medium block kind
            qk_norm="rms_norm",
        )
        return StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=cls.shipped_scheduler(),
            vae=_tiny_vae(*cls.vae_shift_and_scale()),
            text_encoder=CLIPTextModelWithProjection(_tiny_clip_config(vocabulary)),
            tokenizer=_tiny_tokenizer(TINY_CLIP_LENGTH),
            text_encoder_2=CLIPTextModelWithProjection(_tiny_clip_config(vocabulary)),
            tokenizer_2=_tiny_tokenizer(TINY_CLIP_LENGTH),
            text_encoder_3=_tiny_t5(vocabulary, t5_width),
            tokenizer_3=_tiny_tokenizer(TINY_T5_LENGTH),
        )


class FluxFamily(FlowFamily):
    """FLUX.1: CLIP-L pooled + T5 states, 2x2-packed latents with position ids, and (dev) the
    guidance embedding, set to ``guidance_scale`` (3.5, the FLUX DreamBooth script's default)."""

    name = "flux"
    pipeline_class_name = "FluxPipeline"
    default_max_sequence_length = 512
    guidance_scale: float = 3.5
    # encode_prompt -> (prompt_embeds, pooled, text_ids).
    encode_prompt_options: ClassVar[dict] = {"prompt_2": None}
    encode_prompt_outputs = (0, 1)
    published_vae = "flux"

    @staticmethod
    def shipped_scheduler():
        from diffusers import FlowMatchEulerDiscreteScheduler

        # FLUX.1-dev's scheduler config: shift 3.0 with dynamic shifting by resolution.
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )

    @staticmethod
    def pack(latents: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, H/2 * W/2, 4C): each 2x2 patch becomes one token."""
        rows, channels, height, width = latents.shape
        patches = latents.view(rows, channels, height // 2, 2, width // 2, 2)
        return patches.permute(0, 2, 4, 1, 3, 5).reshape(rows, -1, channels * 4)

    @staticmethod
    def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
        """The inverse of :meth:`pack` for latents of ``height`` x ``width``."""
        rows, _, features = tokens.shape
        channels = features // 4
        patches = tokens.view(rows, height // 2, width // 2, channels, 2, 2)
        return patches.permute(0, 3, 1, 4, 2, 5).reshape(rows, channels, height, width)

    @staticmethod
    def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """(H/2 * W/2, 3) ids: (0, row, column) of each packed token."""
        rows = torch.arange(height // 2, device=device, dtype=dtype)
        columns = torch.arange(width // 2, device=device, dtype=dtype)
        grid_rows, grid_columns = torch.meshgrid(rows, columns, indexing="ij")
        zeros = torch.zeros_like(grid_rows)
        return torch.stack([zeros, grid_rows, grid_columns], dim=-1).reshape(-1, 3)

    def transformer_call(
        self, model: nn.Module, noisy: Tensor, sigma_rows: Tensor, rows: dict[str, Tensor]
    ) -> Tensor:
        """Packs 2x2 patches, builds ids and the guidance value, unpacks the velocity."""
        dtype = noisy.dtype
        height, width = noisy.shape[-2:]
        if height % 2 or width % 2:
            raise ValueError(f"latents: FLUX packs 2x2 patches, got odd size {height}x{width}")
        count = noisy.shape[0]
        device = noisy.device
        guidance = (
            torch.full((count,), self.guidance_scale, device=device, dtype=torch.float32)
            if base_module(model).config.guidance_embeds
            else None
        )
        text_length = rows["prompt_embeds"].shape[1]
        tokens = model(
            hidden_states=self.pack(noisy),
            # FLUX multiplies timestep (and guidance) by 1000 inside: it takes sigma itself.
            timestep=sigma_rows,
            guidance=guidance,
            pooled_projections=rows["pooled_projections"],
            encoder_hidden_states=rows["prompt_embeds"],
            txt_ids=torch.zeros(text_length, 3, device=device, dtype=dtype),
            img_ids=self.image_ids(height, width, device, dtype),
            return_dict=False,
        )[0]
        return self.unpack(tokens, height, width)

    @classmethod
    def tiny_pipeline(cls, resolution: int):
        from diffusers import FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextModel

        vocabulary = _tiny_vocab_size()
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels x a 2x2 patch
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TINY_HIDDEN,
            pooled_projection_dim=TINY_HIDDEN,
            guidance_embeds=True,  # FLUX.1-dev
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        )
        return FluxPipeline(
            scheduler=cls.shipped_scheduler(),
            vae=_tiny_vae(*cls.vae_shift_and_scale()),
            text_encoder=CLIPTextModel(_tiny_clip_config(vocabulary)),
            tokenizer=_tiny_tokenizer(TINY_CLIP_LENGTH),
            text_encoder_2=_tiny_t5(vocabulary, TINY_HIDDEN),
            tokenizer_2=_tiny_tokenizer(TINY_T5_LENGTH),
            transformer=transformer,
        )


class WanFamily(FlowFamily):
    """Wan 2.1 T2V: umT5 states, video latents (B, 16, F, H, W) from AutoencoderKLWan (4x in
    time, 8x in space), normalised by the VAE's per-channel ``latents_mean``/``latents_std``.

    Wan folders ship UniPCMultistepScheduler (flow_prediction, ``flow_shift`` 3.0 for T2V); the
    training table is FlowMatchEulerDiscreteScheduler with ``shift = flow_shift``."""

    name = "wan"
    pipeline_class_name = "WanPipeline"
    default_max_sequence_length = 512
    conditioning_keys = ("prompt_embeds",)
    pixel_dims = 5
    # encode_prompt -> (prompt_embeds, negative).
    encode_prompt_options: ClassVar[dict] = {"do_classifier_free_guidance": False}
    encode_prompt_outputs = (0,)
    published_vae = "wan2.1"

    @staticmethod
    def shipped_scheduler():
        from diffusers import UniPCMultistepScheduler

        # What scripts/convert_wan_to_diffusers.py ships for Wan 2.1 T2V.
        return UniPCMultistepScheduler(
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            num_train_timesteps=1000,
            flow_shift=3.0,
        )

    @staticmethod
    def training_scheduler(shipped):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if isinstance(shipped, FlowMatchEulerDiscreteScheduler):
            return FlowMatchEulerDiscreteScheduler.from_config(shipped.config)
        flow_shift = shipped.config.get("flow_shift")
        if shipped.config.get("prediction_type") != "flow_prediction" or flow_shift is None:
            raise ValueError(
                f"scheduler: expected a flow-matching scheduler (prediction_type "
                f"'flow_prediction' with flow_shift), got {type(shipped).__name__}"
            )
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=shipped.config.num_train_timesteps, shift=float(flow_shift)
        )

    def text_encoders(self) -> list[nn.Module]:
        encoder = getattr(self.pipeline, "text_encoder", None)
        return [encoder] if encoder is not None else []

    @property
    def spatial_factor(self) -> int:
        return 2 ** len(self.vae.config.temperal_downsample)

    def normalize_latents(self, sample: Tensor) -> Tensor:
        mean, std = self._latent_statistics(sample.device, sample.dtype)
        return (sample - mean) / std

    def _latent_statistics(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The VAE's per-channel mean and std as (1, C, 1, 1, 1) tensors on ``device``, built once
        per (device, dtype): made from the config's lists on every call they were two blocking
        host->device copies from pageable memory per micro-step (the trainer normalises each
        cached batch's latents)."""
        cache = self.__dict__.setdefault("_latent_statistics_cache", {})
        key = (device, dtype)
        if key not in cache:
            shape = (1, self.vae.config.z_dim, 1, 1, 1)
            cache[key] = tuple(
                torch.tensor(values, dtype=dtype).view(shape).to(device)
                for values in (self.vae.config.latents_mean, self.vae.config.latents_std)
            )
        return cache[key]

    def image_seq_len(self, latents: Tensor) -> int:
        return latents.shape[2] * (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    @classmethod
    def tiny_pipeline(cls, resolution: int):
        from diffusers import (
            AutoencoderKLWan,
            WanPipeline,
            WanTransformer3DModel,
        )

        vocabulary = _tiny_vocab_size()
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16,
            out_channels=16,
            text_dim=TINY_HIDDEN,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )
        vae = AutoencoderKLWan(
            base_dim=3,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
        return WanPipeline(
            tokenizer=_tiny_tokenizer(TINY_T5_LENGTH),
            text_encoder=_tiny_t5(vocabulary, TINY_HIDDEN, umt5=True),
            vae=vae,
            scheduler=cls.shipped_scheduler(),
            transformer=transformer,
        )


FAMILIES: dict[str, type[FlowFamily]] = {
    family.pipeline_class_name: family for family in (SD3Family, FluxFamily, WanFamily)
}
FAMILIES_BY_NAME: dict[str, type[FlowFamily]] = {
    family.name: family for family in FAMILIES.values()
}


def family_class_for(folder: Path) -> type[FlowFamily]:
    """The family named by ``folder/model_index.json`` ``_class_name``."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(
            f"pretrained: {str(folder)!r} has no model_index.json; expected a diffusers pipeline "
            "folder (save_pretrained output or a Hugging Face snapshot)"
        )
    try:
        class_name = json.loads(index_path.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"pretrained: {str(index_path)!r} is not a JSON object: {error}") from None
    if class_name not in FAMILIES:
        raise ValueError(
            f"pretrained: model_index.json names {class_name!r}, which has no flow-matching "
            f"family; supported: {', '.join(FAMILIES)}"
        )
    return FAMILIES[class_name]


def _resolve_folder(path: str, allow_download: bool) -> Path:
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise FileNotFoundError(f"pretrained: no such folder {path!r}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, local_files_only=not allow_download))
    except Exception as error:  # the hub raises several kinds; one message for all
        raise FileNotFoundError(
            f"pretrained: cannot find {path!r} locally ({type(error).__name__}); pass a local "
            "diffusers folder, a model id already in the Hugging Face cache, or --allow-download"
        ) from None


def load(
    path: str,
    resolution: int,
    allow_download: bool = False,
    dtype: torch.dtype = torch.float32,
    max_sequence_length: int | None = None,
    text_encoders: bool = True,
    transformer: bool = True,
) -> FlowFamily:
    """A flow family from a local diffusers folder (or a cached model id), no download unless
    ``allow_download``; the family comes from ``model_index.json``. ``text_encoders=False``
    skips loading the text encoders (cached embeddings; ``encode_text`` is then unusable),
    ``transformer=False`` the transformer (sdpo-cache: ``prediction`` is then unusable)."""
    folder = _resolve_folder(path, allow_download)
    family = family_class_for(folder)
    import diffusers

    pipeline_class = getattr(diffusers, family.pipeline_class_name)
    left_out = () if text_encoders else ("text_encoder", "text_encoder_2", "text_encoder_3")
    left_out += () if transformer else ("transformer",)
    names = json.loads((folder / "model_index.json").read_text())
    skipped = {name: None for name in left_out if name in names}
    try:
        pipeline = pipeline_class.from_pretrained(
            str(folder), local_files_only=not allow_download, dtype=dtype, **skipped
        )
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"pretrained: cannot load {family.pipeline_class_name} from {str(folder)!r}: "
            f"{str(error).splitlines()[0]}"
        ) from error
    return family(pipeline, resolution, max_sequence_length)


# --- the step up to preference_loss --------------------------------------------------------
class FlowPreferenceInputs(NamedTuple):
    """What ``sdpo.preference_loss(model_pred, ref_pred, target, ...)`` takes, plus the draws."""

    model_pred: Tensor  # (2B, ...) policy velocity, winners first
    ref_pred: Tensor  # (2B, ...) reference velocity (no grad)
    target: Tensor  # (2B, ...) noise - x_0 per row
    sigmas: Tensor  # (B,) one per pair
    noise: Tensor  # (B, ...) one per pair


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The LoRA policy with its adapters off: the base model, i.e. the reference."""
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


def flow_preference_inputs(
    family: FlowFamily,
    policy: nn.Module,
    reference: nn.Module | None,
    latents: Tensor,
    conditioning: dict[str, Tensor],
    generator: torch.Generator | None,
    density: FlowDensity,
) -> FlowPreferenceInputs:
    """Noise and sigma per pair, the noisy rows, both forwards and the per-row target.

    ``latents``: (2B, ...) winners then losers; ``conditioning``: ``family.encode_text`` output
    for the B captions (one per pair); ``reference``: a frozen copy, or None for a LoRA policy
    (adapters disabled). Draw order: noise, then the sigma density (on ``generator``).
    With ``density.loss_weighting`` other than "none", both rows of pair i come back scaled by
    sqrt(w(sigma_i)), so preference_loss sees w_i-weighted MSEs inside u.
    """
    if latents.dim() < 3 or latents.shape[0] < 2 or latents.shape[0] % 2:
        raise ValueError(
            f"latents: expected (2B, C, ...) with the B winners first, got {tuple(latents.shape)}"
        )
    batch_pairs = latents.shape[0] // 2
    family.check_conditioning(conditioning, batch_pairs)
    noise = torch.randn(
        (batch_pairs, *latents.shape[1:]),
        generator=generator,
        device=latents.device,
        dtype=latents.dtype,
    )
    sigmas, _ = flow_matching.sample_pair_sigmas(
        family.scheduler,
        batch_pairs,
        density,
        generator,
        latents.device,
        image_seq_len=family.image_seq_len(latents),
        table_cache=family.sigma_tables,
    )
    noisy = flow_matching.noisy_latents(latents, noise, sigmas)
    target = flow_matching.velocity_target(latents, noise)
    sigma_rows = repeat_pairs(sigmas)
    rows = {key: repeat_pairs(value) for key, value in conditioning.items()}
    model_pred = family.prediction(policy, noisy, sigma_rows, rows)
    with torch.no_grad():
        if reference is None:
            with adapters_disabled(policy) as base:
                ref_pred = family.prediction(base, noisy, sigma_rows, rows)
        else:
            ref_pred = family.prediction(reference, noisy, sigma_rows, rows)
    if density.loss_weighting != "none":
        weights = flow_matching.loss_weights(sigmas, density.loss_weighting)
        model_pred, ref_pred, target = flow_matching.apply_pair_weights_inside_margin(
            model_pred, ref_pred, target, weights
        )
    return FlowPreferenceInputs(model_pred, ref_pred, target, sigmas, noise)


def make_reference(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen eval-mode copy of the policy transformer for the reference forward."""
    reference = copy.deepcopy(model)
    if dtype is not None:
        reference = reference.to(dtype)
    reference.requires_grad_(False)
    return reference.eval()


# --- the published transformer architectures (random weights: profiling, memory) --------
# SD3.5: the transformer config.json values (Medium as in hao-ai-lab/FastVideo
# fastvideo/configs/models/dits/sd3.py; Large: 8.06B parameters, Stability's stated 8.1B).
_SD35_COMMON = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "attention_head_dim": 64,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 2048,
    "qk_norm": "rms_norm",
}
PUBLISHED_TRANSFORMERS: dict[str, tuple[str, dict]] = {
    "sd3.5-medium": (
        "SD3Transformer2DModel",
        {
            **_SD35_COMMON,
            "num_layers": 24,
            "num_attention_heads": 24,
            "caption_projection_dim": 1536,
            "pos_embed_max_size": 384,
            "dual_attention_layers": tuple(range(13)),
        },
    ),
    "sd3.5-large": (
        "SD3Transformer2DModel",
        {
            **_SD35_COMMON,
            "num_layers": 38,
            "num_attention_heads": 38,
            "caption_projection_dim": 2432,
            "pos_embed_max_size": 192,
            "dual_attention_layers": (),
        },
    ),
    # FLUX.1-dev: diffusers' defaults plus the guidance embedding, as
    # scripts/convert_flux_to_diffusers.py builds it.
    "flux.1-dev": ("FluxTransformer2DModel", {"guidance_embeds": True}),
    # Wan 2.1 T2V 1.3B: scripts/convert_wan_to_diffusers.py, "Wan-T2V-1.3B".
    "wan2.1-t2v-1.3b": (
        "WanTransformer3DModel",
        {
            "added_kv_proj_dim": None,
            "attention_head_dim": 128,
            "cross_attn_norm": True,
            "eps": 1e-06,
            "ffn_dim": 8960,
            "freq_dim": 256,
            "in_channels": 16,
            "num_attention_heads": 12,
            "num_layers": 30,
            "out_channels": 16,
            "patch_size": (1, 2, 2),
            "qk_norm": "rms_norm_across_heads",
            "text_dim": 4096,
        },
    ),
}


def build_published_transformer(name: str) -> nn.Module:
    """The named architecture with random weights, on the current default device
    (``with torch.device("meta"):`` counts parameters without allocating)."""
    import diffusers

    if name not in PUBLISHED_TRANSFORMERS:
        raise ValueError(
            f"model: unknown {name!r}; expected one of {', '.join(PUBLISHED_TRANSFORMERS)}"
        )
    class_name, config = PUBLISHED_TRANSFORMERS[name]
    return getattr(diffusers, class_name)(**config)


# The text encoders the pipelines ship, as their config.json files set them: CLIP ViT-L/14's
# text tower (SD3 text_encoder with its projection, FLUX text_encoder without), OpenCLIP
# ViT-bigG/14's ("CLIP-G", SD3 text_encoder_2, also SDXL's), the T5 v1.1 XXL encoder (SD3
# text_encoder_3, FLUX text_encoder_2) and umT5-XXL's (Wan, google/umt5-xxl). Token ids come from
# the word-level tokenizer built in code (random weights: timing and memory, not meaning).
_CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
_XXL = {
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "tie_word_embeddings": False,
}
PUBLISHED_TEXT_ENCODERS: dict[str, tuple[str, str, dict]] = {
    # name: (transformers model class, its config class, config)
    "clip-l": ("CLIPTextModelWithProjection", "CLIPTextConfig", _CLIP_L),
    "clip-l-unprojected": ("CLIPTextModel", "CLIPTextConfig", _CLIP_L),
    "clip-g": (
        "CLIPTextModelWithProjection",
        "CLIPTextConfig",
        {
            **_CLIP_L,
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 20,
            "hidden_act": "gelu",
            "projection_dim": 1280,
        },
    ),
    "t5-xxl": ("T5EncoderModel", "T5Config", {**_XXL, "vocab_size": 32128}),
    "umt5-xxl": ("UMT5EncoderModel", "UMT5Config", {**_XXL, "vocab_size": 256384}),
}
# The word-level tokenizer's special ids (sdpo.train.models.build_tiny_tokenizer): CLIP's pooled
# output reads the hidden state at eos_token_id.
_SPECIAL_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
# Tokens per caption: CLIP's 77 positions; T5 tokenizers ship model_max_length 512 (the pipelines
# pass their own max_sequence_length, which wins).
PUBLISHED_TOKENIZER_LENGTHS = {"clip": 77, "t5": 512}

# The VAEs: 16 latent channels, SD3's and FLUX's AutoencoderKL (vae/config.json: no quant convs,
# their shift and scale), Wan 2.1's AutoencoderKLWan (scripts/convert_wan_to_diffusers.py).
_KL16 = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
PUBLISHED_VAES: dict[str, tuple[str, dict]] = {
    "sd3": ("AutoencoderKL", {**_KL16, "shift_factor": 0.0609, "scaling_factor": 1.5305}),
    "flux": ("AutoencoderKL", {**_KL16, "shift_factor": 0.1159, "scaling_factor": 0.3611}),
    "wan2.1": (
        "AutoencoderKLWan",
        {
            "base_dim": 96,
            "z_dim": 16,
            # Lists: AutoencoderKLWan concatenates them with lists.
            "dim_mult": [1, 2, 4, 4],
            "num_res_blocks": 2,
            "attn_scales": [],
            "temperal_downsample": [False, True, True],
        },
    ),
}


class PublishedPipeline(NamedTuple):
    """One released model: its family, and the names of its parts in the tables above."""

    family: str  # FlowFamily.name
    transformer: str
    vae: str
    text_encoders: tuple[str, ...]  # in the pipeline's text_encoder, _2, _3 order


# What ``--pretrained random`` builds (``random:NAME``, or the flow preset's architecture).
PUBLISHED_PIPELINES: dict[str, PublishedPipeline] = {
    "sd3.5-medium": PublishedPipeline("sd3", "sd3.5-medium", "sd3", ("clip-l", "clip-g", "t5-xxl")),
    "sd3.5-large": PublishedPipeline("sd3", "sd3.5-large", "sd3", ("clip-l", "clip-g", "t5-xxl")),
    "flux.1-dev": PublishedPipeline("flux", "flux.1-dev", "flux", ("clip-l-unprojected", "t5-xxl")),
    "wan2.1-t2v-1.3b": PublishedPipeline("wan", "wan2.1-t2v-1.3b", "wan2.1", ("umt5-xxl",)),
}


def build_published_text_encoder(name: str) -> nn.Module:
    """A published text encoder with random weights, on the current default device."""
    import transformers

    if name not in PUBLISHED_TEXT_ENCODERS:
        raise ValueError(
            f"text encoder: unknown {name!r}; expected one of {', '.join(PUBLISHED_TEXT_ENCODERS)}"
        )
    model_class, config_class, config = PUBLISHED_TEXT_ENCODERS[name]
    settings = {**config, **_SPECIAL_TOKEN_IDS}
    if config_class != "CLIPTextConfig":
        settings["decoder_start_token_id"] = 0
    encoder = getattr(transformers, model_class)(getattr(transformers, config_class)(**settings))
    return encoder.eval()


def build_published_vae(name: str) -> nn.Module:
    """A published VAE with random weights, on the current default device."""
    import diffusers

    if name not in PUBLISHED_VAES:
        raise ValueError(f"vae: unknown {name!r}; expected one of {', '.join(PUBLISHED_VAES)}")
    class_name, config = PUBLISHED_VAES[name]
    return getattr(diffusers, class_name)(**config)


def _published_tokenizer(encoder_name: str):
    kind = "clip" if encoder_name.startswith("clip") else "t5"
    return _tiny_tokenizer(PUBLISHED_TOKENIZER_LENGTHS[kind])


def random_build_bytes(
    architecture: str, text_encoders: bool = True, transformer: bool = True
) -> int:
    """The fp32 weights of :func:`build_random`'s parts (counted on the meta device)."""
    spec = PUBLISHED_PIPELINES[architecture]
    with torch.device("meta"):
        modules = [build_published_vae(spec.vae)]
        if transformer:
            modules.append(build_published_transformer(spec.transformer))
        if text_encoders:
            modules += [build_published_text_encoder(name) for name in spec.text_encoders]
    return 4 * sum(p.numel() for module in modules for p in module.parameters())


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory where ``device``'s weights would live (None when it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory_for_random_build(
    architecture: str, text_encoders: bool, device: torch.device, transformer: bool = True
) -> None:
    """A random build that cannot fit is refused in one line before anything is allocated
    (Wan 2.1 1.3B with its umT5-XXL is ~29 GB in fp32: on a 24 GB machine the kernel's OOM
    killer would end the process with no message)."""
    available = available_memory_bytes(device)
    if available is None:
        return
    needed = random_build_bytes(architecture, text_encoders, transformer)
    if needed > available:
        advice = (
            "train from an sdpo-cache folder (--data CACHE: no text encoders), "
            if text_encoders and transformer
            else ""
        )
        from sdpo.train.errors import UsageError

        raise UsageError(
            f"pretrained: random:{architecture} needs {needed / 2**30:.1f} GiB for its fp32 "
            f"weights{' (text encoders included)' if text_encoders else ''}, but {device} has "
            f"{available / 2**30:.1f} GiB free; {advice}use a larger machine, or --pretrained "
            "tiny for a test run"
        )


def build_random(
    architecture: str,
    resolution: int,
    seed: int,
    text_encoders: bool = True,
    transformer: bool = True,
) -> FlowFamily:
    """A released model's whole pipeline with random weights from ``seed``, on the current
    default device (``with torch.device("cuda"):`` initialises on the GPU: seconds for FLUX's
    11.9B parameters, where a CPU takes minutes and 48 GB). ``text_encoders=False`` leaves the
    encoders out (cached embeddings: T5-XXL alone is 4.8B parameters, 19 GB in fp32);
    ``transformer=False`` leaves the transformer out (sdpo-cache uses only the VAE and the
    encoders). Each part has its own seed, so a part's weights are the same whichever others
    are built: a cache's VAE and encoders are those of the run that trains the transformer."""
    if architecture not in PUBLISHED_PIPELINES:
        raise ValueError(
            f"pretrained: random:{architecture} is not a published architecture here; expected "
            f"one of {', '.join('random:' + name for name in PUBLISHED_PIPELINES)}"
        )
    import diffusers

    spec = PUBLISHED_PIPELINES[architecture]
    family = FAMILIES_BY_NAME[spec.family]
    device = torch.get_default_device()
    check_memory_for_random_build(architecture, text_encoders, device, transformer)
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    # The transformer draws from ``seed`` itself (its weights are those of earlier versions);
    # the VAE and each encoder from seeds drawn from it on the host (whatever the default device:
    # the meta device has no values), one per part in the pipeline's order.
    vae_seed, *encoder_seeds = torch.randint(
        2**62,
        (1 + len(spec.text_encoders),),
        generator=torch.Generator().manual_seed(seed),
        device="cpu",
    ).tolist()
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        parts = {
            "transformer": build_published_transformer(spec.transformer) if transformer else None
        }
        torch.manual_seed(vae_seed)
        parts["vae"] = build_published_vae(spec.vae)
        for index, encoder_name in enumerate(spec.text_encoders):
            suffix = f"_{index + 1}" if index else ""
            encoder = None
            if text_encoders:
                torch.manual_seed(encoder_seeds[index])
                encoder = build_published_text_encoder(encoder_name)
            parts[f"text_encoder{suffix}"] = encoder
            parts[f"tokenizer{suffix}"] = _published_tokenizer(encoder_name)
    # The schedulers' tables on the host, as from_pretrained builds them (the training copy too).
    with torch.device("cpu"):
        parts["scheduler"] = family.shipped_scheduler()
        pipeline = getattr(diffusers, family.pipeline_class_name)(**parts)
        return family(pipeline, resolution)


# --- tiny components (built in code, nothing downloaded) ---------------------------------
def _tiny_vocab_size() -> int:
    from sdpo.train.models import tiny_vocabulary

    return len(tiny_vocabulary())


def _tiny_tokenizer(max_length: int):
    from sdpo.train.models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.model_max_length = max_length
    return tokenizer


def _tiny_clip_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TINY_CLIP_LENGTH,
        projection_dim=TINY_HIDDEN,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )


def _tiny_t5(vocab_size: int, width: int, umt5: bool = False):
    """A one-layer T5 encoder (SD3, FLUX), or UMT5 (Wan) with the same shape."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_class, model_class = (
        (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    )
    return model_class(
        config_class(
            vocab_size=vocab_size,
            d_model=width,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=3,
            decoder_start_token_id=0,
        )
    )


def _tiny_vae(shift_factor: float, scaling_factor: float):
    from diffusers import AutoencoderKL

    # 16 latent channels, downsampling by 2 (16 px images -> 8 x 8 latents).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
