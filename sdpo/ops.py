"""The op layer for the fused Triton kernels (backend="triton").

Two ``torch.library`` custom ops with fake implementations, so ``torch.compile(fullgraph=True)``
traces the loss as two opaque nodes and a CUDA graph can capture forward and backward (no host
sync, all buffers allocated by PyTorch):

- ``sdpo::fused_preference_forward``: the pair-sums and finalize kernels; returns the loss, the
  statistics, lambda and the per-row gradient coefficients (2, 2B).
- ``sdpo::fused_preference_backward``: the gradient kernel; writes d loss / d model_pred into a
  buffer it allocates, the loser half already scaled by lambda (no second autograd pass).

``custom_op`` + ``register_fake`` works eagerly and under ``torch.compile`` both on CUDA and on
the CPU under ``TRITON_INTERPRET=1`` (``triton_op`` would need extra interpreter workarounds).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch
from torch import Tensor

from sdpo import reference
from sdpo.kernels import buffers
from sdpo.settings import LossSettings


def interpreter_enabled() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_INSTALLED: list[bool] = []  # the answer, once known


def _triton_installed() -> bool:
    # Kept: an installation does not change within a process, and find_spec walks sys.path
    # while triton is not imported yet (~200 us). A list, not functools.cache: dynamo warns
    # about tracing through an lru_cache wrapper.
    if not _TRITON_INSTALLED:
        _TRITON_INSTALLED.append(importlib.util.find_spec("triton") is not None)
    return _TRITON_INSTALLED[0]


def triton_available(device: torch.device) -> bool:
    """Whether the fused kernels can run on ``device`` (CUDA, or CPU under the interpreter)."""
    if not _triton_installed():
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and interpreter_enabled()


def require_triton(device: torch.device) -> None:
    """Raises a clear error when backend="triton" cannot run on ``device``."""
    if triton_available(device):
        return
    if not _triton_installed():
        reason = "the `triton` package is not installed (pip install triton)"
    elif device.type == "cpu":
        reason = (
            "the inputs are on the CPU and Triton's interpreter is off: move them to a CUDA "
            "device, or set TRITON_INTERPRET=1 before starting Python (slow, for tests)"
        )
    else:
        reason = f"Triton cannot run on device {device}"
    raise RuntimeError(f'backend="triton": {reason}; backend="torch" or "auto" always works')


# The fused forward's statistics: reference.STAT_NAMES in order, then the DSPO-SDXL gap mean.
NUM_FUSED_STATS = buffers.NUM_FUSED_STATS
# Methods whose winners' gradient has a (pred - ref) term, so the backward reads ref_pred.
GAP_METHOD_CODES = (reference.METHOD_CODES["dspo"], reference.METHOD_CODES["dspo-sdxl"])


def fused_forward_fake_outputs(model_pred: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Shapes of a fused forward op's outputs: loss (), stats, lambda (B,), coefficients (2, 2B).
    The fake implementation of both fused forward ops (Triton here, CUDA in cuda_backend)."""
    rows = model_pred.shape[0]
    new = model_pred.new_empty
    return (
        new((), dtype=torch.float32),
        new((NUM_FUSED_STATS,), dtype=torch.float32),
        new((rows // 2,), dtype=torch.float32),
        new((2, rows), dtype=torch.float32),
    )


# forward op -> (forward, backward) as plain functions, for the eager path (see _EagerFused).
_EAGER_IMPLEMENTATIONS: dict = {}


def register_fused_autograd(forward_op, backward_op, eager_forward=None, eager_backward=None):
    """The autograd of a fused forward op (inputs: model_pred, ref_pred, target, pair_weights,
    method_code, ...; outputs: loss, stats, lambda, coefficients) whose backward op maps
    (grad_loss, model_pred, ref_pred, target, coefficients, with_gap) to d loss / d model_pred.
    ref_pred and target are constants of the objective (the reference has no gradient).

    ``eager_forward(model_pred, ref_pred, target, pair_weights, op_arguments)`` returns (loss,
    stats, lambda, coefficients, state) and ``eager_backward(grad_loss, model_pred, ref_pred,
    target, coefficients, state)`` the gradient, ``state`` being whatever the forward hands
    its backward (the launch plan): eager calls run them through one
    ``torch.autograd.Function`` instead of the custom-op dispatcher (which costs ~100 us of
    host time per forward + backward); traced code keeps the custom ops.
    """
    if eager_forward is not None and eager_backward is not None:
        _EAGER_IMPLEMENTATIONS[forward_op] = (eager_forward, eager_backward)

    def setup_context(ctx, inputs, output) -> None:
        model_pred, ref_pred, target, _weights, method_code, *_ = inputs
        ctx.save_for_backward(model_pred, ref_pred, target, output[3])
        ctx.with_gap = method_code in GAP_METHOD_CODES

    def backward(ctx, grad_loss, _grad_stats, _grad_lambda, _grad_coefficients):
        model_pred, ref_pred, target, coefficients = ctx.saved_tensors
        grad_pred = None
        if ctx.needs_input_grad[0]:
            grad_pred = backward_op(
                grad_loss, model_pred, ref_pred, target, coefficients, ctx.with_gap
            )
        return (grad_pred,) + (None,) * 9

    forward_op.register_autograd(backward, setup_context=setup_context)


def named_stats(stats: Tensor, scale: Tensor) -> dict[str, Tensor]:
    """A fused forward's stats vector as preference_loss's dict (lambda first)."""
    # One unbind instead of a Python-level index per statistic (each costs a view dispatch);
    # the ninth value (the DSPO-SDXL gap mean) has no name here.
    values = stats.unbind(0)
    return {"lambda": scale, **dict(zip(reference.STAT_NAMES, values, strict=False))}


def _kernels():
    # Imported on first use: Triton decides at decoration time whether to interpret.
    from sdpo.kernels import preference

    return preference


def _device_context(tensor: Tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def triton_forward(
    model_pred: Tensor,
    ref_pred: Tensor,
    target: Tensor,
    pair_weights: Tensor | None,
    method_code: int,
    beta: float,
    mu: float,
    safeguard: bool,
    group_size: int,
    dmpo_alpha: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss (), stats (9,), lambda (B,), coefficients (2, 2B)); ``group_size`` 0 = one lambda.
    Four separate output buffers (a custom op's outputs must not alias)."""
    op_arguments = (method_code, beta, mu, safeguard, group_size, dmpo_alpha)
    plan = _kernels().cached_plan(model_pred, ref_pred, target, pair_weights, op_arguments)
    with _device_context(model_pred):
        return _kernels().run_forward(
            plan, model_pred, ref_pred, target, pair_weights, one_allocation=False
        )


def triton_backward(
    grad_loss: Tensor,
    model_pred: Tensor,
    ref_pred: Tensor,
    target: Tensor,
    coefficients: Tensor,
    with_gap: bool,
) -> Tensor:
    """d loss / d model_pred: winners g0 (a e_w + b (pred_w - ref_w)), losers g0 c e_l."""
    with _device_context(model_pred):
        return _kernels().launch_gradient(
            grad_loss, model_pred, ref_pred, target, coefficients, with_gap=with_gap
        )


def triton_forward_eager(
    model_pred: Tensor,
    ref_pred: Tensor,
    target: Tensor,
    pair_weights: Tensor | None,
    op_arguments: tuple,
) -> tuple[Tensor, Tensor, Tensor, Tensor, object]:
    """triton_forward for the eager path: the outputs are views of one buffer, and the launch
    plan comes back too (the backward reuses its grid)."""
    plan = _kernels().cached_plan(model_pred, ref_pred, target, pair_weights, op_arguments)
    if model_pred.is_cuda:
        with torch.cuda.device(model_pred.device):
            outputs = _kernels().run_forward(
                plan, model_pred, ref_pred, target, pair_weights, one_allocation=True
            )
    else:
        outputs = _kernels().run_forward(
            plan, model_pred, ref_pred, target, pair_weights, one_allocation=True
        )
    return (*outputs, plan)


def triton_backward_eager(
    grad_loss: Tensor, model_pred: Tensor, ref_pred: Tensor, target: Tensor,
    coefficients: Tensor, plan,
) -> Tensor:  # fmt: skip
    """triton_backward with the forward's launch plan."""
    kernels = _kernels()
    if model_pred.is_cuda:
        with torch.cuda.device(model_pred.device):
            return kernels.launch_gradient(
                grad_loss, model_pred, ref_pred, target, coefficients, with_gap=plan.with_gap,
                plan=plan,
            )  # fmt: skip
    return kernels.launch_gradient(
        grad_loss, model_pred, ref_pred, target, coefficients, with_gap=plan.with_gap, plan=plan
    )


@torch.library.custom_op("sdpo::fused_preference_forward", mutates_args=())
def fused_preference_forward(
    model_pred: Tensor,
    ref_pred: Tensor,
    target: Tensor,
    pair_weights: Tensor | None,
    method_code: int,
    beta: float,
    mu: float,
    safeguard: bool,
    group_size: int,
    dmpo_alpha: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss (), stats (9,), lambda (B,), coefficients (2, 2B)); ``group_size`` 0 = one lambda."""
    return triton_forward(
        model_pred, ref_pred, target, pair_weights, method_code, beta, mu, safeguard,
        group_size, dmpo_alpha,
    )  # fmt: skip


@fused_preference_forward.register_fake
def _fused_preference_forward_fake(
    model_pred,
    ref_pred,
    target,
    pair_weights,
    method_code,
    beta,
    mu,
    safeguard,
    group_size,
    dmpo_alpha,
):
    return fused_forward_fake_outputs(model_pred)


@torch.library.custom_op("sdpo::fused_preference_backward", mutates_args=())
def fused_preference_backward(
    grad_loss: Tensor,
    model_pred: Tensor,
    ref_pred: Tensor,
    target: Tensor,
    coefficients: Tensor,
    with_gap: bool,
) -> Tensor:
    """d loss / d model_pred: winners g0 (a e_w + b (pred_w - ref_w)), losers g0 c e_l."""
    return triton_backward(grad_loss, model_pred, ref_pred, target, coefficients, with_gap)


@fused_preference_backward.register_fake
def _fused_preference_backward_fake(
    grad_loss, model_pred, ref_pred, target, coefficients, with_gap
):
    return torch.empty_like(model_pred, memory_format=torch.contiguous_format)


register_fused_autograd(
    fused_preference_forward, fused_preference_backward, triton_forward_eager,
    triton_backward_eager,
)  # fmt: skip


class _EagerFused(torch.autograd.Function):
    """The eager path of a fused op pair: the same kernels and the same autograd contract as
    register_fused_autograd, without the custom-op dispatcher. Only differentiable output:
    the loss; only differentiable input: model_pred. Four arguments (the ones that are not
    saved for the backward travel as one tuple): apply() inspects each one, ~1-2 us apiece on
    a 2-core CPU."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, rest):
        pair_weights, (forward, ctx.backward_function), op_arguments = rest
        loss, stats, scale, coefficients, ctx.state = forward(
            model_pred, ref_pred, target, pair_weights, op_arguments
        )
        ctx.save_for_backward(model_pred, ref_pred, target, coefficients)
        ctx.mark_non_differentiable(stats, scale, coefficients)
        # The three non-differentiable outputs get no gradient: leave theirs None instead of
        # three zero tensors allocated every backward.
        ctx.set_materialize_grads(False)
        return loss, stats, scale, coefficients

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats, _grad_scale, _grad_coefficients):
        grad_pred = None
        if ctx.needs_input_grad[0]:
            model_pred, ref_pred, target, coefficients = ctx.saved_tensors
            grad_pred = ctx.backward_function(
                grad_loss, model_pred, ref_pred, target, coefficients, ctx.state
            )
        return grad_pred, None, None, None


def preference_loss_fused(
    forward_op,
    model_pred: Tensor,
    ref_pred: Tensor,
    target: Tensor,
    settings: LossSettings,
    pair_weights: Tensor | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The fused counterpart of :func:`sdpo.reference.preference_loss_reference`, for either
    fused forward op (``sdpo::fused_preference_forward`` or ``sdpo::cuda_preference_forward``).

    Each input is handed to the op in its own dtype (the kernels read fp32, bf16 and fp16
    as they come). Non-contiguous inputs are copied explicitly (the kernels index rows as
    row * elements). Sums accumulate in fp32.
    """
    model_pred = model_pred.contiguous()
    # detach() only where there is a graph to cut (~1 us each on a 2-core CPU otherwise).
    ref_pred = (ref_pred.detach() if ref_pred.requires_grad else ref_pred).contiguous()
    target = (target.detach() if target.requires_grad else target).contiguous()
    if pair_weights is not None:
        pair_weights = pair_weights.detach().to(torch.float32).contiguous()
    eager = _EAGER_IMPLEMENTATIONS.get(forward_op)
    if eager is None or torch.compiler.is_compiling():
        # Traced (torch.compile), or no eager twin: the custom op, an opaque graph node.
        loss, stats, scale, _coefficients = forward_op(
            model_pred, ref_pred, target, pair_weights, *settings.op_arguments()
        )
    else:
        loss, stats, scale, _coefficients = _EagerFused.apply(
            model_pred, ref_pred, target, (pair_weights, eager, settings.op_arguments())
        )
    return loss, named_stats(stats, scale)


def preference_loss_triton(
    model_pred: Tensor,
    ref_pred: Tensor,
    target: Tensor,
    settings: LossSettings,
    pair_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """backend="triton": each input read in its own dtype (fp32, bf16, fp16; fp64 into fp32)."""
    return preference_loss_fused(
        fused_preference_forward, model_pred, ref_pred, target, settings, pair_weights
    )
