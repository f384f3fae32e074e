"""`sdpo-cache`: precompute VAE latent distributions and text embeddings for training.

The command line is sdpo/train/cache_cli.py (it imports this module once its flags parse).

The reference trainers run the VAE and the text encoders on every step (docs/objectives.md,
'Pitfalls of the reference trainers', 4). The cache stores, per pair, the latent distribution's
mean and std of the winner and the loser, each both as is and horizontally flipped (the trainer's
independent flips stay exact), and the caption's text embedding, plus the empty caption's (caption
dropout). Training still SAMPLES latents (mean + std * noise) from the cached distribution, with
the same random draws an uncached run makes, so a cached run logs the same losses as an uncached
one (fp32 storage).

Layout: ``cache_index.json`` and ``shard-NNNNN.safetensors`` files of ``--shard-pairs`` pairs with
``winner_mean``, ``winner_std``, ``loser_mean``, ``loser_std`` (n, 2, C, h, w; index 1 = flipped),
``hidden`` (n, L, D) and, for SDXL, ``pooled`` (n, P); ``empty.safetensors`` for "".

The index also records the weights the cache was built from (``source``: the sha256 of the
VAE, text-encoder and tokenizer folders, or, for weights built in code, their name and seed).
Opening a cache (``check_cache``) checks, before any model loads, the index, every shard's
safetensors header (names, dtypes, shapes; not the data) and that the run's ``--pretrained``
has the same weights; each problem is one ``UsageError`` line naming the file.
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from sdpo.fingerprint import file_hash
from sdpo.train.cache_cli import ENCODE_DTYPE_NAMES, STORAGE_DTYPE_NAMES
from sdpo.train.checkpoint import warn
from sdpo.train.config import FLOW_MODELS, is_random, resolve_random_architecture
from sdpo.train.data import UnreadableImage, generator_for, load_records, pin_batch, preprocess
from sdpo.train.errors import UsageError
from sdpo.train.models import (
    FlowTextConditioner,
    Models,
    build_tiny,
    load_flow_family,
    load_pretrained,
)

INDEX_FILE = "cache_index.json"
EMPTY_FILE = "empty.safetensors"
# 2: the index records ``source``, the identity of the weights the cache was built from.
INDEX_VERSION = 2
# The parts of a pipeline folder a cache is computed from (those present are fingerprinted):
# the VAE for the latents, the text encoders and their tokenizers for the embeddings. The
# UNet / transformer is not: a cache serves any policy trained from the same encoders.
SOURCE_COMPONENTS = (
    "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
    "tokenizer_3",
)  # fmt: skip
LATENT_KEYS = ("winner_mean", "winner_std", "loser_mean", "loser_std")
# safetensors' dtype names in a header, by torch dtype name.
HEADER_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
# The names come from sdpo.train.cache_cli (the command line offers them without importing torch).
STORAGE_DTYPES = {name: getattr(torch, name) for name in STORAGE_DTYPE_NAMES}


def is_cache(path: str | None) -> bool:
    return path is not None and (Path(path).expanduser() / INDEX_FILE).is_file()


def _local_folder(pretrained: str) -> Path | None:
    """A local diffusers folder, or the snapshot folder of a model id in the local HF cache."""
    folder = Path(pretrained).expanduser()
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(pretrained, "model_index.json")
    except ValueError:  # not a valid repository id
        return None
    return Path(found).parent if isinstance(found, str) else None


def source_identity(
    model: str, pretrained: str | None, seed: int, preset: str | None = None
) -> dict:
    """What a cache's latents and embeddings depend on, in a form two runs can compare.

    A local folder (or a cached model id): the sha256 (sdpo.fingerprint.file_hash, as
    ``sdpo-eval score`` records for its weights) of each of its SOURCE_COMPONENTS, or of the
    whole folder when it has none of them. Weights built in code (no --pretrained: the tiny
    model; ``tiny``; ``random[:NAME]``, a flow model's by the architecture it resolves to, with
    ``preset`` as the trainer resolves it): their name and seed. A model id not on local disk
    yet: its name only."""
    if pretrained is None or pretrained == "tiny" or is_random(pretrained):
        name = pretrained or "tiny"
        if is_random(pretrained) and model in FLOW_MODELS:
            name = f"random:{resolve_random_architecture(model, pretrained, preset)}"
        return {"built_in_code": name, "seed": seed}
    folder = _local_folder(pretrained)
    if folder is None:
        return {"name": pretrained}
    hashes = {
        component: file_hash(folder / component)
        for component in SOURCE_COMPONENTS
        if (folder / component).is_dir()
    }
    return {"sha256": hashes or {".": file_hash(folder)}}


def _source_differences(built: dict, run: dict) -> str | None:
    """None when ``run`` has the weights ``built`` describes, else what differs, in words."""
    if "sha256" in built and "sha256" in run:
        names = sorted(built["sha256"].keys() | run["sha256"].keys())
        differing = [name for name in names if built["sha256"].get(name) != run["sha256"].get(name)]
        return f"their {', '.join(differing)} differ" if differing else None
    if built == run:
        return None
    if "name" in run:
        return "the run's model is not on local disk yet, so its weights cannot be compared"
    return "the weights differ"


def _describe_source(source: dict) -> str:
    if "built_in_code" in source:
        return f"{source['built_in_code']} (built in code, seed {source.get('seed')})"
    return "local weights" if "sha256" in source else str(source.get("name"))


def _refuse(root: Path, file: str, problem: str) -> UsageError:
    return UsageError(
        f"data: {root / file}: {problem}; rebuild the cache with sdpo-cache (same --output-dir)"
    )


def _header(root: Path, name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """A safetensors file's tensors as {name: (shape, dtype)}, from its header only (safe_open
    maps the file and checks the header covers it exactly: a truncated file is refused)."""
    path = root / name
    if not path.is_file():
        raise _refuse(root, name, "missing (the index lists it)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {
                key: (tuple(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype())
                for key in handle.keys()
            }
    except (SafetensorError, OSError) as error:
        raise _refuse(root, name, f"not a readable safetensors file ({error})") from None


def _check_tensors(
    root: Path, name: str, tensors: dict, expected: dict[str, tuple[tuple[int, ...], str]]
) -> None:
    """``tensors`` (a header) holds exactly ``expected``'s names with its shapes and dtypes."""
    if tensors.keys() != expected.keys():
        missing = sorted(expected.keys() - tensors.keys())
        extra = sorted(tensors.keys() - expected.keys())
        raise _refuse(root, name, f"holds tensors {sorted(tensors)} (missing {missing}, "
                      f"unexpected {extra})")  # fmt: skip
    for key, (shape, dtype) in expected.items():
        if tensors[key] != (shape, dtype):
            got_shape, got_dtype = tensors[key]
            raise _refuse(
                root,
                name,
                f"{key} is {got_dtype} {list(got_shape)}, expected {dtype} {list(shape)} (as the "
                "index and the other shards)",
            )


