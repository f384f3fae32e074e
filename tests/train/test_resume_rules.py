"""--resume's rule table (sdpo.train.checkpoint.RESUME_RULES), tested from the table itself:
every "same" field is refused when it changes, every "free" field changes nothing but rounding,
and every counter continues across a resume instead of restarting."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from trainer_helpers import poison_losses, read_rows, tiny

import sdpo
from sdpo.train import checkpoint as checkpoints
from sdpo.train.config import FIELDS, TrainConfig, config_to_json
from sdpo.train.errors import UsageError
from sdpo.train.trainer import train

FIELD_NAMES = [field.name for field in dataclasses.fields(TrainConfig)]
SAME = sorted(name for name in FIELD_NAMES if checkpoints.RESUME_RULES.get(name, "same") == "same")
FREE = sorted(name for name in FIELD_NAMES if checkpoints.RESUME_RULES.get(name) == "free")


def another_value(name: str, value: object) -> object:
    """A value other than ``value`` for the field (check_same_run compares, it does not
    validate): the other choice, the negated flag, the next number, or one where None was."""
    spec = FIELDS[name]
    if isinstance(value, bool):
        return not value
    if spec.choices:
        return next(choice for choice in spec.choices if choice != value)
    if value is None:
        return {int: 1, float: 0.5}.get(spec.kind, "another")
    if isinstance(value, (int, float)):
        return value + 1 if not isinstance(value, float) else value * 0.5 + 0.25
    return f"{value}-another"


def resume_state(config: TrainConfig) -> checkpoints.ResumeState:
    return checkpoints.ResumeState(
        path=Path("checkpoint-2"), step=2, position=(0, 2), skipped_images=0, skipped_steps=0,
        running_stats=None, optimizer={}, lr_schedule={}, model_state={},
        config=json.loads(config_to_json(config)), world_size=1,
    )  # fmt: skip


def test_the_table_classifies_every_field_and_nothing_else():
    assert set(checkpoints.RESUME_RULES) == set(FIELD_NAMES)
    assert set(checkpoints.RESUME_RULES.values()) == {"same", "free"}


@pytest.mark.parametrize("name", SAME)
def test_every_same_field_is_refused_when_it_changes(tmp_path, name):
    written = tiny(tmp_path, max_steps=4)
    state = resume_state(written)
    resumed = dataclasses.replace(written)
    setattr(resumed, name, another_value(name, getattr(written, name)))
    with pytest.raises(UsageError, match=rf"settings differ \(checkpoint -> now\): .*\b{name} "):
        checkpoints.check_same_run(state, resumed, world_size=1)


@pytest.mark.parametrize("name", FREE)
def test_every_free_field_may_change(tmp_path, name):
    written = tiny(tmp_path, max_steps=4)
    resumed = dataclasses.replace(written)
    setattr(resumed, name, another_value(name, getattr(written, name)))
    checkpoints.check_same_run(resume_state(written), resumed, world_size=1)  # no error


# "free" must mean what the table says: the run's math is unchanged. Each free field that a CPU
# run can change is changed in a short run whose weights must equal the base run's to fp32
# rounding; the others are listed with the reason, so a new free field fails here until it
# is put in one of the two.
FREE_CHANGES_ON_CPU = {
    "gradient_checkpointing": True,
    "log_every": 3,
    "checkpoint_every": 1,
    "on_nonfinite": "skip",
    "num_workers": 1,
    "progress": True,
    "checkpoints_total_limit": 1,
    "max_skipped_fraction": 0.5,
    "report_to": "none",
    "channels_last": True,
    "attention": "sdpa-math",
    # Validation draws images from its own generator between steps: with the prompts set.
    "validation_prompts": "PROMPTS",
    "validation_every": 2,
    "validation_seed": 7,
    "validation_steps": 2,
    "validation_guidance": 3.0,
}
VALIDATION_ON = {"validation_prompts": "PROMPTS", "validation_every": 2}
FREE_NOT_RUN_HERE = {
    "preset": "a name for starting values; the values themselves are compared",
    "output_dir": "where the run is written",
    "max_steps": "where to stop",
    "num_epochs": "sets max_steps",
    "resume": "the resume itself",
    "overwrite": "applies to a fresh run only",
    "allow_download": "where weights come from (the tiny model is built in code)",
    "loss_backend": "backends against each other: tests/test_backends_against_formulas.py",
    "fsdp": "needs 2 processes: tests/train/test_flow_trainer.py compares FSDP2 with DDP",
    "compile": "inductor compiles of the tiny UNet take minutes on 2 cores",
    "cuda_graphs": "needs a CUDA device",
    "nvtx": "needs the nvtx package and a CUDA device",
    "profile_steps": "the torch profiler's trace; compared on the GPU check",
    "save_final": "what the run's end writes, after the last step (test_run_safety.py)",
}


def test_every_free_field_is_run_or_has_a_reason():
    assert set(FREE_CHANGES_ON_CPU) | set(FREE_NOT_RUN_HERE) == set(FREE)
    assert not set(FREE_CHANGES_ON_CPU) & set(FREE_NOT_RUN_HERE)


def final_weights(config: TrainConfig) -> dict[str, torch.Tensor]:
    train(config)
    return torch.load(Path(config.output_dir) / "unet.pth")


# AdamW's update is about lr x sign(gradient) for a component whose gradient is far above its
# epsilon, so a component with a near-zero gradient would flip by 2 lr on a rounding change;
# an epsilon of 1e-2 makes the update of such components proportional to their gradient
# instead (a 1e-7 rounding change then moves a weight by ~1e-8), for base and variant alike.
SHORT_RUN = dict(max_steps=3, learning_rate=1e-3, adam_epsilon=1e-2)


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory) -> dict[str, torch.Tensor]:
    return final_weights(tiny(tmp_path_factory.mktemp("base"), **SHORT_RUN))


@pytest.mark.slow  # one 3-step tiny run per field: ~3 s each on 2 cores
@pytest.mark.parametrize("name", sorted(FREE_CHANGES_ON_CPU))
def test_a_free_field_changes_nothing_but_rounding(tmp_path, base_weights, name):
    config = tiny(tmp_path, **SHORT_RUN)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    changes = (
        {**VALIDATION_ON, name: FREE_CHANGES_ON_CPU[name]}
        if "validation" in name
        else {name: FREE_CHANGES_ON_CPU[name]}
    )
    for key, value in changes.items():
        setattr(config, key, str(prompts) if value == "PROMPTS" else value)
    config.validate()
    weights = final_weights(config)
    # 3 AdamW steps at lr 1e-3 move a weight by up to ~3e-3; a changed layout or attention
    # kernel reorders fp32 sums (~1e-7 relative), which reaches the weights as ~1e-8 (see
    # SHORT_RUN): 1e-5 absolute holds rounding and fails a change of the math (other noise, other
    # data, a changed update move weights by ~lr = 1e-3).
    for key, value in base_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-5, msg=f"{name}: {key}")


def test_skipped_steps_continue_across_a_resume(tmp_path, monkeypatch):
    # Step 2 is skipped (its loss non-finite); the run resumed from checkpoint-3 must go on
    # counting from 1, not restart at 0, and log what the uninterrupted run logs.
    real = sdpo.preference_loss
    poison_losses(monkeypatch, lambda call: call == 2)  # accumulation 1: call 2 is step 2
    settings = dict(
        max_steps=5, log_every=1, checkpoint_every=3, gradient_accumulation=1,
        on_nonfinite="skip", max_skipped_fraction=0.5,
    )  # fmt: skip
    full = tiny(tmp_path, "full", **settings)
    full_summary = train(full)
    assert full_summary["skipped_steps"] == 1
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(Path(full.output_dir) / "checkpoint-3", cut / "checkpoint-3")
    rows = (Path(full.output_dir) / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("".join(row + "\n" for row in rows[:3]))
    monkeypatch.setattr(sdpo, "preference_loss", real)  # steps 4-5 are finite in both runs
    resumed_summary = train(tiny(tmp_path, "cut", resume="latest", **settings))
    assert resumed_summary["skipped_steps"] == 1
    resumed_rows = read_rows(cut)
    assert [row["skipped_steps"] for row in resumed_rows] == [0, 1, 1, 1, 1]
    timing = ("pairs_per_s",)
    strip = [{k: v for k, v in row.items() if k not in timing} for row in resumed_rows]
    assert strip == [
        {k: v for k, v in row.items() if k not in timing} for row in read_rows(full.output_dir)
    ]
