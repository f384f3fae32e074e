"""Metric trackers behind ``--report-to``: TensorBoard (the default), Weights & Biases, or none.

``metrics.jsonl`` is always written (by ``metrics.MetricsWriter``); a tracker receives the same
scalars and the validation images. wandb is imported only when asked for, and its absence is a
one-line error; TensorBoard missing its package is a warning, not an error (metrics.jsonl holds
every number).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sdpo.train.errors import UsageError
from sdpo.train.outputs import writing

logger = logging.getLogger("sdpo.train")


class Tracker:
    """No tracker: every call does nothing."""

    name = "none"

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def log_image(self, tag: str, image: np.ndarray, step: int, caption: str = "") -> None:
        """``image``: (H, W, 3) uint8."""

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        # Its event files are written by a thread; a failed write there surfaces at the next
        # call from here, which each ``writing`` block turns into the one-line WriteError.
        with writing("tensorboard", folder):
            self.writer = SummaryWriter(str(folder))

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        with writing("tensorboard", self.folder):
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def log_image(self, tag: str, image: np.ndarray, step: int, caption: str = "") -> None:
        with writing("tensorboard", self.folder):
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        with writing("tensorboard", self.folder):
            self.writer.close()


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, folder: Path, run_config: dict) -> None:
        self.wandb = import_wandb()
        self.run = self.wandb.init(
            project="sdpo-train", dir=str(folder), config=run_config, resume="allow"
        )

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_image(self, tag: str, image: np.ndarray, step: int, caption: str = "") -> None:
        self.run.log({tag: self.wandb.Image(image, caption=caption)}, step=step)

    def close(self) -> None:
        self.run.finish()


def import_wandb():
    try:
        import wandb
    except ImportError:
        raise UsageError(
            "report_to: wandb is not installed (pip install wandb); use --report-to tensorboard "
            "or none"
        ) from None
    return wandb


def open_tracker(report_to: str, output_dir: Path, run_config: dict | None = None) -> Tracker:
    """The ``--report-to`` tracker, writing under ``output_dir`` (rank 0 only)."""
    if report_to == "wandb":
        return WandbTracker(output_dir, run_config or {})
    if report_to == "tensorboard":
        try:
            return TensorBoardTracker(output_dir / "tensorboard")
        except ImportError:
            logger.warning(
                "report_to: tensorboard is not installed (pip install tensorboard); "
                "metrics go to metrics.jsonl only"
            )
    return Tracker()
