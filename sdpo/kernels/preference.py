"""Fused Triton kernels for the preference objectives (docs/objectives.md, 'The fused form').

Every objective depends on the predictions only through seven per-pair sums:

    S_ww = sum e_w^2     S_ll = sum e_l^2     S_wl = sum e_w e_l        (policy, e = pred - target)
    S_rw = sum r_w^2     S_rl = sum r_l^2                               (reference, r = ref - target)
    S_wg = sum e_w g     S_gg = sum g^2                                 (DSPO only, g = pred_w - ref_w)

and its gradient with respect to the predictions is, per pair i,

    d loss / d pred_w,i = a_i e_w,i + b_i g_i        d loss / d pred_l,i = c_i e_l,i

where c_i already carries the safeguard's lambda_i (docs/objectives.md, 'The safeguard'). So:

1. ``pair_sums_kernel`` reads model_pred, ref_pred and target ONCE and writes the sums of each
   (pair, chunk) to a small partials buffer (no atomics: the result is deterministic, which
   exact resume relies on).
2. ``finalize_kernel`` (one program) reduces the partials, computes the MSEs, u, lambda (batch,
   pair or group), the loss, the statistics and the coefficients a, b, c, all on the device.
3. ``gradient_kernel`` is one elementwise pass that writes d loss / d model_pred into a buffer
   the op owns: winners ``g0 (a_i e_w + b_i g)``, losers ``g0 c_i e_l``.

Two launches forward, one backward: at the SD1.5 size (B = 8, 16384 elements per sample) the
reference trainer's sequence launches about 40 kernels, so launch latency dominates there.
Offsets are int64 (a Wan2.1 video latent is 2.1M elements per sample, 8.4M rows x elements).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from sdpo import chunking, reference
from sdpo.chunking import cdiv, next_power_of_2
from sdpo.kernels import buffers

# Method codes (compile-time switches in the kernels), shared with the CUDA twin.
METHOD_CODES = reference.METHOD_CODES
METHOD_DPO = METHOD_CODES["diffusion-dpo"]
METHOD_DSPO = METHOD_CODES["dspo"]
METHOD_DSPO_SDXL = METHOD_CODES["dspo-sdxl"]
METHOD_DMPO = METHOD_CODES["dmpo"]
# The same codes as the kernels read them: a @triton.jit function may read only constexpr globals.
KERNEL_DPO = tl.constexpr(METHOD_DPO)
KERNEL_DSPO = tl.constexpr(METHOD_DSPO)
KERNEL_DMPO = tl.constexpr(METHOD_DMPO)

NUM_SUMS = 8  # seven sums, padded to eight so each (pair, chunk) row is 32 bytes
# finalize_kernel writes the reference's statistics, in its order, then the DSPO-SDXL gap mean.
STAT_NAMES = reference.STAT_NAMES
NUM_STATS = len(STAT_NAMES) + 1

# The same constants as the plain-PyTorch reference, as compile-time values for the kernels.
SAFEGUARD_EPSILON = tl.constexpr(reference.SAFEGUARD_EPSILON)
DSPO_SDXL_GAP_THRESHOLD = tl.constexpr(reference.DSPO_SDXL_GAP_THRESHOLD)


@triton.jit
def pair_sums_kernel(
    pred_ptr,
    ref_ptr,
    target_ptr,
    partials_ptr,
    batch_pairs,
    elements,
    num_chunks,
    TARGET_SHARED: tl.constexpr,
    WITH_GAP: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCKS_PER_CHUNK: tl.constexpr,
):
    """Program (pair, chunk): the sums over elements [chunk * BLOCKS_PER_CHUNK * BLOCK, ...).

    The trip count is a compile-time power of two (plan_chunks), which keeps the number of
    compiled variants small (one per power) and the loop free of runtime bounds: Triton 3.6's
    interpreter cannot iterate over a runtime scalar (its ``__index__`` rejects the 1-element
    array that scalar arguments become under NumPy >= 2.3).
    """
    pair = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    winner_row = pair * elements
    loser_row = (pair + batch_pairs) * elements
    target_loser_row = winner_row if TARGET_SHARED else loser_row
    start = chunk * (BLOCKS_PER_CHUNK * BLOCK)
    offsets = tl.arange(0, BLOCK).to(tl.int64)

    sum_ww = tl.zeros((BLOCK,), dtype=tl.float32)
    sum_ll = tl.zeros((BLOCK,), dtype=tl.float32)
    sum_wl = tl.zeros((BLOCK,), dtype=tl.float32)
    sum_rw = tl.zeros((BLOCK,), dtype=tl.float32)
    sum_rl = tl.zeros((BLOCK,), dtype=tl.float32)
    sum_wg = tl.zeros((BLOCK,), dtype=tl.float32)
    sum_gg = tl.zeros((BLOCK,), dtype=tl.float32)
    for block in range(0, BLOCKS_PER_CHUNK):
        index = start + block * BLOCK + offsets
        mask = index < elements
        pred_w = tl.load(pred_ptr + winner_row + index, mask=mask, other=0.0).to(tl.float32)
        pred_l = tl.load(pred_ptr + loser_row + index, mask=mask, other=0.0).to(tl.float32)
        ref_w = tl.load(ref_ptr + winner_row + index, mask=mask, other=0.0).to(tl.float32)
        ref_l = tl.load(ref_ptr + loser_row + index, mask=mask, other=0.0).to(tl.float32)
        target_w = tl.load(target_ptr + winner_row + index, mask=mask, other=0.0).to(tl.float32)
        if TARGET_SHARED:
            target_l = target_w
        else:
            target_l = tl.load(target_ptr + target_loser_row + index, mask=mask, other=0.0).to(
                tl.float32
            )
        error_w = pred_w - target_w
        error_l = pred_l - target_l
        ref_error_w = ref_w - target_w
        ref_error_l = ref_l - target_l
        sum_ww += error_w * error_w
        sum_ll += error_l * error_l
        sum_wl += error_w * error_l
        sum_rw += ref_error_w * ref_error_w
        sum_rl += ref_error_l * ref_error_l
        if WITH_GAP:
            gap = pred_w - ref_w
            sum_wg += error_w * gap
            sum_gg += gap * gap

    out = partials_ptr + (pair * num_chunks + chunk) * 8
    tl.store(out + 0, tl.sum(sum_ww, axis=0))
    tl.store(out + 1, tl.sum(sum_ll, axis=0))
    tl.store(out + 2, tl.sum(sum_wl, axis=0))
    tl.store(out + 3, tl.sum(sum_rw, axis=0))
    tl.store(out + 4, tl.sum(sum_rl, axis=0))
    tl.store(out + 5, tl.sum(sum_wg, axis=0))
    tl.store(out + 6, tl.sum(sum_gg, axis=0))


@triton.jit
def _softplus(x):
    # log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)); log1p from its series below 1e-4, where
    # log(1 + z) in fp32 would round 1 + z to 1 (the series is exact to ~1e-12 there).
    z = tl.exp(-tl.abs(x))
    log1p_z = tl.where(z < 1e-4, z * (1.0 - z * (0.5 - z / 3.0)), tl.log(1.0 + z))
    return tl.maximum(x, 0.0) + log1p_z


@triton.jit
def _column(sums, columns, INDEX: tl.constexpr):
    # Column INDEX of a (pairs, 8) tile: the other columns add exact zeros.
    return tl.sum(tl.where(columns == INDEX, sums, 0.0), axis=1)


@triton.jit
def _group_totals(
    values,
    scratch_ptr,
    pairs,
    pair_mask,
    batch_pairs,
    group_size,
    pairs_f,
    BATCH: tl.constexpr,
    BLOCK_B: tl.constexpr,
    GROUP_BLOCK: tl.constexpr,
):
    """Per pair: the sum of ``values`` over its group and the group's pair count.

    BATCH: one group of all pairs. Otherwise groups of ``group_size`` consecutive pairs (the last
    may be short): the values are parked in ``scratch_ptr`` (BLOCK_B floats that no other call
    uses), then each pair adds up its group's members. O(B * G) loads; the loop runs to
    GROUP_BLOCK = next_power_of_2(group_size), a compile-time bound (see pair_sums_kernel).
    """
    if BATCH:
        total = tl.zeros((BLOCK_B,), dtype=tl.float32) + tl.sum(
            tl.where(pair_mask, values, 0.0), axis=0
        )
        count = tl.zeros((BLOCK_B,), dtype=tl.float32) + pairs_f
    else:
        tl.store(scratch_ptr + pairs, values, mask=pair_mask)
        tl.debug_barrier()
        group_start = (pairs // group_size) * group_size
        total = tl.zeros((BLOCK_B,), dtype=tl.float32)
        count = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for member in range(0, GROUP_BLOCK):
            index = group_start + member
            # Block-shaped bound (not member < group_size, a scalar bool: Triton 3.9's interpreter
            # rejects a block mask combined with one).
            member_mask = pair_mask & (index < batch_pairs) & (index < group_start + group_size)
            total += tl.load(scratch_ptr + index, mask=member_mask, other=0.0)
            count += member_mask.to(tl.float32)
    return total, count


@triton.jit
def finalize_kernel(
    partials_ptr,
    weights_ptr,
    scratch_ptr,
    loss_ptr,
    stats_ptr,
    lambda_ptr,
    coefficients_ptr,
    batch_pairs,
    num_chunks,
    group_size,
    pairs_f,
    elements_f,
    beta,
    mu,
    log_q,
    log_one_minus_q,
    METHOD: tl.constexpr,
    SAFEGUARD: tl.constexpr,
    BATCH_LAMBDA: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    GROUP_BLOCK: tl.constexpr,
):
    """One program: sums -> MSEs, u, lambda, loss, statistics and gradient coefficients.

    The partials arrive as ONE (pairs, chunks, 8) tile load (num_chunks <= BLOCK_C, plan_chunks
    guarantees it; <= 4096 fp32 values), reduced over the chunks in one step: one round trip to
    memory instead of seven dependent loops over BLOCK_C-wide slices.

    coefficients (2, 2B): row 0 holds the e-coefficient of each prediction row (a_i for
    winners, c_i for losers), row 1 the g-coefficient (b_i for winners, 0 for losers).
    """
    pairs = tl.arange(0, BLOCK_B)
    pair_mask = pairs < batch_pairs
    chunks = tl.arange(0, BLOCK_C)
    columns = tl.arange(0, 8)
    tile_offsets = (
        pairs[:, None, None].to(tl.int64) * num_chunks + chunks[None, :, None]
    ) * 8 + columns[None, None, :]
    tile_mask = (
        pair_mask[:, None, None]
        & (chunks[None, :, None] < num_chunks)
        & (columns[None, None, :] < 7)
    )
    sums = tl.sum(tl.load(partials_ptr + tile_offsets, mask=tile_mask, other=0.0), axis=1)
    columns_2d = columns[None, :]
    sum_ww = _column(sums, columns_2d, 0)
    sum_ll = _column(sums, columns_2d, 1)
    sum_wl = _column(sums, columns_2d, 2)
    sum_rw = _column(sums, columns_2d, 3)
    sum_rl = _column(sums, columns_2d, 4)
    sum_wg = _column(sums, columns_2d, 5)
    sum_gg = _column(sums, columns_2d, 6)

    mse_w = sum_ww / elements_f
    mse_l = sum_ll / elements_f
    ref_mse_w = sum_rw / elements_f
    ref_mse_l = sum_rl / elements_f

    # The safeguard's lambda from the group sums (1 where S_wl <= 0, never above 1).
    scale = tl.full((BLOCK_B,), 1.0, dtype=tl.float32)
    if SAFEGUARD:
        group_ww, group_count = _group_totals(
            sum_ww, scratch_ptr, pairs, pair_mask, batch_pairs, group_size, pairs_f,
            BATCH_LAMBDA, BLOCK_B, GROUP_BLOCK,
        )  # fmt: skip
        group_wl, _ = _group_totals(
            sum_wl, scratch_ptr + BLOCK_B, pairs, pair_mask, batch_pairs, group_size, pairs_f,
            BATCH_LAMBDA, BLOCK_B, GROUP_BLOCK,
        )  # fmt: skip
        group_elements = group_count * elements_f
        epsilon = SAFEGUARD_EPSILON * group_elements * group_elements / 4.0
        ratio = (1.0 - mu) * group_ww / tl.maximum(group_wl + epsilon, 1e-30)
        scale = tl.where(group_wl > 0, tl.minimum(tl.maximum(ratio, 0.0), 1.0), 1.0)

    margin = -(beta / 2.0) * ((mse_w - mse_l) - (ref_mse_w - ref_mse_l))
    # Per pair: the term l_i, dl/du, and DSPO's direct winner terms (coefficients of e_w and g).
    zeros = tl.zeros((BLOCK_B,), dtype=tl.float32)
    direct_e = zeros
    direct_g = zeros
    gap_mean = 0.0
    if METHOD == KERNEL_DPO:  # Diffusion-DPO: softplus(-u)
        term = _softplus(-margin)
        dterm_du = -tl.sigmoid(-margin)
    elif METHOD == KERNEL_DMPO:  # DMPO: KL(Bernoulli(p) || Bernoulli(q)), p = sigmoid(u)
        prob = tl.sigmoid(margin)
        log_p = -_softplus(-margin)
        log_one_minus_p = -_softplus(margin)
        term = prob * (log_p - log_q) + (1.0 - prob) * (log_one_minus_p - log_one_minus_q)
        dterm_du = prob * (1.0 - prob) * (margin - (log_q - log_one_minus_q))
    elif METHOD == KERNEL_DSPO:  # DSPO, SD1.5: mean (e_w - beta s g)^2, s = sigmoid(-u)
        s = tl.sigmoid(-margin)
        bs = beta * s
        term = (sum_ww - 2.0 * bs * sum_wg + bs * bs * sum_gg) / elements_f
        dterm_ds = (-2.0 * beta * sum_wg + 2.0 * beta * bs * sum_gg) / elements_f
        dterm_du = dterm_ds * (-s * (1.0 - s))
        direct_e = 2.0 * (1.0 - bs) / elements_f
        direct_g = -2.0 * (1.0 - bs) * bs / elements_f
    else:  # DSPO, SDXL: (s g)^2 if the group's mean g^2 >= 0.1, else s^2 (per lambda group)
        s = tl.sigmoid(-margin)
        gap_sq = sum_gg / elements_f
        gap_mean = tl.sum(tl.where(pair_mask, gap_sq, 0.0), axis=0) / pairs_f
        group_gap, group_gap_count = _group_totals(
            gap_sq, scratch_ptr + 2 * BLOCK_B, pairs, pair_mask, batch_pairs, group_size,
            pairs_f, BATCH_LAMBDA, BLOCK_B, GROUP_BLOCK,
        )  # fmt: skip
        # Lanes past the last pair have no group (count 0): keep them finite.
        use_gap = group_gap / tl.maximum(group_gap_count, 1.0) >= DSPO_SDXL_GAP_THRESHOLD
        factor = tl.where(use_gap, gap_sq, 1.0)
        term = s * s * factor
        dterm_du = 2.0 * s * factor * (-s * (1.0 - s))
        direct_g = tl.where(use_gap, 2.0 * s * s / elements_f, 0.0)

    weight = tl.full((BLOCK_B,), 1.0, dtype=tl.float32)
    weight_sum = 0.0
    if HAS_WEIGHTS:
        weight = tl.load(weights_ptr + pairs, mask=pair_mask, other=0.0).to(tl.float32)
        weight_sum = tl.sum(weight, axis=0)
    weight = tl.where(pair_mask, weight / pairs_f, 0.0)
    # dl/dL_w = dl/du * (-beta/2); dl/dL_l = dl/du * (beta/2), times lambda for the gradient;
    # dL/dpred = 2 e / D.
    coefficient_w = weight * (dterm_du * (-beta / elements_f) + direct_e)
    coefficient_g = weight * direct_g
    coefficient_l = weight * dterm_du * (beta / elements_f) * scale

    valid = pair_mask.to(tl.float32)
    stat_mse_w = tl.sum(mse_w * valid, axis=0) / pairs_f
    stat_mse_l = tl.sum(mse_l * valid, axis=0) / pairs_f
    stat_ref_mse_w = tl.sum(ref_mse_w * valid, axis=0) / pairs_f
    stat_ref_mse_l = tl.sum(ref_mse_l * valid, axis=0) / pairs_f
    # objectives.poison_nonfinite's term, here so that the eager path spends no host time on it
    # (~40 us of tensor ops per call on a 2-core CPU): the four MSE statistics (>= 0, inf or
    # NaN exactly when an input element is) plus the weights' sum, times 0, leave a finite loss
    # bit for bit and make it NaN otherwise. 0 * x is not folded (x may be inf or NaN).
    poison = stat_mse_w + stat_mse_l + stat_ref_mse_w + stat_ref_mse_l + weight_sum
    loss_value = tl.sum(tl.where(pair_mask, weight * term, 0.0), axis=0)
    tl.store(loss_ptr, loss_value + 0.0 * poison)
    tl.store(lambda_ptr + pairs, scale, mask=pair_mask)
    rows = 2 * batch_pairs
    tl.store(coefficients_ptr + pairs, coefficient_w, mask=pair_mask)
    tl.store(coefficients_ptr + batch_pairs + pairs, coefficient_l, mask=pair_mask)
    tl.store(coefficients_ptr + rows + pairs, coefficient_g, mask=pair_mask)
    tl.store(coefficients_ptr + rows + batch_pairs + pairs, zeros, mask=pair_mask)

    # A tie (u = 0) counts one half, as the official Diffusion-DPO trainer counts it.
    won = tl.where(margin > 0, valid, tl.where(margin == 0, 0.5 * valid, 0.0))
    tl.store(stats_ptr + 0, tl.sum(won, axis=0) / pairs_f)
    tl.store(stats_ptr + 1, tl.sum(margin * valid, axis=0) / pairs_f)
    tl.store(stats_ptr + 2, stat_mse_w)
    tl.store(stats_ptr + 3, stat_mse_l)
    tl.store(stats_ptr + 4, stat_ref_mse_w)
    tl.store(stats_ptr + 5, stat_ref_mse_l)
    tl.store(stats_ptr + 6, tl.sum((mse_w - ref_mse_w) * valid, axis=0) / pairs_f)
    tl.store(stats_ptr + 7, tl.sum((mse_l - ref_mse_l) * valid, axis=0) / pairs_f)
    tl.store(stats_ptr + 8, gap_mean)


@triton.jit
def gradient_kernel(
    grad_output_ptr,
    pred_ptr,
    ref_ptr,
    target_ptr,
    coefficients_ptr,
    grad_ptr,
    batch_pairs,
    elements,
    TARGET_SHARED: tl.constexpr,
    WITH_GAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (row, block): grad = g0 (coef_e[row] (pred - target) + coef_g[row] (pred - ref))."""
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1).to(tl.int64)
    index = block * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = index < elements
    rows = 2 * batch_pairs
    grad_output = tl.load(grad_output_ptr).to(tl.float32)
    coefficient_e = tl.load(coefficients_ptr + row) * grad_output
    row_offset = row * elements
    if TARGET_SHARED:
        target_offset = (row % batch_pairs) * elements
    else:
        target_offset = row_offset
    pred = tl.load(pred_ptr + row_offset + index, mask=mask, other=0.0).to(tl.float32)
    target = tl.load(target_ptr + target_offset + index, mask=mask, other=0.0).to(tl.float32)
    grad = coefficient_e * (pred - target)
    if WITH_GAP:
        # Only winners carry a g-term; losers skip the read of ref (its mask is all false).
        coefficient_g = tl.load(coefficients_ptr + rows + row) * grad_output
        # Block-shaped, not a scalar: Triton 3.9's interpreter rejects a block mask combined
        # with a scalar bool ("mask has unsupported dtype"); compiled code is the same.
        is_winner = (tl.zeros_like(index) + row) < batch_pairs
        ref = tl.load(ref_ptr + row_offset + index, mask=mask & is_winner, other=0.0).to(tl.float32)
        grad += tl.where(is_winner, coefficient_g * (pred - ref), 0.0)
    tl.store(grad_ptr + row_offset + index, grad.to(grad_ptr.dtype.element_ty), mask=mask)


