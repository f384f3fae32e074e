"""The trainer knobs of issue 16 on the tiny preset (CPU): LR schedules, 8-bit AdamW, epochs,
flips and crops, trackers, validation images and the log lines."""

from __future__ import annotations

import io
import json
import logging
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_helpers import read_rows, tiny

from sdpo.train import checkpoint as checkpoints
from sdpo.train.config import LR_SCHEDULERS, config_from_args
from sdpo.train.data import PairBatches, PairRecord, load_records, preprocess
from sdpo.train.errors import UsageError
from sdpo.train.trainer import train

PROMPTS = ["a red square on a white background", "a blue circle on a white background"]


def expected_lrs(name: str, steps: int, warmup: int, learning_rate: float) -> list[float]:
    """diffusers' own get_scheduler on a bare optimizer: the LR after each optimizer step."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=learning_rate)
    schedule = get_scheduler(
        name, optimizer, num_warmup_steps=warmup, num_training_steps=steps, num_cycles=2
    )
    values = []
    for _ in range(steps):
        optimizer.step()
        schedule.step()
        values.append(schedule.get_last_lr()[0])
    return values


# --- LR schedules ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cosine", "linear", "cosine_with_restarts", "constant"])
def test_lr_schedule_follows_diffusers_get_scheduler(tmp_path, name):
    config = tiny(tmp_path, max_steps=5, warmup_steps=2, gradient_accumulation=1, lr_scheduler=name)
    config.lr_num_cycles = 2
    rows = train(config)["rows"]
    expected = expected_lrs(name, 5, 2, config.learning_rate)
    assert [row["lr"] for row in rows] == pytest.approx(expected, rel=1e-12, abs=1e-18)
    if name in ("cosine", "linear"):
        assert rows[-1]["lr"] == 0.0  # decays to zero at max_steps


def test_every_schedule_name_builds_and_polynomial_refuses_a_tiny_lr():
    from sdpo.train.optim import make_lr_schedule

    for name in LR_SCHEDULERS:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
        make_lr_schedule(optimizer, 1, name, 10)
    # diffusers' polynomial decays to 1e-7: a 1e-8 LR (the SD1.5 preset's) cannot decay to it.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-8)
    with pytest.raises(UsageError, match="lr_scheduler: polynomial"):
        make_lr_schedule(optimizer, 1, "polynomial", 10)


def test_resume_restores_a_decaying_schedule(tmp_path):
    full = tiny(
        tmp_path,
        "full",
        max_steps=4,
        warmup_steps=1,
        gradient_accumulation=1,
        checkpoint_every=2,
        lr_scheduler="cosine",
    )
    full_rows = train(full)["rows"]
    # The same run continued from its step-2 checkpoint in a fresh folder.
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(Path(full.output_dir) / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = tiny(
        tmp_path,
        "resumed",
        max_steps=4,
        warmup_steps=1,
        gradient_accumulation=1,
        lr_scheduler="cosine",
        resume=True,
    )
    resumed_rows = train(resumed)["rows"]
    assert [row["step"] for row in resumed_rows] == [3, 4]
    assert [row["lr"] for row in resumed_rows] == [row["lr"] for row in full_rows[2:]]
    assert [row["loss"] for row in resumed_rows] == [row["loss"] for row in full_rows[2:]]


# --- 8-bit AdamW -------------------------------------------------------------------------------


def test_adamw8bit_without_bitsandbytes_is_a_one_line_error(tmp_path, monkeypatch):
    from sdpo.train.optim import make_adamw8bit

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, find_spec is None
    with pytest.raises(UsageError, match=r"adamw8bit needs bitsandbytes \(pip install"):
        config_from_args(
            ["--preset", "tiny", "--output-dir", str(tmp_path / "run"), "--optimizer", "adamw8bit"]
        )
    config = tiny(tmp_path)
    config.optimizer = "adamw8bit"
    with pytest.raises(UsageError, match="pip install bitsandbytes"):
        make_adamw8bit(config, [torch.nn.Parameter(torch.zeros(2))], 1e-4)


def test_adamw8bit_trains_when_installed(tmp_path):
    bitsandbytes = pytest.importorskip("bitsandbytes")
    if not torch.cuda.is_available():
        pytest.skip("bitsandbytes' 8-bit optimizers run on a GPU")
    config = tiny(tmp_path, max_steps=2, optimizer="adamw8bit")
    from sdpo.train.distributed import Distributed
    from sdpo.train.trainer import Trainer

    trainer = Trainer(config, Distributed())
    assert isinstance(trainer.optimizer, bitsandbytes.optim.AdamW8bit)
    rows = trainer.fit()["rows"]
    assert all(np.isfinite(row["loss"]) for row in rows)


# --- Epochs ------------------------------------------------------------------------------------


def test_num_epochs_sets_the_steps_and_counts_across_epoch_boundaries(tmp_path):
    # 6 pairs, 2 per micro-batch: 3 micro-batches an epoch; 2 per optimizer step. 3 epochs = 9
    # micro-batches = 4.5 steps, rounded up to 5 (10 micro-batches: the next is epoch 3, batch 1).
    # accelerate 0.20's bug stepped the optimizer every micro-batch after the first epoch.
    config = tiny(
        tmp_path, synthetic_pairs=6, train_batch_pairs=2, gradient_accumulation=2, num_epochs=3
    )
    assert config.max_steps == 4  # the preset's, overridden by --num-epochs
    summary = train(config)
    assert summary["steps"] == 5
    rows = read_rows(Path(config.output_dir))
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    # Micro-batches 0..9 are in epochs 0,0,0,1,1,1,2,2,2,3: each step logs its last one's.
    assert [row["epoch"] for row in rows] == [0, 1, 1, 2, 3]
    _, state = checkpoints.load_checkpoint(Path(config.output_dir) / "checkpoint-5")
    assert {int(value["step"]) for value in state["optimizer"]["state"].values()} == {5}
    assert state["position"] == [3, 1]
    saved = json.loads((Path(config.output_dir) / "config.json").read_text())
    assert saved["max_steps"] == 5 and saved["num_epochs"] == 3


def test_num_epochs_and_max_steps_together_are_refused(tmp_path):
    argv = ["--preset", "tiny", "--output-dir", str(tmp_path / "run")]
    with pytest.raises(UsageError, match="give --num-epochs or --max-steps"):
        config_from_args([*argv, "--num-epochs", "2", "--max_train_steps", "5"])
    assert config_from_args([*argv, "--num-epochs", "2"]).num_epochs == 2


# --- Flips and crops ---------------------------------------------------------------------------


def asymmetric_records(count: int) -> list[PairRecord]:
    """Tensor images whose left and right halves differ, so a flip is visible."""
    ramp = torch.linspace(-1, 1, 16).expand(3, 16, 16)
    return [PairRecord(f"pair {index}", ramp * 0.5, -ramp * 0.5) for index in range(count)]


def test_no_hflip_turns_off_both_flips(tmp_path):
    records = asymmetric_records(8)
    common = dict(batch_pairs=4, resolution=16, caption_dropout=0.0, seed=0)
    flipped = flips_seen = 0
    for batch_index in range(2):
        plain = PairBatches(records, hflip=False, **common).batch(0, batch_index)
        default = PairBatches(records, **common).batch(0, batch_index)
        for row in range(4):
            assert torch.equal(plain.winners[row], records[0].winner)
            assert torch.equal(plain.losers[row], records[0].loser)
            flips_seen += int(not torch.equal(default.winners[row], records[0].winner))
            flipped += int(not torch.equal(default.losers[row], records[0].loser))
    assert flips_seen > 0 and flipped > 0  # the default does flip, each image on its own draw


def test_no_hflip_reads_the_unflipped_view_of_a_cache(tmp_path):
    from sdpo.train.cache import CachedPairBatches, build_cache

    build_cache(
        data=None,
        output_dir=str(tmp_path / "cache"),
        model="tiny",
        pretrained=None,
        resolution=16,
        seed=0,
        synthetic_pairs=8,
        shard_pairs=8,
        storage_dtype="float32",
    )
    from safetensors.torch import load_file

    shard = load_file(str(next((tmp_path / "cache").glob("shard-*.safetensors"))))
    common = dict(batch_pairs=4, caption_dropout=0.0, seed=0, resolution=16)
    plain = CachedPairBatches(str(tmp_path / "cache"), hflip=False, **common)
    default = CachedPairBatches(str(tmp_path / "cache"), **common)
    differs = False
    for batch_index in range(2):
        rows = plain.plan.indices(0, batch_index)
        batch = plain.batch(0, batch_index)
        unflipped = torch.stack([shard["winner_mean"][row, 0] for row in rows])
        torch.testing.assert_close(batch.latent_mean[:4], unflipped.float(), rtol=0, atol=0)
        differs |= not torch.equal(default.batch(0, batch_index).latent_mean, batch.latent_mean)
    assert differs  # the default draws flipped views too


def write_wide_png(path: Path) -> None:
    """48 x 16 pixels whose red channel is 5 x the column: a crop's left edge is readable."""
    from PIL import Image

    pixels = np.zeros((16, 48, 3), dtype=np.uint8)
    pixels[:, :, 0] = (np.arange(48) * 5)[None, :]
    Image.fromarray(pixels).save(path)


