"""preference_loss (backend="torch") against the independent statement in formulas.py."""

from __future__ import annotations

import pytest
import torch
from formulas import beta_for, independent_loss, make_inputs

import sdpo

GRANULARITIES = {"batch": None, "pair": 1, "group:2": 2}


@pytest.mark.parametrize("method", sdpo.METHODS)
@pytest.mark.parametrize("mu", [None, 0.0, 0.6, 0.9])
@pytest.mark.parametrize("granularity", list(GRANULARITIES))
@pytest.mark.parametrize("shared_target", [True, False])
def test_values_and_gradients_match_independent_formulas(method, mu, granularity, shared_target):
    # B = 5 with group:2 leaves a short last group; D = 3*4*5 = 60.
    model_pred, ref_pred, target = make_inputs(5, (3, 4, 5), shared_target=shared_target)
    model_pred.requires_grad_(True)
    beta = beta_for(method)
    result = sdpo.preference_loss(
        model_pred,
        ref_pred,
        target,
        method=method,
        beta=beta,
        mu=mu,
        granularity=granularity,
        dmpo_alpha=0.01,
        backend="torch",
    )
    (grad,) = torch.autograd.grad(result.loss, model_pred)

    expected_pred = model_pred.detach().clone().requires_grad_(True)
    expected_loss, expected_lambda = independent_loss(
        expected_pred,
        ref_pred,
        target,
        method=method,
        beta=beta,
        mu=mu,
        group_size=GRANULARITIES[granularity],
        dmpo_alpha=0.01,
    )
    (expected_grad,) = torch.autograd.grad(expected_loss, expected_pred)

    torch.testing.assert_close(result.loss, expected_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)
    lam = result.stats["lambda"]
    if granularity == "batch":
        assert lam.shape == ()
        torch.testing.assert_close(lam.expand(5), expected_lambda, rtol=1e-10, atol=0)
    else:
        torch.testing.assert_close(lam, expected_lambda, rtol=1e-10, atol=0)
    if mu is not None and mu > 0:
        # The correlated inputs make S_wl > S_ww, so the safeguard really bites.
        assert (expected_lambda < 1).all()


def test_safeguard_changes_gradient_not_value():
    model_pred, ref_pred, target = make_inputs(4, (2, 6, 6))
    model_pred.requires_grad_(True)
    plain = sdpo.preference_loss(model_pred, ref_pred, target, beta=50.0, backend="torch")
    safe = sdpo.preference_loss(model_pred, ref_pred, target, beta=50.0, mu=0.5, backend="torch")
    torch.testing.assert_close(plain.loss, safe.loss, rtol=0, atol=0)
    for key in ("margin", "implicit_acc", "model_mse_w", "model_mse_l", "win_gap", "lose_gap"):
        torch.testing.assert_close(plain.stats[key], safe.stats[key], rtol=0, atol=0)
    (grad_plain,) = torch.autograd.grad(plain.loss, model_pred)
    (grad_safe,) = torch.autograd.grad(safe.loss, model_pred)
    lam = safe.stats["lambda"]
    assert 0 < lam < 1
    # Winners' gradient untouched, losers' scaled by exactly lambda.
    torch.testing.assert_close(grad_safe[:4], grad_plain[:4], rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_safe[4:], lam * grad_plain[4:], rtol=1e-12, atol=0)


def test_dspo_sdxl_uses_both_branches():
    # Small policy-reference gap (mean gap^2 ~ 0.01 < 0.1) and a large one (~0.25).
    for ref_offset, expect_gap_branch in ((0.1, False), (0.5, True)):
        model_pred, ref_pred, target = make_inputs(3, (2, 5, 5), ref_offset=ref_offset)
        gap_sq = (model_pred - ref_pred)[:3].pow(2).mean()
        assert bool(gap_sq >= 0.1) is expect_gap_branch
        result = sdpo.preference_loss(
            model_pred, ref_pred, target, method="dspo-sdxl", beta=20.0, backend="torch"
        )
        expected, _ = independent_loss(model_pred, ref_pred, target, method="dspo-sdxl", beta=20.0)
        torch.testing.assert_close(result.loss, expected, rtol=1e-10, atol=1e-12)


