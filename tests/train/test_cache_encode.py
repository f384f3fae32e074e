"""sdpo-cache's encode loop: chunked VAE calls, bf16 encoding's error, decoding workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdpo.train.cache import _encode, build_cache
from sdpo.train.data import UnreadableImage, load_records, preprocess
from sdpo.train.models import build_tiny


def tiny_vae_and_pixels(images: int = 10, resolution: int = 32):
    models = build_tiny(resolution, seed=0)
    models.vae.eval()
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand((images, 3, resolution, resolution), generator=generator) * 2 - 1
    return models, pixels


def test_encoding_in_chunks_matches_one_call_and_bounds_each_call(monkeypatch):
    models, pixels = tiny_vae_and_pixels()
    whole = models.vae.encode(pixels).latent_dist
    sizes = []
    real_encode = models.vae.encode

    def spy(chunk, *args, **kwargs):
        sizes.append(len(chunk))
        return real_encode(chunk, *args, **kwargs)

    monkeypatch.setattr(models.vae, "encode", spy)
    mean, std = _encode(models, pixels, batch_images=4)
    assert sizes == [4, 4, 2]
    torch.testing.assert_close(mean, whole.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, whole.std, rtol=1e-5, atol=1e-6)


def test_bf16_encoding_error_on_the_tiny_vae_is_small():
    """bf16 autocast against fp32 on the tiny random VAE (CPU autocast, 64 images at 64 px):
    measured mean error 0.8% of the latents' spread (max 6%), std within 0.8%, and the mean
    KL(fp32 || bf16) per latent element 7e-6. The bounds below leave ~2x room."""
    models, pixels = tiny_vae_and_pixels(images=64, resolution=64)
    mean32, std32 = _encode(models, pixels, 32, torch.float32)
    mean16, std16 = _encode(models, pixels, 32, torch.bfloat16)
    assert not torch.equal(mean16, mean32)  # bf16 really ran
    spread = mean32.std()
    assert ((mean16 - mean32).abs().mean() / spread) < 0.02
    assert ((mean16 - mean32).abs().max() / spread) < 0.15
    assert ((std16 - std32).abs() / std32).max() < 0.02
    kl = torch.log(std16 / std32) + (std32**2 + (mean32 - mean16) ** 2) / (2 * std16**2) - 0.5
    assert kl.mean() < 2e-5


def test_decoding_workers_write_the_same_cache(tmp_path):
    shards = {}
    for workers in (0, 2):
        output = tmp_path / f"workers{workers}"
        build_cache(
            data=None,
            output_dir=str(output),
            model="tiny",
            pretrained=None,
            resolution=16,
            synthetic_pairs=12,
            shard_pairs=5,
            num_workers=workers,
            encode_batch=3,
        )
        shards[workers] = {
            path.name: load_file(str(path)) for path in sorted(Path(output).glob("shard-*"))
        }
    assert list(shards[0]) == list(shards[2]) and len(shards[0]) == 3
    for name, tensors in shards[0].items():
        for key, value in tensors.items():
            assert torch.equal(value, shards[2][name][key]), (name, key)


def write_pair_images(folder: Path, pairs: int) -> Path:
    """A JSONL manifest of ``pairs`` pairs of random PNGs of varied sizes; pair 2's loser is a
    corrupt file (the cache skips that pair)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(1)
    lines = []
    for index in range(pairs):
        names = []
        for side in ("w", "l"):
            height, width = 20 + index % 3 * 4, 18 + index % 4 * 5
            pixels = torch.randint(0, 256, (height, width, 3), generator=generator)
            name = f"{index}{side}.png"
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / name)
            names.append(name)
        lines.append(
            json.dumps({"caption": f"pair {index}", "winner": names[0], "loser": names[1]})
        )
    (folder / "2l.png").write_bytes(b"not a png")
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


@torch.no_grad()
def expected_shards(manifest: Path, resolution: int, shard_pairs: int, encode_batch: int):
    """The cache's content computed directly: each readable pair's four views (as is and
    flipped), a shard's views run through diffusers' AutoencoderKL ``encode`` in calls of
    ``encode_batch`` from the shard's first view (the calls sdpo-cache has always made), the
    captions through the text encoder."""
    models = build_tiny(resolution, seed=0)
    models.vae.eval()
    records = load_records(str(manifest), resolution=resolution, synthetic_pairs=0, seed=0)
    readable = []
    for record in records:
        try:
            winner = preprocess(record.winner, resolution, flip=False)
            loser = preprocess(record.loser, resolution, flip=False)
        except UnreadableImage:
            continue
        readable.append((winner, loser, record.caption))
    shards = []
    for start in range(0, len(readable), shard_pairs):
        pairs = readable[start : start + shard_pairs]
        views = torch.cat(
            [torch.stack([win, win.flip(-1), lose, lose.flip(-1)]) for win, lose, _ in pairs]
        )
        calls = [
            models.vae.encode(views[first : first + encode_batch]).latent_dist
            for first in range(0, len(views), encode_batch)
        ]
        mean = torch.cat([call.mean for call in calls]).view(len(pairs), 2, 2, 4, 8, 8)
        std = torch.cat([call.std for call in calls]).view(len(pairs), 2, 2, 4, 8, 8)
        hidden, _ = models.text([caption for _, _, caption in pairs], torch.device("cpu"))
        shards.append(
            {
                "winner_mean": mean[:, 0],
                "winner_std": std[:, 0],
                "loser_mean": mean[:, 1],
                "loser_std": std[:, 1],
                "hidden": hidden,
            }
        )
    return shards, [caption for _, _, caption in readable]


@pytest.mark.parametrize("workers", [0, 1])
def test_the_cache_is_bitwise_the_direct_encoding(tmp_path, workers):
    """fp32 storage, so every bit of the encoder's output shows. 11 pairs (one unreadable) in
    shards of 4 and encoder calls of 6 views: calls split a pair's views and cross the
    decoding batches, and the last shard is short."""
    manifest = write_pair_images(tmp_path, pairs=11)
    output = tmp_path / "cache"
    index = build_cache(
        data=str(manifest),
        output_dir=str(output),
        model="tiny",
        pretrained=None,
        resolution=16,
        shard_pairs=4,
        storage_dtype="float32",
        encode_batch=6,
        num_workers=workers,
        device="cpu",
    )
    shards, captions = expected_shards(manifest, resolution=16, shard_pairs=4, encode_batch=6)
    assert index["captions"] == captions and index["skipped_pairs"] == 1
    assert [shard["pairs"] for shard in index["shards"]] == [4, 4, 2]
    for entry, expected in zip(index["shards"], shards, strict=True):
        written = load_file(str(output / entry["file"]))
        assert written.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(written[key], value), (entry["file"], key)
