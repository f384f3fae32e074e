"""``sdpo-pairs``: the pairing rules on hand-scored fixtures, seeds, rewards and their errors,
and the trainer reading what it writes (tiny models, CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import save_clip_folder, save_tiny_pipeline

from sdpo.pairs import cli
from sdpo.pairs.make import image_seed, make_pairs
from sdpo.pairs.rewards import Reward, RewardError, build_reward, callable_term, parse_terms
from sdpo.pairs.rules import PairRule, parse_rule, select_pairs
from sdpo.train.config import config_from_args
from sdpo.train.data import load_records
from sdpo.train.trainer import train

# Hand-scored fixtures: per prompt, the fixed scores of its K = 4 images (sample order).
FIXTURE = {
    "red circle": [0.1, 0.9, 0.5, 0.9],  # best 1 (first of the two 0.9s), worst 0
    "blue square": [0.3, 0.3, 0.3, 0.3],  # all tied: no pair
    "green square": [0.2, 0.25, 0.1, 0.22],  # every gap <= 0.15
}


class SeedImages:
    """A stand-in sampler: a 16x16 image whose pixels come from the seed (bitwise per seed)."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[int]]] = []

    def images(self, prompts, seeds):
        self.calls.append((list(prompts), list(seeds)))
        return [
            Image.fromarray(
                torch.randint(
                    0,
                    256,
                    (16, 16, 3),
                    generator=torch.Generator().manual_seed(seed),
                    dtype=torch.uint8,
                ).numpy()
            )
            for seed in seeds
        ]


def fixture_reward_file(folder: Path, fixture: dict = FIXTURE) -> Path:
    """A user's reward module: scores from the fixture, in call order per prompt."""
    module = folder / "fixture_reward.py"
    module.write_text(
        "import json\n"
        f"FIXTURE = json.loads({json.dumps(json.dumps(fixture))})\n"
        "SEEN = {}\n"
        "def score(images, prompts):\n"
        "    values = []\n"
        "    for prompt in prompts:\n"
        "        index = SEEN.get(prompt, 0)\n"
        "        SEEN[prompt] = index + 1\n"
        "        values.append(FIXTURE[prompt][index])\n"
        "    return values\n"
        "def nan(images, prompts):\n"
        "    return [float('nan')] * len(images)\n"
        "def inf(images, prompts):\n"
        "    return [1.0] * (len(images) - 1) + [float('inf')]\n"
        "def short(images, prompts):\n"
        "    return [1.0] * (len(images) - 1)\n"
        "def boom(images, prompts):\n"
        "    raise RuntimeError('weights exploded\\nsecond line')\n"
        "def text(images, prompts):\n"
        "    return 'high'\n"
        "def flags(images, prompts):\n"
        "    return [True] * len(images)\n"
        "def as_tensor(images, prompts):\n"
        "    import torch\n"
        "    return torch.arange(len(images), dtype=torch.float32)\n"
        "def as_numpy_list(images, prompts):\n"
        "    import numpy\n"
        "    return [numpy.float32(index) for index in range(len(images))]\n"
        "def brightness(images, prompts):\n"
        "    return [sum(image.convert('L').tobytes()) / 256.0 for image in images]\n"
        "def darkness(images, prompts):\n"
        "    return [-sum(image.convert('L').tobytes()) / 1000.0 for image in images]\n"
    )
    return module


def test_rules_on_hand_scored_fixtures():
    best_worst, gap = parse_rule("best-worst"), parse_rule("gap:0.3")
    assert gap == PairRule("gap", 0.3)
    assert select_pairs(FIXTURE["red circle"], best_worst) == [(1, 0)]
    # |0.1-0.9|, |0.1-0.5|, |0.1-0.9|, |0.9-0.5|, |0.5-0.9| exceed 0.3; 0.9 vs 0.9 does not.
    assert select_pairs(FIXTURE["red circle"], gap) == [(1, 0), (2, 0), (3, 0), (1, 2), (3, 2)]
    for rule in (best_worst, gap, parse_rule("gap:0")):
        assert select_pairs(FIXTURE["blue square"], rule) == []
    assert select_pairs(FIXTURE["green square"], best_worst) == [(1, 2)]
    assert select_pairs(FIXTURE["green square"], parse_rule("gap:0.15")) == []
    assert select_pairs([0.0, 0.5], parse_rule("gap:0.5")) == []  # the gap must be exceeded
    assert select_pairs([0.0, 0.5], parse_rule("gap:0.49")) == [(1, 0)]
    assert select_pairs([0.7, 0.2, 0.2], best_worst) == [(0, 1)]  # first of the tied worst


