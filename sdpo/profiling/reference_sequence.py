"""The reference trainer's loss sequence, restated for benchmarks and the overhead suite.

This is what AIDC-AI/Diffusion-SDPO's training loop does per micro-step for Diffusion-DPO with the
safeguard (docs/objectives.md: 'Diffusion-DPO', 'The safeguard' and the pitfalls), kept here so
that benchmarks time the same work the reference does, and tests can check it computes the same
loss and gradient as ``sdpo.preference_loss`` (it does, up to the reference's reduction order):

1. per-sample means of the squared errors (policy, and reference without grad);
2. a SEPARATE ``torch.autograd.grad`` pass for the output-space gradients of the mean winner
   and loser errors, with respect to the whole (2B, ...) prediction;
3. lambda from their inner products, decided by a Python ``if`` on a device scalar (a host
   sync), then ``.item()`` for logging (another);
4. the detach trick ``L_l.detach() + lambda (L_l - L_l.detach())`` and ``-logsigmoid`` of u.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def reference_trainer_dpo_loss(
    model_pred: Tensor,
    ref_pred: Tensor,
    target: Tensor,
    *,
    beta: float = 5000.0,
    mu: float | None = 0.9,
) -> tuple[Tensor, float]:
    """Returns (loss, lambda as a Python float). ``model_pred`` must require grad."""
    batch_pairs = model_pred.shape[0] // 2
    full_target = (
        target
        if target.shape[0] == model_pred.shape[0]
        else target.repeat(2, *([1] * (target.dim() - 1)))
    )
    reduce_dims = list(range(1, model_pred.dim()))
    model_losses = (model_pred.float() - full_target.float()).pow(2).mean(dim=reduce_dims)
    model_losses_w, model_losses_l = model_losses.chunk(2)
    with torch.no_grad():
        ref_losses = (ref_pred.float() - full_target.float()).pow(2).mean(dim=reduce_dims)
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)

    scale_value = 1.0
    if mu is not None:
        (grad_w,) = torch.autograd.grad(model_losses_w.mean(), model_pred, retain_graph=True)
        (grad_l,) = torch.autograd.grad(model_losses_l.mean(), model_pred, retain_graph=True)
        grad_w = grad_w[:batch_pairs].float()
        grad_l = grad_l[batch_pairs:].float()
        dot = (grad_w * grad_l).sum()
        norm_sq = (grad_w * grad_w).sum()
        if dot > 0:  # host sync, as in the reference
            scale = ((1.0 - mu) * norm_sq / (dot + 1e-9)).clamp(0.0, 1.0)
        else:
            scale = torch.ones((), device=model_pred.device)
        scale_value = scale.item()  # logged every micro-step by the reference: another sync
        model_losses_l = model_losses_l.detach() + scale * (
            model_losses_l - model_losses_l.detach()
        )

    inside_term = -0.5 * beta * ((model_losses_w - model_losses_l) - (ref_losses_w - ref_losses_l))
    loss = -F.logsigmoid(inside_term).mean()
    return loss, scale_value
