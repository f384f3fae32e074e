"""Reward models for ``sdpo-eval score``, built from maintained libraries, weights from local disk.

| metric | architecture | weights (flag / --weights-root NAME / HF cache id) | score |
|---|---|---|---|
| pickscore | transformers CLIPModel (ViT-H-14) | --pickscore, PickScore_v1, yuvalkirstain/PickScore_v1; tokenizer --pickscore-processor, CLIP-ViT-H-14-laion2B-s32B-b79K, laion/CLIP-ViT-H-14-laion2B-s32B-b79K | logit_scale.exp() * cos(image, text) |
| hpsv2 | open_clip ViT-H-14, loaded into a CLIPModel by key mapping | --hpsv2 (HPS_v2_compressed.pt / HPS_v2.1_compressed.pt), weights-root HPS_v2.1_compressed.pt, xswu/HPSv2 (either file); tokenizer as pickscore | cos(image, text) |
| clip | CLIPModel (ViT-L/14) | --clip, clip-vit-large-patch14, openai/clip-vit-large-patch14 | 100 * max(cos, 0) (torchmetrics' CLIPScore) |
| aesthetics | LAION MLP head on L2-normalised CLIP ViT-L/14 image features | --aesthetics-head (sac+logos+ava1-l14-linearMSE.pth), CLIP as clip | the head's output |
| imagereward | BLIP ViT-L + BERT cross-attention encoder + MLP (sdpo/eval/imagereward.py) | --imagereward (ImageReward.pt), THUDM/ImageReward; tokenizer --imagereward-tokenizer, bert-base-uncased, google-bert/bert-base-uncased | (r - mean) / std, as ImageReward.score |

Images are preprocessed as each original does (sdpo/eval/preprocess.py): PickScore and CLIP as
transformers' CLIPProcessor, HPSv2 as the hpsv2 package (long side to 224, zero padding), the
aesthetics head as OpenAI CLIP's transform (LAION's pipeline), ImageReward as its torchvision
transform; HPSv2 prompts are cleaned as open_clip's tokenizer does (ftfy, HTML entities).
``conventions="reference"`` scores as the official Diffusion-SDPO evaluation scripts instead
(README, "Evaluation").

Nothing is downloaded: HF ids resolve only from the local cache, to the cached snapshot folder or
file. A missing weight raises :class:`MissingWeights` naming the file and the flag; an unreadable
one a ValueError naming the file and the flag.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from sdpo.eval import imagereward
from sdpo.eval.imagereward import mlp_head
from sdpo.eval.preprocess import (
    clip_processor_preprocess,
    hpsv2_preprocess,
    open_clip_clean_text,
    open_clip_preprocess,
    openai_clip_preprocess,
)

METRICS = ("pickscore", "hpsv2", "aesthetics", "clip", "imagereward")
DEFAULT_SOURCES = {
    "pickscore": ("PickScore_v1", "yuvalkirstain/PickScore_v1"),
    "pickscore_processor": (
        "CLIP-ViT-H-14-laion2B-s32B-b79K",
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    ),
    "clip": ("clip-vit-large-patch14", "openai/clip-vit-large-patch14"),
    "hpsv2": ("HPS_v2.1_compressed.pt", None),
    "aesthetics_head": ("sac+logos+ava1-l14-linearMSE.pth", None),
    "imagereward": ("ImageReward.pt", None),
    "imagereward_tokenizer": ("bert-base-uncased", "google-bert/bert-base-uncased"),
}


# HPSv2.0, which the reference evaluation scores with, when v2.1 is absent (they differ: name the
# file with --hpsv2 to pick one explicitly; the file used is recorded with the scores).
ALTERNATIVE_NAMES = {"hpsv2": ("HPS_v2_compressed.pt",)}
# Single weight files that their own packages fetch with hf_hub_download: found in the local HF
# cache when they were fetched that way (v2.1 before v2.0, as above).
HUB_FILES = {
    "hpsv2": (("xswu/HPSv2", "HPS_v2.1_compressed.pt"), ("xswu/HPSv2", "HPS_v2_compressed.pt")),
    "imagereward": (("THUDM/ImageReward", "ImageReward.pt"),),
}


class MissingWeights(FileNotFoundError):
    """A reward model's weights are not on local disk."""


