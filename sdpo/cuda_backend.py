"""backend="cuda": the CUDA C++ twin of the fused kernels (kernels/cuda/, built with CMake).

The shared library ``libsdpo_cuda.so`` exports a small C ABI (kernels/cuda/sdpo_preference.h):
raw device pointers, sizes and the current CUDA stream. It is loaded with ctypes from
``$SDPO_CUDA_LIBRARY`` or ``<repository>/build/``; build it with
``cmake -S . -B build && cmake --build build``. Two ``torch.library`` custom ops wrap it the way
sdpo/ops.py wraps the Triton kernels (fake implementations, so torch.compile traces them; every
buffer, the workspace included, is allocated by PyTorch, so CUDA graphs can capture them).

``libsdpo_cuda_host.so`` (same build, no CUDA needed) runs the kernels' math on host fp32
arrays; the CPU tests use it through :func:`host_library`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from sdpo import chunking, ops, reference
from sdpo.kernels import buffers
from sdpo.settings import LossSettings

LIBRARY_NAME = "libsdpo_cuda.so"
HOST_LIBRARY_NAME = "libsdpo_cuda_host.so"
ABI_VERSION = 2
BUILD_COMMAND = "cmake -S . -B build && cmake --build build"
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
METHOD_CODES = reference.METHOD_CODES
NUM_STATS = ops.NUM_FUSED_STATS
SUMS_THREADS = 256
# Elements per thread and loop step of the kernels (one 16-byte load of a 16-bit input, two of
# fp32): chunks are whole multiples of it.
VECTOR_ELEMENTS = 8

_i64, _f32, _int, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
_LIBRARIES: dict[str, ctypes.CDLL] = {}


def repository_root() -> Path:
    return Path(__file__).resolve().parent.parent


def library_path(name: str = LIBRARY_NAME) -> Path:
    override = os.environ.get("SDPO_CUDA_LIBRARY") if name == LIBRARY_NAME else None
    return Path(override) if override else repository_root() / "build" / name


def _load(name: str) -> ctypes.CDLL:
    if name in _LIBRARIES:
        return _LIBRARIES[name]
    path = library_path(name)
    if not path.is_file():
        raise RuntimeError(
            f'backend="cuda": {path} is not built; run `{BUILD_COMMAND}` in the repository root '
            "(needs nvcc), or set SDPO_CUDA_LIBRARY to the built library; "
            'backend="triton" or "torch" need no build'
        )
    try:
        library = ctypes.CDLL(str(path))
    except OSError as error:
        raise RuntimeError(f'backend="cuda": cannot load {path} ({error})') from error
    _declare(library, name)
    _LIBRARIES[name] = library
    return library


def _declare(library: ctypes.CDLL, name: str) -> None:
    if name == LIBRARY_NAME:
        library.sdpo_cuda_abi_version.restype = _int
        library.sdpo_cuda_last_error.restype = ctypes.c_char_p
        library.sdpo_cuda_workspace_floats.restype = _i64
        library.sdpo_cuda_workspace_floats.argtypes = [_i64, _i64]
        library.sdpo_cuda_vector_loads.restype = _int
        library.sdpo_cuda_vector_loads.argtypes = [_int, _int, _int, _ptr, _ptr, _ptr, _i64]
        library.sdpo_cuda_forward.restype = _int
        library.sdpo_cuda_forward.argtypes = [
            _int, _int, _int, _ptr, _ptr, _ptr, _int, _ptr, _i64, _i64, _i64, _i64, _int,
            _f32, _f32, _int, _i64, _f32, _f32, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr,
        ]  # fmt: skip
        library.sdpo_cuda_forward_phases.restype = _int
        library.sdpo_cuda_forward_phases.argtypes = [_int, *library.sdpo_cuda_forward.argtypes]
        library.sdpo_cuda_gradient.restype = _int
        library.sdpo_cuda_gradient.argtypes = [
            _int, _int, _int, _ptr, _ptr, _ptr, _ptr, _int, _int, _i64, _i64, _ptr, _ptr, _ptr,
        ]  # fmt: skip
        version = library.sdpo_cuda_abi_version()
        if version != ABI_VERSION:
            raise RuntimeError(
                f'backend="cuda": the library speaks ABI {version}, this package {ABI_VERSION}; '
                f"rebuild it (`{BUILD_COMMAND}`)"
            )
    else:
        library.sdpo_host_forward.restype = _int
        library.sdpo_host_forward.argtypes = [
            _ptr, _ptr, _ptr, _int, _ptr, _i64, _i64, _int, _f32, _f32, _int, _i64,
            _f32, _f32, _ptr, _ptr, _ptr, _ptr,
        ]  # fmt: skip
        library.sdpo_host_gradient.restype = _int
        library.sdpo_host_gradient.argtypes = [
            _f32, _ptr, _ptr, _ptr, _int, _int, _i64, _i64, _ptr, _ptr,
        ]  # fmt: skip


def cuda_library() -> ctypes.CDLL:
    return _load(LIBRARY_NAME)


def host_library(path: Path | None = None) -> ctypes.CDLL:
    """The host build (CPU tests). ``path``: a library built elsewhere (e.g. by a test)."""
    if path is not None:
        library = ctypes.CDLL(str(path))
        _declare(library, HOST_LIBRARY_NAME)
        return library
    return _load(HOST_LIBRARY_NAME)


def cuda_available(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        cuda_library()
    except RuntimeError:
        return False
    return True


def require_cuda(device: torch.device) -> None:
    """Raises a clear error when backend="cuda" cannot run on ``device``."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(
            f'backend="cuda": the inputs are on {device}, not a CUDA device (no GPU visible: '
            f'{not torch.cuda.is_available()}); use backend="torch" or "auto" there'
        )
    require_library()


