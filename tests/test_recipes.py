"""The launch recipes in train/recipes/: each trains on a tiny SD1.5-layout folder and a JSONL
manifest (with tiny sizes passed through as extra flags), and each hands sdpo-train the
settings its header promises (read back through sdpo-train's own flag parsing)."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sdpo.train.config import config_from_args

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "train" / "recipes"
# Tiny sizes and a short run, after the recipe's own flags (the later flag wins).
TINY = [
    "--resolution", "16", "--train-batch-pairs", "2", "--gradient-accumulation", "1",
    "--max-steps", "2", "--warmup-steps", "0", "--learning-rate", "1e-4",
    "--mixed-precision", "no", "--checkpoint-every", "0", "--report-to", "none",
    "--no-progress", "--num-workers", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory) -> tuple[Path, Path]:
    from PIL import Image

    from sdpo.train.models import build_tiny, save_tiny_pretrained

    root = tmp_path_factory.mktemp("recipe-inputs")
    save_tiny_pretrained(build_tiny(16, 0), str(root / "model"))
    lines = []
    for index in range(4):
        Image.new("RGB", (20, 24), (200, 30 + 20 * index, 30)).save(root / f"w{index}.png")
        Image.new("RGB", (20, 24), (30, 30, 200 - 20 * index)).save(root / f"l{index}.png")
        row = {"caption": f"a red square {index}", "winner": f"w{index}.png"}
        lines.append(json.dumps({**row, "loser": f"l{index}.png"}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "model", root / "pairs.jsonl"


def run_recipe(
    name: str, arguments: list[str], environment: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(environment or {})}
    return subprocess.run(
        ["bash", str(RECIPES / name), *arguments],
        cwd=ROOT,  # python -m sdpo.train from the checkout root imports this checkout's code
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_trained(result: subprocess.CompletedProcess, output: Path, steps: int = 2) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    assert all(math.isfinite(row["loss"]) for row in rows)
    assert (output / "unet" / "config.json").is_file() and (output / "unet.pth").is_file()


@pytest.mark.slow  # a subprocess that imports torch and diffusers: ~18 s on 2 busy cores
def test_the_one_gpu_recipe_trains(model_and_data, tmp_path):
    model, data = model_and_data
    output = tmp_path / "run"
    assert_trained(
        run_recipe("sd15-one-gpu.sh", [str(model), str(data), str(output), *TINY]), output
    )


@pytest.mark.slow  # ~22 s on 2 busy cores
def test_the_lora_recipe_trains_and_exports_the_adapters(model_and_data, tmp_path):
    model, data = model_and_data
    output = tmp_path / "run"
    # Arguments from the environment this time (MODEL, DATA, OUTPUT_DIR).
    environment = {"MODEL": str(model), "DATA": str(data), "OUTPUT_DIR": str(output)}
    assert_trained(run_recipe("sd15-lora-24gb.sh", TINY, environment), output)
    assert (output / "unet_lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow  # two torchrun processes (gloo) on 2 busy cores: ~40 s
def test_the_multi_gpu_recipe_trains_under_torchrun(model_and_data, tmp_path):
    model, data = model_and_data
    output = tmp_path / "run"
    result = run_recipe(
        "sd15-multi-gpu.sh", [str(model), str(data), str(output), *TINY], {"NPROC": "2"}
    )
    assert_trained(result, output)


def recipe_settings(tmp_path: Path, name: str, environment: dict[str, str] | None = None):
    """The flags the recipe gives sdpo-train (recorded by a stand-in interpreter), parsed by
    sdpo-train's own parser."""
    recorded = tmp_path / "argv.json"
    fake = tmp_path / "fake-python"
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"json.dump(sys.argv[1:], open({str(recorded)!r}, 'w'))\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    arguments = [str(tmp_path / "model"), "pairs.jsonl", str(tmp_path / "out")]
    result = run_recipe(name, arguments, {"PYTHON": str(fake), **(environment or {})})
    assert result.returncode == 0, result.stderr
    argv = json.loads(recorded.read_text())
    launcher = argv[: argv.index("sdpo.train") + 1]
    flags = argv[len(launcher) :]
    assert flags[flags.index("--data") + 1] == "pairs.jsonl"  # passed through as given
    return launcher, config_from_args(flags)  # paths are read when training starts, not here


def test_the_one_gpu_recipe_keeps_the_reference_step_of_2048_pairs(tmp_path):
    launcher, config = recipe_settings(tmp_path, "sd15-one-gpu.sh")
    assert launcher == ["-m", "sdpo.train"]
    assert config.preset == "sd15-dpo" and config.mu == 0.9 and config.scale_lr
    assert config.train_batch_pairs * config.gradient_accumulation == 2048
    assert config.learning_rate == 1e-8  # per pair: x 2048 = the reference's 2.048e-5
    _, config = recipe_settings(tmp_path, "sd15-one-gpu.sh", {"ACCUMULATION": "32"})
    assert config.gradient_accumulation == 32


def test_the_lora_recipe_uses_the_diffusers_lora_settings_unscaled(tmp_path):
    _, config = recipe_settings(tmp_path, "sd15-lora-24gb.sh")
    assert config.lora_rank == 8 and config.learning_rate == 1e-5 and not config.scale_lr
    assert config.train_batch_pairs * config.gradient_accumulation == 32
    assert config.train_batch_pairs == 8 and config.granularity == "group:8"
    assert config.gradient_checkpointing and config.warmup_steps == 0


@pytest.mark.parametrize(("processes", "accumulation"), [("8", 32), ("2", 128), ("1", 256)])
def test_the_multi_gpu_recipe_keeps_2048_pairs_per_step(tmp_path, processes, accumulation):
    launcher, config = recipe_settings(tmp_path, "sd15-multi-gpu.sh", {"NPROC": processes})
    assert "torch.distributed.run" in launcher and f"--nproc_per_node={processes}" in launcher
    assert config.gradient_accumulation == accumulation
    assert config.train_batch_pairs * accumulation * int(processes) == 2048


def test_a_recipe_without_its_arguments_says_how_to_call_it(tmp_path):
    result = run_recipe("sd15-one-gpu.sh", [], {"MODEL": "", "DATA": "", "OUTPUT_DIR": ""})
    assert result.returncode == 2 and result.stderr.startswith("usage: "), result.stderr
    result = run_recipe("sd15-multi-gpu.sh", ["m", "d", "o"], {"NPROC": "3"})
    assert result.returncode == 2 and "does not divide 256" in result.stderr
