"""Run safety on the tiny preset (CPU): what a checkpoint and an export may hold, what a resume
promises and refuses, skipped steps, damaged files, a full disk and stopping on a signal."""

from __future__ import annotations

import dataclasses
import errno
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from trainer_helpers import poison_losses, read_rows, tiny

from sdpo.train import checkpoint as checkpoints
from sdpo.train import metrics as metrics_module
from sdpo.train import outputs
from sdpo.train import trainer as trainer_module
from sdpo.train.config import TrainConfig, config_from_args
from sdpo.train.data import ignore_stop_signals
from sdpo.train.errors import UsageError
from sdpo.train.outputs import LOCK_FILE, lock_output_dir
from sdpo.train.trainer import NonFiniteLoss, train

TIMING_KEYS = ("pairs_per_s",)


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def assert_same_weights(first: Path, second: Path) -> None:
    a, b = torch.load(first / "unet.pth"), torch.load(second / "unet.pth")
    assert set(a) == set(b)
    assert all(torch.equal(a[name], b[name]) for name in a)


# --- Non-finite weights and skipped steps ---------------------------------------------------


def test_nonfinite_weights_are_never_checkpointed_or_exported(tmp_path, monkeypatch):
    config = tiny(tmp_path, max_steps=4, checkpoint_every=1, gradient_accumulation=1)
    real_step = trainer_module.apply_optimizer_step
    steps = {"count": 0}

    def step_that_overflows(optimizer, schedule, *finite):
        applied = real_step(optimizer, schedule, *finite)
        steps["count"] += 1
        if steps["count"] == 2:  # the loss and gradient were finite; the update is not
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return applied

    monkeypatch.setattr(trainer_module, "apply_optimizer_step", step_that_overflows)
    with pytest.raises(NonFiniteLoss, match=r"step 2: the weights are not finite.*checkpoint-1"):
        train(config)
    output = Path(config.output_dir)
    assert checkpoints.latest_checkpoint(output).name == "checkpoint-1"
    assert not (output / "checkpoint-2").exists() and not (output / "unet.pth").exists()


def test_final_export_is_never_nonfinite(tmp_path, monkeypatch):
    config = tiny(tmp_path, max_steps=1, gradient_accumulation=1)
    real_step = trainer_module.apply_optimizer_step

    def step_that_overflows(optimizer, schedule, *finite):
        applied = real_step(optimizer, schedule, *finite)
        with torch.no_grad():
            optimizer.param_groups[0]["params"][-1].view(-1)[0] = float("nan")
        return applied

    monkeypatch.setattr(trainer_module, "apply_optimizer_step", step_that_overflows)
    with pytest.raises(NonFiniteLoss, match="weights are not finite"):
        train(config)
    assert not (Path(config.output_dir) / "unet.pth").exists()


def test_skip_on_every_step_is_an_error_not_untrained_weights(tmp_path, monkeypatch):
    poison_losses(monkeypatch, lambda call: True)
    config = tiny(tmp_path, max_steps=3, on_nonfinite="skip", max_skipped_fraction=1.0)
    with pytest.raises(NonFiniteLoss, match=r"3 of 3 optimizer steps.*every step"):
        train(config)
    output = Path(config.output_dir)
    assert not (output / "unet.pth").exists()
    rows = read_rows(output)
    assert [row["skipped_steps"] for row in rows] == [1, 2, 3]
    assert all(row["loss"] is None and row["grad_norm"] is None for row in rows)


def test_skipped_steps_are_counted_and_their_metrics_left_out(tmp_path, monkeypatch):
    # tiny: 2 micro-batches per step; calls 5 and 6 are step 3's.
    poison_losses(monkeypatch, lambda call: call in (5, 6))
    config = tiny(tmp_path, max_steps=4, on_nonfinite="skip", max_skipped_fraction=0.5)
    summary = train(config)
    assert summary["skipped_steps"] == 1
    rows = read_rows(Path(config.output_dir))
    assert [row["step"] for row in rows] == [1, 2, 3, 4]  # the skipped step still logs its row
    assert [row["skipped_steps"] for row in rows] == [0, 0, 1, 1]
    assert rows[2]["loss"] is None and all(row["loss"] is not None for row in rows[::3])
    # The same run without the poison: steps 1-2 identical.
    monkeypatch.undo()
    clean = train(tiny(tmp_path, "clean", max_steps=2))
    assert [row["loss"] for row in clean["rows"]] == [row["loss"] for row in rows[:2]]


def test_too_many_skipped_steps_stop_the_run_after_the_minimum(tmp_path, monkeypatch):
    # Two skipped steps of the first 20 (10% > 5%): the run goes on until step 20, then stops.
    poison_losses(monkeypatch, lambda call: call in (1, 2, 3, 4))
    config = tiny(
        tmp_path, max_steps=40, on_nonfinite="skip", gradient_accumulation=2, synthetic_pairs=4
    )
    with pytest.raises(NonFiniteLoss, match=r"step 20: 2 of 20 .*--max-skipped-fraction 0.05"):
        train(config)
    assert trainer_module.SKIPPED_STEPS_MINIMUM == 20
    assert read_rows(Path(config.output_dir))[-1]["step"] == 20


# --- What a resume may change ---------------------------------------------------------------


