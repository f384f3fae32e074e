"""Kernel benchmarks: forward + backward of the loss at SD1.5, SDXL and video sizes.

Four implementations of the same Diffusion-DPO + SDPO loss (mu = 0.9, batch lambda) are timed:

- ``fused``: ``sdpo.preference_loss(backend="triton")`` (3 kernel launches);
- ``cuda``: the same three passes hand-written in CUDA C++ (kernels/cuda/, ``backend="cuda"``),
  when the CMake build exists: how close Triton gets to hand-tuned CUDA;
- ``torch-eager``: ``sdpo.preference_loss(backend="torch")``;
- ``torch-compile``: the same under ``torch.compile(fullgraph=True)`` (inductor);
- ``reference``: the reference trainer's sequence (:mod:`sdpo.profiling.reference_sequence`).

Each case is checked against the torch backend before timing. Timing: CUDA events around
``inner`` back-to-back iterations (no sync inside), median over rounds; inputs rotate over
enough copies to exceed twice the L2 cache, so small sizes are not timed out of L2. Bandwidth
is counted bytes / time, compared with the copy bandwidth ``torch.Tensor.copy_`` reaches on the
same device in the same run.

Counted bytes (Diffusion-DPO; N = B x elements per sample, s = bytes per element):
forward reads model_pred (2N), ref_pred (2N), target (N); backward reads model_pred (2N) and
target (N) and writes the gradient (2N): 10 N s in all. That is the minimum traffic of any
implementation, so GB/s is comparable across them.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

import sdpo
from sdpo import reference
from sdpo.profiling.reference_sequence import reference_trainer_dpo_loss

SIZES = {
    "sd15": (8, (4, 64, 64)),
    "sdxl": (8, (4, 128, 128)),
    "video": (2, (16, 21, 60, 104)),
}
SMOKE_SIZES = {"smoke": (2, (4, 8, 8))}
IMPLEMENTATIONS = ("fused", "cuda", "torch-eager", "torch-compile", "reference")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BETA = 5000.0
MU = 0.9


@dataclass
class KernelResult:
    name: str
    shape: list[int]
    dtype: str
    ms: float
    gbps: float
    pct_of_copy_bandwidth: float
    extra: dict = field(default_factory=dict)


def counted_bytes(batch_pairs: int, sample_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    elements = batch_pairs * math.prod(sample_shape)
    return 10 * elements * torch.empty((), dtype=dtype).element_size()


def make_input_sets(
    batch_pairs: int,
    sample_shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    copies: int,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    generator = torch.Generator(device=device).manual_seed(0)
    sets = []
    for _ in range(copies):
        target = torch.randn((batch_pairs, *sample_shape), device=device, generator=generator)
        noise = torch.randn((2 * batch_pairs, *sample_shape), device=device, generator=generator)
        model_pred = torch.cat([target, target]) + 0.3 * noise
        ref_pred = model_pred + 0.01 * torch.randn(
            model_pred.shape, device=device, generator=generator
        )
        sets.append((model_pred.to(dtype), ref_pred.to(dtype), target.to(dtype)))
    return sets


def rotation_copies(bytes_per_set: int, device: torch.device) -> int:
    """Copies of the inputs so one rotation exceeds twice the L2 cache (50 MB on an H100)."""
    if device.type != "cuda":
        return 1
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return max(1, min(64, math.ceil(2 * l2_bytes / max(bytes_per_set, 1))))


def implementation(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A function (model_pred, ref_pred, target) -> d loss / d model_pred for one implementation."""
    if name == "reference":

        def run(model_pred, ref_pred, target):
            pred = model_pred.detach().requires_grad_(True)
            loss, _ = reference_trainer_dpo_loss(pred, ref_pred, target, beta=BETA, mu=MU)
            loss.backward()
            return pred.grad

        return run
    backend = {"fused": "triton", "cuda": "cuda"}.get(name, "torch")
    loss_fn = sdpo.preference_loss
    if name == "torch-compile":
        loss_fn = torch.compile(sdpo.preference_loss, fullgraph=True)

    def run(model_pred, ref_pred, target):
        pred = model_pred.detach().requires_grad_(True)
        loss_fn(pred, ref_pred, target, beta=BETA, mu=MU, backend=backend).loss.backward()
        return pred.grad

    return run


@dataclass
class Case:
    """One benchmark case, ready to time: ``step()`` runs forward + backward on the next input
    copy; ``error`` is its checked gradient difference from the torch backend."""

    step: Callable[[], torch.Tensor]
    bytes_moved: int
    error: float


