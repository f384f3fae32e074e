"""``sdpo-eval score``: per-image scores stored in the manifest, a summary table beside it."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from sdpo.eval.manifest import load_entries, save_entries
from sdpo.eval.scorers import METRICS, MissingWeights, WeightSources, build_scorer, file_hash


def _versions() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "diffusers"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    return info


def score_manifest(
    manifest: str | Path,
    metrics: list[str],
    sources: WeightSources,
    *,
    on_missing: str = "error",
    batch_size: int = 16,
    device: torch.device | None = None,
    scorer_factory: Callable = build_scorer,
    log: Callable[[str], None] = print,
) -> dict:
    """Scores every image of ``manifest`` (written back in place); returns the summary."""
    from PIL import Image

    unknown = [metric for metric in metrics if metric not in METRICS]
    if unknown or not metrics:
        raise ValueError(
            f"metrics: unknown {', '.join(unknown) or '(none given)'}; expected some of "
            f"{', '.join(METRICS)}"
        )
    if on_missing not in ("error", "skip"):
        raise ValueError(f"on_missing: expected 'error' or 'skip', got {on_missing!r}")
    entries = load_entries(manifest)
    missing_images = [
        entry["gen_image_path"]
        for entry in entries
        if not entry.get("gen_image_path") or not Path(entry["gen_image_path"]).is_file()
    ]
    if missing_images:
        raise FileNotFoundError(
            f"manifest: {len(missing_images)} image(s) missing, first {missing_images[0]!r}; "
            "run `sdpo-eval generate` first"
        )
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    summary: dict = {"manifest": str(manifest), "means": {}, "skipped": {}, "weights": {}}
    for metric in metrics:
        try:
            scorer = scorer_factory(metric, sources, device)
        except MissingWeights as error:
            if on_missing == "skip":
                log(f"skipping {metric}: {error}")
                summary["skipped"][metric] = str(error)
                continue
            raise
        values: list[float] = []
        for start in range(0, len(entries), batch_size):
            batch = entries[start : start + batch_size]
            images = [Image.open(entry["gen_image_path"]) for entry in batch]
            values += scorer.score(images, [entry["prompt"] for entry in batch])
        for entry, value in zip(entries, values, strict=True):
            entry.setdefault("scores", {})[metric] = float(value)
        summary["means"][metric] = sum(values) / len(values)
        summary["weights"][metric] = {
            key: {"source": path, "sha256_head": file_hash(path)}
            for key, path in getattr(scorer, "sources", {}).items()
        }
        log(f"{metric}: mean {summary['means'][metric]:.4f} over {len(values)} images")
    save_entries(manifest, entries)
    summary["versions"] = _versions()
    summary["images"] = len(entries)
    Path(str(manifest) + ".scores.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summary_table(summary: dict) -> str:
    lines = ["| metric | mean |", "|---|---|"]
    lines += [f"| {metric} | {value:.4f} |" for metric, value in summary["means"].items()]
    lines += [f"| {metric} | skipped (weights missing) |" for metric in summary["skipped"]]
    return "\n".join(lines)
