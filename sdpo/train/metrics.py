"""Running statistics between log steps, metrics.jsonl and the tracker (``trackers.py``).

The statistics stay on the device (one vector per micro-batch added in place) and are read once
per ``--log-every`` optimizer steps, after one all-reduce across ranks.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

import sdpo
from sdpo import reference
from sdpo.train.distributed import Distributed
from sdpo.train.outputs import WriteError, replacing, writing
from sdpo.train.trackers import Tracker, open_tracker

# One row of metrics.jsonl per optimizer step: the loss, the mean lambda and the loss statistics.
METRIC_KEYS = ("loss", "lambda", *reference.STAT_NAMES)


def stats_vector(result: sdpo.PreferenceLoss, *extra: Tensor) -> Tensor:
    """The metrics of one micro-batch as one device vector (in METRIC_KEYS order; a per-pair or
    per-group statistic, lambda's (B,) for one, enters as its mean), then the ``extra`` 0-dim
    tensors. One ``torch.stack`` and no per-value cast: its type promotion makes fp32 of the
    usual fp32 values and fp64 of an fp64 run's. A ``.float()`` per value and a separate count
    update had made ``RunningStats.add`` 43 us of host time per micro-batch on a 2-core CPU
    (median, fused stats of B = 8); one stack with the count and one in-place add: 18 us."""
    values = [result.loss.detach()]
    for key in METRIC_KEYS[1:]:
        value = result.stats[key]
        values.append(value.mean() if value.dim() else value)
    return torch.stack((*values, *extra))


class RunningStats:
    """Sums of the micro-batch metrics since the last log row, on the device.

    A micro-batch's metrics first go into the sums of its optimizer step; ``end_step`` adds
    them to the row's sums only when the step was finite, and otherwise counts a skipped step,
    all on the device (``finite`` may be a device tensor: no host sync). ``state``/``load_state``
    carry the statistics through a checkpoint, so a resumed run logs the same rows.
    """

    def __init__(self, device: torch.device) -> None:
        # METRIC_KEYS, then the finite micro-batches counted in them.
        self.sums = torch.zeros(len(METRIC_KEYS) + 1, device=device)
        self.step_sums = torch.zeros_like(self.sums)
        # The count each micro-batch adds to the step's last entry, kept on the device so that
        # add() is one stack and one in-place add.
        self._one = torch.ones((), device=device)
        self.skipped_steps = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.sums.zero_()
        self.step_sums.zero_()
        self.skipped_steps.zero_()
        # All micro-batches read (for the throughput) and the images the data skipped.
        self.micro_batches, self.skipped = 0, 0
        self.start = time.perf_counter()

    @property
    def loss_sum(self) -> Tensor:
        """The sum of the losses of the current optimizer step's micro-batches."""
        return self.step_sums[0]

    def add(self, result: sdpo.PreferenceLoss, skipped_images: int) -> None:
        self.step_sums += stats_vector(result, self._one)
        self.micro_batches += 1
        self.skipped += skipped_images

    def end_step(self, finite: Tensor | bool) -> None:
        """Closes an optimizer step: its metrics join the row's if ``finite`` (the same on every
        rank), else it counts as one skipped step."""
        if isinstance(finite, bool):
            if finite:
                self.sums += self.step_sums
            else:
                self.skipped_steps += 1
        else:
            finite = finite.reshape(()).to(torch.bool)
            self.sums += torch.where(finite, self.step_sums, torch.zeros_like(self.step_sums))
            self.skipped_steps += (~finite).to(self.skipped_steps.dtype)
        self.step_sums.zero_()

    def reduce(
        self, environment: Distributed
    ) -> tuple[dict[str, float | None], int, int, int, float]:
        """(mean of each metric over every rank's finite micro-batches, None where there were
        none; all micro-batches read; skipped images; skipped optimizer steps; seconds since the
        last reset), all ranks summed: a collective."""
        # The skipped-step count is the same on every rank: only rank 0's enters the sum.
        own_steps = (
            self.skipped_steps
            if environment_rank(environment) == 0
            else torch.zeros_like(self.skipped_steps)
        )
        counts = torch.tensor(
            [self.micro_batches, self.skipped], device=self.sums.device, dtype=self.sums.dtype
        )
        vector = torch.cat([self.sums, own_steps.reshape(1).to(self.sums.dtype), counts])
        reduced = environment.all_reduce_sum(vector).tolist()
        finite_micro_batches = reduced[len(METRIC_KEYS)]
        means = {
            key: reduced[index] / finite_micro_batches if finite_micro_batches else None
            for index, key in enumerate(METRIC_KEYS)
        }
        skipped_steps = int(reduced[len(METRIC_KEYS) + 1])
        micro_batches, skipped = int(reduced[-2]), int(reduced[-1])
        return means, micro_batches, skipped, skipped_steps, time.perf_counter() - self.start

    def state(self) -> Tensor:
        """This rank's statistics since the last row as one CPU vector (between steps)."""
        counts = torch.tensor([self.micro_batches, self.skipped], dtype=torch.float64)
        return torch.cat(
            [self.sums.double().cpu(), self.skipped_steps.double().cpu().reshape(1), counts]
        )

    def load_state(self, vector: Tensor) -> None:
        size = len(METRIC_KEYS) + 1
        self.sums.copy_(vector[:size].to(self.sums.dtype))
        self.skipped_steps.fill_(float(vector[size]))
        self.micro_batches, self.skipped = int(vector[size + 1]), int(vector[size + 2])


def environment_rank(environment: object) -> int:
    return getattr(environment, "rank", 0)


class MetricsWriter:
    """metrics.jsonl (one row per logged optimizer step) and the tracker (--report-to), rank 0 only.

    On a resume the file keeps the rows up to the resumed step, so it reads as one
    uninterrupted run; a torn last line (a kill in the middle of a write) is dropped with a
    warning, a damaged row elsewhere is an error naming the file and line. The rows are rewritten
    under a temporary name and renamed, so a failed write leaves the old file whole; a failed
    append is a WriteError naming the file (at worst a torn last row, which a resume removes)."""

    def __init__(self, output_dir: Path, resume_step: int, tracker: Tracker | None = None) -> None:
        self.path = output_dir / "metrics.jsonl"
        if self.path.exists():
            kept = [row for row in read_metrics(self.path, repair=True) if row[1] <= resume_step]
            with writing("metrics", self.path), replacing(self.path) as temporary:
                temporary.write_text("".join(line + "\n" for line, _ in kept))
        # TensorBoard, wandb or nothing (--report-to): see trackers.py.
        self.tracker = open_tracker("tensorboard", output_dir) if tracker is None else tracker

    def write(self, row: dict) -> None:
        with writing("metrics", self.path), open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
        scalars = {
            key: value
            for key, value in row.items()
            if key != "step" and isinstance(value, (int, float))
        }
        self.tracker.log_scalars(scalars, row["step"])

    def close(self, quiet: bool = False) -> None:
        """``quiet``: another error is already on its way out; a failed flush here would hide it."""
        try:
            self.tracker.close()
        except WriteError:
            if not quiet:
                raise


def read_metrics(path: Path, repair: bool = False) -> list[tuple[str, int]]:
    """(line, step) of each row of metrics.jsonl. A last line that is not a complete row is a
    torn write: dropped with a warning when ``repair``; any other bad line is a ValueError."""
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, TypeError, KeyError):
            if repair and number == len(lines):
                print(
                    f"sdpo-train: warning: {path}: line {number} is a torn row (an interrupted "
                    "write); removed",
                    file=sys.stderr,
                )
                break
            raise ValueError(
                f"{path}: line {number} is not a metrics row ({line[:60]!r}); remove the file "
                "or start a new run with --overwrite"
            ) from None
        rows.append((line, step))
    return rows