@dataclass
class WeightSources:
    """Where weights come from: explicit paths (flags) first, then --weights-root, then the
    local HF cache (hub model folders, and the single files in HUB_FILES). ``hf_cache_dir``:
    None for huggingface_hub's default (HF_HUB_CACHE / HF_HOME), or a cache folder."""

    paths: dict[str, str | None]
    weights_root: str | None = None
    hf_cache_dir: str | None = None

    def resolve(self, key: str, flag: str) -> str:
        explicit = self.paths.get(key)
        if explicit:
            if not Path(explicit).expanduser().exists():
                raise MissingWeights(f"{key}: {explicit} does not exist (flag {flag})")
            return str(Path(explicit).expanduser())
        name, hub_id = DEFAULT_SOURCES[key]
        if self.weights_root:
            for candidate_name in (name, *ALTERNATIVE_NAMES.get(key, ())):
                candidate = Path(self.weights_root).expanduser() / candidate_name
                if candidate.exists():
                    return str(candidate)
        if hub_id is not None:
            # The cached snapshot folder (its path names the commit, recorded with the scores).
            config = _cached_hub_file(hub_id, "config.json", self.hf_cache_dir)
            if config is not None:
                return str(Path(config).parent)
        for repository, filename in HUB_FILES.get(key, ()):
            cached = _cached_hub_file(repository, filename, self.hf_cache_dir)
            if cached is not None:
                return cached
        places = [f"{flag} PATH"]
        if self.weights_root:
            places.append(f"{Path(self.weights_root) / name}")
        else:
            places.append(f"--weights-root DIR containing {name}")
        if hub_id is not None:
            places.append(f"the local Hugging Face cache ({hub_id})")
        for repository, filename in HUB_FILES.get(key, ()):
            places.append(f"the local Hugging Face cache ({repository} {filename})")
        raise MissingWeights(
            f"{key}: weights not found; looked for {', '.join(places)}. Nothing is downloaded: "
            f"fetch them on a machine with network and pass {flag}, or use --on-missing skip"
        )


def _cached_hub_file(repository: str, filename: str, cache_dir: str | None) -> str | None:
    """The path of ``filename`` of ``repository`` in the local HF cache, or None (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repository, filename, cache_dir=cache_dir)
    return found if isinstance(found, str) else None


class ClipScorer:
    """A CLIPModel, its tokenizer and its original's preprocessing; ``kind`` picks the score:
    "pickscore" (``logit_scale * cos``), "clip" (``100 * max(cos, 0)``) or "cosine"."""

    def __init__(
        self,
        name: str,
        model,
        tokenizer,
        kind: str,
        device: torch.device,
        preprocess: Callable[[list, int], Tensor] = clip_processor_preprocess,
        clean_text: Callable[[str], str] | None = None,
    ) -> None:
        self.name, self.model, self.tokenizer, self.kind = name, model, tokenizer, kind
        self.model.eval().to(device)
        self.device = device
        self.preprocess, self.clean_text = preprocess, clean_text
        self.image_size = model.config.vision_config.image_size
        self.sources: dict[str, str] = {}

    def tokens(self, prompts: list[str]):
        if self.clean_text is not None:
            prompts = [self.clean_text(prompt) for prompt in prompts]
        return self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt"
        )

    @torch.no_grad()
    def image_features(self, images: list, preprocess=None) -> Tensor:
        pixels = (preprocess or self.preprocess)(images, self.image_size)
        image = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
        image = getattr(image, "pooler_output", image)
        return nn.functional.normalize(image.float(), dim=-1)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> Tensor:
        tokens = self.tokens(prompts).to(self.device)
        text = self.model.get_text_features(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
        )
        text = getattr(text, "pooler_output", text)
        return nn.functional.normalize(text.float(), dim=-1)

    def score(self, images: list, prompts: list[str]) -> list[float]:
        cosine = (self.image_features(images) * self.text_features(prompts)).sum(-1)
        if self.kind == "pickscore":
            values = self.model.logit_scale.exp().float() * cosine
        elif self.kind == "clip":
            values = 100.0 * cosine.clamp_min(0.0)
        elif self.kind == "cosine":
            values = cosine
        else:
            raise ValueError(f"ClipScorer: unknown kind {self.kind!r}")
        return values.cpu().tolist()


class AestheticsScorer:
    """The LAION head (Linear 768-1024-128-64-16-1, dropout between, no activations) on
    L2-normalised CLIP ViT-L/14 image embeddings, preprocessed by ``preprocess`` (the original
    LAION pipeline: OpenAI CLIP's torchvision transform; the reference evaluation:
    CLIPProcessor)."""

    def __init__(self, clip: ClipScorer, head: nn.Module, preprocess=openai_clip_preprocess):
        self.name, self.clip, self.head = "aesthetics", clip, head.eval().to(clip.device)
        self.preprocess = preprocess
        self.sources: dict[str, str] = {}

    @staticmethod
    def build_head(width: int = 768) -> nn.Module:
        return mlp_head(width)

    @torch.no_grad()
    def score(self, images: list, prompts: list[str]) -> list[float]:
        image = self.clip.image_features(images, self.preprocess)
        return self.head(image).squeeze(-1).cpu().tolist()


def open_clip_to_transformers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An open_clip CLIP state dict (HPSv2's format) renamed for transformers' CLIPModel.

    open_clip fuses q, k, v into ``attn.in_proj_weight`` (3W, W) and applies projections as
    ``x @ proj`` ((W, E)); transformers keeps separate q/k/v Linears and ``nn.Linear`` projections
    (weight (E, W)), hence the split and the transposes."""
    converted: dict[str, Tensor] = {}

    def tower(prefix_in: str, prefix_out: str) -> None:
        layers = {
            int(key.split(".")[3 if prefix_in else 2])
            for key in state
            if key.startswith(f"{prefix_in}transformer.resblocks.")
        }
        for index in sorted(layers):
            source = f"{prefix_in}transformer.resblocks.{index}."
            target = f"{prefix_out}encoder.layers.{index}."
            weight = state[source + "attn.in_proj_weight"]
            bias = state[source + "attn.in_proj_bias"]
            for name, part_weight, part_bias in zip(
                ("q_proj", "k_proj", "v_proj"), weight.chunk(3), bias.chunk(3), strict=True
            ):
                converted[target + f"self_attn.{name}.weight"] = part_weight
                converted[target + f"self_attn.{name}.bias"] = part_bias
            pairs = {
                "attn.out_proj": "self_attn.out_proj",
                "ln_1": "layer_norm1",
                "ln_2": "layer_norm2",
                "mlp.c_fc": "mlp.fc1",
                "mlp.c_proj": "mlp.fc2",
            }
            for old, new in pairs.items():
                for suffix in ("weight", "bias"):
                    converted[f"{target}{new}.{suffix}"] = state[f"{source}{old}.{suffix}"]

    tower("visual.", "vision_model.")
    tower("", "text_model.")
    vision = "vision_model.embeddings."
    converted[vision + "class_embedding"] = state["visual.class_embedding"]
    converted[vision + "patch_embedding.weight"] = state["visual.conv1.weight"]
    converted[vision + "position_embedding.weight"] = state["visual.positional_embedding"]
    for old, new in (("visual.ln_pre", "vision_model.pre_layrnorm"),
                     ("visual.ln_post", "vision_model.post_layernorm"),
                     ("ln_final", "text_model.final_layer_norm")):  # fmt: skip
        for suffix in ("weight", "bias"):
            converted[f"{new}.{suffix}"] = state[f"{old}.{suffix}"]
    converted["visual_projection.weight"] = state["visual.proj"].t().contiguous()
    converted["text_projection.weight"] = state["text_projection"].t().contiguous()
    converted["text_model.embeddings.token_embedding.weight"] = state["token_embedding.weight"]
    converted["text_model.embeddings.position_embedding.weight"] = state["positional_embedding"]
    converted["logit_scale"] = state["logit_scale"].reshape(())
    return converted


