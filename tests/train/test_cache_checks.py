"""A cache is checked when a run opens it, before any model loads: its index, every shard's
safetensors header, and that it was built from the run's --pretrained weights. Each problem is
one line naming the file, exit status 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from sdpo.train import trainer
from sdpo.train.cache import build_cache
from sdpo.train.cache_cli import main as cache_main
from sdpo.train.cli import main as train_main
from sdpo.train.models import build_tiny, save_tiny_pretrained


@pytest.fixture(autouse=True)
def _hashes_in_tmp(tmp_path, monkeypatch):
    """The remembered weight hashes go to this test's folder, not ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def tiny_cache(folder: Path, pretrained: str | None = None, seed: int = 0) -> Path:
    build_cache(
        data=None,
        output_dir=str(folder),
        model="tiny",
        pretrained=pretrained,
        resolution=16,
        seed=seed,
        synthetic_pairs=6,
        shard_pairs=4,
        storage_dtype="float32",
        device="cpu",
    )
    return folder


def no_models(monkeypatch) -> None:
    def refuse(*_args, **_kwargs):
        raise AssertionError("the models loaded before the cache was checked")

    monkeypatch.setattr(trainer, "build_models", refuse)


def train_status(capsys, tmp_path: Path, cache: Path, *flags: str) -> tuple[int, str]:
    """sdpo-train's exit status and stderr for one step on ``cache``."""
    capsys.readouterr()
    status = train_main(
        ["--preset", "tiny", "--data", str(cache), "--max-steps", "1", "--no-progress",
         "--output-dir", str(tmp_path / "run"), *flags]
    )  # fmt: skip
    return status, capsys.readouterr().err.strip()


def refused_in_one_line(capsys, tmp_path, cache, *flags) -> str:
    status, err = train_status(capsys, tmp_path, cache, *flags)
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("sdpo-train: error: data: ") and "Traceback" not in err, err
    return err