@torch.compiler.assume_constant_result
def require_library() -> bool:
    """Loads libsdpo_cuda.so (no GPU needed) or raises the error saying how to build it.

    Loading is ctypes and file-system calls, which dynamo cannot trace: when the first call of a
    process was a torch.compile(fullgraph=True) one, tracing them failed ("Attempted to call
    function marked as skipped"). Marked constant, it runs once at trace time (a missing library
    raises the same error there) and the graph sees True.
    """
    cuda_library()
    return True


def _check(status: int, what: str) -> None:
    if status != 0:
        message = cuda_library().sdpo_cuda_last_error().decode(errors="replace")
        raise RuntimeError(f'backend="cuda": {what} failed ({message})')


# Elements one pass of a pair_sums_kernel block covers (256 threads x 8).
SUMS_STEP = SUMS_THREADS * VECTOR_ELEMENTS


def plan_chunks(batch_pairs: int, elements: int) -> tuple[int, int]:
    """(chunk_elements, num_chunks) of the CUDA pair-sums kernel (see sdpo.chunking.plan_chunks):
    the same plan as Triton's, in passes of SUMS_STEP; the video size (B = 2, 2.1M elements per
    sample) becomes 2 x 256 blocks of 8192 elements."""
    return chunking.plan_chunks(batch_pairs, elements, SUMS_STEP)


def _launch_context(tensor: Tensor) -> tuple[contextlib.AbstractContextManager, int | None]:
    """(device context, stream) for a launch on ``tensor``'s device. A CPU tensor reaches the
    library only from the CPU tests, whose emulated build of it takes host pointers and no
    stream (backend="cuda" itself refuses CPU inputs in require_cuda)."""
    if not tensor.is_cuda:
        return contextlib.nullcontext(), None
    return torch.cuda.device(tensor.device), torch.cuda.current_stream(tensor.device).cuda_stream