def _checked_index(root: Path) -> dict:
    """cache_index.json, read and its fields checked (types, counts, shard names)."""
    path = root / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except OSError as error:
        raise UsageError(f"data: cannot read {path} ({error.strerror or error})") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise _refuse(root, INDEX_FILE, f"not JSON ({error})") from None
    if not isinstance(index, dict):
        raise _refuse(root, INDEX_FILE, f"expected an object, got {type(index).__name__}")

    def field(key: str, check, expected: str):
        if key not in index:
            raise _refuse(root, INDEX_FILE, f'no "{key}" ({expected})')
        if not check(index[key]):
            raise _refuse(root, INDEX_FILE, f'"{key}" must be {expected}, got {index[key]!r:.80}')
        return index[key]

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    field("resolution", count, "an integer >= 1")
    field("storage_dtype", lambda value: value in STORAGE_DTYPES, f"one of {list(STORAGE_DTYPES)}")
    captions = field(
        "captions",
        lambda value: isinstance(value, list) and all(isinstance(c, str) for c in value),
        "a list of strings",
    )
    shards = field(
        "shards",
        lambda value: isinstance(value, list) and value and all(isinstance(s, dict) for s in value),
        "a non-empty list of {file, pairs} objects",
    )
    for number, shard in enumerate(shards):
        file, pairs = shard.get("file"), shard.get("pairs")
        # A plain file name in the cache folder: never a path that leads out of it.
        if not isinstance(file, str) or not file or Path(file).name != file or file in (".", ".."):
            raise _refuse(root, INDEX_FILE, f"shards[{number}].file must be a file name, got "
                          f"{file!r}")  # fmt: skip
        if not count(pairs):
            raise _refuse(root, INDEX_FILE, f"shards[{number}].pairs must be an integer >= 1, "
                          f"got {pairs!r}")  # fmt: skip
    listed = sum(shard["pairs"] for shard in shards)
    if listed != len(captions) or index.get("pairs", listed) != listed:
        raise _refuse(
            root,
            INDEX_FILE,
            f'its shards hold {listed} pairs, its captions {len(captions)}, its "pairs" '
            f"{index.get('pairs')!r}: they must agree",
        )
    return index