def pipeline_folder(folder: Path, seed: int) -> Path:
    save_tiny_pretrained(build_tiny(16, seed), str(folder))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Two tiny pipeline folders of different weights, and a copy of the first elsewhere."""
    root = tmp_path_factory.mktemp("pipelines")
    first = pipeline_folder(root / "first", seed=0)
    shutil.copytree(first, root / "copy")
    return {"first": first, "copy": root / "copy", "other": pipeline_folder(root / "other", 1)}


def test_a_cache_of_other_weights_is_refused_and_of_the_same_weights_used(
    tmp_path, capsys, monkeypatch, folders
):
    cache = tiny_cache(tmp_path / "cache", pretrained=str(folders["first"]))
    index = json.loads((cache / "cache_index.json").read_text())
    assert set(index["source"]["sha256"]) == {"vae", "text_encoder", "tokenizer"}
    no_models(monkeypatch)
    line = refused_in_one_line(capsys, tmp_path, cache, "--pretrained", str(folders["other"]))
    assert "their text_encoder, vae differ" in line and str(folders["first"]) in line, line
    assert f"sdpo-cache --pretrained {folders['other']}" in line
    # The same weights in another folder pass the check (then reach the models: refused here).
    with pytest.raises(AssertionError, match="models loaded"):
        train_status(capsys, tmp_path, cache, "--pretrained", str(folders["copy"]))
    # A cache of the tiny model built in code records its seed: another seed is other weights.
    coded = tiny_cache(tmp_path / "coded", seed=3)
    assert json.loads((coded / "cache_index.json").read_text())["source"] == {
        "built_in_code": "tiny",
        "seed": 3,
    }
    assert "seed 3" in refused_in_one_line(capsys, tmp_path, coded, "--seed", "0")
    assert "the weights differ" in refused_in_one_line(
        capsys, tmp_path, coded, "--seed", "3", "--pretrained", str(folders["first"])
    )


def test_an_index_from_before_the_fingerprint_warns_or_refuses(
    tmp_path, capsys, monkeypatch, folders
):
    """Chosen: the same --pretrained text is used with a warning (rebuilding a Pick-a-Pic cache
    costs hours); another one is the mismatch the fingerprint exists to catch, refused."""
    cache = tiny_cache(tmp_path / "cache", pretrained=str(folders["first"]))
    index = json.loads((cache / "cache_index.json").read_text())
    del index["source"]
    index["version"] = 1
    (cache / "cache_index.json").write_text(json.dumps(index))
    no_models(monkeypatch)
    line = refused_in_one_line(capsys, tmp_path, cache, "--pretrained", str(folders["copy"]))
    assert "from before the weights' fingerprint was recorded" in line
    with pytest.raises(AssertionError, match="models loaded"):
        train_status(capsys, tmp_path, cache, "--pretrained", str(folders["first"]))
    assert "records no fingerprint of the weights" in capsys.readouterr().err


def rewrite_index(cache: Path, change) -> None:
    index = json.loads((cache / "cache_index.json").read_text())
    change(index)
    (cache / "cache_index.json").write_text(json.dumps(index))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def reshape_hidden(path: Path) -> None:
    tensors = load_file(str(path))
    tensors["hidden"] = tensors["hidden"][:, :-1].contiguous()  # one token fewer
    save_file(tensors, str(path))


def drop_a_row(path: Path) -> None:
    save_file({key: value[:-1].contiguous() for key, value in load_file(str(path)).items()}, path)


def to_half(path: Path) -> None:
    save_file({key: value.half() for key, value in load_file(str(path)).items()}, str(path))


DAMAGES = {
    # damage, the file the line must name, a phrase it must hold
    "truncated shard": (lambda c: truncate(c / "shard-00001.safetensors"), "shard-00001",
                        "not a readable safetensors file"),
    "truncated empty": (lambda c: truncate(c / "empty.safetensors"), "empty.safetensors",
                        "not a readable safetensors file"),
    "missing shard": (lambda c: (c / "shard-00000.safetensors").unlink(), "shard-00000",
                      "missing"),
    "no shards": (lambda c: rewrite_index(c, lambda i: i.pop("shards")), "cache_index.json",
                  'no "shards"'),
    "garbled index": (lambda c: (c / "cache_index.json").write_text('{"shards": ['),
                      "cache_index.json", "not JSON"),
    "index not an object": (lambda c: (c / "cache_index.json").write_text("[]"),
                            "cache_index.json", "expected an object"),
    "more pairs than shards": (
        lambda c: rewrite_index(c, lambda i: i.update(pairs=9, captions=i["captions"] * 2)),
        "cache_index.json", "must agree"),
    "shard rows fewer than listed": (lambda c: drop_a_row(c / "shard-00000.safetensors"),
                                     "shard-00000", "shape [4, 2, C, h, w], got [3, 2,"),
    "wrong tensor shape": (lambda c: reshape_hidden(c / "shard-00001.safetensors"),
                           "shard-00001", "hidden is F32 [2, 11, 32], expected F32 [2, 12, 32]"),
    "wrong dtype": (lambda c: to_half(c / "shard-00001.safetensors"), "shard-00001",
                    "is F16"),
    "shard outside the folder": (
        lambda c: rewrite_index(c, lambda i: i["shards"][0].update(file="../x.safetensors")),
        "cache_index.json", "must be a file name"),
    "pairs not a count": (
        lambda c: rewrite_index(c, lambda i: i["shards"][0].update(pairs="4")),
        "cache_index.json", "shards[0].pairs must be an integer >= 1"),
    "resolution missing": (lambda c: rewrite_index(c, lambda i: i.pop("resolution")),
                           "cache_index.json", 'no "resolution"'),
}  # fmt: skip


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_cache_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch, damage):
    cache = tiny_cache(tmp_path / "cache")
    change, file, phrase = DAMAGES[damage]
    change(cache)
    no_models(monkeypatch)
    line = refused_in_one_line(capsys, tmp_path, cache)
    assert file in line and phrase in line, line


def test_an_intact_cache_passes_every_check_and_trains(tmp_path, capsys):
    cache = tiny_cache(tmp_path / "cache")
    status, err = train_status(capsys, tmp_path, cache)
    assert status == 0, err
    assert (tmp_path / "run" / "metrics.jsonl").is_file()  # it trained its step


def test_sdpo_cache_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    status = cache_main(["--output-dir", str(tmp_path / "file")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err == (
        f"sdpo-cache: error: --output-dir: {tmp_path / 'file'} is a file, not a folder; "
        "choose another"
    )
    status = cache_main(["--output-dir", str(tmp_path / "file" / "below")])
    assert status == 2 and "is a file, not a folder" in capsys.readouterr().err
    # A refused setting found once the command runs is status 2 as well (it was 1).
    status = cache_main(["--output-dir", str(tmp_path / "cache"), "--model", "sd3"])
    assert status == 2 and capsys.readouterr().err.strip() == (
        "sdpo-cache: error: --model sd3 needs --pretrained PATH (a local diffusers folder) or "
        "--pretrained tiny"
    )


def test_a_shard_damaged_after_the_checks_is_a_one_line_failure(tmp_path):
    from sdpo.train.cache import CachedPairBatches

    cache = tiny_cache(tmp_path / "cache")
    batches = CachedPairBatches(
        str(cache), batch_pairs=2, caption_dropout=0.0, seed=0, resolution=16
    )
    for shard in cache.glob("shard-*.safetensors"):
        truncate(shard)
    with pytest.raises(ValueError, match=r"data: reading .*shard-0000\d.safetensors failed during"):
        batches.batch(0, 0)


def test_a_model_id_is_fingerprinted_from_the_local_hf_cache(tmp_path, monkeypatch, folders):
    """A cached model id hashes its snapshot folder's parts, as a local folder does; an id not
    on local disk yet can only be named, and a cache of files is not taken for it."""
    from huggingface_hub import constants

    from sdpo.train.cache import _source_differences, source_identity

    hub = tmp_path / "hub"
    snapshot = hub / "models--org--tiny" / "snapshots" / "0123abcd"
    (hub / "models--org--tiny" / "refs").mkdir(parents=True)
    (hub / "models--org--tiny" / "refs" / "main").write_text("0123abcd")
    shutil.copytree(folders["first"], snapshot)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    from_id = source_identity("sd15", "org/tiny", seed=0)
    assert from_id == source_identity("sd15", str(folders["first"]), seed=0)
    assert set(from_id["sha256"]) == {"vae", "text_encoder", "tokenizer"}
    absent = source_identity("sd15", "org/elsewhere", seed=0)
    assert absent == {"name": "org/elsewhere"}
    assert "not on local disk yet" in _source_differences(from_id, absent)
