"""sdpo-demo end to end at a toy size: both runs through the real trainer, every output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sdpo.demo import base
from sdpo.demo.run import DemoSettings, main, moving_average, run_demo
from sdpo.train import toy


@pytest.fixture(scope="module")
def throwaway_base(tmp_path_factory):
    # A base trained for a handful of steps: the plumbing, not the quality, is under test here.
    folder = tmp_path_factory.mktemp("base")
    base.pretrain_base(folder, steps=3, batch_size=8, images=32, log_every=1)
    return folder


def tiny_settings(output_dir, base_dir, **overrides) -> DemoSettings:
    """Demo settings at a size that runs in seconds: the plumbing is under test, not the effect."""
    sizes = dict(steps=4, eval_every=2, batch_pairs=2, train_pairs=8, eval_pairs=4)
    return DemoSettings(
        output_dir=str(output_dir),
        base_dir=str(base_dir),
        sample_captions=1,
        progress=False,
        **(sizes | overrides),
    )


def test_demo_writes_every_output(tmp_path, throwaway_base):
    settings = tiny_settings(tmp_path / "demo", throwaway_base)
    summary = run_demo(settings)
    output = tmp_path / "demo"
    written = json.loads((output / "summary.json").read_text())
    assert set(written["runs"]) == {"diffusion-dpo", "diffusion-dpo+sdpo"}
    for name, run in written["runs"].items():
        for key in (
            "winner_mse_start",
            "winner_mse_end",
            "loser_mse_start",
            "loser_mse_end",
            "margin_end",
            "reward_before",
            "reward_after",
            "steps",
            "seconds",
        ):
            assert key in run, (name, key)
        assert run["steps"] == 4
        # Both runs start from the same base on the same held-out pairs.
        assert run["winner_mse_start"] == written["runs"]["diffusion-dpo"]["winner_mse_start"]
    assert written["runs"]["diffusion-dpo"]["mean_lambda"] == 1.0
    assert written["runs"]["diffusion-dpo+sdpo"]["mean_lambda"] <= 1.0
    assert summary["runs"] == written["runs"]
    for file in ("report.md", "curves.png", "samples.png"):
        assert (output / file).stat().st_size > 0, file
    # The checkpoints served the curves and are gone; the final weights stay.
    for name in written["runs"]:
        assert not list((output / name).glob("checkpoint-*")), name
        assert (output / name / "unet.pth").is_file(), name
    report = (output / "report.md").read_text()
    assert "| diffusion-dpo |" in report and "winners' error" in report
    # The same training data order and seed for both runs: the first logged losses agree.
    first = [
        json.loads((output / name / "metrics.jsonl").read_text().splitlines()[0])
        for name in written["runs"]
    ]
    assert first[0]["loss"] == pytest.approx(first[1]["loss"], rel=1e-6)


def test_demo_keeps_checkpoints_when_asked(tmp_path, throwaway_base):
    settings = tiny_settings(tmp_path / "demo", throwaway_base, keep_checkpoints=True)
    run_demo(settings)
    kept = sorted(path.name for path in (tmp_path / "demo" / "diffusion-dpo").glob("checkpoint-*"))
    assert kept == ["checkpoint-2", "checkpoint-4"]


def test_demo_restores_the_callers_torch_settings(tmp_path, throwaway_base):
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(2)
    try:
        run_demo(tiny_settings(tmp_path / "demo", throwaway_base, steps=2))
        assert torch.get_num_threads() == 2
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def test_demo_rejects_bad_step_counts(capsys):
    assert main(["--steps", "30", "--eval-every", "25"]) == 2
    assert "--steps must be a positive multiple" in capsys.readouterr().err
    assert main(["--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_missing_base_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="sdpo-demo --retrain-base"):
        base.load_base(tmp_path / "nothing")


@torch.no_grad()
def test_packaged_base_uses_its_captions():
    # The demo needs a base whose denoising depends on the caption: a preference for images that
    # match their caption can only be learned by sharpening that dependence. The packaged base
    # (clean captions) measured +58-70% error under a wrong colour word at t = 600-900; a base
    # pre-trained with 30% wrong captions measured +2-4% and the demo learned nothing from it.
    models = base.load_base()
    generator = torch.Generator().manual_seed(0)
    specs = toy.all_specs() * 4
    images = torch.stack([toy.render(spec, base.IMAGE_SIZE, generator) for spec in specs])
    recoloured = [
        toy.ToySpec(next(c for c in toy.COLORS if c != spec.color), spec.shape, spec.background)
        for spec in specs
    ]
    noise = torch.randn(images.shape, generator=generator)
    timesteps = torch.randint(600, 900, (len(specs),), generator=generator)
    noisy = models.scheduler.add_noise(images, noise, timesteps)

    def error(captions: list[str]) -> float:
        hidden, _ = models.text(captions, torch.device("cpu"))
        return float((models.unet(noisy, timesteps, hidden).sample - noise).square().mean())

    right = error([spec.caption for spec in specs])
    wrong = error([spec.caption for spec in recoloured])
    assert wrong > 1.25 * right, (right, wrong)


def test_demo_is_deterministic_for_a_seed(tmp_path, throwaway_base):
    def summary(folder: str, seed: int) -> dict:
        settings = tiny_settings(
            tmp_path / folder, throwaway_base, seed=seed, steps=2, eval_every=1, train_pairs=4
        )
        runs = run_demo(settings)["runs"]
        for run in runs.values():
            run.pop("seconds")
        return runs

    first, again, other = summary("a", 3), summary("b", 3), summary("c", 4)
    assert first == again
    assert first != other


# A shortened demo on the packaged base, in a fresh process: prints its summary without timings.
SHORT_DEMO = """
import json, sys
from sdpo.demo.run import DemoSettings, run_demo
settings = DemoSettings(output_dir=sys.argv[1], steps=2, eval_every=1, batch_pairs=8,
                        train_pairs=16, eval_pairs=32, sample_captions=1, progress=False)