def test_every_setting_is_classified_for_resume():
    fields = [field.name for field in dataclasses.fields(TrainConfig)]
    assert sorted(checkpoints.RESUME_RULES) == sorted(fields)
    assert set(checkpoints.RESUME_RULES.values()) == {"same", "free"}


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    config = tiny(root, "base", max_steps=2, synthetic_pairs=6)
    train(config)
    return Path(config.output_dir)


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


SAME_RUN_CHANGES = {
    "seed": 1,
    "method": "dspo",
    "beta": 4000.0,
    "mu": None,
    "granularity": "pair",
    "dmpo_alpha": 0.5,
    "resolution": 24,
    "caption_dropout": 0.0,
    "synthetic_pairs": 8,
    "lora_rank": 2,
    "train_batch_pairs": 3,
    "gradient_accumulation": 1,
    "learning_rate": 1e-3,
    "warmup_steps": 0,
    "optimizer": "adafactor",
    "weight_decay": 0.0,
    "max_grad_norm": 0.5,
    "scale_lr": True,
}


@pytest.mark.parametrize("name", sorted(SAME_RUN_CHANGES))
def test_resume_refuses_a_setting_that_changes_the_run(two_step_run, tmp_path, name):
    output = copy_run(two_step_run, tmp_path)
    config = tiny(tmp_path, "copy", max_steps=4, synthetic_pairs=6, resume="latest")
    old = getattr(config, name)
    setattr(config, name, SAME_RUN_CHANGES[name])
    config.validate()
    with pytest.raises(UsageError, match=rf"{name} {old!r} -> {SAME_RUN_CHANGES[name]!r}"):
        train(config)
    assert checkpoints.latest_checkpoint(output).name == "checkpoint-2"


def test_resume_lists_every_difference_and_refuses_another_world_size(two_step_run, tmp_path):
    copy_run(two_step_run, tmp_path)
    config = tiny(tmp_path, "copy", max_steps=4, synthetic_pairs=6, seed=3, beta=1.0)
    config.resume = "latest"
    with pytest.raises(UsageError) as raised:
        train(config)
    message = str(raised.value)
    assert "seed 0 -> 3" in message and "beta 5000.0 -> 1.0" in message and "\n" not in message
    state = checkpoints.read_checkpoint(two_step_run / "checkpoint-2")
    same = tiny(tmp_path, "other", max_steps=4, synthetic_pairs=6)
    with pytest.raises(UsageError, match=r"world size \(processes\) 1 -> 2"):
        checkpoints.check_same_run(state, same, world_size=2)


def test_resume_accepts_settings_that_do_not_change_the_run(two_step_run, tmp_path):
    output = copy_run(two_step_run, tmp_path)
    config = tiny(
        tmp_path, "copy", max_steps=3, synthetic_pairs=6, resume="latest", log_every=2,
        checkpoint_every=5, num_workers=0, progress=False, loss_backend="torch",
        checkpoints_total_limit=1,
    )  # fmt: skip
    summary = train(config)
    assert summary["steps"] == 3
    assert [path.name for path in checkpoints.complete_checkpoints(output)] == ["checkpoint-3"]


def test_resume_past_max_steps_is_refused_and_at_max_steps_explained(
    two_step_run, tmp_path, capsys
):
    copy_run(two_step_run, tmp_path)
    with pytest.raises(
        UsageError, match=r"at step 2, past --max-steps 1; give --max-steps above 2"
    ):
        train(tiny(tmp_path, "copy", max_steps=1, synthetic_pairs=6, resume="latest"))
    summary = train(tiny(tmp_path, "copy", max_steps=2, synthetic_pairs=6, resume="latest"))
    assert summary["steps"] == 2
    assert "already at --max-steps 2; nothing to train" in capsys.readouterr().err


def test_resume_with_no_checkpoint_says_so_and_starts_fresh(tmp_path, capsys):
    config = tiny(tmp_path, max_steps=1, resume="latest")
    assert train(config)["steps"] == 1
    err = capsys.readouterr().err
    assert "--resume: no complete checkpoint in" in err and "starting a fresh run" in err


def test_a_fresh_run_refuses_a_used_folder_and_overwrite_replaces_it(two_step_run, tmp_path):
    output = copy_run(two_step_run, tmp_path)
    with pytest.raises(UsageError, match=r"already holds a run \(checkpoint-2, metrics.jsonl\)"):
        train(tiny(tmp_path, "copy", max_steps=1, synthetic_pairs=6))
    train(tiny(tmp_path, "copy", max_steps=1, synthetic_pairs=6, overwrite=True))
    assert [row["step"] for row in read_rows(output)] == [1]
    assert [path.name for path in checkpoints.complete_checkpoints(output)] == ["checkpoint-1"]


def test_overwrite_removes_every_export_of_the_previous_run(two_step_run, tmp_path):
    # The old run may have been a flow model's (transformer/, transformer.pth, a LoRA run's
    # transformer_lora/): none of it may survive next to the new run's UNet.
    output = copy_run(two_step_run, tmp_path)
    for folder in ("transformer", "transformer_lora"):
        (output / folder).mkdir()
        (output / folder / "weights.safetensors").write_bytes(b"old")
    (output / "transformer.pth").write_bytes(b"old")
    (output / "notes.txt").write_text("a user's file")
    train(tiny(tmp_path, "copy", max_steps=1, synthetic_pairs=6, overwrite=True))
    for name in ("transformer", "transformer_lora", "transformer.pth"):
        assert not (output / name).exists(), name
    assert (output / "unet").is_dir() and (output / "notes.txt").read_text() == "a user's file"


