"""Bad data rows: unreadable images of any kind are skipped and counted, malformed rows are
refused (file and row named) before any model loads, for JSONL, parquet and save_to_disk."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import signal
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdpo.train.data import PairBatches, SkipReporter, batch_stream, load_records


def png(color: tuple[int, int, int], size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


RED, BLUE, GREEN = png((255, 0, 0)), png((0, 0, 255)), png((0, 255, 0))


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
    l1 = png((0, 0, 254))  # the only image with these bytes
    (tmp_path / "images" / "l1.png").write_bytes(l1)
    records = load(manifest)
    real_open = PIL.Image.open

    def open_failing_on_l1(source, *args, **kwargs):
        if isinstance(source, io.BytesIO) and source.getvalue() == l1:
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


# --- Data that would block, or resolve elsewhere ------------------------------------------------


@contextlib.contextmanager
def deadline(seconds: float):
    """Fails the test instead of hanging it: SIGALRM sent to the main thread itself (a signal
    to the process may land on another of its threads, leaving the main thread's blocked call
    alone) interrupts a blocked open() or queue wait, and the handler's exception ends the
    retried system call (PEP 475)."""

    def expired(number, frame):
        # pytest.fail raises a BaseException: the loader's "any Exception is an unreadable
        # image" cannot swallow it (a TimeoutError is an OSError, and would be).
        pytest.fail(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    main = threading.main_thread().ident
    timer = threading.Timer(seconds, signal.pthread_kill, (main, signal.SIGALRM))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_fifo_image_is_skipped_and_counted_not_waited_for(tmp_path, workers):
    manifest = write_jsonl(tmp_path, [jsonl_row(0), jsonl_row(1), jsonl_row(2)])
    for name in ("w0.png", "l1.png"):  # the first pair's: the readable-pair check meets it
        (tmp_path / "images" / name).unlink()
        os.mkfifo(tmp_path / "images" / name)  # open() for reading waits for a writer
    with deadline(60):
        batches = PairBatches(
            load(manifest), batch_pairs=3, resolution=16, caption_dropout=0, seed=0
        )
        _, _, batch = next(batch_stream(batches, (0, 0), workers))
    assert batch.skipped >= 2 and batch.winners.shape == (3, 3, 16, 16)
    assert any("l1.png is a FIFO, not an image file" in note for note in batch.skip_notes)


def test_parquet_string_paths_resolve_against_the_parquet_folder(tmp_path, monkeypatch):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    for folder, colors in ((data, (RED, BLUE)), (elsewhere, (GREEN, GREEN))):
        (folder / "images").mkdir(parents=True)
        (folder / "images" / "red.png").write_bytes(colors[0])
        (folder / "images" / "blue.png").write_bytes(colors[1])
    parquet(data, jpg_0=["images/red.png"] * 3, jpg_1=["images/blue.png"] * 3)
    monkeypatch.chdir(elsewhere)  # where the same relative names are green images
    batches = PairBatches(load(data), batch_pairs=3, resolution=16, caption_dropout=0, seed=0)
    batch = batches.batch(0, 0)
    assert batch.skipped == 0
    red, blue = torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])
    for winner, loser, caption in zip(batch.winners, batch.losers, batch.captions, strict=True):
        expected = (blue, red) if caption == "third" else (red, blue)  # third: label_0 = 0
        torch.testing.assert_close(winner[:, 0, 0], expected[0])
        torch.testing.assert_close(loser[:, 0, 0], expected[1])


def test_a_jsonl_that_is_not_utf8_is_one_line_naming_file_and_line(tmp_path, monkeypatch, capsys):
    import sdpo.train.trainer as trainer
    from sdpo.train.cli import main

    def no_models(*args, **kwargs):
        raise AssertionError("models loaded before the data was checked")

    monkeypatch.setattr(trainer, "build_models", no_models)
    manifest = write_jsonl(tmp_path, [jsonl_row(0), jsonl_row(1)])
    rows = [json.dumps(jsonl_row(0)), json.dumps(jsonl_row(1, caption="café"), ensure_ascii=False)]
    manifest.write_bytes("\n".join(rows).encode("latin-1"))  # é is one byte there, 0xe9
    argv = ["--preset", "tiny", "--output-dir", str(tmp_path / "run"), "--no-progress"]
    assert main([*argv, "--data", str(manifest)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert f"{manifest} line 2: not UTF-8 text (byte 0xe9 at column" in error


# --- Unreadable images are named as they are met ------------------------------------------------


def test_skip_reporter_names_the_first_five_then_says_the_rest_are_counted():
    lines: list[str] = []
    reporter = SkipReporter(lines.append, first=5)
    reporter.report(2, ["a", "b"])
    reporter.report(3, ["c", "d", "e"])
    assert [line.rsplit(": ", 1)[1] for line in lines] == ["a", "b", "c", "d", "e"]
    reporter.report(2, ["f", "g"])
    reporter.report(7, ["h"])
    assert len(lines) == 6 and "further ones are only counted" in lines[5]


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_images_are_logged_when_met_and_counted_in_progress_lines(tmp_path, workers):
    from trainer_helpers import tiny

    from sdpo.train.trainer import train

    manifest = write_jsonl(tmp_path, [jsonl_row(index) for index in range(8)])
    for index in range(1, 8):
        (tmp_path / "images" / f"l{index}.png").write_bytes(b"not a png")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("sdpo.train")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        config = tiny(tmp_path, data=str(manifest), max_steps=3, num_workers=workers)
        summary = train(config)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = stream.getvalue().splitlines()
    named = [line for line in lines if line.startswith("skipped an unreadable image")]
    assert len(named) == 5, lines
    assert all(
        f"{manifest} line " in line and "(loser): UnidentifiedImageError" in line for line in named
    )
    further = [index for index, line in enumerate(lines) if "further ones are only counted" in line]
    assert len(further) == 1 and summary["skipped_images"] > 5
    # Said before the first progress line, not only in the final summary.
    progress = [index for index, line in enumerate(lines) if line.startswith("step ")]
    assert lines.index(named[0]) < progress[0]
    assert all("skipped_images" in lines[index] for index in progress)
    assert f"skipped_images {summary['skipped_images']}" in lines[progress[-1]]