def prepare_case(
    name: str,
    batch_pairs: int,
    sample_shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> Case:
    """Inputs rotated past L2, the implementation, and its check against the torch backend."""
    bytes_moved = counted_bytes(batch_pairs, sample_shape, dtype)
    sets = make_input_sets(
        batch_pairs, sample_shape, dtype, device, rotation_copies(bytes_moved, device)
    )
    run = implementation(name)
    error = check_against_torch(run, sets[0])
    rotator = Rotator(sets)
    return Case(lambda: run(*rotator.next()), bytes_moved, error)


def check_against_torch(run, inputs) -> float:
    """Max |grad - grad_torch| / max |grad_torch|; raises if above the dtype's tolerance."""
    model_pred, ref_pred, target = inputs
    expected = implementation("torch-eager")(model_pred, ref_pred, target).float()
    actual = run(model_pred, ref_pred, target).float()
    error = float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
    tolerance = 2e-2 if model_pred.dtype == torch.bfloat16 else 1e-4
    if not error <= tolerance:
        raise AssertionError(f"gradient differs from the torch backend by {error:.3g}")
    return error


def time_cuda(step: Callable[[], object], inner: int, rounds: int) -> float:
    """Median milliseconds per call of ``step`` over ``rounds`` rounds of ``inner`` calls."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    samples = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            step()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


def fused_phase_steps(
    batch_pairs: int,
    sample_shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    name: str = "fused",
) -> dict[str, Callable[[], None]]:
    """A fused backend's three kernels as separate steps ({"sums", "finalize", "gradient"}),
    each relaunching one kernel on the same inputs, so the finalize kernel (one block, the
    partials of all pairs and chunks) is timed apart from the two passes over the data.
    ``name``: "fused" (the Triton kernels) or "cuda" (their CUDA C++ twin)."""
    model_pred, ref_pred, target = make_input_sets(batch_pairs, sample_shape, dtype, device, 1)[0]
    grad_output = torch.ones((), dtype=torch.float32, device=device)
    if name == "cuda":
        from sdpo import cuda_backend

        method = reference.METHOD_CODES["diffusion-dpo"]
        (launch_sums, launch_finalize), (_loss, _stats, _scale, coefficients) = (
            cuda_backend.forward_launches(
                model_pred, ref_pred, target, None, (method, BETA, MU, True, 0, 0.0)
            )
        )

        def gradient() -> None:
            cuda_backend.cuda_backward(
                grad_output, model_pred, ref_pred, target, coefficients, False
            )

    else:
        from sdpo.kernels import preference

        (launch_sums, launch_finalize), (_loss, _stats, _scale, coefficients) = (
            preference.forward_launches(
                model_pred, ref_pred, target, None, (preference.METHOD_DPO, BETA, MU, True, 0, 0.0)
            )
        )

        def gradient() -> None:
            preference.launch_gradient(
                grad_output, model_pred, ref_pred, target, coefficients, with_gap=False
            )

    launch_sums()
    launch_finalize()
    return {"sums": launch_sums, "finalize": launch_finalize, "gradient": gradient}


def copy_bandwidth_gbps(device: torch.device, megabytes: int = 1024) -> float:
    """Device copy bandwidth: bytes read + written by ``dst.copy_(src)`` per second."""
    elements = megabytes * 2**20 // 4
    source = torch.empty(elements, dtype=torch.float32, device=device)
    destination = torch.empty_like(source)
    ms = time_cuda(lambda: destination.copy_(source), inner=10, rounds=10)
    return 2 * source.numel() * 4 / (ms * 1e-3) / 1e9


class Rotator:
    """Cycles over input copies so consecutive iterations do not hit in L2."""

    def __init__(self, sets):
        self.sets = sets
        self.index = 0

    def next(self):
        inputs = self.sets[self.index % len(self.sets)]
        self.index += 1
        return inputs


def device_summary() -> dict:
    info = {"torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    else:
        info["device"] = "cpu"
    return info


def write_results(path: str, results: list[KernelResult], copy_gbps: float | None) -> None:
    payload = {**device_summary(), "copy_bandwidth_gbps": copy_gbps}
    payload["kernels"] = [asdict(result) for result in results]
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)


def markdown_table(results: list[KernelResult]) -> str:
    lines = [
        "| case | shape | dtype | ms | GB/s | % copy bw | sums / finalize / gradient ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        phases = [result.extra.get(f"{phase}_ms") for phase in ("sums", "finalize", "gradient")]
        phase_text = " / ".join(f"{ms:.4f}" for ms in phases) if None not in phases else ""
        lines.append(
            f"| {result.name} | {'x'.join(map(str, result.shape))} | {result.dtype} | "
            f"{result.ms:.4f} | {result.gbps:.0f} | {result.pct_of_copy_bandwidth:.1f} | "
            f"{phase_text} |"
        )
    return "\n".join(lines)
