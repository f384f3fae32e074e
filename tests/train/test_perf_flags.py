"""Speed flags that must not change the maths: channels_last and the SDPA kernel choice (CUDA
graphs with gradient accumulation: test_cuda_graphs_accumulation.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainer_helpers import assert_same_up_to_reordering, read_rows, reordering_bound, tiny

from sdpo.train.config import TrainConfig, config_from_args
from sdpo.train.errors import UsageError
from sdpo.train.step import align_optimizer_state, attention_context, to_channels_last
from sdpo.train.trainer import train


def metric(output_dir: str, key: str) -> list[float]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)[key] for line in lines]


def assert_same_training(run: TrainConfig, baseline: TrainConfig) -> None:
    """fp32 on the CPU, the same maths summed in another order: the model errors agree to
    fp32 rounding (1e-5: ~80 ulps, measured 0 or 1); the loss and the gradient norm, which the
    margin's beta (5000) amplifies, within trainer_helpers.reordering_bound (the derivation)."""
    for key in ("model_mse_w", "model_mse_l"):
        torch.testing.assert_close(
            metric(run.output_dir, key), metric(baseline.output_dir, key), rtol=1e-5, atol=0
        )
    assert_same_up_to_reordering(
        read_rows(run.output_dir), read_rows(baseline.output_dir), baseline.beta
    )


def test_channels_last_changes_no_loss(tmp_path, monkeypatch):
    from sdpo.train import trainer

    converted = []

    def record(module, optimizer=None):
        to_channels_last(module, optimizer)
        converted.append(module)

    monkeypatch.setattr(trainer, "to_channels_last", record)
    plain = tiny(tmp_path, "plain", max_steps=3)
    train(plain)
    assert not converted
    nhwc = tiny(tmp_path, "nhwc", max_steps=3, channels_last=True)
    train(nhwc)
    # Not vacuous: the policy's convolutions really ran in NHWC.
    assert converted and converted[0].conv_in.weight.is_contiguous(
        memory_format=torch.channels_last
    )
    assert not converted[0].conv_in.weight.is_contiguous()
    assert_same_training(nhwc, plain)


def test_sdpa_math_kernel_changes_no_loss(tmp_path):
    plain = tiny(tmp_path, "plain", max_steps=2)
    pinned = tiny(tmp_path, "math", max_steps=2, attention="sdpa-math")
    train(plain)
    train(pinned)
    assert_same_training(pinned, plain)


def test_attention_context_pins_the_kernel():
    query = torch.randn(1, 2, 8, 16)
    with attention_context("sdpa-math"):
        torch.nn.functional.scaled_dot_product_attention(query, query, query)
    # The memory-efficient kernel has no CPU implementation: pinned to it, SDPA cannot run.
    with attention_context("sdpa-efficient"), pytest.raises(RuntimeError):
        torch.nn.functional.scaled_dot_product_attention(query, query, query)


def test_gpu_only_attention_kernels_are_refused_on_the_cpu():
    if torch.cuda.is_available():
        pytest.skip("on a GPU sdpa-efficient is valid")
    with pytest.raises(UsageError, match="attention: sdpa-efficient needs a CUDA device"):
        config_from_args(["--preset", "tiny", "--attention", "sdpa-efficient"])


def adamw_pair():
    torch.manual_seed(0)
    moved, kept = torch.nn.Conv2d(4, 8, 3), torch.nn.Conv2d(4, 8, 3)
    kept.load_state_dict(moved.state_dict())
    optimizers = [
        torch.optim.AdamW(module.parameters(), lr=0.1, fused=True) for module in (moved, kept)
    ]
    inputs = torch.randn(2, 4, 9, 9)

    def step():
        for module, optimizer in zip((moved, kept), optimizers, strict=True):
            module(inputs).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()

    return moved, kept, optimizers[0], step


def test_channels_last_after_the_first_step_moves_the_optimizer_state_too():
    moved, kept, optimizer, step = adamw_pair()
    step()  # the moments exist, in the contiguous layout
    to_channels_last(moved, optimizer)
    step()
    torch.testing.assert_close(moved.weight, kept.weight, rtol=1e-6, atol=1e-6)


def test_a_state_loaded_in_another_layout_is_aligned():
    moved, kept, optimizer, step = adamw_pair()
    step()
    saved = optimizer.state_dict()
    moved.to(memory_format=torch.channels_last)
    optimizer.load_state_dict(saved)  # as on resume: moments contiguous, weights NHWC
    align_optimizer_state(optimizer)
    step()
    torch.testing.assert_close(moved.weight, kept.weight, rtol=1e-6, atol=1e-6)


def test_the_reordering_bound_still_catches_a_one_percent_scaling():
    # A row as the tiny preset logs it at step 3 (values from a run), and the same row with
    # the loss or the gradient norm off by what a real bug moves them by.
    row = {"step": 3, "loss": 0.7144, "grad_norm": 2382.5, "margin": -0.0338}
    row |= {"model_mse_w": 1.1264, "model_mse_l": 1.1302}
    beta = TrainConfig().beta
    assert 1.5e-3 < reordering_bound(row, beta) < 2e-3  # 2500 x 4 x 3 x 1.19e-7 x 0.51
    assert_same_up_to_reordering([{**row, "grad_norm": row["grad_norm"] * 1.001}], [row], beta)
    for change in ({"grad_norm": row["grad_norm"] * 1.01}, {"loss": row["loss"] + 1e-2}):
        with pytest.raises(AssertionError):
            assert_same_up_to_reordering([{**row, **change}], [row], beta)
