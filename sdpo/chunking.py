"""How the fused backends split each pair's rows into chunks: one plan for Triton and CUDA.

A function of the shapes alone (never of the device), so that the reduction order, and with it
every bit of a result, is the same on any GPU model: a run resumed on another GPU continues
bit-identically. No torch or Triton import: the planning is plain integer arithmetic.
"""

from __future__ import annotations

# Programs (CUDA blocks) of the pair-sums kernel to aim for: ~4 per SM of an H100 (132 SMs).
SUMS_PROGRAMS = 512


def next_power_of_2(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


def cdiv(numerator: int, denominator: int) -> int:
    # Not triton.cdiv: that is a @triton.jit function, ~20 us per host call through its launcher.
    return -(-numerator // denominator)


def plan_chunks(batch_pairs: int, elements: int, step: int) -> tuple[int, int]:
    """(chunk_elements, num_chunks) for ``elements`` per row, ``step`` elements per loop pass.

    Each chunk is a power of two of steps (a compile-time loop bound) and there are at most
    SUMS_PROGRAMS / next_power_of_2(B) chunks per pair, so the finalize kernel reads all
    partials in one (pairs, chunks, 8) tile of <= 4096 fp32 values while B <= 512. With Triton's
    step of 1024, the video size (B = 2, 2.1M elements per sample) is 2 x 256 programs of 8K
    elements and SD1.5 (B = 8, 16384) 8 x 16 of 1024.
    """
    steps = cdiv(elements, step)
    max_chunks = max(1, SUMS_PROGRAMS // next_power_of_2(batch_pairs))
    chunk_elements = next_power_of_2(cdiv(steps, max_chunks)) * step
    return chunk_elements, cdiv(elements, chunk_elements)