@pytest.mark.parametrize(
    "text, message",
    [
        ("gap:-1", "finite number >= 0"),
        ("gap:nan", "finite number >= 0"),
        ("gap:inf", "finite number >= 0"),
        ("gap:", "finite number >= 0"),
        ("best", "expected best-worst or gap:T"),
    ],
)
def test_rule_flag_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_rule(text)


def test_make_pairs_writes_fixture_pairs_counts_ties_and_the_trainer_reads_them(tmp_path):
    module = fixture_reward_file(tmp_path)
    reward = Reward([callable_term(f"{module}:score")])
    sampler, logs = SeedImages(), []
    result = make_pairs(
        sampler, list(FIXTURE), reward, tmp_path / "out", samples_per_prompt=4,
        rule=parse_rule("best-worst"), seed=7, batch_size=3, log=logs.append,
    )  # fmt: skip
    assert result.tied_prompts == [1] and result.unpaired_prompts == []
    assert any("1 prompt(s) gave no pair: all their images scored the same" in m for m in logs)
    rows = [json.loads(line) for line in result.path.read_text().splitlines()]
    assert [(row["caption"], row["winner_sample"], row["loser_sample"]) for row in rows] == [
        ("red circle", 1, 0),
        ("green square", 1, 2),
    ]
    assert rows[0]["winner_score"] == 0.9 and rows[0]["loser_score"] == 0.1
    assert rows[0]["winner_seed"] == image_seed(7, 0, 1)
    assert rows[1]["loser_seed"] == image_seed(7, 2, 2)
    assert rows[0]["winner"] == "images/p00000_s01.png"
    meta = json.loads((tmp_path / "out" / "pairs.jsonl.meta.json").read_text())
    assert meta["pairs"] == 2 and meta["tied_prompts"] == [1] and meta["images"] == 12
    # The images the sampler drew from each recorded seed are the files named in the rows.
    saved = Image.open(tmp_path / "out" / rows[0]["winner"])
    redrawn = SeedImages().images(["red circle"], [rows[0]["winner_seed"]])[0]
    assert saved.tobytes() == redrawn.tobytes()
    # The trainer's own reader takes the rows, winner first, paths relative to the file.
    records = load_records(str(result.path), resolution=16, synthetic_pairs=0, seed=0)
    assert [record.caption for record in records] == ["red circle", "green square"]
    assert records[0].winner == tmp_path / "out" / "images" / "p00000_s01.png"

    fresh = Reward([callable_term(f"{module}:score")])  # a new import: its call counts anew
    gap = make_pairs(
        SeedImages(), list(FIXTURE), fresh, tmp_path / "gap", samples_per_prompt=4,
        rule=parse_rule("gap:0.3"), seed=7,
    )  # fmt: skip
    assert len(gap.pairs) == 5 and gap.tied_prompts == [1] and gap.unpaired_prompts == [2]

    # --overwrite replaces the dataset and its images: none of a larger K's are left.
    again = make_pairs(
        SeedImages(), ["red circle"], Reward([callable_term(f"{module}:score")]),
        tmp_path / "out", samples_per_prompt=2, rule=parse_rule("best-worst"), overwrite=True,
    )  # fmt: skip
    assert len(again.pairs) == 1
    assert sorted(path.name for path in (tmp_path / "out" / "images").iterdir()) == [
        "p00000_s00.png",
        "p00000_s01.png",
    ]
    with pytest.raises(ValueError, match=r"already holds pairs\.jsonl; pass --overwrite"):
        make_pairs(
            SeedImages(), ["red circle"], reward, tmp_path / "out", samples_per_prompt=2,
            rule=parse_rule("best-worst"),
        )  # fmt: skip


def test_image_seeds_depend_on_seed_prompt_and_sample_only():
    seeds = {image_seed(seed, p, k) for seed in range(3) for p in range(20) for k in range(8)}
    assert len(seeds) == 3 * 20 * 8  # no two images share noise, across runs of nearby seeds
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert image_seed(0, 1, 0) != image_seed(1, 0, 0) != image_seed(0, 0, 1)


