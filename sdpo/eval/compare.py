"""A/B comparison of two scored manifests: per-metric win rates with bootstrap intervals.

Entries are paired by prompt (and occurrence), never by position. For each metric and each
paired prompt, A wins if its score is higher, loses if lower, and a tie counts 1/2. The win
rate is (wins + ties / 2) / n; its 95% interval is the 2.5th and 97.5th percentiles of the win
rate over ``resamples`` bootstrap resamples of the prompts (fixed seed: reproducible).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from sdpo.eval.manifest import keyed_by_prompt, load_entries
from sdpo.train.config import check_output_dir


def _checked_scores(entry: dict, side: str) -> dict:
    """An entry's ``scores``: absent / null is no score; anything but an object mapping metric
    names to finite numbers (or null) is an error naming the prompt and the metric."""
    scores = entry.get("scores")
    if scores is None:
        return {}
    if not isinstance(scores, dict):
        raise ValueError(
            f'compare: {side}: prompt {entry["prompt"]!r}: "scores" must be an object of '
            f"metric: number, got {type(scores).__name__}"
        )
    for metric, value in scores.items():
        if value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            finite = number and math.isfinite(float(value))
        except OverflowError:  # an integer beyond a float's range (about 1.8e308)
            finite = False
        if not finite:
            raise ValueError(
                f"compare: {side}: prompt {entry['prompt']!r}, metric {metric}: score {value!r} "
                "is not a finite number; rescore that manifest"
            )
    return scores


def _paired_scores(
    a: list[dict], b: list[dict], names: tuple[str, str] = ("A", "B")
) -> tuple[dict, dict, dict]:
    """Score pairs per metric, the prompts in only one manifest, and per metric how many paired
    prompts were left out because A or B has no score for it (absent or null): a metric scored
    in only one manifest is reported, never silently dropped."""
    keyed_a, keyed_b = keyed_by_prompt(a), keyed_by_prompt(b)
    common = [key for key in keyed_a if key in keyed_b]
    mismatch = {
        "only_in_a": [
            prompt for prompt, occurrence in keyed_a if (prompt, occurrence) not in keyed_b
        ],
        "only_in_b": [
            prompt for prompt, occurrence in keyed_b if (prompt, occurrence) not in keyed_a
        ],
    }
    metrics: dict[str, list[tuple[float, float]]] = {}
    unscored: dict[str, dict[str, int]] = {}
    for key in common:
        scores_a = _checked_scores(keyed_a[key], names[0])
        scores_b = _checked_scores(keyed_b[key], names[1])
        for metric in sorted(scores_a.keys() | scores_b.keys()):
            value_a, value_b = scores_a.get(metric), scores_b.get(metric)
            if value_a is None or value_b is None:
                missing = unscored.setdefault(metric, {"missing_in_a": 0, "missing_in_b": 0})
                missing["missing_in_a"] += value_a is None
                missing["missing_in_b"] += value_b is None
                continue
            metrics.setdefault(metric, []).append((float(value_a), float(value_b)))
    return metrics, mismatch, dict(sorted(unscored.items()))


def win_rate(pairs: list[tuple[float, float]], resamples: int = 10000, seed: int = 0) -> dict:
    """{"win_rate_a", "wins", "losses", "ties", "n", "ci95": [lo, hi], "mean_a", "mean_b"}."""
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"--resamples: expected an integer >= 1, got {resamples!r}")
    scores = torch.tensor(pairs, dtype=torch.float64)
    outcome = (scores[:, 0] > scores[:, 1]).double() + 0.5 * (scores[:, 0] == scores[:, 1]).double()
    n = len(pairs)
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, n, (resamples, n), generator=generator)
    rates = outcome[indices].mean(dim=1)
    low, high = torch.quantile(rates, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {
        "win_rate_a": float(outcome.mean()),
        "wins": int((scores[:, 0] > scores[:, 1]).sum()),
        "losses": int((scores[:, 0] < scores[:, 1]).sum()),
        "ties": int((scores[:, 0] == scores[:, 1]).sum()),
        "n": n,
        "ci95": [low, high],
        "mean_a": float(scores[:, 0].mean()),
        "mean_b": float(scores[:, 1].mean()),
    }


def compare(path_a: str | Path, path_b: str | Path, resamples: int = 10000, seed: int = 0) -> dict:
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"--resamples: expected an integer >= 1, got {resamples!r}")
    metrics, mismatch, unscored = _paired_scores(
        load_entries(path_a), load_entries(path_b), (str(path_a), str(path_b))
    )
    if not metrics:
        raise ValueError(
            f"compare: {path_a} and {path_b} share no scored prompt; run `sdpo-eval score` on "
            "both with the same --metrics"
        )
    conventions = {"a": _conventions(path_a), "b": _conventions(path_b)}
    if None not in conventions.values() and conventions["a"] != conventions["b"]:
        raise ValueError(
            f"compare: {path_a} was scored with --conventions {conventions['a']}, {path_b} with "
            f"{conventions['b']}; rescore one so both use the same"
        )
    return {
        "a": str(path_a),
        "b": str(path_b),
        # score's conventions per side (None: no <manifest>.scores.json beside the manifest).
        "conventions": conventions,
        "metrics": {
            metric: win_rate(pairs, resamples, seed) for metric, pairs in sorted(metrics.items())
        },
        "unpaired": {key: len(value) for key, value in mismatch.items()},
        "unpaired_prompts": mismatch,
        # metric -> paired prompts left out of it because A or B has no score for it.
        "unscored": unscored,
    }


def _conventions(path: str | Path) -> str | None:
    """The --conventions that ``sdpo-eval score`` recorded beside the manifest, if any."""
    summary = Path(str(path) + ".scores.json")
    if not summary.is_file():
        return None
    try:
        return json.loads(summary.read_text()).get("conventions", "default")
    except (ValueError, AttributeError) as error:
        raise ValueError(f"compare: {summary} is not a score summary ({error})") from error


def markdown(result: dict) -> str:
    conventions = result.get("conventions", {})
    named = conventions.get("a") or conventions.get("b") or "unknown"
    lines = [
        f"A = {result['a']}, B = {result['b']}",
        f"Scored with --conventions {named}.",
        "",
        "| metric | win rate A | 95% CI | wins | losses | ties | n | mean A | mean B |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for metric, row in result["metrics"].items():
        lines.append(
            f"| {metric} | {row['win_rate_a']:.3f} | [{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}] "
            f"| {row['wins']} | {row['losses']} | {row['ties']} | {row['n']} | "
            f"{row['mean_a']:.4f} | {row['mean_b']:.4f} |"
        )
    notes = []
    unpaired = result["unpaired"]
    if unpaired["only_in_a"] or unpaired["only_in_b"]:
        notes.append(
            f"Not compared: {unpaired['only_in_a']} prompt(s) only in A, "
            f"{unpaired['only_in_b']} only in B (listed in the JSON)."
        )
    for metric, missing in result.get("unscored", {}).items():
        compared = result["metrics"].get(metric, {}).get("n", 0)
        notes.append(
            f"Metric {metric}: {missing['missing_in_a']} paired prompt(s) without a score in A, "
            f"{missing['missing_in_b']} in B, left out ({compared} compared); score both "
            "manifests with the same --metrics."
        )
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def side_names(a: str | Path, b: str | Path) -> tuple[str, str]:
    """Short names for the two manifests on a plot: their file names without the suffix, or,
    when those are the same (two ``manifest.json``), the folders that hold them; else the
    paths as given."""
    first, second = Path(a), Path(b)
    for names in ((first.stem, second.stem), (first.parent.name, second.parent.name)):
        if names[0] and names[1] and names[0] != names[1]:
            return names
    return str(a), str(b)


def plot(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["metrics"])
    rates = [result["metrics"][name]["win_rate_a"] for name in names]
    errors = [
        [
            rate - result["metrics"][name]["ci95"][0]
            for name, rate in zip(names, rates, strict=True)
        ],
        [
            result["metrics"][name]["ci95"][1] - rate
            for name, rate in zip(names, rates, strict=True)
        ],
    ]
    figure, axis = plt.subplots(figsize=(1.2 * len(names) + 2, 3.5))
    axis.bar(names, rates, yerr=errors, capsize=4, color="#4C72B0")
    axis.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    name_a, name_b = side_names(result["a"], result["b"])
    axis.set(
        ylim=(0, 1),
        ylabel=f"win rate of {name_a} (95% CI)",
        title=f"{name_a} vs {name_b}, paired by prompt",
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def check_output(output: str | Path, flag: str = "--output") -> None:
    """An output path must name a file (not an existing folder) in a folder that exists and is
    writable, or can be created."""
    if Path(output).is_dir():
        raise ValueError(f"{flag} {output}: is a folder; give a file path such as {output}/x.json")
    check_output_dir(str(Path(output).expanduser().parent), flag)


def write(result: dict, output: str | Path) -> None:
    check_output(output)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(result, indent=2) + "\n")
