"""Helpers the trainer tests share: the tiny-preset config and the logged metrics rows."""

from __future__ import annotations

import json
from pathlib import Path

from sdpo.train.config import TrainConfig, config_from_args


def tiny(tmp_path: Path, name: str = "run", **overrides) -> TrainConfig:
    """The tiny preset writing to ``tmp_path / name``, with ``overrides`` set, validated."""
    config = config_from_args(
        ["--preset", "tiny", "--output-dir", str(tmp_path / name), "--no-progress"]
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    config.validate()
    return config


def read_rows(output_dir: str | Path) -> list[dict]:
    """The rows of ``output_dir/metrics.jsonl``."""
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]