runs = run_demo(settings)["runs"]
for run in runs.values():
    run.pop("seconds")
print(json.dumps(runs, sort_keys=True))
"""


def test_demo_summary_does_not_depend_on_the_thread_environment(tmp_path):
    # Unpinned, two threads moved this summary in the 7th significant digit (margin -0.0684086
    # vs -0.0684118): torch splits its reductions by thread. The demo pins one thread whatever
    # OMP_NUM_THREADS says, so both processes must print the same bits.
    summaries, logs = [], []
    for threads in ("1", "2"):
        environment = os.environ | {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        result = subprocess.run(
            [sys.executable, "-c", SHORT_DEMO, str(tmp_path / f"threads-{threads}")],
            env=environment,
            capture_output=True,
            text=True,
            timeout=900,
            check=True,
        )
        summaries.append(json.loads(result.stdout.strip().splitlines()[-1]))
        logs.append(result.stderr)
    assert summaries[0] == summaries[1]
    for log in logs:
        assert "sdpo-demo: CPU threads: 1 (requested)" in log, log


def test_moving_average_is_the_trailing_mean():
    values = [1.0, 0.0, 0.5, 0.25, 1.0, 0.0, 0.75]
    for window in (1, 3, 25):
        expected = [
            sum(values[max(0, i - window + 1) : i + 1])
            / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))
        ]
        assert moving_average(values, window) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="window"):
        moving_average(values, 0)


def test_a_base_batch_draws_indices_then_caption_drops_then_noise():
    """Both bases (DDPM and flow) train on draw_base_batch. The packaged ones were trained with
    its generator draws in this order: the flow base's --retrain-base reproduces the packaged
    one bit for bit only while it holds."""
    from sdpo.train.models import build_tiny

    data = toy.captioned_images(32, base.IMAGE_SIZE, base.BASE_LABEL_NOISE, seed=1)
    models = build_tiny(base.IMAGE_SIZE, 0, pixel_space=True)
    tokenizer, encoder = models.text.tokenizers[0], models.text.encoders[0]
    generator = torch.Generator().manual_seed(5)
    replay = torch.Generator().manual_seed(5)
    batch = base.draw_base_batch(data, tokenizer, encoder, 64, generator)
    index = torch.randint(32, (64,), generator=replay)
    dropped = (torch.rand(64, generator=replay) < 0.1).tolist()
    noise = torch.randn((64, 3, base.IMAGE_SIZE, base.IMAGE_SIZE), generator=replay)
    assert torch.equal(generator.get_state(), replay.get_state())  # nothing else drawn
    assert torch.equal(batch.pixels, data.images[index])
    assert torch.equal(batch.noise, noise)
    assert 0 < sum(dropped) < 64  # both kinds of rows: captioned and emptied (10%)
    rows = zip(index.tolist(), dropped, strict=True)
    captions = ["" if drop else data.captions[i] for i, drop in rows]
    # Encoded by the trainer's TextConditioner (the same tokenizer and frozen encoder).
    hidden, _ = models.text(captions, torch.device("cpu"))
    assert torch.equal(batch.hidden, hidden)
