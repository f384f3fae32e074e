"""Preference pairs from a model's own samples: K images per prompt, scored, paired by a rule.

``make_pairs`` is the in-process entry point (a training loop calls it round after round with
its current model); ``sdpo-pairs`` (cli.py) loads a model and a reward and calls it.

Output, in ``output_dir``: ``images/pPPPPP_sKK.png`` (prompt P, sample K), ``pairs.jsonl`` in
the trainer's JSONL format (``caption``, ``winner``, ``loser``: paths relative to the file, which
is how sdpo/train/data.py reads them) with each pair's rewards, seeds and sample indices, and
``pairs.jsonl.meta.json``: the settings and the counts (tied prompts listed). ``pairs.jsonl``
is written once, at the end, through a temporary file: a failed run leaves none.

Seeds: image (prompt p, sample k) of a run with ``seed`` s is drawn from
``image_seed(s, p, k)``, a 63-bit SplitMix64 mix of the three, recorded per image. So an image
depends on neither K nor the batching of prompts, and runs with different seeds (a loop's
rounds: seed + round) share no noise.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdpo.pairs.rewards import Reward
from sdpo.pairs.rules import PairRule, all_tied, select_pairs
from sdpo.pairs.samplers import ImageSampler

PAIRS_FILE = "pairs.jsonl"


def image_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one image: SplitMix64 steps over (seed, prompt, sample), top 63 bits. The
    trainer's data order mixes its seeds the same way (sdpo/train/data.py ``_mix``); this copy
    is separate so that a change there cannot change how written datasets' seeds are derived."""
    state = 0x9E3779B97F4A7C15
    for value in (seed, prompt_index, sample_index):
        state = (state ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return state >> 1


@dataclass
class Pair:
    caption: str
    winner: str  # image path relative to the pairs file
    loser: str
    winner_score: float
    loser_score: float
    winner_seed: int
    loser_seed: int
    prompt_index: int
    winner_sample: int
    loser_sample: int
    winner_scores: dict[str, float] = field(default_factory=dict)  # per reward term
    loser_scores: dict[str, float] = field(default_factory=dict)


@dataclass
class PairsResult:
    path: Path  # the pairs.jsonl written
    pairs: list[Pair]
    prompts: int
    images: int
    tied_prompts: list[int]  # every image of the prompt scored the same: no pair
    unpaired_prompts: list[int]  # not tied, but no two images differ by more than the gap
    scores: list[list[float]]  # per prompt, per sample


def check_output_dir(output_dir: str | Path, overwrite: bool) -> Path:
    """The output folder, refused if it already holds a pairs file (``overwrite``: replaced)."""
    output = Path(output_dir).expanduser()
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output-dir {output}: exists and is not a folder")
    if (output / PAIRS_FILE).exists() and not overwrite:
        raise ValueError(
            f"--output-dir {output}: already holds {PAIRS_FILE}; pass --overwrite to replace it "
            "or choose another folder"
        )
    return output


def make_pairs(
    sampler: ImageSampler,
    prompts: list[str],
    reward: Reward,
    output_dir: str | Path,
    *,
    samples_per_prompt: int,
    rule: PairRule,
    seed: int = 0,
    batch_size: int = 4,
    overwrite: bool = False,
    metadata: dict | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> PairsResult:
    """Draws ``samples_per_prompt`` images per prompt from ``sampler``, scores them with
    ``reward``, pairs them by ``rule`` and writes the dataset into ``output_dir``.

    ``batch_size``: images per sampler (and reward) call; a batch holds whole prompts when
    ``samples_per_prompt`` <= ``batch_size``. A reward failure (RewardError) stops the run
    before that batch's images are saved and before any ``pairs.jsonl`` is written."""
    if samples_per_prompt < 2:
        raise ValueError(
            f"--samples-per-prompt: expected >= 2 to make pairs, got {samples_per_prompt}"
        )
    if batch_size < 1:
        raise ValueError(f"--batch-size: expected >= 1, got {batch_size}")
    if not prompts:
        raise ValueError("prompts: none given")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts: prompt {index} is {type(prompt).__name__}, not a string")
    reward.check_prompts(prompts)
    output = check_output_dir(output_dir, overwrite)
    images_dir = output / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    final = output / PAIRS_FILE
    if final.exists():
        final.unlink()  # overwrite: the old pairs must not outlive a failed run
        for old in images_dir.glob("p*_s*.png"):  # nor its images (a larger K left more)
            old.unlink()

    jobs = [(p, k) for p in range(len(prompts)) for k in range(samples_per_prompt)]
    seeds = {job: image_seed(seed, *job) for job in jobs}
    totals: dict[tuple[int, int], float] = {}
    parts: dict[tuple[int, int], dict] = {}
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        batch_prompts = [prompts[p] for p, _ in batch]
        images = sampler.images(batch_prompts, [seeds[job] for job in batch])
        if len(images) != len(batch):
            raise ValueError(f"sampler: returned {len(images)} images for {len(batch)} prompts")
        batch_totals, batch_parts = reward.scores(images, batch_prompts)
        for job, image, total, part in zip(batch, images, batch_totals, batch_parts, strict=True):
            image.save(images_dir / image_name(*job))
            totals[job], parts[job] = total, part
        log(f"pairs: {min(start + batch_size, len(jobs))}/{len(jobs)} images scored")

    pairs: list[Pair] = []
    tied: list[int] = []
    unpaired: list[int] = []
    scores = [[totals[(p, k)] for k in range(samples_per_prompt)] for p in range(len(prompts))]
    for p, prompt_scores in enumerate(scores):
        chosen = select_pairs(prompt_scores, rule)
        if not chosen:
            (tied if all_tied(prompt_scores) else unpaired).append(p)
        for winner, loser in chosen:
            pairs.append(
                Pair(
                    caption=prompts[p],
                    winner=f"images/{image_name(p, winner)}",
                    loser=f"images/{image_name(p, loser)}",
                    winner_score=prompt_scores[winner],
                    loser_score=prompt_scores[loser],
                    winner_seed=seeds[(p, winner)],
                    loser_seed=seeds[(p, loser)],
                    prompt_index=p,
                    winner_sample=winner,
                    loser_sample=loser,
                    winner_scores=parts[(p, winner)],
                    loser_scores=parts[(p, loser)],
                )
            )
    temporary = final.with_suffix(".jsonl.tmp")
    with open(temporary, "w") as handle:
        for pair in pairs:
            handle.write(json.dumps(asdict(pair), ensure_ascii=False) + "\n")
    meta = {
        "rule": str(rule),
        "reward": reward.spec,
        "reward_weights": {term.name: term.sources for term in reward.terms if term.sources},
        "seed": seed,
        "samples_per_prompt": samples_per_prompt,
        "batch_size": batch_size,
        "prompts": len(prompts),
        "images": len(jobs),
        "pairs": len(pairs),
        "tied_prompts": tied,
        "unpaired_prompts": unpaired,
        "mean_reward": math.fsum(totals.values()) / len(totals),
        **(metadata or {}),
    }
    (output / (PAIRS_FILE + ".meta.json")).write_text(json.dumps(meta, indent=2) + "\n")
    temporary.replace(final)
    if tied:
        log(f"pairs: {len(tied)} prompt(s) gave no pair: all their images scored the same "
            f"(prompts {', '.join(map(str, tied[:10]))}{', ...' if len(tied) > 10 else ''})")  # fmt: skip
    if unpaired:
        log(f"pairs: {len(unpaired)} prompt(s) gave no pair: no two images differ by more than "
            f"the gap (prompts {', '.join(map(str, unpaired[:10]))}"
            f"{', ...' if len(unpaired) > 10 else ''})")  # fmt: skip
    return PairsResult(final, pairs, len(prompts), len(jobs), tied, unpaired, scores)


def image_name(prompt_index: int, sample_index: int) -> str:
    return f"p{prompt_index:05d}_s{sample_index:02d}.png"