def _forward_arguments(
    model_pred: Tensor,
    ref_pred: Tensor,
    target: Tensor,
    pair_weights: Tensor | None,
    op_arguments: tuple,
    stream: int | None,
) -> tuple[tuple, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """sdpo_cuda_forward's arguments for these inputs (new output buffers, ``stream``), then the
    workspace tensor, and the outputs (loss, stats, lambda, coefficients) the kernels write.
    ``op_arguments``: (method_code, beta, mu, safeguard, group_size, dmpo_alpha), the custom
    op's scalar arguments in its order (LossSettings.op_arguments())."""
    method_code, beta, mu, safeguard, group_size, dmpo_alpha = op_arguments
    library = cuda_library()
    device = model_pred.device
    rows = model_pred.shape[0]
    batch_pairs, elements = rows // 2, model_pred[0].numel()
    chunk_elements, num_chunks = plan_chunks(batch_pairs, elements)
    # The buffers both fused backends share (sdpo/kernels/buffers.py): separate tensors, since a
    # custom op's outputs must not alias (this body also serves the op).
    workspace, loss, stats, scale, coefficients = buffers.forward_buffers(
        device,
        batch_pairs,
        library.sdpo_cuda_workspace_floats(batch_pairs, num_chunks),
        one_allocation=False,
    )
    log_q, log_one_minus_q = reference.dmpo_log_q(dmpo_alpha)
    arguments = (
        DTYPE_CODES[model_pred.dtype],
        DTYPE_CODES[ref_pred.dtype],
        DTYPE_CODES[target.dtype],
        model_pred.data_ptr(),
        ref_pred.data_ptr(),
        target.data_ptr(),
        int(target.shape[0] == batch_pairs),
        pair_weights.data_ptr() if pair_weights is not None else None,
        batch_pairs,
        elements,
        chunk_elements,
        num_chunks,
        method_code,
        beta,
        mu,
        int(safeguard),
        group_size,
        log_q,
        log_one_minus_q,
        workspace.data_ptr(),
        loss.data_ptr(),
        stats.data_ptr(),
        scale.data_ptr(),
        coefficients.data_ptr(),
        stream,
    )
    # The workspace rides along: the kernels use it after this function returns.
    return (*arguments, workspace), (loss, stats, scale, coefficients)


def cuda_forward(
    model_pred: Tensor,
    ref_pred: Tensor,
    target: Tensor,
    pair_weights: Tensor | None,
    op_arguments: tuple,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward kernels (sdpo::cuda_preference_forward's body and the eager path):
    (loss (), stats (9,), lambda (B,), coefficients (2, 2B)). ``op_arguments``: (method_code,
    beta, mu, safeguard, group_size, dmpo_alpha), group_size 0 = one lambda. Each contiguous
    input is read in its own dtype (fp32, bf16 or fp16), at any alignment."""
    context, stream = _launch_context(model_pred)
    arguments, outputs = _forward_arguments(
        model_pred, ref_pred, target, pair_weights, op_arguments, stream
    )
    with context:
        status = cuda_library().sdpo_cuda_forward(*arguments[:-1])
    _check(status, "the forward kernels")
    return outputs


def forward_launches(
    model_pred: Tensor,
    ref_pred: Tensor,
    target: Tensor,
    pair_weights: Tensor | None,
    op_arguments: tuple,
) -> tuple[tuple[Callable[[], None], Callable[[], None]], tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The two forward kernels as separate launches, for the benchmarks (as the Triton
    backend's forward_launches): ((sums launch, finalize launch), (loss, stats, lambda,
    coefficients)); each launch reruns one kernel on the same buffers. ``op_arguments`` as
    cuda_forward's."""
    arguments, outputs = _forward_arguments(
        model_pred, ref_pred, target, pair_weights, op_arguments, _launch_context(model_pred)[1]
    )

    def launch(phase: int, what: str) -> Callable[[], None]:
        # `buffers` keeps the tensors the raw pointers in `arguments` point into (the workspace,
        # the outputs) alive as long as the launch is: without it the caller's dropping the
        # outputs freed memory the finalize kernel then wrote (a crash in the CPU test).
        def run(buffers: tuple = (arguments, outputs)) -> None:
            with _launch_context(model_pred)[0]:
                status = cuda_library().sdpo_cuda_forward_phases(phase, *buffers[0][:-1])
            _check(status, what)

        return run

    return (launch(1, "pair_sums_kernel"), launch(2, "finalize_kernel")), outputs


def cuda_backward(
    grad_loss: Tensor,
    model_pred: Tensor,
    ref_pred: Tensor,
    target: Tensor,
    coefficients: Tensor,
    with_gap: bool,
) -> Tensor:
    """The gradient kernel (sdpo::cuda_preference_backward's body and the eager path):
    d loss / d model_pred in model_pred's dtype."""
    library = cuda_library()
    rows = model_pred.shape[0]
    batch_pairs, elements = rows // 2, model_pred[0].numel()
    grad_output, grad = buffers.gradient_buffers(grad_loss, model_pred)
    context, stream = _launch_context(model_pred)
    with context:
        status = library.sdpo_cuda_gradient(
            DTYPE_CODES[model_pred.dtype],
            DTYPE_CODES[ref_pred.dtype],
            DTYPE_CODES[target.dtype],
            grad_output.data_ptr(),
            model_pred.data_ptr(),
            ref_pred.data_ptr(),
            target.data_ptr(),
            int(target.shape[0] == batch_pairs),
            int(with_gap),
            batch_pairs,
            elements,
            coefficients.data_ptr(),
            grad.data_ptr(),
            stream,
        )
    _check(status, "the gradient kernel")
    return grad


@torch.library.custom_op("sdpo::cuda_preference_forward", mutates_args=())
def cuda_preference_forward(
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
    op_arguments = (method_code, beta, mu, safeguard, group_size, dmpo_alpha)
    return cuda_forward(model_pred, ref_pred, target, pair_weights, op_arguments)


@cuda_preference_forward.register_fake
def _forward_fake(
    model_pred, ref_pred, target, pair_weights, method_code, beta, mu, safeguard, group_size,
    dmpo_alpha,
):  # fmt: skip
    return ops.fused_forward_fake_outputs(model_pred)


@torch.library.custom_op("sdpo::cuda_preference_backward", mutates_args=())
def cuda_preference_backward(
    grad_loss: Tensor,
    model_pred: Tensor,
    ref_pred: Tensor,
    target: Tensor,
    coefficients: Tensor,
    with_gap: bool,
) -> Tensor:
    """d loss / d model_pred: winners g0 (a e_w + b (pred_w - ref_w)), losers g0 c e_l."""
    return cuda_backward(grad_loss, model_pred, ref_pred, target, coefficients, with_gap)


@cuda_preference_backward.register_fake
def _backward_fake(grad_loss, model_pred, ref_pred, target, coefficients, with_gap):
    return torch.empty_like(model_pred, memory_format=torch.contiguous_format)


# Eager calls take the plain functions through one autograd.Function (as backend="triton"
# does), not the custom-op dispatcher; torch.compile traces the custom ops.
def cuda_forward_eager(
    model_pred: Tensor,
    ref_pred: Tensor,
    target: Tensor,
    pair_weights: Tensor | None,
    op_arguments: tuple,
) -> tuple[Tensor, Tensor, Tensor, Tensor, bool]:
    """cuda_forward in the eager path's calling convention (ops.register_fused_autograd): the
    outputs, then what the backward needs besides them (whether the gap term is in)."""
    outputs = cuda_forward(model_pred, ref_pred, target, pair_weights, op_arguments)
    return (*outputs, op_arguments[0] in ops.GAP_METHOD_CODES)


def cuda_backward_eager(
    grad_loss: Tensor, model_pred: Tensor, ref_pred: Tensor, target: Tensor,
    coefficients: Tensor, with_gap: bool,
) -> Tensor:  # fmt: skip
    """cuda_backward with the forward's state (with_gap)."""
    return cuda_backward(grad_loss, model_pred, ref_pred, target, coefficients, with_gap)


ops.register_fused_autograd(
    cuda_preference_forward, cuda_preference_backward, cuda_forward_eager, cuda_backward_eager
)


def preference_loss_cuda(
    model_pred: Tensor,
    ref_pred: Tensor,
    target: Tensor,
    settings: LossSettings,
    pair_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """backend="cuda": each input read in its own dtype, fp32, bf16 or fp16, mixed as they come
    (a bf16 prediction against an fp32 target: no copies); any other dtype (fp64) is read as
    fp32, as the Triton backend reads fp64."""
    model_pred, ref_pred, target = (
        tensor if tensor.dtype in DTYPE_CODES else tensor.to(torch.float32)
        for tensor in (model_pred, ref_pred, target)
    )
    return ops.preference_loss_fused(
        cuda_preference_forward, model_pred, ref_pred, target, settings, pair_weights
    )
