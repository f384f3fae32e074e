"""An independent statement of every objective, written the way the reference trainer is.

It shares no code with ``sdpo``: lambda comes from two ``torch.autograd.grad`` calls on the
mean winner and loser errors of each group (the reference's separate pass), not from the raw
sums the package uses, and each loss is written from its paper's formula.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def group_slices(batch_pairs: int, group_size: int | None) -> list[slice]:
    size = batch_pairs if group_size is None else group_size
    return [slice(start, min(start + size, batch_pairs)) for start in range(0, batch_pairs, size)]


def reference_trainer_lambda(
    winner_pred: Tensor, loser_pred: Tensor, winner_target: Tensor, loser_target: Tensor, mu: float
) -> Tensor:
    """lambda = (1 - mu) |gA|^2 / (<gA, gB> + 1e-9), clipped to [0, 1]; 1 if <gA, gB> <= 0."""
    winner_leaf = winner_pred.detach().requires_grad_(True)
    loser_leaf = loser_pred.detach().requires_grad_(True)
    mean_winner_error = (winner_leaf - winner_target).pow(2).mean()
    mean_loser_error = (loser_leaf - loser_target).pow(2).mean()
    (grad_a,) = torch.autograd.grad(mean_winner_error, winner_leaf)
    (grad_b,) = torch.autograd.grad(mean_loser_error, loser_leaf)
    dot = (grad_a * grad_b).sum()
    norm_sq = (grad_a * grad_a).sum()
    if dot <= 0:
        return torch.ones((), dtype=dot.dtype)
    return ((1 - mu) * norm_sq / (dot + 1e-9)).clamp(0.0, 1.0)


def independent_loss(
    model_pred: Tensor,
    ref_pred: Tensor,
    target: Tensor,
    *,
    method: str,
    beta: float,
    mu: float | None = None,
    group_size: int | None = None,
    dmpo_alpha: float = 0.0,
    pair_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Returns (loss, lambda per pair) in the dtype of the inputs."""
    batch_pairs = model_pred.shape[0] // 2
    full_target = target if target.shape[0] == model_pred.shape[0] else torch.cat([target, target])
    reduce_dims = list(range(1, model_pred.dim()))
    model_losses = (model_pred - full_target).pow(2).mean(dim=reduce_dims)
    ref_losses = (ref_pred.detach() - full_target).pow(2).mean(dim=reduce_dims)
    model_losses_w, model_losses_l = model_losses.chunk(2)
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)

    lambdas = torch.ones(batch_pairs, dtype=model_losses.dtype)
    if mu is not None:
        for part in group_slices(batch_pairs, group_size):
            lambdas[part] = reference_trainer_lambda(
                model_pred[:batch_pairs][part],
                model_pred[batch_pairs:][part],
                full_target[:batch_pairs][part],
                full_target[batch_pairs:][part],
                mu,
            )
        model_losses_l = model_losses_l.detach() + lambdas * (
            model_losses_l - model_losses_l.detach()
        )

    inside_term = -0.5 * beta * ((model_losses_w - model_losses_l) - (ref_losses_w - ref_losses_l))
    weights = (
        torch.ones(batch_pairs, dtype=inside_term.dtype) if pair_weights is None else pair_weights
    )
    if method == "diffusion-dpo":
        per_pair = -F.logsigmoid(inside_term)
    elif method == "dmpo":
        q = min(max(1 - dmpo_alpha, 1e-6), 1 - 1e-6)
        p = torch.sigmoid(inside_term)
        per_pair = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    elif method in ("dspo", "dspo-sdxl"):
        pred2 = (model_pred - ref_pred.detach())[:batch_pairs]
        shape = (batch_pairs,) + (1,) * (model_pred.dim() - 1)
        s = (1 - torch.sigmoid(inside_term)).reshape(shape)
        if method == "dspo":
            winner_error = model_pred[:batch_pairs] - full_target[:batch_pairs]
            per_pair = (winner_error - beta * s * pred2).pow(2).mean(dim=reduce_dims)
        else:
            # The switch is decided per micro-batch in the reference; here a group is one.
            per_pair = torch.empty(batch_pairs, dtype=inside_term.dtype)
            for part in group_slices(batch_pairs, group_size):
                if pred2[part].pow(2).mean() >= 0.1:
                    per_pair[part] = (s[part] * pred2[part]).pow(2).mean(dim=reduce_dims)
                else:
                    per_pair[part] = s[part].pow(2).flatten()
    else:
        raise AssertionError(method)
    return (weights * per_pair).mean(), lambdas


def beta_for(method: str) -> float:
    """A beta per method that keeps u of order 1 on unit-variance test inputs with D ~ 100."""
    return {"diffusion-dpo": 50.0, "dmpo": 20.0, "dspo": 0.5, "dspo-sdxl": 20.0}[method]


