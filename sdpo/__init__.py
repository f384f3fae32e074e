"""Diffusion-SDPO: safeguarded preference alignment for diffusion models.

Public API: :func:`preference_loss` (Diffusion-DPO, DSPO, DMPO, with or without the SDPO
safeguard) and :mod:`sdpo.timesteps` (experimental timestep masks and importance weights).
Subpackages: ``sdpo.kernels`` (Triton kernels), ``sdpo.train`` (the trainer),
``sdpo.profiling`` (profiling suites and benchmarks), ``sdpo.eval``, ``sdpo.demo``.

The API names load on first use (PEP 562), so ``import sdpo.train.cli`` and the other command
lines do not pay for importing torch before they parse ``--help``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdpo.objectives import (
        BACKENDS,
        METHODS,
        PreferenceLoss,
        parse_granularity,
        preference_loss,
    )

__all__ = ["BACKENDS", "METHODS", "PreferenceLoss", "parse_granularity", "preference_loss"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        from sdpo import objectives

        value = getattr(objectives, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sdpo' has no attribute {name!r}")