def check_cache(
    path: str,
    *,
    model: str | None,
    resolution: int,
    pretrained: str | None = None,
    identity: dict | None = None,
    warn_here: bool = True,
) -> dict:
    """The cache's index, once the index, every shard's header and the weights it was built
    from fit the run; otherwise a one-line UsageError naming the file. ``identity``: the run's
    ``source_identity`` of ``pretrained`` (None skips that check). ``warn_here``: this process
    prints the warning for an index from before ``source`` was recorded (rank 0 under torchrun)."""
    root = Path(path).expanduser()
    index = _checked_index(root)
    built_for = index.get("model")
    if model is not None and built_for is not None and built_for != model:
        raise UsageError(
            f"data: the cache at {path} was built for --model {built_for}, the run trains "
            f"{model}; rebuild it with sdpo-cache --model {model}"
        )
    if index["resolution"] != resolution:
        raise UsageError(
            f"data: the cache at {path} was built at resolution {index['resolution']}, "
            f"the run asks for {resolution}; rebuild it with sdpo-cache --resolution {resolution}"
        )
    if identity is not None:
        _check_source(root, index, pretrained, identity, warn_here)
    dtype = HEADER_DTYPES[index["storage_dtype"]]
    empty = _header(root, EMPTY_FILE)
    hidden = empty.get("hidden", ((), ""))[0]
    if len(hidden) != 3 or hidden[0] != 1:
        raise _refuse(root, EMPTY_FILE, f"hidden must have shape [1, L, D], got {empty}")
    text = {key: shape[1:] for key, (shape, _) in empty.items()}  # (L, D), and SDXL's (P,)
    # Each view's latent shape, (C, h, w) (Wan: (C, 1, h, w)), as the first shard has it.
    first = index["shards"][0]
    shape = _header(root, first["file"]).get("winner_mean", ((), ""))[0]
    if len(shape) < 5 or shape[:2] != (first["pairs"], 2):
        raise _refuse(
            root,
            first["file"],
            f"winner_mean must have shape [{first['pairs']}, 2, C, h, w], got {list(shape)}",
        )
    latent = shape[2:]
    for shard in index["shards"]:
        pairs = shard["pairs"]
        expected = {key: ((pairs, 2, *latent), dtype) for key in LATENT_KEYS}
        expected |= {key: ((pairs, *size), dtype) for key, size in text.items()}
        _check_tensors(root, shard["file"], _header(root, shard["file"]), expected)
    return index


