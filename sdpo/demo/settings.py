"""The demo's settings: plain data, importing no torch (the command line reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass

# The demo's numbers are defined at one CPU thread: with two, torch splits reductions
# differently and the summary moves in the 4th digit (and the README's table no longer matches).
DEMO_THREADS = 1
# "ddpm": the tiny UNet as an epsilon-prediction DDPM model (the default); "flow": the same UNet
# as a rectified flow predicting the velocity (sdpo/demo/flow.py).
OBJECTIVES = ("ddpm", "flow")


@dataclass
class DemoSettings:
    output_dir: str = "runs/demo"
    objective: str = "ddpm"
    seed: int = 0
    steps: int = 600
    batch_pairs: int = 8
    learning_rate: float = 1e-4
    beta: float = 5000.0
    mu: float = 0.9
    train_pairs: int = 512
    eval_pairs: int = 128
    eval_every: int = 50
    # Copies of the 16 toy captions sampled for the reward: 128 images, so that the reward of
    # the same seeds before and after is compared over enough samples (32 moved it by ~0.02).
    sample_captions: int = 8
    base_dir: str | None = None
    retrain_base: bool = False
    progress: bool = True
    threads: int = DEMO_THREADS
    keep_checkpoints: bool = False
