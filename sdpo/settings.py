"""The loss settings every backend takes: one frozen, validated object instead of five arguments.

:func:`sdpo.preference_loss` builds it once from its keyword arguments
(:meth:`LossSettings.from_arguments`) and passes it through the layers: the plain-PyTorch
reference reads its fields, the fused backends turn it into their custom ops' scalar arguments
(:meth:`LossSettings.op_arguments`; a ``torch.library`` schema takes ints, floats and bools only).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

# The methods, and the integer codes the fused kernels (Triton and CUDA) take for each. Here, not
# in sdpo.reference (which re-exports them), so that the trainer's flag table reads the choices
# without importing torch: `sdpo-train --help` stays fast.
METHODS = ("diffusion-dpo", "dspo", "dspo-sdxl", "dmpo")
METHOD_CODES = {method: code for code, method in enumerate(METHODS)}


def parse_granularity(granularity: str) -> int | None:
    """Pairs per lambda: None for "batch" (one per call), 1 for "pair", G for "group:G"."""
    if granularity == "batch":
        return None
    if granularity == "pair":
        return 1
    if isinstance(granularity, str) and granularity.startswith("group:"):
        size_text = granularity.split(":", 1)[1]
        if size_text.isdigit() and int(size_text) >= 1:
            return int(size_text)
    raise ValueError(
        f"granularity: unknown {granularity!r}; expected 'batch', 'pair' or 'group:G' with G a "
        "positive integer (e.g. 'group:8' reproduces the reference scripts' 8 pairs per lambda)"
    )


def check_real_number(name: str, value: object) -> float:
    """``value`` as a finite Python float, else ValueError naming ``name``."""
    # bool is a numbers.Number too, and a tensor here would need a host sync to validate.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected a Python float, got {type(value).__name__}")
    value = float(value)
    # Not math.isfinite: under torch.compile a float that changed between calls is a symbolic
    # float, which math.isfinite cannot take; a comparison is traced as a guard, so a new value
    # recompiles and a non-finite one still fails here (nan and +-inf are not < inf).
    if not abs(value) < math.inf:
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return value


# from_arguments' cache: (type, value) of each argument -> LossSettings (bounded: a sweep over
# many betas must not grow it without end).
_SETTINGS_CACHE: dict[tuple, LossSettings] = {}
_MAX_CACHED_SETTINGS = 128


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """What a preference loss computes, validated when built (ValueError naming the field).

    ``method``: one of METHODS. ``beta`` > 0. ``mu``: None (safeguard off) or in
    [0, 1]. ``group_size``: None for one lambda per call ("batch"), else the pairs per lambda
    group (1 = "pair"); the groups also carry DSPO-SDXL's switch. ``dmpo_alpha`` in [0, 1].
    """

    method: str = "diffusion-dpo"
    beta: float = 5000.0
    mu: float | None = None
    group_size: int | None = None
    dmpo_alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"method: unknown {self.method!r}; expected one of {', '.join(METHODS)}"
            )
        beta = check_real_number("beta", self.beta)
        if beta <= 0:
            raise ValueError(f"beta: expected > 0, got {beta}")
        object.__setattr__(self, "beta", beta)
        if self.mu is not None:
            mu = check_real_number("mu", self.mu)
            if not 0.0 <= mu <= 1.0:
                raise ValueError(
                    f"mu: expected None (safeguard off) or a number in [0, 1], got {mu}"
                )
            object.__setattr__(self, "mu", mu)
        if self.group_size is not None and (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or self.group_size < 1
        ):
            raise ValueError(
                f"group_size: expected None or a positive int, got {self.group_size!r}"
            )
        dmpo_alpha = check_real_number("dmpo_alpha", self.dmpo_alpha)
        if not 0.0 <= dmpo_alpha <= 1.0:
            raise ValueError(f"dmpo_alpha: expected a number in [0, 1], got {dmpo_alpha}")
        object.__setattr__(self, "dmpo_alpha", dmpo_alpha)

    @classmethod
    def from_arguments(
        cls, *, method: str, beta: float, mu: float | None, granularity: str, dmpo_alpha: float
    ) -> LossSettings:
        """From :func:`sdpo.preference_loss`'s keyword arguments (granularity as a string).

        Eagerly, settings built before come from a small cache (a lookup ~1.5 us, validating
        ~5 us on a 2-core CPU). The key holds each argument's type with its value, so True
        never finds the settings made from 1, and only validated settings are stored: what is
        refused is refused on every call, with the same error.
        """
        # torch imported here, not at module level: the trainer's flag table imports this module
        # and `sdpo-train --help` must not pay torch's ~1.5 s import (a cached import: ~0.3 us).
        import torch

        if torch.compiler.is_compiling():
            return cls(method, beta, mu, parse_granularity(granularity), dmpo_alpha)
        key = (
            type(method), method, type(beta), beta, type(mu), mu, type(granularity),
            granularity, type(dmpo_alpha), dmpo_alpha,
        )  # fmt: skip
        try:
            settings = _SETTINGS_CACHE.get(key)
        except TypeError:  # an unhashable argument: validation below names it
            settings, key = None, None
        if settings is None:
            settings = cls(method, beta, mu, parse_granularity(granularity), dmpo_alpha)
            if key is not None:
                if len(_SETTINGS_CACHE) >= _MAX_CACHED_SETTINGS:
                    _SETTINGS_CACHE.clear()
                _SETTINGS_CACHE[key] = settings
        return settings

    @property
    def safeguard(self) -> bool:
        return self.mu is not None

    def pairs_per_group(self, batch_pairs: int) -> int:
        """The pairs sharing a lambda (and DSPO-SDXL's switch) in a batch of ``batch_pairs``."""
        return batch_pairs if self.group_size is None else self.group_size

    def op_arguments(self) -> tuple[int, float, float, bool, int, float]:
        """(method_code, beta, mu, safeguard, group_size, dmpo_alpha) as the fused custom ops
        take them: mu None -> 0.0 with safeguard False, group_size None -> 0 (one lambda)."""
        return (
            METHOD_CODES[self.method],
            self.beta,
            0.0 if self.mu is None else self.mu,
            self.safeguard,
            0 if self.group_size is None else self.group_size,
            self.dmpo_alpha,
        )
