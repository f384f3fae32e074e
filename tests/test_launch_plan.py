"""The fused backend's launch-plan cache and eager buffers: correctness, not timing.

A cached plan must equal one computed afresh for the same inputs, and any change of shape,
stride, dtype or setting must miss the cache. Needs no GPU and no interpreter (no launch).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from sdpo import reference
from sdpo.kernels import buffers, preference

# The op-arguments tuple's fields, in order (sdpo.settings.LossSettings.op_arguments).
SETTINGS = dict(
    method_code=preference.METHOD_DPO, beta=50.0, mu=0.5, safeguard=True, group_size=0,
    dmpo_alpha=0.0,
)  # fmt: skip


@pytest.fixture(autouse=True)
def empty_cache(monkeypatch):
    monkeypatch.setattr(preference, "_PLANS", {})


def fresh_plan(model_pred, target, pair_weights, dmpo_alpha, **settings):
    batch_pairs = model_pred.shape[0] // 2
    log_q, log_one_minus_q = reference.dmpo_log_q(dmpo_alpha)
    return preference.plan_launches(
        batch_pairs,
        model_pred[0].numel(),
        target_shared=target.shape[0] == batch_pairs,
        has_weights=pair_weights is not None,
        log_q=log_q,
        log_one_minus_q=log_one_minus_q,
        **settings,
    )


def cached(model_pred, ref_pred, target, pair_weights=None, **settings):
    op_arguments = tuple(settings[name] for name in SETTINGS)
    return preference.cached_plan(model_pred, ref_pred, target, pair_weights, op_arguments)


CASES = [
    # (pairs, sample shape, dtype, shared target, weights, settings changes)
    (1, (97,), torch.float32, False, False, {}),
    (8, (4, 64, 64), torch.bfloat16, True, False, {}),
    (3, (2, 5, 7), torch.float16, False, True, dict(group_size=2)),
    (37, (18,), torch.float32, True, True, dict(method_code=preference.METHOD_DSPO)),
    (2, (16, 21, 60, 104), torch.bfloat16, False, False, dict(safeguard=False, mu=0.0)),
    (5, (3, 1, 11), torch.float64, False, False, dict(method_code=preference.METHOD_DMPO)),
]


@pytest.mark.parametrize(("pairs", "sample", "dtype", "shared", "weighted", "changes"), CASES)
def test_cached_plan_equals_a_fresh_plan(pairs, sample, dtype, shared, weighted, changes):
    settings = {**SETTINGS, **changes}
    model_pred = torch.empty((2 * pairs, *sample), dtype=dtype)
    ref_pred = torch.empty_like(model_pred)
    target = torch.empty(((pairs if shared else 2 * pairs), *sample), dtype=dtype)
    weights = torch.ones(pairs) if weighted else None
    first = cached(model_pred, ref_pred, target, weights, **settings)
    assert first == fresh_plan(model_pred, target, weights, **settings)
    assert cached(model_pred, ref_pred, target, weights, **settings) is first  # a hit
    assert len(preference._PLANS) == 1
    # What the kernels are launched with, from the shape-only chunk plan.
    elements = model_pred[0].numel()
    chunk_elements, num_chunks = preference.plan_chunks(pairs, elements)
    assert first.sums_grid == (pairs, num_chunks)
    assert first.blocks_per_chunk * preference.SUMS_BLOCK == chunk_elements
    assert first.gradient_grid == (2 * pairs, -(-elements // preference.GRADIENT_BLOCK))
    assert first.target_shared is shared and first.has_weights is weighted
    pairs_pow2 = preference.next_power_of_2(pairs)
    assert first.workspace_floats == pairs * num_chunks * preference.NUM_SUMS + 3 * pairs_pow2


def test_changed_shape_stride_dtype_or_setting_misses_the_cache():
    model_pred = torch.empty((6, 4, 1, 8))
    ref_pred, target = torch.empty_like(model_pred), torch.empty_like(model_pred)
    base = cached(model_pred, ref_pred, target, **SETTINGS)
    other_shape = torch.empty((6, 4, 1, 9))
    variants = {
        "shape": (other_shape, other_shape, other_shape),
        "shared target": (model_pred, ref_pred, torch.empty((3, 4, 1, 8))),
        # Same shape, still contiguous (a size-1 dimension's stride is free), other strides.
        "stride": (model_pred.as_strided((6, 4, 1, 8), (32, 8, 1, 1)), ref_pred, target),
        "dtype": (model_pred.half(), ref_pred, target),
        "ref dtype": (model_pred, ref_pred.bfloat16(), target),
    }
    for name, (pred, ref, tgt) in variants.items():
        before = len(preference._PLANS)
        plan = cached(pred, ref, tgt, **SETTINGS)
        assert len(preference._PLANS) == before + 1, name
        assert plan == fresh_plan(pred, tgt, None, **SETTINGS), name
    for name, change in {
        "method": dict(method_code=preference.METHOD_DSPO_SDXL),
        "beta": dict(beta=51.0),
        "mu": dict(mu=0.25),
        "safeguard": dict(safeguard=False),
        "group": dict(group_size=3),
        "dmpo alpha": dict(dmpo_alpha=0.3),
    }.items():
        before = len(preference._PLANS)
        settings = {**SETTINGS, **change}
        plan = cached(model_pred, ref_pred, target, **settings)
        assert len(preference._PLANS) == before + 1, name
        assert plan == fresh_plan(model_pred, target, None, **settings), name
        assert plan != base, name
    before = len(preference._PLANS)
    cached(model_pred, ref_pred, target, torch.ones(3), **SETTINGS)  # weights now given
    assert len(preference._PLANS) == before + 1
    assert cached(model_pred, ref_pred, target, **SETTINGS) is base  # the first is still there


def test_non_contiguous_inputs_are_refused_not_served_from_the_cache():
    base = torch.empty((4, 6, 10))
    contiguous = base[..., :5].contiguous()
    cached(contiguous, contiguous, contiguous, **SETTINGS)
    strided = base[..., ::2]  # the same shape (4, 6, 5), not contiguous
    with pytest.raises(AssertionError, match="contiguous"):
        cached(strided, contiguous, contiguous, **SETTINGS)


def test_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(preference, "MAX_CACHED_PLANS", 3)
    for elements in range(1, 8):
        tensor = torch.empty((2, elements))
        plan = cached(tensor, tensor, tensor, **SETTINGS)
        assert plan.elements == elements
        assert len(preference._PLANS) <= 3


@pytest.mark.parametrize("batch_pairs", [1, 2, 3, 8, 37])
def test_one_allocation_views_match_separate_buffers(batch_pairs):
    workspace_floats = 8 * batch_pairs * 5 + 3 * preference.next_power_of_2(batch_pairs)
    cpu = torch.device("cpu")
    one = buffers.forward_buffers(cpu, batch_pairs, workspace_floats, one_allocation=True)
    separate = buffers.forward_buffers(cpu, batch_pairs, workspace_floats, one_allocation=False)
    for view, tensor in zip(one, separate, strict=True):
        assert view.shape == tensor.shape and view.dtype == tensor.dtype == torch.float32
        assert view.is_contiguous()
        assert view.data_ptr() % 16 == 0  # the alignment of a buffer of its own
    # The loss is a tensor of its own (callers may modify it in place); the other four are
    # views of one storage that do not overlap.
    workspace, loss, *rest = one
    assert not loss._is_view()
    views = [workspace, *rest]
    assert len({view.untyped_storage().data_ptr() for view in views}) == 1
    assert loss.untyped_storage().data_ptr() != workspace.untyped_storage().data_ptr()
    spans = sorted((view.data_ptr(), view.data_ptr() + 4 * view.numel()) for view in views)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
    # Separate buffers: a custom op's outputs may not alias.
    assert len({tensor.untyped_storage().data_ptr() for tensor in separate}) == 5


def test_gradient_buffers_pass_a_0_dim_fp32_grad_through_and_convert_others():
    model_pred = torch.empty((4, 3), dtype=torch.bfloat16).t()  # not contiguous
    grad_loss = torch.tensor(2.5)
    grad_output, grad = buffers.gradient_buffers(grad_loss, model_pred)
    assert grad_output is grad_loss
    assert grad.shape == model_pred.shape and grad.dtype == torch.bfloat16
    assert grad.is_contiguous()
    for other in (torch.tensor(2.5, dtype=torch.float64), torch.tensor([2.5])):
        grad_output, _ = buffers.gradient_buffers(other, model_pred)
        assert grad_output.dtype == torch.float32 and grad_output.shape == (1,)
        assert grad_output.item() == 2.5