def left_edge(image: torch.Tensor) -> int:
    return round(((image[0, 0, 0].item() + 1.0) * 127.5) / 5)


def test_random_crop_moves_the_window_and_centre_crop_does_not(tmp_path):
    write_wide_png(tmp_path / "wide.png")
    lines = [
        json.dumps({"caption": "wide", "winner": "wide.png", "loser": "wide.png"}) for _ in range(8)
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    records = load_records(str(tmp_path / "pairs.jsonl"), resolution=16, synthetic_pairs=0, seed=0)
    assert left_edge(preprocess(records[0].winner, 16, flip=False)) == 16  # (48 - 16) / 2
    common = dict(batch_pairs=4, resolution=16, caption_dropout=0.0, seed=0, hflip=False)
    centre = PairBatches(records, **common).batch(0, 0)
    assert {left_edge(image) for image in [*centre.winners, *centre.losers]} == {16}
    cropping = PairBatches(records, random_crop=True, **common)
    edges = []
    for batch_index in range(2):
        batch = cropping.batch(0, batch_index)
        edges += [left_edge(image) for image in [*batch.winners, *batch.losers]]
        again = cropping.batch(0, batch_index)  # a position's crops are fixed (resume)
        assert torch.equal(again.winners, batch.winners)
    assert all(0 <= edge <= 32 for edge in edges) and len(set(edges)) >= 4


def test_random_crop_with_a_cache_is_refused(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "cache_index.json").write_text("{}")
    with pytest.raises(UsageError, match="random_crop: a sdpo-cache stores centre crops"):
        tiny(tmp_path, data=str(tmp_path / "cache"), random_crop=True)


# --- Trackers ----------------------------------------------------------------------------------


def test_report_to_none_writes_no_tensorboard_and_wandb_missing_is_an_error(tmp_path, monkeypatch):
    config = tiny(tmp_path, "none", max_steps=1, report_to="none")
    train(config)
    assert read_rows(Path(config.output_dir))  # metrics.jsonl still written
    assert not (Path(config.output_dir) / "tensorboard").exists()
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UsageError, match=r"wandb is not installed \(pip install wandb\)"):
        tiny(tmp_path, "wandb", report_to="wandb")
    from sdpo.train.trackers import import_wandb

    with pytest.raises(UsageError, match="pip install wandb"):
        import_wandb()


