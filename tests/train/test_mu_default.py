"""The SDPO safeguard is on by default: --mu's default ("auto") is the reference scripts' mu for
the method and model, off only where the objective refuses a safeguard; --mu off turns it off;
--help and the start banner say so; a checkpoint trained without it is not resumed with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdpo.train.config import TrainConfig, config_from_args
from sdpo.train.runlog import banner_lines

# The reference scripts' mu per method (docs/objectives.md, written out here rather than read
# from the code's table): SD1.5 0.9 / 0.2 / 0.9, SDXL 0.6 for each; the tiny UNet follows SD1.5,
# the flow models SDXL (as the flow presets).
CASES = [
    ([], "diffusion-dpo", 0.9),
    ([], "dspo", 0.2),
    ([], "dmpo", 0.9),
    ([], "dspo-sdxl", 0.6),
    (["--model", "sd15", "--pretrained", "random"], "diffusion-dpo", 0.9),
    (["--model", "sd15", "--pretrained", "random"], "dspo", 0.2),
    (["--model", "sd15", "--pretrained", "random"], "dmpo", 0.9),
    (["--model", "sdxl", "--pretrained", "random"], "diffusion-dpo", 0.6),
    (["--model", "sdxl", "--pretrained", "random"], "dspo-sdxl", 0.6),
    (["--model", "sdxl", "--pretrained", "random"], "dmpo", 0.6),
    (["--model", "sd3", "--pretrained", "tiny"], "diffusion-dpo", 0.6),
    (["--model", "flux", "--pretrained", "tiny"], "dmpo", 0.6),
]


def argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["--output-dir", str(tmp_path / "run"), "--no-progress", *extra]


@pytest.mark.parametrize(("model_args", "method", "expected"), CASES)
def test_mu_defaults_to_the_reference_scripts_value_for_the_method(
    tmp_path, model_args, method, expected
):
    config = config_from_args(argv(tmp_path, *model_args, "--method", method))
    assert config.mu == expected


def test_a_config_built_in_code_gets_the_default_too(tmp_path):
    config = TrainConfig(output_dir=str(tmp_path / "run"), method="dspo")
    config.validate()
    assert config.mu == 0.2


@pytest.mark.parametrize("off", ["off", "none", "false"])
def test_mu_off_turns_the_default_safeguard_off(tmp_path, off):
    assert config_from_args(argv(tmp_path, "--mu", off)).mu is None
    file = tmp_path / "run.yaml"
    file.write_text(f"mu: {off}\n")
    assert config_from_args(argv(tmp_path, "--config", str(file))).mu is None


def test_mu_auto_restores_the_default_over_a_yaml_value_and_a_preset(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("mu: 0.3\nmethod: dspo\n")
    assert config_from_args(argv(tmp_path, "--config", str(file))).mu == 0.3
    assert config_from_args(argv(tmp_path, "--config", str(file), "--mu", "auto")).mu == 0.2
    file.write_text("mu: auto\n")
    assert config_from_args(argv(tmp_path, "--config", str(file))).mu == 0.9
    # A preset's own mu stays what it says; an explicit number wins over the default.
    assert config_from_args(argv(tmp_path, "--preset", "sd15-dspo", "--pretrained", "random")).mu
    assert config_from_args(argv(tmp_path, "--mu", "0.45")).mu == 0.45


def test_the_default_is_off_where_the_objective_refuses_a_safeguard(tmp_path):
    flow = ["--model", "sd3", "--pretrained", "tiny", "--flow-loss-weighting", "cosmap"]
    # A weighted flow loss keeps the bound only per pair: batch granularity runs plain DPO
    # (no error), per-pair granularity gets the safeguard.
    assert config_from_args(argv(tmp_path, *flow)).mu is None
    assert config_from_args(argv(tmp_path, *flow, "--granularity", "pair")).mu == 0.6
    # An explicit mu there is still refused, naming the fix.
    with pytest.raises(ValueError, match="--granularity pair"):
        config_from_args(argv(tmp_path, *flow, "--mu", "0.6"))


def banner_head(config: TrainConfig) -> str:
    lines = banner_lines(
        config,
        data_pairs=16,
        world_size=1,
        device=torch.device("cpu"),
        resumed_from=None,
        epochs_note="",
    )
    return lines[0]


def test_the_banner_states_the_default_and_how_to_turn_it_off(tmp_path):
    head = banner_head(config_from_args(argv(tmp_path)))
    assert "mu 0.9 (the default: the SD1.5 reference scripts' mu for diffusion-dpo" in head
    assert "--mu off turns the safeguard off" in head
    head = banner_head(config_from_args(argv(tmp_path, "--model", "wan", "--pretrained", "tiny")))
    said = "mu 0.6 (the default: the SDXL reference scripts' mu for diffusion-dpo, taken for wan"
    assert said in head
    head = banner_head(config_from_args(argv(tmp_path, "--mu", "off")))
    assert "mu off (plain diffusion-dpo; the default would be 0.9)" in head
    head = banner_head(config_from_args(argv(tmp_path, "--mu", "0.5")))
    assert "mu 0.5 granularity" in head
    flow = ["--model", "sd3", "--pretrained", "tiny", "--flow-loss-weighting", "sigma_sqrt"]
    head = banner_head(config_from_args(argv(tmp_path, *flow)))
    assert "mu off (the default here: --flow-loss-weighting sigma_sqrt" in head


def test_help_states_the_default_per_method(capsys):
    with pytest.raises(SystemExit):
        config_from_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    entry = text[text.index("--mu X") : text.index("--granularity TEXT")]
    assert "(default: auto)" in entry
    for said in ("0.9 diffusion-dpo and dmpo", "0.2 dspo", "SDXL and the flow models: 0.6", "off"):
        assert said in entry, said


def test_a_run_trains_with_the_default_and_an_old_checkpoint_without_it_is_not_switched(
    tmp_path, capsys
):
    from sdpo.train.cli import main

    common = ["--max-steps", "1", "--checkpoint-every", "1", "--no-progress", "--report-to", "none"]
    default_run = str(tmp_path / "default")
    assert main(["--output-dir", default_run, *common]) == 0
    assert "mu 0.9 (the default" in capsys.readouterr().err
    saved = torch.load(Path(default_run) / "checkpoint-1" / "training_state.pt", weights_only=False)
    assert saved["config"]["mu"] == 0.9

    # A run trained without the safeguard (what every run without --mu was before the default
    # changed): its checkpoint stores mu null, and a plain --resume must not turn mu on.
    plain_run = str(tmp_path / "plain")
    assert main(["--output-dir", plain_run, *common, "--mu", "off"]) == 0
    capsys.readouterr()
    resume = ["--output-dir", plain_run, *common, "--max-steps", "2", "--resume"]
    assert main(resume) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "mu None -> 0.9" in error, error
    assert "add --mu off to continue it" in error
    assert main([*resume, "--mu", "off"]) == 0
