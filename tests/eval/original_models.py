"""The original architectures' forward passes, written from their checkpoints' own names.

open_clip's CLIP (what HPS_v2_compressed.pt holds) and BLIP's ViT (the image half of
ImageReward.pt), run straight from state dicts named as those checkpoints name them, with the
torch modules the originals use (``nn.MultiheadAttention`` with a fused ``in_proj_weight`` for
open_clip; a fused ``qkv`` Linear split as (3, heads, head_dim) for BLIP's ViT). The scorers map
these names onto transformers' CLIPModel and BlipVisionModel; the tests compare the two forward
passes on random weights, so a wrong split, transpose, activation, epsilon or pooling in the
mapping shows up as a numerical difference, not only as a missing key.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def random_open_clip_state(
    *,
    vision_width: int,
    vision_layers: int,
    patch_size: int,
    image_size: int,
    text_width: int,
    text_layers: int,
    context_length: int,
    vocab_size: int,
    embed_dim: int,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Random weights under open_clip's names and shapes (the layout of HPS_v2_compressed.pt)."""
    generator = torch.Generator().manual_seed(seed)

    def random(*shape: int, scale: float = 0.2) -> Tensor:
        return scale * torch.randn(*shape, generator=generator)

    state: dict[str, Tensor] = {}

    def tower(prefix: str, width: int, layers: int) -> None:
        for index in range(layers):
            block = f"{prefix}transformer.resblocks.{index}."
            state[block + "attn.in_proj_weight"] = random(3 * width, width)
            state[block + "attn.in_proj_bias"] = random(3 * width)
            state[block + "attn.out_proj.weight"] = random(width, width)
            state[block + "attn.out_proj.bias"] = random(width)
            for norm in ("ln_1", "ln_2"):
                state[block + f"{norm}.weight"] = 1 + random(width)
                state[block + f"{norm}.bias"] = random(width)
            state[block + "mlp.c_fc.weight"] = random(4 * width, width)
            state[block + "mlp.c_fc.bias"] = random(4 * width)
            state[block + "mlp.c_proj.weight"] = random(width, 4 * width)
            state[block + "mlp.c_proj.bias"] = random(width)

    grid = image_size // patch_size
    tower("visual.", vision_width, vision_layers)
    state["visual.conv1.weight"] = random(vision_width, 3, patch_size, patch_size)
    state["visual.class_embedding"] = random(vision_width)
    state["visual.positional_embedding"] = random(grid * grid + 1, vision_width)
    for norm in ("visual.ln_pre", "visual.ln_post"):
        state[f"{norm}.weight"] = 1 + random(vision_width)
        state[f"{norm}.bias"] = random(vision_width)
    state["visual.proj"] = random(vision_width, embed_dim)
    tower("", text_width, text_layers)
    state["token_embedding.weight"] = random(vocab_size, text_width)
    state["positional_embedding"] = random(context_length, text_width)
    state["ln_final.weight"] = 1 + random(text_width)
    state["ln_final.bias"] = random(text_width)
    state["text_projection"] = random(text_width, embed_dim)
    state["logit_scale"] = torch.tensor(4.6052)
    return state


def _layer_norm(state: dict[str, Tensor], name: str, x: Tensor, eps: float = 1e-5) -> Tensor:
    return nn.functional.layer_norm(
        x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps
    )


def _open_clip_transformer(
    state: dict[str, Tensor], prefix: str, x: Tensor, heads: int, causal: bool
) -> Tensor:
    """open_clip's residual attention blocks (x: batch first here, as the math is the same)."""
    width = x.shape[-1]
    length = x.shape[1]
    mask = None
    if causal:  # open_clip's build_attention_mask: -inf above the diagonal
        mask = torch.full((length, length), float("-inf")).triu(1)
    index = 0
    while f"{prefix}transformer.resblocks.{index}.ln_1.weight" in state:
        block = f"{prefix}transformer.resblocks.{index}."
        attention = nn.MultiheadAttention(width, heads, batch_first=True)
        attention.load_state_dict(
            {
                "in_proj_weight": state[block + "attn.in_proj_weight"],
                "in_proj_bias": state[block + "attn.in_proj_bias"],
                "out_proj.weight": state[block + "attn.out_proj.weight"],
                "out_proj.bias": state[block + "attn.out_proj.bias"],
            }
        )
        normed = _layer_norm(state, block + "ln_1", x)
        x = x + attention(normed, normed, normed, need_weights=False, attn_mask=mask)[0]
        hidden = nn.functional.linear(
            _layer_norm(state, block + "ln_2", x),
            state[block + "mlp.c_fc.weight"],
            state[block + "mlp.c_fc.bias"],
        )
        # ViT-H-14 is not a "quickgelu" model: nn.GELU (erf form).
        x = x + nn.functional.linear(
            nn.functional.gelu(hidden),
            state[block + "mlp.c_proj.weight"],
            state[block + "mlp.c_proj.bias"],
        )
        index += 1
    return x


