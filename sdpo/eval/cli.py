"""``sdpo-eval``: generate images for a prompt suite, score them, compare two checkpoints.

    sdpo-eval fetch-suites --output-dir data
    sdpo-eval generate --pretrained SD15_FOLDER --unet runs/x/unet.pth \
        --suite data/prompts/papv2.json --output-dir eval/x
    sdpo-eval score eval/x/manifest.json --metrics pickscore,hpsv2,aesthetics,clip \
        --weights-root /models/rewards
    sdpo-eval compare eval/x/manifest.json eval/base/manifest.json --output x_vs_base.json \
        --markdown x_vs_base.md --plot x_vs_base.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdpo.eval.errors import RunFailure
from sdpo.eval.presets import PRESETS, SCHEDULERS

# The trainer's argparse types and ranges (sdpo.train.config, which imports no torch): a bad
# number is refused by the flag's name before anything loads.
from sdpo.train.config import OneLineParser, integer_at_least, setting_argument_type
from sdpo.train.errors import UsageError


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="sdpo-eval", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="images + manifest for a prompt suite")
    generate.add_argument("--pretrained", required=True, help="local diffusers pipeline folder")
    generate.add_argument("--unet", default=None, help="trained UNet: diffusers folder or .pth")
    generate.add_argument("--suite", required=True, help="prompt-suite JSON")
    generate.add_argument("--output-dir", required=True)
    # Defaults of None: the GenerateSettings defaults apply, and --preset can tell which flags
    # were given.
    generate.add_argument(
        "--model",
        choices=("sd15", "sdxl", "sd3", "flux"),
        default=None,
        help="default sd15; sd3 (SD3/SD3.5) and flux (FLUX.1) use their own pipelines",
    )
    generate.add_argument(
        "--transformer",
        default=None,
        help="sd3/flux: trained transformer (sdpo-train's transformer/ folder or .pth)",
    )
    generate.add_argument(
        "--lora",
        default=None,
        help="sd3/flux: LoRA weights applied to the base (sdpo-train's transformer_lora/)",
    )
    generate.add_argument("--steps", type=integer_at_least(1), default=None, help="default 50")
    generate.add_argument(
        "--resolution", type=setting_argument_type("resolution"), default=None,
        help="a multiple of 8 (default: the model's)",
    )  # fmt: skip
    generate.add_argument(
        "--guidance", type=setting_argument_type("validation_guidance"), default=None,
        help="a finite number >= 0 (default 7.5)",
    )  # fmt: skip
    generate.add_argument(
        "--cfg-formula",
        choices=("reference", "diffusers"),
        default=None,
        help="reference: eps_c + g (eps_c - eps_u), i.e. diffusers' g + 1 (default diffusers)",
    )
    generate.add_argument("--scheduler", choices=SCHEDULERS, default=None)
    generate.add_argument("--batch-size", type=integer_at_least(1), default=None, help="default 4")
    generate.add_argument("--seed", type=setting_argument_type("seed"), default=0)
    generate.add_argument(
        "--limit", type=integer_at_least(1), default=None, help="first N prompts only"
    )
    generate.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default bf16")
    generate.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=None,
        help="the official evaluation's sampler exactly (Euler, 50 steps, cfg 7.5 reference "
        "formula, one seed for all prompts, bf16 UNet, fp32 VAE decode; 512 / 1024 px)",
    )
    generate.add_argument(
        "--vae",
        default=None,
        help="a VAE folder to use instead of the pipeline's (SDXL: the "
        "reference uses madebyollin/sdxl-vae-fp16-fix)",
    )

    score = commands.add_parser("score", help="reward-model scores into the manifest")
    score.add_argument("manifest")
    score.add_argument("--metrics", default="pickscore,hpsv2,aesthetics,clip,imagereward")
    score.add_argument("--weights-root", default=None, help="folder holding the weights by name")
    for flag, meaning in (
        ("--pickscore", "PickScore_v1 model folder"),
        ("--pickscore-processor", "CLIP-ViT-H-14 tokenizer folder (PickScore, HPSv2)"),
        ("--hpsv2", "HPS_v2(.1)_compressed.pt"),
        ("--clip", "clip-vit-large-patch14 folder (CLIP score, aesthetics)"),
        ("--aesthetics-head", "sac+logos+ava1-l14-linearMSE.pth"),
        ("--imagereward", "ImageReward.pt"),
        ("--imagereward-tokenizer", "bert-base-uncased tokenizer folder (ImageReward)"),
    ):
        score.add_argument(flag, default=None, help=meaning)
    score.add_argument(
        "--on-missing",
        choices=("error", "skip"),
        default="error",
        help="skip: leave out metrics whose weights are missing and unreadable images, and say so",
    )
    score.add_argument(
        "--conventions",
        choices=("default", "reference"),
        default="default",
        help="default: each metric as its original package scores it; reference: as the official "
        "Diffusion-SDPO evaluation scripts print it (see README)",
    )
    score.add_argument("--batch-size", type=integer_at_least(1), default=16)
    score.add_argument(
        "--device", default=None, help="torch device for the scorers (default: cuda if available)"
    )

    fetch = commands.add_parser(
        "fetch-suites",
        help="download the prompt suites and the aesthetics head (sha256-checked)",
    )
    fetch.add_argument("--output-dir", required=True)
    fetch.add_argument(
        "--base-url",
        default=None,
        help="a mirror of the official repository's files (default: its GitHub raw URLs)",
    )

    compare = commands.add_parser("compare", help="A/B win rates paired by prompt")
    compare.add_argument("a")
    compare.add_argument("b")
    compare.add_argument("--output", required=True)
    compare.add_argument("--markdown", default=None)
    compare.add_argument("--plot", default=None)
    compare.add_argument("--resamples", type=integer_at_least(1), default=10000)
    compare.add_argument("--seed", type=setting_argument_type("seed"), default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """0, or one line on stderr and 2 for a refused flag or input, 1 for a failure during the
    run (sdpo.eval.errors)."""
    try:
        arguments = _parser().parse_args(argv)
        return _run(arguments)
    except RunFailure as error:
        print(f"sdpo-eval: error: {error}", file=sys.stderr)
        return 1
    except (ValueError, OSError, NotImplementedError) as error:
        # Refused flags, files, manifests and weights (UsageError is a ValueError): no traceback.
        print(f"sdpo-eval: error: {error}", file=sys.stderr)
        return 2


def _run(arguments: argparse.Namespace) -> int:
    if arguments.command == "generate":
        from sdpo.eval.generate import GenerateSettings, apply_preset, generate

        given = {
            key: value
            for key, value in vars(arguments).items()
            if key in GenerateSettings.__dataclass_fields__ and value is not None
        }
        settings = GenerateSettings(**apply_preset(given))
        print(f"manifest: {generate(settings)}")
        return 0
    if arguments.command == "fetch-suites":
        from sdpo.eval.fetch import OFFICIAL_BASE_URL, fetch_suites

        scheme = (arguments.base_url or OFFICIAL_BASE_URL).partition("://")[0]
        if scheme not in ("https", "http", "file"):
            raise UsageError(
                f"--base-url {arguments.base_url}: expected an https://, http:// or file:// URL"
            )
        fetch_suites(
            arguments.output_dir,
            arguments.base_url or OFFICIAL_BASE_URL,
            log=lambda message: print(message, file=sys.stderr),
        )
        return 0
    if arguments.command == "score":
        from sdpo.eval.score import score_manifest, summary_table
        from sdpo.eval.scorers import WeightSources

        paths = {
            "pickscore": arguments.pickscore,
            "pickscore_processor": arguments.pickscore_processor,
            "hpsv2": arguments.hpsv2,
            "clip": arguments.clip,
            "aesthetics_head": arguments.aesthetics_head,
            "imagereward": arguments.imagereward,
            "imagereward_tokenizer": arguments.imagereward_tokenizer,
        }
        if arguments.weights_root and not Path(arguments.weights_root).expanduser().is_dir():
            raise UsageError(f"--weights-root {arguments.weights_root}: no such folder")
        summary = score_manifest(
            arguments.manifest,
            [metric.strip() for metric in arguments.metrics.split(",") if metric.strip()],
            WeightSources(paths, arguments.weights_root),
            on_missing=arguments.on_missing,
            batch_size=arguments.batch_size,
            device=_device(arguments.device),
            log=lambda message: print(message, file=sys.stderr),
            conventions=arguments.conventions,
        )
        print(summary_table(summary))
        return 0
    from sdpo.eval import compare as comparison

    for flag, path in (("--output", arguments.output), ("--markdown", arguments.markdown),
                       ("--plot", arguments.plot)):  # fmt: skip
        if path:
            comparison.check_output(path, flag)
    result = comparison.compare(arguments.a, arguments.b, arguments.resamples, arguments.seed)
    text = comparison.markdown(result)
    try:
        comparison.write(result, arguments.output)
        if arguments.markdown:
            with open(arguments.markdown, "w") as handle:
                handle.write(text)
        if arguments.plot:
            comparison.plot(result, arguments.plot)
    except OSError as error:
        raise RunFailure(f"compare: writing the results failed ({error})") from error
    print(text)
    return 0


def _device(name: str | None):
    """``--device``: None (auto) or a torch device string, rejected early if unusable here."""
    if name is None:
        return None
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} but CUDA is not available; use --device cpu")
    return device


if __name__ == "__main__":
    raise SystemExit(main())
