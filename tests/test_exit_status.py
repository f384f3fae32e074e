"""One exit-status rule for every command (README, "Exit status"): 0 done, 2 a flag, file or
input refused before anything ran, 1 a failure during the run. The refusals, run as a user
would (a missing input file), for each console script."""

from __future__ import annotations

import subprocess
import sys

import pytest

REFUSALS = {
    "sdpo-train": ["sdpo.train", "--preset", "tiny", "--data", "MISSING.jsonl"],
    "sdpo-cache": ["sdpo.train.cache_cli", "--model", "tiny", "--data", "MISSING.jsonl"],
    "sdpo-eval": ["sdpo.eval", "score", "MISSING.json", "--metrics", "clip"],
    "sdpo-pairs": ["sdpo.pairs", "--model", "toy", "--pretrained", "demo", "--reward", "toy",
                   "--prompts", "MISSING.txt"],
    "sdpo-profile": ["sdpo.profiling.cli", "overhead", "--preset", "no-such-preset",
                     "--device", "cpu"],
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(REFUSALS))
def test_a_refused_input_is_one_line_and_status_2(tmp_path, command):
    arguments = [sys.executable, "-m", *REFUSALS[command]]
    arguments += ["--output", str(tmp_path / "out.json")] if command == "sdpo-profile" else []
    if command in ("sdpo-train", "sdpo-cache", "sdpo-pairs"):
        arguments += ["--output-dir", str(tmp_path / "out")]
    result = subprocess.run(arguments, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"{command}: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
