"""Throughput of ``sdpo-cache`` on the CPU with the tiny model: decoding, encoding, end to end.

    python tools/cache_throughput.py --pairs 64 --source-size 256 --resolution 64

Writes ``--pairs`` pairs of random JPEGs (``--source-size`` px) and a JSONL manifest to a
temporary folder, then times, for ``--num-workers`` 0 and 1: decoding alone (the cache's
DataLoader over the images), the VAE encoder alone (every view of every pair, ``--encode-batch``
images per call) and the whole ``build_cache`` (model build included). Prints, the best of
``--repeats``, items per wall second and CPU milliseconds per item (this process and its
workers): source images (2 per pair) or encoder views (4 per pair, as is and flipped).
"""

from __future__ import annotations

import argparse
import io
import json
import resource
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


def best_seconds(function, repeats: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its finished children), each the least of
    ``repeats`` runs. On a shared machine the CPU seconds are the steadier number: the wall time
    also counts the time other jobs held the cores."""
    walls, cpus = [], []
    for _ in range(repeats):
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        start, start_cpu = time.perf_counter(), time.process_time()
        function()
        walls.append(time.perf_counter() - start)
        finished = resource.getrusage(resource.RUSAGE_CHILDREN)
        child_cpu = sum(
            getattr(finished, field) - getattr(children, field)
            for field in ("ru_utime", "ru_stime")
        )
        cpus.append(time.process_time() - start_cpu + child_cpu)
    return min(walls), min(cpus)


def rates(count: int, seconds: tuple[float, float]) -> str:
    wall, cpu = seconds
    return f"{count / wall:.0f}/s wall, {1000 * cpu / count:.1f} CPU-ms each"


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

            print(
                f"decode only, {workers} workers: images {rates(images, best_seconds(decode, arguments.repeats))}"
            )

        models = build_tiny(arguments.resolution, 0)
        models.vae.eval()
        views = torch.rand((2 * images, 3, arguments.resolution, arguments.resolution)) * 2 - 1
        seconds = best_seconds(
            lambda: cache._encode(models, views, arguments.encode_batch), arguments.repeats
        )
        print(f"encode only: views {rates(len(views), seconds)}")
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
            print(f"end to end, {workers} workers: source images {rates(images, seconds)}")


if __name__ == "__main__":
    main()
