"""Invariants of a trainer that trains, checked against independently built expectations.

Every expectation here is rebuilt outside the trainer: the batch from the documented keys
(epoch order from (seed, 1, epoch), flips and caption dropout from (seed, 2, epoch, rank,
batch), the latent sample, noise and timestep draws from (seed, 3, rank, micro-batch index), in
that order), the noisy latents with diffusers' ``DDPMScheduler.add_noise``, the policy from the
previous step's checkpoint file and the reference from the initial weights. The trainer is only
driven through ``train(config)`` and read through ``metrics.jsonl`` and its checkpoint folders.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file
from trainer_helpers import read_rows, tiny

import sdpo
from sdpo.train import checkpoint as checkpoints
from sdpo.train.config import TrainConfig, config_from_args
from sdpo.train.data import generator_for, load_records, preprocess
from sdpo.train.models import add_lora, build_tiny, save_tiny_pretrained
from sdpo.train.trainer import train


def checkpoint_weights(output_dir: str | Path, step: int) -> dict[str, torch.Tensor]:
    folder = Path(output_dir) / f"checkpoint-{step}"
    assert (folder / "COMPLETE").is_file(), f"{folder} is not a complete checkpoint"
    return load_file(str(folder / "unet_state.safetensors"))


class Oracle:
    """The tiny preset's step, rebuilt by hand for rank 0 of 1 process."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        initial = build_tiny(config.resolution, config.seed)
        self.initial_unet = initial.unet.eval()
        self.vae = initial.vae.eval()
        self.tokenizer = initial.text.tokenizers[0]
        self.encoder = initial.text.encoders[0].eval()
        # The tiny preset's schedule is SD1.5's; a fresh diffusers scheduler, not the trainer's.
        self.scheduler = DDPMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
        )
        self.records = load_records(
            None,
            resolution=config.resolution,
            synthetic_pairs=config.synthetic_pairs,
            seed=config.seed,
        )

    def policy_after(self, step: int, weights: dict[str, torch.Tensor] | None = None):
        unet = copy.deepcopy(self.initial_unet)
        if self.config.lora_rank:
            add_lora(unet, self.config.lora_rank)
        if step > 0:
            unet.load_state_dict(weights or checkpoint_weights(self.config.output_dir, step))
        return unet

    def inputs(self, micro_index: int):
        """(noisy latents 2B, timesteps 2B, hidden states 2B, noise B) of one micro-batch."""
        config = self.config
        pairs = config.train_batch_pairs
        per_epoch = len(self.records) // pairs
        epoch, batch_index = divmod(micro_index, per_epoch)
        order = torch.randperm(len(self.records), generator=generator_for(config.seed, 1, epoch))
        chosen = order[batch_index * pairs : (batch_index + 1) * pairs].tolist()
        draws = torch.rand(
            (pairs, 3), generator=generator_for(config.seed, 2, epoch, 0, batch_index)
        )
        winners, losers, captions = [], [], []
        for row, index in enumerate(chosen):
            record = self.records[index]
            winners.append(preprocess(record.winner, config.resolution, bool(draws[row, 0] < 0.5)))
            losers.append(preprocess(record.loser, config.resolution, bool(draws[row, 1] < 0.5)))
            dropped = bool(draws[row, 2] < config.caption_dropout)
            captions.append("" if dropped else record.caption)
        generator = generator_for(config.seed, 3, 0, micro_index)
        with torch.no_grad():
            distribution = self.vae.encode(torch.stack(winners + losers)).latent_dist
            sample = torch.randn(distribution.mean.shape, generator=generator)
            latents = (
                distribution.mean + distribution.std * sample
            ) * self.vae.config.scaling_factor
            tokens = self.tokenizer(
                captions,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            hidden = self.encoder(tokens).last_hidden_state
        noise = torch.randn((pairs, *latents.shape[1:]), generator=generator)
        timesteps = torch.randint(0, 1000, (pairs,), generator=generator)
        both = torch.cat([timesteps, timesteps])
        noisy = self.scheduler.add_noise(latents, torch.cat([noise, noise]), both)
        return noisy, both, torch.cat([hidden, hidden]), noise

    def loss(self, policy, micro_index: int, reference=None) -> sdpo.PreferenceLoss:
        config = self.config
        noisy, timesteps, hidden, noise = self.inputs(micro_index)
        reference = reference if reference is not None else self.initial_unet
        with torch.no_grad():
            ref_pred = reference(noisy, timesteps, hidden).sample
        model_pred = policy(noisy, timesteps, hidden).sample
        return sdpo.preference_loss(
            model_pred,
            ref_pred,
            noise,
            method=config.method,
            beta=config.beta,
            mu=config.mu,
            granularity=config.granularity,
            dmpo_alpha=config.dmpo_alpha,
            backend="torch",
        )

    def step_losses(self, policy, step: int, reference=None) -> list[sdpo.PreferenceLoss]:
        """The micro-batch losses of optimizer step ``step`` (1-based)."""
        accumulation = self.config.gradient_accumulation
        return [
            self.loss(policy, (step - 1) * accumulation + micro, reference)
            for micro in range(accumulation)
        ]


def mean_stat(results: list[sdpo.PreferenceLoss], key: str) -> float:
    values = [
        float(result.loss.detach()) if key == "loss" else float(result.stats[key].float().mean())
        for result in results
    ]
    return sum(values) / len(values)


def warmup_lr(base: float, warmup: int, steps_done: int) -> float:
    """diffusers' constant_with_warmup, written from its definition: base x min(1, n / warmup)."""
    return base * (min(1.0, steps_done / warmup) if warmup else 1.0)


def test_reference_frozen_margin_leaves_zero_and_loss_matches_an_independent_step(tmp_path):
    # Tiny preset: 2 pairs x 2 accumulated micro-batches, warmup 2 (step 1 runs at lr 0, step 2
    # at half the rate), caption dropout 0.2. Step 3 is the first whose policy has moved.
    # Steps 1-2 still check the inputs: model_mse_w / model_mse_l depend on every draw.
    # 8 pairs: 4 micro-batches an epoch, so step 3 reads epoch 1 (a new order).
    config = tiny(tmp_path, max_steps=3, checkpoint_every=1, learning_rate=1e-3, synthetic_pairs=8)
    rows = train(config)["rows"]
    oracle = Oracle(config)
    assert [row["step"] for row in rows] == [1, 2, 3]
    for step, row in enumerate(rows, start=1):
        with torch.no_grad():
            expected = oracle.step_losses(oracle.policy_after(step - 1), step)
        # implicit_acc is 1[u > 0]: at u = 0 (steps 1-2) it reads fp32 rounding, so step 3 only.
        keys = ("loss", "margin", "lambda", "model_mse_w", "model_mse_l")
        for key in (*keys, "implicit_acc") if step == 3 else keys:
            # u carries beta = 5000 times an fp32 MSE difference: ~1e-4 of rounding between
            # two forward passes of the same weights; the loss moves by half of that.
            tolerance = {"margin": 1e-3, "loss": 5e-4}.get(key, 1e-6)
            expected_value = mean_stat(expected, key)
            assert row[key] == pytest.approx(expected_value, rel=1e-4, abs=tolerance), (step, key)
        assert row["lr"] == pytest.approx(warmup_lr(1e-3, 2, step), rel=1e-6)
    # Policy = reference until the first step with a positive rate has been applied (step 2).
    assert rows[0]["margin"] == pytest.approx(0.0, abs=1e-3)
    assert abs(rows[2]["margin"]) > 0.1, rows[2]["margin"]
    # The reference (the initial weights) never changed while the policy did.
    initial = oracle.initial_unet.state_dict()
    final = torch.load(Path(config.output_dir) / "unet.pth")
    assert any(not torch.equal(final[name], initial[name]) for name in initial)


def test_lora_reference_is_the_base_with_adapters_disabled(tmp_path):
    config = tiny(
        tmp_path,
        lora_rank=4,
        max_steps=3,
        checkpoint_every=1,
        gradient_accumulation=1,
        learning_rate=1e-2,
        warmup_steps=0,
    )
    rows = train(config)["rows"]
    oracle = Oracle(config)
    base = oracle.initial_unet.state_dict()
    for step, row in enumerate(rows, start=1):
        policy = oracle.policy_after(step - 1)
        if step > 1:
            # The frozen base weights in the checkpoint are the initial ones.
            for name, tensor in policy.state_dict().items():
                if ".lora_" not in name:
                    assert torch.equal(tensor, base[name.replace(".base_layer.", ".")]), name
        with torch.no_grad():
            expected = oracle.step_losses(policy, step)  # reference: the plain initial UNet
            policy.disable_adapters()
            disabled = oracle.step_losses(policy, step, reference=policy)
        assert row["margin"] == pytest.approx(mean_stat(expected, "margin"), rel=1e-4, abs=1e-3)
        assert row["loss"] == pytest.approx(mean_stat(expected, "loss"), rel=1e-4, abs=5e-4)
        # Adapters off: the policy is the reference, so u = 0.
        assert mean_stat(disabled, "margin") == pytest.approx(0.0, abs=1e-3)
    assert abs(rows[-1]["margin"]) > 0.1, rows[-1]["margin"]


def flat_gradient(policy, losses: list[sdpo.PreferenceLoss]) -> dict[str, torch.Tensor]:
    mean_loss = torch.stack([result.loss for result in losses]).mean()
    named = [(name, p) for name, p in policy.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(mean_loss, [p for _, p in named])
    return {name: grad for (name, _), grad in zip(named, grads, strict=True)}


def test_accumulated_gradient_clip_and_update_match_an_independent_gradient(tmp_path):
    # AdamW with beta1 = beta2 = 0 and no weight decay makes one update exactly
    # -lr * g / (|g| + eps) per element, so the checkpoints reveal the gradient g the trainer
    # applied: the mean of the two micro-batch gradients, clipped to max_grad_norm.
    settings = dict(
        max_steps=2,
        checkpoint_every=1,
        warmup_steps=0,
        learning_rate=1e-2,
        adam_beta1=0.0,
        adam_beta2=0.0,
        adam_epsilon=1.0,
        weight_decay=0.0,
    )
    probe = Oracle(tiny(tmp_path, "probe", **settings))
    start = copy.deepcopy(probe.initial_unet)
    first = flat_gradient(start, probe.step_losses(start, 1))
    first_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in first.values()])))
    # Clip at half the first step's gradient norm: the clip is active on step 1.
    config = tiny(tmp_path, max_grad_norm=0.5 * first_norm, **settings)
    rows = train(config)["rows"]
    oracle = Oracle(config)
    for step, row in enumerate(rows, start=1):
        before = oracle.policy_after(step - 1)
        after = checkpoint_weights(config.output_dir, step)
        losses = oracle.step_losses(before, step)
        gradient = flat_gradient(before, losses)
        norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in gradient.values()])))
        assert row["grad_norm"] == pytest.approx(norm, rel=1e-3), step
        assert row["loss"] == pytest.approx(mean_stat(losses, "loss"), rel=1e-4, abs=5e-4)
        scale = min(1.0, config.max_grad_norm / (norm + 1e-6))
        if step == 1:
            assert scale < 0.6
        for name, grad in gradient.items():
            clipped = grad * scale
            expected = -config.learning_rate * clipped / (clipped.abs() + config.adam_epsilon)
            moved = after[name] - before.state_dict()[name]
            # beta = 5000 times a winner-minus-loser difference cancels digits: the two fp32
            # gradients agree to ~0.2% of the largest element (measured), a mutant is off by 2x.
            bound = 5e-3 * float(expected.abs().max()) + 1e-7
            torch.testing.assert_close(
                moved,
                expected,
                rtol=2e-3,
                atol=bound,
                msg=lambda text, n=name, s=step: f"{s} {n}: {text}",
            )


