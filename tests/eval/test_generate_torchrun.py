"""``generate`` sharded by torchrun: 2 CPU processes (gloo) render each prompt once, and the
images are those of a single process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tiny_models import save_tiny_pipeline


@pytest.mark.slow  # measured: 93 s on 2 cores (three processes import torch and diffusers)
def test_torchrun_two_processes_match_one(tmp_path):
    pipeline = save_tiny_pipeline(tmp_path)
    prompts = ["the cat", "a dog", "the owl", "a red cat", "the dog"]
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps([{"prompt": prompt} for prompt in prompts]))

    def command(output):
        return ["-m", "sdpo.eval", "generate", "--pretrained", str(pipeline), "--suite",
                str(suite), "--output-dir", str(output), "--steps", "2", "--resolution", "16",
                "--batch-size", "2", "--dtype", "fp32"]  # fmt: skip

    environment = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    single = subprocess.run(
        [sys.executable, *command(tmp_path / "one")],
        capture_output=True, text=True, timeout=300, env=environment, check=True,
    )  # fmt: skip
    assert "rank 0 of 1: prompts 0,1,2,3,4" in single.stderr
    sharded = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         *command(tmp_path / "two")],
        capture_output=True, text=True, timeout=600, env=environment,
    )  # fmt: skip
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    ranks = dict(re.findall(r"rank (\d) of 2: prompts ([\d,]+)", sharded.stderr))
    rendered = sorted(int(index) for shard in ranks.values() for index in shard.split(","))
    assert set(ranks) == {"0", "1"} and rendered == list(range(len(prompts)))  # each once
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert [entry["prompt"] for entry in two] == prompts
    meta = json.loads((tmp_path / "two" / "manifest.json.meta.json").read_text())
    assert meta["world_size"] == 2
    for first, second in zip(one, two, strict=True):
        a = np.asarray(Image.open(first["gen_image_path"])).astype(int)
        b = np.asarray(Image.open(second["gen_image_path"])).astype(int)
        # Per-prompt seeds: the same image, up to batched-kernel rounding (batches differ).
        assert np.abs(a - b).max() <= 8
