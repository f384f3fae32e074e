"""The objectives in plain PyTorch: the reference every fast path is tested against.

Written for clarity, not speed. The math is stated in docs/objectives.md (Diffusion-DPO,
DSPO, DMPO and 'The safeguard') and the reference trainer's loss section
(AIDC-AI/Diffusion-SDPO), with one deliberate change: every mean squared error, the margin u,
lambda and the loss are computed in fp32 (fp64 for fp64 inputs) whatever the model dtype. The
reference trainer evaluates the reference model's error in bf16, which moves u by up to ~0.6 at
beta = 5000.

Layout: ``model_pred`` and ``ref_pred`` are (2B, ...) with the B winners first, so pair i is
(row i, row B + i). ``target`` is (2B, ...) or (B, ...), the noise a pair shares.

Callers go through :func:`sdpo.preference_loss`, which validates its arguments first; the
functions here assume valid input.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

# The methods and the integer codes the fused kernels take for each (defined in sdpo.settings,
# which imports no torch).
from sdpo.settings import METHOD_CODES, METHODS  # noqa: F401

if TYPE_CHECKING:
    from sdpo.settings import LossSettings

# The loss-side statistics every backend returns (besides "lambda"), in this order.
STAT_NAMES = (
    "implicit_acc",
    "margin",
    "model_mse_w",
    "model_mse_l",
    "ref_mse_w",
    "ref_mse_l",
    "win_gap",
    "lose_gap",
)

# The reference trainer's epsilon in lambda = (1 - mu) |gA|^2 / (<gA, gB> + eps), with gA, gB
# the output-space gradients of the micro-batch's mean winner and loser errors.
SAFEGUARD_EPSILON = 1e-9

# DSPO's SDXL form switches from mean((s * pred2)^2) to mean(s^2) when the mean squared
# policy-reference gap of the winners falls below this (reference code, SDXL script).
DSPO_SDXL_GAP_THRESHOLD = 0.1

# DMPO clamps its target probability q = 1 - alpha into (0, 1) with this margin.
DMPO_Q_MARGIN = 1e-6


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 inputs (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def group_index(batch_pairs: int, group_size: int, device: torch.device) -> Tensor:
    """Group id of each pair: pairs 0..G-1 form group 0 and so on; the last group may be short."""
    return torch.arange(batch_pairs, device=device) // group_size


def group_sizes(batch_pairs: int, group_size: int) -> list[int]:
    """Number of pairs in each group (a Python list: known before any tensor exists)."""
    full, rest = divmod(batch_pairs, group_size)
    return [group_size] * full + ([rest] if rest else [])


def group_mean(values: Tensor, group_size: int) -> Tensor:
    """Per pair (B,): the mean of ``values`` (B,) over the pair's group of ``group_size``
    consecutive pairs (the last group may be short); ``group_size >= B`` is one mean per call."""
    batch_pairs = values.shape[0]
    if group_size >= batch_pairs:
        return values.mean().expand(batch_pairs)
    index = group_index(batch_pairs, group_size, values.device)
    num_groups = len(group_sizes(batch_pairs, group_size))
    totals = values.new_zeros(num_groups).index_add_(0, index, values)
    # Pairs per group, counted on the device (a tensor built from a host list would be a copy).
    counts = values.new_zeros(num_groups).index_add_(0, index, torch.ones_like(values))
    return (totals / counts)[index]


def safeguard_lambda_from_sums(
    winner_sq_sum: Tensor,
    winner_loser_dot: Tensor,
    elements_per_group: Tensor | float,
    mu: float,
) -> Tensor:
    """The SDPO scale for the loser's gradient from raw sums over one group.

    With A, B the mean winner and loser errors over a group of N winner elements, the
    output-space gradients are gA = 2 e_w / N and gB = 2 e_l / N, so the reference's
    ``(1 - mu) |gA|^2 / (<gA, gB> + eps)`` becomes ``(1 - mu) S_ww / (S_wl + eps N^2 / 4)``.
    lambda = 1 where S_wl <= 0 (any lambda >= 0 keeps the winner's loss from rising there);
    otherwise it is clipped into [0, 1] so it never amplifies the loser.
    """
    epsilon_in_sums = SAFEGUARD_EPSILON * elements_per_group * elements_per_group / 4.0
    # The denominator is only used where S_wl > 0; clamping keeps the unused branch finite.
    ratio = (1.0 - mu) * winner_sq_sum / (winner_loser_dot + epsilon_in_sums).clamp_min(1e-30)
    return torch.where(winner_loser_dot > 0, ratio.clamp(0.0, 1.0), torch.ones_like(ratio))


def safeguard_lambda(
    model_err_w: Tensor, model_err_l: Tensor, mu: float, group_size: int
) -> Tensor:
    """Per-pair lambda (B,), detached, for groups of ``group_size`` consecutive pairs.

    ``group_size >= B`` is the reference's one lambda per micro-batch; 1 is one lambda per pair.
    No tensor is built from host data here (a host-to-device copy would break CUDA-graph capture).
    """
    batch_pairs = model_err_w.shape[0]
    err_w = model_err_w.detach().flatten(1)
    err_l = model_err_l.detach().flatten(1)
    elements_per_sample = err_w.shape[1]
    winner_sq = err_w.square().sum(1)
    winner_loser = (err_w * err_l).sum(1)
    if group_size >= batch_pairs:
        elements = float(batch_pairs * elements_per_sample)
        scale = safeguard_lambda_from_sums(winner_sq.sum(), winner_loser.sum(), elements, mu)
        return scale.expand(batch_pairs)
    index = group_index(batch_pairs, group_size, winner_sq.device)
    num_groups = len(group_sizes(batch_pairs, group_size))
    grouped_sq = winner_sq.new_zeros(num_groups).index_add_(0, index, winner_sq)
    grouped_dot = winner_loser.new_zeros(num_groups).index_add_(0, index, winner_loser)
    # Pairs per group (the last may be short), counted on the device.
    pairs_per_group = winner_sq.new_zeros(num_groups).index_add_(
        0, index, torch.ones_like(winner_sq)
    )
    elements = pairs_per_group * elements_per_sample
    return safeguard_lambda_from_sums(grouped_sq, grouped_dot, elements, mu)[index]


def scale_gradient(value: Tensor, scale: Tensor) -> Tensor:
    """Forward: ``value``. Backward: the gradient into ``value`` times ``scale`` (detached).

    The reference trainer's ``L.detach() + lambda * (L - L.detach())``: the loss, u and the
    accuracy keep their values; only the gradient reaching the loser's error is rescaled.
    """
    detached = value.detach()
    return detached + scale.detach() * (value - detached)


def dmpo_log_q(dmpo_alpha: float) -> tuple[float, float]:
    """log q and log(1 - q) for DMPO's target probability q = clamp(1 - alpha)."""
    q = min(max(1.0 - dmpo_alpha, DMPO_Q_MARGIN), 1.0 - DMPO_Q_MARGIN)
    return math.log(q), math.log1p(-q)


def per_pair_terms(
    method: str,
    margin: Tensor,
    model_err_w: Tensor,
    policy_ref_gap_w: Tensor,
    beta: float,
    dmpo_alpha: float,
    group_size: int,
) -> Tensor:
    """Each pair's loss term l_i (B,); the loss is mean_i(weight_i * l_i).

    ``margin`` is u (B,); ``model_err_w`` is pred_w - target and ``policy_ref_gap_w`` is
    pred_w - ref_w ("pred2"), both (B, ...), only used by DSPO. ``group_size``: the pairs that
    share DSPO-SDXL's switch (the lambda groups: B for "batch", 1 for "pair").
    """
    if method == "diffusion-dpo":
        # -log sigmoid(u), written as softplus(-u) for stability at large |u|.
        return F.softplus(-margin)
    if method == "dmpo":
        # KL(Bernoulli(p) || Bernoulli(q)) with p = sigmoid(u): pulls u toward logit(1 - alpha).
        log_q, log_one_minus_q = dmpo_log_q(dmpo_alpha)
        prob = torch.sigmoid(margin)
        log_p = -F.softplus(-margin)
        log_one_minus_p = -F.softplus(margin)
        return prob * (log_p - log_q) + (1.0 - prob) * (log_one_minus_p - log_one_minus_q)
    # DSPO: s = 1 - sigmoid(u) = sigmoid(-u), NOT detached: the gradient flows through u.
    shape = (-1,) + (1,) * (model_err_w.dim() - 1)
    s = torch.sigmoid(-margin)
    if method == "dspo":
        residual = model_err_w - beta * s.view(shape) * policy_ref_gap_w
        return residual.square().flatten(1).mean(1)
    if method == "dspo-sdxl":
        gap_sq = policy_ref_gap_w.square().flatten(1).mean(1)
        # The reference decides once per micro-batch, with a Python `if` on the micro-batch's
        # mean gap (a host sync). A group here is one of its micro-batches, so each group
        # decides for its own pairs; torch.where keeps the step capturable.
        use_gap = group_mean(gap_sq.detach(), group_size) >= DSPO_SDXL_GAP_THRESHOLD
        return torch.where(use_gap, s.square() * gap_sq, s.square())
    raise ValueError(f"method: unknown {method!r}; expected one of {METHODS}")


def preference_loss_reference(
    model_pred: Tensor,
    ref_pred: Tensor,
    target: Tensor,
    settings: LossSettings,
    pair_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss and detached statistics in plain PyTorch.

    ``settings.group_size``: None for one lambda per call (the reference's "batch"), else the
    number of consecutive pairs that share a lambda and DSPO-SDXL's switch (1 = per pair); each
    group is one of the reference's micro-batches. ``settings.mu=None`` turns the safeguard off.

    The loss is the mean over pairs of the per-pair terms. When every group has G pairs, that
    equals the mean over groups of each group's own loss (mean over its G pairs), i.e. the
    reference's loss averaged over micro-batches by gradient accumulation:
    (1/B) sum_i l_i = (1/(B/G)) sum_g (1/G) sum_{i in g} l_i. With a short last group the pair
    mean weights every pair alike (the reference would weight the short micro-batch's pairs more).

    Returns ``(loss, stats)``; ``stats["lambda"]`` is (B,) here, the API reduces it for "batch".
    """
    method, beta, mu, dmpo_alpha = settings.method, settings.beta, settings.mu, settings.dmpo_alpha
    batch_pairs = model_pred.shape[0] // 2
    dtype = compute_dtype_for(model_pred.dtype)
    pred = model_pred.to(dtype).unflatten(0, (2, batch_pairs))
    ref = ref_pred.detach().to(dtype).unflatten(0, (2, batch_pairs))
    noise = target.detach().to(dtype)
    # A (B, ...) target is the noise shared by a pair: broadcast it over both halves, no copy.
    noise = (
        noise.unsqueeze(0)
        if noise.shape[0] == batch_pairs
        else noise.unflatten(0, (2, batch_pairs))
    )

    model_err = pred - noise
    ref_err = ref - noise
    model_mse = model_err.square().flatten(2).mean(2)  # (2, B): L_w, L_l
    ref_mse = ref_err.square().flatten(2).mean(2)  # (2, B): R_w, R_l (constants)
    model_mse_w, model_mse_l = model_mse[0], model_mse[1]
    ref_mse_w, ref_mse_l = ref_mse[0], ref_mse[1]

    if mu is None:
        scale = torch.ones(batch_pairs, dtype=dtype, device=model_pred.device)
        scaled_mse_l = model_mse_l
    else:
        scale = safeguard_lambda(
            model_err[0], model_err[1], mu, settings.pairs_per_group(batch_pairs)
        )
        scaled_mse_l = scale_gradient(model_mse_l, scale)

    margin = -(beta / 2.0) * ((model_mse_w - scaled_mse_l) - (ref_mse_w - ref_mse_l))
    terms = per_pair_terms(
        method,
        margin,
        model_err[0],
        pred[0] - ref[0],
        beta,
        dmpo_alpha,
        settings.pairs_per_group(batch_pairs),
    )
    if pair_weights is not None:
        terms = terms * pair_weights.detach().to(dtype)
    loss = terms.mean()

    margin = margin.detach()
    stats = {
        "lambda": scale.detach(),
        # A tie (u = 0, as at step 1 where the policy is the reference) counts one half, as
        # the official Diffusion-DPO trainer counts it: its first logged accuracy is 0.5.
        "implicit_acc": ((margin > 0).to(dtype) + 0.5 * (margin == 0).to(dtype)).mean(),
        "margin": margin.mean(),
        "model_mse_w": model_mse_w.detach().mean(),
        "model_mse_l": model_mse_l.detach().mean(),
        "ref_mse_w": ref_mse_w.mean(),
        "ref_mse_l": ref_mse_l.mean(),
        "win_gap": (model_mse_w.detach() - ref_mse_w).mean(),
        "lose_gap": (model_mse_l.detach() - ref_mse_l).mean(),
    }
    return loss, stats
