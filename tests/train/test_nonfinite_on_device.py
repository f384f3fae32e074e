"""A non-finite optimizer step is skipped on the device and read with the logged metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainer_helpers import tiny

import sdpo
from sdpo.train import checkpoint as checkpoints
from sdpo.train.config import TrainConfig
from sdpo.train.optim import make_lr_schedule, make_optimizer
from sdpo.train.step import apply_optimizer_step, clip_and_check_gradients, skips_on_device
from sdpo.train.trainer import NonFiniteLoss, train


def optimizer_after_one_step(name: str):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    config = TrainConfig(optimizer=name, learning_rate=1e-2)
    parameters = list(model.parameters())
    optimizer = make_optimizer(config, parameters, 1e-2, torch.device("cpu"))
    schedule = make_lr_schedule(optimizer, 0)
    model(torch.randn(2, 4)).sum().backward()
    _, finite = clip_and_check_gradients(parameters, 1.0, torch.tensor(1.0), None)
    apply_optimizer_step(optimizer, schedule, finite)
    return model, parameters, optimizer, schedule


def snapshot(parameters, optimizer) -> tuple[list[torch.Tensor], dict]:
    state = {
        id(parameter): {
            key: value.clone() if torch.is_tensor(value) else value
            for key, value in optimizer.state[parameter].items()
        }
        for parameter in parameters
    }
    return [parameter.detach().clone() for parameter in parameters], state


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_an_injected_inf_leaves_weights_and_optimizer_state_bit_identical(name):
    model, parameters, optimizer, schedule = optimizer_after_one_step(name)
    weights, state = snapshot(parameters, optimizer)
    (model(torch.randn(2, 4)).sum() * float("inf")).backward()
    _, finite = clip_and_check_gradients(parameters, 1.0, torch.tensor(1.0), None)
    assert finite.dim() == 0 and finite.dtype == torch.bool and not bool(finite)
    returned = apply_optimizer_step(optimizer, schedule, finite)
    assert returned is finite
    for before, parameter in zip(weights, parameters, strict=True):
        assert torch.equal(before, parameter.detach())
        assert parameter.grad is None
    for parameter in parameters:
        for key, value in state[id(parameter)].items():
            after = optimizer.state[parameter][key]
            assert torch.equal(value, after) if torch.is_tensor(value) else value == after
    # A finite step afterwards updates again: the skip is per step, not sticky.
    model(torch.randn(2, 4)).sum().backward()
    _, finite = clip_and_check_gradients(parameters, 1.0, torch.tensor(1.0), None)
    apply_optimizer_step(optimizer, schedule, finite)
    assert not torch.equal(weights[0], parameters[0].detach())


def test_adamw_skips_on_the_device_through_found_inf():
    _, parameters, optimizer, schedule = optimizer_after_one_step("adamw")
    assert skips_on_device(optimizer)
    # The flag is never turned into a Python bool on the AdamW path (no host sync).
    flag = torch.zeros((), dtype=torch.bool)

    class NoHostRead(torch.Tensor):
        def __bool__(self):
            raise AssertionError("the finite flag was read on the host")

    for parameter in parameters:
        parameter.grad = torch.ones_like(parameter)
    apply_optimizer_step(optimizer, schedule, flag.as_subclass(NoHostRead))


def poison_loss(monkeypatch, bad_calls: set[int]) -> dict:
    calls = {"count": 0}
    real_loss = sdpo.preference_loss

    def poisoned(*args, **kwargs):
        calls["count"] += 1
        result = real_loss(*args, **kwargs)
        if calls["count"] in bad_calls:
            return sdpo.PreferenceLoss(result.loss * float("inf"), result.stats)
        return result

    monkeypatch.setattr(sdpo, "preference_loss", poisoned)
    return calls


def test_stop_comes_at_the_next_log_read_before_anything_is_written(tmp_path, monkeypatch):
    config = tiny(tmp_path, max_steps=6, log_every=3, gradient_accumulation=1)
    calls = poison_loss(monkeypatch, {1})
    with pytest.raises(NonFiniteLoss, match=r"step 1:.*none \(no checkpoint"):
        train(config)
    # Steps 2 and 3 ran before the read at step 3 (log_every - 1 = 2 steps late, at most).
    assert calls["count"] == 3
    output = Path(config.output_dir)
    assert not (output / "metrics.jsonl").exists() or not (output / "metrics.jsonl").read_text()
    assert checkpoints.latest_checkpoint(output) is None


def test_skip_drops_the_step_and_finishes_with_finite_weights(tmp_path, monkeypatch, capsys):
    # One skipped step of 4 is above the default --max-skipped-fraction: allow it here.
    config = tiny(tmp_path, max_steps=4, log_every=2, on_nonfinite="skip", max_skipped_fraction=0.5)
    # Tiny preset: 2 micro-batches per step; call 3 is step 2's first micro-batch.
    poison_loss(monkeypatch, {3})
    summary = train(config)
    assert summary["steps"] == 4
    rows = summary["rows"]
    assert [row["step"] for row in rows] == [2, 4]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    assert all(torch.isfinite(torch.tensor(row["grad_norm"])) for row in rows)
    exported = checkpoints.latest_checkpoint(Path(config.output_dir))
    model_state, _ = checkpoints.load_checkpoint(exported)
    assert all(torch.isfinite(tensor).all() for tensor in model_state.values())


def test_fp16_loss_scaling_changes_nothing_in_fp32(tmp_path):
    """On the CPU the step runs fp32, and scaling by a power of two is exact: the fp16 path
    (scale, unscale, device-side skip, update) must reproduce the unscaled run bit for bit."""
    plain = tiny(tmp_path / "plain", max_steps=3, mixed_precision="no")
    scaled = tiny(tmp_path / "scaled", max_steps=3, mixed_precision="fp16")
    plain_rows, scaled_rows = train(plain)["rows"], train(scaled)["rows"]
    assert [row["loss"] for row in scaled_rows] == [row["loss"] for row in plain_rows]
    assert [row["grad_norm"] for row in scaled_rows] == [row["grad_norm"] for row in plain_rows]


def test_fp16_overflow_is_skipped_and_the_scale_halves_without_stopping(tmp_path, monkeypatch):
    from sdpo.train import trainer as trainer_module

    scalers = []

    def huge_scale(device, mixed_precision):
        # 2**120: the scaled gradients overflow fp32 on the first step (measured), the loss never
        # does; the later steps update (a run of nothing but overflows is an error).
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0**120)
        scalers.append(scaler)
        return scaler

    monkeypatch.setattr(trainer_module, "make_grad_scaler", huge_scale)
    config = tiny(tmp_path, max_steps=4, mixed_precision="fp16", on_nonfinite="stop")
    summary = train(config)  # an overflow is routine: no NonFiniteLoss
    assert summary["steps"] == 4
    assert scalers[0].get_scale() == 2.0**119  # halved on the device after the overflow
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in summary["rows"])
    model_state, _ = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(config.output_dir))
    assert all(torch.isfinite(tensor).all() for tensor in model_state.values())


def nan_gradient_scaler(monkeypatch, **scaler_options) -> list[torch.amp.GradScaler]:
    """fp16 runs whose backward leaves a NaN in the first weight's gradient on every step, the
    loss finite (a bug in a backward, not an overflow): the scaler meets it when it unscales."""
    from sdpo.train import trainer as trainer_module

    class NanGradientScaler(torch.amp.GradScaler):
        def unscale_(self, optimizer):
            optimizer.param_groups[0]["params"][0].grad.fill_(float("nan"))
            return super().unscale_(optimizer)

    scalers = []

    def make(device, mixed_precision):
        scalers.append(NanGradientScaler(device.type, **scaler_options))
        return scalers[-1]

    monkeypatch.setattr(trainer_module, "make_grad_scaler", make)
    return scalers


def test_fp16_gradient_nonfinite_at_a_scale_of_one_stops_the_run(tmp_path, monkeypatch):
    """An overflow is routine only while the loss scale is above 1: at a scale <= 1 scaling
    cannot be what overflowed, so the step is non-finite and --on-nonfinite stop stops."""
    scalers = nan_gradient_scaler(monkeypatch, init_scale=2.0)
    config = tiny(tmp_path, max_steps=6, log_every=3, mixed_precision="fp16", on_nonfinite="stop")
    # Step 1 runs at scale 2 (an overflow, skipped and halved); step 2 at scale 1 is non-finite.
    with pytest.raises(NonFiniteLoss, match=r"^step 2: the loss or gradient is not finite"):
        train(config)
    assert scalers[0].get_scale() == 0.25  # halved after each of the 3 steps run
    assert checkpoints.latest_checkpoint(Path(config.output_dir)) is None


def test_fp16_run_whose_every_step_was_skipped_is_an_error(tmp_path, monkeypatch):
    """At the default scale (2**16) a NaN gradient on every step skips 16 steps as overflows
    before the scale reaches 1: a shorter run must still not exit 0 with untrained weights."""
    nan_gradient_scaler(monkeypatch)
    config = tiny(tmp_path, max_steps=4, log_every=2, mixed_precision="fp16", on_nonfinite="stop")
    with pytest.raises(NonFiniteLoss, match=r"none of this run's 4 optimizer steps updated"):
        train(config)
    output = Path(config.output_dir)
    assert checkpoints.latest_checkpoint(output) is None
    assert not (output / "unet").exists()


class _NonFiniteGradient(torch.autograd.Function):
    """Identity forward; the gradient that flows back through it is NaN (a finite loss)."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad_output):
        return torch.full_like(grad_output, float("nan"))


