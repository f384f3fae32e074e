"""sdpo-eval checks every flag and manifest field where it enters: a refused one is one line
naming it and exit status 2, before anything loads; a failure while a command runs is one line
and status 1."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import save_tiny_pipeline

from sdpo.eval import compare
from sdpo.eval.cli import main as eval_main
from sdpo.eval.generate import GenerateSettings, generate
from sdpo.eval.score import score_manifest
from sdpo.eval.scorers import WeightSources
from sdpo.train.errors import UsageError


@pytest.fixture(autouse=True)
def _quiet(quiet_transformers):
    """Every test here reads stderr: transformers' warnings stay out of it."""


def error_line(capsys, arguments: list[str], status: int = 2) -> str:
    capsys.readouterr()
    code = eval_main(arguments)
    lines = [
        line
        for line in capsys.readouterr().err.splitlines()
        if line.strip() and "it/s]" not in line and not line.startswith("generate: rank")
    ]
    assert code == status and len(lines) == 1, (code, lines)
    assert lines[0].startswith("sdpo-eval: error: ") and "Traceback" not in lines[0], lines
    return lines[0]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny"))


def write_suite(path: Path, prompts: list[str]) -> Path:
    path.write_text(json.dumps([{"prompt": prompt} for prompt in prompts]))
    return path


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--guidance", "nan"], "argument --guidance: expected a finite number >= 0, got nan"),
        (["--guidance", "inf"], "argument --guidance: expected a finite number >= 0, got inf"),
        (["--guidance", "-1"], "argument --guidance: expected a finite number >= 0, got -1.0"),
        (["--resolution", "7"], "argument --resolution: expected an integer >= 8, got 7"),
        (["--resolution", "12"], "argument --resolution: expected a multiple of 8"),
        (["--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
        (["--batch-size", "-2"], "argument --batch-size: expected an integer >= 1, got -2"),
        (["--limit", "0"], "argument --limit: expected an integer >= 1, got 0"),
        (["--seed", "-1"], "argument --seed: expected an integer in [0, 2**63), got -1"),
        (["--steps", "2.5"], "argument --steps: expected an integer >= 1, got '2.5'"),
        (["--model", "sd2"], "argument --model: invalid choice: 'sd2'"),
    ],
)
def test_generate_flags_are_refused_by_name_before_anything_loads(tmp_path, capsys, flags, message):
    # A --pretrained that does not exist: the flag is refused first, by the parser.
    command = [
        "generate",
        "--pretrained",
        str(tmp_path / "none"),
        "--suite",
        str(write_suite(tmp_path / "s.json", ["x"])),
        "--output-dir",
        str(tmp_path / "o"),
    ]
    assert message in error_line(capsys, [*command, *flags])  # fmt: skip


def test_a_missing_required_flag_is_one_line(capsys):
    assert "the following arguments are required: --suite" in error_line(
        capsys, ["generate", "--pretrained", "x", "--output-dir", "o"]
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("guidance", float("nan"), "--guidance: expected a finite number >= 0, got nan"),
        ("resolution", 7, "--resolution: expected an integer >= 8, got 7"),
        ("steps", 0, "--steps: expected an integer >= 1, got 0"),
        ("batch_size", True, "--batch-size: expected an integer >= 1, got True"),
        ("limit", 2.5, "--limit: expected an integer >= 1, got 2.5"),
        ("seed", -1, "--seed: expected an integer in [0, 2**63), got -1"),
        ("dtype", "fp16", "--dtype: expected one of bf16, fp32, got 'fp16'"),
    ],
)
def test_settings_built_in_code_are_checked_too(tmp_path, field, value, message):
    suite = str(write_suite(tmp_path / "s.json", ["x"]))
    settings = GenerateSettings(str(tmp_path / "none"), suite, str(tmp_path / "o"))
    setattr(settings, field, value)
    with pytest.raises(UsageError) as refused:
        generate(settings)
    assert message in str(refused.value)


def test_generate_refuses_an_empty_suite_and_an_output_dir_that_is_a_file(
    tmp_path, capsys, pipeline
):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    command = ["generate", "--pretrained", str(pipeline), "--steps", "1", "--resolution", "16"]
    line = error_line(capsys, [*command, "--suite", str(empty), "--output-dir", str(tmp_path)])
    assert f"--suite: {empty} holds no entries" in line
    (tmp_path / "file").write_text("")
    suite = str(write_suite(tmp_path / "s.json", ["x"]))
    line = error_line(capsys, [*command, "--suite", suite, "--output-dir", str(tmp_path / "file")])
    assert "--output-dir: " in line and "is a file, not a folder" in line


