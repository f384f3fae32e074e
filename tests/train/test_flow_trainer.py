"""The trainer on the flow-matching families (tiny random SD3 / FLUX / Wan, CPU, no download):
presets, the step against preference_loss by hand, LoRA, resume, torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_helpers import assert_same_up_to_reordering, read_rows

import sdpo
from sdpo.train import families
from sdpo.train.config import PRESETS, TrainConfig, config_from_args
from sdpo.train.data import PairBatches, generator_for, load_records
from sdpo.train.errors import UsageError
from sdpo.train.models import FLOW_LORA_TARGETS, build_models
from sdpo.train.trainer import train

CPU = torch.device("cpu")
FLOW_PRESETS = ("sd35m-dpo", "sd35l-dpo-lora", "flux-dpo-lora", "wan-dpo-lora")
SMALL = [
    "--pretrained", "tiny", "--resolution", "16", "--train-batch-pairs", "2",
    "--gradient-accumulation", "1", "--synthetic-pairs", "8", "--warmup-steps", "0",
    "--no-progress",
]  # fmt: skip


def flow_config(tmp_path: Path, name: str, *flags: str, **overrides) -> TrainConfig:
    config = config_from_args([*flags, *SMALL, "--output-dir", str(tmp_path / name)])
    for key, value in overrides.items():
        setattr(config, key, value)
    config.validate()
    return config


@pytest.mark.parametrize("preset", FLOW_PRESETS)
def test_each_flow_preset_trains_and_exports_the_transformer(tmp_path, preset):
    config = flow_config(tmp_path, preset, "--preset", preset, "--max-steps", "2")
    assert config.model == PRESETS[preset]["model"]
    rows = train(config)["rows"]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    output = Path(config.output_dir)
    state = torch.load(output / "transformer.pth")
    assert not any("lora" in name for name in state)  # adapters merged into the export
    family = {"sd3": families.SD3Family, "flux": families.FluxFamily, "wan": families.WanFamily}
    transformer_class = type(family[config.model].build_tiny(16, 0).transformer)
    exported = transformer_class.from_pretrained(output / "transformer")
    assert all(torch.equal(exported.state_dict()[name], state[name]) for name in state)
    if config.lora_rank:
        # The policy moved (LoRA learning rate 1e-5 on 2 steps), and only through the adapters:
        # the merged export differs from the base weights in the LoRA target layers alone. (Its
        # margin at step 2 is ~1e-4, fp32 noise: 0.0 under the tests' one thread.)
        base = family[config.model].build_tiny(16, config.seed).transformer.state_dict()
        changed = {name for name in state if not torch.equal(state[name], base[name])}
        assert changed, "the LoRA run left every weight as it was"
        targets = [f".{target}." for target in FLOW_LORA_TARGETS]
        assert all(any(target in name for target in targets) for name in changed), changed


def by_hand_batch(config: TrainConfig):
    records = load_records(
        None, resolution=config.resolution, synthetic_pairs=config.synthetic_pairs, seed=config.seed
    )
    batches = PairBatches(
        records,
        batch_pairs=config.train_batch_pairs,
        resolution=config.resolution,
        caption_dropout=config.caption_dropout,
        seed=config.seed,
    )
    return batches.batch(0, 0)


@pytest.mark.parametrize(
    ("model", "weighting", "extra"),
    [
        ("sd3", "none", ()),
        ("flux", "none", ()),
        ("flux", "none", ("--flow-dynamic-shift",)),
        ("wan", "cosmap", ()),
    ],
)
def test_first_step_equals_flow_preference_inputs_and_preference_loss(
    tmp_path, model, weighting, extra
):
    config = flow_config(
        tmp_path, model, "--model", model, "--max-steps", "1", "--mu", "0.9",
        "--granularity", "pair", "--flow-loss-weighting", weighting, *extra,
    )  # fmt: skip
    logged = train(config)["rows"][0]

    models = build_models(config, CPU)  # the same seeded initial weights
    # The flag reaches the sigma draws (flow_matching shifts them as FluxPipeline does: tested
    # against the pipeline's own set_timesteps in test_flow_matching.py).
    assert models.flow_density.dynamic_shift is ("--flow-dynamic-shift" in extra)
    flow = models.flow
    batch = by_hand_batch(config)
    generator = generator_for(config.seed, 3, 0, 0)
    pixels = torch.cat([batch.winners, batch.losers])
    if model == "wan":
        pixels = pixels.unsqueeze(2)  # one-frame videos
    latents = flow.encode_images(pixels, generator)
    conditioning = flow.encode_text(batch.captions, CPU)
    inputs = families.flow_preference_inputs(
        flow, models.unet, models.reference_unet, latents, conditioning, generator,
        models.flow_density,
    )  # fmt: skip
    expected = sdpo.preference_loss(
        inputs.model_pred, inputs.ref_pred, inputs.target, beta=config.beta, mu=config.mu,
        granularity=config.granularity,
    )  # fmt: skip
    assert logged["loss"] == pytest.approx(float(expected.loss.detach()), rel=1e-5, abs=1e-7)
    assert logged["lambda"] == pytest.approx(float(expected.stats["lambda"].mean()), rel=1e-5)
    assert logged["model_mse_w"] == pytest.approx(float(expected.stats["model_mse_w"]), rel=1e-5)

    if model == "sd3":  # and the SD3 step written out with the transformer's own call
        from diffusers.training_utils import compute_density_for_timestep_sampling

        generator = generator_for(config.seed, 3, 0, 0)
        latents = flow.encode_images(pixels, generator)
        pairs = config.train_batch_pairs
        noise = torch.randn((pairs, *latents.shape[1:]), generator=generator)
        u = compute_density_for_timestep_sampling(
            "logit_normal", pairs, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
            generator=generator,
        )  # fmt: skip
        indices = (u * 1000).long()
        sigmas = flow.scheduler.sigmas[indices].view(-1, 1, 1, 1).repeat(2, 1, 1, 1)
        noisy = (1 - sigmas) * latents + sigmas * torch.cat([noise, noise])
        rows = {key: torch.cat([value, value]) for key, value in conditioning.items()}

        def velocity(transformer):
            return transformer(
                hidden_states=noisy,
                timestep=flow.scheduler.timesteps[indices].repeat(2),
                encoder_hidden_states=rows["prompt_embeds"],
                pooled_projections=rows["pooled_projections"],
            ).sample

        with torch.no_grad():
            by_hand = sdpo.preference_loss(
                velocity(models.unet), velocity(models.reference_unet),
                torch.cat([noise, noise]) - latents, beta=config.beta, mu=config.mu,
                granularity="pair",
            )  # fmt: skip
        assert logged["loss"] == pytest.approx(float(by_hand.loss), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("model", ["sd3", "flux", "wan"])
def test_lora_reference_is_the_base_transformer(tmp_path, model):
    config = flow_config(tmp_path, model, "--model", model, "--lora-rank", "4", "--max-steps", "1")
    models = build_models(config, CPU)
    base = {"sd3": families.SD3Family, "flux": families.FluxFamily, "wan": families.WanFamily}
    plain = base[model].build_tiny(16, config.seed).transformer
    names = {
        name.rsplit(".lora_A", 1)[0]
        for name, _ in models.unet.named_parameters()
        if ".lora_A" in name
    }
    suffixes = {
        name.split(".")[-1] if not name.endswith("to_out.0") else "to_out.0" for name in names
    }
    expected = {"to_q", "to_k", "to_v", "to_out.0"}
    if model != "wan":  # the MMDiT text-stream projections
        expected |= {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
    assert expected <= suffixes <= set(FLOW_LORA_TARGETS)
    with torch.no_grad():  # adapters that really change the output
        for name, parameter in models.unet.named_parameters():
            if ".lora_B" in name:
                parameter.normal_(0, 0.1)
    family = models.flow
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(
        4, *((16, 1, 8, 8) if model == "wan" else (16, 8, 8)), generator=generator
    )
    conditioning = family.encode_text(["red", "blue"], CPU)
    lora = families.flow_preference_inputs(
        family, models.unet, None, latents, conditioning, torch.Generator().manual_seed(1),
        models.flow_density,
    )  # fmt: skip
    plain_inputs = families.flow_preference_inputs(
        family, models.unet, plain.eval(), latents, conditioning,
        torch.Generator().manual_seed(1), models.flow_density,
    )  # fmt: skip
    torch.testing.assert_close(lora.ref_pred, plain_inputs.ref_pred, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(lora.model_pred, lora.ref_pred, atol=1e-4)


@pytest.mark.parametrize(
    "flags",
    [
        ("--model", "flux", "--lora-rank", "4", "--learning-rate", "1e-3"),
        # Full fine-tunes with the safeguard on (lambda < 1 on Wan's tiny model).
        ("--model", "sd3", "--learning-rate", "1e-3", "--mu", "0.5"),
        ("--model", "wan", "--learning-rate", "1e-3", "--mu", "0.5"),
    ],
    ids=["flux-lora", "sd3-full", "wan-full-mu"],
)
def test_flow_resume_continues_exactly(tmp_path, flags):
    full = flow_config(tmp_path, "full", *flags, "--max-steps", "4")
    train(full)
    first = flow_config(tmp_path, "resumed", *flags, "--max-steps", "2")
    train(first)
    resumed = flow_config(tmp_path, "resumed", *flags, "--max-steps", "4", "--resume")
    train(resumed)
    full_rows, resumed_rows = read_rows(Path(full.output_dir)), read_rows(Path(resumed.output_dir))
    assert [row["step"] for row in resumed_rows] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "model_mse_w", "lambda"):
        assert [row[key] for row in resumed_rows] == [row[key] for row in full_rows], key
    full_weights = torch.load(Path(full.output_dir) / "transformer.pth")
    resumed_weights = torch.load(Path(resumed.output_dir) / "transformer.pth")
    assert all(torch.equal(full_weights[name], resumed_weights[name]) for name in full_weights)


def test_two_process_torchrun_fsdp_shards_each_transformer_block(tmp_path):
    from sdpo.train.distributed import shard_units

    family = families.FluxFamily.build_tiny(16, 0)
    units = shard_units(family.transformer)
    blocks = len(family.transformer.transformer_blocks)
    assert len(units) == blocks + len(family.transformer.single_transformer_blocks) > blocks
    assert len(shard_units(families.WanFamily.build_tiny(16, 0).transformer)) == 2

    environment = {key: value for key, value in os.environ.items() if not key.startswith("TRITON")}
    outputs = {}
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        output = tmp_path / name
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc_per_node=2", "-m", "sdpo.train", "--model", "sd3", *SMALL]
        command += ["--max-steps", "2", "--output-dir", str(output), *extra]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=600, env=environment, cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = read_rows(output)
        assert (output / "transformer.pth").is_file()
    assert [row["model_mse_w"] for row in outputs["fsdp"]] == pytest.approx(
        [row["model_mse_w"] for row in outputs["ddp"]], rel=1e-4
    )
    # The loss and the gradient norm: within the margin's amplification of fp32 reordering
    # (trainer_helpers.reordering_bound, with the derivation; the same preference_loss).
    beta = config_from_args(["--model", "sd3", *SMALL]).beta
    assert_same_up_to_reordering(outputs["fsdp"], outputs["ddp"], beta)
    ddp = torch.load(tmp_path / "ddp" / "transformer.pth")
    sharded = torch.load(tmp_path / "fsdp" / "transformer.pth")
    for name, tensor in ddp.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["--model", "sd3"], "needs --pretrained PATH"),
        (["--model", "tiny", "--pretrained", "tiny"], "tiny builds tiny flow-matching"),
        (["--preset", "tiny", "--flow-density", "uniform"], "flow_density: applies to flow"),
        (
            ["--model", "sd3", "--pretrained", "tiny", "--logit-std", "0"],
            "logit-std: expected a finite number > 0",
        ),
        (["--model", "flux", "--pretrained", "tiny", "--flow-density", "x"], "unknown 'x'"),
        # docs/flow_matching.md: under w(sigma) only the per-pair lambda keeps the bound.
        (
            [
                "--model",
                "sd3",
                "--pretrained",
                "tiny",
                "--flow-loss-weighting",
                "cosmap",
                "--mu",
                "0.5",
            ],
            "give --granularity pair",
        ),
        # Wan's Conv3d patch embedding crashed in to_channels_last (5-D weight) with a traceback.
        (["--model", "wan", "--pretrained", "tiny", "--channels-last"], "drop --channels-last"),
        (["--model", "flux", "--pretrained", "tiny", "--channels-last"], "for UNets"),
        (
            ["--model", "sd3", "--pretrained", "tiny", "--flow-dynamic-shift"],
            "only FLUX's scheduler shifts by resolution",
        ),
        (["--preset", "tiny", "--flow-dynamic-shift"], "flow_dynamic_shift: applies to flow"),
    ],
)
def test_flow_settings_are_validated_in_one_line(tmp_path, argv, pattern):
    with pytest.raises(UsageError, match=pattern) as error:
        config_from_args([*argv, "--output-dir", str(tmp_path / "out")])
    assert "\n" not in str(error.value)


def test_a_folder_of_another_family_is_refused(tmp_path):
    family = families.SD3Family.build_tiny(16, 0)
    family.pipeline.save_pretrained(tmp_path / "sd3")
    config = flow_config(tmp_path, "out", "--model", "flux", "--max-steps", "1")
    config.pretrained = str(tmp_path / "sd3")
    with pytest.raises(ValueError, match="use --model sd3"):
        build_models(config, CPU)
    config.model = "sd3"  # the right family loads the saved weights
    loaded = build_models(config, CPU)
    saved = family.transformer.state_dict()
    assert all(torch.equal(loaded.unet.state_dict()[name], saved[name]) for name in saved)
    # From a cache the folder's text encoders are not loaded at all.
    without = families.load(str(tmp_path / "sd3"), 16, text_encoders=False)
    assert without.text_encoders() == [] and without.pipeline.text_encoder_3 is None


def test_sdpo_cache_of_a_folder_does_not_load_its_transformer(tmp_path, monkeypatch):
    """The cache runs only the VAE and the text encoders: a folder whose transformer weights are
    gone still caches, and the cache is the one written with the whole pipeline loaded."""
    import shutil

    from safetensors.torch import load_file

    from sdpo.train import cache

    families.FluxFamily.build_tiny(16, 0).pipeline.save_pretrained(tmp_path / "flux")
    settings = dict(data=None, model="flux", resolution=16, seed=0, synthetic_pairs=4)
    settings |= dict(shard_pairs=4, storage_dtype="float32")
    load = cache.load_flow_family
    with monkeypatch.context() as whole:  # the reference: the whole pipeline loaded
        whole.setattr(
            cache, "load_flow_family", lambda *a, **k: load(*a, **{**k, "transformer": True})
        )
        cache.build_cache(
            output_dir=str(tmp_path / "whole"), pretrained=str(tmp_path / "flux"), **settings
        )
    shutil.rmtree(tmp_path / "flux" / "transformer")
    cache.build_cache(
        output_dir=str(tmp_path / "cache"), pretrained=str(tmp_path / "flux"), **settings
    )
    for file in ("empty.safetensors", "shard-00000.safetensors"):
        written = load_file(tmp_path / "cache" / file)
        expected = load_file(tmp_path / "whole" / file)
        assert written.keys() == expected.keys()
        assert all(torch.equal(written[key], expected[key]) for key in expected), file


def test_timestep_weighting_reaches_the_loss_on_the_ddpm_path(tmp_path):
    """EXPERIMENTAL --timestep-weighting importance: the step's loss is preference_loss with the
    TimestepWeighting pair weights of the same predictions, and timesteps come from the range."""
    import contextlib

    from sdpo.timesteps import TimestepWeighting
    from sdpo.train.nvtx_ranges import PhaseRanges
    from sdpo.train.step import family_for, preference_step

    config = config_from_args(
        ["--preset", "tiny", "--output-dir", str(tmp_path / "tw"), "--timestep-weighting",
         "importance", "--timestep-mask-threshold", "0.95", "--timestep-clip", "0.3",
         "--timestep-range", "100:400", "--train-batch-pairs", "4"]
    )  # fmt: skip
    models = build_models(config, CPU)
    torch.manual_seed(0)
    with torch.no_grad():  # a policy away from the reference, so w != 1
        for parameter in models.unet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(8, 4, 8, 8, generator=generator)
    hidden, _ = models.text(["red"] * 4, CPU)
    family = family_for(models, config)
    draws = torch.Generator().manual_seed(5)
    result = preference_step(
        models, models.unet, latents, hidden, None, draws, config, PhaseRanges(False),
        contextlib.nullcontext(), family,
    )  # fmt: skip

    # By hand: the same draws (noise, then timesteps in [100, 400)), both forwards, the weights.
    draws = torch.Generator().manual_seed(5)
    noise = torch.randn(4, 4, 8, 8, generator=draws)
    timesteps = torch.randint(100, 400, (4,), generator=draws)
    rows = torch.cat([timesteps, timesteps])
    noisy = models.scheduler.add_noise(latents, torch.cat([noise, noise]), rows)
    with torch.no_grad():
        model_pred = models.unet(noisy, rows, torch.cat([hidden, hidden])).sample
        ref_pred = models.reference_unet(noisy, rows, torch.cat([hidden, hidden])).sample
    weights = TimestepWeighting("importance", 0.95, 0.3, (100, 400)).pair_weights(
        model_pred, ref_pred, noise, timesteps, models.scheduler.betas
    )
    assert not torch.equal(weights, torch.ones(4))  # the weighting really does something
    settings = dict(beta=config.beta, mu=config.mu, granularity=config.granularity)
    expected = sdpo.preference_loss(model_pred, ref_pred, noise, pair_weights=weights, **settings)
    unweighted = sdpo.preference_loss(model_pred, ref_pred, noise, **settings)
    assert float(result.loss.detach()) == pytest.approx(float(expected.loss), rel=1e-5, abs=1e-7)
    assert float(result.loss.detach()) != pytest.approx(float(unweighted.loss), rel=1e-3)


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["--model", "sd3", "--pretrained", "tiny", "--timestep-weighting", "dpo-cm"],
         "flow-matching models .* use --timestep-weighting none"),
        (["--preset", "tiny", "--timestep-range", "100:400"], "only read with"),
        (["--preset", "tiny", "--timestep-weighting", "dpo-cm", "--timestep-clip", "0.5"],
         "timestep-clip: only read with --timestep-weighting importance"),
        (["--preset", "tiny", "--timestep-weighting", "importance", "--timestep-range", "5:2"],
         "0 <= LOW < HIGH <= 1000"),
    ],
)  # fmt: skip
def test_timestep_weighting_settings_are_checked_in_one_line(tmp_path, argv, pattern):
    with pytest.raises(UsageError, match=pattern) as error:
        config_from_args([*argv, "--output-dir", str(tmp_path / "out")])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("model", ["sd3", "flux", "wan"])
def test_cached_flow_run_reproduces_the_uncached_run_without_text_encoders(tmp_path, model):
    from sdpo.train.cache import build_cache

    index = build_cache(
        data=None, output_dir=str(tmp_path / "cache"), model=model, pretrained="tiny",
        resolution=16, seed=0, synthetic_pairs=8, shard_pairs=3, storage_dtype="float32",
    )  # fmt: skip
    assert index["pairs"] == 8 and index["model"] == model
    flags = ("--model", model, "--max-steps", "3", "--caption-dropout", "0.5")
    uncached = flow_config(tmp_path, "uncached", *flags)
    cached = flow_config(tmp_path, "cached", *flags, "--data", str(tmp_path / "cache"))
    # The cached run loads no text encoder (T5 never resident), only the transformer and VAE.
    cached_models = build_models(cached, CPU)
    assert len(cached_models.text.encoders) == 0
    assert all(getattr(cached_models.flow.pipeline, name, None) is None for name in (
        "text_encoder", "text_encoder_2", "text_encoder_3"))  # fmt: skip
    uncached_rows, cached_rows = train(uncached)["rows"], train(cached)["rows"]
    # As the UNet cache test: the VAE encode of 4 views per pair rounds differently in fp32.
    for key in ("model_mse_w", "model_mse_l", "ref_mse_w"):
        expected = [row[key] for row in uncached_rows]
        assert [row[key] for row in cached_rows] == pytest.approx(expected, rel=1e-5), key
    expected_loss = [row["loss"] for row in uncached_rows]
    assert [row["loss"] for row in cached_rows] == pytest.approx(expected_loss, abs=1e-3)
    other = "flux" if model == "sd3" else "sd3"
    with pytest.raises(ValueError, match=f"built for --model {model}"):
        train(flow_config(tmp_path, "wrong", "--model", other, "--data", str(tmp_path / "cache")))


def test_overwrite_removes_the_replaced_runs_exports_and_the_banner_names_them(tmp_path, caplog):
    """A LoRA run replaced by a full fine-tune with --overwrite: its transformer_lora/ must go (an
    `sdpo-eval generate --lora` on the folder would apply the old run's adapters), and the start
    banner names the transformer exports, not unet/."""
    lora = flow_config(tmp_path, "run", "--model", "flux", "--lora-rank", "4", "--max-steps", "1")
    with caplog.at_level("INFO", logger="sdpo.train"):
        train(lora)
    output = Path(lora.output_dir)
    assert (output / "transformer_lora").is_dir()
    assert "checkpoints, transformer/, transformer_lora/;" in caplog.text
    assert "unet/" not in caplog.text
    caplog.clear()
    full = flow_config(tmp_path, "run", "--model", "flux", "--max-steps", "1", overwrite=True)
    with caplog.at_level("INFO", logger="sdpo.train"):
        train(full)
    assert not (output / "transformer_lora").exists()
    assert (output / "transformer.pth").is_file() and (output / "transformer").is_dir()
    assert "checkpoints, transformer/;" in caplog.text


def test_flux_dynamic_shift_reads_the_packed_token_count(tmp_path, monkeypatch):
    # The pipeline shifts by the token count of its packed latents (2 x 2 patches): the trainer
    # must pass that count, computed here by diffusers' own FluxPipeline._pack_latents.
    from diffusers import FluxPipeline

    from sdpo.train import flow_matching

    seen: dict[str, list] = {"latents": [], "tokens": []}
    real_count = families.FluxFamily.image_seq_len
    real_mu = flow_matching.dynamic_shift_mu

    def count(self, latents):
        seen["latents"].append(tuple(latents.shape))
        return real_count(self, latents)

    def mu(scheduler, image_seq_len):
        seen["tokens"].append(image_seq_len)
        return real_mu(scheduler, image_seq_len)

    monkeypatch.setattr(families.FluxFamily, "image_seq_len", count)
    monkeypatch.setattr(flow_matching, "dynamic_shift_mu", mu)
    for resolution in (16, 32):
        config = flow_config(
            tmp_path, f"flux-{resolution}", "--model", "flux", "--max-steps", "1",
            "--flow-dynamic-shift", resolution=resolution,
        )  # fmt: skip
        train(config)
    assert len(seen["tokens"]) >= 2 and len(seen["latents"]) == len(seen["tokens"])
    for shape, tokens in zip(seen["latents"], seen["tokens"], strict=True):
        rows, channels, height, width = shape
        packed = FluxPipeline._pack_latents(torch.zeros(shape), rows, channels, height, width)
        assert tokens == packed.shape[1], (shape, tokens)
    assert len(set(seen["tokens"])) == 2  # 4x the tokens at twice the resolution


@pytest.mark.parametrize("guidance", [None, 1.0])
def test_flux_guidance_reaches_the_guidance_embedding(tmp_path, monkeypatch, guidance):
    # The transformer's guidance input is --flux-guidance (default 3.5, FluxPipeline's own
    # inference default); the flux preset drops no caption (a guidance-distilled model).
    from diffusers import FluxTransformer2DModel

    seen = []
    real_forward = FluxTransformer2DModel.forward

    def forward(self, *args, guidance=None, **kwargs):
        seen.append(None if guidance is None else guidance.unique().tolist())
        return real_forward(self, *args, guidance=guidance, **kwargs)

    monkeypatch.setattr(FluxTransformer2DModel, "forward", forward)
    flags = ["--model", "flux", "--max-steps", "1"]
    if guidance is not None:
        flags += ["--flux-guidance", str(guidance)]
    train(flow_config(tmp_path, "flux", *flags))
    assert seen and all(values == [3.5 if guidance is None else guidance] for values in seen)
    assert PRESETS["flux-dpo-lora"]["caption_dropout"] == 0.0


def test_flux_guidance_is_refused_for_other_models(tmp_path):
    with pytest.raises(UsageError, match=r"flux_guidance: only FLUX\.1-dev"):
        flow_config(tmp_path, "sd3", "--model", "sd3", "--flux-guidance", "1")
