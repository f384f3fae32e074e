"""Which images of a prompt become preference pairs, from their rewards (no torch).

- ``best-worst``: one pair per prompt, its highest-reward image against its lowest (the first
  sample index wins a tie for best or for worst, so the choice is deterministic).
- ``gap:T``: every pair of a prompt's images whose rewards differ by more than ``T`` (strictly),
  the higher-reward image the winner, in sample-index order (0-1, 0-2, ..., 1-2, ...).

A prompt whose images all have the same reward carries no preference: it gives no pair under
either rule and is counted as tied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PairRule:
    kind: str  # "best-worst" or "gap"
    gap: float = 0.0  # "gap" only: the reward difference a pair must exceed

    def __str__(self) -> str:
        return self.kind if self.kind == "best-worst" else f"gap:{self.gap:g}"


def parse_rule(text: str) -> PairRule:
    """``best-worst`` or ``gap:T`` (T a finite number >= 0); a ValueError naming --pairs."""
    if text == "best-worst":
        return PairRule("best-worst")
    if text.startswith("gap:"):
        value = text.removeprefix("gap:")
        try:
            gap = float(value)
        except ValueError:
            gap = math.nan
        if not math.isfinite(gap) or gap < 0:
            raise ValueError(f"--pairs {text}: the gap must be a finite number >= 0, e.g. gap:0.5")
        return PairRule("gap", gap)
    raise ValueError(f"--pairs {text!r}: expected best-worst or gap:T (e.g. gap:0.5)")


def select_pairs(scores: list[float], rule: PairRule) -> list[tuple[int, int]]:
    """(winner, loser) sample indices of one prompt's images under ``rule``; [] when all tie."""
    if len(scores) < 2:
        raise ValueError(f"scores: need at least 2 images to pair, got {len(scores)}")
    if all_tied(scores):
        return []
    if rule.kind == "best-worst":
        best = max(range(len(scores)), key=lambda index: (scores[index], -index))
        worst = min(range(len(scores)), key=lambda index: (scores[index], index))
        return [(best, worst)]
    if rule.kind != "gap":
        raise ValueError(f"rule: unknown kind {rule.kind!r}")
    pairs = []
    for first in range(len(scores)):
        for second in range(first + 1, len(scores)):
            if abs(scores[first] - scores[second]) > rule.gap:
                winner_first = scores[first] > scores[second]
                pairs.append((first, second) if winner_first else (second, first))
    return pairs


def all_tied(scores: list[float]) -> bool:
    """Every image of the prompt scored exactly the same: it carries no preference."""
    return all(score == scores[0] for score in scores)