def poison_one_input(monkeypatch, where: str, bad_call: int) -> dict:
    """On call ``bad_call`` of the loss, one element of one input alone is non-finite: the
    policy's prediction, the reference's, the target, the pair weights, or only the gradient
    reaching the prediction (the loss stays finite)."""
    calls = {"count": 0, "loss_finite": None}
    real_loss = sdpo.preference_loss

    def poisoned(model_pred, ref_pred, target, **kwargs):
        calls["count"] += 1
        if calls["count"] == bad_call:
            if where == "policy prediction":
                model_pred = model_pred + torch.zeros_like(model_pred).index_fill(
                    0, torch.tensor([0]), float("inf")
                )
            elif where == "reference prediction":
                ref_pred = ref_pred.clone()
                ref_pred.view(-1)[-1] = float("inf")
            elif where == "target":
                target = target.clone()
                target.view(-1)[0] = float("nan")
            elif where == "pair weights":
                weights = kwargs.get("pair_weights")
                pairs = model_pred.shape[0] // 2
                weights = torch.ones(pairs) if weights is None else weights.clone()
                weights[-1] = float("inf")
                kwargs["pair_weights"] = weights
            else:
                model_pred = _NonFiniteGradient.apply(model_pred)
        result = real_loss(model_pred, ref_pred, target, **kwargs)
        if calls["count"] == bad_call:
            calls["loss_finite"] = bool(torch.isfinite(result.loss))
        return result

    monkeypatch.setattr(sdpo, "preference_loss", poisoned)
    return calls