def test_weighted_sum_of_terms(tmp_path):
    module = fixture_reward_file(tmp_path)
    reward = build_reward(f"{module}:brightness=2,{module}:darkness=-0.5")
    images = SeedImages().images(["a", "b", "c"], [1, 2, 3])
    totals, parts = reward.scores(images, ["a", "b", "c"])
    for image, total, part in zip(images, totals, parts, strict=True):
        light = sum(image.convert("L").tobytes())
        assert part == {
            f"{module}:brightness": light / 256.0,
            f"{module}:darkness": -light / 1000.0,
        }
        assert total == pytest.approx(2 * light / 256.0 + 0.5 * light / 1000.0, rel=1e-12)
    assert parse_terms("pickscore=1,clip=0.5") == [("pickscore", 1.0), ("clip", 0.5)]


def test_tensor_and_numpy_scores_are_accepted(tmp_path):
    module = fixture_reward_file(tmp_path)
    images = SeedImages().images(["a", "b", "c"], [1, 2, 3])
    for function in ("as_tensor", "as_numpy_list"):
        totals, _ = Reward([callable_term(f"{module}:{function}")]).scores(images, ["a"] * 3)
        assert totals == [0.0, 1.0, 2.0] and all(type(total) is float for total in totals)


def test_missing_scorer_weights_are_a_usage_error(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("red circle\n")
    code, _, err = run_cli(
        ["--model", "toy", "--pretrained", "demo", "--prompts", tmp_path / "prompts.txt",
         "--reward", "clip", "--clip", tmp_path / "no-clip", "--output-dir", tmp_path / "out"],
        capsys,
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1
    assert f"clip: {tmp_path / 'no-clip'} does not exist (flag --clip)" in err


def test_builtin_scorer_term_matches_sdpo_eval_scores(tmp_path):
    from sdpo.eval.scorers import WeightSources, build_scorer

    save_clip_folder(tmp_path / "clip")
    sources = WeightSources({"clip": str(tmp_path / "clip")})
    reward = build_reward("clip=0.5", weight_sources=sources, device=torch.device("cpu"))
    images = SeedImages().images(["red", "blue"], [1, 2])
    totals, parts = reward.scores(images, ["red", "blue"])
    direct = build_scorer("clip", sources, torch.device("cpu")).score(images, ["red", "blue"])
    assert [part["clip"] for part in parts] == pytest.approx(direct, abs=1e-6)
    assert totals == pytest.approx([0.5 * value for value in direct], abs=1e-6)


@pytest.mark.parametrize(
    "function, message",
    [
        ("nan", r"returned nan for prompt 'red circle'; expected a finite number"),
        ("inf", r"returned inf for prompt .*; expected a finite number"),
        ("short", r"returned 2 scores for 3 images"),
        ("boom", r"raised RuntimeError: weights exploded \(on 3 images"),
        ("text", r"returned str; expected a list of 3 floats"),
        ("flags", r"returned True for prompt"),
    ],
)
def test_a_failing_reward_writes_no_dataset(tmp_path, function, message):
    module = fixture_reward_file(tmp_path)
    reward = Reward([callable_term(f"{module}:{function}")])
    with pytest.raises(RewardError, match=f"^reward {module}:{function} {message}") as error:
        make_pairs(
            SeedImages(), ["red circle"], reward, tmp_path / "out", samples_per_prompt=3,
            rule=parse_rule("best-worst"), batch_size=3,
        )  # fmt: skip
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out" / "pairs.jsonl").exists()
    assert list((tmp_path / "out" / "images").iterdir()) == []  # the batch was not saved


def test_overflowing_weighted_sum_is_a_reward_error(tmp_path):
    module = fixture_reward_file(tmp_path)
    reward = build_reward(f"{module}:brightness=1e308")
    with pytest.raises(RewardError, match="weighted sum is inf"):
        reward.scores(SeedImages().images(["a"], [5]), ["a"])


def run_cli(argv, capsys):
    code = cli.main([str(value) for value in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["-k", "1"], "--samples-per-prompt: expected >= 2, got 1"),
        (["--pairs", "gap:-0.1"], "the gap must be a finite number >= 0"),
        (["--pairs", "gap:nan"], "the gap must be a finite number >= 0"),
        (["--reward", "toy=nan"], "the weight must be a finite non-zero number"),
        (["--reward", "toy=inf"], "the weight must be a finite non-zero number"),
        (["--reward", "toy=0"], "the weight must be a finite non-zero number"),
        (["--reward", "toy,toy=2"], "toy appears twice"),
        (["--reward", "bogus"], "expected one of pickscore"),
        (["--reward", "no_such_module_xyz:f"], "cannot import no_such_module_xyz"),
        (["--reward", "json:no_such_function"], "json has no callable 'no_such_function'"),
        (["--reward", "toy"], "--reward toy: prompt 0 is not a toy caption"),
        (["--batch-size", "0"], "--batch-size: expected >= 1, got 0"),
        (["--prompts", "missing.txt"], "--prompts: no such file"),
        (["--guidance", "nan"], "--guidance: expected a finite number"),
        (["--pretrained", "no/such/folder"], "--pretrained: no such folder"),
        (["--unet", "no/unet.pth"], "--unet: no such file or folder no/unet.pth"),
        (["--model", "toy", "--pretrained", "nowhere"], "--pretrained nowhere: no such folder"),
        (["--model", "toy", "--pretrained", "demo", "--vae", "."], "--vae: not for --model toy"),
        (["--model", "sd3", "--unet", "."], "--unet: not for --model sd3"),
    ],
)
def test_flag_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("red circle\n")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "model_index.json").write_text("{}")
    base = ["--pretrained", tmp_path / "p", "--prompts", "prompts.txt", "--output-dir", "out",
            "--reward", "json:loads"]  # fmt: skip
    argv = base + extra  # argparse keeps the last value of a repeated flag
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err
    assert err.startswith("sdpo-pairs: error: ") and err.count("\n") == 1
    assert message in err


