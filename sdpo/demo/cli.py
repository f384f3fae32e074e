"""`sdpo-demo`: the paper's pathology and its fix, measured on a toy, on a CPU, in minutes.

The command line (see sdpo/demo/run.py for what it runs). It parses its flags before importing
torch, so ``sdpo-demo --help`` and a bad flag answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sdpo.demo.settings import OBJECTIVES, DemoSettings


def main(argv: list[str] | None = None) -> int:
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(prog="sdpo-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=defaults.output_dir)
    parser.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=defaults.objective,
        help="ddpm (default): the toy UNet as a DDPM epsilon model; flow: the same toy as a "
        "rectified flow predicting the velocity, sampled with a flow-match Euler sampler",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--beta", type=float, default=defaults.beta)
    parser.add_argument("--mu", type=float, default=defaults.mu)
    parser.add_argument(
        "--base-dir", default=None, help="a base model folder (default: the packaged one)"
    )
    parser.add_argument(
        "--retrain-base", action="store_true", help="train the base model from scratch first"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument(
        "--threads",
        type=int,
        default=defaults.threads,
        help=f"CPU threads (default {defaults.threads}, whatever OMP_NUM_THREADS says: the "
        "demo's numbers are defined at 1 thread; another count moves them in the 4th digit)",
    )
    parser.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep the trainer's checkpoints (~80 MB at the defaults; deleted once measured)",
    )
    arguments = parser.parse_args(argv)
    settings = DemoSettings(**{key: value for key, value in vars(arguments).items()})
    if settings.steps < settings.eval_every or settings.steps % settings.eval_every:
        print(
            "sdpo-demo: error: --steps must be a positive multiple of --eval-every", file=sys.stderr
        )
        return 2
    if settings.threads < 1:
        print(f"sdpo-demo: error: --threads must be >= 1, got {settings.threads}", file=sys.stderr)
        return 2
    import torch

    from sdpo.demo.run import check_settings, run_demo

    try:
        check_settings(settings)  # what needs the model folders (a --base-dir of the wrong kind)
    except ValueError as error:
        print(f"sdpo-demo: error: {error}", file=sys.stderr)
        return 2
    if not torch.cuda.is_initialized():
        # The demo is a CPU demo: on a machine with a GPU the trainer would pick CUDA, whose
        # kernels round differently, and the numbers would no longer match the README's.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    summary = run_demo(settings)
    print((Path(settings.output_dir) / "report.md").read_text())
    print(json.dumps(summary["runs"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