POISONED_INPUTS = (
    "policy prediction",
    "reference prediction",
    "target",
    "pair weights",
    "gradient only",
)


@pytest.mark.parametrize("where", POISONED_INPUTS)
def test_one_nonfinite_input_alone_skips_the_step_and_counts_it(tmp_path, monkeypatch, where):
    # Tiny preset: 2 micro-batches per step; call 3 is step 2's first micro-batch. One skipped
    # step of 4 is allowed by --max-skipped-fraction 0.5.
    config = tiny(tmp_path, max_steps=4, log_every=2, on_nonfinite="skip", max_skipped_fraction=0.5)
    calls = poison_one_input(monkeypatch, where, bad_call=3)
    summary = train(config)
    # "gradient only" keeps the loss finite: the skip must come from the gradient's norm; every
    # other input makes the loss non-finite, whatever its gradient is.
    assert calls["loss_finite"] is (where == "gradient only")
    assert summary["steps"] == 4 and summary["skipped_steps"] == 1
    assert [row["step"] for row in summary["rows"]] == [2, 4]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in summary["rows"])
    model_state, _ = checkpoints.load_checkpoint(
        checkpoints.latest_checkpoint(Path(config.output_dir))
    )
    assert all(torch.isfinite(tensor).all() for tensor in model_state.values())


@pytest.mark.parametrize("where", POISONED_INPUTS)
def test_one_nonfinite_input_alone_stops_a_run_that_stops(tmp_path, monkeypatch, where):
    config = tiny(tmp_path, max_steps=4, log_every=1, gradient_accumulation=1)
    poison_one_input(monkeypatch, where, bad_call=2)
    with pytest.raises(NonFiniteLoss, match=r"step 2:"):
        train(config)


@pytest.mark.parametrize("where", ("reference prediction", "gradient only"))
def test_one_nonfinite_input_beyond_the_skip_fraction_stops(tmp_path, monkeypatch, where):
    # 1 skipped step of 4 is 0.25, above a fraction of 0.2: the run stops at its end.
    config = tiny(tmp_path, max_steps=4, log_every=2, on_nonfinite="skip", max_skipped_fraction=0.2)
    poison_one_input(monkeypatch, where, bad_call=3)
    with pytest.raises(NonFiniteLoss, match="skipped"):
        train(config)