# Launchers -----------------------------------------------------------------------------------

SUMS_BLOCK = 1024  # elements per loop step of pair_sums_kernel: 7 fp32 accumulators x 8 per thread
GRADIENT_BLOCK = 2048  # elements per program of gradient_kernel


def plan_chunks(batch_pairs: int, elements: int) -> tuple[int, int]:
    """(chunk_elements, num_chunks) of pair_sums_kernel (see sdpo.chunking.plan_chunks)."""
    return chunking.plan_chunks(batch_pairs, elements, SUMS_BLOCK)


@dataclasses.dataclass(frozen=True, slots=True)
class LaunchPlan:
    """Everything the three launches need that follows from the shapes and the settings alone:
    grids, chunking, tile sizes, the finalize kernel's scalars and the workspace size. Built
    once per (shapes, strides, dtypes, device, settings) and reused (:func:`cached_plan`)."""

    batch_pairs: int
    elements: int
    target_shared: bool
    with_gap: bool
    sums_grid: tuple[int, int]
    gradient_grid: tuple[int, int]
    num_chunks: int
    blocks_per_chunk: int
    block_pairs: int
    block_chunks: int
    group_size: int  # >= 1: finalize_kernel's group size (unread when batch_lambda)
    group_block: int
    batch_lambda: bool
    has_weights: bool
    method_code: int
    safeguard: bool
    # finalize_kernel's float scalars: (B, elements, beta, mu, log_q, log_one_minus_q)
    finalize_scalars: tuple[float, float, float, float, float, float]
    workspace_floats: int  # partials (B, chunks, NUM_SUMS), then the group scratch (3 x B')
    buffer_sizes: tuple[int, ...]  # buffers.forward_buffer_sizes of this plan