def make_inputs(
    batch_pairs: int,
    sample_shape: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float64,
    shared_target: bool = True,
    correlated: bool = True,
    ref_offset: float = 0.1,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(model_pred, ref_pred, target). Winner and loser errors correlate (as they do when a pair
    shares noise and timestep) so that S_wl > 0 and lambda is really exercised."""
    generator = torch.Generator().manual_seed(seed)
    rows = 2 * batch_pairs
    target = torch.randn(
        (batch_pairs if shared_target else rows, *sample_shape), generator=generator
    )
    full_target = target if not shared_target else torch.cat([target, target])
    common = torch.randn((batch_pairs, *sample_shape), generator=generator)
    noise = torch.randn((rows, *sample_shape), generator=generator)
    error = noise + (torch.cat([common, 1.5 * common]) if correlated else 0)
    model_pred = full_target + 0.5 * error
    ref_pred = model_pred + ref_offset * torch.randn((rows, *sample_shape), generator=generator)
    return model_pred.to(dtype), ref_pred.to(dtype), target.to(dtype)


def logit(probability: float) -> float:
    return math.log(probability / (1 - probability))


def reference_micro_batch_dspo_sdxl(
    model_pred: Tensor, ref_pred: Tensor, target: Tensor, *, beta: float, mu: float | None
) -> Tensor:
    """One micro-batch of the reference trainer's SDXL DSPO loss, line by line from its script:
    the (2b, ...) micro-batch has its b winners first; one lambda and one switch for all of it."""
    model_losses = (model_pred - target).pow(2).mean(dim=list(range(1, model_pred.dim())))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    if mu is None:
        lose_l_scale = 1.0
    else:
        winner_pred, loser_pred = model_pred.chunk(2)
        winner_target, loser_target = target.chunk(2)
        lose_l_scale = reference_trainer_lambda(
            winner_pred, loser_pred, winner_target, loser_target, mu
        )
    model_losses_l_scaled = model_losses_l.detach() + lose_l_scale * (
        model_losses_l - model_losses_l.detach()
    )
    model_diff = model_losses_w - model_losses_l_scaled
    ref_losses = (ref_pred.detach() - target).pow(2).mean(dim=list(range(1, ref_pred.dim())))
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    inside_term = -0.5 * beta * (model_diff - (ref_losses_w - ref_losses_l))
    pred2, _ = (model_pred - ref_pred.detach()).chunk(2)
    one_minus_sigmoid = (1 - torch.sigmoid(inside_term)).reshape(
        (-1,) + (1,) * (model_pred.dim() - 1)
    )
    dims = list(range(1, model_pred.dim()))
    if pred2.pow(2).mean(dim=dims).mean() >= 0.1:
        return (one_minus_sigmoid * pred2).pow(2).mean(dim=dims).mean()
    return one_minus_sigmoid.pow(2).mean(dim=dims).mean()


def micro_batch_average_dspo_sdxl(
    model_pred: Tensor,
    ref_pred: Tensor,
    target: Tensor,
    *,
    beta: float,
    mu: float | None,
    micro_batch_pairs: int,
) -> Tensor:
    """The reference's gradient accumulation: the (2B, ...) batch split into micro-batches of
    ``micro_batch_pairs`` pairs (each with its own winners then losers), the mean of their
    losses. ``target`` is (B, ...), shared by a pair."""
    batch_pairs = model_pred.shape[0] // 2
    losses = []
    for part in group_slices(batch_pairs, micro_batch_pairs):
        rows = torch.cat(
            [torch.arange(batch_pairs)[part], batch_pairs + torch.arange(batch_pairs)[part]]
        )
        micro_target = torch.cat([target[part], target[part]])
        losses.append(
            reference_micro_batch_dspo_sdxl(
                model_pred[rows], ref_pred[rows], micro_target, beta=beta, mu=mu
            )
        )
    return torch.stack(losses).mean()


def concat_pairs(*inputs: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Joins make_inputs outputs (shared targets) pair-wise: all winners first, then all losers,
    so the pairs of the first input come first in each half."""
    halves = [(pred.chunk(2), ref.chunk(2)) for pred, ref, _ in inputs]
    model_pred = torch.cat([h[0][0] for h in halves] + [h[0][1] for h in halves])
    ref_pred = torch.cat([h[1][0] for h in halves] + [h[1][1] for h in halves])
    target = torch.cat([t for _, _, t in inputs])
    return model_pred, ref_pred, target


def dspo_sdxl_split_inputs(group_size: int, groups: int, sample_shape: tuple[int, ...]):
    """fp64 inputs whose consecutive groups of ``group_size`` pairs alternate below (mean gap^2
    ~ 0.01) and above (~ 0.25) DSPO-SDXL's threshold of 0.1."""
    return concat_pairs(
        *(
            make_inputs(group_size, sample_shape, ref_offset=(0.1, 0.5)[g % 2], seed=g)
            for g in range(groups)
        )
    )


def independent_accuracy(model_pred: Tensor, ref_pred: Tensor, target: Tensor, beta: float):
    """The implicit accuracy as the official Diffusion-DPO trainer writes it: the fraction of
    pairs whose inside term is positive, plus one half of the fraction that are exactly 0."""
    full_target = target if target.shape[0] == model_pred.shape[0] else torch.cat([target, target])
    dims = list(range(1, model_pred.dim()))
    model_losses_w, model_losses_l = (model_pred - full_target).pow(2).mean(dim=dims).chunk(2)
    ref_losses_w, ref_losses_l = (ref_pred - full_target).pow(2).mean(dim=dims).chunk(2)
    inside_term = -0.5 * beta * ((model_losses_w - model_losses_l) - (ref_losses_w - ref_losses_l))
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    implicit_acc += 0.5 * (inside_term == 0).sum().float() / inside_term.size(0)
    return implicit_acc


def anti_correlated_inputs(batch_pairs: int, sample_shape: tuple[int, ...], *, seed: int = 0):
    """fp64 inputs whose loser error is about minus the winner's, so S_wl < 0 in every pair
    (and every group): the safeguard's lambda = 1 branch."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_pairs, *sample_shape)
    target = torch.randn(shape, generator=generator, dtype=torch.float64)
    error_w = torch.randn(shape, generator=generator, dtype=torch.float64)
    error_l = -error_w + 0.3 * torch.randn(shape, generator=generator, dtype=torch.float64)
    model_pred = torch.cat([target + 0.5 * error_w, target + 0.5 * error_l])
    ref_pred = model_pred + 0.1 * torch.randn(
        model_pred.shape, generator=generator, dtype=torch.float64
    )
    return model_pred, ref_pred, target


def tie_inputs(batch_pairs: int, sample_shape: tuple[int, ...], *, seed: int = 0):
    """Each pair's loser is its winner (prediction, reference and shared target): u = 0 exactly
    and S_wl = S_ww, so lambda = (1 - mu) S_ww / (S_ww + eps)."""
    model_pred, ref_pred, target = make_inputs(batch_pairs, sample_shape, seed=seed)
    model_pred = torch.cat([model_pred[:batch_pairs]] * 2)
    ref_pred = torch.cat([ref_pred[:batch_pairs]] * 2)
    return model_pred, ref_pred, target


def switch_case_table() -> list[tuple[str, tuple[Tensor, Tensor, Tensor], dict]]:
    """The inputs where the safeguard's and DSPO-SDXL's branches switch, run by every backend:
    (name, (model_pred, ref_pred, target) in fp64, preference_loss keyword arguments)."""
    shape = (2, 3, 7)  # D = 42: not a multiple of any vector width
    correlated = make_inputs(2, shape, seed=3)
    mixed = concat_pairs(anti_correlated_inputs(2, shape, seed=1), correlated)
    policy_is_reference = make_inputs(3, shape, seed=4)
    policy_is_reference = (
        policy_is_reference[0],
        policy_is_reference[0].clone(),
        policy_is_reference[2],
    )
    below_above = dspo_sdxl_split_inputs(2, 3, shape)  # groups of 2 alternate around 0.1
    below_above = tuple(
        torch.cat([t[:5], t[6:11]]) if t.shape[0] == 12 else t[:5] for t in below_above
    )  # 5 pairs: groups of 2 below, 2 above, then a short last one (1 pair) below
    return [
        ("anti-correlated, one lambda", anti_correlated_inputs(3, shape),
         dict(method="diffusion-dpo", beta=50.0, mu=0.6, granularity="batch")),
        ("anti-correlated and correlated pairs", mixed,
         dict(method="dmpo", beta=20.0, mu=0.6, granularity="pair", dmpo_alpha=0.01)),
        ("ties: loser = winner", tie_inputs(3, shape),
         dict(method="diffusion-dpo", beta=50.0, mu=0.5, granularity="pair")),
        ("policy = reference (u = 0)", policy_is_reference,
         dict(method="dspo-sdxl", beta=20.0, mu=0.6, granularity="group:2")),
        ("dspo-sdxl groups across the switch, short last", below_above,
         dict(method="dspo-sdxl", beta=20.0, mu=0.6, granularity="group:2")),
        ("dspo, policy = reference", policy_is_reference,
         dict(method="dspo", beta=0.5, mu=0.6, granularity="batch")),
    ]  # fmt: skip
