"""``sdpo-eval score``: per-image scores stored in the manifest, a summary table beside it."""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from sdpo.eval.errors import RunFailure
from sdpo.eval.manifest import load_entries, save_entries
from sdpo.eval.scorers import (
    CONVENTIONS,
    METRICS,
    MissingWeights,
    WeightSources,
    build_scorer,
)
from sdpo.fingerprint import file_hash
from sdpo.train.config import check_value
from sdpo.train.errors import UsageError


def _versions() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "diffusers"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    return info


def _check_entry(manifest: str | Path, number: int, entry: dict) -> None:
    """The fields score reads and writes: a string image path, and scores (if any) an object."""
    where = f"manifest: {manifest}: entry {number} (prompt {entry['prompt']!r:.60})"
    path = entry.get("gen_image_path")
    if path is not None and not isinstance(path, str):
        raise UsageError(
            f'{where}: "gen_image_path" must be a string (the image\'s path), got '
            f"{type(path).__name__} {path!r:.60}"
        )
    scores = entry.get("scores")
    if scores is not None and not isinstance(scores, dict):
        raise UsageError(
            f'{where}: "scores" must be an object of metric: number, got {type(scores).__name__}'
        )


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
    conventions: str = "default",
) -> dict:
    """Scores every image of ``manifest`` (written back in place); returns the summary.

    Every image is opened and decoded before any model loads: an unreadable one is an error
    naming it, or under ``on_missing="skip"`` left unscored and listed in the summary."""
    from PIL import Image

    unknown = [metric for metric in metrics if metric not in METRICS]
    if unknown or not metrics:
        raise ValueError(
            f"metrics: unknown {', '.join(unknown) or '(none given)'}; expected some of "
            f"{', '.join(METRICS)}"
        )
    if on_missing not in ("error", "skip"):
        raise ValueError(f"on_missing: expected 'error' or 'skip', got {on_missing!r}")
    check_value("max_steps", batch_size, "--batch-size")  # FIELDS' "an integer >= 1"
    entries = load_entries(manifest)
    for number, entry in enumerate(entries):
        _check_entry(manifest, number, entry)
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
    if conventions not in CONVENTIONS:
        raise ValueError(
            f"conventions: expected one of {', '.join(CONVENTIONS)}, got {conventions!r}"
        )
    unreadable: list[dict] = []
    for entry in entries:
        try:
            with Image.open(entry["gen_image_path"]) as image:
                image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            if on_missing != "skip":
                raise ValueError(
                    f"manifest: image {entry['gen_image_path']} (prompt {entry['prompt']!r}) "
                    f"is unreadable ({error}); regenerate it, or pass --on-missing skip to "
                    "leave it unscored"
                ) from error
            unreadable.append({"image": entry["gen_image_path"], "error": str(error)})
            log(f"skipping unreadable image {entry['gen_image_path']}: {error}")
    skipped_paths = {row["image"] for row in unreadable}
    scored = [entry for entry in entries if entry["gen_image_path"] not in skipped_paths]
    if not scored:
        raise ValueError(f"manifest: none of the {len(entries)} images is readable")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    summary: dict = {
        "manifest": str(manifest),
        "conventions": conventions,
        "means": {},
        "skipped": {},
        "unreadable_images": unreadable,
        "weights": {},
    }
    loaded: dict = {}  # models shared between metrics (CLIP ViT-L/14: clip and aesthetics)
    for metric in metrics:
        try:
            if scorer_factory is build_scorer:
                scorer = build_scorer(metric, sources, device, conventions, loaded)
            else:
                scorer = scorer_factory(metric, sources, device)
        except MissingWeights as error:
            if on_missing == "skip":
                log(f"skipping {metric}: {error}")
                summary["skipped"][metric] = str(error)
                continue
            raise
        values: list[float] = []
        try:
            for start in range(0, len(scored), batch_size):
                batch = scored[start : start + batch_size]
                images = [Image.open(entry["gen_image_path"]) for entry in batch]
                values += scorer.score(images, [entry["prompt"] for entry in batch])
        except torch.OutOfMemoryError as error:
            first = (str(error).strip().splitlines() or ["out of memory"])[0]
            raise RunFailure(
                f"{metric}: out of memory on {device} ({first}); try a smaller --batch-size"
            ) from error
        for entry, value in zip(scored, values, strict=True):
            if not math.isfinite(value):
                raise ValueError(
                    f"{metric}: non-finite score {value} for {entry['gen_image_path']} (prompt "
                    f"{entry['prompt']!r}); check the weights given for {metric}"
                )
            entry.setdefault("scores", {})[metric] = float(value)
        # The mean over images, as the reference scripts' sum / count.
        summary["means"][metric] = sum(values) / len(values)
        summary["weights"][metric] = {
            key: {"source": path, "sha256": file_hash(path)}
            for key, path in getattr(scorer, "sources", {}).items()
        }
        log(f"{metric}: mean {summary['means'][metric]:.4f} over {len(values)} images")
    save_entries(manifest, entries)
    summary["versions"] = _versions()
    summary["images"] = len(scored)
    summary_file = Path(str(manifest) + ".scores.json")
    try:
        summary_file.write_text(json.dumps(summary, indent=2) + "\n")
    except OSError as error:
        raise RunFailure(f"writing {summary_file} failed ({error})") from error
    return summary


def summary_table(summary: dict) -> str:
    lines = [
        f"conventions: {summary.get('conventions', 'default')}",
        "",
        "| metric | mean |",
        "|---|---|",
    ]
    lines += [f"| {metric} | {value:.4f} |" for metric, value in summary["means"].items()]
    lines += [f"| {metric} | skipped (weights missing) |" for metric in summary["skipped"]]
    if summary.get("unreadable_images"):
        lines += [
            "",
            f"{len(summary['unreadable_images'])} unreadable image(s) left unscored "
            "(listed in the .scores.json)",
        ]
    return "\n".join(lines)
