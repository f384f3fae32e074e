"""LossSettings: the one validated settings object every backend receives."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sdpo.settings import LossSettings


def test_built_once_from_the_public_arguments_and_frozen():
    settings = LossSettings.from_arguments(
        method="dspo-sdxl", beta=5000, mu=0.6, granularity="group:8", dmpo_alpha=0
    )
    assert settings == LossSettings("dspo-sdxl", 5000.0, 0.6, 8, 0.0)
    assert isinstance(settings.beta, float) and isinstance(settings.dmpo_alpha, float)
    assert settings.safeguard and settings.pairs_per_group(16) == 8
    assert settings.op_arguments() == (2, 5000.0, 0.6, True, 8, 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.beta = 1.0  # type: ignore[misc]
    batch = LossSettings("dmpo", 2000.0, None, None, 0.01)
    assert not batch.safeguard and batch.pairs_per_group(5) == 5
    assert batch.op_arguments() == (3, 2000.0, 0.0, False, 0, 0.01)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "dpo"}, r"method: unknown 'dpo'"),
        ({"beta": 0.0}, r"beta: expected > 0"),
        ({"beta": True}, r"beta: expected a Python float"),
        ({"mu": 1.5}, r"mu: expected None .* in \[0, 1\]"),
        ({"mu": torch.tensor(0.5)}, r"mu: expected a Python float"),
        ({"group_size": 0}, r"group_size: expected None or a positive int"),
        ({"group_size": 2.0}, r"group_size: expected None or a positive int"),
        ({"dmpo_alpha": float("nan")}, r"dmpo_alpha: expected a finite number"),
    ],
)
def test_invalid_fields_are_rejected_when_built(fields, message):
    with pytest.raises(ValueError, match=message):
        LossSettings(**fields)


def test_from_arguments_cache_never_changes_what_is_accepted_or_refused(monkeypatch):
    from sdpo import settings as settings_module

    monkeypatch.setattr(settings_module, "_SETTINGS_CACHE", {})
    arguments = dict(method="diffusion-dpo", beta=1, mu=0.5, granularity="pair", dmpo_alpha=0.0)
    first = LossSettings.from_arguments(**arguments)
    assert LossSettings.from_arguments(**arguments) is first  # a hit
    assert first == LossSettings("diffusion-dpo", 1.0, 0.5, 1, 0.0)
    # True == 1 and hash(True) == hash(1), but True is refused, on every call.
    for _ in range(2):
        with pytest.raises(ValueError, match="beta: expected a Python float"):
            LossSettings.from_arguments(**{**arguments, "beta": True})
        with pytest.raises(ValueError, match=r"mu: expected None .* in \[0, 1\]"):
            LossSettings.from_arguments(**{**arguments, "mu": 1.5})
        with pytest.raises(ValueError, match="granularity: unknown"):
            LossSettings.from_arguments(**{**arguments, "granularity": ["pair"]})  # unhashable
    # 1 and 1.0 are different keys with equal settings; other values are other settings.
    assert LossSettings.from_arguments(**{**arguments, "beta": 1.0}) == first
    assert LossSettings.from_arguments(**{**arguments, "mu": None}).mu is None
    assert len(settings_module._SETTINGS_CACHE) == 3


def test_from_arguments_cache_is_bounded(monkeypatch):
    from sdpo import settings as settings_module

    monkeypatch.setattr(settings_module, "_SETTINGS_CACHE", {})
    monkeypatch.setattr(settings_module, "_MAX_CACHED_SETTINGS", 4)
    for beta in range(1, 20):
        settings = LossSettings.from_arguments(
            method="dmpo", beta=float(beta), mu=None, granularity="batch", dmpo_alpha=0.1
        )
        assert settings.beta == beta
        assert len(settings_module._SETTINGS_CACHE) <= 4
