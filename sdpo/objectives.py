"""The public API: :func:`preference_loss` validates, picks a backend and returns loss + stats."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from sdpo import reference

# parse_granularity is re-exported: sdpo.parse_granularity and the trainer's config use it.
from sdpo.settings import LossSettings, parse_granularity  # noqa: F401

METHODS = reference.METHODS
BACKENDS = ("auto", "torch", "triton", "cuda")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class PreferenceLoss(NamedTuple):
    """What :func:`preference_loss` returns.

    ``loss``: 0-dim fp32 tensor (fp64 for fp64 inputs) with the gradient of the objective.
    ``stats``: detached tensors, never synced to the host here: ``lambda`` (0-dim for
    granularity "batch", (B,) otherwise; 1 when the safeguard is off), ``implicit_acc``,
    ``margin`` (mean u), ``model_mse_w``, ``model_mse_l``, ``ref_mse_w``, ``ref_mse_l``,
    ``win_gap`` (mean L_w - R_w), ``lose_gap`` (mean L_l - R_l), and, when ``pair_weights``
    lives on an accelerator, ``negative_pair_weights`` (0-dim bool: checking it here would
    sync, so the caller reads it with the other stats).
    """

    loss: Tensor
    stats: dict[str, Tensor]


def _check_prediction(name: str, tensor: object) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name}: expected a floating tensor (float16, bfloat16, float32 or float64), got "
            f"{tensor.dtype}; cast it with .float()"
        )
    return tensor


def validate_inputs(
    model_pred: Tensor,
    ref_pred: Tensor,
    target: Tensor,
    *,
    method: str,
    beta: float,
    mu: float | None,
    granularity: str,
    dmpo_alpha: float,
    pair_weights: Tensor | None,
    backend: str,
) -> LossSettings:
    """Checks every argument from shapes, dtypes and Python values only (no device sync).

    Returns the validated :class:`LossSettings`. Raises ValueError naming the argument and what
    was expected.
    """
    _check_prediction("model_pred", model_pred)
    _check_prediction("ref_pred", ref_pred)
    _check_prediction("target", target)
    if model_pred.dim() < 2 or model_pred.shape[0] < 2 or model_pred.shape[0] % 2:
        raise ValueError(
            "model_pred: expected shape (2B, ...) with the B winners first and the B losers after, "
            "so an even first dimension >= 2 and at least one more dimension (one row per "
            f"image); got {tuple(model_pred.shape)}"
        )
    # shape[0] >= 2 here, so the rows are empty exactly when the tensor is (numel() is ~1 us,
    # model_pred[0].numel() ~4 us: it builds a view).
    if model_pred.numel() == 0:
        # A row of no elements has no mean squared error (0 / 0 is NaN).
        raise ValueError(
            f"model_pred: expected at least one element per row, got shape {tuple(model_pred.shape)}"
        )
    batch_pairs = model_pred.shape[0] // 2
    if ref_pred.shape != model_pred.shape:
        raise ValueError(
            f"ref_pred: expected the shape of model_pred {tuple(model_pred.shape)}, got "
            f"{tuple(ref_pred.shape)}"
        )
    per_pair_shape = (batch_pairs, *model_pred.shape[1:])
    if target.shape != model_pred.shape and target.shape != per_pair_shape:
        raise ValueError(
            f"target: expected {tuple(model_pred.shape)} (one row per prediction) or "
            f"{per_pair_shape} (the noise shared by each pair), got {tuple(target.shape)}"
        )
    for name, tensor in (("ref_pred", ref_pred), ("target", target)):
        if tensor.device != model_pred.device:
            raise ValueError(
                f"{name}: expected the device of model_pred ({model_pred.device}), got {tensor.device}"
            )
    settings = LossSettings.from_arguments(
        method=method, beta=beta, mu=mu, granularity=granularity, dmpo_alpha=dmpo_alpha
    )
    if pair_weights is not None:
        if not isinstance(pair_weights, Tensor) or pair_weights.dtype not in FLOAT_DTYPES:
            raise ValueError(
                "pair_weights: expected None or a floating tensor of shape (B,), got "
                f"{getattr(pair_weights, 'dtype', type(pair_weights).__name__)}"
            )
        if pair_weights.shape != (batch_pairs,):
            raise ValueError(
                f"pair_weights: expected shape ({batch_pairs},), one weight per pair, got "
                f"{tuple(pair_weights.shape)}"
            )
        if pair_weights.device != model_pred.device:
            raise ValueError(
                f"pair_weights: expected the device of model_pred ({model_pred.device}), got "
                f"{pair_weights.device}"
            )
        # Reading values of a CPU tensor costs no device sync; on an accelerator the check is
        # returned as stats["negative_pair_weights"] instead. Skipped while tracing.
        if pair_weights.device.type == "cpu" and not torch.compiler.is_compiling():
            if bool((pair_weights < 0).any()):
                raise ValueError("pair_weights: expected non-negative weights, got a negative one")
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown {backend!r}; expected one of {', '.join(BACKENDS)}")
    return settings


def poison_nonfinite(loss: Tensor, stats: dict[str, Tensor], pair_weights: Tensor | None) -> Tensor:
    """``loss``, made NaN when any input element is inf or NaN (every backend but "triton" goes
    through it; the Triton finalize kernel adds the same term to the loss it writes).

    A non-finite input need not give a non-finite loss on its own: an inf in ref_pred makes u
    infinite and softplus(-u) exactly 0, with a finite gradient, so a caller's finite check
    would pass. The per-row mean squared errors of every input are already computed (the
    stats), are >= 0 so they cannot cancel, and are inf or NaN exactly when an input element is
    (or its square overflows). Adding 0 x their sum leaves a finite loss bit for bit
    (x + 0.0 == x) and makes it NaN otherwise, with no host sync; the term is detached, so the
    gradient is unchanged.
    """
    poison = stats["model_mse_w"] + stats["model_mse_l"] + stats["ref_mse_w"] + stats["ref_mse_l"]
    if pair_weights is not None:
        poison = poison + pair_weights.detach().sum()
    return loss + 0.0 * poison.to(loss.dtype)


def resolve_backend(backend: str, device: torch.device) -> str:
    """ "auto" picks the fused Triton kernels on CUDA when they are available, else "torch"."""
    if backend == "auto":
        from sdpo import ops

        return "triton" if device.type == "cuda" and ops.triton_available(device) else "torch"
    if backend == "triton":
        from sdpo import ops

        ops.require_triton(device)
    if backend == "cuda":
        from sdpo import cuda_backend

        cuda_backend.require_cuda(device)
    return backend


def preference_loss(
    model_pred: Tensor,
    ref_pred: Tensor,
    target: Tensor,
    *,
    method: str = "diffusion-dpo",
    beta: float = 5000.0,
    mu: float | None = None,
    granularity: str = "batch",
    dmpo_alpha: float = 0.0,
    pair_weights: Tensor | None = None,
    backend: str = "auto",
) -> PreferenceLoss:
    """Preference objective for a batch of B pairs, with the optional Diffusion-SDPO safeguard.

    With e = model_pred - target, L = mean over (C, H, W) of e^2 per row and R the same for
    ref_pred (a constant), the margin is ``u_i = -(beta/2) ((L_w,i - L_l,i) - (R_w,i - R_l,i))``:

    - "diffusion-dpo" (arXiv 2311.12908): ``mean_i softplus(-u_i)``.
    - "dspo" (ICLR 2025, SD1.5 form): ``mean (e_w - beta * sigmoid(-u) * (pred_w - ref_w))^2``.
    - "dspo-sdxl": ``mean (sigmoid(-u) (pred_w - ref_w))^2``, or ``mean sigmoid(-u)^2`` when
      the winners' mean squared policy-reference gap is below 0.1, decided per lambda group
      (the reference's micro-batch): once for "batch", per pair, or per G pairs.
    - "dmpo" (arXiv 2507.07510): ``mean_i KL(Bernoulli(sigmoid u_i) || Bernoulli(1 - alpha))``.

    Safeguard (Diffusion-SDPO, arXiv 2511.03317): with ``mu`` in [0, 1] the gradient reaching
    the losers' errors is multiplied by ``lambda = clip((1 - mu) S_ww / (S_wl + 1e-9 N^2/4), 0, 1)``
    (1 where S_wl <= 0), S_ww = sum e_w^2 and S_wl = sum e_w e_l over a group of N winner
    elements, so the winners' error does not rise to first order. Values (loss, u, accuracy)
    are unchanged; there is no second backward pass and no host sync.

    Args:
        model_pred: (2B, ...) policy output, the B winners first.
        ref_pred: (2B, ...) reference-model output (treated as a constant).
        target: (2B, ...) or (B, ...), the target a pair shares (noise or v).
        method: "diffusion-dpo", "dspo", "dspo-sdxl" or "dmpo".
        beta: the scale of u. Convention: per-element mean with the factor 1/2 above, so the
            reference scripts' 5000 (SD1.5, SDXL) is the diffusers example's 2500.
        mu: None for the plain method, else the safeguard margin in [0, 1].
        granularity: "batch" (one lambda per call, the reference), "pair" (one per pair, the
            bound then holds for every pair and any non-negative pair weights) or "group:G".
        dmpo_alpha: DMPO's alpha; u is pulled toward logit(1 - alpha).
        pair_weights: optional (B,) non-negative weights on each pair's term (timestep masks,
            importance weights); they do not enter lambda.
        backend: "torch" (this reference), "triton" (fused kernels), "cuda" (their CUDA C++
            twin, built with CMake) or "auto" (Triton on CUDA when available, else torch).

    All loss math runs in fp32 (fp64 for fp64 inputs) whatever the input dtype.
    """
    settings = validate_inputs(
        model_pred,
        ref_pred,
        target,
        method=method,
        beta=beta,
        mu=mu,
        granularity=granularity,
        dmpo_alpha=dmpo_alpha,
        pair_weights=pair_weights,
        backend=backend,
    )
    chosen = resolve_backend(backend, model_pred.device)
    if chosen == "triton":
        from sdpo.ops import preference_loss_triton as implementation
    elif chosen == "cuda":
        from sdpo.cuda_backend import preference_loss_cuda as implementation
    else:
        implementation = reference.preference_loss_reference
    loss, stats = implementation(model_pred, ref_pred, target, settings, pair_weights)
    if chosen != "triton":
        # The Triton finalize kernel adds this same term to the loss it writes (no host ops).
        loss = poison_nonfinite(loss, stats, pair_weights)
    if settings.group_size is None:
        # One lambda for the whole call: report it as a 0-dim tensor.
        stats["lambda"] = stats["lambda"][0]
    if pair_weights is not None and pair_weights.device.type != "cpu":
        stats["negative_pair_weights"] = (pair_weights < 0).any().detach()
    return PreferenceLoss(loss, stats)
