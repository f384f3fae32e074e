"""NVTX ranges around the phases of a training step, off by default and free when off.

``ranges = PhaseRanges(enabled)``, then ``with ranges("policy forward"): ...``. When disabled
the call returns one shared ``nullcontext`` (no allocation, no call into NVTX). Ranges are never
opened inside a region that torch.compile is tracing (they would break the graph).
"""

from __future__ import annotations

import contextlib

import torch

PHASES = (
    "data to device",
    "encode",
    "policy forward",
    "reference forward",
    "loss and safeguard",
    "backward",
    "optimizer",
    "all-reduce",
    "checkpoint",
)
_OFF = contextlib.nullcontext()


class PhaseRanges:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._annotate = None
        if enabled:
            try:
                import nvtx
            except ImportError as error:
                raise RuntimeError(
                    "--nvtx needs the `nvtx` package: pip install 'diffusion-sdpo[profile]'"
                ) from error
            self._annotate = nvtx.annotate

    def __call__(self, name: str):
        if not self.enabled or torch.compiler.is_compiling():
            return _OFF
        return self._annotate(name, domain="sdpo")
