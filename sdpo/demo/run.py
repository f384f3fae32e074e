"""`sdpo-demo`: the paper's pathology and its fix, measured on a toy, on a CPU, in minutes.

From one base model (sdpo/demo/base.py; with ``--objective flow`` the same toy as a rectified
flow, sdpo/demo/flow.py), two runs of the real trainer (``sdpo.train``) on the
same preference pairs, same data order and seed: plain Diffusion-DPO, and Diffusion-DPO with
the SDPO safeguard. Then, on held-out pairs with fixed noise and timesteps, the winners' and
losers' denoising errors and the margin along training, and the reward of images sampled
before and after. Writes summary.json, report.md and PNG plots to --output-dir.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sdpo.demo import base, flow
from sdpo.demo.cli import main
from sdpo.demo.settings import DEMO_THREADS, OBJECTIVES, DemoSettings  # noqa: F401
from sdpo.train import checkpoint as checkpoints
from sdpo.train import toy
from sdpo.train.config import TrainConfig
from sdpo.train.models import Models
from sdpo.train.runtime import configure_cpu_threads
from sdpo.train.toy_flow import is_toy_flow_folder

RUNS = (("diffusion-dpo", None), ("diffusion-dpo+sdpo", "mu"))


@dataclass
class EvaluationSet:
    pixels: Tensor  # (2N, 3, S, S): winners then losers
    captions: list[str]
    noise: Tensor  # (N, 3, S, S), shared by a pair
    timesteps: Tensor  # (N,)


def evaluation_set(count: int, seed: int) -> EvaluationSet:
    """Held-out pairs (a seed the training pairs never use) with fixed noise and timesteps."""
    pairs = toy.preference_pairs(count, base.IMAGE_SIZE, corruption=0.3, seed=1_000_003 + seed)
    generator = torch.Generator().manual_seed(2_000_003 + seed)
    noise = torch.randn(pairs.winners.shape, generator=generator)
    # Mid-range timesteps, where the errors carry the image content (not pure noise, not clean).
    timesteps = torch.randint(100, 900, (count,), generator=generator)
    return EvaluationSet(torch.cat([pairs.winners, pairs.losers]), pairs.captions, noise, timesteps)


@torch.no_grad()
def denoising_errors(
    models: Models, unet: torch.nn.Module, data: EvaluationSet
) -> tuple[Tensor, Tensor]:
    """Per-pair winner and loser MSE of ``unet`` on the evaluation set."""
    noise_rows = torch.cat([data.noise, data.noise])
    timestep_rows = torch.cat([data.timesteps, data.timesteps])
    noisy = models.scheduler.add_noise(data.pixels, noise_rows, timestep_rows)
    hidden, _ = models.text(data.captions, torch.device("cpu"))
    prediction = unet(noisy, timestep_rows, torch.cat([hidden, hidden])).sample
    mse = (prediction - noise_rows).square().flatten(1).mean(1)
    return mse.chunk(2)


def _load_weights(models: Models, state: dict) -> torch.nn.Module:
    unet = type(models.unet).from_config(models.unet.config)
    unet.load_state_dict(state)
    return unet.eval()


def _reward_of_samples(
    models: Models, unet: torch.nn.Module, captions: list[str], seed: int
) -> tuple[float, Tensor]:
    sampler = flow.sample if models.flow is not None else base.sample
    images = sampler(models, unet, captions, seed=seed)
    return float(toy.reward(images, captions).mean()), images


def held_out_errors(
    models: Models, unet: torch.nn.Module, data: EvaluationSet
) -> tuple[Tensor, Tensor]:
    """Per-pair winner and loser errors: of the noise (DDPM) or of the velocity (flow), at the
    same noise draws and noise levels (flow: sigma = t / 1000)."""
    if models.flow is None:
        return denoising_errors(models, unet, data)
    sigmas = flow.evaluation_sigmas(models, data.timesteps)
    return flow.velocity_errors(models, unet, data.pixels, data.captions, data.noise, sigmas)


def check_settings(settings: DemoSettings) -> None:
    """Raises ValueError naming the setting for what the demo cannot run."""
    if settings.objective not in OBJECTIVES:
        raise ValueError(
            f"objective: expected one of {', '.join(OBJECTIVES)}, got {settings.objective!r}"
        )
    if settings.steps < settings.eval_every or settings.steps % settings.eval_every:
        raise ValueError("--steps must be a positive multiple of --eval-every")
    if settings.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {settings.threads}")
    if settings.base_dir and not settings.retrain_base:
        flow_folder = is_toy_flow_folder(settings.base_dir)
        if flow_folder and settings.objective != "flow":
            raise ValueError(
                f"--base-dir {settings.base_dir} holds a flow-matching model; add --objective flow"
            )
        if not flow_folder and settings.objective == "flow":
            raise ValueError(
                f"--base-dir {settings.base_dir} is not a flow-matching model (its scheduler is "
                "not a FlowMatchEulerDiscreteScheduler); drop --objective flow or give a flow base"
            )


@contextlib.contextmanager
def reproducible(seed: int, threads: int) -> Iterator[None]:
    """Pins what the demo's numbers depend on, and restores it afterwards (tests run in-process).

    The thread count (fixed, whatever OMP_NUM_THREADS says), deterministic algorithms (torch
    raises on an op that has none, rather than varying silently), and every global RNG seeded
    from the demo seed: the trainer and the demo draw from their own seeded generators, the
    global ones only back anything that does not.
    """
    saved_threads = torch.get_num_threads()
    saved_deterministic = torch.are_deterministic_algorithms_enabled()
    saved_torch_rng = torch.random.get_rng_state()
    saved_python_rng = random.getstate()
    configure_cpu_threads(threads, program="sdpo-demo")
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(saved_deterministic)
        torch.random.set_rng_state(saved_torch_rng)
        random.setstate(saved_python_rng)


def run_demo(settings: DemoSettings) -> dict:
    """Both runs, the measurements and the outputs (see the module docstring)."""
    check_settings(settings)
    with reproducible(settings.seed, settings.threads):
        return _run_demo(settings)


def _remove_checkpoints(run_dir: Path, steps: list[int]) -> None:
    # 12 checkpoints of weights + Adam state per run, ~80 MB in all at the defaults: they only
    # serve the curves, which are measured by now.
    for step in steps:
        folder = checkpoints.checkpoint_path(run_dir, step)
        if folder.is_dir():
            shutil.rmtree(folder)


def _run_demo(settings: DemoSettings) -> dict:
    from sdpo.train.trainer import train

    output = Path(settings.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    is_flow = settings.objective == "flow"
    packaged = flow.PACKAGED_FLOW_BASE if is_flow else base.PACKAGED_BASE
    base_dir = Path(settings.base_dir) if settings.base_dir else packaged
    if settings.retrain_base:
        base_dir = output / "base"
        print(f"training the base model into {base_dir} ...", flush=True)
        if is_flow:
            # fp16 storage as packaged: seed 0 at one thread rebuilds the packaged weights.
            flow.pretrain_flow_base(base_dir, seed=settings.seed, half=True)
        else:
            base.pretrain_base(base_dir, seed=settings.seed)
    models = flow.load_flow_base(base_dir) if is_flow else base.load_base(base_dir)
    data = evaluation_set(settings.eval_pairs, settings.seed)
    base_winner, base_loser = held_out_errors(models, models.unet, data)
    captions = [spec.caption for spec in toy.all_specs()] * settings.sample_captions
    reward_before, images_before = _reward_of_samples(models, models.unet, captions, settings.seed)

    summary: dict = {"settings": vars(settings) | {"base_dir": str(base_dir)}, "runs": {}}
    curves: dict = {}
    for name, safeguard in RUNS:
        mu = settings.mu if safeguard else None
        run_dir = output / name
        config = TrainConfig(
            model="tiny",
            pretrained=str(base_dir),
            data=None,
            synthetic_pairs=settings.train_pairs,
            resolution=base.IMAGE_SIZE,
            output_dir=str(run_dir),
            max_steps=settings.steps,
            checkpoint_every=settings.eval_every,
            train_batch_pairs=settings.batch_pairs,
            gradient_accumulation=1,
            learning_rate=settings.learning_rate,
            warmup_steps=0,
            beta=settings.beta,
            mu=mu,
            granularity="batch",
            caption_dropout=0.0,
            mixed_precision="no",
            seed=settings.seed,
            progress=settings.progress,
            loss_backend="torch",
            overwrite=True,  # the demo owns its run folders: a rerun replaces them
        )
        start = time.perf_counter()
        print(f"{name}: {settings.steps} steps of the trainer (mu={mu}) ...", flush=True)
        train(config)
        seconds = time.perf_counter() - start
        steps, winner, loser, margin = (
            [0],
            [float(base_winner.mean())],
            [float(base_loser.mean())],
            [0.0],
        )
        for step in range(settings.eval_every, settings.steps + 1, settings.eval_every):
            state, _ = checkpoints.load_checkpoint(checkpoints.checkpoint_path(run_dir, step))
            winner_mse, loser_mse = held_out_errors(models, _load_weights(models, state), data)
            steps.append(step)
            winner.append(float(winner_mse.mean()))
            loser.append(float(loser_mse.mean()))
            margin.append(
                float(
                    (
                        -(settings.beta / 2)
                        * ((winner_mse - loser_mse) - (base_winner - base_loser))
                    ).mean()
                )
            )
        if not settings.keep_checkpoints:
            _remove_checkpoints(run_dir, steps[1:])
        final = _load_weights(models, torch.load(run_dir / f"{models.export_name}.pth"))
        reward_after, images_after = _reward_of_samples(models, final, captions, settings.seed)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curves[name] = {
            "steps": steps,
            "winner": winner,
            "loser": loser,
            "margin": margin,
            "lambda": [row["lambda"] for row in rows],
            "images": images_after,
        }
        summary["runs"][name] = {
            "winner_mse_start": winner[0],
            "winner_mse_end": winner[-1],
            "loser_mse_start": loser[0],
            "loser_mse_end": loser[-1],
            "margin_end": margin[-1],
            "reward_before": reward_before,
            "reward_after": reward_after,
            "steps": settings.steps,
            "seconds": round(seconds, 1),
            "mu": mu,
            "mean_lambda": sum(curves[name]["lambda"]) / len(rows),
        }
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    write_plots(output, curves, images_before, captions, settings.objective)
    (output / "report.md").write_text(report(summary))
    return summary


def _change(start: float, end: float) -> str:
    percent = 100.0 * (end - start) / start
    return f"{'rose' if end > start else 'fell'} from {start:.4f} to {end:.4f} ({percent:+.1f}%)"


def report(summary: dict) -> str:
    """The table and a few sentences, each stating what was measured (never a fixed claim)."""
    flow_objective = summary["settings"].get("objective") == "flow"
    title = "# sdpo-demo: Diffusion-DPO with and without the SDPO safeguard"
    error_line = (
        "Held-out pairs, fixed noise and timesteps; MSE is the denoising error (lower is better);"
    )
    if flow_objective:
        title += " (rectified flow)"
        error_line = (
            "Held-out pairs, fixed noise and sigmas; MSE is the velocity error, mean (v_theta - "
            "(noise - x_0))^2 (lower is better);"
        )
    lines = [
        title,
        "",
        error_line,
        "the margin is u averaged over pairs (the preference the model expresses, higher is better);",
        "reward is the pixel reward of images sampled for the 16 toy captions (1 = matches the caption).",
        "",
        "| run | winner MSE start -> end | loser MSE start -> end | margin end | reward before -> after | mean lambda | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in summary["runs"].items():
        lines.append(
            f"| {name} | {run['winner_mse_start']:.4f} -> {run['winner_mse_end']:.4f} | "
            f"{run['loser_mse_start']:.4f} -> {run['loser_mse_end']:.4f} | {run['margin_end']:.2f} | "
            f"{run['reward_before']:.3f} -> {run['reward_after']:.3f} | {run['mean_lambda']:.3f} | {run['seconds']} |"
        )
    dpo, safe = summary["runs"]["diffusion-dpo"], summary["runs"]["diffusion-dpo+sdpo"]
    lines += [
        "",
        f"Under plain Diffusion-DPO the winners' error {_change(dpo['winner_mse_start'], dpo['winner_mse_end'])}"
        f" while the margin reached {dpo['margin_end']:.2f}.",
        f"With the safeguard (mu = {safe['mu']}) the winners' error {_change(safe['winner_mse_start'], safe['winner_mse_end'])}"
        f" and the margin reached {safe['margin_end']:.2f}.",
        f"The reward of sampled images went from {dpo['reward_before']:.3f} (base) to {dpo['reward_after']:.3f}"
        f" (Diffusion-DPO) and {safe['reward_after']:.3f} (with the safeguard).",
        _margin_sentence(dpo["margin_end"], safe["margin_end"]),
        "",
    ]
    return "\n".join(lines)


def _margin_sentence(dpo_margin: float, safe_margin: float) -> str:
    grew = [
        name
        for name, margin in (("Diffusion-DPO", dpo_margin), ("the safeguarded run", safe_margin))
        if margin > 0
    ]
    if len(grew) == 2:
        return "The held-out margin grew in both runs."
    if not grew:
        return (
            "The held-out margin did not grow in either run at these settings (the claim that it still "
            "grows with the safeguard is not shown by this run)."
        )
    return f"The held-out margin grew only in {grew[0]}."


LAMBDA_WINDOW = 25  # steps; lambda is one noisy batch statistic per step


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    if window < 1:
        raise ValueError(f"window: expected >= 1, got {window}")
    averages, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        averages.append(total / min(index + 1, window))
    return averages


def _image(tensor: Tensor):
    return ((tensor.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def _short_caption(caption: str) -> str:
    # "a red circle on a white background" -> "red circle\non white": fits under a 16 px image.
    spec = toy.ToySpec.from_caption(caption)
    return f"{spec.color} {spec.shape}\non {spec.background}"


def write_plots(
    output: Path, curves: dict, images_before: Tensor, captions: list[str], objective: str = "ddpm"
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, curve in curves.items():
        style = "-" if "sdpo" in name else "--"
        axes[0].plot(curve["steps"], curve["winner"], style, label=f"{name}: winners")
        axes[0].plot(curve["steps"], curve["loser"], style, alpha=0.6, label=f"{name}: losers")
        axes[1].plot(curve["steps"], curve["margin"], style, label=name)
        steps = range(1, len(curve["lambda"]) + 1)
        (raw,) = axes[2].plot(
            steps, curve["lambda"], style, linewidth=0.6, alpha=0.3, label=f"{name}: per step"
        )
        axes[2].plot(
            steps,
            moving_average(curve["lambda"], LAMBDA_WINDOW),
            style,
            color=raw.get_color(),
            linewidth=2,
            label=f"{name}: {LAMBDA_WINDOW}-step moving average",
        )
    predicted = "velocity" if objective == "flow" else "noise"
    axes[0].set(
        title="held-out denoising error", xlabel="step", ylabel=f"MSE of the {predicted} prediction"
    )
    axes[1].set(title="held-out margin", xlabel="step", ylabel="u, mean over held-out pairs")
    axes[2].set(
        title="lambda (loser gradient scale)",
        xlabel="step",
        ylabel="lambda of the step's batch",
        ylim=(0, 1.05),
    )
    for axis in axes:
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output / "curves.png", dpi=100)
    plt.close(figure)

    panels = [("base model", images_before)] + [
        (name, curve["images"]) for name, curve in curves.items()
    ]
    shown = min(16, len(captions))
    figure, axes = plt.subplots(
        len(panels), shown, figsize=(1.1 * shown, 1.45 * len(panels) + 0.4), squeeze=False
    )
    for row, (title, images) in enumerate(panels):
        for column in range(shown):
            axis = axes[row][column]
            axis.imshow(_image(images[column]), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if column == 0:
                axis.set_ylabel(title, fontsize=8)
            if row == len(panels) - 1:
                axis.set_xlabel(_short_caption(captions[column]), fontsize=7)
    figure.suptitle("samples for the 16 toy captions (same seeds; caption under each column)")
    figure.tight_layout()
    figure.savefig(output / "samples.png", dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