def write_manifest(folder: Path, pairs: int = 4) -> Path:
    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True)
    lines = []
    for index in range(pairs):
        Image.new("RGB", (20, 24), (200, 30 + 20 * index, 30)).save(images / f"w{index}.png")
        Image.new("RGB", (20, 24), (30, 30, 200 - 20 * index)).save(images / f"l{index}.png")
        row = {"caption": f"a red square {index}", "winner": f"images/w{index}.png"}
        lines.append(json.dumps({**row, "loser": f"images/l{index}.png"}))
    manifest = folder / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.mark.parametrize(
    "preset", ["sd15-dpo", "sd15-dspo", "sd15-dmpo", "sdxl-dpo", "sdxl-dspo", "sdxl-dmpo"]
)
def test_every_preset_tiny_variant_trains(tmp_path, preset):
    # The preset's method, beta, mu, optimizer, accumulation, LR scaling and warmup schedule on
    # a miniature of its architecture; only sizes, step counts and the base rate are overridden.
    folder = tmp_path / "model"
    if preset.startswith("sd15"):
        save_tiny_pretrained(build_tiny(16, 0), str(folder))
    else:
        from test_trainer import save_tiny_sdxl

        save_tiny_sdxl(folder)
    manifest = write_manifest(tmp_path / "data")
    output = tmp_path / "run"
    argv = ["--preset", preset, "--pretrained", str(folder), "--data", str(manifest)]
    argv += ["--output-dir", str(output), "--resolution", "16", "--train-batch-pairs", "2"]
    argv += ["--gradient-accumulation", "2", "--max-steps", "2", "--warmup-steps", "2"]
    argv += ["--learning-rate", "1e-4", "--checkpoint-every", "0", "--mixed-precision", "no"]
    config = config_from_args([*argv, "--no-progress"])
    assert config.scale_lr  # the preset's rate is per pair: x 4 pairs per optimizer step here
    rows = train(config)["rows"]
    base = 1e-4 * 2 * 2
    assert [row["lr"] for row in rows] == pytest.approx([warmup_lr(base, 2, n) for n in (1, 2)])
    assert all(math.isfinite(row["loss"]) for row in rows)
    from diffusers import UNet2DConditionModel

    initial = UNet2DConditionModel.from_pretrained(folder / "unet").state_dict()
    final = torch.load(output / "unet.pth")
    changed = [name for name in initial if not torch.equal(initial[name], final[name])]
    assert len(changed) > len(initial) // 2, f"{preset}: only {len(changed)} tensors moved"


