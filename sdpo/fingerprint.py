"""sha256 fingerprints of weight files and folders, shared by ``sdpo-eval score`` (recorded with
the scores) and ``sdpo-cache`` / ``sdpo-train`` (a cache records the weights it was built from).

Hashes are remembered by (path, size, mtime) in ``$XDG_CACHE_HOME/sdpo-eval/sha256.json``
(``~/.cache`` by default), so a multi-GB file is read once, and again only when it changes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def _hash_cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "sdpo-eval" / "sha256.json"


def _file_sha256(file: Path, cache: dict) -> str:
    """sha256 of a whole file, streamed in 16 MB blocks; remembered by (path, size, mtime) so a
    4 GB checkpoint is read once, and re-read when it changes."""
    stat = file.stat()
    key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    if key not in cache:
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            while block := handle.read(16 * 2**20):
                digest.update(block)
        cache[key] = digest.hexdigest()
    return cache[key]


def file_hash(path: str | Path) -> str | None:
    """sha256 of a weight file, or for a folder (a transformers model folder, an HF cache
    snapshot whose files are links to blobs) the sha256 of its sorted ``relative path: file
    sha256`` lines; None if ``path`` does not exist."""
    target = Path(path)
    if not target.exists():
        return None
    cache_file = _hash_cache_file()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    if target.is_file():
        result = _file_sha256(target, cache)
    else:
        lines = [
            f"{file.relative_to(target).as_posix()}: {_file_sha256(file, cache)}"
            for file in sorted(target.rglob("*"))
            if file.is_file()
        ]
        result = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: torchrun ranks hash at the same time, and a reader must
        # never see half a file (it would only lose the remembered hashes, but still).
        temporary = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(cache))
        temporary.replace(cache_file)
    except OSError:
        pass  # a read-only home only costs re-hashing next time
    return result
