"""ImageReward (Xu et al. 2023) on maintained libraries: transformers' BLIP vision and text models.

The PyPI ``image-reward`` package fails to import with current transformers, so ``ImageReward.pt``
is loaded into transformers' ``BlipVisionModel`` (BLIP ViT-L/16: 24 layers, width 1024) and
``BlipTextModel`` (the BERT-base "med" encoder with cross-attention to the image tokens). The score
(as the reference ``ImageReward.score``): the prompt tokenised by BERT's uncased tokenizer (max 35
tokens), the text encoder attending to the image embeddings, the first token's feature through
the MLP head (768-1024-128-64-16-1, dropout between, no activations), then
``(r - 0.16717362830052426) / 1.0333394966054072``. Images: ImageReward's torchvision transform
(``preprocess.imagereward_preprocess``: Resize(224, bicubic), CenterCrop, CLIP normalisation).

Checkpoint names map onto transformers' as: ``blip.visual_encoder.{cls_token, pos_embed,
patch_embed.proj, blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm}`` ->
``embeddings.{class_embedding, position_embedding, patch_embedding}``,
``encoder.layers.i.{layer_norm1, self_attn.qkv, self_attn.projection, layer_norm2, mlp.fc1,
mlp.fc2}``, ``post_layernorm``; ``blip.text_encoder.*`` keeps its names; ``mlp.layers.*`` is the
head. ``blip.vision_proj`` / ``blip.text_proj`` (retrieval heads) are not used by the score.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sdpo.eval.preprocess import imagereward_preprocess

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TOKENS = 35
UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")


def vision_config(**overrides):
    from transformers import BlipVisionConfig

    values = dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=16,
        layer_norm_eps=1e-6,  # BLIP's ViT (timm-style LayerNorm eps)
        hidden_act="gelu",
    )
    return BlipVisionConfig(**(values | overrides))


def text_config(**overrides):
    from transformers import BlipTextConfig

    values = dict(
        vocab_size=30524,  # bert-base-uncased + BLIP's [DEC] and [ENC] tokens
        hidden_size=768,
        encoder_hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=512,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        is_decoder=True,  # builds the cross-attention layers; the score calls it bidirectionally
    )
    return BlipTextConfig(**(values | overrides))


def mlp_head(width: int) -> nn.Module:
    """The MLP head shared by ImageReward and the LAION aesthetics predictor: Linear
    width-1024-128-64-16-1 with dropout between and no activations, under ``layers.*`` (both
    checkpoints' names)."""
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


class ImageRewardModel(nn.Module):
    def __init__(self, vision=None, text=None) -> None:
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision or vision_config())
        self.text = BlipTextModel(text or text_config(), add_pooling_layer=False)
        self.head = mlp_head(self.text.config.hidden_size)

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        text = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        ).last_hidden_state
        reward = self.head(text[:, 0, :].float()).squeeze(-1)
        return (reward - REWARD_MEAN) / REWARD_STD


def convert_checkpoint(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """ImageReward.pt's names -> ImageRewardModel's (see the module docstring)."""
    vision_names = {
        "norm1": "layer_norm1",
        "attn.qkv": "self_attn.qkv",
        "attn.proj": "self_attn.projection",
        "norm2": "layer_norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    converted: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith(UNUSED_PREFIXES) or key.endswith("position_ids"):
            continue
        if key.startswith("blip.text_encoder."):
            converted["text." + key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp.layers."):
            converted["head." + key.removeprefix("mlp.")] = value
        elif key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            simple = {
                "cls_token": "embeddings.class_embedding",
                "pos_embed": "embeddings.position_embedding",
                "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
                "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
                "norm.weight": "post_layernorm.weight",
                "norm.bias": "post_layernorm.bias",
            }
            if name in simple:
                converted["vision." + simple[name]] = value
            elif name.startswith("blocks."):
                _, index, rest = name.split(".", 2)
                module, _, kind = rest.rpartition(".")
                if module not in vision_names:
                    unknown.append(key)
                    continue
                converted[f"vision.encoder.layers.{index}.{vision_names[module]}.{kind}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"imagereward: unexpected checkpoint entries {unknown[:5]}")
    return converted


class ImageRewardScorer:
    def __init__(self, model: ImageRewardModel, tokenizer, device: torch.device) -> None:
        self.name, self.model, self.tokenizer, self.device = "imagereward", model, tokenizer, device
        self.model.eval().to(device)
        self.image_size = model.vision.config.image_size
        self.sources: dict[str, str] = {}

    @torch.no_grad()
    def score(self, images: list, prompts: list[str]) -> list[float]:
        pixels = imagereward_preprocess(images, self.image_size).to(self.device)
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=MAX_TOKENS,
            return_tensors="pt",
        ).to(self.device)
        return self.model(pixels, tokens.input_ids, tokens.attention_mask).cpu().tolist()


def load_checkpoint(path: str) -> dict[str, Tensor]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint.get("state_dict", checkpoint)