def vit_h14_config():
    """open_clip's ViT-H-14 as a transformers CLIPConfig (GELU, 1024-d embeddings)."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "hidden_act": "gelu",
            "max_position_embeddings": 77,
            "vocab_size": 49408,
        },
        vision_config={
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_attention_heads": 16,
            "num_hidden_layers": 32,
            "patch_size": 14,
            "image_size": 224,
            "hidden_act": "gelu",
        },
        projection_dim=1024,
    )


def load_hpsv2_state(path: str) -> dict[str, Tensor]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_strictly(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """load_state_dict that tolerates only transformers' non-weight buffers (position ids)."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches raise even with strict=False
        raise ValueError(
            f"{source}: the checkpoint does not fit the architecture ({_first_line(error)})"
        ) from error
    missing = [key for key in missing if not key.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"{source}: the checkpoint does not fit the architecture (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )


CONVENTIONS = ("default", "reference")


def _load_clip(source: str, flag: str):
    from transformers import CLIPModel

    try:
        return CLIPModel.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"{flag} {source}: not a transformers CLIP model folder ({_first_line(error)})"
        ) from error


def _load_tokenizer(source: str, flag: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"{flag} {source}: not a tokenizer folder ({_first_line(error)})"
        ) from error


def _load_torch_file(path: str, flag: str):
    """torch.load of a weight file; garbage, empty or truncated files name the file and flag."""
    if Path(path).is_dir():
        raise ValueError(f"{flag} {path}: is a folder, expected a weight file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and EOF errors all mean the same: unreadable
        raise ValueError(
            f"{flag} {path}: not a readable PyTorch weight file ({_first_line(error)})"
        ) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def build_scorer(
    metric: str,
    sources: WeightSources,
    device: torch.device,
    conventions: str = "default",
    loaded: dict | None = None,
):
    """The scorer of one metric from local weights; raises MissingWeights (names file + flag).

    ``conventions``: "default" scores as each metric's original package does; "reference" as the
    official Diffusion-SDPO evaluation scripts do (see the README). ``loaded``: a dict shared
    across calls so that a CLIP model asked for by two metrics (CLIP ViT-L/14 for clip and
    aesthetics) loads once."""
    if conventions not in CONVENTIONS:
        raise ValueError(
            f"conventions: expected one of {', '.join(CONVENTIONS)}, got {conventions!r}"
        )
    loaded = {} if loaded is None else loaded
    reference = conventions == "reference"

    def clip_model(key: str, flag: str):
        source = sources.resolve(key, flag)
        if ("clip", source) not in loaded:
            loaded[("clip", source)] = (_load_clip(source, flag), source)
        return loaded[("clip", source)]

    def tokenizer(key: str, flag: str):
        source = sources.resolve(key, flag)
        if ("tokenizer", source) not in loaded:
            loaded[("tokenizer", source)] = _load_tokenizer(source, flag)
        return loaded[("tokenizer", source)]

    if metric == "pickscore":
        model, source = clip_model("pickscore", "--pickscore")
        # PickScore's own code multiplies by logit_scale; the reference scripts keep the cosine.
        kind = "cosine" if reference else "pickscore"
        scorer = ClipScorer(
            "pickscore",
            model,
            tokenizer("pickscore_processor", "--pickscore-processor"),
            kind,
            device,
            clip_processor_preprocess,
        )
        scorer.sources = {"model": source}
        return scorer
    if metric == "clip":
        if reference:
            # The reference "CLIP score": open_clip ViT-H-14 (laion2B-s32B-b79K), plain cosine,
            # open_clip's eval transform and tokenizer.
            sources.resolve("pickscore_processor", "--pickscore-processor")
            open_clip_clean_text("")  # ftfy missing: an error now, before the weights load
            model, source = clip_model("pickscore_processor", "--pickscore-processor")
            scorer = ClipScorer(
                "clip",
                model,
                tokenizer("pickscore_processor", "--pickscore-processor"),
                "cosine",
                device,
                open_clip_preprocess,
                open_clip_clean_text,
            )
        else:
            model, source = clip_model("clip", "--clip")
            scorer = ClipScorer(
                "clip",
                model,
                tokenizer("clip", "--clip"),
                "clip",
                device,
                clip_processor_preprocess,
            )
        scorer.sources = {"model": source}
        return scorer
    if metric == "hpsv2":
        path = sources.resolve("hpsv2", "--hpsv2")
        open_clip_clean_text("")  # ftfy missing: an error now, before the weights load
        state = _load_torch_file(path, "--hpsv2")
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise ValueError(f"--hpsv2 {path}: expected a state dict, got {type(state).__name__}")
        state = {key.removeprefix("module."): value for key, value in state.items()}
        from transformers import CLIPModel

        model = CLIPModel(vit_h14_config())
        try:
            converted = open_clip_to_transformers(state)
        except KeyError as error:
            raise ValueError(
                f"--hpsv2 {path}: not an open_clip ViT-H-14 checkpoint (no {error})"
            ) from error
        load_strictly(model, converted, f"--hpsv2 {path}")
        # The hpsv2 package scores with its ResizeMaxSize transform; the reference scripts build
        # mainline open_clip's transforms (short side + centre crop).
        scorer = ClipScorer(
            "hpsv2",
            model,
            tokenizer("pickscore_processor", "--pickscore-processor"),
            "cosine",
            device,
            open_clip_preprocess if reference else hpsv2_preprocess,
            open_clip_clean_text,
        )
        scorer.sources = {"checkpoint": path}
        return scorer
    if metric == "aesthetics":
        head_path = sources.resolve("aesthetics_head", "--aesthetics-head")
        model, source = clip_model("clip", "--clip")
        clip = ClipScorer("clip", model, None, "clip", device)
        head = AestheticsScorer.build_head(model.config.projection_dim)
        head_state = _load_torch_file(head_path, "--aesthetics-head")
        if not isinstance(head_state, dict):
            raise ValueError(f"--aesthetics-head {head_path}: expected a state dict")
        load_strictly(head, head_state, f"--aesthetics-head {head_path}")
        preprocess = clip_processor_preprocess if reference else openai_clip_preprocess
        scorer = AestheticsScorer(clip, head, preprocess)
        scorer.sources = {"head": head_path, "clip": source}
        return scorer
    if metric == "imagereward":
        path = sources.resolve("imagereward", "--imagereward")
        bert = tokenizer("imagereward_tokenizer", "--imagereward-tokenizer")
        state = _load_torch_file(path, "--imagereward")
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise ValueError(f"--imagereward {path}: expected a state dict")
        model = imagereward.ImageRewardModel()
        load_strictly(model, imagereward.convert_checkpoint(state), f"--imagereward {path}")
        scorer = imagereward.ImageRewardScorer(model, bert, device)
        scorer.sources = {"checkpoint": path}
        return scorer
    raise ValueError(f"metrics: unknown {metric!r}; expected some of {', '.join(METRICS)}")