def plan_launches(
    batch_pairs: int,
    elements: int,
    *,
    target_shared: bool,
    has_weights: bool,
    method_code: int,
    beta: float,
    mu: float,
    safeguard: bool,
    group_size: int,
    log_q: float,
    log_one_minus_q: float,
) -> LaunchPlan:
    """The launch plan of B pairs of ``elements`` per row, computed afresh (no cache)."""
    chunk_elements, num_chunks = plan_chunks(batch_pairs, elements)
    blocks_per_chunk = chunk_elements // SUMS_BLOCK
    assert chunk_elements == blocks_per_chunk * SUMS_BLOCK, "plan_chunks: whole SUMS_BLOCKs"
    block_pairs = next_power_of_2(batch_pairs)
    # Three group reductions (S_ww, S_wl, the DSPO-SDXL gap) park their values in the scratch.
    workspace_floats = batch_pairs * num_chunks * NUM_SUMS + 3 * block_pairs
    return LaunchPlan(
        batch_pairs=batch_pairs,
        elements=elements,
        target_shared=target_shared,
        with_gap=method_code in (METHOD_DSPO, METHOD_DSPO_SDXL),
        sums_grid=(batch_pairs, num_chunks),
        gradient_grid=(2 * batch_pairs, cdiv(elements, GRADIENT_BLOCK)),
        num_chunks=num_chunks,
        blocks_per_chunk=blocks_per_chunk,
        block_pairs=block_pairs,
        block_chunks=next_power_of_2(num_chunks),
        group_size=max(group_size, 1),
        group_block=next_power_of_2(max(group_size, 1)),
        batch_lambda=group_size == 0,
        has_weights=has_weights,
        method_code=method_code,
        safeguard=bool(safeguard),
        finalize_scalars=tuple(
            float(value) for value in (batch_pairs, elements, beta, mu, log_q, log_one_minus_q)
        ),
        workspace_floats=workspace_floats,
        buffer_sizes=buffers.forward_buffer_sizes(batch_pairs, workspace_floats),
    )