def test_resume_from_a_given_checkpoint_folder(tmp_path):
    full = tiny(tmp_path, "full", max_steps=4, checkpoint_every=1, synthetic_pairs=6)
    train(full)
    full_dir = Path(full.output_dir)
    # --resume PATH from checkpoint-2: the newer checkpoints would belong to another run.
    again = tiny(tmp_path, "full", max_steps=4, synthetic_pairs=6)
    again.resume = str(full_dir / "checkpoint-2")
    with pytest.raises(UsageError, match=r"checkpoint-3, checkpoint-4.*--overwrite"):
        train(again)
    again.overwrite = True
    train(again)
    assert [row["step"] for row in read_rows(full_dir)] == [1, 2, 3, 4]
    # Into a new folder: the same rows after step 2 and the same weights.
    elsewhere = tiny(tmp_path, "elsewhere", max_steps=4, synthetic_pairs=6)
    elsewhere.resume = str(full_dir / "checkpoint-2")
    train(elsewhere)
    assert without_timing(read_rows(Path(elsewhere.output_dir))) == without_timing(
        read_rows(full_dir)[2:]
    )
    assert_same_weights(full_dir, Path(elsewhere.output_dir))
    assert config_from_args(
        [
            "--preset",
            "tiny",
            "--output-dir",
            str(tmp_path / "x"),
            "--resume",
            str(full_dir / "checkpoint-2"),
        ]
    ).resume == str(full_dir / "checkpoint-2")


# --- Resume logs exactly what the uninterrupted run logs ------------------------------------


