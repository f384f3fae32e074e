"""Every path a run reads is checked before anything heavy is built: a missing or incomplete
weights folder, a model id in neither place looked at, missing data, a cache without its
shards, a --resume folder that is no checkpoint: status 2, one line, and no model built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sdpo.train.trainer as trainer
from sdpo.train.cli import main
from sdpo.train.config import config_from_args
from sdpo.train.paths import UNET_PARTS, check_run_paths, resolve_pretrained


def diffusers_folder(folder: Path, parts=UNET_PARTS, index: dict | None = None) -> Path:
    """A folder shaped like a diffusers pipeline (the parts empty: only their presence counts)."""
    for part in parts:
        (folder / part).mkdir(parents=True)
    if index is not False:
        (folder / "model_index.json").write_text(json.dumps(index or {"_class_name": "X"}))
    return folder


def manifest(folder: Path) -> Path:
    path = folder / "pairs.jsonl"
    path.write_text(json.dumps({"caption": "c", "winner": "w.png", "loser": "l.png"}) + "\n")
    return path


@pytest.fixture
def nothing_built(monkeypatch):
    """The data and model builders fail the test if reached: the check must come first."""

    def built(*args, **kwargs):
        raise AssertionError("built before the paths were checked")

    monkeypatch.setattr(trainer, "build_models", built)
    monkeypatch.setattr(trainer, "make_batches", built)
    monkeypatch.setattr(trainer, "Distributed", built)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def sd15(tmp_path: Path, pretrained: str, *extra: str) -> list[str]:
    data = ["--data", str(manifest(tmp_path))] if "--data" not in extra else []
    return ["--model", "sd15", "--pretrained", pretrained, *data, *extra]


def flow_index(*parts: str) -> dict:
    return {"_class_name": "StableDiffusion3Pipeline", **{p: ["diffusers", "X"] for p in parts}}


CASES = {
    "no weights folder": (
        lambda tmp: sd15(tmp, str(tmp / "no-such-model")),
        "no such folder",
    ),
    "a file, not a folder": (
        lambda tmp: sd15(tmp, str(manifest(tmp))),
        "is a file",
    ),
    "no model_index.json": (
        lambda tmp: sd15(tmp, str(diffusers_folder(tmp / "m", index=False))),
        "has no model_index.json",
    ),
    "a part missing": (
        lambda tmp: sd15(tmp, str(diffusers_folder(tmp / "m", parts=UNET_PARTS[:-1]))),
        "lacks text_encoder/",
    ),
    "an SD1.5 folder for SDXL": (
        lambda tmp: [*sd15(tmp, str(diffusers_folder(tmp / "m"))), "--model", "sdxl"],
        "lacks tokenizer_2/, text_encoder_2/",
    ),
    "a model id in neither place": (
        lambda tmp: sd15(tmp, "someone/absent-model"),
        "neither a local folder",
    ),
    "a flow folder missing": (
        lambda tmp: ["--model", "sd3", "--pretrained", str(tmp / "none"), "--data", str(tmp)],
        "no such folder",
    ),
    "a flow part missing": (
        lambda tmp: [
            "--model",
            "sd3",
            "--data",
            str(manifest(tmp)),
            "--pretrained",
            str(diffusers_folder(tmp / "m", ("vae",), flow_index("vae", "transformer"))),
        ],
        "lacks transformer/",
    ),
    "no data": (
        lambda tmp: sd15(tmp, str(diffusers_folder(tmp / "m")), "--data", str(tmp / "x.jsonl")),
        "data: no such file or folder",
    ),
    "a cache without its shards": (
        lambda tmp: sd15(tmp, str(diffusers_folder(tmp / "m")), "--data", str(cache(tmp))),
        # sdpo.train.cache.check_cache reads the index before the shards: this hand-made index
        # lacks fields a real one has, which is what it names first.
        'cache_index.json: no "storage_dtype"',
    ),
    "a resume folder that is no checkpoint": (
        lambda tmp: ["--preset", "tiny", "--resume", str(mkdir(tmp / "checkpoint-3"))],
        "is not a complete checkpoint",
    ),
    "a resume folder missing": (
        lambda tmp: ["--preset", "tiny", "--resume", str(tmp / "checkpoint-3")],
        "no checkpoint folder",
    ),
}


def mkdir(folder: Path) -> Path:
    folder.mkdir()
    return folder


def cache(tmp: Path) -> Path:
    folder = mkdir(tmp / "cache")
    shards = [{"file": f"shard-0000{i}.safetensors", "pairs": 2} for i in range(2)]
    (folder / "cache_index.json").write_text(json.dumps({"shards": shards, "resolution": 16}))
    (folder / "shard-00000.safetensors").write_bytes(b"")
    return folder


@pytest.mark.parametrize("case", CASES)
def test_a_missing_path_is_one_line_and_status_2_before_anything_is_built(
    tmp_path, capsys, nothing_built, empty_hub_cache, case
):
    argv, expected = CASES[case]
    output = ["--output-dir", str(tmp_path / "run"), "--no-progress"]
    assert main([*argv(tmp_path), *output]) == 2
    error = capsys.readouterr().err
    assert error.startswith("sdpo-train: error: ") and error.count("\n") == 1, error
    assert expected in error, error


def test_a_model_id_in_neither_place_names_both(tmp_path, empty_hub_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = config_from_args(sd15(tmp_path, "someone/absent-model"))
    with pytest.raises(ValueError) as caught:
        check_run_paths(config)
    assert str(tmp_path / "someone" / "absent-model") in str(caught.value)
    assert str(empty_hub_cache) in str(caught.value)
    config.allow_download = True  # then the loader may fetch it
    check_run_paths(config)


def test_a_model_id_in_the_hub_cache_resolves_to_its_snapshot(tmp_path, empty_hub_cache):
    repository = empty_hub_cache / "models--someone--cached-model"
    snapshot = diffusers_folder(repository / "snapshots" / "0123abcd")
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text("0123abcd")
    assert resolve_pretrained("someone/cached-model", allow_download=False) == snapshot
    check_run_paths(config_from_args(sd15(tmp_path, "someone/cached-model")))


def test_runs_with_nothing_to_check_or_complete_folders_pass(tmp_path):
    for argv in (
        ["--preset", "tiny"],
        ["--model", "sd3", "--pretrained", "tiny"],
        ["--model", "sd15", "--pretrained", "random"],
        sd15(tmp_path, str(diffusers_folder(tmp_path / "sd15"))),
    ):
        check_run_paths(config_from_args([*argv, "--output-dir", str(tmp_path / "run")]))
