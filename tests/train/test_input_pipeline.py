"""The input pipeline: default data workers, pinned batches, non-blocking per-step copies."""

from __future__ import annotations

import torch

from sdpo.train.cache import CachedBatch
from sdpo.train.data import Batch, PairBatches, batch_stream, default_num_workers, load_records
from sdpo.train.models import build_tiny
from sdpo.train.step import condition_batch


def test_default_workers_follow_the_cpus_and_skip_where_nothing_is_decoded():
    assert default_num_workers("pairs.jsonl", False, world_size=1, cpus=16) == 8
    assert default_num_workers("pairs.jsonl", False, world_size=4, cpus=16) == 3
    assert default_num_workers("pairs.jsonl", False, world_size=8, cpus=8) == 0
    assert default_num_workers(None, False, world_size=1, cpus=16) == 0  # synthetic
    assert default_num_workers("cache", True, world_size=1, cpus=16) == 0  # latents
    # Decoding real images pays even for the tiny model (measured: 10.4 -> 15.9 pairs/s).
    assert default_num_workers("pairs.jsonl", False, world_size=1, cpus=2) == 1


def test_the_trainer_uses_the_default_unless_given(tmp_path, monkeypatch):
    from sdpo.train import trainer
    from sdpo.train.config import config_from_args
    from sdpo.train.distributed import Distributed

    seen = []
    real_stream = trainer.batch_stream

    def spy(batches, start, num_workers, pin_memory=False):
        seen.append(num_workers)
        return real_stream(batches, start, num_workers, pin_memory)

    monkeypatch.setattr(trainer, "batch_stream", spy)
    monkeypatch.setattr(trainer, "default_num_workers", lambda *args: 1)
    for flags, expected in (([], 1), (["--num-workers", "0"], 0)):
        output = tmp_path / f"run{len(flags)}"
        config = config_from_args(
            [
                "--preset",
                "tiny",
                "--max-steps",
                "1",
                "--no-progress",
                "--output-dir",
                str(output),
                *flags,
            ]
        )
        trainer.Trainer(config, Distributed()).fit()
        assert seen[-1] == expected


def test_more_workers_than_cpus_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    """An explicit --num-workers above the CPUs this process may use is a one-line error (a
    typo such as 100000 had sdpo-train fork until the machine stalled); equal is taken."""
    import subprocess
    import sys

    import pytest

    from sdpo.train import config as config_module
    from sdpo.train.errors import UsageError

    config_module.check_num_workers(4, cpus=4)
    with pytest.raises(UsageError, match=r"--num-workers 5: this process may use 4 CPUs.*or fewer"):
        config_module.check_num_workers(5, cpus=4)

    too_many = str(config_module.available_cpus() + 1)
    command = [sys.executable, "-m", "sdpo.train", "--preset", "tiny", "--max-steps", "1"]
    output = tmp_path / "run"
    run = subprocess.run(
        [*command, "--output-dir", str(output), "--num-workers", too_many],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"sdpo-train: error: --num-workers {too_many}: this process may use" in run.stderr
    assert "leave it out for the default" in run.stderr
    assert not output.exists()  # refused before the output folder or any model was made

    from sdpo.train.cache_cli import main as cache_main

    with pytest.raises(SystemExit) as exit_info:
        cache_main(["--output-dir", str(tmp_path / "cache"), "--num-workers", too_many])
    assert exit_info.value.code == 2 and not (tmp_path / "cache").exists()


class FakePinned:
    """Records the tensors pinned (a CPU-only build cannot page-lock memory)."""

    def __init__(self, monkeypatch) -> None:
        self.pinned: list[torch.Tensor] = []

        def pin_memory(tensor, *args, **kwargs):
            copy = tensor.clone()
            self.pinned.append(copy)
            return copy

        monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)


def synthetic_batches() -> PairBatches:
    records = load_records(None, resolution=16, synthetic_pairs=8, seed=0)
    return PairBatches(records, batch_pairs=2, resolution=16, caption_dropout=0.2, seed=0)


def test_pinned_batches_carry_the_same_values(monkeypatch):
    plain = batch_stream(synthetic_batches(), (0, 0), 0, pin_memory=False)
    fake = FakePinned(monkeypatch)
    pinned = batch_stream(synthetic_batches(), (0, 0), 0, pin_memory=True)
    for _ in range(5):
        (epoch, index, batch), (pinned_epoch, pinned_index, pinned_batch) = (
            next(plain),
            next(pinned),
        )
        assert (epoch, index) == (pinned_epoch, pinned_index)
        assert torch.equal(batch.winners, pinned_batch.winners)
        assert torch.equal(batch.losers, pinned_batch.losers)
        assert batch.captions == pinned_batch.captions
        assert any(pinned_batch.winners is tensor for tensor in fake.pinned)
        assert any(pinned_batch.losers is tensor for tensor in fake.pinned)


def test_cached_batches_pin_every_tensor(monkeypatch):
    fake = FakePinned(monkeypatch)
    batch = CachedBatch(
        latent_mean=torch.randn(4, 4, 2, 2),
        latent_std=torch.rand(4, 4, 2, 2),
        hidden=torch.randn(2, 3, 8),
        pooled=torch.randn(2, 5),
        captions=["a", "b"],
    )
    pinned = batch.pin_memory()  # what the DataLoader's pin thread calls
    assert len(fake.pinned) == 4 and pinned.captions == ["a", "b"]
    for name in ("latent_mean", "latent_std", "hidden", "pooled"):
        assert torch.equal(getattr(pinned, name), getattr(batch, name))
    image_batch = Batch(torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4), ["a", "b"], 0)
    assert torch.equal(image_batch.pin_memory().losers, image_batch.losers)
    assert len(fake.pinned) == 6