def write_manifest_with_a_corrupt_image(folder: Path) -> Path:
    from PIL import Image

    images = folder / "images"
    images.mkdir()
    lines = []
    for index in range(4):
        Image.new("RGB", (20, 24), (200, 30, 30)).save(images / f"w{index}.png")
        Image.new("RGB", (20, 24), (30, 30, 200)).save(images / f"l{index}.png")
        row = {"caption": "a red square", "winner": f"images/w{index}.png"}
        lines.append(json.dumps({**row, "loser": f"images/l{index}.png"}))
    (images / "l1.png").write_bytes(b"not a png")
    manifest = folder / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_manifest_with_a_corrupt_image(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize(
    ("log_every", "checkpoint_every", "resume_at"),
    [(1, 2, 2), (2, 3, 3), (3, 2, 4), (4, 5, 5), (5, 1, 1)],
)
def test_resume_logs_what_the_uninterrupted_run_logs(
    tmp_path, manifest, log_every, checkpoint_every, resume_at
):
    settings = dict(
        data=str(manifest), max_steps=6, log_every=log_every, checkpoint_every=checkpoint_every,
        gradient_accumulation=1, train_batch_pairs=2,
    )  # fmt: skip
    full = tiny(tmp_path, "full", **settings)
    train(full)
    full_dir = Path(full.output_dir)
    # The interrupted run: the folder as a kill right after checkpoint-RESUME_AT leaves it.
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(full_dir / f"checkpoint-{resume_at}", cut / f"checkpoint-{resume_at}")
    kept = [line for line in (full_dir / "metrics.jsonl").read_text().splitlines()]
    kept = [line for line in kept if json.loads(line)["step"] <= resume_at]
    (cut / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    train(tiny(tmp_path, "cut", resume="latest", **settings))
    full_rows, resumed_rows = read_rows(full_dir), read_rows(cut)
    assert full_rows[-1]["skipped_images"] > 0  # the corrupt image is really counted
    assert without_timing(resumed_rows) == without_timing(full_rows)
    assert_same_weights(full_dir, cut)


# --- Damaged files ---------------------------------------------------------------------------


def test_torn_metrics_line_is_repaired_on_resume(two_step_run, tmp_path, capsys):
    output = copy_run(two_step_run, tmp_path)
    with open(output / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "loss": 0.6')  # a kill in the middle of a write
    train(tiny(tmp_path, "copy", max_steps=3, synthetic_pairs=6, resume="latest"))
    assert [row["step"] for row in read_rows(output)] == [1, 2, 3]
    assert "line 3 is a torn row" in capsys.readouterr().err


def test_damaged_metrics_row_elsewhere_names_the_file(two_step_run, tmp_path):
    output = copy_run(two_step_run, tmp_path)
    lines = (output / "metrics.jsonl").read_text().splitlines()
    (output / "metrics.jsonl").write_text("garbage\n" + "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 1 is not a metrics row"):
        train(tiny(tmp_path, "copy", max_steps=3, synthetic_pairs=6, resume="latest"))


def test_temporary_folders_of_an_interrupted_save_are_removed(two_step_run, tmp_path):
    output = copy_run(two_step_run, tmp_path)
    (output / "checkpoint-3.tmp-999").mkdir()
    (output / "checkpoint-3.tmp-999" / checkpoints.MODEL_FILE).write_bytes(b"half")
    train(tiny(tmp_path, "copy", max_steps=3, synthetic_pairs=6, resume="latest"))
    assert not list(output.glob("*.tmp-*"))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete", "file"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys, damage):
    full = tiny(tmp_path, "full", max_steps=3, checkpoint_every=1, synthetic_pairs=6)
    train(full)
    output = Path(full.output_dir)
    damaged = (
        output
        / "checkpoint-3"
        / (checkpoints.STATE_FILE if damage == "garbage" else checkpoints.MODEL_FILE)
    )
    if damage == "truncate":
        damaged.write_bytes(damaged.read_bytes()[:100])
    elif damage == "garbage":
        size = damaged.stat().st_size
        damaged.write_bytes(b"x" * size)  # same size: caught by loading, not the marker
    elif damage == "delete":
        damaged.unlink()
    else:  # a file where the checkpoint's folder belongs
        shutil.rmtree(output / "checkpoint-3")
        (output / "checkpoint-3").write_bytes(b"x" * 100)
    rows_before = read_rows(output)
    resumed = tiny(tmp_path, "full", max_steps=3, synthetic_pairs=6, resume="latest")
    train(resumed)
    assert "checkpoint-3 is damaged" in capsys.readouterr().err
    assert without_timing(read_rows(output)) == without_timing(rows_before)


def test_disk_full_during_a_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = tiny(tmp_path, max_steps=4, checkpoint_every=1)
    real_save = checkpoints.save_file
    calls = {"count": 0}

    def save_until_full(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_file", save_until_full)
    with pytest.raises(
        checkpoints.CheckpointError,
        match=r"no space left on device while writing .*checkpoint-3/unet_state.safetensors; the "
        r"last good checkpoint "
        r"\(.*checkpoint-2\) is kept",
    ):
        train(config)
    output = Path(config.output_dir)
    assert checkpoints.latest_checkpoint(output).name == "checkpoint-2"
    assert not list(output.glob("*.tmp-*"))
    checkpoints.load_checkpoint(output / "checkpoint-2")


def test_disk_full_is_one_line_and_status_1(tmp_path, monkeypatch, capsys):
    from sdpo.train.cli import main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_file", full)
    argv = ["--preset", "tiny", "--output-dir", str(tmp_path / "r"), "--max-steps", "1"]
    assert main([*argv, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    # The start banner's log lines come first; the failure itself is one line, no traceback.
    errors = [line for line in err if line.startswith("sdpo-train: error:")]
    assert len(errors) == 1 and "no space left on device" in errors[0]
    assert err[-1] == errors[0] and not any("Traceback" in line for line in err)


# --- Signals ---------------------------------------------------------------------------------


def child_environment() -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TRITON")}
    environment.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return environment


def start_training(command: list[str], output: Path) -> subprocess.Popen:
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=child_environment(), start_new_session=True,
    )  # fmt: skip


def wait_for_rows(process: subprocess.Popen, output: Path, rows: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    metrics = output / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= rows:
            return
        if process.poll() is not None:
            raise AssertionError(f"training ended early: {process.stderr.read()[-3000:]}")
        time.sleep(0.05)
    process.kill()
    raise AssertionError("training did not log in time")


TRAIN = [sys.executable, "-m", "sdpo.train", "--preset", "tiny", "--no-progress"]
RUN_FLAGS = ["--synthetic-pairs", "6", "--log-every", "2", "--checkpoint-every", "50"]


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_after_the_step_in_flight_and_resume_is_exact(tmp_path, signal_number):
    output = tmp_path / "stopped"
    process = start_training(
        [*TRAIN, "--output-dir", str(output), "--max-steps", "1000", *RUN_FLAGS], output
    )
    wait_for_rows(process, output, 1)
    process.send_signal(signal_number)
    _, err = process.communicate(timeout=240)
    assert process.returncode == 128 + signal_number, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("sdpo-train:")]
    assert len(lines) == 1 and signal.Signals(signal_number).name in lines[0], err[-3000:]
    stopped_at = checkpoints.checkpoint_step(checkpoints.latest_checkpoint(output))
    assert f"after step {stopped_at}; checkpoint: {output / f'checkpoint-{stopped_at}'}" in lines[0]
    # Resume to a few steps on, and the same run uninterrupted.
    end = str(stopped_at + 3)
    resumed = subprocess.run(
        [*TRAIN, "--output-dir", str(output), "--max-steps", end, *RUN_FLAGS, "--resume"],
        capture_output=True, text=True, env=child_environment(), timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = tmp_path / "whole"
    uninterrupted = subprocess.run(
        [*TRAIN, "--output-dir", str(whole), "--max-steps", end, *RUN_FLAGS],
        capture_output=True, text=True, env=child_environment(), timeout=300,
    )  # fmt: skip
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    assert without_timing(read_rows(output)) == without_timing(read_rows(whole))
    assert_same_weights(output, whole)


def test_ctrl_c_to_the_process_group_with_data_workers_checkpoints_and_resumes(tmp_path):
    """A terminal's Ctrl-C reaches every process of the group, the DataLoader workers too. The
    workers outlive it, so the step in flight gets its remaining batches (8 micro-batches, more
    than the 2 the one worker has prefetched) and the checkpoint is written."""
    output = tmp_path / "stopped"
    flags = [*RUN_FLAGS, "--num-workers", "1", "--gradient-accumulation", "8", "--log-every", "1"]
    process = start_training(
        [*TRAIN, "--output-dir", str(output), "--max-steps", "1000", *flags], output
    )
    wait_for_rows(process, output, 1)
    os.killpg(process.pid, signal.SIGINT)  # the session's group: the trainer and its worker
    _, err = process.communicate(timeout=240)
    assert process.returncode == 130, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("sdpo-train:")]
    assert len(lines) == 1 and "stopped by SIGINT" in lines[0], err[-3000:]
    stopped_at = checkpoints.checkpoint_step(checkpoints.latest_checkpoint(output))
    assert f"after step {stopped_at}; checkpoint: {output / f'checkpoint-{stopped_at}'}" in lines[0]
    end = str(stopped_at + 2)
    for folder, extra in ((output, ["--resume"]), (tmp_path / "whole", [])):
        result = subprocess.run(
            [*TRAIN, "--output-dir", str(folder), "--max-steps", end, *flags, *extra],
            capture_output=True, text=True, env=child_environment(), timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    assert without_timing(read_rows(output)) == without_timing(read_rows(tmp_path / "whole"))
    assert_same_weights(output, tmp_path / "whole")


def _worker_ignoring_stop_signals(main_process: int) -> None:
    ignore_stop_signals(0, main_process=main_process)
    while True:
        time.sleep(0.05)


def test_a_data_worker_ignores_stop_signals_but_not_its_main_processs_sigterm():
    # DataLoader ends a worker that does not stop with terminate() (SIGTERM from the main
    # process): that must still work, while SIGINT or SIGTERM from anyone else is ignored.
    context = multiprocessing.get_context("fork")
    worker = context.Process(target=_worker_ignoring_stop_signals, args=(os.getpid(),))
    worker.start()
    try:
        time.sleep(1.0)  # the worker has installed its handlers
        for name in ("INT", "TERM"):  # sent by another process, as a terminal or scheduler does
            subprocess.run(["kill", f"-{name}", str(worker.pid)], check=True, timeout=60)
        worker.join(timeout=1.0)
        assert worker.is_alive()
        worker.terminate()  # SIGTERM from the main process
        worker.join(timeout=10)
        assert worker.exitcode == 128 + signal.SIGTERM
    finally:
        if worker.is_alive():
            worker.kill()
            worker.join()


SIGNAL_MOMENTS = [sys.executable, str(Path(__file__).parent / "signal_moments_main.py")]
# 4 micro-batches per step: the first SIGTERM comes in the second, so step 1 is in flight.
MOMENT_FLAGS = ["--preset", "tiny", "--no-progress", "--gradient-accumulation", "4"]
MOMENT_FLAGS += ["--max-steps", "1000", "--log-every", "1", "--synthetic-pairs", "8"]


def run_with_a_second_signal(moment: str, output: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SIGNAL_MOMENTS, moment, *MOMENT_FLAGS, "--output-dir", str(output)],
        capture_output=True, text=True, env=child_environment(), timeout=300,
    )  # fmt: skip


def test_a_second_signal_in_the_step_exits_at_once_without_a_checkpoint(tmp_path):
    result = run_with_a_second_signal("in-the-step", tmp_path / "twice")
    assert result.returncode == 143, result.stderr[-3000:]
    assert "second SIGTERM: exiting now, no checkpoint" in result.stderr, result.stderr[-3000:]
    assert "stopped by SIGTERM" not in result.stderr
    assert checkpoints.latest_checkpoint(tmp_path / "twice") is None


@pytest.mark.parametrize("moment", ["after-the-loop", "after-the-line", "at-exit"])
def test_a_second_signal_after_the_checkpoint_still_exits_143(tmp_path, moment):
    """The stop's checkpoint is complete; a second SIGTERM at each later moment of the way out
    leaves the status at 143 (the default action there would end the process by the signal)."""
    output = tmp_path / "twice"
    result = run_with_a_second_signal(moment, output)
    assert result.returncode == 143, (result.returncode, result.stderr[-3000:])
    assert checkpoints.checkpoint_step(checkpoints.latest_checkpoint(output)) == 1
    second = "second SIGTERM: exiting now, checkpoint"
    if moment == "after-the-loop":  # before the stop line: this line names the checkpoint
        assert f"{second} {output / 'checkpoint-1'} is complete" in result.stderr
    else:
        assert "stopped by SIGTERM after step 1" in result.stderr, result.stderr[-3000:]
    if moment == "at-exit":
        # Ignored, not handled in Python: SIG_IGN is what survives CPython's reset of the
        # handlers to the default action at the end of the shutdown.
        assert "SIGTERM handler <Handlers.SIG_IGN: 1>" in result.stderr, result.stderr[-3000:]
        assert second not in result.stderr


def test_torchrun_sigterm_stops_every_rank_at_the_same_step(tmp_path):
    output = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    flags = ["--output-dir", str(output), *RUN_FLAGS]
    command = [*torchrun, "-m", "sdpo.train", "--preset", "tiny", "--no-progress", *flags]
    process = start_training([*command, "--max-steps", "1000"], output)
    wait_for_rows(process, output, 1)
    process.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    _, err = process.communicate(timeout=240)
    assert process.returncode != 0
    stopped = [line for line in err.splitlines() if "stopped by SIGTERM after step" in line]
    assert len(stopped) == 1, err[-4000:]
    stopped_at = checkpoints.checkpoint_step(checkpoints.latest_checkpoint(output))
    assert f"after step {stopped_at};" in stopped[0]
    end = str(stopped_at + 2)
    for folder, extra in ((output, ["--resume"]), (tmp_path / "whole", [])):
        run_flags = ["--output-dir", str(folder), *RUN_FLAGS, "--max-steps", end, *extra]
        result = subprocess.run(
            [*torchrun, "-m", "sdpo.train", "--preset", "tiny", "--no-progress", *run_flags],
            capture_output=True, text=True, env=child_environment(), timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    assert without_timing(read_rows(output)) == without_timing(read_rows(tmp_path / "whole"))
    assert_same_weights(output, tmp_path / "whole")


@pytest.mark.parametrize(
    ("save_final", "expected"),
    [
        ("full", {"checkpoint-2", "unet", "unet.pth"}),
        ("weights", {"unet"}),
        ("none", set()),
    ],
)
def test_save_final_writes_only_what_it_names(tmp_path, save_final, expected):
    """--save-final weights: the diffusers folder, no optimizer state, no .pth (an SD1.5 end
    writes 3.44 GB instead of 13.8); none: nothing besides the metrics."""
    config = tiny(tmp_path, max_steps=2, save_final=save_final)
    train(config)
    written = {path.name for path in Path(config.output_dir).iterdir()}
    assert (
        written - {"metrics.jsonl", "tensorboard", "config.json", ".sdpo-train.lock"} == expected
    ), written
    if "unet" in expected:
        from diffusers import UNet2DConditionModel

        UNet2DConditionModel.from_pretrained(Path(config.output_dir) / "unet")


# --- One output folder, one run --------------------------------------------------------------


def test_a_run_on_a_folder_in_use_is_refused_in_one_line_before_the_models_load(
    tmp_path, monkeypatch, capsys
):
    from sdpo.train.cli import main

    folder = tmp_path / "busy"
    holder = lock_output_dir(folder)  # another open of the lock file: flock sees two holders

    def no_models(*args, **kwargs):
        raise AssertionError("the models loaded for a run that is refused")

    monkeypatch.setattr(trainer_module, "build_models", no_models)
    argv = ["--preset", "tiny", "--output-dir", str(folder), "--max-steps", "1", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"is in use by another sdpo-train run (pid {os.getpid()} on " in err[0]
    assert sorted(path.name for path in folder.iterdir()) == [LOCK_FILE]  # nothing else written
    holder.release()
    monkeypatch.undo()
    assert main(argv) == 0  # released: the folder is free again


def test_two_runs_started_at_once_on_one_folder_one_is_refused(tmp_path):
    output = tmp_path / "shared"
    command = [*TRAIN, "--output-dir", str(output), "--max-steps", "3", *RUN_FLAGS]
    runs = [start_training(command, output) for _ in range(2)]
    results = [(run.wait(timeout=300), run.communicate()[1]) for run in runs]
    assert sorted(code for code, _ in results) == [0, 2], [err[-2000:] for _, err in results]
    refused = next(err for code, err in results if code == 2)
    # Refused by the lock, or (had the first run ended first) by its finished run: one line.
    assert len(refused.strip().splitlines()) == 1, refused
    assert "in use by another sdpo-train run" in refused or "already holds a run" in refused
    assert [row["step"] for row in read_rows(output)] == [2, 3]  # --log-every 2: one run's rows


def test_a_second_run_names_the_holder_and_kill_9_leaves_no_stale_lock(tmp_path):
    output = tmp_path / "held"
    flags = [*RUN_FLAGS, "--checkpoint-every", "1"]
    first = start_training(
        [*TRAIN, "--output-dir", str(output), "--max-steps", "1000", *flags], output
    )
    try:
        wait_for_rows(first, output, 1)
        # --resume would continue the folder's run: only the lock stops it.
        second = subprocess.run(
            [*TRAIN, "--output-dir", str(output), "--max-steps", "1000", *flags, "--resume"],
            capture_output=True, text=True, env=child_environment(), timeout=300,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr[-3000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"(pid {first.pid} on " in lines[0], lines
    finally:
        first.kill()  # SIGKILL: no handler, no cleanup
        first.wait(timeout=60)
    assert (output / LOCK_FILE).read_text().split()[0] == str(first.pid)  # the file stays
    latest = checkpoints.checkpoint_step(checkpoints.latest_checkpoint(output))
    resumed = subprocess.run(
        [*TRAIN, "--output-dir", str(output), "--max-steps", str(latest + 1), *flags, "--resume"],
        capture_output=True, text=True, env=child_environment(), timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [row["step"] for row in read_rows(output)][-1] == latest + 1


def test_torchrun_ranks_on_a_folder_in_use_all_stop_without_waiting(tmp_path):
    folder = tmp_path / "busy"
    holder = lock_output_dir(folder)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    try:
        result = subprocess.run(
            [*torchrun, "-m", "sdpo.train", "--preset", "tiny", "--no-progress",
             "--output-dir", str(folder), "--max-steps", "1"],
            capture_output=True, text=True, env=child_environment(), timeout=240,
        )  # fmt: skip
    finally:
        holder.release()
    assert result.returncode != 0
    assert f"is in use by another sdpo-train run (pid {os.getpid()} on " in result.stderr
    assert "rank 0 could not take" in result.stderr  # rank 1 heard it and stopped too


# --- Full and read-only disks ----------------------------------------------------------------

TORCH_ZIP_FAILURE = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


class FillsUp:
    """A binary file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, path: Path, room: int) -> None:
        self.handle, self.room = open(path, "wb"), room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def test_torch_save_on_a_full_disk_raises_the_oserror_not_the_zip_writers(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_open_for_writing", lambda path: FillsUp(path, 5000))
    with pytest.raises(OSError) as raised:
        outputs.save_torch({"weights": torch.zeros(100_000)}, tmp_path / "state.pt")
    assert raised.value.errno == errno.ENOSPC
    # What torch says without the recording file, and that it still counts as a failed write.
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert "unexpected pos" in str(raised.value.__cause__)
    assert outputs.write_failure(raised.value.__cause__, tmp_path) is not None


def fail_state_file_on_save(monkeypatch, save: int, error: Exception) -> None:
    """The ``save``-th checkpoint's training_state.pt fails to write with ``error``."""
    real = checkpoints.save_torch
    calls = {"count": 0}

    def failing(obj, path):
        calls["count"] += 1
        if calls["count"] == save:
            if isinstance(error, OSError):  # through torch's zip writer, as a full disk does
                monkeypatch.setattr(outputs, "_open_for_writing", lambda p: FillsUp(p, 5000))
                try:
                    return real(obj, path)
                finally:
                    monkeypatch.setattr(outputs, "_open_for_writing", lambda p: open(p, "wb"))
            raise error
        return real(obj, path)

    monkeypatch.setattr(checkpoints, "save_torch", failing)


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
        (RuntimeError(TORCH_ZIP_FAILURE), "the write failed"),
    ],
)
def test_a_failed_state_file_keeps_the_last_checkpoint_resumable(
    tmp_path, monkeypatch, error, cause
):
    config = tiny(tmp_path, max_steps=4, checkpoint_every=1, synthetic_pairs=6)
    fail_state_file_on_save(monkeypatch, 3, error)
    with pytest.raises(
        outputs.WriteError, match=rf"checkpoint: {cause}.* while writing .*checkpoint-3/"
        rf"{checkpoints.STATE_FILE}; the last good checkpoint \(.*checkpoint-2\) is kept",
    ):  # fmt: skip
        train(config)
    output = Path(config.output_dir)
    assert [path.name for path in checkpoints.checkpoint_entries(output)] == [
        "checkpoint-2", "checkpoint-1"
    ]  # fmt: skip
    monkeypatch.undo()
    train(tiny(tmp_path, max_steps=4, checkpoint_every=1, synthetic_pairs=6, resume="latest"))
    assert [row["step"] for row in read_rows(output)] == [1, 2, 3, 4]


def test_a_full_disk_during_the_export_leaves_no_half_export_and_the_checkpoint(
    tmp_path, monkeypatch
):
    from diffusers.models import modeling_utils
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(modeling_utils.safetensors.torch, "save_file", full)
    config = tiny(tmp_path, max_steps=2, synthetic_pairs=6)
    with pytest.raises(
        outputs.WriteError, match=r"export: no space left on device while writing .*run/unet$"
    ):
        train(config)
    output = Path(config.output_dir)
    assert not (output / "unet").exists() and not list(output.glob("*.tmp-*"))
    checkpoints.load_checkpoint(output / "checkpoint-2")
    monkeypatch.undo()
    train(tiny(tmp_path, max_steps=2, synthetic_pairs=6, resume="latest"))  # exports it again
    assert (output / "unet").is_dir() and (output / "unet.pth").is_file()


def test_a_read_only_metrics_file_mid_run_is_one_write_error(tmp_path, monkeypatch):
    real_open = open
    appends = {"count": 0}

    def read_only_after_two_rows(path, mode="r", *args, **kwargs):
        if "a" in mode:
            appends["count"] += 1
            if appends["count"] == 3:
                raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(metrics_module, "open", read_only_after_two_rows, raising=False)
    config = tiny(tmp_path, max_steps=4, checkpoint_every=2, synthetic_pairs=6)
    with pytest.raises(
        outputs.WriteError, match=r"metrics: read-only file system while writing .*metrics.jsonl$"
    ):
        train(config)
    output = Path(config.output_dir)
    assert [row["step"] for row in read_rows(output)] == [1, 2]
    assert checkpoints.latest_checkpoint(output).name == "checkpoint-2"


def test_a_full_disk_at_start_is_one_line_and_status_1(tmp_path, monkeypatch, capsys):
    from sdpo.train.cli import main

    real_open = os.open

    def full(path, flags, *args):
        if str(path).endswith(LOCK_FILE):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(outputs.os, "open", full)
    argv = ["--preset", "tiny", "--output-dir", str(tmp_path / "r"), "--max-steps", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on device while writing" in err[0], err
    assert LOCK_FILE in err[0]


def test_a_tracker_write_failure_is_a_write_error(tmp_path, monkeypatch):
    from sdpo.train.trackers import open_tracker

    tracker = open_tracker("tensorboard", tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tracker.writer, "add_scalar", full)
    with pytest.raises(outputs.WriteError, match=r"tensorboard: no space left on device"):
        tracker.log_scalars({"loss": 1.0}, 1)
    tracker.close()


def test_a_full_disk_in_torchs_zip_writer_is_one_line_and_status_1_in_a_subprocess(tmp_path):
    # The real zip writer fails on the third checkpoint's training_state.pt; its RuntimeError
    # must come out as the one line naming the file and the cause.
    output = tmp_path / "run"
    script = (
        "import sys\n"
        "from sdpo.train import outputs\n"
        "calls = []\n"
        "class Full:\n"
        "    def __init__(self, path): self.handle = open(path, 'wb')\n"
        "    def write(self, data):\n"
        "        if len(calls) == 3 and len(data) > 1000:\n"
        "            raise OSError(28, 'No space left on device')\n"
        "        return self.handle.write(data)\n"
        "    def flush(self): self.handle.flush()\n"
        "    def __enter__(self): return self\n"
        "    def __exit__(self, *exc): self.handle.close()\n"
        "def opener(path):\n"
        "    calls.append(path)\n"
        "    return Full(path)\n"
        "outputs._open_for_writing = opener\n"
        "from sdpo.train.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "--preset", "tiny", "--no-progress", "--output-dir",
         str(output), "--max-steps", "4", "--checkpoint-every", "1", "--synthetic-pairs", "6"],
        capture_output=True, text=True, env=child_environment(), timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if not line[:2].isdigit()]
    assert len(lines) == 1 and not any("Traceback" in line for line in lines), lines
    assert lines[0].startswith("sdpo-train: error: checkpoint: no space left on device while ")
    assert f"checkpoint-3/{checkpoints.STATE_FILE}" in lines[0]
    assert checkpoints.latest_checkpoint(output).name == "checkpoint-2"
    checkpoints.load_checkpoint(output / "checkpoint-2")


def can_mount_tmpfs(folder: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    folder.mkdir(exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        return False
    subprocess.run(["umount", str(folder)], check=True)
    return True


@pytest.mark.parametrize(
    ("max_steps", "failed_file"),
    # The tiny preset's checkpoint is 3.2 MB, its export 1.0 + 1.1 MB: a 5 MiB disk holds one
    # checkpoint and unet/, not a second checkpoint or unet.pth.
    [(3, f"checkpoint-2/{checkpoints.STATE_FILE}"), (1, "unet.pth")],
)
def test_a_really_full_disk_is_one_line_and_status_1(tmp_path, max_steps, failed_file):
    disk = tmp_path / "disk"
    if not can_mount_tmpfs(disk):
        pytest.skip("needs root and tmpfs to fill a real disk")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(disk)], check=True)
    try:
        output = disk / "run"
        result = subprocess.run(
            [*TRAIN, "--output-dir", str(output), "--max-steps", str(max_steps),
             "--checkpoint-every", "1", "--synthetic-pairs", "6"],
            capture_output=True, text=True, env=child_environment(), timeout=300,
        )  # fmt: skip
        assert result.returncode == 1, result.stderr[-3000:]
        lines = [line for line in result.stderr.splitlines() if not line[:2].isdigit()]
        assert len(lines) == 1 and "no space left on device while writing" in lines[0], lines
        assert lines[0].endswith(failed_file) or f"{failed_file};" in lines[0], lines
        assert checkpoints.latest_checkpoint(output).name == "checkpoint-1"
        assert not list(output.glob("*.tmp-*"))
        shutil.copytree(output, tmp_path / "moved")  # a disk with room: the run resumes
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    resumed = subprocess.run(
        [*TRAIN, "--output-dir", str(tmp_path / "moved"), "--max-steps", str(max_steps),
         "--checkpoint-every", "1", "--synthetic-pairs", "6", "--resume"],
        capture_output=True, text=True, env=child_environment(), timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "moved" / "unet.pth").is_file()


# --- History is never cut --------------------------------------------------------------------


def test_resume_refuses_when_every_checkpoint_is_damaged(tmp_path, capsys):
    from sdpo.train.cli import main

    output = tmp_path / "run"
    argv = ["--preset", "tiny", "--no-progress", "--output-dir", str(output),
            "--synthetic-pairs", "6", "--checkpoint-every", "1"]  # fmt: skip
    assert main([*argv, "--max-steps", "2"]) == 0
    (output / "checkpoint-2" / checkpoints.MODEL_FILE).write_bytes(b"cut short")
    shutil.rmtree(output / "checkpoint-1")
    (output / "checkpoint-1").write_text("a file where the folder was")
    metrics_before = (output / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main([*argv, "--max-steps", "3", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "every checkpoint in" in err[0] and "--overwrite" in err[0]
    assert "checkpoint-2: " in err[0] and "checkpoint-1: " in err[0]
    assert (output / "metrics.jsonl").read_bytes() == metrics_before
    # --overwrite: a new run from step 1 in their place.
    assert main([*argv, "--max-steps", "1", "--resume", "--overwrite"]) == 0
    assert [row["step"] for row in read_rows(output)] == [1]
    assert [path.name for path in checkpoints.checkpoint_entries(output)] == ["checkpoint-1"]


def _data_worker_after_fork(ready) -> None:
    ignore_stop_signals(0, main_process=os.getppid())  # the workers' init: drops the lock's copy
    ready.set()
    time.sleep(60)


def test_a_forked_data_worker_does_not_keep_the_folder_locked(tmp_path):
    # A killed trainer's DataLoader worker lives on up to 5 s (its watchdog): it must not hold
    # the lock meanwhile. The trainer's death is its descriptor closing without an unlock.
    folder = tmp_path / "run"
    lock = lock_output_dir(folder)
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    worker = context.Process(target=_data_worker_after_fork, args=(ready,))
    worker.start()
    try:
        assert ready.wait(60)
        os.close(lock.descriptor)  # as kill -9 of the trainer does
        outputs._HELD_LOCKS.discard(lock.descriptor)  # its number may be reused from here on
        lock.descriptor = None
        lock_output_dir(folder).release()  # free at once, with the worker still alive
        assert worker.is_alive()
    finally:
        worker.kill()
        worker.join()
