"""Host time of one eager forward + backward of backend="triton", kernels stubbed out.

The fused loss launches three kernels; everything else on the host (validation, the op layer,
autograd, buffer allocation, the launch planning) is overhead that a small batch cannot hide.
This measures that part alone, on the CPU: the three Triton kernels are replaced by no-ops
(so no GPU and no interpreter run), and the rest of ``sdpo.preference_loss`` runs as is.

    TRITON_INTERPRET=1 python -m profiling.kernel_host_overhead            # B = 8, 4 x 64 x 64
    TRITON_INTERPRET=1 python -m profiling.kernel_host_overhead --repeats 2000

Prints the median and 10th percentile microseconds per forward + backward, for the op layer
alone (``ops.preference_loss_triton``) and for the public ``sdpo.preference_loss``: CPU time
of the calling thread, so that other processes on a shared machine do not count.
(TRITON_INTERPRET=1 only lets backend="triton" accept CPU tensors; no kernel is interpreted.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch


class _NoLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _time(step: Callable[[], None], repeats: int) -> tuple[float, float]:
    for _ in range(max(10, repeats // 10)):  # warm-up: first calls build caches
        step()
    samples = []
    for _ in range(repeats):
        start = time.thread_time_ns()
        step()
        samples.append((time.thread_time_ns() - start) / 1000.0)
    samples.sort()
    return statistics.median(samples), samples[len(samples) // 10]


def measure(batch_pairs: int, sample_shape: tuple[int, ...], repeats: int) -> dict[str, float]:
    """{"op_layer_us", "op_layer_p10_us", "preference_loss_us", ...} per forward + backward."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise SystemExit("kernel_host_overhead: set TRITON_INTERPRET=1 (CPU tensors, no GPU)")
    import sdpo
    from sdpo import ops
    from sdpo.kernels import preference
    from sdpo.settings import LossSettings

    for name in ("pair_sums_kernel", "finalize_kernel", "gradient_kernel"):
        setattr(preference, name, _NoLaunch())
    generator = torch.Generator().manual_seed(0)
    shape = (2 * batch_pairs, *sample_shape)
    model_pred = torch.randn(shape, generator=generator).requires_grad_(True)
    ref_pred = torch.randn(shape, generator=generator)
    target = torch.randn(shape, generator=generator)
    settings = LossSettings.from_arguments(
        method="diffusion-dpo", beta=5000.0, mu=0.5, granularity="batch", dmpo_alpha=0.0
    )

    def op_layer() -> None:
        loss, _stats = ops.preference_loss_triton(model_pred, ref_pred, target, settings)
        loss.backward()

    def public() -> None:
        result = sdpo.preference_loss(
            model_pred, ref_pred, target, method="diffusion-dpo", beta=5000.0, mu=0.5,
            backend="triton",
        )  # fmt: skip
        result.loss.backward()

    torch.set_num_threads(1)
    op_median, op_p10 = _time(op_layer, repeats)
    public_median, public_p10 = _time(public, repeats)
    return {
        "op_layer_us": op_median,
        "op_layer_p10_us": op_p10,
        "preference_loss_us": public_median,
        "preference_loss_p10_us": public_p10,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="B, pairs per call (default 8)")
    parser.add_argument("--repeats", type=int, default=1000, help="timed calls (default 1000)")
    arguments = parser.parse_args(argv)
    if arguments.pairs < 1 or arguments.repeats < 10:
        parser.error("--pairs must be >= 1 and --repeats >= 10")
    result = measure(arguments.pairs, (4, 64, 64), arguments.repeats)
    print(
        f"host time per eager forward + backward, kernels stubbed (B = {arguments.pairs}):\n"
        f"  op layer (ops.preference_loss_triton): {result['op_layer_us']:.1f} us median, "
        f"{result['op_layer_p10_us']:.1f} us p10\n"
        f"  sdpo.preference_loss:                  {result['preference_loss_us']:.1f} us median, "
        f"{result['preference_loss_p10_us']:.1f} us p10"
    )


if __name__ == "__main__":
    main()
