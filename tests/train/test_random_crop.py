"""--random-crop reaches every crop position, as torchvision's RandomCrop in the reference
scripts does (its offset is uniform over 0..spare inclusive), from the trainer's own draws."""

from __future__ import annotations

import io
from collections import Counter

import pytest
from PIL import Image

from sdpo.train.data import PairBatches, PairRecord, preprocess


def column_coded_png(width: int, height: int) -> bytes:
    """An RGB image whose red channel is 10 x the column and green 10 x the row."""
    image = Image.new("RGB", (width, height))
    image.putdata([(10 * x, 10 * y, 0) for y in range(height) for x in range(width)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def crop_offset(pixels, axis: str) -> int:
    """The left (or top) edge of a crop of a column_coded_png, read from its first pixel."""
    channel = 0 if axis == "x" else 1
    return round((float(pixels[channel, 0, 0]) + 1) * 127.5 / 10)


@pytest.mark.parametrize(("size", "axis"), [((20, 16), "x"), ((16, 21), "y")])
def test_the_crop_reaches_both_edges(size, axis):
    # 16 px crops of a 20-wide (or 21-tall) image: spare 4 (or 5) pixels, offsets 0..spare.
    image = column_coded_png(*size)
    spare = max(size) - 16
    for draw, expected in [(0.0, 0), (0.5, (spare + 1) // 2), (0.999999, spare)]:
        crop = (draw, 0.0) if axis == "x" else (0.0, draw)
        assert crop_offset(preprocess(image, 16, False, crop), axis) == expected, draw
    # No crop: the centre, as the reference's CenterCrop.
    assert crop_offset(preprocess(image, 16, False, None), axis) == spare // 2


def test_the_trainers_draws_cover_every_offset_about_uniformly():
    image = column_coded_png(20, 16)  # 5 horizontal offsets
    records = [PairRecord("a", image, image) for _ in range(4)]
    batches = PairBatches(
        records, batch_pairs=2, resolution=16, caption_dropout=0.0, seed=0, hflip=False,
        random_crop=True,
    )  # fmt: skip
    offsets = Counter()
    for epoch in range(40):
        for batch_index in range(batches.batches_per_epoch):
            batch = batches.batch(epoch, batch_index)
            for pixels in (*batch.winners, *batch.losers):
                offsets[crop_offset(pixels, "x")] += 1
    # 320 crops over 5 offsets: 64 expected each, sd ~7.2; every offset between 34 and 94.
    assert sorted(offsets) == [0, 1, 2, 3, 4]
    assert all(34 <= count <= 94 for count in offsets.values()), offsets
