"""Every path a training run reads, checked before anything heavy is built.

``check_run_paths`` runs in ``train()`` before the process group, the data and the models: a
missing weights folder, a weights folder without ``model_index.json`` or one of the parts the
run loads, a model id that is in neither place looked at, a missing data file or folder, a
cache whose index or shards are gone, or a ``--resume`` folder that is no complete checkpoint
is one ``UsageError`` line (``sdpo-train`` status 2), not a failure after the models built.

How ``--pretrained`` resolves (the rule ``resolve_pretrained`` shares with the loaders):
``tiny`` and ``random[:NAME]`` are built in code; an existing folder is used as it is; a name
that looks like a path (starts with ``.``, ``/`` or ``~``, or has two or more ``/``) and is
not a folder is an error; anything else is a Hugging Face model id, read from its snapshot in
the local Hugging Face cache (downloaded only with ``--allow-download``).
"""

from __future__ import annotations

import json
from pathlib import Path

from sdpo.train.config import FLOW_MODELS, TrainConfig, is_random
from sdpo.train.errors import UsageError

# What sdpo.train.models.load_pretrained reads from an SD1.5/SDXL-style folder (and the tiny
# UNet's, from save_tiny_pretrained or sdpo-demo). vae/ is optional there: a pixel-space model.
UNET_PARTS = ("unet", "scheduler", "tokenizer", "text_encoder")
SDXL_PARTS = ("tokenizer_2", "text_encoder_2")
# A flow pipeline's text encoders, left out when training from an sdpo-cache folder.
TEXT_ENCODER_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3")
INDEX = "model_index.json"
CACHE_INDEX = "cache_index.json"  # sdpo.train.cache.INDEX_FILE (that module imports torch)


def looks_like_a_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def hub_cache_folder() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def resolve_pretrained(name: str, allow_download: bool) -> Path | None:
    """The local folder ``name`` stands for: the folder itself, or a model id's snapshot in
    the local Hugging Face cache. None for a model id that is not cached while
    ``allow_download`` lets the loader fetch it. UsageError when it is in neither place."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise UsageError(f"pretrained: {name} is a file; expected a diffusers folder")
    if looks_like_a_path(name):
        raise UsageError(
            f"pretrained: no such folder {name}; pass a local diffusers folder (with "
            f"{INDEX}) or a model id already in the Hugging Face cache ({hub_cache_folder()})"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception as error:  # the hub raises several kinds: "not in the cache" for all
        if allow_download:
            return None
        raise UsageError(
            f"pretrained: {name!r} is neither a local folder ({folder.absolute()} does not "
            f"exist) nor a model in the local Hugging Face cache ({hub_cache_folder()}: "
            f"{type(error).__name__}); pass a local diffusers folder, put the model in the "
            "cache (huggingface-cli download on a machine with network) or add --allow-download"
        ) from None


def _index(folder: Path, name: str) -> dict:
    path = folder / INDEX
    if not path.is_file():
        raise UsageError(
            f"pretrained: {name} ({folder}) has no {INDEX}; expected a diffusers pipeline "
            "folder (save_pretrained output or a Hugging Face snapshot)"
        )
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"pretrained: cannot read {path} ({error})") from None
    if not isinstance(index, dict):
        raise UsageError(f"pretrained: {path} is not a JSON object")
    return index


def _parts_needed(config: TrainConfig, index: dict) -> list[str]:
    if config.model in FLOW_MODELS:
        from sdpo.train.cache import is_cache

        skipped = TEXT_ENCODER_PARTS if is_cache(config.data) else ()
        # The components model_index.json lists (["library", "Class"]; [null, null] is absent).
        return [
            part
            for part, value in index.items()
            if not part.startswith("_")
            and isinstance(value, list)
            and any(value)
            and part not in skipped
        ]
    return [*UNET_PARTS, *(SDXL_PARTS if config.model == "sdxl" else ())]


def check_pretrained(config: TrainConfig) -> None:
    name = config.pretrained
    if name is None or name == "tiny" or is_random(name):
        return
    folder = resolve_pretrained(name, config.allow_download)
    if folder is None:
        return  # to be downloaded (--allow-download)
    index = _index(folder, name)
    missing = [part for part in _parts_needed(config, index) if not (folder / part).is_dir()]
    if missing:
        raise UsageError(
            f"pretrained: {name} ({folder}) lacks {', '.join(part + '/' for part in missing)}; "
            f"expected a complete diffusers folder for --model {config.model}"
        )


def check_data(config: TrainConfig) -> None:
    if config.data is None:
        return
    path = Path(config.data).expanduser()
    if not path.exists():
        raise UsageError(f"data: no such file or folder {config.data}")
    if not (path / CACHE_INDEX).is_file():
        return  # images: load_records checks the kind, the rows and one readable pair
    # An sdpo-cache folder: its index and every shard's header and shapes, by the cache's own
    # check (sdpo.train.cache.check_cache; header reads only). The weights' fingerprint is
    # compared later, when the trainer opens the cache with the run's weights.
    from sdpo.train.cache import check_cache

    check_cache(
        str(path), model=config.model, resolution=config.resolution, identity=None,
        warn_here=False,
    )  # fmt: skip


def check_resume(config: TrainConfig) -> None:
    if config.resume in (None, "latest"):
        return
    from sdpo.train.checkpoint import COMPLETE_MARKER

    folder = Path(config.resume).expanduser()
    if not folder.is_dir():
        raise UsageError(
            f"resume: no checkpoint folder {config.resume}; give latest (the newest checkpoint "
            "in --output-dir) or an existing checkpoint-N folder"
        )
    if not (folder / COMPLETE_MARKER).is_file():
        raise UsageError(
            f"resume: {folder} is not a complete checkpoint (no {COMPLETE_MARKER} marker: an "
            "interrupted save, or not a checkpoint folder); give another, or --resume latest"
        )


def check_run_paths(config: TrainConfig) -> None:
    """Every path the run reads, before the process group, the data or the models."""
    check_pretrained(config)
    check_data(config)
    check_resume(config)
