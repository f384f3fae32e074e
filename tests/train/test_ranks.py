"""What each rank does, checked against what it should do (not one distributed run against
another): its share of the pairs, its own random draws, the learning rate the documented rule
gives at its world size, and the statistics and skip counts reduced over the ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_helpers import tiny

from sdpo.train.data import PairBatches, synthetic_records
from sdpo.train.optim import scaled_learning_rate


def rank_batches(world_size: int, pairs: int = 10, batch_pairs: int = 2) -> list[PairBatches]:
    records = synthetic_records(pairs, 16, seed=0)
    return [
        PairBatches(
            records, batch_pairs=batch_pairs, resolution=16, caption_dropout=0.5, seed=3,
            rank=rank, world_size=world_size,
        )
        for rank in range(world_size)
    ]  # fmt: skip


def test_two_ranks_read_disjoint_shares_that_cover_each_epoch():
    # 10 pairs, 2 ranks x 2 pairs per batch: 2 batches per rank per epoch, 8 pairs read (the
    # remainder of 2 is dropped so that every rank reaches every collective).
    ranks = rank_batches(2)
    assert [batches.batches_per_epoch for batches in ranks] == [2, 2]
    orders = []
    for epoch in range(3):
        shares = [
            [index for batch in range(2) for index in batches.indices(epoch, batch)]
            for batches in ranks
        ]
        assert not set(shares[0]) & set(shares[1]), f"epoch {epoch}: the ranks share a pair"
        read = shares[0] + shares[1]
        assert len(set(read)) == 8 and set(read) <= set(range(10))
        orders.append(read)
    assert orders[0] != orders[1], "every epoch draws a new order"
    # One rank alone reads the same pairs per epoch as the two together (one order, split).
    alone = rank_batches(1, pairs=8, batch_pairs=2)[0]
    assert alone.batches_per_epoch == 4


def test_two_ranks_draw_their_own_flips_and_caption_dropout():
    ranks = rank_batches(2)
    first, second = (batches.batch(0, 0) for batches in ranks)
    # Different pairs, and the flips / dropout of batch (0, 0) drawn from each rank's stream.
    assert not torch.equal(first.winners, second.winners)
    again = rank_batches(2)[1].batch(0, 0)
    assert torch.equal(second.winners, again.winners) and second.captions == again.captions


@pytest.mark.parametrize("scale_lr", [True, False])
def test_the_learning_rate_at_world_size_two_follows_the_documented_rule(tmp_path, scale_lr):
    # --scale-lr: learning_rate x pairs per optimizer step over all processes
    # (train_batch_pairs x gradient_accumulation x world size), the reference scripts' rule.
    config = tiny(tmp_path, learning_rate=1e-5, train_batch_pairs=3, gradient_accumulation=4)
    config.scale_lr = scale_lr
    expected = 1e-5 * (3 * 4 * 2 if scale_lr else 1)
    assert scaled_learning_rate(config, 2) == pytest.approx(expected, rel=1e-12)
    assert scaled_learning_rate(config, 1) == pytest.approx(expected / (2 if scale_lr else 1))


@pytest.mark.slow  # one 2-process torchrun training: ~40 s on 2 cores
def test_each_rank_under_torchrun_does_its_own_share_and_the_counts_are_reduced(tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    environment = {key: value for key, value in os.environ.items() if not key.startswith("TRITON")}
    # Rank 1's third loss call (step 2's first micro-batch) is non-finite: both ranks skip
    # step 2, and the run counts one skipped step, not one per rank.
    environment.update(SDPO_RANK_PROBE=str(probe), SDPO_RANK_PROBE_POISON="1:3")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(Path(__file__).parent / "rank_probe_main.py"),
        "--preset", "tiny", "--max-steps", "3", "--gradient-accumulation", "2",
        "--train-batch-pairs", "2", "--synthetic-pairs", "12", "--learning-rate", "1e-5",
        "--scale-lr", "--warmup-steps", "0", "--lr-scheduler", "constant", "--log-every", "1",
        "--on-nonfinite", "skip", "--max-skipped-fraction", "0.5", "--no-progress",
        "--output-dir", str(tmp_path / "run"),
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=environment, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((probe / f"rank-{rank}.json").read_text()) for rank in (0, 1)]

    # Shares: 12 pairs, 2 ranks x 2 pairs: 3 batches per rank per epoch; within an epoch the
    # two ranks' pairs are disjoint and together 12 distinct pairs.
    by_epoch: dict[int, list[list[int]]] = {}
    for rank, record in enumerate(records):
        for epoch, _batch, indices in record["batches"]:
            by_epoch.setdefault(epoch, [[], []])[rank].extend(indices)
    for epoch, (first, second) in by_epoch.items():
        assert not set(first) & set(second), f"epoch {epoch}: both ranks read a pair"
    full_epoch = by_epoch[0]
    assert len(set(full_epoch[0] + full_epoch[1])) == 12

    # Noise: every micro-batch draws its own on each rank (6 calls each: 3 steps x 2).
    calls = [record["calls"] for record in records]
    assert len(calls[0]) == len(calls[1]) == 6
    assert all(calls[0][k][1] != calls[1][k][1] for k in range(6)), "ranks drew the same noise"

    lines = result.stdout.splitlines()
    start = max(number for number, line in enumerate(lines) if line == "{")
    summary = json.loads("\n".join(lines[start:]))  # the summary: the last JSON object
    assert summary["skipped_steps"] == 1
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    # Step 2's row: skipped on both ranks, so no metric (null), its skip counted once.
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert rows[1]["loss"] is None and rows[1]["skipped_steps"] == 1
    for row in (rows[0], rows[2]):
        # The logged loss is the mean over both ranks' micro-batches of that step.
        first_call = 2 * (row["step"] - 1)
        losses = [calls[rank][k][0] for rank in (0, 1) for k in (first_call, first_call + 1)]
        assert row["loss"] == pytest.approx(sum(losses) / 4, rel=1e-5)
        # The documented rule: 1e-5 x (2 pairs x 2 micro-batches x 2 processes).
        assert row["lr"] == pytest.approx(1e-5 * 8, rel=1e-9)
