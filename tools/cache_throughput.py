"""Throughput of ``sdpo-cache`` on the CPU with the tiny model: decoding, encoding, end to end.

    python tools/cache_throughput.py --pairs 64 --source-size 256 --resolution 64

Writes ``--pairs`` pairs of random JPEGs (``--source-size`` px) and a JSONL manifest to a
temporary folder, then times, for ``--num-workers`` 0 and 1: decoding alone (the cache's
DataLoader over the images), the VAE encoder alone (every view of every pair, ``--encode-batch``
images per call) and the whole ``build_cache``. Prints images per second (source images: 2 per
pair; the encoder encodes 4 views per pair, as is and flipped) and the best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import torch


def write_pairs(folder: Path, pairs: int, size: int) -> Path:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    lines = []
    for index in range(pairs):
        names = []
        for side in ("w", "l"):
            pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels.numpy()).save(buffer, format="JPEG", quality=90)
            name = f"{index:05d}{side}.jpg"
            (folder / name).write_bytes(buffer.getvalue())
            names.append(name)
        lines.append(
            json.dumps({"caption": f"pair {index}", "winner": names[0], "loser": names[1]})
        )
    manifest = folder / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def best_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--source-size", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--encode-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)

    from sdpo.train import cache
    from sdpo.train.data import load_records
    from sdpo.train.models import build_tiny

    images = 2 * arguments.pairs
    with tempfile.TemporaryDirectory() as folder:
        manifest = write_pairs(Path(folder), arguments.pairs, arguments.source_size)
        records = load_records(
            str(manifest), resolution=arguments.resolution, synthetic_pairs=0, seed=0
        )
        for workers in (0, 1):

            def decode(workers=workers) -> None:
                loader = cache.decoded_pairs(
                    records, arguments.resolution, arguments.encode_batch, workers
                )
                for _ in loader:
                    pass

            seconds = best_seconds(decode, arguments.repeats)
            print(f"decode only, {workers} workers: {images / seconds:.0f} images/s")

        models = build_tiny(arguments.resolution, 0)
        models.vae.eval()
        views = torch.rand((2 * images, 3, arguments.resolution, arguments.resolution)) * 2 - 1
        seconds = best_seconds(
            lambda: cache._encode(models, views, arguments.encode_batch), arguments.repeats
        )
        print(
            f"encode only: {len(views) / seconds:.0f} views/s "
            f"({images / seconds:.0f} source images/s, 2 views each)"
        )
        for workers in (0, 1):
            output = Path(folder) / f"cache-{workers}"

            def build(workers=workers, output=output) -> None:
                cache.build_cache(
                    data=str(manifest),
                    output_dir=str(output),
                    model="tiny",
                    pretrained=None,
                    resolution=arguments.resolution,
                    encode_batch=arguments.encode_batch,
                    num_workers=workers,
                    device="cpu",
                )

            seconds = best_seconds(build, arguments.repeats)
            print(f"end to end, {workers} workers: {images / seconds:.0f} images/s")


if __name__ == "__main__":
    main()