class InjectedFault(OSError):
    pass


def inject_fault(monkeypatch, marker: str, fail_at: int, truncate: bool) -> dict:
    """Makes the ``fail_at``-th file operation on a path containing ``marker`` fail: with
    ``truncate`` the file is written, cut to half its size, then the writer raises (a kill
    during the write); otherwise it raises before writing."""
    calls = {"count": 0}

    def guarded(original, path_of):
        def wrapper(*args, **kwargs):
            path = str(path_of(*args, **kwargs))
            if marker in path:
                calls["count"] += 1
                if calls["count"] == fail_at:
                    if truncate and Path(path).parent.is_dir():
                        original(*args, **kwargs)
                        if Path(path).is_file():
                            size = Path(path).stat().st_size
                            os.truncate(path, size // 2)
                    raise InjectedFault(f"injected failure writing {path}")
            return original(*args, **kwargs)

        return wrapper

    import safetensors.torch

    # The trainer hands torch.save an open file (sdpo.train.outputs.save_torch): its name.
    torch_save_target = lambda obj, f, *a, **k: getattr(f, "name", f)  # noqa: E731
    monkeypatch.setattr(torch, "save", guarded(torch.save, torch_save_target))
    save_file = guarded(safetensors.torch.save_file, lambda tensors, filename, *a, **k: filename)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(checkpoints, "save_file", save_file, raising=False)
    monkeypatch.setattr(os, "replace", guarded(os.replace, lambda src, dst: dst))
    monkeypatch.setattr(os, "rename", guarded(os.rename, lambda src, dst: dst))
    monkeypatch.setattr(Path, "write_text", guarded(Path.write_text, lambda self, *a, **k: self))
    monkeypatch.setattr(Path, "rename", guarded(Path.rename, lambda self, target: target))
    return calls


@pytest.mark.parametrize(("fail_at", "truncate"), [(1, True), (2, True), (3, False), (4, False)])
def test_a_save_that_fails_part_way_leaves_the_previous_checkpoint_for_resume(
    tmp_path, monkeypatch, fail_at, truncate
):
    settings = dict(max_steps=4, checkpoint_every=1, synthetic_pairs=8, learning_rate=1e-3)
    full = tiny(tmp_path, "full", **settings)
    train(full)
    crashed = tiny(tmp_path, "crashed", **settings)
    with monkeypatch.context() as patch:
        calls = inject_fault(patch, "checkpoint-3", fail_at, truncate)
        # The writer's error, as is or as the cause of the trainer's CheckpointError.
        with pytest.raises((checkpoints.CheckpointError, InjectedFault)) as raised:
            train(crashed)
    causes, error = [], raised.value
    while error is not None:
        causes.append(type(error))
        error = error.__cause__
    assert InjectedFault in causes
    assert calls["count"] == fail_at
    assert checkpoints.latest_checkpoint(crashed.output_dir).name == "checkpoint-2"
    resumed = tiny(tmp_path, "crashed", resume=True, **settings)
    train(resumed)
    full_rows, resumed_rows = read_rows(full.output_dir), read_rows(resumed.output_dir)
    assert [row["step"] for row in resumed_rows] == [1, 2, 3, 4]
    for key in ("loss", "margin", "lambda", "lr", "grad_norm", "epoch"):
        assert [row[key] for row in resumed_rows] == [row[key] for row in full_rows], key
    full_weights = torch.load(Path(full.output_dir) / "unet.pth")
    resumed_weights = torch.load(Path(resumed.output_dir) / "unet.pth")
    assert all(torch.equal(full_weights[name], resumed_weights[name]) for name in full_weights)
