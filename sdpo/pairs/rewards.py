"""The reward that ranks a prompt's images: built-in scorers, a user's callable, the toy's.

``--reward`` is a comma-separated weighted sum of terms ``NAME`` (weight 1) or ``NAME=W``:

- a built-in ``sdpo-eval score`` metric (pickscore, hpsv2, imagereward, aesthetics, clip), its
  weights from local files exactly as ``sdpo-eval score`` finds them (sdpo/eval/scorers.py);
- ``toy``: the toy world's pixel reward (sdpo/train/toy.py; prompts must be toy captions);
- ``module:function`` or ``path/to/file.py:function``: a Python callable
  ``function(images: list[PIL.Image], prompts: list[str]) -> list[float]``.

Every term's scores are checked at each call: a term that raises, returns a count other than the
number of images, or a value that is not a finite number is a :class:`RewardError` naming it.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sdpo.eval.scorers import METRICS


class RewardError(RuntimeError):
    """A reward term failed on a batch (raised, wrong count, non-finite value)."""


ScoreFunction = Callable[[list, list[str]], Sequence[float]]


@dataclass
class RewardTerm:
    name: str  # as given in --reward: "pickscore", "toy", "module:function"
    weight: float
    function: ScoreFunction
    check_prompts: Callable[[list[str]], None] | None = None
    sources: dict[str, str] = field(default_factory=dict)  # weight files (built-in scorers)


@dataclass
class Reward:
    """A weighted sum of terms. ``scores(images, prompts)`` returns per image the total and
    each term's raw score, all checked finite."""

    terms: list[RewardTerm]

    @property
    def spec(self) -> str:
        return ",".join(f"{term.name}={term.weight:g}" for term in self.terms)

    def check_prompts(self, prompts: list[str]) -> None:
        for term in self.terms:
            if term.check_prompts is not None:
                term.check_prompts(prompts)

    def scores(self, images: list, prompts: list[str]) -> tuple[list[float], list[dict]]:
        parts = {term.name: checked_scores(term, images, prompts) for term in self.terms}
        totals = [
            math.fsum(term.weight * parts[term.name][index] for term in self.terms)
            for index in range(len(images))
        ]
        for index, total in enumerate(totals):
            if not math.isfinite(total):  # finite terms can still overflow when weighted
                raise RewardError(
                    f"reward {self.spec}: the weighted sum is {total} for prompt "
                    f"{prompts[index]!r}; use smaller weights"
                )
        per_image = [{name: values[index] for name, values in parts.items()}
                     for index in range(len(images))]  # fmt: skip
        return totals, per_image


def checked_scores(term: RewardTerm, images: list, prompts: list[str]) -> list[float]:
    """``term``'s scores of a batch as Python floats, or a one-line RewardError naming it."""
    what = f"reward {term.name}"
    try:
        values = term.function(images, prompts)
    except Exception as error:  # a user's callable may raise anything: name it, stop the run
        first = (str(error).strip().splitlines() or [""])[0]
        raise RewardError(
            f"{what} raised {type(error).__name__}: {first} (on {len(images)} images, first "
            f"prompt {prompts[0]!r})"
        ) from error
    if hasattr(values, "tolist"):  # a tensor or an array
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise RewardError(
            f"{what} returned {type(values).__name__}; expected a list of {len(images)} floats"
        )
    if len(values) != len(images):
        raise RewardError(
            f"{what} returned {len(values)} scores for {len(images)} images; expected one per image"
        )
    result = []
    for value, prompt in zip(values, prompts, strict=True):
        if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
            value = value.item()  # a 0-d tensor or array in a list
        # numbers.Real: Python and NumPy ints and floats; a bool is a mistake, not a score.
        number = (
            float(value)
            if isinstance(value, numbers.Real) and not isinstance(value, bool)
            else math.nan
        )
        if not math.isfinite(number):
            raise RewardError(
                f"{what} returned {value!r} for prompt {prompt!r}; expected a finite number"
            )
        result.append(number)
    return result


