"""sdpo-demo --objective flow: the toy as a rectified flow, checked against diffusers'
FlowMatchEulerDiscreteScheduler (its forward process and its Euler step) and end to end through
the real trainer at a toy size."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from sdpo.demo import base, flow
from sdpo.demo.run import DemoSettings, check_settings, evaluation_set, main, run_demo
from sdpo.train import toy, toy_flow
from sdpo.train.config import TrainConfig
from sdpo.train.family import FlowMatchingFamily
from sdpo.train.flow_matching import FlowDensity
from sdpo.train.models import build_models


@pytest.fixture(scope="module")
def throwaway_flow_base(tmp_path_factory):
    # A flow base trained for a handful of steps: the plumbing, not the quality, is under test.
    folder = tmp_path_factory.mktemp("flow-base")
    flow.pretrain_flow_base(folder, steps=3, batch_size=8, images=32, log_every=1)
    return folder


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def test_noisy_inputs_and_target_follow_diffusers_scale_noise(throwaway_flow_base):
    models = flow.load_flow_base(throwaway_flow_base)
    family = FlowMatchingFamily(models.flow, models.flow_density)
    generator = torch.Generator().manual_seed(0)
    pairs = 3
    latents = torch.randn((2 * pairs, 3, 16, 16), generator=generator)
    # The trainer's own draw: one noise and one sigma per pair from the training table.
    noise, sigmas = family.sample_noise(latents, generator)
    noisy, sigma_rows, target = family.noisy_inputs(latents, noise, sigmas)

    scheduler = _scheduler()
    index = [int((scheduler.sigmas == sigma).nonzero()) for sigma in sigmas]
    timesteps = scheduler.timesteps[index].repeat(2)
    noise_rows = noise.repeat(2, 1, 1, 1)
    expected = scheduler.scale_noise(latents, timesteps, noise_rows)
    torch.testing.assert_close(noisy, expected, rtol=0, atol=1e-6)
    # The diffusers SD3/FLUX DreamBooth scripts' target: noise - model_input, per row.
    torch.testing.assert_close(target, noise_rows - latents, rtol=0, atol=0)
    torch.testing.assert_close(sigma_rows, sigmas.repeat(2))

    # The model's time input is the scheduler's timestep (sigma * 1000), as SD3's transformer.
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.dtype = torch.float32

        def forward(self, sample, timestep, hidden):
            seen.append(timestep)
            return type("Output", (), {"sample": sample * self.weight})()

    hidden = torch.zeros(2 * pairs, 12, 32)
    family.predict(Recorder(), noisy, sigma_rows, hidden, None)
    torch.testing.assert_close(seen[0], timesteps, rtol=0, atol=1e-3)


def test_evaluation_sigmas_are_table_entries_at_the_ddpm_noise_levels(throwaway_flow_base):
    models = flow.load_flow_base(throwaway_flow_base)
    timesteps = torch.tensor([100, 500, 899, 1, 999])
    sigmas = flow.evaluation_sigmas(models, timesteps)
    torch.testing.assert_close(sigmas, timesteps.float() / 1000, rtol=0, atol=1e-6)
    table = _scheduler().sigmas
    assert all(bool((table == sigma).any()) for sigma in sigmas)


def test_euler_step_equals_diffusers_step():
    scheduler = _scheduler()
    scheduler.set_timesteps(25)
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn((4, 3, 16, 16), generator=generator)
    ours = sample.clone()
    sigmas = flow.sampling_sigmas(flow_models_stub(), 25)
    torch.testing.assert_close(sigmas, scheduler.sigmas.float())
    for index, timestep in enumerate(scheduler.timesteps):
        velocity = torch.randn(sample.shape, generator=generator)
        sample = scheduler.step(velocity, timestep, sample).prev_sample
        ours = flow.euler_step(ours, velocity, sigmas[index], sigmas[index + 1])
        torch.testing.assert_close(ours, sample, rtol=0, atol=1e-6)


def flow_models_stub() -> SimpleNamespace:
    """What ``sampling_sigmas`` reads of ``Models``: the flow family's scheduler."""
    return SimpleNamespace(flow=SimpleNamespace(scheduler=_scheduler()))


@torch.no_grad()
def test_sampler_equals_a_diffusers_scheduler_loop(throwaway_flow_base):
    models = flow.load_flow_base(throwaway_flow_base)
    unet = models.unet
    captions = ["a red circle on a white background", "a blue square on a black background"]
    ours = flow.sample(models, unet, captions, seed=5, steps=6, guidance=3.0)

    scheduler = _scheduler()
    scheduler.set_timesteps(6)
    conditional, _ = models.text(captions, torch.device("cpu"))
    unconditional, _ = models.text([""] * 2, torch.device("cpu"))
    hidden = torch.cat([unconditional, conditional])
    images = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(5))
    for timestep in scheduler.timesteps:
        velocity = unet(torch.cat([images, images]), timestep.expand(4), hidden).sample
        uncond, cond = velocity.chunk(2)
        images = scheduler.step(uncond + 3.0 * (cond - uncond), timestep, images).prev_sample
    torch.testing.assert_close(ours, images.clamp(-1, 1), rtol=0, atol=1e-5)


