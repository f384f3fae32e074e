"""``sdpo-eval fetch-suites``: the official evaluation's prompt suites and the LAION aesthetics head.

Downloaded from the official Diffusion-SDPO repository (AIDC-AI/Diffusion-SDPO) at a pinned
commit, each checked against its sha256 before it is kept (a file that does not match is
removed and named in the error). Files already present with the right hash are not downloaded
again. This is the only sdpo-eval command that uses the network; tests run it on a local mirror.
"""

from __future__ import annotations

import hashlib
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from sdpo.eval.errors import RunFailure
from sdpo.train.config import check_output_dir

OFFICIAL_COMMIT = "84fb241c1b89705a247da8b0d6047798ca49830d"
OFFICIAL_BASE_URL = f"https://raw.githubusercontent.com/AIDC-AI/Diffusion-SDPO/{OFFICIAL_COMMIT}/"
# name on disk -> (path in the repository, sha256, size in bytes)
OFFICIAL_FILES: dict[str, tuple[str, str, int]] = {
    "prompts/papv2.json": (
        "prompts/papv2.json",
        "531f3ca923035b5f17dbcbc60a7d7dfa476219e59b0e99617bb3f0afabf5663b",
        81130,
    ),
    "prompts/hpsv2.json": (
        "prompts/hpsv2.json",
        "417a2ce00b3307780402c1d27528a0e41ed26651384687bbf3aa06c4c7e559fd",
        575349,
    ),
    "prompts/partiprompts.json": (
        "prompts/partiprompts.json",
        "b11d46a91c4202461d6d1df69da0b9af5070851403574de6efd6736ccad22291",
        229976,
    ),
    "aesthetics/sac+logos+ava1-l14-linearMSE.pth": (
        "utils/aesthetics_model/sac+logos+ava1-l14-linearMSE.pth",
        "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0",
        3714759,
    ),
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def fetch_suites(
    output_dir: str | Path,
    base_url: str = OFFICIAL_BASE_URL,
    files: dict[str, tuple[str, str, int]] | None = None,
    opener: Callable = urllib.request.urlopen,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Downloads ``files`` (default: the three suites and the aesthetics head) under
    ``output_dir``; returns their paths. Raises RunFailure (exit status 1) on a network failure
    or a hash mismatch, naming the file and URL."""
    files = OFFICIAL_FILES if files is None else files
    output = Path(output_dir).expanduser()
    check_output_dir(str(output), "--output-dir")
    written = []
    for name, (remote, sha256, size) in files.items():
        target = output / name
        if target.is_file() and _sha256(target) == sha256:
            log(f"{target}: present, sha256 matches")
            written.append(target)
            continue
        url = base_url.rstrip("/") + "/" + urllib.parse.quote(remote)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        try:
            with opener(url) as response, open(partial, "wb") as handle:
                while block := response.read(2**20):
                    handle.write(block)
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise RunFailure(f"fetch-suites: downloading {url} failed ({error})") from error
        got = _sha256(partial)
        if got != sha256:
            partial.unlink()
            raise RunFailure(
                f"fetch-suites: {url} has sha256 {got}, expected {sha256} ({size} bytes); "
                "nothing kept for it"
            )
        partial.replace(target)
        log(f"{target}: downloaded, sha256 matches")
        written.append(target)
    return written
