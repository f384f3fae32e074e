"""The trainer on the tiny preset (CPU): the step, counting, resume, data, errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_helpers import assert_same_up_to_reordering, read_rows, tiny

import sdpo
from sdpo.train import checkpoint as checkpoints
from sdpo.train.config import config_from_args
from sdpo.train.data import PairBatches, generator_for, load_records
from sdpo.train.errors import UsageError
from sdpo.train.models import build_models
from sdpo.train.step import encode_images
from sdpo.train.trainer import NonFiniteLoss, train

ROOT = Path(__file__).resolve().parents[2]


def test_first_step_loss_equals_preference_loss_by_hand(tmp_path):
    config = tiny(tmp_path, gradient_accumulation=1, max_steps=1, warmup_steps=0)
    summary = train(config)
    logged = summary["rows"][0]

    # The same inputs by hand: the initial models, batch (epoch 0, batch 0), the step's generator.
    device = torch.device("cpu")
    models = build_models(config, device)
    records = load_records(
        None, resolution=config.resolution, synthetic_pairs=config.synthetic_pairs, seed=config.seed
    )
    batches = PairBatches(
        records,
        batch_pairs=config.train_batch_pairs,
        resolution=config.resolution,
        caption_dropout=config.caption_dropout,
        seed=config.seed,
    )
    batch = batches.batch(0, 0)
    generator = generator_for(config.seed, 3, 0, 0)
    latents = encode_images(models, torch.cat([batch.winners, batch.losers]), generator)
    hidden, _ = models.text(batch.captions, device)
    pairs = config.train_batch_pairs
    noise = torch.randn((pairs, *latents.shape[1:]), generator=generator)
    timesteps = torch.randint(0, 1000, (pairs,), generator=generator)
    noisy = models.scheduler.add_noise(
        latents, torch.cat([noise, noise]), torch.cat([timesteps, timesteps])
    )
    with torch.no_grad():
        model_pred = models.unet(
            noisy, torch.cat([timesteps, timesteps]), torch.cat([hidden, hidden])
        ).sample
        ref_pred = models.reference_unet(
            noisy, torch.cat([timesteps, timesteps]), torch.cat([hidden, hidden])
        ).sample
    expected = sdpo.preference_loss(
        model_pred, ref_pred, noise, beta=config.beta, mu=config.mu, granularity=config.granularity
    )
    assert logged["loss"] == pytest.approx(float(expected.loss), rel=1e-5, abs=1e-7)
    assert logged["lambda"] == pytest.approx(float(expected.stats["lambda"]), rel=1e-5)
    assert logged["implicit_acc"] == pytest.approx(float(expected.stats["implicit_acc"]))


def test_optimizer_steps_count_across_epoch_boundaries(tmp_path):
    # 6 pairs, 2 per batch: 3 micro-batches an epoch. 4 steps x 2 accumulation = 8 micro-batches,
    # so steps 2 and 3 straddle epoch boundaries; the optimizer must step exactly 4 times.
    config = tiny(
        tmp_path, synthetic_pairs=6, train_batch_pairs=2, gradient_accumulation=2, max_steps=4
    )
    summary = train(config)
    rows = read_rows(Path(config.output_dir))
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    # Micro-batches 0..7 fall in epochs 0,0,0,1,1,1,2,2: each step logs its last one's epoch.
    assert [row["epoch"] for row in rows] == [0, 1, 1, 2]
    _, state = checkpoints.load_checkpoint(Path(config.output_dir) / "checkpoint-4")
    adam_steps = {int(value["step"]) for value in state["optimizer"]["state"].values()}
    assert adam_steps == {4}
    assert state["position"] == [2, 2]  # 8 micro-batches read: epoch 2, batch 2 is next
    assert summary["steps"] == 4


def test_resume_continues_exactly(tmp_path):
    full = tiny(tmp_path, "full", max_steps=4, checkpoint_every=2, synthetic_pairs=6)
    train(full)
    first_half = tiny(tmp_path, "resumed", max_steps=2, synthetic_pairs=6)
    train(first_half)
    # A kill during a later save leaves a temporary folder that --resume must ignore.
    (Path(first_half.output_dir) / "checkpoint-3.tmp-999").mkdir()
    assert checkpoints.latest_checkpoint(first_half.output_dir).name == "checkpoint-2"
    resumed = tiny(tmp_path, "resumed", max_steps=4, synthetic_pairs=6, resume=True)
    train(resumed)
    full_rows, resumed_rows = read_rows(Path(full.output_dir)), read_rows(Path(resumed.output_dir))
    assert [row["step"] for row in resumed_rows] == [1, 2, 3, 4]
    for key in ("loss", "lambda", "margin", "model_mse_w", "lr"):
        assert [row[key] for row in resumed_rows] == [row[key] for row in full_rows], key
    full_weights = torch.load(Path(full.output_dir) / "unet.pth")
    resumed_weights = torch.load(Path(resumed.output_dir) / "unet.pth")
    assert all(torch.equal(full_weights[name], resumed_weights[name]) for name in full_weights)


def test_outputs(tmp_path):
    config = tiny(tmp_path, max_steps=2)
    train(config)
    output = Path(config.output_dir)
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    from safetensors.torch import load_file

    state = torch.load(output / "unet.pth")
    exported = load_file(str(output / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(state) == set(exported) and len(state) > 10
    assert all(torch.equal(state[name], exported[name]) for name in state)
    rows = read_rows(output)
    required = {
        "step",
        "loss",
        "implicit_acc",
        "lambda",
        "margin",
        "model_mse_w",
        "model_mse_l",
        "win_gap",
        "lose_gap",
        "lr",
        "pairs_per_s",
    }
    assert required <= set(rows[0])
    assert all(0 < row["lambda"] <= 1 for row in rows)
    assert list((output / "tensorboard").iterdir())


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    config = tiny(tmp_path, max_steps=4, checkpoint_every=1, gradient_accumulation=1)
    calls = {"count": 0}
    real_loss = sdpo.preference_loss

    def poisoned(*args, **kwargs):
        calls["count"] += 1
        result = real_loss(*args, **kwargs)
        if calls["count"] == 3:
            return sdpo.PreferenceLoss(result.loss * float("nan"), result.stats)
        return result

    monkeypatch.setattr(sdpo, "preference_loss", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"step 3:.*checkpoint-2"):
        train(config)
    latest = checkpoints.latest_checkpoint(config.output_dir)
    assert latest.name == "checkpoint-2"
    model_state, _ = checkpoints.load_checkpoint(latest)
    assert all(torch.isfinite(tensor).all() for tensor in model_state.values())


def write_png(path: Path, color: tuple[int, int, int]) -> None:
    from PIL import Image

    Image.new("RGB", (20, 24), color).save(path)


def write_manifest(folder: Path, pairs: int = 4) -> Path:
    """A JSONL manifest of red-winner / blue-loser PNG pairs under folder/images."""
    images = folder / "images"
    images.mkdir()
    lines = []
    for index in range(pairs):
        write_png(images / f"w{index}.png", (200, 30, 30))
        write_png(images / f"l{index}.png", (30, 30, 200))
        row = {
            "caption": "a red square on a white background",
            "winner": f"images/w{index}.png",
            "loser": f"images/l{index}.png",
        }
        lines.append(json.dumps(row))
    manifest = folder / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_jsonl_data_with_a_corrupt_image_is_skipped_and_counted(tmp_path):
    manifest = write_manifest(tmp_path)
    (tmp_path / "images" / "l1.png").write_bytes(b"not a png")
    config = tiny(
        tmp_path, data=str(manifest), train_batch_pairs=4, gradient_accumulation=1, max_steps=2
    )
    summary = train(config)
    assert summary["skipped_images"] == 2  # the corrupt pair is read once per step, each replaced
    assert read_rows(Path(config.output_dir))[-1]["skipped_images"] == 2


def test_parquet_pick_a_pic_format(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def png(color):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), color).save(buffer, format="PNG")
        return buffer.getvalue()

    red, blue = png((255, 0, 0)), png((0, 0, 255))
    table = pa.table(
        {
            "jpg_0": [red, red, blue],
            "jpg_1": [blue, blue, red],
            "label_0": [1.0, 0.5, 0.0],
            "caption": ["first", "tie", "third"],
        }
    )
    pq.write_table(table, tmp_path / "shard-0.parquet", row_group_size=2)
    records = load_records(str(tmp_path), resolution=16, synthetic_pairs=0, seed=0)
    assert [record.caption for record in records] == ["first", "third"]  # the tie is dropped
    batches = PairBatches(records, batch_pairs=2, resolution=16, caption_dropout=0.0, seed=0)
    for index in range(2):
        winner, loser, _, _ = batches.load_pair(index, False, False)
        assert winner[0].mean() > 0.9 and loser[2].mean() > 0.9  # red preferred in both pairs


def test_save_to_disk_folder_read_lazily_without_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import io

    from PIL import Image

    from sdpo.train.data import ArrowCell

    def png(color):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), color).save(buffer, format="PNG")
        return buffer.getvalue()

    red, blue = png((255, 0, 0)), png((0, 0, 255))
    dataset = datasets.Dataset.from_dict(
        {
            "jpg_0": [red, red, blue, blue],
            "jpg_1": [blue, blue, red, red],
            "label_0": [1.0, 0.5, 0.0, 1.0],
            "caption": ["first", "tie", "third", "fourth"],
        }
    )
    dataset = dataset.cast_column("jpg_0", datasets.Image()).cast_column("jpg_1", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "single"), num_shards=2)
    datasets.DatasetDict({"train": dataset, "test": dataset}).save_to_disk(str(tmp_path / "dict"))
    # The reader must not need the datasets package at run time.
    monkeypatch.setitem(sys.modules, "datasets", None)
    for folder in ("single", "dict"):
        records = load_records(str(tmp_path / folder), resolution=16, synthetic_pairs=0, seed=0)
        assert [record.caption for record in records] == ["first", "third", "fourth"]
        assert all(isinstance(record.winner, ArrowCell) for record in records)
        batches = PairBatches(records, batch_pairs=3, resolution=16, caption_dropout=0.0, seed=0)
        for index, winner_is_red in enumerate([True, True, False]):
            winner, loser, _, _ = batches.load_pair(index, False, False)
            red_channel = 0 if winner_is_red else 2
            assert winner[red_channel].mean() > 0.9 and loser[2 - red_channel].mean() > 0.9
    (tmp_path / "dict" / "dataset_dict.json").write_text('{"splits": ["test"]}')
    with pytest.raises(ValueError, match="DatasetDict with splits"):
        load_records(str(tmp_path / "dict"), resolution=16, synthetic_pairs=0, seed=0)


def test_random_architecture_needs_no_data_and_synthetic_pairs_upsample():
    config = config_from_args(["--preset", "sd15-dpo", "--pretrained", "random"])
    assert config.data is None and config.resolution == 512
    small = load_records(None, resolution=32, synthetic_pairs=2, seed=0)
    large = load_records(None, resolution=64, synthetic_pairs=2, seed=0)
    assert large[0].winner.shape == (3, 64, 64)
    torch.testing.assert_close(large[0].winner[:, ::2, ::2], small[0].winner)
    assert [record.caption for record in large] == [record.caption for record in small]


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["--preset", "sd99"], "preset: unknown 'sd99'"),
        (["--preset", "tiny", "--mu", "1.5"], r"mu: expected a finite number in \[0, 1\]"),
        (["--preset", "tiny", "--method", "ipo"], "method: unknown 'ipo'"),
        (["--preset", "tiny", "--granularity", "groups"], "granularity: unknown"),
        (["--preset", "sd15-dpo"], "pretrained: model 'sd15' needs --pretrained"),
        (["--preset", "sd15-dpo", "--pretrained", "x"], "data: expected --data PATH"),
        (["--preset", "tiny", "--profile-steps", "5"], "--profile-steps: expected START:STOP"),
        (["--preset", "tiny", "--profile-steps", "8:5"], "--profile-steps: expected 0 <= START"),
        (["--preset", "tiny", "--fsdp", "--lora-rank", "4"], "fsdp: LoRA adapters"),
        (
            ["--preset", "tiny", "--fsdp", "--mixed-precision", "fp16"],
            "mixed_precision: fp16 loss scaling is per rank under --fsdp",
        ),
    ],
)
def test_bad_settings_fail_before_any_model_loads(argv, pattern):
    with pytest.raises(ValueError, match=pattern):
        config_from_args(argv)


def test_unknown_yaml_key_is_an_error(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("preset: tiny\nlearning_rate: 1e-5\nlearning_rat: 3\n")
    with pytest.raises(ValueError, match="unknown key learning_rat; did you mean learning_rate"):
        config_from_args(["--config", str(file)])
    file.write_text("preset: tiny\nlearning_rate: 1e-5\nmu: null\n")
    config = config_from_args(["--config", str(file), "--beta", "2500"])
    assert config.learning_rate == 1e-5 and config.mu is None and config.beta == 2500.0


def test_command_line_overrides_and_safeguard_off():
    config = config_from_args(
        ["--preset", "sd15-dmpo", "--pretrained", "x", "--data", "y", "--mu", "off"]
    )
    assert config.mu is None and config.beta == 2000.0 and config.dmpo_alpha == 0.01
    assert config.granularity == "group:8" and config.gradient_accumulation == 32


def test_empty_data_and_missing_weights_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="has no usable pairs"):
        train(tiny(tmp_path, data=str(empty)))
    with pytest.raises(UsageError, match=r"pretrained: no such folder /nonexistent/sd15; pass"):
        train(tiny(tmp_path, pretrained="/nonexistent/sd15"))


def test_cli_exit_codes(tmp_path):
    from sdpo.train.cli import main

    assert main(["--preset", "nope"]) == 2
    assert (
        main(
            [
                "--preset",
                "tiny",
                "--output-dir",
                str(tmp_path / "cli"),
                "--max-steps",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )


def torchrun(tmp_path: Path, output: Path, *flags: str) -> None:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("TRITON")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "sdpo.train", "--preset", "tiny", "--output-dir", str(output)]
    command += ["--no-progress", *flags]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_process_torchrun(tmp_path):
    output = tmp_path / "ddp"
    torchrun(tmp_path, output, "--max-steps", "2", "--checkpoint-every", "1")
    rows = read_rows(output)
    assert [row["step"] for row in rows] == [1, 2]
    # Each step averages 2 processes x 2 accumulation micro-batches of 2 pairs.
    assert (output / "checkpoint-1" / checkpoints.COMPLETE_MARKER).is_file()
    assert (output / "unet.pth").is_file()

    # FSDP2: the same run with the UNet sharded over the 2 processes; gradients are
    # reduce-scattered instead of all-reduced, so the sums differ by rounding only: the model
    # errors to a few ulps, the loss and the gradient norm within the margin's amplification
    # of those (trainer_helpers.reordering_bound, with the derivation).
    sharded = tmp_path / "fsdp"
    torchrun(tmp_path, sharded, "--max-steps", "2", "--checkpoint-every", "1", "--fsdp")
    sharded_rows = read_rows(sharded)
    assert [row["model_mse_w"] for row in sharded_rows] == pytest.approx(
        [row["model_mse_w"] for row in rows], rel=1e-5
    )
    assert_same_up_to_reordering(sharded_rows, rows, config_from_args(["--preset", "tiny"]).beta)
    ddp_weights = torch.load(output / "unet.pth")
    sharded_weights = torch.load(sharded / "unet.pth")
    assert set(sharded_weights) == set(ddp_weights)
    for name, tensor in ddp_weights.items():
        torch.testing.assert_close(sharded_weights[name], tensor, rtol=1e-4, atol=1e-6)

    # FSDP2 resume from the full-state checkpoint (weights and optimizer) is exact.
    resumed = tmp_path / "fsdp-resumed"
    torchrun(tmp_path, resumed, "--max-steps", "1", "--fsdp")
    torchrun(tmp_path, resumed, "--max-steps", "2", "--fsdp", "--resume")
    assert [row["loss"] for row in read_rows(resumed)] == [row["loss"] for row in sharded_rows]
    resumed_weights = torch.load(resumed / "unet.pth")
    assert all(torch.equal(resumed_weights[name], sharded_weights[name]) for name in ddp_weights)


def test_lora_reference_is_the_policy_with_adapters_disabled(tmp_path):
    config = tiny(
        tmp_path,
        lora_rank=4,
        max_steps=2,
        gradient_accumulation=1,
        learning_rate=1e-2,
        warmup_steps=0,
    )
    summary = train(config)
    rows = summary["rows"]
    # At step 1 the adapters are ~0 (gaussian init with B = 0), so policy = reference and u = 0.
    assert rows[0]["margin"] == pytest.approx(0.0, abs=1e-3)  # fp32 rounding at beta = 5000
    assert abs(rows[1]["margin"]) > 1e-2  # the adapters moved the policy
    from diffusers import UNet2DConditionModel

    exported = UNet2DConditionModel.from_pretrained(Path(config.output_dir) / "unet")
    state = torch.load(Path(config.output_dir) / "unet.pth")
    assert not any("lora" in name for name in state)
    assert all(torch.equal(exported.state_dict()[name], state[name]) for name in state)


def save_tiny_sdxl(folder: Path) -> None:
    """An SDXL-shaped model in miniature: two text encoders, text_time added conditioning."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from sdpo.train import models as tiny_models

    torch.manual_seed(0)
    vocabulary = len(tiny_models.tiny_vocabulary())
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    )
    second = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=vocabulary,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=tiny_models.TINY_MAX_LENGTH,
            projection_dim=32,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
    )
    unet.save_pretrained(folder / "unet")
    tiny_models.build_tiny_vae().save_pretrained(folder / "vae")
    tiny_models.build_scheduler().save_pretrained(folder / "scheduler")
    tiny_models.build_tiny_text_encoder(vocabulary).save_pretrained(folder / "text_encoder")
    second.save_pretrained(folder / "text_encoder_2")
    for name in ("tokenizer", "tokenizer_2"):
        tiny_models.build_tiny_tokenizer().save_pretrained(folder / name)
    index = {"_class_name": "StableDiffusionXLPipeline"}  # a diffusers folder has one
    (folder / "model_index.json").write_text(json.dumps(index))