# (shapes, strides, dtypes, device, weights?, settings) -> LaunchPlan. Computing a plan costs
# ~15 us of host time per call on a 2-core CPU (a row view for its size, plan_chunks, the
# dataclass); a lookup ~4 us. A training run meets one or two keys; the bound only stops a
# sweep over many shapes from growing it without end.
_PLANS: dict[tuple, LaunchPlan] = {}
MAX_CACHED_PLANS = 256


def plan_key(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    pair_weights: torch.Tensor | None,
    op_arguments: tuple,
) -> tuple:
    """What a launch plan depends on (and what :func:`cached_plan` checks on a miss)."""
    return (
        model_pred.shape, model_pred.stride(), model_pred.dtype,
        ref_pred.shape, ref_pred.stride(), ref_pred.dtype,
        target.shape, target.stride(), target.dtype,
        model_pred.device, pair_weights is None, op_arguments,
    )  # fmt: skip


def cached_plan(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    pair_weights: torch.Tensor | None,
    op_arguments: tuple,
) -> LaunchPlan:
    """The launch plan of these inputs and settings, from the cache when seen before.

    ``op_arguments``: (method_code, beta, mu, safeguard, group_size, dmpo_alpha), the tuple
    ``LossSettings.op_arguments()`` makes and both fused backends take (group_size 0: one
    lambda for the whole call). DMPO's log q and log(1 - q) are computed on a miss only.
    The key holds the shapes and strides, so a hit means the inputs are laid out as when the
    plan was made, and the contiguity the kernels index by was checked then.
    """
    key = plan_key(model_pred, ref_pred, target, pair_weights, op_arguments)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    assert model_pred.is_contiguous() and ref_pred.is_contiguous() and target.is_contiguous(), (
        "the forward kernels need contiguous inputs; the op layer copies non-contiguous ones"
    )
    method_code, beta, mu, safeguard, group_size, dmpo_alpha = op_arguments
    log_q, log_one_minus_q = reference.dmpo_log_q(dmpo_alpha)
    batch_pairs = model_pred.shape[0] // 2
    plan = plan_launches(
        batch_pairs,
        model_pred[0].numel(),
        target_shared=target.shape[0] == batch_pairs,
        has_weights=pair_weights is not None,
        method_code=method_code,
        beta=beta,
        mu=mu,
        safeguard=safeguard,
        group_size=group_size,
        log_q=log_q,
        log_one_minus_q=log_one_minus_q,
    )
    if len(_PLANS) >= MAX_CACHED_PLANS:
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def clear_plan_cache() -> None:
    """Forgets every cached plan (tests that patch plan_chunks call it)."""
    _PLANS.clear()


