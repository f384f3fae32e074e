"""Bad data rows: unreadable images of any kind are skipped and counted, malformed rows are
refused (file and row named) before any model loads, for JSONL, parquet and save_to_disk."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from sdpo.train.data import PairBatches, load_records


def png(color: tuple[int, int, int], size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


RED, BLUE = png((255, 0, 0)), png((0, 0, 255))


def write_jsonl(folder: Path, rows: list[dict], images: bool = True) -> Path:
    (folder / "images").mkdir(exist_ok=True)
    if images:
        for index in range(len(rows)):
            (folder / "images" / f"w{index}.png").write_bytes(RED)
            (folder / "images" / f"l{index}.png").write_bytes(BLUE)
    manifest = folder / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


def jsonl_row(index: int, **changes) -> dict:
    row = {"caption": "red", "winner": f"images/w{index}.png", "loser": f"images/l{index}.png"}
    return {**row, **changes}


def load(path: Path) -> list:
    return load_records(str(path), resolution=16, synthetic_pairs=0, seed=0)


def refused(path: Path) -> str:
    with pytest.raises(ValueError) as caught:
        load(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("changes", "what"),
    [
        ({"caption": None}, "caption"),
        ({"caption": 3}, "caption"),
        ({"caption": ["a", "b"]}, "caption"),
        ({"winner": None}, "winner"),
        ({"loser": 5}, "loser"),
        ({"winner": ""}, "winner"),
    ],
)
def test_jsonl_wrong_types_are_refused_with_file_and_line(tmp_path, changes, what):
    manifest = write_jsonl(tmp_path, [jsonl_row(0), jsonl_row(1, **changes)])
    message = refused(manifest)
    assert f"{manifest} line 2" in message and what in message


def test_jsonl_line_that_is_not_an_object(tmp_path):
    manifest = write_jsonl(tmp_path, [jsonl_row(0)])
    manifest.write_text(manifest.read_text() + "[1, 2]\n")
    assert f"{manifest} line 2" in refused(manifest)


def test_no_readable_pair_names_a_missing_file_and_its_folder(tmp_path):
    manifest = write_jsonl(tmp_path, [jsonl_row(0), jsonl_row(1)], images=False)
    message = refused(manifest)
    assert "w0.png is missing from" in message and str(tmp_path / "images") in message


def test_no_readable_pair_when_every_image_is_corrupt(tmp_path):
    manifest = write_jsonl(tmp_path, [jsonl_row(0)])
    (tmp_path / "images" / "l0.png").write_bytes(b"not a png")
    assert "no pair" in refused(manifest) and "line 1" in refused(manifest)


def parquet(folder: Path, **columns) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = {
        "jpg_0": [RED, RED, BLUE],
        "jpg_1": [BLUE, BLUE, RED],
        "label_0": [1.0, 1.0, 0.0],
        "caption": ["first", "second", "third"],
    }
    table.update(columns)
    path = folder / "shard-0.parquet"
    pq.write_table(pa.table(table), path, row_group_size=2)
    return path


@pytest.mark.parametrize(
    ("column", "values"),
    [
        ("caption", ["first", "second", None]),  # was trained as the text "None"
        ("label_0", [1.0, 1.0, math.nan]),  # NaN made the loser the winner
        ("label_0", [1.0, 1.0, 7.0]),
        ("label_0", [1.0, 1.0, -3.0]),
        ("label_0", [1.0, 1.0, None]),
        ("label_0", [1, 1, 2]),
    ],
)
def test_parquet_malformed_rows_are_refused_with_file_and_row(tmp_path, column, values):
    path = parquet(tmp_path, **{column: values})
    message = refused(tmp_path)
    assert f"{path} row 2" in message and column in message  # row 2: in the second row group


def test_parquet_caption_that_is_a_number_is_refused(tmp_path):
    parquet(tmp_path, caption=[1, 2, 3])
    assert "caption: expected a string" in refused(tmp_path)


def test_parquet_null_image_cell_is_skipped_and_counted(tmp_path):
    parquet(tmp_path, jpg_1=[BLUE, None, RED])
    records = load(tmp_path)
    batches = PairBatches(records, batch_pairs=3, resolution=16, caption_dropout=0.0, seed=0)
    batch = batches.batch(0, 0)
    assert batch.skipped == 1 and batch.winners.shape == (3, 3, 16, 16)
    assert "second" not in batch.captions


def saved_dataset(folder: Path, **columns) -> Path:
    datasets = pytest.importorskip("datasets")
    table = {
        "jpg_0": [RED, RED, BLUE],
        "jpg_1": [BLUE, BLUE, RED],
        "label_0": [1.0, 1.0, 0.0],
        "caption": ["first", "second", "third"],
    }
    table.update(columns)
    datasets.Dataset.from_dict(table).save_to_disk(str(folder / "saved"))
    return folder / "saved"


@pytest.mark.parametrize(
    ("column", "values"),
    [("caption", ["a", None, "c"]), ("label_0", [1.0, 7.0, 0.0]), ("label_0", [1.0, -3.0, 0.0])],
)
def test_save_to_disk_malformed_rows_are_refused(tmp_path, column, values):
    folder = saved_dataset(tmp_path, **{column: values})
    message = refused(folder)
    assert "row 1" in message and column in message


def test_save_to_disk_null_image_is_skipped(tmp_path):
    folder = saved_dataset(tmp_path, jpg_0=[RED, None, BLUE])
    batches = PairBatches(load(folder), batch_pairs=3, resolution=16, caption_dropout=0, seed=0)
    assert batches.batch(0, 0).skipped == 1


def test_decompression_bomb_is_skipped_and_counted(tmp_path, monkeypatch):
    import PIL.Image

    manifest = write_jsonl(tmp_path, [jsonl_row(0), jsonl_row(1)])
    (tmp_path / "images" / "l1.png").write_bytes(png((0, 0, 255), size=64))
    # 64 x 64 = 4096 pixels > 2 x 1000: PIL raises DecompressionBombError (not an OSError).
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    batches = PairBatches(load(manifest), batch_pairs=2, resolution=16, caption_dropout=0, seed=0)
    assert batches.batch(0, 0).skipped == 1


@pytest.mark.parametrize("error", [SyntaxError("broken PNG file"), KeyError(3), EOFError()])
def test_any_decoder_exception_is_skipped(tmp_path, monkeypatch, error):
    import PIL.Image

    manifest = write_jsonl(tmp_path, [jsonl_row(0), jsonl_row(1)])
    records = load(manifest)
    real_open = PIL.Image.open

    def open_failing_on_l1(source, *args, **kwargs):
        if str(source).endswith("l1.png"):
            raise error
        return real_open(source, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", open_failing_on_l1)
    batches = PairBatches(records, batch_pairs=2, resolution=16, caption_dropout=0, seed=0)
    assert batches.batch(0, 0).skipped == 1


def test_cli_refuses_bad_data_in_one_line_before_models_load(tmp_path, monkeypatch, capsys):
    import sdpo.train.trainer as trainer
    from sdpo.train.cli import main

    def no_models(*args, **kwargs):
        raise AssertionError("models loaded before the data was checked")

    monkeypatch.setattr(trainer, "build_models", no_models)
    manifest = write_jsonl(tmp_path, [jsonl_row(0, caption=None)])
    argv = ["--preset", "tiny", "--output-dir", str(tmp_path / "run"), "--no-progress"]
    assert main([*argv, "--data", str(manifest)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{manifest} line 1" in error