def test_existing_pairs_need_overwrite(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "pairs.jsonl").write_text("")
    (tmp_path / "prompts.txt").write_text("red circle\n")
    code, _, err = run_cli(
        ["--pretrained", "demo", "--model", "toy", "--prompts", tmp_path / "prompts.txt",
         "--output-dir", tmp_path / "out", "--reward", "json:loads"], capsys,
    )  # fmt: skip
    assert code == 2 and "already holds pairs.jsonl; pass --overwrite" in err


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("pipeline"))


def test_cli_on_a_tiny_pipeline_is_reproducible_and_trains(tmp_path, capsys, tiny_pipeline):
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps([{"prompt": prompt, "metadata": {}} for prompt in FIXTURE]))
    common = ["--pretrained", tiny_pipeline, "--prompts", suite, "-k", 4, "--batch-size", 4,
              "--steps", 2, "--dtype", "fp32", "--seed", 3, "--device", "cpu"]  # fmt: skip
    outputs = []
    module = fixture_reward_file(tmp_path)  # loaded afresh by each run (its call counts anew)
    for name in ("a", "b"):
        code, out, err = run_cli(
            [*common, "--output-dir", tmp_path / f"out-{name}", "--reward", f"{module}:score"],
            capsys,
        )
        assert code == 0, err
        assert "pairs: 2 from 3 prompts x 4 images (1 prompts tied" in out
        assert "all their images scored the same" in err
        outputs.append(tmp_path / f"out-{name}")
    # The same seeds give the same images, bit for bit, and the same rows.
    files = sorted(path.name for path in (outputs[0] / "images").iterdir())
    assert len(files) == 12
    for name in files:
        first = Image.open(outputs[0] / "images" / name).tobytes()
        assert first == Image.open(outputs[1] / "images" / name).tobytes()
    assert (outputs[0] / "pairs.jsonl").read_text() == (outputs[1] / "pairs.jsonl").read_text()
    distinct = {Image.open(outputs[0] / "images" / name).tobytes() for name in files}
    assert len(distinct) == 12  # one seed per image: no two samples alike
    meta = json.loads((outputs[0] / "pairs.jsonl.meta.json").read_text())
    assert meta["model"]["pretrained"] == str(tiny_pipeline) and meta["tied_prompts"] == [1]

    # Each recorded seed is its image's: drawn alone from it, the winner comes out bit for bit.
    from sdpo.eval.generate import GenerateSettings, load_pipeline

    loaded = load_pipeline(
        GenerateSettings(str(tiny_pipeline), "", "", steps=2, dtype="fp32"), torch.device("cpu")
    )
    row = json.loads((outputs[0] / "pairs.jsonl").read_text().splitlines()[0])
    alone = loaded.images([row["caption"]], [row["winner_seed"]])[0]
    assert alone.tobytes() == Image.open(outputs[0] / row["winner"]).convert("RGB").tobytes()

    # The trainer trains on the written file, unchanged.
    config = config_from_args(
        ["--preset", "tiny", "--data", str(outputs[0] / "pairs.jsonl"), "--max-steps", "2",
         "--output-dir", str(tmp_path / "run"), "--no-progress"]
    )  # fmt: skip
    train(config)
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows and all(math.isfinite(row["loss"]) for row in rows)


