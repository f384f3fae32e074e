"""Every bad input raises ValueError naming the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

import sdpo


def good_inputs(batch_pairs: int = 2):
    model_pred = torch.randn(2 * batch_pairs, 3, 4, 4)
    return model_pred, torch.randn_like(model_pred), torch.randn(batch_pairs, 3, 4, 4)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (
            lambda a: a.update(model_pred=torch.randn(3, 3, 4, 4)),
            r"model_pred: expected shape \(2B",
        ),
        (lambda a: a.update(model_pred=torch.randn(0, 3)), r"model_pred: expected shape \(2B"),
        (lambda a: a.update(ref_pred=torch.randn(4, 3, 4, 5)), r"ref_pred: expected the shape"),
        (lambda a: a.update(ref_pred=torch.randn(2, 3, 4, 4)), r"ref_pred: expected the shape"),
        (lambda a: a.update(target=torch.randn(3, 3, 4, 4)), r"target: expected \(4, 3, 4, 4\)"),
        (lambda a: a.update(target=torch.randn(2, 3, 4)), r"target: expected"),
        (
            lambda a: a.update(model_pred=torch.ones(4, 3, 4, 4, dtype=torch.int64)),
            r"model_pred: expected a floating",
        ),
        (
            lambda a: a.update(target=torch.ones(2, 3, 4, 4, dtype=torch.int32)),
            r"target: expected a floating",
        ),
        (
            lambda a: a.update(ref_pred=torch.ones(4, 3, 4, 4, dtype=torch.bool)),
            r"ref_pred: expected a floating",
        ),
        (lambda a: a.update(model_pred=[1.0, 2.0]), r"model_pred: expected a torch.Tensor"),
        (lambda a: a.update(method="dpo"), r"method: unknown 'dpo'"),
        (lambda a: a.update(granularity="pairs"), r"granularity: unknown 'pairs'"),
        (lambda a: a.update(granularity="group:0"), r"granularity: unknown 'group:0'"),
        (lambda a: a.update(granularity="group:x"), r"granularity: unknown"),
        (lambda a: a.update(mu=-0.1), r"mu: expected None .* in \[0, 1\]"),
        (lambda a: a.update(mu=1.5), r"mu: expected None .* in \[0, 1\]"),
        (lambda a: a.update(mu=torch.tensor(0.5)), r"mu: expected a Python float"),
        (lambda a: a.update(mu=float("nan")), r"mu: expected a finite number"),
        (lambda a: a.update(beta=0.0), r"beta: expected > 0"),
        (lambda a: a.update(beta=-5000.0), r"beta: expected > 0"),
        (lambda a: a.update(beta=float("inf")), r"beta: expected a finite number"),
        (lambda a: a.update(dmpo_alpha=1.5), r"dmpo_alpha: expected a number in \[0, 1\]"),
        (
            lambda a: a.update(pair_weights=torch.tensor([1.0, -0.5])),
            r"pair_weights: expected non-negative",
        ),
        (lambda a: a.update(pair_weights=torch.ones(4)), r"pair_weights: expected shape \(2,\)"),
        (
            lambda a: a.update(pair_weights=torch.ones(2, dtype=torch.int64)),
            r"pair_weights: expected None or a floating",
        ),
        (lambda a: a.update(backend="cuda-graphs"), r"backend: unknown 'cuda-graphs'"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(change, pattern):
    model_pred, ref_pred, target = good_inputs()
    arguments = {"model_pred": model_pred, "ref_pred": ref_pred, "target": target}
    change(arguments)
    with pytest.raises(ValueError, match=pattern):
        sdpo.preference_loss(
            arguments.pop("model_pred"),
            arguments.pop("ref_pred"),
            arguments.pop("target"),
            **arguments,
        )


def test_good_input_passes_and_both_target_layouts_agree():
    model_pred, ref_pred, target = good_inputs()
    shared = sdpo.preference_loss(model_pred, ref_pred, target, mu=0.5, backend="torch")
    repeated = sdpo.preference_loss(
        model_pred, ref_pred, torch.cat([target, target]), mu=0.5, backend="torch"
    )
    torch.testing.assert_close(shared.loss, repeated.loss, rtol=0, atol=0)
    assert shared.loss.dim() == 0 and shared.loss.dtype == torch.float32


def test_validation_does_not_read_accelerator_values():
    # Reading pair_weights' values on an accelerator would sync: the check is returned instead.
    # On the CPU (no sync) it raises; the accelerator path is exercised by the GPU tests.
    model_pred, ref_pred, target = good_inputs()
    weights = torch.tensor([0.5, 2.0])
    result = sdpo.preference_loss(
        model_pred, ref_pred, target, pair_weights=weights, backend="torch"
    )
    assert "negative_pair_weights" not in result.stats


@pytest.mark.gpu
def test_negative_pair_weights_on_cuda_are_flagged_without_sync():
    model_pred, ref_pred, target = (tensor.cuda() for tensor in good_inputs())
    weights = torch.tensor([0.5, -2.0], device="cuda")
    result = sdpo.preference_loss(
        model_pred, ref_pred, target, pair_weights=weights, backend="torch"
    )
    assert bool(result.stats["negative_pair_weights"])


def test_triton_backend_without_gpu_or_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    model_pred, ref_pred, target = good_inputs()
    with pytest.raises(RuntimeError, match='backend="triton"'):
        sdpo.preference_loss(model_pred, ref_pred, target, backend="triton")
    # "auto" never picks it there.
    auto = sdpo.preference_loss(model_pred, ref_pred, target, backend="auto")
    torch.testing.assert_close(
        auto.loss, sdpo.preference_loss(model_pred, ref_pred, target, backend="torch").loss
    )
