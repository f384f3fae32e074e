"""sdpo-train's settings: every field's type and range on the command line and in YAML, the
aliases, --help, --list-presets and the one-line errors. No model loads here."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from sdpo.train.config import TrainConfig, config_from_args

# Each field's kind and values outside its range, written here (not read from the code's table),
# so a field whose range the code forgot fails. Values are YAML text; the command line gets the
# same text where it is a number.
KINDS: dict[str, str] = {
    "preset": "choice",
    "output_dir": "str",
    "max_steps": "int",
    "checkpoint_every": "int",
    "resume": "str",
    "seed": "int",
    "method": "choice",
    "beta": "float",
    "mu": "float",
    "granularity": "choice",
    "dmpo_alpha": "float",
    "loss_backend": "choice",
    "model": "choice",
    "pretrained": "str",
    "allow_download": "bool",
    "data": "str",
    "resolution": "int",
    "caption_dropout": "float",
    "synthetic_pairs": "int",
    "lora_rank": "int",
    "flow_density": "choice",
    "logit_mean": "float",
    "logit_std": "float",
    "mode_scale": "float",
    "flow_loss_weighting": "choice",
    "flow_dynamic_shift": "bool",
    "flux_guidance": "float",
    "timestep_weighting": "choice",
    "timestep_mask_threshold": "float",
    "timestep_clip": "float",
    "timestep_range": "choice",
    "train_batch_pairs": "int",
    "gradient_accumulation": "int",
    "learning_rate": "float",
    "scale_lr": "bool",
    "warmup_steps": "int",
    "optimizer": "choice",
    "adam_beta1": "float",
    "adam_beta2": "float",
    "adam_epsilon": "float",
    "weight_decay": "float",
    "max_grad_norm": "float",
    "mixed_precision": "choice",
    "gradient_checkpointing": "bool",
    "fsdp": "bool",
    "attention": "choice",
    "compile": "bool",
    "cuda_graphs": "bool",
    "channels_last": "bool",
    "nvtx": "bool",
    "profile_steps": "choice",
    "log_every": "int",
    "on_nonfinite": "choice",
    "num_workers": "int",
    "progress": "bool",
    # Trainer knobs (issue 16).
    "lr_scheduler": "choice",
    "lr_num_cycles": "int",
    "lr_power": "float",
    "num_epochs": "int",
    "hflip": "bool",
    "random_crop": "bool",
    "report_to": "choice",
    "validation_prompts": "str",
    "validation_every": "int",
    "validation_seed": "int",
    "validation_steps": "int",
    "validation_guidance": "float",
    "overwrite": "bool",
    "checkpoints_total_limit": "int",
    "max_skipped_fraction": "float",
    "save_final": "choice",
}
OUT_OF_RANGE: dict[str, list[str]] = {
    "preset": ["sd99"],
    "max_steps": ["0", "-1"],
    "checkpoint_every": ["-1"],
    "seed": ["-1"],
    "method": ["ipo"],
    "beta": ["0", "-5000"],
    "mu": ["-0.1", "1.5"],
    "granularity": ["pairs", "group:0"],
    "dmpo_alpha": ["-0.1", "1.5"],
    "loss_backend": ["fast"],
    "model": ["sd21"],
    "resolution": ["0", "12"],
    "caption_dropout": ["-0.1", "1.1"],
    "synthetic_pairs": ["0"],
    "lora_rank": ["-1"],
    "flow_density": ["sigmoid"],
    "logit_std": ["0", "-1"],
    "flow_loss_weighting": ["sd3"],
    "timestep_weighting": ["sipo"],
    "timestep_mask_threshold": ["-0.1"],
    "timestep_clip": ["1", "-0.1"],
    "timestep_range": ["800:200", "5", "0:1001"],
    "train_batch_pairs": ["0"],
    "gradient_accumulation": ["0"],
    "learning_rate": ["0", "-1e-4"],
    "warmup_steps": ["-1"],
    "optimizer": ["sgd"],
    "adam_beta1": ["1.0", "-0.1"],
    "adam_beta2": ["1", "-0.5"],
    "adam_epsilon": ["0", "-1e-8"],
    "weight_decay": ["-0.01"],
    "max_grad_norm": ["0", "-1", "-1.0"],
    "mixed_precision": ["fp8"],
    "attention": ["flash"],
    "profile_steps": ["8:5", "5"],
    "log_every": ["0"],
    "on_nonfinite": ["ignore"],
    "num_workers": ["-1"],
    "lr_scheduler": ["cosine_warmup"],
    "lr_num_cycles": ["0"],
    "lr_power": ["0", "-1"],
    "num_epochs": ["0", "-2"],
    "report_to": ["mlflow"],
    "validation_prompts": ["/no/such/prompts.txt"],
    "validation_every": ["-1"],
    "validation_seed": ["-1"],
    "validation_steps": ["0", "1001"],
    "validation_guidance": ["-1", "-0.5"],
    "checkpoints_total_limit": ["-1"],
    "max_skipped_fraction": ["-0.01", "1.5"],
    "save_final": ["optimizer", "yes"],
}
# Wrong types, as YAML text: a bool is never a number, a float never an integer, a quoted number
# is a string.
WRONG_TYPE_YAML: dict[str, list[str]] = {
    "int": ["2.7", "true", "false", "'3'", "yes", ".nan", ".inf", "[1]", "null"],
    "float": ["true", "false", "yes", "'1e-3'", "abc", ".nan", ".inf", "-.inf", "[1.0]"],
    "bool": ["1", "0", "'true'", "yes", "off", "1.0", "null"],
    "str": ["3", "true", "1.5", "[a]", "''"],
    "choice": ["3", "true", "1.5", "[a]", "''"],
}
WRONG_TYPE_CLI: dict[str, list[str]] = {
    "int": ["2.7", "true", "nan", "inf", "abc", "1e3"],
    "float": ["nan", "inf", "-inf", "NaN", "abc", "true"],
    "str": [""],
    "choice": [""],
}


def field_names() -> list[str]:
    return [field.name for field in dataclasses.fields(TrainConfig)]


def test_the_cases_cover_every_field():
    assert sorted(KINDS) == sorted(field_names())


def yaml_cases() -> list[tuple[str, str]]:
    cases = []
    for name, kind in KINDS.items():
        values = WRONG_TYPE_YAML[kind] + OUT_OF_RANGE.get(name, [])
        if name == "mu":  # null and false are "no safeguard" for mu, not errors
            values = [value for value in values if value not in ("null", "false", "off")]
        if kind == "str" or name in ("preset", "profile_steps", "num_epochs", "num_workers"):
            values = [value for value in values if value != "null"]
        if name == "resume":  # resume: true is the newest checkpoint (as --resume)
            values = [value for value in values if value not in ("true", "false")]
        cases += [(name, value) for value in values]
    return cases


def cli_cases() -> list[tuple[str, str]]:
    cases = []
    for name, kind in KINDS.items():
        if kind == "bool":
            continue  # test_bool_flags_take_no_value
        values = WRONG_TYPE_CLI[kind] + OUT_OF_RANGE.get(name, [])
        cases += [(name, value) for value in values]
    return cases


def base_argv(tmp_path: Path) -> list[str]:
    return ["--preset", "tiny", "--output-dir", str(tmp_path / "run"), "--no-progress"]


def one_line_error(argv: list[str]) -> str:
    with pytest.raises(ValueError) as caught:
        config_from_args(argv)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize(("name", "value"), yaml_cases())
def test_bad_yaml_value_is_a_one_line_error_naming_the_key(tmp_path, name, value):
    file = tmp_path / "run.yaml"
    file.write_text(f"{name}: {value}\n")
    message = one_line_error([*base_argv(tmp_path), "--config", str(file)])
    assert name in message, message


@pytest.mark.parametrize(("name", "value"), cli_cases())
def test_bad_flag_value_is_a_one_line_error_naming_the_flag(tmp_path, name, value):
    flag = "--" + name.replace("_", "-")
    message = one_line_error([*base_argv(tmp_path), f"{flag}={value}"])
    assert flag in message, message


@pytest.mark.parametrize("name", [name for name, kind in KINDS.items() if kind == "bool"])
def test_bool_flags_take_no_value(tmp_path, name):
    flag = "--" + name.replace("_", "-")
    for argv in ([f"{flag}=yes"], [flag, "1"]):
        one_line_error([*base_argv(tmp_path), *argv])
    assert getattr(config_from_args([*base_argv(tmp_path), f"--no-{flag[2:]}"]), name) is False


def test_good_values_pass_with_their_types(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text(
        "learning_rate: 1e-8\nbeta: 2500\nmax_steps: 3\nprofile_steps: 5:8\n"
        "mixed_precision: no\ncaption_dropout: 0\nadam_beta2: 0.99\nseed: 7\nresume: true\n"
    )
    config = config_from_args([*base_argv(tmp_path), "--config", str(file)])
    assert config.learning_rate == 1e-8 and config.beta == 2500.0 and type(config.beta) is float
    assert config.max_steps == 3 and config.profile_steps == "5:8" and config.seed == 7
    assert config.mixed_precision == "no" and config.caption_dropout == 0.0
    assert config.resume == "latest"


@pytest.mark.parametrize("text", ["off", "false", "null", "~", "Off", "no", "none"])
def test_mu_off_in_yaml_is_no_safeguard(tmp_path, text):
    file = tmp_path / "run.yaml"
    file.write_text(f"mu: {text}\n")
    assert config_from_args([*base_argv(tmp_path), "--config", str(file)]).mu is None


@pytest.mark.parametrize("text", ["off", "false", "null", "none", "OFF"])
def test_mu_off_on_the_command_line_is_no_safeguard(tmp_path, text):
    assert config_from_args([*base_argv(tmp_path), "--mu", text]).mu is None


def test_mu_true_is_refused(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("mu: true\n")
    assert "mu" in one_line_error([*base_argv(tmp_path), "--config", str(file)])


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("preset: tiny\nbeta: [1, 2\nmu: 0.5\n")
    message = one_line_error(["--config", str(file)])
    assert str(file) in message and "line " in message


def test_yaml_key_given_twice_is_an_error(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("beta: 1000\nmu: 0.5\nbeta: 2000\n")
    message = one_line_error(["--config", str(file)])
    assert "'beta' is given twice" in message and "line 3" in message


def test_output_dir_must_be_a_writable_folder(tmp_path):
    file = tmp_path / "a-file"
    file.write_text("x")
    assert "--output-dir" in one_line_error(["--preset", "tiny", "--output-dir", ""])
    assert "is a file" in one_line_error(["--preset", "tiny", "--output-dir", str(file)])
    nested = str(file / "run")
    assert "is a file" in one_line_error(["--preset", "tiny", "--output-dir", nested])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_dir_not_writable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert "not writable" in one_line_error(
        ["--preset", "tiny", "--output-dir", str(locked / "run")]
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_loss_backend_without_a_gpu_is_refused_at_config_time(tmp_path, backend, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    message = one_line_error([*base_argv(tmp_path), "--loss-backend", backend])
    assert "loss_backend" in message and "--loss-backend auto" in message


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers installed")
def test_xformers_attention_without_xformers_is_refused(tmp_path):
    assert "pip install xformers" in one_line_error(
        [*base_argv(tmp_path), "--attention", "xformers"]
    )


@pytest.mark.parametrize(
    ("argv", "field", "value"),
    [
        (["--learning_rate", "3e-5"], "learning_rate", 3e-5),
        (["--train_batch_size", "3"], "train_batch_pairs", 3),
        (["--gradient_accumulation_steps", "5"], "gradient_accumulation", 5),
        (["--max_train_steps", "7"], "max_steps", 7),
        (["--checkpointing_steps", "9"], "checkpoint_every", 9),
        (["--lr_warmup_steps", "11"], "warmup_steps", 11),
        (["--adam_weight_decay", "0.03"], "weight_decay", 0.03),
        (["--dataloader_num_workers", "2"], "num_workers", 2),
        (["--resume_from_checkpoint", "latest"], "resume", "latest"),
        (["--resume"], "resume", "latest"),
        (["--beta_dpo", "2500"], "beta", 5000.0),  # diffusers' beta_dpo = ours / 2
        (["--beta_dpo=1000"], "beta", 2000.0),
        (["--use_adafactor"], "optimizer", "adafactor"),
        (["--gradient_checkpointing"], "gradient_checkpointing", True),
        (["--scale_lr"], "scale_lr", True),
        (["--no_progress"], "progress", False),
        (["--max_grad_norm=0.5"], "max_grad_norm", 0.5),
    ],
)
def test_diffusers_spellings_map_to_our_fields(tmp_path, argv, field, value):
    config = config_from_args(["--preset", "tiny", "--output_dir", str(tmp_path / "r"), *argv])
    assert getattr(config, field) == value
    assert config.output_dir == str(tmp_path / "r")


def test_every_flag_accepts_underscores(tmp_path):
    values = {"int": "3", "float": "0.5", "bool": None}
    for name, kind in KINDS.items():
        if kind not in values:
            continue
        flag = "--" + name  # the field name: underscores
        argv = [flag] if kind == "bool" else [flag, values[kind]]
        if name in ("fsdp", "cuda_graphs", "resolution", "validation_every"):
            # fsdp needs torchrun, cuda_graphs a GPU; resolution must be 8k; validation_every
            # needs --validation-prompts
            continue
        # The flow settings need a flow model, the timestep knobs their weighting mode.
        if name in ("logit_mean", "logit_std", "mode_scale"):
            argv = ["--model", "sd3", "--pretrained", "tiny", *argv]
        if name in ("flow_dynamic_shift", "flux_guidance"):
            argv = ["--model", "flux", "--pretrained", "tiny", *argv]
        if name in ("timestep_mask_threshold", "timestep_clip"):
            argv = ["--timestep_weighting", "importance", *argv]
        config = config_from_args([*base_argv(tmp_path), *argv])
        expected = True if kind == "bool" else (3 if kind == "int" else 0.5)
        assert getattr(config, name) == expected, name


def test_diffusers_aliases_refuse_what_they_cannot_mean(tmp_path):
    assert "not both" in one_line_error([*base_argv(tmp_path), "--beta", "1", "--beta_dpo", "2"])
    assert "--beta_dpo" in one_line_error([*base_argv(tmp_path), "--beta_dpo", "nan"])
    message = one_line_error([*base_argv(tmp_path), "--resume_from_checkpoint", "checkpoint-5"])
    assert "resume: no checkpoint folder checkpoint-5" in message


def test_yaml_accepts_the_diffusers_keys(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("beta_dpo: 2500\ntrain_batch_size: 3\nmax_train_steps: 6\n")
    config = config_from_args([*base_argv(tmp_path), "--config", str(file)])
    assert (config.beta, config.train_batch_pairs, config.max_steps) == (5000.0, 3, 6)


@pytest.mark.parametrize(
    ("flag", "suggestion"),
    [
        ("--learnin-rate", "--learning-rate"),
        ("--max-step", "--max-steps"),
        ("--grad-accumulation", "--gradient-accumulation"),
        ("--learn", None),  # no prefix matching: --learn is not quietly --learning-rate
    ],
)
def test_unknown_flag_is_one_line_with_a_suggestion(tmp_path, flag, suggestion, capsys):
    from sdpo.train.cli import main

    assert main([*base_argv(tmp_path), flag, "3"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("sdpo-train: error: unknown flag"), error
    if suggestion is not None:
        assert f"did you mean {suggestion}?" in error


def test_cli_bad_value_is_one_line_exit_2(tmp_path, capsys):
    from sdpo.train.cli import main

    for argv in (["--max-grad-norm", "-1"], ["--max-steps", "2.7"], ["--mu"]):
        assert main([*base_argv(tmp_path), *argv]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and error.startswith("sdpo-train: error: "), error


def test_help_explains_every_flag_and_lists_the_presets(capsys):
    from sdpo.train.config import PRESETS

    with pytest.raises(SystemExit) as exit_:
        config_from_args(["--help"])
    assert exit_.value.code == 0
    raw = capsys.readouterr().out
    entries: dict[str, str] = {}  # flag -> its help entry, unwrapped
    current = None
    for line in raw.splitlines():
        if line.startswith("  --"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif line.startswith("      ") and current is not None:
            entries[current] += " " + line.strip()
        else:
            current = None
    for name in field_names():
        flag = "--" + name.replace("_", "-")
        assert "(default: " in entries.get(flag, ""), flag
    text = " ".join(raw.split())
    for preset in PRESETS:
        assert preset in text
    assert "--beta_dpo" in text and "--list-presets" in text
    assert "one of adamw, adafactor" in text


def test_list_presets_gives_one_line_each(capsys):
    from sdpo.train.config import PRESETS

    with pytest.raises(SystemExit) as exit_:
        config_from_args(["--list-presets"])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(PRESETS)
    assert all(len(line.split()) > 3 for line in lines)


def test_config_errors_are_usage_errors():
    from sdpo.train.errors import UsageError

    with pytest.raises(UsageError):
        config_from_args(["--preset", "tiny", "--max-grad-norm", "nan"])


def test_validate_checks_configs_built_in_code(tmp_path):
    config = config_from_args(base_argv(tmp_path))
    for name, bad in [("max_grad_norm", float("nan")), ("max_steps", 2.7), ("beta", True)]:
        changed = dataclasses.replace(config, **{name: bad})
        with pytest.raises(ValueError, match=name):
            changed.validate()
