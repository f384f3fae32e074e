"""torch.compile(fullgraph=True) traces preference_loss with no graph break, every method."""

from __future__ import annotations

import pytest
import torch
from formulas import beta_for, make_inputs

import sdpo


@pytest.mark.parametrize("method", sdpo.METHODS)
@pytest.mark.parametrize(("mu", "granularity"), [(None, "batch"), (0.6, "batch"), (0.6, "group:2")])
def test_fullgraph_compile_matches_eager(method, mu, granularity):
    torch._dynamo.reset()
    model_pred, ref_pred, target = make_inputs(3, (2, 4, 4), dtype=torch.float32)
    weights = torch.tensor([1.0, 0.5, 2.0])

    kwargs = dict(
        method=method,
        beta=beta_for(method),
        mu=mu,
        granularity=granularity,
        dmpo_alpha=0.01,
        pair_weights=weights,
        backend="torch",
    )
    compiled = torch.compile(sdpo.preference_loss, fullgraph=True, backend="aot_eager")
    eager_pred = model_pred.clone().requires_grad_(True)
    compiled_pred = model_pred.clone().requires_grad_(True)
    eager = sdpo.preference_loss(eager_pred, ref_pred, target, **kwargs)
    traced = compiled(compiled_pred, ref_pred, target, **kwargs)
    torch.testing.assert_close(traced.loss, eager.loss)
    assert set(traced.stats) == set(eager.stats)
    for key, value in eager.stats.items():
        torch.testing.assert_close(traced.stats[key], value, msg=key)
    eager.loss.backward()
    traced.loss.backward()
    torch.testing.assert_close(compiled_pred.grad, eager_pred.grad)
    if mu is not None:
        assert (eager.stats["lambda"] < 1).all(), "the safeguard must act in this test"


def test_fullgraph_compile_with_inductor():
    # Inductor generates C++ on the CPU: one configuration, the reference scripts' default.
    torch._dynamo.reset()
    model_pred, ref_pred, target = make_inputs(2, (4, 8, 8), dtype=torch.float32)
    compiled = torch.compile(sdpo.preference_loss, fullgraph=True)
    pred = model_pred.clone().requires_grad_(True)
    traced = compiled(pred, ref_pred, target, beta=50.0, mu=0.9, backend="torch")
    traced.loss.backward()
    eager_pred = model_pred.clone().requires_grad_(True)
    eager = sdpo.preference_loss(eager_pred, ref_pred, target, beta=50.0, mu=0.9, backend="torch")
    eager.loss.backward()
    torch.testing.assert_close(traced.loss, eager.loss)
    torch.testing.assert_close(pred.grad, eager_pred.grad)


# One compiled function called with settings that change between calls, as a sweep or a beta /
# mu schedule does in one process: dynamo turns a float that changed into a symbolic float, and
# the settings' validation must then guard (recompile) rather than fail to trace.
CHANGING_SETTINGS = [
    dict(method="diffusion-dpo", beta=50.0, mu=0.0, granularity="batch"),
    dict(method="diffusion-dpo", beta=50.0, mu=0.9, granularity="batch"),
    dict(method="diffusion-dpo", beta=80.0, mu=0.5, granularity="pair"),
    dict(method="dmpo", beta=20.0, mu=0.3, granularity="group:2", dmpo_alpha=0.2),
    dict(method="dspo", beta=0.5, mu=None, granularity="group:1"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_compiled_function_takes_changing_settings(backend):
    from sdpo import ops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if backend == "triton" and not ops.triton_available(device):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 with triton installed")
    torch._dynamo.reset()
    model_pred, ref_pred, target = (
        tensor.to(device) for tensor in make_inputs(3, (2, 4, 4), dtype=torch.float32)
    )
    compiled = torch.compile(sdpo.preference_loss, fullgraph=True, backend="aot_eager")
    for settings in CHANGING_SETTINGS:
        eager_pred = model_pred.clone().requires_grad_(True)
        compiled_pred = model_pred.clone().requires_grad_(True)
        eager = sdpo.preference_loss(eager_pred, ref_pred, target, backend=backend, **settings)
        traced = compiled(compiled_pred, ref_pred, target, backend=backend, **settings)
        torch.testing.assert_close(traced.loss, eager.loss, msg=str(settings))
        for key, value in eager.stats.items():
            torch.testing.assert_close(traced.stats[key], value, msg=f"{key} {settings}")
        eager.loss.backward()
        traced.loss.backward()
        torch.testing.assert_close(compiled_pred.grad, eager_pred.grad, msg=str(settings))
    # Validation stays strict on a compiled call: a non-finite beta is refused, naming it
    # (with fullgraph=True dynamo wraps the ValueError; its text carries the message).
    with pytest.raises(Exception, match="beta: expected a finite number"):
        compiled(model_pred, ref_pred, target, backend=backend, beta=float("inf"))