def test_report_to_wandb_logs_the_rows(tmp_path, monkeypatch):
    logged: list[tuple[dict, int]] = []
    finished = []

    class Run:
        def log(self, values, step):
            logged.append((values, step))

        def finish(self):
            finished.append(True)

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: Run()
    fake.__spec__ = importlib_spec("wandb")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = tiny(tmp_path, max_steps=2, gradient_accumulation=1, report_to="wandb")
    rows = train(config)["rows"]
    assert [step for _, step in logged] == [1, 2] and finished == [True]
    assert [values["loss"] for values, _ in logged] == [row["loss"] for row in rows]


def importlib_spec(name: str):
    import importlib.machinery

    return importlib.machinery.ModuleSpec(name, None)


# --- Validation images -------------------------------------------------------------------------


def write_prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    return path


def test_validation_grids_come_from_the_policy_and_leave_training_alone(tmp_path):
    from PIL import Image

    prompts = write_prompts(tmp_path)
    common = dict(max_steps=4, gradient_accumulation=1, log_every=1)
    plain = train(tiny(tmp_path, "plain", **common))
    config = tiny(
        tmp_path,
        "validated",
        validation_prompts=str(prompts),
        validation_every=2,
        validation_steps=3,
        **common,
    )
    validated = train(config)
    # Drawing does not touch training's random streams or the UNet's mode: identical losses.
    for key in ("loss", "grad_norm", "lambda", "lr"):
        assert [row[key] for row in validated["rows"]] == [row[key] for row in plain["rows"]]
    folder = Path(config.output_dir) / "validation"
    assert sorted(path.name for path in folder.iterdir()) == [
        "prompts.txt",
        "step-000002.png",
        "step-000004.png",
    ]
    assert (folder / "prompts.txt").read_text().splitlines() == PROMPTS
    grid = np.asarray(Image.open(folder / "step-000004.png"))
    assert grid.shape == (16, 32, 3)  # one row of two 16 px images
    # The final grid is the trained policy's: the same pipeline over the exported UNet, same seed.
    from diffusers import UNet2DConditionModel

    from sdpo.train.models import build_models
    from sdpo.train.validation import Validator

    models = build_models(config, torch.device("cpu"))
    initial = Validator(config, models, torch.device("cpu"), tmp_path / "unused").images()
    models.unet.load_state_dict(
        UNet2DConditionModel.from_pretrained(Path(config.output_dir) / "unet").state_dict()
    )
    models.unet.train()
    trained = Validator(config, models, torch.device("cpu"), tmp_path / "unused").images()
    assert models.unet.training  # back in training mode after drawing
    assert np.array_equal(np.concatenate(trained, axis=1), grid)
    assert not np.array_equal(np.concatenate(initial, axis=1), grid)  # not the reference's
    # And the grid is in TensorBoard.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(config.output_dir) / "tensorboard"))
    events.Reload()
    assert "validation" in events.Tags()["images"]
    assert [image.step for image in events.Images("validation")] == [2, 4]