def test_flow_demo_runs_end_to_end_through_the_trainer(tmp_path, throwaway_flow_base):
    settings = DemoSettings(
        output_dir=str(tmp_path / "demo"),
        objective="flow",
        base_dir=str(throwaway_flow_base),
        steps=4,
        eval_every=2,
        batch_pairs=2,
        train_pairs=8,
        eval_pairs=4,
        sample_captions=1,
        progress=False,
    )
    summary = run_demo(settings)
    output = tmp_path / "demo"
    written = json.loads((output / "summary.json").read_text())
    assert written["settings"]["objective"] == "flow"
    assert summary["runs"] == written["runs"]
    dpo, safe = written["runs"]["diffusion-dpo"], written["runs"]["diffusion-dpo+sdpo"]
    assert dpo["mean_lambda"] == 1.0 and 0.0 <= safe["mean_lambda"] < 1.0
    for run in (dpo, safe):
        for key in ("winner_mse_end", "loser_mse_end", "margin_end", "reward_after"):
            assert torch.isfinite(torch.tensor(run[key])), key
    for name in written["runs"]:
        # The trainer built the flow family: it exports the weights under the flow name.
        assert (output / name / "transformer.pth").is_file(), name
        assert not list((output / name).glob("checkpoint-*")), name
    for file in ("report.md", "curves.png", "samples.png"):
        assert (output / file).stat().st_size > 0, file
    assert "(rectified flow)" in (output / "report.md").read_text()

    # The base's held-out winner error is the velocity MSE on diffusers' forward process at
    # sigma = t / 1000 with the evaluation set's noise.
    models = flow.load_flow_base(throwaway_flow_base)
    data = evaluation_set(settings.eval_pairs, settings.seed)
    count = settings.eval_pairs
    winners = data.pixels[:count]
    scheduler = _scheduler()
    timesteps = data.timesteps.float()
    noisy = scheduler.scale_noise(winners, timesteps, data.noise)
    hidden, _ = models.text(data.captions, torch.device("cpu"))
    with torch.no_grad():
        velocity = models.unet(noisy, timesteps, hidden).sample
    expected = float((velocity - (data.noise - winners)).square().flatten(1).mean(1).mean())
    assert dpo["winner_mse_start"] == pytest.approx(expected, rel=1e-5)


def test_trainer_refuses_what_the_toy_flow_model_cannot_do(tmp_path, throwaway_flow_base):
    def config(**overrides) -> TrainConfig:
        fields = dict(
            model="tiny",
            pretrained=str(throwaway_flow_base),
            resolution=base.IMAGE_SIZE,
            output_dir=str(tmp_path / "run"),
        )
        return TrainConfig(**(fields | overrides))

    models = build_models(config(), torch.device("cpu"))
    assert isinstance(models.flow, toy_flow.ToyFlowFamily)
    assert models.flow_density == FlowDensity()
    assert models.reference_unet is not None
    with pytest.raises(ValueError, match="lora_rank: the toy flow model"):
        build_models(config(lora_rank=4), torch.device("cpu"))
    with pytest.raises(ValueError, match="timestep_weighting"):
        build_models(config(timestep_weighting="dpo-cm"), torch.device("cpu"))


def test_bad_objective_flags_fail_with_a_clear_message(capsys, throwaway_flow_base):
    with pytest.raises(SystemExit) as exit_info:
        main(["--objective", "sde"])
    assert exit_info.value.code == 2
    assert "--objective: invalid choice: 'sde'" in capsys.readouterr().err
    assert main(["--objective", "flow", "--base-dir", str(base.PACKAGED_BASE)]) == 2
    assert "is not a flow-matching model" in capsys.readouterr().err
    assert main(["--base-dir", str(throwaway_flow_base)]) == 2
    assert "add --objective flow" in capsys.readouterr().err
    with pytest.raises(ValueError, match="objective: expected one of ddpm, flow"):
        check_settings(DemoSettings(objective="Flow"))
    assert DemoSettings().objective == "ddpm"


def test_missing_flow_base_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--objective flow --retrain-base"):
        flow.load_flow_base(tmp_path / "nothing")


@torch.no_grad()
def test_packaged_flow_base_uses_its_captions():
    # As the DDPM base (test_demo_run.py): a preference for images that match their caption can
    # only be learned by a model whose prediction depends on the caption.
    models = flow.load_flow_base()
    assert next(models.unet.parameters()).dtype == torch.float32
    generator = torch.Generator().manual_seed(0)
    specs = toy.all_specs() * 4
    images = torch.stack([toy.render(spec, base.IMAGE_SIZE, generator) for spec in specs])
    recoloured = [
        toy.ToySpec(next(c for c in toy.COLORS if c != spec.color), spec.shape, spec.background)
        for spec in specs
    ]
    noise = torch.randn(images.shape, generator=generator)
    sigmas = torch.randint(600, 900, (len(specs),), generator=generator).float() / 1000
    noisy = (1 - sigmas[:, None, None, None]) * images + sigmas[:, None, None, None] * noise

    def error(captions: list[str]) -> float:
        hidden, _ = models.text(captions, torch.device("cpu"))
        velocity = models.flow.prediction(models.unet, noisy, sigmas, {"prompt_embeds": hidden})
        return float((velocity - (noise - images)).square().mean())

    right = error([spec.caption for spec in specs])
    wrong = error([spec.caption for spec in recoloured])
    assert wrong > 1.25 * right, (right, wrong)