def other_unet(folder: Path) -> Path:
    """A UNet of another architecture (other widths) that the tiny pipeline would run."""
    from diffusers import UNet2DConditionModel

    from sdpo.train.models import TINY_HIDDEN

    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TINY_HIDDEN,
        attention_head_dim=2, norm_num_groups=4,
    ).save_pretrained(folder)  # fmt: skip
    return folder


def test_a_unet_that_does_not_fit_or_cannot_be_read_is_one_line(tmp_path, capsys, pipeline):
    suite = str(write_suite(tmp_path / "s.json", ["the cat"]))
    command = ["generate", "--pretrained", str(pipeline), "--suite", suite, "--steps", "1",
               "--resolution", "16", "--output-dir", str(tmp_path / "o"), "--unet"]  # fmt: skip
    # A folder of another architecture used to replace the pipeline's UNet and render (exit 0).
    line = error_line(capsys, [*command, str(other_unet(tmp_path / "other"))])
    assert "does not fit the pipeline's UNet2DConditionModel" in line and "shape of" in line
    (tmp_path / "not_a_model").mkdir()
    assert "not a diffusers UNet2DConditionModel folder" in error_line(
        capsys, [*command, str(tmp_path / "not_a_model")]
    )
    with zipfile.ZipFile(tmp_path / "zip.pth", "w") as archive:
        archive.writestr("a/data.pkl", b"x")  # a zip archive that is no torch file
    garbage = {"bytes.pth": b"not a checkpoint", "empty.pth": b"", "zip.pth": None}
    for name, content in garbage.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        line = error_line(capsys, [*command, str(tmp_path / name)])
        assert f"--unet {tmp_path / name}: not a readable PyTorch state dict" in line
    from diffusers import UNet2DConditionModel

    state = UNet2DConditionModel.from_pretrained(pipeline / "unet").state_dict()
    cases = {
        "list.pth": ([1, 2], "expected a state dict (parameter name: tensor), got list"),
        "ints.pth": ({key: 3 for key in state}, "is of type int, not a tensor"),
        "fewer.pth": (dict(list(state.items())[1:]), "(missing conv_in.weight)"),
        "shape.pth": (
            state | {"conv_in.weight": torch.zeros(3)},
            "(shape of conv_in.weight [3] (the pipeline's [16, 4, 3, 3]))",
        ),
    }
    for name, (content, message) in cases.items():
        torch.save(content, tmp_path / name)
        assert message in error_line(capsys, [*command, str(tmp_path / name)]), name
    # The pipeline's own weights still load and render.
    torch.save(state, tmp_path / "same.pth")
    assert eval_main([*command, str(tmp_path / "same.pth")]) == 0


def test_a_vae_folder_that_does_not_load_names_the_flag(tmp_path, capsys, pipeline):
    suite = str(write_suite(tmp_path / "s.json", ["the cat"]))
    (tmp_path / "vae").mkdir()
    command = ["generate", "--pretrained", str(pipeline), "--suite", suite, "--steps", "1",
               "--resolution", "16", "--output-dir", str(tmp_path / "o")]  # fmt: skip
    line = error_line(capsys, [*command, "--vae", str(tmp_path / "vae")])
    assert f"--vae {tmp_path / 'vae'}: not a diffusers AutoencoderKL folder" in line


def test_an_image_that_cannot_be_written_is_a_run_failure(tmp_path, capsys, pipeline, monkeypatch):
    suite = str(write_suite(tmp_path / "s.json", ["the cat"]))

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    line = error_line(
        capsys,
        ["generate", "--pretrained", str(pipeline), "--suite", suite, "--steps", "1",
         "--resolution", "16", "--output-dir", str(tmp_path / "o")],
        status=1,
    )  # fmt: skip
    assert "generate: writing the images into" in line and "No space left" in line


def image_manifest(tmp_path: Path, paths: list) -> Path:
    Image.new("RGB", (8, 8)).save(tmp_path / "image.png")
    entries = [{"prompt": f"p{index}", "gen_image_path": path} for index, path in enumerate(paths)]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(entries))
    return manifest


