"""Helpers the trainer tests share: the tiny-preset config and the logged metrics rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import sdpo
from sdpo.train.config import TrainConfig, config_from_args


def tiny(tmp_path: Path, name: str = "run", **overrides) -> TrainConfig:
    """The tiny preset writing to ``tmp_path / name``, with ``overrides`` set, validated."""
    config = config_from_args(
        ["--preset", "tiny", "--output-dir", str(tmp_path / name), "--no-progress"]
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    config.validate()
    return config


def read_rows(output_dir: str | Path) -> list[dict]:
    """The rows of ``output_dir/metrics.jsonl``."""
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


# How far one logged step of the tiny preset may move when the same fp32 maths is summed in
# another order (channels_last, another SDPA kernel, FSDP's reduce-scatter instead of DDP's
# all-reduce), from the arithmetic rather than from one machine:
#
# - Each of a pair's four MSEs (policy and reference, winner and loser; ~1.1 here, where one
#   fp32 ulp is 2**-23 = 1.19e-7) is a mean of the same products summed in another order: the
#   runs' MSEs differ by about an ulp (measured: 0 or 1). The MSEs of step k carry k forwards'
#   rounding (each update carries the previous gradients' relative error r, AdamW moving the
#   weights by <= r x lr, so the next forward shifts at the level of its own rounding): k ulps.
# - The margin u = -(beta/2)((L_w - R_w) - lambda (L_l - R_l)) (lambda <= 1) then moves by
#   du <= (beta/2) x 4 MSEs x k ulps: 2500 x 4 x 1.19e-7 = 1.19e-3 per step at beta 5000.
# - The loss -log sigmoid(+-u) moves by sigmoid(|u|) du, and the gradient, which carries the
#   factor sigmoid(-+u), by the same relative amount: at the tiny run's |u| < 0.05,
#   sigmoid(|u|) < 0.52, so 6.2e-4 at step 1, 1.9e-3 at step 3.
# - The gradient's own reordering is far below that: a weight gradient sums 4 rows x 8 x 8
#   positions (256 products), relative error ~ eps sqrt(256) = 1.9e-6 per layer, and the
#   norm's sum of squares over 2.5e5 weights ~ eps sqrt(2.5e5) = 6e-5 at worst.
# Measured: 1.1e-4 to 2.2e-4 for the gradient norm (2 CPUs here, an AVX-512 EPYC). A wrong
# scaling (a factor 2 from accumulation or world size, beta off by 1%) moves it by >= 1e-2.
FP32_EPSILON = 2.0**-23


def ulp(value: float) -> float:
    return FP32_EPSILON * 2.0 ** math.floor(math.log2(abs(value)))


def reordering_bound(row: dict, beta: float) -> float:
    """The bound above for one metrics row: absolute for the loss, relative for grad_norm."""
    steps = row["step"]
    mse_ulp = max(ulp(row[key]) for key in ("model_mse_w", "model_mse_l"))
    margin_change = beta / 2 * 4 * steps * mse_ulp
    return margin_change / (1 + math.exp(-abs(row["margin"])))  # x sigmoid(|u|)


def assert_same_up_to_reordering(rows: list[dict], baseline: list[dict], beta: float) -> None:
    """Loss and gradient norm of each step within ``reordering_bound`` of the baseline's."""
    assert [row["step"] for row in rows] == [row["step"] for row in baseline]
    for row, expected in zip(rows, baseline, strict=True):
        bound = reordering_bound(expected, beta)
        assert abs(row["loss"] - expected["loss"]) <= bound, (row["step"], "loss", bound)
        change = abs(row["grad_norm"] - expected["grad_norm"]) / expected["grad_norm"]
        assert change <= bound, (row["step"], "grad_norm", change, bound)


def poison_losses(monkeypatch, calls_to_poison) -> None:
    """sdpo.preference_loss returns a NaN loss on the (1-based) calls ``calls_to_poison``
    accepts; the real loss otherwise."""
    real = sdpo.preference_loss
    calls = {"count": 0}

    def poisoned(*args, **kwargs):
        calls["count"] += 1
        result = real(*args, **kwargs)
        if calls_to_poison(calls["count"]):
            return sdpo.PreferenceLoss(result.loss * float("nan"), result.stats)
        return result

    monkeypatch.setattr(sdpo, "preference_loss", poisoned)