def test_a_failing_reward_on_the_cli_exits_1_with_one_line(tmp_path, capsys, tiny_pipeline):
    module = fixture_reward_file(tmp_path)
    (tmp_path / "prompts.txt").write_text("red circle\n")
    code, _, err = run_cli(
        ["--pretrained", tiny_pipeline, "--prompts", tmp_path / "prompts.txt", "-k", 2,
         "--steps", 1, "--dtype", "fp32", "--output-dir", tmp_path / "out",
         "--reward", f"{module}:nan"], capsys,
    )  # fmt: skip
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("sdpo-pairs:")]
    assert lines == [
        f"sdpo-pairs: error: reward {module}:nan returned nan for prompt 'red circle'; expected "
        "a finite number; no pairs.jsonl written"
    ]
    assert not (tmp_path / "out" / "pairs.jsonl").exists()


def test_toy_model_and_reward_end_to_end(tmp_path, capsys):
    from sdpo.demo import base
    from sdpo.pairs.samplers import load_toy_sampler

    captions = ["a red circle on a white background", "a blue square on a black background"]
    (tmp_path / "prompts.txt").write_text("\n".join(captions) + "\n")
    code, _, err = run_cli(
        ["--model", "toy", "--pretrained", "demo", "--prompts", tmp_path / "prompts.txt",
         "-k", 3, "--steps", 3, "--reward", "toy", "--pairs", "gap:0", "--device", "cpu",
         "--output-dir", tmp_path / "out"], capsys,
    )  # fmt: skip
    assert code == 0, err
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()
    ]
    assert rows and all(row["winner_score"] > row["loser_score"] for row in rows)
    # Each image is the demo sampler's image for its recorded seed.
    sampler = load_toy_sampler("demo", steps=3)
    row = rows[0]
    alone = base.sample(
        sampler.models, sampler.unet, [row["caption"]], seed=row["winner_seed"], steps=3
    )
    pixels = ((alone[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    saved = Image.open(tmp_path / "out" / row["winner"]).convert("RGB").tobytes()
    assert torch.equal(
        torch.frombuffer(bytearray(saved), dtype=torch.uint8).view(16, 16, 3), pixels
    )
    # The trainer trains the toy base on them.
    config = config_from_args(
        ["--model", "tiny", "--pretrained", str(base.PACKAGED_BASE), "--data",
         str(tmp_path / "out" / "pairs.jsonl"), "--max-steps", "2", "--train-batch-pairs", "1",
         "--gradient-accumulation", "1", "--output-dir", str(tmp_path / "run"), "--no-progress"]
    )  # fmt: skip
    train(config)
    # The run's export samples the next round: --unet puts its weights into the toy model.
    state = torch.load(tmp_path / "run" / "unet.pth", weights_only=True)
    trained = load_toy_sampler("demo", str(tmp_path / "run" / "unet.pth"), steps=3)
    for name, value in trained.unet.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert any(
        not torch.equal(value, sampler.unet.state_dict()[name]) for name, value in state.items()
    )
    with pytest.raises(FileNotFoundError, match="unet: no such file or folder"):
        load_toy_sampler("demo", str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("model", ["sd3", "toy-flow"])
def test_flow_models_make_pairs(tmp_path, capsys, model):
    """The flow families: a tiny SD3 pipeline as sdpo-eval generate loads it, and the demo's
    flow-matching toy base."""
    captions = ["a red circle on a white background", "a blue square on a black background"]
    (tmp_path / "prompts.txt").write_text("\n".join(captions) + "\n")
    if model == "sd3":
        from sdpo.train import families

        base = tmp_path / "sd3"
        families.SD3Family.build_tiny(16, 0).pipeline.save_pretrained(base)
        flags = ["--model", "sd3", "--pretrained", base, "--resolution", 16, "--dtype", "fp32"]
    else:
        flags = ["--model", "toy", "--pretrained", "demo-flow"]
    module = fixture_reward_file(tmp_path)
    code, _, err = run_cli(
        [*flags, "--prompts", tmp_path / "prompts.txt", "-k", 3, "--steps", 2, "--device", "cpu",
         "--reward", f"{module}:brightness", "--pairs", "gap:0", "--output-dir", tmp_path / "out"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()
    ]
    assert rows and all(row["winner_score"] > row["loser_score"] for row in rows)
    for row in rows:  # the scores recorded are the reward of the saved images
        for side in ("winner", "loser"):
            image = Image.open(tmp_path / "out" / row[side])
            assert row[f"{side}_score"] == sum(image.convert("L").tobytes()) / 256.0
