"""Reward models for ``sdpo-eval score``, built from maintained libraries, weights from local disk.

| metric | architecture | weights (flag / --weights-root NAME / HF cache id) | score |
|---|---|---|---|
| pickscore | transformers CLIPModel (ViT-H-14) | --pickscore, PickScore_v1, yuvalkirstain/PickScore_v1; tokenizer --pickscore-processor, CLIP-ViT-H-14-laion2B-s32B-b79K, laion/CLIP-ViT-H-14-laion2B-s32B-b79K | logit_scale.exp() * cos(image, text) |
| hpsv2 | open_clip ViT-H-14, loaded into a CLIPModel by key mapping | --hpsv2 (HPS_v2_compressed.pt / HPS_v2.1_compressed.pt), weights-root HPS_v2.1_compressed.pt, xswu/HPSv2 (either file); tokenizer as pickscore | cos(image, text) |
| clip | CLIPModel (ViT-L/14) | --clip, clip-vit-large-patch14, openai/clip-vit-large-patch14 | 100 * max(cos, 0) (torchmetrics' CLIPScore) |
| aesthetics | LAION MLP head on L2-normalised CLIP ViT-L/14 image features | --aesthetics-head (sac+logos+ava1-l14-linearMSE.pth), CLIP as clip | the head's output |
| imagereward | BLIP ViT-L + BERT cross-attention encoder + MLP (sdpo/eval/imagereward.py) | --imagereward (ImageReward.pt), THUDM/ImageReward; tokenizer --imagereward-tokenizer, bert-base-uncased, google-bert/bert-base-uncased | (r - mean) / std, as ImageReward.score |

Nothing is downloaded: HF ids resolve only from the local cache, to the cached snapshot folder or
file. A missing weight raises :class:`MissingWeights` naming the file and the flag.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

METRICS = ("pickscore", "hpsv2", "aesthetics", "clip", "imagereward")
# OpenAI CLIP's normalisation; the LAION ViT-H-14 models (PickScore, HPSv2) use the same.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
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


def file_hash(path: str) -> str | None:
    """sha256 of a weight file (the first 64 MB and the size, so hashing a 4 GB file is fast
    and still tells two checkpoints apart), or None for a hub id / folder."""
    file = Path(path)
    if not file.is_file():
        return None
    digest = hashlib.sha256(str(file.stat().st_size).encode())
    with open(file, "rb") as handle:
        digest.update(handle.read(64 * 2**20))
    return digest.hexdigest()


def preprocess(images: list, size: int) -> Tensor:
    """PIL images -> (N, 3, size, size): shorter side to ``size`` (bicubic), centre crop, CLIP
    normalisation, as CLIPImageProcessor and open_clip's transform do.

    The longer side becomes ``int(size * long / short)``, truncated as CLIPImageProcessor and
    torchvision's Resize compute it (rounding instead shifts the crop of a 57x40 image by a pixel
    and moves normalised values by up to 2.4)."""
    from PIL import Image

    batch = []
    for image in images:
        image = image.convert("RGB")
        short = min(image.size)
        width, height = (
            size if image.width == short else int(size * image.width / short),
            size if image.height == short else int(size * image.height / short),
        )
        image = image.resize((width, height), Image.BICUBIC)
        left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        batch.append(pixels.view(size, size, 3).permute(2, 0, 1).float() / 255.0)
    stacked = torch.stack(batch)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (stacked - mean) / std


class ClipScorer:
    """A CLIPModel and tokenizer; ``kind`` picks the score (see the module table)."""

    def __init__(self, name: str, model, tokenizer, kind: str, device: torch.device) -> None:
        self.name, self.model, self.tokenizer, self.kind = (
            name,
            model.eval().to(device),
            tokenizer,
            kind,
        )
        self.device = device
        self.image_size = model.config.vision_config.image_size
        self.sources: dict[str, str] = {}

    @torch.no_grad()
    def features(self, images: list, prompts: list[str] | None) -> tuple[Tensor, Tensor | None]:
        pixels = preprocess(images, self.image_size).to(self.device, self.model.dtype)
        image = self.model.get_image_features(pixel_values=pixels)
        image = getattr(image, "pooler_output", image)
        text = None
        if prompts is not None:
            tokens = self.tokenizer(
                prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt"
            ).to(self.device)
            text = self.model.get_text_features(
                input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
            )
            text = getattr(text, "pooler_output", text)
            text = nn.functional.normalize(text.float(), dim=-1)
        return nn.functional.normalize(image.float(), dim=-1), text

    def score(self, images: list, prompts: list[str]) -> list[float]:
        image, text = self.features(images, prompts)
        cosine = (image * text).sum(-1)
        if self.kind == "pickscore":
            values = self.model.logit_scale.exp().float() * cosine
        elif self.kind == "clip":
            values = 100.0 * cosine.clamp_min(0.0)
        else:  # hpsv2
            values = cosine
        return values.cpu().tolist()


class AestheticsScorer:
    """The LAION head (Linear 768-1024-128-64-16-1, dropout between, no activations) on
    L2-normalised CLIP ViT-L/14 image embeddings."""

    def __init__(self, clip: ClipScorer, head: nn.Module) -> None:
        self.name, self.clip, self.head = "aesthetics", clip, head.eval().to(clip.device)
        self.sources: dict[str, str] = {}

    @staticmethod
    def build_head(width: int = 768) -> nn.Module:
        head = nn.Module()
        head.layers = nn.Sequential(
            nn.Linear(width, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )
        head.forward = lambda features: head.layers(features)
        return head

    @torch.no_grad()
    def score(self, images: list, prompts: list[str]) -> list[float]:
        image, _ = self.clip.features(images, None)
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
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"{source}: the checkpoint does not fit the architecture (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )


def _load_clip(source: str):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(source, local_files_only=True)


def _load_tokenizer(source: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, local_files_only=True)


def build_scorer(metric: str, sources: WeightSources, device: torch.device):
    """The scorer of one metric from local weights; raises MissingWeights (names file + flag)."""
    from transformers import CLIPModel

    if metric == "pickscore":
        model = _load_clip(sources.resolve("pickscore", "--pickscore"))
        tokenizer = _load_tokenizer(sources.resolve("pickscore_processor", "--pickscore-processor"))
        scorer = ClipScorer("pickscore", model, tokenizer, "pickscore", device)
        scorer.sources = {"model": sources.resolve("pickscore", "--pickscore")}
        return scorer
    if metric == "clip":
        source = sources.resolve("clip", "--clip")
        scorer = ClipScorer("clip", _load_clip(source), _load_tokenizer(source), "clip", device)
        scorer.sources = {"model": source}
        return scorer
    if metric == "hpsv2":
        path = sources.resolve("hpsv2", "--hpsv2")
        tokenizer = _load_tokenizer(sources.resolve("pickscore_processor", "--pickscore-processor"))
        model = CLIPModel(vit_h14_config())
        load_strictly(model, open_clip_to_transformers(load_hpsv2_state(path)), path)
        scorer = ClipScorer("hpsv2", model, tokenizer, "hpsv2", device)
        scorer.sources = {"checkpoint": path}
        return scorer
    if metric == "aesthetics":
        head_path = sources.resolve("aesthetics_head", "--aesthetics-head")
        source = sources.resolve("clip", "--clip")
        clip = ClipScorer("clip", _load_clip(source), _load_tokenizer(source), "clip", device)
        head = AestheticsScorer.build_head(clip.model.config.projection_dim)
        head.load_state_dict(torch.load(head_path, map_location="cpu", weights_only=True))
        scorer = AestheticsScorer(clip, head)
        scorer.sources = {"head": head_path, "clip": source}
        return scorer
    if metric == "imagereward":
        from sdpo.eval import imagereward

        path = sources.resolve("imagereward", "--imagereward")
        tokenizer = _load_tokenizer(
            sources.resolve("imagereward_tokenizer", "--imagereward-tokenizer")
        )
        model = imagereward.ImageRewardModel()
        load_strictly(
            model, imagereward.convert_checkpoint(imagereward.load_checkpoint(path)), path
        )
        scorer = imagereward.ImageRewardScorer(model, tokenizer, device)
        scorer.sources = {"checkpoint": path}
        return scorer
    raise ValueError(f"metrics: unknown {metric!r}; expected some of {', '.join(METRICS)}")