def forward_launches(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    pair_weights: torch.Tensor | None,
    op_arguments: tuple,
    *,
    one_allocation: bool = False,
) -> tuple[tuple[Callable[[], None], Callable[[], None]], tuple[torch.Tensor, ...]]:
    """The two forward kernels as separate launches (the benchmarks time each), with the outputs
    they write: ((sums launch, finalize launch), (loss (), stats (9,), lambda (B,),
    coefficients (2, 2B))). ``op_arguments`` as :func:`cached_plan`'s (the CUDA backend's
    forward_launches takes the same tuple). Inputs must be contiguous. ``one_allocation``: the
    outputs are views of one buffer (not for custom ops).
    """
    plan = cached_plan(model_pred, ref_pred, target, pair_weights, op_arguments)
    buffers_ = forward_buffers(model_pred.device, plan, one_allocation=one_allocation)
    return (
        lambda: launch_sums(plan, model_pred, ref_pred, target, buffers_[0]),
        lambda: launch_finalize(plan, pair_weights, buffers_),
    ), buffers_[1:]


def forward_buffers(
    device: torch.device, plan: LaunchPlan, *, one_allocation: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(workspace, loss, stats, lambda, coefficients) of ``plan`` (see kernels.buffers)."""
    return buffers.forward_buffers(
        device,
        plan.batch_pairs,
        plan.workspace_floats,
        one_allocation=one_allocation,
        sizes=plan.buffer_sizes,
    )


def launch_sums(
    plan: LaunchPlan,
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    workspace: torch.Tensor,
) -> None:
    """pair_sums_kernel: the partial sums of every (pair, chunk) into the workspace's head."""
    pair_sums_kernel[plan.sums_grid](
        model_pred,
        ref_pred,
        target,
        workspace,
        plan.batch_pairs,
        plan.elements,
        plan.num_chunks,
        TARGET_SHARED=plan.target_shared,
        WITH_GAP=plan.with_gap,
        BLOCK=SUMS_BLOCK,
        BLOCKS_PER_CHUNK=plan.blocks_per_chunk,
        num_warps=4,
    )


def launch_finalize(
    plan: LaunchPlan,
    pair_weights: torch.Tensor | None,
    forward_buffers_: tuple[torch.Tensor, ...],
) -> None:
    """finalize_kernel: partials -> loss, stats, lambda, coefficients (one program)."""
    workspace, loss, stats, scale, coefficients = forward_buffers_
    partials_floats = plan.workspace_floats - 3 * plan.block_pairs
    batch_pairs_f, elements_f, beta, mu, log_q, log_one_minus_q = plan.finalize_scalars
    finalize_kernel[(1,)](
        workspace,
        pair_weights if pair_weights is not None else scale,  # unread when HAS_WEIGHTS=False
        workspace[partials_floats:],
        loss,
        stats,
        scale,
        coefficients,
        plan.batch_pairs,
        plan.num_chunks,
        plan.group_size,
        batch_pairs_f,
        elements_f,
        beta,
        mu,
        log_q,
        log_one_minus_q,
        METHOD=plan.method_code,
        SAFEGUARD=plan.safeguard,
        BATCH_LAMBDA=plan.batch_lambda,
        HAS_WEIGHTS=plan.has_weights,
        BLOCK_B=plan.block_pairs,
        BLOCK_C=plan.block_chunks,
        GROUP_BLOCK=plan.group_block,
        num_warps=4,
    )


def run_forward(
    plan: LaunchPlan,
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    pair_weights: torch.Tensor | None,
    *,
    one_allocation: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two forward kernels of a ready plan (the op layer's path: no closures, no lookup).
    Returns (loss (), stats (9,), lambda (B,), coefficients (2, 2B))."""
    buffers_ = forward_buffers(model_pred.device, plan, one_allocation=one_allocation)
    launch_sums(plan, model_pred, ref_pred, target, buffers_[0])
    launch_finalize(plan, pair_weights, buffers_)
    return buffers_[1:]


def launch_gradient(
    grad_output: torch.Tensor,
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    coefficients: torch.Tensor,
    *,
    with_gap: bool,
    plan: LaunchPlan | None = None,
) -> torch.Tensor:
    """d loss / d model_pred into a new buffer of model_pred's dtype (one elementwise pass).

    ``plan``: the forward's plan of these inputs (the eager path keeps it), else the grid comes
    from the shapes."""
    if plan is None:
        rows = model_pred.shape[0]
        batch_pairs = rows // 2
        elements = model_pred[0].numel()
        grid = (rows, cdiv(elements, GRADIENT_BLOCK))
        target_shared = target.shape[0] == batch_pairs
    else:
        batch_pairs, elements, grid = plan.batch_pairs, plan.elements, plan.gradient_grid
        target_shared = plan.target_shared
    grad_output, grad = buffers.gradient_buffers(grad_output, model_pred)
    gradient_kernel[grid](
        grad_output,
        model_pred,
        ref_pred,
        target,
        coefficients,
        grad,
        batch_pairs,
        elements,
        TARGET_SHARED=target_shared,
        WITH_GAP=with_gap,
        BLOCK=GRADIENT_BLOCK,
        num_warps=4,
    )
    return grad