def _same_pretrained(first: str | None, second: str | None) -> bool:
    if first is None or second is None:
        return first == second
    return Path(first).expanduser().resolve() == Path(second).expanduser().resolve()


def _check_source(
    root: Path, index: dict, pretrained: str | None, identity: dict, warn_here: bool
) -> None:
    built = index.get("source")
    if built is None:
        # An index from before the weights' fingerprint was recorded: only the recorded
        # --pretrained text can be compared. A different one is the mismatch this check exists
        # for (refused); the same one is most likely the same weights, and rebuilding costs
        # hours on Pick-a-Pic, so it is used, with a warning that it cannot be verified.
        recorded, run = index.get("pretrained"), pretrained
        if not _same_pretrained(recorded, run):
            raise _refuse(
                root,
                INDEX_FILE,
                f"built from --pretrained {recorded}, the run uses {run} (an index from before "
                "the weights' fingerprint was recorded)",
            )
        if warn_here:
            warn(
                f"{root / INDEX_FILE} records no fingerprint of the weights it was built from "
                f"(an older sdpo-cache); it is used since it names the same --pretrained {run}, "
                "unverified; rebuild it with sdpo-cache to have it checked"
            )
        return
    if not isinstance(built, dict) or not isinstance(built.get("sha256", {}), dict):
        raise _refuse(root, INDEX_FILE, f'"source" is not what sdpo-cache writes: {built!r:.80}')
    difference = _source_differences(built, identity)
    if difference is not None:
        raise UsageError(
            f"data: the cache at {root} was built from --pretrained {index.get('pretrained')} "
            f"({_describe_source(built)}), the run uses {pretrained} "
            f"({_describe_source(identity)}): {difference}; rebuild it with "
            f"sdpo-cache --pretrained {pretrained}"
        )


ENCODE_DTYPES = {name: getattr(torch, name) for name in ENCODE_DTYPE_NAMES}


@torch.no_grad()
def _encode(
    models: Models, pixels: Tensor, batch_images: int = 32, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """The latent distribution's (mean, std) in fp32, the VAE run on ``batch_images`` images
    at a time (a whole shard at once would hold every image's activations: ~1 GB each for
    SD1.5's encoder at 512 px in bf16), under ``dtype`` autocast on CUDA when given."""
    if models.flow is not None:  # Wan: images as one-frame videos
        from sdpo.train.step import flow_pixels

        pixels = flow_pixels(models.flow, pixels)
    means, stds = [], []
    device = next(models.vae.parameters()).device
    for start in range(0, len(pixels), batch_images):
        chunk = pixels[start : start + batch_images].to(device, non_blocking=True)
        cast = (
            torch.autocast(device.type, dtype=dtype)
            if dtype is not None and dtype != torch.float32
            else contextlib.nullcontext()
        )
        with cast:
            distribution = models.vae.encode(chunk.to(models.vae.dtype)).latent_dist
        means.append(distribution.mean.float())
        stds.append(distribution.std.float())
    return torch.cat(means), torch.cat(stds)


class _DecodedPairs(torch.utils.data.Dataset):
    """A record decoded (and resized) in a DataLoader worker: its four views (winner, flipped
    winner, loser, flipped loser: the trainer flips each at random) as one (4, 3, H, W) tensor
    and its caption, or None when an image cannot be read."""

    def __init__(self, records: list, resolution: int) -> None:
        self.records, self.resolution = records, resolution

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Tensor, str] | None:
        record = self.records[index]
        try:
            winner = preprocess(record.winner, self.resolution, flip=False)
            loser = preprocess(record.loser, self.resolution, flip=False)
        except UnreadableImage:
            return None
        return torch.stack([winner, winner.flip(-1), loser, loser.flip(-1)]), record.caption


