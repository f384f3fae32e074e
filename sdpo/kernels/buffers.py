"""The buffers both fused backends (Triton, CUDA) write: one allocation helper for each pass.

Torch only (no Triton import), so the CUDA backend uses it without loading Triton.

Forward: a workspace (the per-(pair, chunk) partial sums and the group scratch) and the four
outputs, loss (), stats (NUM_FUSED_STATS,), lambda (B,) and coefficients (2, 2B), all fp32.
Eagerly the workspace, stats, lambda and coefficients come from ONE ``torch.empty`` cut into
views (each ``torch.empty`` costs ~2-4 us of host time on a 2-core CPU, one split ~4 us for all
four). The loss has a buffer of its own: the caller may modify it in place (``loss /= steps``),
which autograd refuses for a view made inside a ``torch.autograd.Function``. A
``torch.library`` custom op may not return outputs that alias each other, so the op bodies ask
for separate buffers throughout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdpo import reference

# The fused forward's statistics: reference.STAT_NAMES in order, then the DSPO-SDXL gap mean.
NUM_FUSED_STATS = len(reference.STAT_NAMES) + 1
# Each view of the one eager buffer starts on a 16-byte boundary (4 fp32), the alignment a
# separately allocated buffer has and the one Triton specialises its pointer arguments on.
_ALIGN_FLOATS = 4


def _aligned(floats: int) -> int:
    return -(-floats // _ALIGN_FLOATS) * _ALIGN_FLOATS


def forward_buffer_sizes(batch_pairs: int, workspace_floats: int) -> tuple[int, ...]:
    """fp32 counts of (workspace, stats, lambda, coefficients) in the one eager buffer, each
    rounded up to a 16-byte multiple; the views take the unpadded prefix of each."""
    return tuple(
        _aligned(floats)
        for floats in (workspace_floats, NUM_FUSED_STATS, batch_pairs, 4 * batch_pairs)
    )


def forward_buffers(
    device: torch.device,
    batch_pairs: int,
    workspace_floats: int,
    *,
    one_allocation: bool,
    sizes: tuple[int, ...] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(workspace (workspace_floats,), loss (), stats (NUM_FUSED_STATS,), lambda (B,),
    coefficients (2, 2B)), fp32 on ``device``, uninitialised.

    ``one_allocation``: the loss alone, the rest views of one ``torch.empty`` (the eager path);
    False gives five separate tensors (custom-op bodies: their outputs must not alias).
    ``sizes``: a cached :func:`forward_buffer_sizes` of the same arguments.
    """
    rows = 2 * batch_pairs
    if not one_allocation:
        return (
            torch.empty((workspace_floats,), dtype=torch.float32, device=device),
            torch.empty((), dtype=torch.float32, device=device),
            torch.empty((NUM_FUSED_STATS,), dtype=torch.float32, device=device),
            torch.empty((batch_pairs,), dtype=torch.float32, device=device),
            torch.empty((2, rows), dtype=torch.float32, device=device),
        )
    if sizes is None:
        sizes = forward_buffer_sizes(batch_pairs, workspace_floats)
    loss = torch.empty((), dtype=torch.float32, device=device)
    buffer = torch.empty((sum(sizes),), dtype=torch.float32, device=device)
    workspace, stats, scale, coefficients = buffer.split_with_sizes(sizes)
    # Padded segments: narrow each to its length (stats always; the others only when padded).
    if sizes[1] != NUM_FUSED_STATS:
        stats = stats[:NUM_FUSED_STATS]
    if sizes[2] != batch_pairs:
        scale = scale[:batch_pairs]
    if sizes[0] != workspace_floats:
        workspace = workspace[:workspace_floats]
    return workspace, loss, stats, scale, coefficients.view(2, rows)


def gradient_buffers(grad_loss: Tensor, model_pred: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_output, grad) of a gradient launch: the incoming d/d loss as an fp32 tensor whose
    first element the kernel reads, and a new contiguous buffer like ``model_pred``."""
    grad = torch.empty_like(model_pred, memory_format=torch.contiguous_format)
    # A 0-dim fp32 tensor (the common case) already is a pointer to its one value, even when it
    # arrives expanded from `.sum().backward()`; anything else is copied into a (1,) fp32.
    if grad_loss.dtype is not torch.float32 or grad_loss.dim() != 0:
        grad_loss = grad_loss.reshape(1).to(torch.float32).contiguous()
    return grad_loss, grad
