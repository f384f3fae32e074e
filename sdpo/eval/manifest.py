"""Prompt suites and generation manifests: the reference evaluation's JSON format.

A suite is a list of ``{"prompt", "gen_image_path", "raw_image_path", "metadata"}`` objects
(the official repository's prompts/*.json, see ``sdpo-eval fetch-suites``); a manifest is the same list with ``gen_image_path`` filled in
and, after ``score``, ``"scores": {"pickscore": ..., ...}`` per entry. The run's settings are
kept in a sidecar ``<manifest>.meta.json`` so the manifest itself stays in the suites' format.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdpo.eval.errors import RunFailure


def load_entries(path: str | Path, what: str = "manifest") -> list[dict]:
    """The entries of a suite or manifest; ``what`` names it in errors (e.g. "--suite")."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what}: no such file {file}")
    try:
        entries = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what}: {file} is not JSON ({error})") from error
    if not isinstance(entries, list) or not all(
        isinstance(entry, dict) and isinstance(entry.get("prompt"), str) for entry in entries
    ):
        raise ValueError(
            f'{what}: {file} must be a list of objects with a string "prompt" '
            "(the prompt suites' format; `sdpo-eval fetch-suites` downloads them)"
        )
    if not entries:
        raise ValueError(f"{what}: {file} holds no entries (an empty list); nothing to do")
    return entries


def save_entries(path: str | Path, entries: list[dict]) -> None:
    """Writes the manifest (aside, then renamed); a failed write is a RunFailure (exit 1)."""
    file = Path(path)
    temporary = file.with_suffix(file.suffix + ".tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(entries, indent=2, ensure_ascii=False) + "\n")
        temporary.replace(file)  # never a half-written manifest
    except OSError as error:
        raise RunFailure(f"writing the manifest {file} failed ({error})") from error


def meta_path(path: str | Path) -> Path:
    return Path(str(path) + ".meta.json")


def keyed_by_prompt(entries: list[dict]) -> dict[tuple[str, int], dict]:
    """Entries keyed by (prompt, occurrence): a suite may repeat a prompt (HPDv2 has 28
    duplicates), and the k-th occurrence on one side pairs with the k-th on the other."""
    seen: dict[str, int] = {}
    keyed = {}
    for entry in entries:
        occurrence = seen.get(entry["prompt"], 0)
        seen[entry["prompt"]] = occurrence + 1
        keyed[(entry["prompt"], occurrence)] = entry
    return keyed
