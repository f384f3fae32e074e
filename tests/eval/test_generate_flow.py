"""`sdpo-eval generate --model sd3|flux` on tiny pipelines: the base, a trained transformer and
LoRA weights from sdpo-train applied to the base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdpo.eval.generate import GenerateSettings, generate
from sdpo.train import families
from sdpo.train.config import config_from_args
from sdpo.train.trainer import train


def write_suite(folder: Path) -> Path:
    suite = folder / "suite.json"
    rows = [
        {"prompt": prompt, "gen_image_path": "", "raw_image_path": "", "metadata": {}}
        for prompt in ("red circle", "blue square")
    ]
    suite.write_text(json.dumps(rows))
    return suite


def pixels(manifest: Path) -> list[torch.Tensor]:
    return [
        torch.tensor(list(Image.open(entry["gen_image_path"]).tobytes()), dtype=torch.float32)
        for entry in json.loads(manifest.read_text())
    ]


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_generate_with_a_trained_transformer_or_its_lora(tmp_path, model):
    family_class = {"sd3": families.SD3Family, "flux": families.FluxFamily}[model]
    base = tmp_path / "base"
    family_class.build_tiny(16, 0).pipeline.save_pretrained(base)
    # The trainer's --pretrained tiny builds the same seeded models as the saved base folder.
    run = tmp_path / "run"
    config = config_from_args(
        ["--model", model, "--pretrained", "tiny", "--resolution", "16", "--lora-rank", "4",
         "--learning-rate", "0.05", "--max-steps", "2", "--warmup-steps", "0",
         "--gradient-accumulation", "1", "--synthetic-pairs", "8", "--output-dir", str(run),
         "--no-progress"]
    )  # fmt: skip
    train(config)
    assert (run / "transformer_lora" / "pytorch_lora_weights.safetensors").is_file()
    suite = write_suite(tmp_path)
    common = dict(
        pretrained=str(base), suite=str(suite), steps=2, resolution=16, batch_size=2,
        model=model, dtype="fp32",
    )  # fmt: skip
    base_images = pixels(generate(GenerateSettings(output_dir=str(tmp_path / "g0"), **common)))
    merged = pixels(
        generate(
            GenerateSettings(
                output_dir=str(tmp_path / "g1"), transformer=str(run / "transformer"), **common
            )
        )
    )
    lora = pixels(
        generate(
            GenerateSettings(
                output_dir=str(tmp_path / "g2"), lora=str(run / "transformer_lora"), **common
            )
        )
    )
    from_pth = pixels(
        generate(
            GenerateSettings(
                output_dir=str(tmp_path / "g3"), transformer=str(run / "transformer.pth"), **common
            )
        )
    )
    meta = json.loads((tmp_path / "g0" / "manifest.json.meta.json").read_text())
    assert meta["scheduler_class"] == "FlowMatchEulerDiscreteScheduler"
    if model == "flux":
        assert meta["diffusers_guidance_scale"] == 3.5  # FLUX's embedded guidance default
    for trained, adapted, state, original in zip(merged, lora, from_pth, base_images, strict=True):
        # The merged export and the LoRA on the base give one image (up to uint8 rounding).
        assert (trained - adapted).abs().max() <= 2
        assert torch.equal(trained, state)
        assert (trained - original).abs().mean() > 2 * (trained - adapted).abs().mean()


def test_flow_generate_refuses_unet_only_flags(tmp_path):
    suite = write_suite(tmp_path)
    base = tmp_path / "base"
    families.SD3Family.build_tiny(16, 0).pipeline.save_pretrained(base)
    common = dict(pretrained=str(base), suite=str(suite), output_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="--scheduler: not for --model sd3"):
        generate(GenerateSettings(model="sd3", scheduler="ddim", **common))
    with pytest.raises(ValueError, match="--transformer: for --model sd3 or flux"):
        generate(GenerateSettings(model="sd15", transformer="x", **common))
    with pytest.raises(ValueError, match=r"FLUX\.1's guidance is embedded"):
        generate(GenerateSettings(model="flux", cfg_formula="reference", **common))


def test_weights_of_another_family_are_refused_in_one_line(tmp_path):
    """An SD3 run's transformer.pth or LoRA given to a FLUX base: the size mismatches were a
    RuntimeError traceback from load_state_dict / peft; now one line naming the file."""
    base = tmp_path / "flux"
    families.FluxFamily.build_tiny(16, 0).pipeline.save_pretrained(base)
    run = tmp_path / "sd3-run"
    config = config_from_args(
        ["--model", "sd3", "--pretrained", "tiny", "--resolution", "16", "--lora-rank", "4",
         "--max-steps", "1", "--gradient-accumulation", "1", "--synthetic-pairs", "4",
         "--output-dir", str(run), "--no-progress"]
    )  # fmt: skip
    train(config)
    common = dict(
        pretrained=str(base), suite=str(write_suite(tmp_path)), steps=1, resolution=16,
        model="flux", dtype="fp32", output_dir=str(tmp_path / "out"),
    )  # fmt: skip
    for flag, value in (
        ("transformer", run / "transformer.pth"),
        ("lora", run / "transformer_lora"),
    ):
        # The transformer's parameters are compared by name and shape, the LoRA's by peft.
        pattern = f"^--{flag} .* does not fit .*(shape of|size mismatch)"
        with pytest.raises(ValueError, match=pattern) as error:
            generate(GenerateSettings(**{flag: str(value)}, **common))
        assert "\n" not in str(error.value)