def test_validation_draws_sdxl_models_with_the_sdxl_pipeline(tmp_path):
    from test_trainer import save_tiny_sdxl  # pytest puts this folder on sys.path

    from sdpo.train.models import build_models
    from sdpo.train.validation import Validator

    save_tiny_sdxl(tmp_path / "sdxl")
    prompts = write_prompts(tmp_path)
    argv = ["--preset", "sdxl-dspo", "--pretrained", str(tmp_path / "sdxl"), "--data", str(prompts)]
    argv += ["--output-dir", str(tmp_path / "run"), "--resolution", "16", "--mixed-precision", "no"]
    argv += ["--validation-prompts", str(prompts), "--validation-steps", "2"]
    config = config_from_args(argv)
    models = build_models(config, torch.device("cpu"))
    validator = Validator(config, models, torch.device("cpu"), tmp_path / "run")
    assert type(validator.pipeline).__name__ == "StableDiffusionXLPipeline"
    assert validator.pipeline.unet is models.unet  # the policy itself, not a copy
    first, second = validator.images(), validator.images()
    assert [image.shape for image in first] == [(16, 16, 3)] * 2
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))  # fixed seed


def test_validation_prompts_file_errors_and_suite_json(tmp_path):
    argv = ["--preset", "tiny", "--output-dir", str(tmp_path / "run")]
    with pytest.raises(UsageError, match="--validation-prompts: no such file"):
        config_from_args([*argv, "--validation-prompts", str(tmp_path / "missing.txt")])
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(UsageError, match="holds no prompt"):
        config_from_args([*argv, "--validation-prompts", str(tmp_path / "empty.txt")])
    (tmp_path / "bad.json").write_text('{"prompt": "not a list"}')
    with pytest.raises(UsageError, match="must be a list of objects"):
        config_from_args([*argv, "--validation-prompts", str(tmp_path / "bad.json")])
    with pytest.raises(UsageError, match="validation_every: needs --validation-prompts"):
        config_from_args([*argv, "--validation-every", "5"])
    from sdpo.train.validation import read_prompts

    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps([{"prompt": prompt, "category": "x"} for prompt in PROMPTS]))
    assert read_prompts(str(suite)) == PROMPTS


def test_validation_refuses_a_model_without_a_vae():
    from sdpo.train.models import build_tiny
    from sdpo.train.validation import build_pipeline

    with pytest.raises(UsageError, match="has no VAE"):
        build_pipeline(build_tiny(16, 0, pixel_space=True), torch.device("cpu"))


# --- Log lines ---------------------------------------------------------------------------------


def test_banner_progress_lines_and_summary_without_carriage_returns(tmp_path, capsys):
    from sdpo.train.runlog import progress_bar_wanted

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("sdpo.train")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        # --progress (the default) but stderr is not a terminal here (pytest captures it).
        config = tiny(tmp_path, max_steps=4, gradient_accumulation=1, log_every=2)
        config.progress = True
        train(config)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    text = stream.getvalue()
    captured = capsys.readouterr()
    assert "\r" not in captured.err + captured.out + text  # no tqdm wall in a log file
    assert "data: synthetic: 16 pairs; 2 pairs per optimizer step" in text
    assert "devices: 1 x cpu; dtype fp32; compiled: nothing (eager)" in text
    assert "resumed: no (fresh run)" in text and f"outputs: {config.output_dir}" in text
    progress = [line for line in text.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in progress] == ["step 2/4", "step 4/4"]
    assert "done: 4 optimizer steps this run (4 in all)" in text
    assert "final (step 4): loss" in text and str(Path(config.output_dir) / "unet") in text
    assert f"checkpoint {Path(config.output_dir) / 'checkpoint-4'}" in text

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert progress_bar_wanted(True, True, Terminal())
    assert not progress_bar_wanted(True, True, io.StringIO())
    assert not progress_bar_wanted(True, False, Terminal())  # rank 0 only