def test_sdxl_conditioning_path_trains(tmp_path):
    # The sdxl-dspo preset's settings on an SDXL-shaped miniature: both encoders' penultimate
    # states concatenated (64 features), the pooled projection and time_ids as added conditioning.
    save_tiny_sdxl(tmp_path / "sdxl")
    write_manifest(tmp_path)
    config = config_from_args(
        [
            "--preset",
            "sdxl-dspo",
            "--pretrained",
            str(tmp_path / "sdxl"),
            "--data",
            str(tmp_path / "pairs.jsonl"),
            "--output-dir",
            str(tmp_path / "run"),
            "--resolution",
            "16",
            "--train-batch-pairs",
            "2",
            "--gradient-accumulation",
            "1",
            "--max-steps",
            "2",
            "--checkpoint-every",
            "0",
            "--no-progress",
            "--mixed-precision",
            "no",
        ]
    )
    assert (
        config.method == "dspo-sdxl"
        and config.optimizer == "adafactor"
        and config.gradient_checkpointing
    )
    summary = train(config)
    rows = summary["rows"]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(math.isfinite(row["loss"]) for row in rows)
    hidden, added = build_models(config, torch.device("cpu")).text(
        ["a red square"], torch.device("cpu")
    )
    assert hidden.shape[-1] == 64 and added["text_embeds"].shape == (1, 32)
    assert added["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]]


def test_cache_round_trip_reproduces_the_uncached_run(tmp_path):
    from sdpo.train.cache import build_cache
    from sdpo.train.cache_cli import main as cache_main

    # Synthetic tiny pairs, fp32 storage. The cached run samples latents from the cached
    # distributions with the same draws, so it reproduces the uncached run up to fp32 rounding
    # of the VAE encode (its batches differ: 4 views per pair here), which beta = 5000 magnifies
    # in u: the MSEs agree to 1e-5, the loss to 1e-3.
    index = build_cache(
        data=None,
        output_dir=str(tmp_path / "cache"),
        model="tiny",
        pretrained=None,
        resolution=16,
        seed=0,
        synthetic_pairs=16,
        shard_pairs=5,
        storage_dtype="float32",
    )
    assert index["pairs"] == 16 and [shard["pairs"] for shard in index["shards"]] == [5, 5, 5, 1]
    uncached = tiny(tmp_path, "uncached", max_steps=3, caption_dropout=0.5)
    cached = tiny(
        tmp_path, "cached", max_steps=3, caption_dropout=0.5, data=str(tmp_path / "cache")
    )
    uncached_rows, cached_rows = train(uncached)["rows"], train(cached)["rows"]
    for key, tolerance in (("model_mse_w", 1e-5), ("model_mse_l", 1e-5), ("ref_mse_w", 1e-5)):
        expected = [row[key] for row in uncached_rows]
        assert [row[key] for row in cached_rows] == pytest.approx(expected, rel=tolerance), key
    expected_loss = [row["loss"] for row in uncached_rows]
    assert [row["loss"] for row in cached_rows] == pytest.approx(expected_loss, abs=1e-3)
    # The cache must match its resolution; the CLI writes an index.
    with pytest.raises(ValueError, match="built at resolution 16"):
        train(tiny(tmp_path, "wrong", data=str(tmp_path / "cache"), resolution=32))
    assert cache_main(["--output-dir", str(tmp_path / "cli-cache"), "--synthetic-pairs", "4"]) == 0
    assert (
        json.loads((tmp_path / "cli-cache" / "cache_index.json").read_text())["storage_dtype"]
        == "float16"
    )


def test_data_workers_change_nothing_but_speed(tmp_path):
    # Worker processes decode ahead of the step; the batches, so the losses, must not change.
    in_process = train(tiny(tmp_path, "workers0", max_steps=3, synthetic_pairs=8))["rows"]
    with_workers = train(tiny(tmp_path, "workers2", max_steps=3, synthetic_pairs=8, num_workers=2))[
        "rows"
    ]
    assert [row["loss"] for row in with_workers] == [row["loss"] for row in in_process]
    assert [row["epoch"] for row in with_workers] == [row["epoch"] for row in in_process]


def test_compile_traces_both_unets_and_changes_no_loss(tmp_path, monkeypatch):
    """--compile wraps the policy and the frozen reference in torch.compile; the losses equal
    the eager run's. (aot_eager: the same graphs as inductor, without its CPU code generation,
    which takes minutes on a 2-core machine.)"""
    compiled = []
    original = torch.compile

    def compile_with_aot_eager(module, **options):
        compiled.append((type(module).__name__, options.get("mode")))
        return original(module, backend="aot_eager")

    eager = train(tiny(tmp_path, "eager", max_steps=2, gradient_accumulation=1))
    monkeypatch.setattr(torch, "compile", compile_with_aot_eager)
    torch._dynamo.reset()
    try:
        fast = train(tiny(tmp_path, "compiled", max_steps=2, gradient_accumulation=1, compile=True))
    finally:
        torch._dynamo.reset()
    assert compiled == [("UNet2DConditionModel", None), ("UNet2DConditionModel", None)]
    for key in ("loss", "lambda", "model_mse_w", "grad_norm"):
        assert [row[key] for row in fast["rows"]] == pytest.approx(
            [row[key] for row in eager["rows"]], rel=1e-5
        ), key


@pytest.mark.parametrize("progress", [False, True])
def test_library_progress_bars_follow_no_progress(tmp_path, progress):
    # transformers' "Loading weights" bars (and diffusers', huggingface_hub's) are off under
    # --no-progress; on with --progress on rank 0.
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    config = config_from_args(
        ["--preset", "tiny", "--output-dir", str(tmp_path / "run"), "--max-steps", "1",
         *([] if progress else ["--no-progress"])]
    )  # fmt: skip
    train(config)
    assert transformers_logging.is_progress_bar_enabled() is progress
    assert diffusers_logging.is_progress_bar_enabled() is progress
    assert hub_utils.are_progress_bars_disabled() is not progress
