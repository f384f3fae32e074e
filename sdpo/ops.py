"""The op layer for the fused Triton kernels (backend="triton")."""

from __future__ import annotations

import os

import torch


def interpreter_enabled() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available(device: torch.device) -> bool:
    """Whether the fused kernels can run on ``device`` (CUDA, or CPU under the interpreter)."""
    return False


def require_triton(device: torch.device) -> None:
    """Raises a clear error when backend="triton" cannot run on ``device``."""
    raise RuntimeError(
        'backend="triton": the fused kernels are not built yet; use backend="torch" or "auto"'
    )