def parse_terms(text: str) -> list[tuple[str, float]]:
    """``--reward`` as (name, weight) pairs; a ValueError for an empty term, a weight that is
    not a finite non-zero number, or a repeated name."""
    terms: list[tuple[str, float]] = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            raise ValueError(
                f"--reward {text!r}: an empty term; expected e.g. pickscore=1,clip=0.5"
            )
        name, _, weight_text = part.partition("=")
        name = name.strip()
        weight = 1.0
        if weight_text:
            try:
                weight = float(weight_text)
            except ValueError:
                weight = math.nan
            if not math.isfinite(weight) or weight == 0:
                raise ValueError(
                    f"--reward {part}: the weight must be a finite non-zero number, got "
                    f"{weight_text!r}"
                )
        if not name:
            raise ValueError(f"--reward {part!r}: no reward name before '='")
        if name in (existing for existing, _ in terms):
            raise ValueError(f"--reward: {name} appears twice; give it once with its weight")
        terms.append((name, weight))
    return terms


def toy_term(weight: float = 1.0) -> RewardTerm:
    """The toy world's pixel reward on PIL images of toy captions."""

    def check(prompts: list[str]) -> None:
        from sdpo.train.toy import ToySpec

        for index, prompt in enumerate(prompts):
            try:
                ToySpec.from_caption(prompt)
            except ValueError as error:
                raise ValueError(
                    f"--reward toy: prompt {index} is not a toy caption ({error})"
                ) from None

    def score(images: list, prompts: list[str]) -> list[float]:
        import torch

        from sdpo.train import toy

        sizes = {image.size for image in images}
        if len(sizes) != 1:
            raise ValueError(f"images of different sizes {sorted(sizes)}")
        pixels = torch.stack(
            [
                torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
                .view(image.height, image.width, 3)
                .permute(2, 0, 1)
                for image in images
            ]
        )
        return toy.reward(pixels.float() / 127.5 - 1.0, prompts).tolist()

    return RewardTerm("toy", weight, score, check)


def callable_term(name: str, weight: float = 1.0) -> RewardTerm:
    """``module:function`` (importable) or ``file.py:function``, checked to be callable."""
    module_name, _, function_name = name.rpartition(":")
    if not module_name or not function_name:
        raise ValueError(f"--reward {name}: expected module:function")
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--reward {name}: no such file {path}")
        spec = importlib.util.spec_from_file_location(f"sdpo_pairs_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        loader = spec.loader.exec_module
    else:
        loader = None
    try:
        if loader is not None:
            loader(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as error:  # an import error of the user's module, whatever its kind
        first = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(
            f"--reward {name}: cannot import {module_name} ({type(error).__name__}: {first})"
        ) from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"--reward {name}: {module_name} has no callable {function_name!r}")
    return RewardTerm(name, weight, function)


def builtin_term(metric: str, weight: float, scorer) -> RewardTerm:
    return RewardTerm(metric, weight, scorer.score, sources=dict(getattr(scorer, "sources", {})))


def build_reward(
    text: str,
    *,
    weight_sources=None,
    device=None,
    conventions: str = "default",
) -> Reward:
    """The reward of ``--reward text``, every term loaded once. ``weight_sources``: a
    ``sdpo.eval.scorers.WeightSources`` for the built-in metrics (none given: flags and
    ``--weights-root`` empty, so only the local Hugging Face cache is searched)."""
    parsed = parse_terms(text)
    for name, _ in parsed:  # every name checked before any model loads
        if name != "toy" and name not in METRICS and ":" not in name:
            raise ValueError(
                f"--reward {name!r}: expected one of {', '.join(METRICS)}, toy, or module:function"
            )
    terms: list[RewardTerm] = []
    loaded: dict = {}  # CLIP ViT-L/14 shared by clip and aesthetics, as in sdpo-eval score
    for name, weight in parsed:
        if name == "toy":
            terms.append(toy_term(weight))
        elif ":" in name:
            terms.append(callable_term(name, weight))
    for name, weight in parsed:
        if name in METRICS:
            import torch

            from sdpo.eval.scorers import MissingWeights, WeightSources, build_scorer

            sources = weight_sources or WeightSources({})
            device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
            try:
                scorer = build_scorer(name, sources, device, conventions, loaded)
            except MissingWeights as error:  # its advice names sdpo-eval's --on-missing
                raise MissingWeights(
                    str(error).replace(", or use --on-missing skip", "")
                ) from error
            terms.append(builtin_term(name, weight, scorer))
    order = [name for name, _ in parsed]
    return Reward(sorted(terms, key=lambda term: order.index(term.name)))