def test_pair_weights_multiply_each_pair_term():
    model_pred, ref_pred, target = make_inputs(4, (3, 5))
    weights = torch.tensor([0.0, 1.0, 2.5, 0.5], dtype=torch.float64)
    for method in sdpo.METHODS:
        result = sdpo.preference_loss(
            model_pred,
            ref_pred,
            target,
            method=method,
            beta=beta_for(method),
            mu=0.5,
            granularity="pair",
            pair_weights=weights,
            dmpo_alpha=0.01,
            backend="torch",
        )
        expected, _ = independent_loss(
            model_pred,
            ref_pred,
            target,
            method=method,
            beta=beta_for(method),
            mu=0.5,
            group_size=1,
            pair_weights=weights,
            dmpo_alpha=0.01,
        )
        torch.testing.assert_close(result.loss, expected, rtol=1e-10, atol=1e-12)


def test_stats_are_the_documented_quantities():
    model_pred, ref_pred, target = make_inputs(6, (4, 4))
    beta = 40.0
    result = sdpo.preference_loss(model_pred, ref_pred, target, beta=beta, mu=0.9, backend="torch")
    stats = result.stats
    full_target = torch.cat([target, target])
    model_mse = (model_pred - full_target).pow(2).mean(dim=(1, 2))
    ref_mse = (ref_pred - full_target).pow(2).mean(dim=(1, 2))
    margin = -beta / 2 * ((model_mse[:6] - model_mse[6:]) - (ref_mse[:6] - ref_mse[6:]))
    expected = {
        "implicit_acc": ((margin > 0).double() + 0.5 * (margin == 0).double()).mean(),
        "margin": margin.mean(),
        "model_mse_w": model_mse[:6].mean(),
        "model_mse_l": model_mse[6:].mean(),
        "ref_mse_w": ref_mse[:6].mean(),
        "ref_mse_l": ref_mse[6:].mean(),
        "win_gap": (model_mse[:6] - ref_mse[:6]).mean(),
        "lose_gap": (model_mse[6:] - ref_mse[6:]).mean(),
    }
    for key, value in expected.items():
        torch.testing.assert_close(stats[key], value, rtol=1e-12, atol=1e-14, msg=key)
    assert set(stats) == {"lambda", *expected}
    assert all(not tensor.requires_grad for tensor in stats.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_compute_in_fp32(dtype):
    model_pred, ref_pred, target = make_inputs(3, (4, 6, 6))
    low = [tensor.to(dtype) for tensor in (model_pred, ref_pred, target)]
    low[0].requires_grad_(True)
    result = sdpo.preference_loss(*low, beta=50.0, mu=0.6, backend="torch")
    assert result.loss.dtype == torch.float32
    # The math runs in fp32 on the rounded inputs: the same as fp64 math on those inputs.
    expected, _ = independent_loss(
        *(t.detach().double() for t in low), method="diffusion-dpo", beta=50.0, mu=0.6
    )
    torch.testing.assert_close(result.loss.double(), expected, rtol=1e-5, atol=1e-7)
    (grad,) = torch.autograd.grad(result.loss, low[0])
    assert grad.dtype == dtype and torch.isfinite(grad.float()).all()


def test_mu_one_silences_the_losers_when_errors_align():
    model_pred, ref_pred, target = make_inputs(3, (5, 5))
    model_pred.requires_grad_(True)
    result = sdpo.preference_loss(model_pred, ref_pred, target, beta=50.0, mu=1.0, backend="torch")
    (grad,) = torch.autograd.grad(result.loss, model_pred)
    assert result.stats["lambda"] == 0
    assert torch.count_nonzero(grad[3:]) == 0
    assert torch.count_nonzero(grad[:3]) > 0


def test_anticorrelated_errors_keep_lambda_one():
    # S_wl <= 0: any lambda >= 0 keeps the winner's loss from rising, the reference takes 1.
    model_pred, ref_pred, target = make_inputs(2, (4, 4), correlated=False)
    full_target = torch.cat([target, target])
    error = model_pred - full_target
    model_pred = torch.cat([model_pred[:2], full_target[2:] - error[:2]])  # e_l = -e_w
    for granularity in ("batch", "pair"):
        result = sdpo.preference_loss(
            model_pred,
            ref_pred,
            target,
            beta=50.0,
            mu=0.3,
            granularity=granularity,
            backend="torch",
        )
        assert torch.all(result.stats["lambda"] == 1)


def test_gradcheck_float64():
    model_pred, ref_pred, target = make_inputs(3, (2, 3))
    model_pred.requires_grad_(True)
    weights = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    for method in sdpo.METHODS:
        for mu, granularity in ((None, "batch"), (0.7, "batch"), (0.2, "pair"), (0.5, "group:2")):

            def loss_of(pred, method=method, mu=mu, granularity=granularity):
                return sdpo.preference_loss(
                    pred,
                    ref_pred,
                    target,
                    method=method,
                    beta=beta_for(method),
                    mu=mu,
                    granularity=granularity,
                    dmpo_alpha=0.05,
                    pair_weights=weights,
                    backend="torch",
                ).loss

            if mu is None:
                assert torch.autograd.gradcheck(loss_of, (model_pred,))
            else:
                # lambda is a detached constant; gradcheck's finite differences would also move
                # it, so check against the independent statement's analytic gradient instead.
                (grad,) = torch.autograd.grad(loss_of(model_pred), model_pred)
                leaf = model_pred.detach().clone().requires_grad_(True)
                expected, _ = independent_loss(
                    leaf,
                    ref_pred,
                    target,
                    method=method,
                    beta=beta_for(method),
                    mu=mu,
                    group_size=sdpo.parse_granularity(granularity),
                    dmpo_alpha=0.05,
                    pair_weights=weights,
                )
                (expected_grad,) = torch.autograd.grad(expected, leaf)
                torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)


