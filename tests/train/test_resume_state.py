"""Everything with state between optimizer steps is in a checkpoint: a run resumed from any
step equals the uninterrupted run bit for bit, fp16 loss scaling included, and nothing the
trainer draws comes from torch's (or Python's, or NumPy's) global generator."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_helpers import read_rows, tiny

from sdpo.train import checkpoint as checkpoints
from sdpo.train import trainer as trainer_module
from sdpo.train.distributed import Distributed
from sdpo.train.trainer import Trainer, train

# A loss scale near fp32's limit (2**127): the scaled gradients overflow at some steps and not
# at others, so the scale halves, grows back after GROWTH_INTERVAL clean steps, and halves again
# (on the tiny preset with this seed: overflows at steps 1, 4 and 5 of 6, measured). On the CPU
# the step runs fp32 and scaling by a power of two is exact, so only the scaler's state can make
# a resumed run differ.
INITIAL_SCALE = 1.3e36
GROWTH_INTERVAL = 2


def near_overflow_scaler(device: torch.device, mixed_precision: str) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(
        device.type, init_scale=INITIAL_SCALE, growth_interval=GROWTH_INTERVAL
    )


def training_state(checkpoint: Path) -> dict:
    return checkpoints.load_checkpoint(checkpoint)[1]


def comparable(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "pairs_per_s"} for row in rows]


def assert_same_tensors(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_fp16_resume_from_every_step_is_exact_through_loss_scale_backoffs(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "make_grad_scaler", near_overflow_scaler)
    steps = 6
    # log_every 5: the row at step 5 spans checkpoints 1-4, so its means, skipped counts and
    # grad_norm (the last finite step's, carried over overflowing steps) cross every resume.
    settings = dict(max_steps=steps, log_every=5, mixed_precision="fp16", synthetic_pairs=8)
    full = tiny(tmp_path, "full", checkpoint_every=1, **settings)
    train(full)
    full_output = Path(full.output_dir)
    scalers = [
        training_state(full_output / f"checkpoint-{step}")["grad_scaler"]
        for step in range(1, steps + 1)
    ]
    scales = [state["scale"] for state in scalers]
    # The run really backs off and grows: the scale goes down and up, and a resume lands at a
    # step with a half-counted growth interval.
    assert any(later < earlier for earlier, later in itertools.pairwise(scales))
    assert any(later > earlier for earlier, later in itertools.pairwise(scales))
    assert min(scales) < INITIAL_SCALE
    assert {state["_growth_tracker"] for state in scalers} == {0, 1}
    full_rows = comparable(read_rows(full_output))
    full_final = training_state(full_output / f"checkpoint-{steps}")
    full_weights = torch.load(full_output / "unet.pth")

    for resume_step in range(1, steps):
        resumed = tiny(
            tmp_path,
            f"resumed-{resume_step}",
            resume=str(full_output / f"checkpoint-{resume_step}"),
            **settings,
        )
        train(resumed)
        output = Path(resumed.output_dir)
        expected = [row for row in full_rows if row["step"] > resume_step]
        assert comparable(read_rows(output)) == expected, resume_step
        final = training_state(output / f"checkpoint-{steps}")
        assert final["grad_scaler"] == full_final["grad_scaler"], resume_step
        assert final["last_grad_norm"] == full_final["last_grad_norm"], resume_step
        assert_same_tensors(torch.load(output / "unet.pth"), full_weights)
        full_moments = full_final["optimizer"]["state"]
        for index, moments in final["optimizer"]["state"].items():
            assert_same_tensors(moments, full_moments[index])


def test_a_checkpoint_without_scaler_state_resumes_with_a_warning(tmp_path, capsys):
    # The trainer's own scaler (initial scale 2**16): its steps update the weights. (The near-
    # overflow scaler skipped both steps of a 2-step run, and a run that updated nothing stops.)
    initial_scale = torch.amp.GradScaler("cpu").get_scale()
    first = tiny(tmp_path, max_steps=2, mixed_precision="fp16", synthetic_pairs=8)
    train(first)
    checkpoint = Path(first.output_dir) / "checkpoint-2"
    # As a checkpoint written before the scaler's state was saved: no "grad_scaler" entry.
    state = training_state(checkpoint)
    del state["grad_scaler"]
    torch.save(state, checkpoint / checkpoints.STATE_FILE)
    marker = json.loads((checkpoint / checkpoints.COMPLETE_MARKER).read_text())
    marker["sizes"][checkpoints.STATE_FILE] = (checkpoint / checkpoints.STATE_FILE).stat().st_size
    (checkpoint / checkpoints.COMPLETE_MARKER).write_text(json.dumps(marker))
    capsys.readouterr()
    train(tiny(tmp_path, max_steps=3, mixed_precision="fp16", synthetic_pairs=8, resume=True))
    assert (
        f"{checkpoint} holds no fp16 loss-scaler state (written by an older version); the scale "
        f"restarts from {initial_scale:g}, so this resume is not exact"
    ) in capsys.readouterr().err


def run_after_seeding_global_generators(config, seed: int) -> tuple[list[dict], dict]:
    environment = Distributed()
    try:
        trainer = Trainer(config, environment)
        # After the models are built (the tiny preset seeds them), every global generator a
        # model or library could draw from gets a different state in each run.
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)  # noqa: NPY002 - the legacy global generator is the point
        summary = trainer.fit()
    finally:
        environment.close()
    weights = torch.load(Path(config.output_dir) / "unet.pth")
    return comparable(summary["rows"]), weights


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_training_draws_nothing_from_global_generators(tmp_path, lora_rank):
    """Why a checkpoint holds no RNG state: every draw (order, flips, caption dropout, latent
    samples, noise, timesteps) comes from a generator seeded by the position, and no layer
    (dropout, LoRA dropout) draws from a global one; so the global generators' states cannot
    change a run, and a resume does not need them."""
    settings = dict(max_steps=3, log_every=1, lora_rank=lora_rank, num_workers=1)
    rows_a, weights_a = run_after_seeding_global_generators(tiny(tmp_path, "a", **settings), 1)
    rows_b, weights_b = run_after_seeding_global_generators(tiny(tmp_path, "b", **settings), 2)
    assert rows_a == rows_b
    assert_same_tensors(weights_a, weights_b)
