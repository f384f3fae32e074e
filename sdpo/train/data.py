"""Preference pairs from local files, the reference preprocessing, deterministic batches.

Sources (``--data PATH``):
- Pick-a-Pic-format parquet: a ``.parquet`` file or a folder of shards with columns ``jpg_0``,
  ``jpg_1`` (encoded image bytes, or a path: relative ones resolve against the parquet file's
  folder, as in a save_to_disk shard), ``label_0`` and ``caption``. Ties (``label_0 == 0.5``)
  are dropped; the preferred image goes first.
- A ``datasets.save_to_disk`` folder with the same columns (needs the ``datasets`` package).
- A UTF-8 JSONL manifest: one ``{"caption", "winner", "loser"}`` object per line, image paths
  relative to the manifest's folder.
- None with the tiny model: synthetic pairs from the demo's toy world, built in code.

Every random choice (epoch order, flips, caption dropout) is a function of (seed, epoch,
batch index), so a resumed run sees exactly the batches an uninterrupted one would.
Bad rows never crash a run mid-way. An image that cannot be decoded, for any reason (missing
file, empty cell, corrupt bytes, a decompression bomb, not a regular file: a FIFO would block the
reader) is skipped: its pair is replaced by the next readable one, counted in ``skipped_images``
and, for the first few, described in the batch (``Batch.skip_notes``) for the trainer's log. A structural problem (a caption that is not a
string, a label outside {0, 0.5, 1}, an image reference that is not a path) is a ``UsageError``
naming the file and row, raised by ``load_records`` before any model loads; so is a source in
which no pair has two readable images.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import signal
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from sdpo.train import toy
from sdpo.train.config import available_cpus
from sdpo.train.errors import UsageError
from sdpo.train.outputs import close_inherited_locks


class UnreadableImage(Exception):
    """An image that cannot be decoded (corrupt bytes, missing file)."""


@dataclass
class PairRecord:
    caption: str
    winner: object  # bytes, a path, or a (3, H, W) tensor in [-1, 1]
    loser: object
    where: str = ""  # "FILE line N" / "FILE row N", for error messages


def read_regular_file(path: str | Path) -> bytes:
    """The bytes of ``path`` if it is a regular file; UnreadableImage otherwise. Opened without
    blocking and checked on the open descriptor (no window between the check and the open): a
    FIFO, a socket or a device would block the reader (a FIFO's open waits for a writer) or
    stream without end, so they are unreadable images, not data."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as error:
        raise UnreadableImage(f"{type(error).__name__}: {error}") from error
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else None
            raise UnreadableImage(f"{path} is {kind or 'not a regular file'}, not an image file")
        with os.fdopen(descriptor, "rb") as file:
            descriptor = -1  # the file object closes it
            return file.read()
    except OSError as error:
        raise UnreadableImage(f"{type(error).__name__}: {error}") from error
    finally:
        if descriptor >= 0:
            os.close(descriptor)


def _open_image(source: object):
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(source, (ParquetCell, ArrowCell)):
            source = source.read()
        if isinstance(source, (str, Path)):
            source = read_regular_file(source)
        if isinstance(source, (bytes, bytearray)):
            image = Image.open(io.BytesIO(source))
        else:
            raise UnreadableImage(f"expected image bytes or a path, got {type(source).__name__}")
        image.load()
        return image.convert("RGB")
    except UnreadableImage:
        raise
    except MemoryError:
        raise
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise UnreadableImage(f"{type(error).__name__}: {error}") from error
    except Exception as error:
        # PIL raises more than OSError/ValueError for bad files: DecompressionBombError (an
        # Exception) for > 2x MAX_IMAGE_PIXELS, SyntaxError from a corrupt PNG or GIF header,
        # struct.error, EOFError, IndexError from truncated tables. Any of them means this one
        # image is unusable, never that the run should stop.
        raise UnreadableImage(f"{type(error).__name__}: {error}") from error


def preprocess(
    source: object, resolution: int, flip: bool, crop: tuple[float, float] | None = None
) -> Tensor:
    """The reference preprocessing: resize the shorter side, centre crop, optional horizontal
    flip, to a (3, resolution, resolution) tensor in [-1, 1]. ``crop`` = (x, y) in [0, 1): a
    random crop instead, its left/top edge that fraction of the way across the spare pixels."""
    if isinstance(source, Tensor):
        image = source.float()
        if image.shape[-1] != resolution or image.shape[-2] != resolution:
            image = F.interpolate(
                image[None], size=(resolution, resolution), mode="bilinear", antialias=True
            )[0]
    else:
        from PIL import Image

        picture = _open_image(source)
        width, height = picture.size
        scale = resolution / min(width, height)
        resized = picture.resize(
            (max(resolution, round(width * scale)), max(resolution, round(height * scale))),
            Image.BILINEAR,
        )
        spare_x, spare_y = resized.width - resolution, resized.height - resolution
        if crop is None:
            left, top = spare_x // 2, spare_y // 2
        else:
            left, top = int(crop[0] * (spare_x + 1)), int(crop[1] * (spare_y + 1))
        cropped = resized.crop((left, top, left + resolution, top + resolution))
        pixels = torch.frombuffer(bytearray(cropped.tobytes()), dtype=torch.uint8)
        image = pixels.view(resolution, resolution, 3).permute(2, 0, 1).float() / 127.5 - 1.0
    return image.flip(-1) if flip else image


def _check_caption(caption: object, where: str) -> str:
    if not isinstance(caption, str):
        raise UsageError(
            f"data: {where}: caption: expected a string, got {caption!r} "
            f'({type(caption).__name__}); use "" for an empty caption'
        )
    return caption


def _manifest_lines(path: Path):
    """(line number, text) of a UTF-8 manifest; a line that is not UTF-8 is a UsageError naming
    the file, the line and the byte. Split on b"\\n" only: str.splitlines would also split
    inside a JSON string holding U+2028 or U+0085."""
    try:
        content = path.read_bytes()
    except OSError as error:
        raise UsageError(f"data: cannot read {path} ({error})") from None
    for line_number, raw in enumerate(content.split(b"\n"), start=1):
        if line_number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
        try:
            yield line_number, raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise UsageError(
                f"data: {path} line {line_number}: not UTF-8 text (byte 0x{raw[error.start]:02x} "
                f"at column {error.start + 1}); save the manifest as UTF-8"
            ) from None


def _records_from_jsonl(path: Path) -> list[PairRecord]:
    records = []
    for line_number, line in _manifest_lines(path):
        if not line.strip():
            continue
        where = f"{path} line {line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"data: {where}: not valid JSON ({error})") from None
        if not isinstance(row, dict) or not {"caption", "winner", "loser"} <= set(row):
            raise UsageError(
                f"data: {where}: expected a JSON object with caption, winner, loser, got "
                f"{line.strip()[:80]}"
            )
        caption = _check_caption(row["caption"], where)
        images = []
        for key in ("winner", "loser"):
            if not isinstance(row[key], str) or not row[key].strip():
                raise UsageError(
                    f"data: {where}: {key}: expected an image path (a non-empty string), got "
                    f"{row[key]!r}"
                )
            images.append(path.parent / row[key])
        records.append(PairRecord(caption, images[0], images[1], where))
    return records


def _ordered_pair(row: dict, where: str) -> PairRecord | None:
    """The pair with the preferred image first; None for a tie. Pick-a-Pic's label_0 is 1 (the
    first image preferred), 0 (the second) or 0.5 (a tie); anything else is refused."""
    label = row["label_0"]
    if (
        isinstance(label, bool)
        or not isinstance(label, (int, float))
        or not math.isfinite(label)
        or label not in (0, 0.5, 1)
    ):
        raise UsageError(f"data: {where}: label_0: expected 0, 0.5 or 1, got {label!r}")
    caption = _check_caption(row["caption"], where)
    if label == 0.5:
        return None  # a tie carries no preference
    first, second = row["jpg_0"], row["jpg_1"]
    winner, loser = (first, second) if label == 1 else (second, first)
    return PairRecord(caption, winner, loser, where)


def _cell_image(value: object, file: str, where: str) -> bytes | Path:
    """An image cell's bytes, or the file it names: a string cell, or datasets' Image feature
    ``{"bytes": None, "path": ...}``. A relative path is resolved against the folder of the
    file holding the cell (never the current folder, which would train on whatever files are
    found wherever the run was started); an absolute one is used as it is."""
    if isinstance(value, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
        value = value["bytes"] if value.get("bytes") is not None else value.get("path")
    if isinstance(value, str):
        if not value.strip():
            raise UnreadableImage(f"{file} {where}: empty path")
        return Path(file).parent / Path(value).expanduser()
    if value is None:
        raise UnreadableImage(f"{file} {where}: empty")
    return value


@functools.lru_cache(maxsize=2)
def _parquet_row_group(path: str, row_group: int):
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(row_group, columns=["jpg_0", "jpg_1"])


@dataclass(frozen=True)
class ParquetCell:
    """An image in a parquet shard, read on demand (a Pick-a-Pic copy is ~335 GB: never all in memory)."""

    path: str
    row_group: int
    row: int
    column: str

    def read(self) -> bytes | Path:
        value = _parquet_row_group(self.path, self.row_group).column(self.column)[self.row].as_py()
        return _cell_image(value, self.path, f"row group {self.row_group} row {self.row}")


def _records_from_parquet(paths: list[Path]) -> list[PairRecord]:
    import pyarrow.parquet as pq

    records = []
    for path in paths:
        try:
            shard = pq.ParquetFile(path)
        except Exception as error:  # pyarrow's ArrowInvalid, OSError: not a parquet file
            raise UsageError(f"data: cannot read the parquet file {path} ({error})") from None
        missing = {"jpg_0", "jpg_1", "label_0", "caption"} - set(shard.schema_arrow.names)
        if missing:
            raise UsageError(f"data: {path} lacks the column(s) {', '.join(sorted(missing))}")
        first_row = 0  # the row's number in the file (from 0, as pandas and pyarrow count)
        for row_group in range(shard.num_row_groups):
            labels = shard.read_row_group(row_group, columns=["label_0", "caption"]).to_pylist()
            for row, values in enumerate(labels):
                cells = {
                    column: ParquetCell(str(path), row_group, row, column)
                    for column in ("jpg_0", "jpg_1")
                }
                record = _ordered_pair({**values, **cells}, f"{path} row {first_row + row}")
                if record is not None:
                    records.append(record)
            first_row += len(labels)
    return records


@functools.lru_cache(maxsize=4)
def _arrow_shard(path: str):
    """A save_to_disk shard (Arrow IPC stream), memory-mapped: reading a cell copies only it."""
    import pyarrow as pa

    return pa.ipc.open_stream(pa.memory_map(path)).read_all()


@dataclass(frozen=True)
class ArrowCell:
    """An image in a ``datasets.save_to_disk`` shard, read on demand."""

    path: str
    row: int
    column: str

    def read(self) -> bytes | Path:
        value = _arrow_shard(self.path).column(self.column)[self.row].as_py()
        return _cell_image(value, self.path, f"row {self.row}")


def _saved_dataset_folder(path: Path) -> Path:
    """The folder holding state.json: the dataset itself, or the train split of a DatasetDict."""
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise UsageError(
                f"data: {path} is a DatasetDict with splits {splits}; point --data at one split's "
                "folder"
            )
        return path / "train"
    return path


def _records_from_saved_dataset(path: Path) -> list[PairRecord]:
    """A ``datasets.save_to_disk`` folder, read with pyarrow (no ``datasets`` needed): state.json
    lists the shards; captions and labels are read up front, images when a batch needs them."""
    import pyarrow as pa

    folder = _saved_dataset_folder(path)
    try:
        state = json.loads((folder / "state.json").read_text())
        shards = [folder / entry["filename"] for entry in state["_data_files"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise UsageError(
            f"data: {folder} is not a readable datasets.save_to_disk folder (state.json: {error})"
        ) from error
    records = []
    for shard in shards:
        try:
            table = _arrow_shard(str(shard))
        except (OSError, pa.ArrowInvalid) as error:
            raise UsageError(f"data: cannot read the shard {shard} ({error})") from error
        missing = {"jpg_0", "jpg_1", "label_0", "caption"} - set(table.column_names)
        if missing:
            raise UsageError(f"data: {shard} lacks the column(s) {', '.join(sorted(missing))}")
        labels = table.select(["label_0", "caption"]).to_pylist()
        for row, values in enumerate(labels):
            cells = {column: ArrowCell(str(shard), row, column) for column in ("jpg_0", "jpg_1")}
            record = _ordered_pair({**values, **cells}, f"{shard} row {row}")
            if record is not None:
                records.append(record)
    return records


def synthetic_records(count: int, resolution: int, seed: int) -> list[PairRecord]:
    """The tiny preset's pairs: toy images whose attributes are corrupted at rate 0.3, the one
    with the higher pixel reward first."""
    # Rendered and scored at <= 32 px, then upsampled: the toy reward at 512 px costs ~2 s a
    # pair on a CPU, and larger synthetic images only serve timing runs (--pretrained random).
    native = min(resolution, 32)
    pairs = toy.preference_pairs(count, native, corruption=0.3, seed=seed)
    winners, losers = pairs.winners, pairs.losers
    if native != resolution:
        winners = F.interpolate(winners, size=resolution, mode="nearest")
        losers = F.interpolate(losers, size=resolution, mode="nearest")
    return [
        PairRecord(caption, winner, loser)
        for caption, winner, loser in zip(pairs.captions, winners, losers, strict=True)
    ]


def load_records(
    data: str | None, *, resolution: int, synthetic_pairs: int, seed: int
) -> list[PairRecord]:
    """All usable pairs of a source; raises UsageError if there are none, if a row is malformed or
    if no pair has two readable images (all before models load)."""
    if data is None:
        records = synthetic_records(synthetic_pairs, resolution, seed)
        source = "synthetic pairs"
    else:
        path = Path(data).expanduser()
        if not path.exists():
            raise UsageError(f"data: no such file or folder {data}")
        if path.is_file() and path.suffix == ".jsonl":
            records = _records_from_jsonl(path)
        elif path.is_file() and path.suffix == ".parquet":
            records = _records_from_parquet([path])
        elif path.is_dir() and sorted(path.glob("*.parquet")):
            records = _records_from_parquet(sorted(path.glob("*.parquet")))
        elif path.is_dir() and (
            (path / "state.json").exists() or (path / "dataset_dict.json").exists()
        ):
            records = _records_from_saved_dataset(path)
        else:
            raise UsageError(
                f"data: {data} is not a .jsonl manifest, a .parquet file, a folder of .parquet shards "
                "or a datasets.save_to_disk folder"
            )
        source = str(data)
    if not records:
        raise UsageError(f"data: {source} has no usable pairs (ties are dropped)")
    if data is not None:
        _require_a_readable_pair(records, source)
    return records


def _describe_unreadable(image: object, error: UnreadableImage) -> str:
    if isinstance(image, Path) and not image.exists():
        return f"{image.name} is missing from {image.parent}"
    return str(error)


def _require_a_readable_pair(records: list[PairRecord], source: str) -> None:
    """Decodes pairs until one has two readable images (usually the first: one pair's decode);
    otherwise a UsageError now, before the models load, naming the first failure."""
    first_failure = None
    for record in records:
        try:
            for image in (record.winner, record.loser):
                failed_image = image
                _open_image(image)
        except UnreadableImage as error:
            if first_failure is None:
                first_failure = f"{record.where}: {_describe_unreadable(failed_image, error)}"
            continue
        return
    raise UsageError(
        f"data: no pair in {source} has two readable images (first: {first_failure}); check "
        "the image paths, which are relative to the manifest's folder"
        if str(source).endswith(".jsonl")
        else f"data: no pair in {source} has two readable images (first: {first_failure})"
    )


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64 steps), so nearby inputs give unrelated streams."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return state >> 1


def generator_for(*values: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_mix(*values))


# Unreadable images named in the log as they are met: the first SKIP_LOG_FIRST of a process,
# then one line saying that further ones are only counted (skipped_images, in every progress
# line and metrics row). A batch carries at most SKIP_NOTES_PER_BATCH descriptions: a corrupt
# shard must not make every batch pickle thousands of lines back from its worker.
SKIP_LOG_FIRST = 5
SKIP_NOTES_PER_BATCH = SKIP_LOG_FIRST


class SkipReporter:
    """Logs the unreadable images of the batches this process trains on, rate-limited."""

    def __init__(self, log, prefix: str = "", first: int = SKIP_LOG_FIRST) -> None:
        self.log, self.prefix, self.first = log, prefix, first
        self.seen = 0  # unreadable images met by this process this run

    def report(self, skipped: int, notes: list[str]) -> None:
        for note in notes[: max(0, self.first - self.seen)]:
            self.log(f"{self.prefix}skipped an unreadable image, its pair replaced: {note}")
        before, self.seen = self.seen, self.seen + skipped
        if before <= self.first < self.seen:  # once, at the first skip past the listed ones
            self.log(
                f"{self.prefix}more than {self.first} unreadable images: further ones are "
                "only counted (skipped_images in the progress lines and metrics.jsonl)"
            )


@dataclass
class Batch:
    winners: Tensor  # (B, 3, H, W) in [-1, 1]
    losers: Tensor
    captions: list[str]
    skipped: int  # pairs replaced because an image could not be read
    # What was unreadable and why ("FILE line N (winner): reason"), the first few of the batch:
    # built where the batch is (a worker, maybe), logged by the trainer (SkipReporter).
    skip_notes: list[str] = dataclasses.field(default_factory=list)

    def pin_memory(self) -> Batch:
        """Page-locked copy (the DataLoader's pin thread calls this): host->device copies from
        it run asynchronously, overlapping the step."""
        return pin_batch(self)


def pin_batch(batch):
    """The batch (a dataclass) with every tensor field in page-locked memory."""
    return dataclasses.replace(
        batch,
        **{
            item.name: getattr(batch, item.name).pin_memory()
            for item in dataclasses.fields(batch)
            if isinstance(getattr(batch, item.name), Tensor)
        },
    )


def host_to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A non-blocking copy to ``device`` from page-locked memory. CUDA copies a pageable source
    through a staging buffer on the calling thread, so ``non_blocking`` alone does not make it
    asynchronous; a source not pinned yet (the tokenizer's ids) is pinned first (a host memcpy
    into the caching host allocator, no device work)."""
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def default_num_workers(
    data: str | None, is_cached: bool, world_size: int, cpus: int | None = None
) -> int:
    """Data-loading workers when ``--num-workers`` is not given: none where nothing is decoded
    (synthetic pairs, a latent cache), else min(8, CPUs per process - 1), leaving one for the
    step. Measured on 2 CPUs, tiny preset, 32 pairs of 256 px PNGs: 10.4 pairs/s with 0 workers,
    15.9 with 1, so even the tiny model gains once real images are decoded."""
    if data is None or is_cached:
        return 0
    cpus = cpus if cpus is not None else available_cpus()
    return max(0, min(8, cpus // max(1, world_size) - 1))


class PairBatches:
    """Deterministic batches of one process: epoch order from (seed, epoch), this rank's share,
    and flips and caption dropout from (seed, epoch, batch index)."""

    def __init__(
        self,
        records: list[PairRecord],
        *,
        batch_pairs: int,
        resolution: int,
        caption_dropout: float,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        hflip: bool = True,
        random_crop: bool = False,
    ) -> None:
        self.records = records
        self.hflip = hflip
        self.random_crop = random_crop
        self.batch_pairs = batch_pairs
        self.resolution = resolution
        self.caption_dropout = caption_dropout
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        # Every rank gets the same number of batches (drop the remainder), so every rank reaches
        # every collective.
        self.batches_per_epoch = len(records) // (world_size * batch_pairs)
        if self.batches_per_epoch == 0:
            raise UsageError(
                f"data: {len(records)} usable pairs is fewer than one batch of {batch_pairs} pairs "
                f"on each of {world_size} processes; lower --train-batch-pairs or add data"
            )

    def indices(self, epoch: int, batch_index: int) -> list[int]:
        order = torch.randperm(len(self.records), generator=generator_for(self.seed, 1, epoch))
        share = order[self.rank :: self.world_size]
        start = batch_index * self.batch_pairs
        return share[start : start + self.batch_pairs].tolist()

    def load_pair(
        self,
        index: int,
        flip_winner: bool,
        flip_loser: bool,
        crops: tuple[tuple[float, float], tuple[float, float]] | None = None,
        notes: list[str] | None = None,
    ) -> tuple[Tensor, Tensor, str, int]:
        """The pair at ``index`` or, if one of its images is unreadable, the next readable pair.
        Each unreadable image is described in ``notes`` (up to SKIP_NOTES_PER_BATCH of them)."""
        winner_crop, loser_crop = crops if crops is not None else (None, None)
        for offset in range(len(self.records)):
            record = self.records[(index + offset) % len(self.records)]
            role, image = "winner", record.winner
            try:
                winner = preprocess(image, self.resolution, flip_winner, winner_crop)
                role, image = "loser", record.loser
                loser = preprocess(image, self.resolution, flip_loser, loser_crop)
            except UnreadableImage as error:
                if notes is not None and len(notes) < SKIP_NOTES_PER_BATCH:
                    where = record.where or f"pair {(index + offset) % len(self.records)}"
                    notes.append(f"{where} ({role}): {_describe_unreadable(image, error)}")
                continue
            return winner, loser, record.caption, offset
        raise UsageError("data: no pair has two readable images")

    def batch(self, epoch: int, batch_index: int) -> Batch:
        generator = generator_for(self.seed, 2, epoch, self.rank, batch_index)
        draws = torch.rand((self.batch_pairs, 3), generator=generator)
        # Crop positions from their own stream, so --random-crop leaves flips and dropout alone.
        crop_draws = (
            torch.rand(
                (self.batch_pairs, 4),
                generator=generator_for(self.seed, 5, epoch, self.rank, batch_index),
            )
            if self.random_crop
            else None
        )
        winners, losers, captions, skipped, notes = [], [], [], 0, []
        for row, index in enumerate(self.indices(epoch, batch_index)):
            # Independent flips for winner and loser (unless --no-hflip); one caption (and its
            # dropout) per pair.
            flips = (self.hflip and draws[row, 0] < 0.5, self.hflip and draws[row, 1] < 0.5)
            crops = None
            if crop_draws is not None:
                x0, y0, x1, y1 = crop_draws[row].tolist()
                crops = ((x0, y0), (x1, y1))
            winner, loser, caption, offset = self.load_pair(
                index, bool(flips[0]), bool(flips[1]), crops, notes
            )
            skipped += offset
            winners.append(winner)
            losers.append(loser)
            captions.append("" if draws[row, 2] < self.caption_dropout else caption)
        return Batch(torch.stack(winners), torch.stack(losers), captions, skipped, notes)

    def next_position(self, epoch: int, batch_index: int) -> tuple[int, int]:
        """The (epoch, batch index) after this one: epochs roll over, accumulation does not care."""
        batch_index += 1
        return (epoch + 1, 0) if batch_index == self.batches_per_epoch else (epoch, batch_index)


class _BatchPositions(torch.utils.data.IterableDataset):
    """Batches from a position on; worker k of n builds positions k, k + n, ... so that the
    DataLoader's round-robin over workers returns them in order."""

    def __init__(self, batches, start: tuple[int, int]) -> None:
        self.batches = batches
        self.start = start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, batch_index = self.start
        position = 0
        while True:
            if position % workers == worker:
                yield epoch, batch_index, self.batches.batch(epoch, batch_index)
            epoch, batch_index = self.batches.next_position(epoch, batch_index)
            position += 1


def _exit_on_sigterm_from(main_process: int) -> None:
    """Waits for SIGTERMs (blocked in this worker): one sent by ``main_process`` ends the worker,
    one from anyone else (a terminal, a scheduler signalling the process group) is dropped."""
    while True:
        sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
        if sender == main_process:
            os._exit(128 + signal.SIGTERM)


def ignore_stop_signals(worker_id: int, main_process: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: the worker outlives a SIGINT or SIGTERM sent to
    the whole process group (what a terminal's Ctrl-C and some schedulers send), so the main
    process can finish the step in flight, which may still need batches from it, and write its
    checkpoint (sdpo/train/preemption.py); the main process then ends the workers itself.

    SIGINT is ignored. SIGTERM is blocked and taken by a thread that ends the worker when
    ``main_process`` (the DataLoader's, which may not be the parent under forkserver) sent it: DataLoader's last resort for a worker that does not stop
    (``terminate()``) keeps working. Without ``sigwaitinfo`` (not Linux) SIGTERM is ignored.
    A worker whose main process died exits on its own (DataLoader's watchdog, within 5 s); it
    holds no copy of the output folder's lock meanwhile (a forked worker inherits one)."""
    close_inherited_locks()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(
        target=_exit_on_sigterm_from, args=(main_process,), name="sigterm-from-main", daemon=True
    ).start()


def batch_stream(batches, start: tuple[int, int], num_workers: int, pin_memory: bool = False):
    """(epoch, batch index, batch) from ``start`` on, forever. With ``num_workers`` > 0 the images
    are decoded in worker processes, ahead of the step; the order and content do not change."""
    positions = _BatchPositions(batches, start)
    if num_workers == 0:
        if pin_memory:
            return ((epoch, index, pin_batch(batch)) for epoch, index, batch in positions)
        return iter(positions)
    loader = torch.utils.data.DataLoader(
        positions,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=2,
        worker_init_fn=functools.partial(ignore_stop_signals, main_process=os.getpid()),
    )
    return iter(loader)