def test_safeguarded_gradient_matches_finite_differences_of_the_surrogate():
    # With lambda frozen at the base point p0, the safeguarded gradient is the gradient of the
    # smooth surrogate g(p) = loss(L_w(p), L_l(p0) + lambda (L_l(p) - L_l(p0))) at p0.
    # Check it against central differences of g (not through the package's autograd).
    from sdpo import reference

    model_pred, ref_pred, target = make_inputs(3, (2, 3), seed=1)
    model_pred.requires_grad_(True)
    full_target = torch.cat([target, target])
    base_error = (model_pred - full_target).detach()
    lam = reference.safeguard_lambda(base_error[:3], base_error[3:], 0.8, 1)
    assert (lam < 1).all()
    ref_mse = (ref_pred - full_target).pow(2).mean(dim=(1, 2))
    base_loser_mse = base_error[3:].pow(2).mean(dim=(1, 2))

    def surrogate(pred: torch.Tensor) -> torch.Tensor:
        mse = (pred - full_target).pow(2).mean(dim=(1, 2))
        loser = base_loser_mse + lam * (mse[3:] - base_loser_mse)
        u = -25.0 * ((mse[:3] - loser) - (ref_mse[:3] - ref_mse[3:]))
        return torch.nn.functional.softplus(-u).mean()

    result = sdpo.preference_loss(
        model_pred, ref_pred, target, beta=50.0, mu=0.8, granularity="pair", backend="torch"
    )
    (grad,) = torch.autograd.grad(result.loss, model_pred)
    step = 1e-6
    numeric = torch.zeros_like(grad)
    flat_base = model_pred.detach().flatten()
    for index in range(flat_base.numel()):
        bump = torch.zeros_like(flat_base)
        bump[index] = step
        plus = surrogate((flat_base + bump).view_as(model_pred))
        minus = surrogate((flat_base - bump).view_as(model_pred))
        numeric.view(-1)[index] = (plus - minus) / (2 * step)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(result.loss, surrogate(model_pred.detach()), rtol=1e-12, atol=0)


@pytest.mark.gpu
@pytest.mark.core
@pytest.mark.parametrize("method", sdpo.METHODS)
def test_torch_backend_is_sync_free_under_cuda_graph_capture(method):
    # Capture fails on any host sync (.item(), a Python `if` on a device value): the torch
    # backend, validation included, must capture forward and backward whole.
    model_pred, ref_pred, target = (t.cuda().float() for t in make_inputs(4, (4, 16, 16)))
    weights = torch.tensor([1.0, 0.5, 2.0, 1.0], device="cuda")
    static_pred = model_pred.clone().requires_grad_(True)
    kwargs = dict(
        method=method,
        beta=beta_for(method),
        mu=0.6,
        granularity="group:2",
        dmpo_alpha=0.01,
        pair_weights=weights,
        backend="torch",
    )
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sdpo.preference_loss(static_pred, ref_pred, target, **kwargs).loss.backward()
    torch.cuda.current_stream().wait_stream(stream)
    static_pred.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = sdpo.preference_loss(static_pred, ref_pred, target, **kwargs)
        result.loss.backward()
    graph.replay()
    eager_pred = model_pred.clone().requires_grad_(True)
    eager = sdpo.preference_loss(eager_pred, ref_pred, target, **kwargs)
    eager.loss.backward()
    torch.testing.assert_close(result.loss, eager.loss)
    torch.testing.assert_close(static_pred.grad, eager_pred.grad)