@pytest.mark.parametrize(("path", "shown"), [(5, "int 5"), (["a.png"], "list ['a.png']")])
def test_score_refuses_an_image_path_that_is_not_a_string(tmp_path, capsys, path, shown):
    manifest = image_manifest(tmp_path, [str(tmp_path / "image.png"), path])
    line = error_line(capsys, ["score", str(manifest), "--metrics", "clip"])
    expected = "entry 1 (prompt 'p1'): \"gen_image_path\" must be a string (the image's path)"
    assert f"{expected}, got {shown}" in line, line


def test_score_refuses_scores_that_are_not_an_object(tmp_path, capsys):
    manifest = image_manifest(tmp_path, [str(tmp_path / "image.png")])
    entries = json.loads(manifest.read_text())
    entries[0]["scores"] = [1.0]
    manifest.write_text(json.dumps(entries))
    assert '"scores" must be an object of metric: number, got list' in error_line(
        capsys, ["score", str(manifest), "--metrics", "clip"]
    )


@pytest.mark.parametrize("batch_size", ["0", "-4", "x"])
def test_score_batch_size_is_a_count(tmp_path, capsys, batch_size):
    manifest = image_manifest(tmp_path, [str(tmp_path / "image.png")])
    line = error_line(capsys, ["score", str(manifest), "--batch-size", batch_size])
    assert "argument --batch-size: expected an integer >= 1" in line


def test_score_checks_its_arguments_built_in_code(tmp_path, capsys):
    manifest = image_manifest(tmp_path, [str(tmp_path / "image.png")])
    with pytest.raises(UsageError, match=r"--batch-size: expected an integer >= 1, got 0"):
        score_manifest(manifest, ["clip"], WeightSources({}), batch_size=0, log=lambda _: None)
    assert f"--weights-root {tmp_path / 'none'}: no such folder" in error_line(
        capsys, ["score", str(manifest), "--weights-root", str(tmp_path / "none")]
    )
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert "holds no entries" in error_line(capsys, ["score", str(empty)])


def scored(path: Path, values: list) -> Path:
    # json.dumps writes a Python int of any size as its digits; json.loads reads it back.
    entries = [{"prompt": f"p{i}", "scores": {"clip": v}} for i, v in enumerate(values)]
    path.write_text(json.dumps(entries))
    return path


def test_compare_refuses_an_integer_beyond_a_float(tmp_path, capsys):
    a = scored(tmp_path / "a.json", [1.0, 2.0])
    b = scored(tmp_path / "b.json", [0.5, 10**400])
    with pytest.raises(ValueError, match=r"prompt 'p1', metric clip: score 1000.* finite number"):
        compare.compare(a, b, resamples=10)
    line = error_line(capsys, ["compare", str(a), str(b), "--output", str(tmp_path / "r.json")])
    assert "prompt 'p1', metric clip" in line and not (tmp_path / "r.json").exists()


def test_compare_flags_and_outputs(tmp_path, capsys, monkeypatch):
    a = scored(tmp_path / "a.json", [1.0, 2.0])
    b = scored(tmp_path / "b.json", [0.5, 3.0])
    command = ["compare", str(a), str(b), "--output", str(tmp_path / "r.json")]
    assert "argument --seed: expected an integer in [0, 2**63), got -1" in error_line(
        capsys, [*command, "--seed", "-1"]
    )
    assert "argument --resamples: expected an integer >= 1, got 0" in error_line(
        capsys, [*command, "--resamples", "0"]
    )
    (tmp_path / "file").write_text("")
    line = error_line(capsys, [*command, "--markdown", str(tmp_path / "file" / "x.md")])
    assert f"--markdown: {tmp_path / 'file'} is a file, not a folder" in line

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compare, "write", disk_full)
    line = error_line(capsys, [*command, "--resamples", "10"], status=1)
    assert "compare: writing the results failed" in line


def test_fetch_suites_base_url_is_a_url(tmp_path, capsys):
    line = error_line(
        capsys, ["fetch-suites", "--output-dir", str(tmp_path), "--base-url", "mirror/files"]
    )
    assert "--base-url mirror/files: expected an https://, http:// or file:// URL" in line
