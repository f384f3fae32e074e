"""`sdpo-cache`: precompute VAE latent distributions and text embeddings for training.

The command line (the cache itself: sdpo/train/cache.py). It parses its flags before importing
torch, so ``sdpo-cache --help`` and a bad flag answer at once (importing torch takes ~2 s).
"""

from __future__ import annotations

import argparse
import json
import sys

from sdpo.train.config import (
    FLOW_MODELS,
    check_num_workers,
    check_output_dir,
    integer_at_least,
    setting_argument_type,
)
from sdpo.train.errors import UsageError

# The torch dtypes by name (sdpo.train.cache maps them to torch's).
STORAGE_DTYPE_NAMES = ("float16", "bfloat16", "float32")
ENCODE_DTYPE_NAMES = ("float32", "bfloat16")


def _worker_count(text: str) -> int:
    value = integer_at_least(0)(text)
    try:
        check_num_workers(value)
    except UsageError as error:
        message = str(error).removeprefix(f"--num-workers {value}: ")
        raise argparse.ArgumentTypeError(message) from None
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdpo-cache", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default=None, help="pairs as for sdpo-train --data (none: synthetic tiny pairs)"
    )
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--model", default="tiny", choices=("tiny", "sd15", "sdxl", *FLOW_MODELS))
    parser.add_argument(
        "--pretrained",
        default=None,
        help="a local diffusers folder; tiny: tiny flow models (sd3, flux, wan) built in code",
    )
    # The trainer's own types and ranges: a cache sdpo-train would refuse (e.g. at a resolution
    # not a multiple of 8) is refused before it is built.
    parser.add_argument(
        "--resolution", type=setting_argument_type("resolution"), default=16, help="a multiple of 8"
    )
    parser.add_argument("--seed", type=setting_argument_type("seed"), default=0)
    parser.add_argument(
        "--synthetic-pairs", type=setting_argument_type("synthetic_pairs"), default=64
    )
    parser.add_argument(
        "--shard-pairs", type=integer_at_least(1), default=256, help="pairs per shard file"
    )
    parser.add_argument("--storage-dtype", default="float16", choices=STORAGE_DTYPE_NAMES)
    parser.add_argument("--allow-download", action="store_true")
    parser.add_argument(
        "--encode-batch", type=integer_at_least(1), default=32, help="images per VAE encoder call"
    )
    parser.add_argument(
        "--encode-dtype",
        default="float32",
        choices=ENCODE_DTYPE_NAMES,
        help="VAE encoder precision on CUDA (bfloat16 autocast: see README for its error)",
    )
    parser.add_argument(
        "--num-workers", type=_worker_count, default=0, help="image-decoding worker processes"
    )
    arguments = parser.parse_args(argv)
    try:
        check_output_dir(arguments.output_dir, "--output-dir")
    except UsageError as error:
        print(f"sdpo-cache: error: {error}", file=sys.stderr)
        return 2
    from sdpo.train.cache import build_cache

    try:
        index = build_cache(**vars(arguments))
    except UsageError as error:  # a refused setting or input: as sdpo-train, status 2
        print(f"sdpo-cache: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as error:
        print(f"sdpo-cache: error: {error}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {key: index[key] for key in ("pairs", "skipped_pairs", "resolution", "storage_dtype")}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
