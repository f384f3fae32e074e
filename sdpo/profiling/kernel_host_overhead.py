"""Host time of one eager forward + backward of backend="triton", kernels stubbed out.

The fused loss launches three kernels; everything else on the host (validation, the op layer,
autograd, buffer allocation, the launch planning) is overhead that a small batch cannot hide.
This measures that part alone, on the CPU: the three Triton kernels are replaced by no-ops
(so no GPU and no interpreter run), and the rest of ``sdpo.preference_loss`` runs as is.

    TRITON_INTERPRET=1 python -m profiling.kernel_host_overhead            # B = 8, 4 x 64 x 64
    TRITON_INTERPRET=1 python -m profiling.kernel_host_overhead --repeats 5000 --output R.json
    TRITON_INTERPRET=1 python -m profiling.kernel_host_overhead --layers   # and each part alone

Prints the median, quartiles and interquartile range of microseconds per forward + backward
(n timed calls), for the op layer alone (``ops.preference_loss_triton``) and for the public
``sdpo.preference_loss``: CPU time of the calling thread, so that other processes on a shared
machine count less (they still share its caches). Each timed call starts with
``model_pred.grad = None``, as after ``optimizer.zero_grad()`` (set_to_none, the default):
otherwise autograd adds every new gradient into the old one, on the CPU a real 1 MB add
(~100 us here) that on a GPU is one asynchronous kernel, not host overhead.
(TRITON_INTERPRET=1 only lets backend="triton" accept CPU tensors; no kernel is interpreted.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


class _NoLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class EmptyFunction(torch.autograd.Function):
    """The least any autograd op costs: one input, one output, nothing computed. Its forward +
    backward() is the autograd engine's fixed cost (node creation, the engine's thread hand-off),
    which the op layer pays as any custom op does (~24 us on the 2-core development CPU)."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.new_empty(())

    @staticmethod
    def backward(ctx, grad):
        return None


