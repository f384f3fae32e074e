"""``sdpo-pairs``: K images per prompt from a model, scored by a reward, paired by a rule.

    sdpo-pairs --pretrained /models/stable-diffusion-v1-5 --unet runs/x/unet.pth \\
        --prompts data/prompts/papv2.json --samples-per-prompt 4 --pairs best-worst \\
        --reward pickscore=1,clip=0.05 --weights-root /models/rewards --output-dir pairs/r0
    sdpo-train --preset sd15-dpo --pretrained /models/stable-diffusion-v1-5 \\
        --data pairs/r0/pairs.jsonl ...

Exit status: 0 done, 1 the reward failed (or no pair was made), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from sdpo.eval.presets import SCHEDULERS


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors: one line, exit 2
        self.exit(2, f"sdpo-pairs: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdpo-pairs", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        choices=("sd15", "sdxl", "sd3", "flux", "toy"),
        default="sd15",
        help="sd15/sdxl/sd3/flux: a diffusers pipeline as sdpo-eval generate loads it; toy: the "
        "demo's pixel-space model",
    )
    parser.add_argument(
        "--pretrained",
        required=True,
        help="a local diffusers pipeline folder; for --model toy: demo, demo-flow or a toy folder",
    )
    parser.add_argument("--unet", default=None, help="trained UNet: diffusers folder or .pth")
    parser.add_argument("--transformer", default=None, help="sd3/flux: trained transformer")
    parser.add_argument("--lora", default=None, help="sd3/flux: LoRA weights on the base")
    parser.add_argument("--vae", default=None, help="a VAE folder instead of the pipeline's")
    parser.add_argument(
        "--prompts",
        required=True,
        help="a prompt-suite JSON (as sdpo-eval generate reads) or a text file, one prompt a line",
    )
    parser.add_argument("--limit", type=int, default=None, help="first N prompts only")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing pairs.jsonl")
    parser.add_argument("--samples-per-prompt", "-k", type=int, default=4, help="K (>= 2)")
    parser.add_argument(
        "--pairs",
        default="best-worst",
        help="best-worst (per prompt, best vs worst) or gap:T (every pair whose reward gap > T)",
    )
    parser.add_argument(
        "--reward",
        required=True,
        help="a weighted sum: pickscore, hpsv2, imagereward, aesthetics, clip, toy or "
        "module:function terms, e.g. pickscore=1,clip=0.5",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4, help="images per sampler call")
    parser.add_argument("--steps", type=int, default=None, help="default 50 (toy: 25)")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None, help="default 7.5 (toy: 3)")
    parser.add_argument("--cfg-formula", choices=("reference", "diffusers"), default=None)
    parser.add_argument("--scheduler", choices=SCHEDULERS, default=None)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default bf16")
    parser.add_argument("--weights-root", default=None, help="folder holding reward weights")
    for flag, meaning in (
        ("--pickscore", "PickScore_v1 model folder"),
        ("--pickscore-processor", "CLIP-ViT-H-14 tokenizer folder (PickScore, HPSv2)"),
        ("--hpsv2", "HPS_v2(.1)_compressed.pt"),
        ("--clip", "clip-vit-large-patch14 folder (CLIP score, aesthetics)"),
        ("--aesthetics-head", "sac+logos+ava1-l14-linearMSE.pth"),
        ("--imagereward", "ImageReward.pt"),
        ("--imagereward-tokenizer", "bert-base-uncased tokenizer folder (ImageReward)"),
    ):
        parser.add_argument(flag, default=None, help=meaning)
    parser.add_argument("--conventions", choices=("default", "reference"), default="default")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    return parser


def read_prompts(path: str) -> list[str]:
    """A suite JSON (a list of objects with "prompt") or a text file of one prompt per line
    (blank lines skipped)."""
    from sdpo.eval.manifest import load_entries

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"--prompts: no such file {file}")
    if file.suffix == ".json":
        return [entry["prompt"] for entry in load_entries(file, "--prompts")]
    try:
        lines = file.read_text().splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"--prompts: {file} is not UTF-8 text ({error})") from error
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts: {file} holds no prompt")
    return prompts


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)  # --help and flag errors answer without torch
    from sdpo.pairs.rewards import RewardError

    try:
        return _run(arguments)
    except RewardError as error:
        print(f"sdpo-pairs: error: {error}; no pairs.jsonl written", file=sys.stderr)
        return 1
    except (ValueError, OSError, NotImplementedError) as error:
        print(f"sdpo-pairs: error: {error}", file=sys.stderr)
        return 2


def _check_flags(arguments: argparse.Namespace) -> None:
    from sdpo.pairs.make import check_output_dir

    for flag, value, low in (
        ("--samples-per-prompt", arguments.samples_per_prompt, 2),
        ("--batch-size", arguments.batch_size, 1),
        ("--limit", arguments.limit, 1),
        ("--steps", arguments.steps, 1),
        ("--resolution", arguments.resolution, 8),
    ):
        if value is not None and value < low:
            raise ValueError(f"{flag}: expected >= {low}, got {value}")
    if arguments.guidance is not None and not math.isfinite(arguments.guidance):
        raise ValueError(f"--guidance: expected a finite number, got {arguments.guidance}")
    check_output_dir(arguments.output_dir, arguments.overwrite)
    for flag in ("unet", "transformer", "lora", "vae"):  # before any model loads
        value = getattr(arguments, flag)
        if value is not None and not Path(value).expanduser().exists():
            raise FileNotFoundError(f"--{flag}: no such file or folder {value}")
    if arguments.model == "toy" and arguments.pretrained not in ("demo", "demo-flow"):
        if not Path(arguments.pretrained).expanduser().is_dir():
            raise FileNotFoundError(
                f"--pretrained {arguments.pretrained}: no such folder; for --model toy give demo, "
                "demo-flow or a toy model folder (sdpo/demo/base_model's layout)"
            )
    if arguments.model != "toy":
        from sdpo.eval.generate import GenerateSettings, check_flow_settings, check_pretrained

        settings = GenerateSettings(
            arguments.pretrained, "", "", unet=arguments.unet, model=arguments.model,
            transformer=arguments.transformer, lora=arguments.lora, vae=arguments.vae,
            scheduler=arguments.scheduler or "default",
            cfg_formula=arguments.cfg_formula or "diffusers",
        )  # fmt: skip
        check_flow_settings(settings)
        check_pretrained(settings)  # before diffusers' import and its warnings
    if arguments.model == "toy":
        for flag in ("transformer", "lora", "vae", "resolution", "cfg_formula", "scheduler",
                     "dtype"):  # fmt: skip
            if getattr(arguments, flag) is not None:
                raise ValueError(
                    f"--{flag.replace('_', '-')}: not for --model toy (16 px pixel-space model, "
                    "the demo's sampler; a trained model goes in --unet)"
                )


def _run(arguments: argparse.Namespace) -> int:
    from sdpo.eval.cli import _device
    from sdpo.eval.scorers import WeightSources
    from sdpo.pairs.make import make_pairs
    from sdpo.pairs.rewards import build_reward, parse_terms
    from sdpo.pairs.rules import parse_rule

    rule = parse_rule(arguments.pairs)
    parse_terms(arguments.reward)  # a malformed --reward fails before any model loads
    _check_flags(arguments)
    prompts = read_prompts(arguments.prompts)
    if arguments.limit is not None:
        prompts = prompts[: arguments.limit]
    device = _device(arguments.device)
    sources = WeightSources(
        {
            key: getattr(arguments, key)
            for key in (
                "pickscore",
                "pickscore_processor",
                "hpsv2",
                "clip",
                "aesthetics_head",
                "imagereward",
                "imagereward_tokenizer",
            )
        },
        arguments.weights_root,
    )
    reward = build_reward(
        arguments.reward, weight_sources=sources, device=device, conventions=arguments.conventions
    )
    reward.check_prompts(prompts)  # toy captions checked before the model loads
    sampler, settings = _load_sampler(arguments, device)
    result = make_pairs(
        sampler,
        prompts,
        reward,
        arguments.output_dir,
        samples_per_prompt=arguments.samples_per_prompt,
        rule=rule,
        seed=arguments.seed,
        batch_size=arguments.batch_size,
        overwrite=arguments.overwrite,
        metadata={"model": settings, "prompts_file": str(arguments.prompts)},
        log=lambda message: print(message, file=sys.stderr),
    )
    print(
        f"pairs: {len(result.pairs)} from {result.prompts} prompts x {arguments.samples_per_prompt} "
        f"images ({len(result.tied_prompts)} prompts tied, {len(result.unpaired_prompts)} under "
        f"the gap): {result.path}"
    )
    if not result.pairs:
        print("sdpo-pairs: error: no pair was made (see the counts above)", file=sys.stderr)
        return 1
    return 0


def _load_sampler(arguments: argparse.Namespace, device):
    if arguments.model == "toy":
        from sdpo.pairs.samplers import TOY_DEFAULT_GUIDANCE, TOY_DEFAULT_STEPS, load_toy_sampler

        steps = arguments.steps or TOY_DEFAULT_STEPS
        guidance = TOY_DEFAULT_GUIDANCE if arguments.guidance is None else arguments.guidance
        sampler = load_toy_sampler(
            arguments.pretrained, arguments.unet, steps=steps, guidance=guidance, device=device
        )
        settings = {"model": "toy", "pretrained": arguments.pretrained, "unet": arguments.unet,
                    "steps": steps, "guidance": guidance}  # fmt: skip
        return sampler, settings
    from dataclasses import asdict

    from sdpo.eval.generate import GenerateSettings, load_pipeline

    given = {
        key: value
        for key, value in vars(arguments).items()
        if key in GenerateSettings.__dataclass_fields__
        and key not in ("suite", "output_dir", "limit", "seed", "batch_size")
        and value is not None
    }
    settings = GenerateSettings(
        suite=str(arguments.prompts), output_dir=str(arguments.output_dir),
        batch_size=arguments.batch_size, **given,
    )  # fmt: skip
    loaded = load_pipeline(settings, device)
    meta = asdict(settings) | {
        "diffusers_guidance_scale": loaded.guidance_scale,
        "resolution": loaded.resolution,
        "scheduler_class": type(loaded.pipeline.scheduler).__name__,
    }
    json.dumps(meta)  # plain values only
    return loaded, meta


if __name__ == "__main__":
    raise SystemExit(main())