@torch.no_grad()
def open_clip_encode_image(state: dict[str, Tensor], pixels: Tensor, heads: int) -> Tensor:
    weight = state["visual.conv1.weight"]
    x = nn.functional.conv2d(pixels, weight, stride=weight.shape[-1])  # no bias in open_clip
    x = x.flatten(2).transpose(1, 2)
    cls = state["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + state["visual.positional_embedding"]
    x = _layer_norm(state, "visual.ln_pre", x)
    x = _open_clip_transformer(state, "visual.", x, heads, causal=False)
    pooled = _layer_norm(state, "visual.ln_post", x[:, 0])  # the class token
    return pooled @ state["visual.proj"]


@torch.no_grad()
def open_clip_encode_text(state: dict[str, Tensor], tokens: Tensor, heads: int) -> Tensor:
    """``tokens`` as open_clip's tokenizer writes them: [sot] ... [eot] then zeros; the pooled
    feature is the one at the highest token id (the end-of-text token)."""
    x = state["token_embedding.weight"][tokens] + state["positional_embedding"][: tokens.shape[1]]
    x = _open_clip_transformer(state, "", x, heads, causal=True)
    x = _layer_norm(state, "ln_final", x)
    pooled = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
    return pooled @ state["text_projection"]


def random_blip_vit_state(
    *, width: int, layers: int, patch_size: int, image_size: int, mlp_width: int, seed: int = 0
) -> dict[str, Tensor]:
    """Random weights under ImageReward.pt's names for BLIP's ViT (``blip.visual_encoder.*``)."""
    generator = torch.Generator().manual_seed(seed)

    def random(*shape: int, scale: float = 0.2) -> Tensor:
        return scale * torch.randn(*shape, generator=generator)

    prefix = "blip.visual_encoder."
    tokens = (image_size // patch_size) ** 2 + 1
    state = {
        prefix + "cls_token": random(1, 1, width),
        prefix + "pos_embed": random(1, tokens, width),
        prefix + "patch_embed.proj.weight": random(width, 3, patch_size, patch_size),
        prefix + "patch_embed.proj.bias": random(width),
        prefix + "norm.weight": 1 + random(width),
        prefix + "norm.bias": random(width),
    }
    for index in range(layers):
        block = f"{prefix}blocks.{index}."
        for norm in ("norm1", "norm2"):
            state[block + f"{norm}.weight"] = 1 + random(width)
            state[block + f"{norm}.bias"] = random(width)
        state[block + "attn.qkv.weight"] = random(3 * width, width)
        state[block + "attn.qkv.bias"] = random(3 * width)
        state[block + "attn.proj.weight"] = random(width, width)
        state[block + "attn.proj.bias"] = random(width)
        state[block + "mlp.fc1.weight"] = random(mlp_width, width)
        state[block + "mlp.fc1.bias"] = random(mlp_width)
        state[block + "mlp.fc2.weight"] = random(width, mlp_width)
        state[block + "mlp.fc2.bias"] = random(width)
    return state


@torch.no_grad()
def blip_vit_forward(state: dict[str, Tensor], pixels: Tensor, heads: int) -> Tensor:
    """BLIP's VisionTransformer.forward: every token's feature after the final norm."""
    prefix = "blip.visual_encoder."
    weight = state[prefix + "patch_embed.proj.weight"]
    x = nn.functional.conv2d(
        pixels, weight, state[prefix + "patch_embed.proj.bias"], stride=weight.shape[-1]
    )
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state[prefix + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    x = x + state[prefix + "pos_embed"][:, : x.shape[1]]
    batch, length, width = x.shape
    index = 0
    while f"{prefix}blocks.{index}.norm1.weight" in state:
        block = f"{prefix}blocks.{index}."
        normed = _layer_norm(state, block + "norm1", x, eps=1e-6)  # BLIP's ViT: eps 1e-6
        qkv = nn.functional.linear(
            normed, state[block + "attn.qkv.weight"], state[block + "attn.qkv.bias"]
        )
        qkv = qkv.reshape(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        query, key, value = qkv[0], qkv[1], qkv[2]
        weights = (query @ key.transpose(-2, -1) * (width // heads) ** -0.5).softmax(dim=-1)
        attended = (weights @ value).transpose(1, 2).reshape(batch, length, width)
        x = x + nn.functional.linear(
            attended, state[block + "attn.proj.weight"], state[block + "attn.proj.bias"]
        )
        hidden = nn.functional.linear(
            _layer_norm(state, block + "norm2", x, eps=1e-6),
            state[block + "mlp.fc1.weight"],
            state[block + "mlp.fc1.bias"],
        )
        x = x + nn.functional.linear(
            nn.functional.gelu(hidden),
            state[block + "mlp.fc2.weight"],
            state[block + "mlp.fc2.bias"],
        )
        index += 1
    return _layer_norm(state, prefix + "norm", x, eps=1e-6)
