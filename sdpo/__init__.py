"""Diffusion-SDPO: safeguarded preference alignment for diffusion models.

Public API: :func:`preference_loss` (Diffusion-DPO, DSPO, DMPO, with or without the SDPO
safeguard) and :mod:`sdpo.timesteps` (experimental timestep masks and importance weights).
Subpackages: ``sdpo.kernels`` (Triton kernels), ``sdpo.train`` (the trainer),
``sdpo.profiling`` (profiling suites and benchmarks).
"""

from sdpo.objectives import BACKENDS, METHODS, PreferenceLoss, parse_granularity, preference_loss

__all__ = ["BACKENDS", "METHODS", "PreferenceLoss", "parse_granularity", "preference_loss"]
__version__ = "0.1.0"
