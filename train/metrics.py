"""Running statistics between log steps, metrics.jsonl and the tracker (``trackers.py``).

The statistics stay on the device (one vector per micro-batch added in place) and are read once
per ``--log-every`` optimizer steps, after one all-reduce across ranks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import Tensor

import sdpo
from sdpo import reference
from sdpo.train.distributed import Distributed
from sdpo.train.trackers import Tracker, open_tracker

# One row of metrics.jsonl per optimizer step: the loss, the mean lambda and the loss statistics.
METRIC_KEYS = ("loss", "lambda", *reference.STAT_NAMES)


def stats_vector(result: sdpo.PreferenceLoss) -> Tensor:
    """The metrics of one micro-batch as one device vector (in METRIC_KEYS order)."""
    values = [result.loss.detach().float()]
    for key in METRIC_KEYS[1:]:
        value = result.stats[key].float()
        values.append(value.mean() if value.dim() else value)
    return torch.stack(values)


class RunningStats:
    """Sums of the micro-batch metrics, the micro-batch count and the skipped images since the
    last log row, on the device."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(len(METRIC_KEYS), device=device)
        self.reset()

    def reset(self) -> None:
        self.sums.zero_()
        self.micro_batches, self.skipped = 0, 0
        self.start = time.perf_counter()

    @property
    def loss_sum(self) -> Tensor:
        return self.sums[0]

    def add(self, result: sdpo.PreferenceLoss, skipped_images: int) -> None:
        self.sums += stats_vector(result)
        self.micro_batches += 1
        self.skipped += skipped_images

    def reduce(self, environment: Distributed) -> tuple[dict[str, float], int, int, float]:
        """(mean of each metric over every rank's micro-batches, micro-batches, skipped images,
        seconds since the last reset), all ranks summed: a collective."""
        counts = torch.tensor(
            [self.micro_batches, self.skipped], device=self.sums.device, dtype=self.sums.dtype
        )
        reduced = environment.all_reduce_sum(torch.cat([self.sums, counts])).tolist()
        micro_batches = reduced[-2]
        means = {key: reduced[index] / micro_batches for index, key in enumerate(METRIC_KEYS)}
        return means, micro_batches, int(reduced[-1]), time.perf_counter() - self.start


class MetricsWriter:
    """metrics.jsonl (one row per logged optimizer step) and TensorBoard events, rank 0 only."""

    def __init__(self, output_dir: Path, resume_step: int, tracker: Tracker | None = None) -> None:
        self.path = output_dir / "metrics.jsonl"
        if self.path.exists():
            # Keep the rows up to the resumed step, so the file reads as one uninterrupted run.
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line and json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        # TensorBoard, wandb or nothing (--report-to): see trackers.py.
        self.tracker = open_tracker("tensorboard", output_dir) if tracker is None else tracker

    def write(self, row: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        scalars = {
            key: value
            for key, value in row.items()
            if key != "step" and isinstance(value, (int, float))
        }
        self.tracker.log_scalars(scalars, row["step"])

    def close(self) -> None:
        self.tracker.close()