def _collate_views(items: list) -> tuple[Tensor | None, list[str], int]:
    """A worker's batch of pairs as ONE tensor of views (one shared-memory transfer, not one
    per image), the captions, and how many pairs were unreadable."""
    kept = [item for item in items if item is not None]
    views = torch.cat([views for views, _ in kept]) if kept else None
    return views, [caption for _, caption in kept], len(items) - len(kept)


def decoded_pairs(
    records: list, resolution: int, encode_batch: int, num_workers: int
) -> torch.utils.data.DataLoader:
    """(views, captions, unreadable pairs) batches, decoded in ``num_workers`` processes in
    record order, ahead of the encoder: a worker hands over an encoder call's worth of pairs at
    a time (4 views each), and up to two such batches per worker wait decoded while the encoder
    runs."""
    return torch.utils.data.DataLoader(
        _DecodedPairs(records, resolution),
        batch_size=max(1, encode_batch // 4),
        num_workers=num_workers,
        collate_fn=_collate_views,
    )


class _ShardEncoder:
    """Encodes views as they arrive, ``batch_images`` per VAE call, and writes a shard every
    ``shard_pairs`` pairs. The calls hold exactly the views the whole-shard loop of earlier
    versions gave them (chunks of ``batch_images`` from each shard's first view), so the cache
    is bitwise the same; encoding them as they arrive lets the workers decode the next pairs
    meanwhile instead of waiting for the shard to fill."""

    def __init__(
        self,
        models: Models,
        output: Path,
        target: torch.device,
        shard_pairs: int,
        batch_images: int,
        encode_dtype: torch.dtype,
        storage_dtype: torch.dtype,
    ) -> None:
        self.models, self.output, self.target = models, output, target
        self.shard_pairs, self.batch_images = shard_pairs, batch_images
        self.encode_dtype, self.storage_dtype = encode_dtype, storage_dtype
        self.shards: list[dict] = []
        self._start_shard()

    def _start_shard(self) -> None:
        self.pending: list[Tensor] = []  # views not encoded yet, in order
        self.pending_count = 0
        self.means: list[Tensor] = []
        self.stds: list[Tensor] = []
        self.captions: list[str] = []

    def add(self, views: Tensor, captions: list[str]) -> None:
        """Views of ``len(captions)`` pairs, 4 per pair, in order."""
        for index, caption in enumerate(captions):
            self.pending.append(views[4 * index : 4 * index + 4])
            self.pending_count += 4
            self.captions.append(caption)
            if self.pending_count >= self.batch_images:
                self._encode(self.batch_images)
            if len(self.captions) == self.shard_pairs:
                self.flush()

    def _encode(self, count: int) -> None:
        pixels = torch.cat(self.pending) if len(self.pending) > 1 else self.pending[0]
        chunk, rest = pixels[:count], pixels[count:]
        if self.target.type == "cuda":
            chunk = chunk.pin_memory()  # copied without waiting on the GPU
        mean, std = _encode(self.models, chunk, count, self.encode_dtype)
        self.means.append(mean)
        self.stds.append(std)
        self.pending = [rest] if len(rest) else []
        self.pending_count = len(rest)

    def flush(self) -> None:
        """Encodes what is left and writes the shard (nothing when it holds no pair)."""
        if not self.captions:
            return
        while self.pending_count:
            self._encode(min(self.pending_count, self.batch_images))
        pairs, dtype = len(self.captions), self.storage_dtype
        mean = torch.cat(self.means).view(pairs, 2, 2, *self.means[0].shape[1:])
        std = torch.cat(self.stds).view(pairs, 2, 2, *self.stds[0].shape[1:])
        mean, std = mean.cpu().to(dtype), std.cpu().to(dtype)
        hidden, added = self.models.text(self.captions, self.target)
        tensors = {
            "winner_mean": mean[:, 0].contiguous(),
            "winner_std": std[:, 0].contiguous(),
            "loser_mean": mean[:, 1].contiguous(),
            "loser_std": std[:, 1].contiguous(),
            "hidden": hidden.cpu().to(dtype).contiguous(),
        }
        if added is not None:
            tensors["pooled"] = added["text_embeds"].cpu().to(dtype).contiguous()
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file(tensors, str(self.output / name))
        self.shards.append({"file": name, "pairs": pairs})
        self._start_shard()


def build_cache(
    *,
    data: str | None,
    output_dir: str,
    model: str,
    pretrained: str | None,
    resolution: int,
    seed: int = 0,
    synthetic_pairs: int = 64,
    shard_pairs: int = 256,
    storage_dtype: str = "float16",
    allow_download: bool = False,
    device: str | None = None,
    encode_batch: int = 32,
    encode_dtype: str = "float32",
    num_workers: int = 0,
) -> dict:
    """Writes the cache; returns its index. Unreadable pairs are skipped and counted."""
    records = load_records(data, resolution=resolution, synthetic_pairs=synthetic_pairs, seed=seed)
    identity = source_identity(model, pretrained, seed)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model in FLOW_MODELS:
        if pretrained is None:
            raise UsageError(
                f"--model {model} needs --pretrained PATH (a local diffusers folder) "
                "or --pretrained tiny"
            )
        # The cache runs only the VAE and the text encoders: no transformer is built or loaded.
        flow = load_flow_family(
            model, pretrained, resolution, seed, allow_download, transformer=False
        )
        models = Models(
            unet=flow.transformer,
            reference_unet=None,
            vae=flow.vae,
            text=FlowTextConditioner(flow),
            scheduler=flow.scheduler,
            flow=flow,
        )
    else:
        models = (
            load_pretrained(pretrained, model, resolution, allow_download)
            if pretrained is not None
            else build_tiny(resolution, seed)
        )
    if models.vae is None:
        raise UsageError(
            f"--pretrained {pretrained}: this model has no VAE (a pixel-space model needs no "
            "latent cache)"
        )
    models.vae.to(target).eval()
    models.text.to(target).eval()
    dtype = STORAGE_DTYPES[storage_dtype]
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    hidden, added = models.text([""], target)
    empty = {"hidden": hidden.cpu().to(dtype)}
    if added is not None:
        empty["pooled"] = added["text_embeds"].cpu().to(dtype)
    save_file(empty, str(output / EMPTY_FILE))

    encoder = _ShardEncoder(
        models,
        output,
        target,
        shard_pairs,
        encode_batch,
        ENCODE_DTYPES[encode_dtype],
        dtype,
    )
    captions, skipped = [], 0
    decoded = decoded_pairs(records, resolution, encode_batch, num_workers)
    for views, batch_captions, unreadable in decoded:
        skipped += unreadable
        if views is not None:
            encoder.add(views, batch_captions)
            captions += batch_captions
    encoder.flush()
    shards = encoder.shards
    if not captions:
        raise ValueError(f"data: {data} has no pair with two readable images")
    index = {
        "version": INDEX_VERSION,
        "model": model,
        "pretrained": pretrained,
        "source": identity,
        "resolution": resolution,
        "storage_dtype": storage_dtype,
        "scaling_factor": getattr(models.vae.config, "scaling_factor", None),
        "pairs": len(captions),
        "skipped_pairs": skipped,
        "shards": shards,
        "captions": captions,
    }
    (output / INDEX_FILE).write_text(json.dumps(index, indent=1))
    return index


@dataclass
class CachedBatch:
    latent_mean: Tensor  # (2B, C, h, w): winners then losers
    latent_std: Tensor
    hidden: Tensor  # (B, L, D), the empty caption's where dropped
    pooled: Tensor | None  # (B, P) for SDXL
    captions: list[str]
    skipped: int = 0

    def pin_memory(self) -> CachedBatch:
        """Page-locked copy (the DataLoader's pin thread calls this), for async copies."""
        return pin_batch(self)


class CachedPairBatches:
    """The same batches as PairBatches (order, flips, dropout draws), read from a cache."""

    def __init__(
        self,
        path: str,
        *,
        batch_pairs: int,
        caption_dropout: float,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        resolution: int,
        hflip: bool = True,
        model: str | None = None,
        pretrained: str | None = None,
        identity: dict | None = None,
    ) -> None:
        """Checks the cache first (``check_cache``; ``identity`` None: not its weights)."""
        from sdpo.train.data import PairBatches, PairRecord

        self.hflip = hflip
        self.root = Path(path).expanduser()
        self.index = check_cache(
            path,
            model=model,
            resolution=resolution,
            pretrained=pretrained,
            identity=identity,
            warn_here=rank == 0,
        )
        self.locations = [
            (shard["file"], row) for shard in self.index["shards"] for row in range(shard["pairs"])
        ]
        records = [PairRecord(caption, None, None) for caption in self.index["captions"]]
        # Reuse the uncached sampler's arithmetic (order, drop-last, positions).
        self.plan = PairBatches(
            records,
            batch_pairs=batch_pairs,
            resolution=resolution,
            caption_dropout=caption_dropout,
            seed=seed,
            rank=rank,
            world_size=world_size,
        )
        self.batch_pairs = batch_pairs
        self.caption_dropout = caption_dropout
        self.seed = seed
        self.rank = rank
        self.batches_per_epoch = self.plan.batches_per_epoch
        self.empty = load_file(str(self.root / EMPTY_FILE))

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a few shards of one cache per process
    def _shard(self, name: str) -> dict[str, Tensor]:
        try:
            return load_file(str(self.root / name))
        except (SafetensorError, OSError) as error:
            # Its header was checked when the run opened the cache: it changed since (status 1).
            raise ValueError(
                f"data: reading {self.root / name} failed during the run ({error})"
            ) from error

    def next_position(self, epoch: int, batch_index: int) -> tuple[int, int]:
        return self.plan.next_position(epoch, batch_index)

    def batch(self, epoch: int, batch_index: int) -> CachedBatch:
        generator = generator_for(self.seed, 2, epoch, self.rank, batch_index)
        draws = torch.rand((self.batch_pairs, 3), generator=generator)
        parts: dict[str, list[Tensor]] = {
            key: [] for key in ("wm", "ws", "lm", "ls", "hidden", "pooled")
        }
        captions = []
        for row, index in enumerate(self.plan.indices(epoch, batch_index)):
            shard_name, shard_row = self.locations[index]
            shard = self._shard(shard_name)
            # The cache holds both views; --no-hflip reads only the unflipped one.
            flip_winner = int(self.hflip and draws[row, 0] < 0.5)
            flip_loser = int(self.hflip and draws[row, 1] < 0.5)
            parts["wm"].append(shard["winner_mean"][shard_row, flip_winner])
            parts["ws"].append(shard["winner_std"][shard_row, flip_winner])
            parts["lm"].append(shard["loser_mean"][shard_row, flip_loser])
            parts["ls"].append(shard["loser_std"][shard_row, flip_loser])
            dropped = bool(draws[row, 2] < self.caption_dropout)
            source = (
                self.empty
                if dropped
                else {key: value[shard_row : shard_row + 1] for key, value in shard.items()}
            )
            parts["hidden"].append(source["hidden"][0])
            if "pooled" in shard:
                parts["pooled"].append(source["pooled"][0])
            captions.append("" if dropped else self.index["captions"][index])
        mean = torch.cat([torch.stack(parts["wm"]), torch.stack(parts["lm"])]).float()
        std = torch.cat([torch.stack(parts["ws"]), torch.stack(parts["ls"])]).float()
        pooled = torch.stack(parts["pooled"]).float() if parts["pooled"] else None
        return CachedBatch(mean, std, torch.stack(parts["hidden"]).float(), pooled, captions)