def summarize(samples: list[float]) -> dict[str, float]:
    """{"median_us", "q1_us", "q3_us", "iqr_us", "p10_us", "n"} of microsecond samples."""
    ordered = sorted(samples)
    q1, median, q3 = statistics.quantiles(ordered, n=4)
    return {
        "median_us": median,
        "q1_us": q1,
        "q3_us": q3,
        "iqr_us": q3 - q1,
        "p10_us": ordered[len(ordered) // 10],
        "n": len(ordered),
    }


def _time(step: Callable[[], None], repeats: int) -> dict[str, float]:
    for _ in range(max(10, repeats // 10)):  # warm-up: first calls build caches
        step()
    samples = []
    for _ in range(repeats):
        start = time.thread_time_ns()
        step()
        samples.append((time.thread_time_ns() - start) / 1000.0)
    return summarize(samples)


def measure(
    batch_pairs: int, sample_shape: tuple[int, ...], repeats: int, layers: bool = False
) -> dict[str, dict]:
    """{"op_layer": summary, "preference_loss": summary, "one_op_loss_backward": summary,
    "empty_function": summary, "op_layer_beyond_backward_us": float,
    "op_layer_beyond_engine_us": float} per forward + backward (us); with ``layers``, also
    {"layers": {part: summary}}, the parts of a call timed one by one."""
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
        model_pred.grad = None
        loss, _stats = ops.preference_loss_triton(model_pred, ref_pred, target, settings)
        loss.backward()

    def public() -> None:
        model_pred.grad = None
        result = sdpo.preference_loss(
            model_pred, ref_pred, target, method="diffusion-dpo", beta=5000.0, mu=0.5,
            backend="triton",
        )  # fmt: skip
        result.loss.backward()

    # What every loss pays once per step whatever computes it: a one-op graph's forward and its
    # loss.backward() call (the autograd engine's fixed cost, ~30 us on a 2-core CPU). A
    # training step calls backward() once for the whole model, so the op's own overhead in a
    # step is the op layer's time minus this.
    leaf = torch.zeros((), requires_grad=True)

    def one_op_loss() -> None:
        leaf.grad = None
        (leaf * 1.0).backward()

    def empty_function() -> None:
        model_pred.grad = None
        EmptyFunction.apply(model_pred).backward()

    torch.set_num_threads(1)
    result = {
        "op_layer": _time(op_layer, repeats),
        "preference_loss": _time(public, repeats),
        "one_op_loss_backward": _time(one_op_loss, repeats),
        "empty_function": _time(empty_function, repeats),
    }
    result["op_layer_beyond_backward_us"] = (
        result["op_layer"]["median_us"] - result["one_op_loss_backward"]["median_us"]
    )
    # The op layer's own host time: beyond what an empty autograd.Function on the same input
    # costs in the same run (the engine's fixed cost, which no op layer can avoid).
    result["op_layer_beyond_engine_us"] = (
        result["op_layer"]["median_us"] - result["empty_function"]["median_us"]
    )
    if layers:
        result["layers"] = {
            name: _time(step, repeats)
            for name, step in _layer_steps(model_pred, ref_pred, target, settings).items()
        }
    return result


def _layer_steps(model_pred, ref_pred, target, settings) -> dict[str, Callable[[], None]]:
    """The parts of one call, each timed alone (the backward is fwd+bwd minus fwd)."""
    import sdpo
    from sdpo import objectives, ops

    keywords = dict(method="diffusion-dpo", beta=5000.0, mu=0.5, granularity="batch")

    scalar = torch.zeros(())
    steps = {
        "one tensor op (x + 0.0)": lambda: scalar + 0.0,
        "validate_inputs (with LossSettings)": lambda: objectives.validate_inputs(
            model_pred,
            ref_pred,
            target,
            **keywords,
            dmpo_alpha=0.0,
            pair_weights=None,
            backend="triton",
        ),
        "LossSettings.from_arguments": lambda: type(settings).from_arguments(
            **keywords, dmpo_alpha=0.0
        ),
        "resolve_backend": lambda: objectives.resolve_backend("triton", model_pred.device),
        "op layer, forward only": lambda: ops.preference_loss_triton(
            model_pred, ref_pred, target, settings
        ),
        "sdpo.preference_loss, forward only": lambda: sdpo.preference_loss(
            model_pred, ref_pred, target, **keywords, backend="triton"
        ),
    }
    from sdpo.kernels import preference

    if hasattr(preference, "cached_plan"):  # this version's launch-plan cache
        detached = model_pred.detach()
        arguments = settings.op_arguments()
        steps["launch plan (cache hit)"] = lambda: preference.cached_plan(
            detached, ref_pred, target, None, arguments
        )
        plan = preference.cached_plan(detached, ref_pred, target, None, arguments)
        steps["eager buffers (one torch.empty, views)"] = lambda: preference.forward_buffers(
            model_pred.device, plan, one_allocation=True
        )
    return steps


def _line(label: str, summary: dict) -> str:
    return (
        f"  {label:<40} {summary['median_us']:6.1f} us median, IQR {summary['iqr_us']:.1f} "
        f"({summary['q1_us']:.1f}-{summary['q3_us']:.1f}), p10 {summary['p10_us']:.1f}, "
        f"n = {summary['n']}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="B, pairs per call (default 8)")
    parser.add_argument("--repeats", type=int, default=1000, help="timed calls (default 1000)")
    parser.add_argument("--output", type=Path, default=None, help="also write the results JSON")
    parser.add_argument("--layers", action="store_true", help="also time the parts of a call")
    arguments = parser.parse_args(argv)
    if arguments.pairs < 1 or arguments.repeats < 10:
        parser.error("--pairs must be >= 1 and --repeats >= 10")
    sample_shape = (4, 64, 64)
    result = measure(arguments.pairs, sample_shape, arguments.repeats, arguments.layers)
    print(
        f"host time per eager forward + backward, kernels stubbed (B = {arguments.pairs}):\n"
        + _line("op layer (ops.preference_loss_triton):", result["op_layer"])
        + "\n"
        + _line("sdpo.preference_loss:", result["preference_loss"])
        + "\n"
        + _line("a one-op loss, forward + backward():", result["one_op_loss_backward"])
        + "\n"
        + _line("an empty autograd.Function, fwd + bwd:", result["empty_function"])
        + f"\n  op layer beyond the backward() every step pays: "
        f"{result['op_layer_beyond_backward_us']:.1f} us (difference of the medians)"
        + f"\n  op layer beyond the autograd engine's fixed cost: "
        f"{result['op_layer_beyond_engine_us']:.1f} us (difference of the medians)"
    )
    for name, summary in result.get("layers", {}).items():
        print(_line(name, summary))
    if arguments.output is not None:
        record = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "torch": torch.__version__,
            "batch_pairs": arguments.pairs,
            "sample_shape": list(sample_shape),
            "clock": "time.thread_time_ns (CPU time of the calling thread)",
            **result,
        }
        arguments.output.parent.mkdir(parents=True, exist_ok=True)
        arguments.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