def test_cached_step_inputs_are_copied_non_blocking(monkeypatch):
    """Every per-step host->device copy of a cached batch is non-blocking (a blocking copy
    waits for the GPU's queued work)."""
    models = build_tiny(16, seed=0)
    batch = CachedBatch(
        latent_mean=torch.randn(4, 4, 2, 2),
        latent_std=torch.rand(4, 4, 2, 2),
        hidden=torch.randn(2, 77, 32),
        pooled=None,
        captions=["a", "b"],
    )
    calls = []
    real_to = torch.Tensor.to

    def recording_to(tensor, *args, **kwargs):
        calls.append(kwargs.get("non_blocking", False))
        return real_to(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    condition_batch(models, batch, torch.Generator().manual_seed(0), torch.device("cpu"))
    monkeypatch.undo()
    assert len(calls) >= 3 and all(calls)


def test_sdxl_time_ids_are_built_once_per_device():
    models = build_tiny(16, seed=0)
    text = models.text
    text.sdxl = True
    hidden = torch.randn(2, 77, 32)
    first = text.conditioning(hidden, torch.randn(2, 8))[1]["time_ids"]
    second = text.conditioning(hidden, torch.randn(2, 8))[1]["time_ids"]
    assert first.data_ptr() == second.data_ptr()  # the same device tensor, not a new copy
    assert first.tolist() == [[text.resolution, text.resolution, 0, 0] + [text.resolution] * 2] * 2


class FakeCudaCopies:
    """Pretends ``cuda`` is a device on a CPU-only build: a copy there is recorded (its source
    tensor and ``non_blocking``) and stays on the CPU, so the step's code runs as on a GPU."""

    def __init__(self, monkeypatch, fake: FakePinned) -> None:
        self.copies: list[tuple[torch.Tensor, bool]] = []
        real_to = torch.Tensor.to

        def to(tensor, *args, **kwargs):
            target = kwargs.get("device", args[0] if args else None)
            if isinstance(target, (str, torch.device)) and torch.device(target).type == "cuda":
                self.copies.append((tensor, kwargs.get("non_blocking", False)))
                args = ("cpu", *args[1:]) if args else args
                kwargs = {**kwargs, "device": "cpu"} if "device" in kwargs else kwargs
            return real_to(tensor, *args, **kwargs)

        def is_pinned(tensor, *args, **kwargs):
            base = tensor if tensor._base is None else tensor._base
            return any(base is pinned for pinned in fake.pinned)

        real_randn = torch.randn

        def randn(*args, **kwargs):  # the step's draws on "cuda": here on the CPU
            if torch.device(kwargs.get("device") or "cpu").type == "cuda":
                kwargs["device"] = "cpu"
            return real_randn(*args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", to)
        monkeypatch.setattr(torch.Tensor, "is_pinned", is_pinned)
        monkeypatch.setattr(torch, "randn", randn)

    def assert_all_async_from_pinned(self) -> None:
        assert self.copies, "no host->device copy was recorded"
        for source, non_blocking in self.copies:
            assert non_blocking, f"a blocking copy of {tuple(source.shape)}"
            assert source.is_pinned(), f"a copy of {tuple(source.shape)} from pageable memory"


def test_online_step_copies_only_pinned_memory_without_blocking(monkeypatch):
    """Uncached micro-step: the pixels (pinned by the loader) and the token ids go to the device
    from page-locked memory, non-blocking. A pageable source (a host-side torch.cat of the pinned
    winners and losers, the tokenizer's fresh tensor) makes CUDA stage it on the host thread."""
    models = build_tiny(16, seed=0)
    fake = FakePinned(monkeypatch)
    batch = Batch(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16), ["a red", "b"], 0)
    pinned = batch.pin_memory()  # what the DataLoader's pin thread hands the step
    copies = FakeCudaCopies(monkeypatch, fake)
    latents, hidden, _ = condition_batch(
        models, pinned, torch.Generator().manual_seed(0), torch.device("cuda")
    )
    copies.assert_all_async_from_pinned()
    monkeypatch.undo()
    # The same values as the plain CPU step.
    expected = condition_batch(models, batch, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(latents, expected[0]) and torch.equal(hidden, expected[1])


def test_cached_step_copies_only_pinned_memory_without_blocking(monkeypatch):
    models = build_tiny(16, seed=0)
    models.text.sdxl = True  # the pooled embedding too
    fake = FakePinned(monkeypatch)
    batch = CachedBatch(
        latent_mean=torch.randn(4, 4, 2, 2),
        latent_std=torch.rand(4, 4, 2, 2),
        hidden=torch.randn(2, 77, 32),
        pooled=torch.randn(2, 8),
        captions=["a", "b"],
    ).pin_memory()
    copies = FakeCudaCopies(monkeypatch, fake)
    condition_batch(models, batch, torch.Generator().manual_seed(0), torch.device("cuda"))
    assert len(copies.copies) == 4
    copies.assert_all_async_from_pinned()
