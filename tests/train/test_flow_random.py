"""``--pretrained random`` for the flow families: the released architectures built on the meta
device (parameter counts, no memory), the architecture each preset picks, and the trainer end to
end on the same code path with the tables shrunk (the real sizes need 20-70 GB)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdpo.train import families
from sdpo.train.config import (
    FLOW_RANDOM_ARCHITECTURES,
    PRESET_RANDOM_ARCHITECTURES,
    config_from_args,
    random_flow_architecture,
)
from sdpo.train.errors import UsageError
from sdpo.train.models import build_models, load_flow_family
from sdpo.train.trainer import train

CPU = torch.device("cpu")


def count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


# Exact counts of the meta builds (diffusers 0.42 / transformers 4.x), each next to the figure its
# publisher states: CLIP ViT-L/14 text 123M, OpenCLIP bigG/14 text 695M (SDXL's text_encoder_2),
# T5 v1.1 XXL encoder 4.7B (SD3 paper, arXiv 2403.03206), umT5-XXL encoder 5.7B (Wan's
# umt5-xxl-enc-bf16.pth: 11.4 GB at 2 bytes), SD3/FLUX VAE 84M, Wan 2.1 VAE 127M (Wan2.1_VAE.pth:
# 508 MB at 4 bytes). A wrong width, depth, vocabulary or quant-conv flag moves these.
TEXT_ENCODER_PARAMETERS = {
    "clip-l": 123_650_304,
    "clip-l-unprojected": 123_060_480,
    "clip-g": 694_659_840,
    "t5-xxl": 4_762_310_656,
    "umt5-xxl": 5_680_910_336,
}
VAE_PARAMETERS = {"sd3": 83_819_683, "flux": 83_819_683, "wan2.1": 126_892_531}
# The transformers' counts are checked in test_flow_matching.py; these are the pipelines' sums.
PIPELINE_PARAMETERS = {
    # transformer + VAE + CLIP-L + CLIP-G + T5-XXL
    "sd3.5-medium": 2_243_171_520 + 83_819_683 + 123_650_304 + 694_659_840 + 4_762_310_656,
    "sd3.5-large": 8_056_627_520 + 83_819_683 + 123_650_304 + 694_659_840 + 4_762_310_656,
    # transformer + VAE + CLIP-L (no projection) + T5-XXL
    "flux.1-dev": 11_901_408_320 + 83_819_683 + 123_060_480 + 4_762_310_656,
    # transformer + Wan VAE + umT5-XXL
    "wan2.1-t2v-1.3b": 1_418_996_800 + 126_892_531 + 5_680_910_336,
}


@pytest.mark.parametrize(("name", "parameters"), sorted(TEXT_ENCODER_PARAMETERS.items()))
def test_published_text_encoders_have_their_parameter_counts(name, parameters):
    with torch.device("meta"):
        encoder = families.build_published_text_encoder(name)
    assert count(encoder) == parameters
    stated = {"clip-l": 123e6, "clip-l-unprojected": 123e6, "clip-g": 695e6}
    stated |= {"t5-xxl": 4.7e9, "umt5-xxl": 5.7e9}
    assert count(encoder) == pytest.approx(stated[name], rel=0.015)


@pytest.mark.parametrize(("name", "parameters"), sorted(VAE_PARAMETERS.items()))
def test_published_vaes_have_their_parameter_counts(name, parameters):
    with torch.device("meta"):
        vae = families.build_published_vae(name)
    assert count(vae) == parameters
    latent_channels = vae.config.get("latent_channels") or vae.config.get("z_dim")
    assert latent_channels == 16


@pytest.mark.parametrize("architecture", sorted(PIPELINE_PARAMETERS))
def test_random_pipelines_are_the_released_ones_on_the_meta_device(architecture):
    resolution = 480 if architecture.startswith("wan") else 1024
    with torch.device("meta"):
        flow = families.build_random(architecture, resolution, seed=0)
    parts = [flow.transformer, flow.vae, *flow.text_encoders()]
    assert sum(count(part) for part in parts) == PIPELINE_PARAMETERS[architecture]
    spec = families.PUBLISHED_PIPELINES[architecture]
    assert flow.name == spec.family
    assert len(flow.text_encoders()) == len(spec.text_encoders)
    if flow.name != "wan":
        # The published latent constants the cache and the step normalise with.
        shift, scale = {"sd3": (0.0609, 1.5305), "flux": (0.1159, 0.3611)}[flow.name]
        assert (flow.vae.config.shift_factor, flow.vae.config.scaling_factor) == (shift, scale)
    assert flow.scheduler.config.shift == 3.0


def test_random_without_text_encoders_builds_none():
    # Training from a cache: T5-XXL's 4.8B parameters are never built.
    with torch.device("meta"):
        flow = families.build_random("flux.1-dev", 1024, seed=0, text_encoders=False)
    assert flow.text_encoders() == []
    assert count(flow.transformer) == 11_901_408_320


def test_unknown_random_architecture_is_refused():
    with pytest.raises(ValueError, match=r"random:sd3\.5-medium"):
        families.build_random("sd3.5-turbo", 1024, seed=0)


def test_each_flow_preset_names_its_random_architecture():
    for preset, architecture in PRESET_RANDOM_ARCHITECTURES.items():
        config = config_from_args(["--preset", preset, "--pretrained", "random"])
        assert random_flow_architecture(config) == architecture
        # The config's table and the builders' agree on the family of every name.
        family = families.PUBLISHED_PIPELINES[architecture].family
        assert architecture in FLOW_RANDOM_ARCHITECTURES[config.model]
        assert family == config.model
    for model, names in FLOW_RANDOM_ARCHITECTURES.items():
        assert {families.PUBLISHED_PIPELINES[name].family for name in names} == {model}
    assert sorted(n for names in FLOW_RANDOM_ARCHITECTURES.values() for n in names) == sorted(
        families.PUBLISHED_PIPELINES
    )


def test_random_architecture_choices_and_errors():
    explicit = config_from_args(["--preset", "sd35m-dpo", "--pretrained", "random:sd3.5-large"])
    assert random_flow_architecture(explicit) == "sd3.5-large"
    flux = config_from_args(["--model", "flux", "--pretrained", "random"])
    assert random_flow_architecture(flux) == "flux.1-dev"
    with pytest.raises(UsageError, match=r"ambiguous for sd3.*random:sd3\.5-medium or random:sd3"):
        config_from_args(["--model", "sd3", "--pretrained", "random"])
    with pytest.raises(UsageError, match=r"not a flux architecture; expected random:flux\.1-dev"):
        config_from_args(["--model", "flux", "--pretrained", "random:sd3.5-large"])
    with pytest.raises(UsageError, match="sd15 takes --pretrained random"):
        config_from_args(["--model", "sd15", "--pretrained", "random:flux.1-dev"])
    # Checked before anything is built (FLUX.1-dev would be 48 GB here).
    with pytest.raises(ValueError, match="not sd3"):
        load_flow_family("sd3", "random", 64, 0, False, random_architecture="flux.1-dev")
    # Callers without a config (sdpo-cache) get the same resolution and errors.
    with pytest.raises(UsageError, match="ambiguous for sd3"):
        load_flow_family("sd3", "random", 64, 0, False)
    with pytest.raises(UsageError, match="not a wan architecture"):
        load_flow_family("wan", "random:flux.1-dev", 64, 0, False)


# --- end to end on the real code path, with the tables shrunk -------------------------------
def shrunk_tables(monkeypatch) -> None:
    """Every released entry with the same keys and tiny sizes (16 px images). Medium keeps two
    layers with dual attention, Large one without, so the test sees which one was built."""
    transformers = dict(families.PUBLISHED_TRANSFORMERS)
    sd3_small = {
        "sample_size": 8,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "caption_projection_dim": 16,
        "joint_attention_dim": 32,  # the shrunk T5 width
        "pooled_projection_dim": 32,  # shrunk CLIP-L + CLIP-G projections
        "pos_embed_max_size": 8,
    }
    medium = {**transformers["sd3.5-medium"][1], **sd3_small}
    transformers["sd3.5-medium"] = ("SD3Transformer2DModel", medium | {"num_layers": 2})
    large = {**transformers["sd3.5-large"][1], **sd3_small}
    transformers["sd3.5-large"] = ("SD3Transformer2DModel", large | {"num_layers": 1})
    transformers["flux.1-dev"] = (
        "FluxTransformer2DModel",
        {
            **transformers["flux.1-dev"][1],
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "pooled_projection_dim": 16,
            "axes_dims_rope": (4, 6, 6),
        },
    )
    transformers["wan2.1-t2v-1.3b"] = (
        "WanTransformer3DModel",
        {
            **transformers["wan2.1-t2v-1.3b"][1],
            "num_layers": 1,
            "num_attention_heads": 2,
            "attention_head_dim": 12,
            "ffn_dim": 32,
            "text_dim": 32,
            "rope_max_seq_len": 32,
        },
    )
    clip = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    clip |= {"num_attention_heads": 2, "projection_dim": 16}
    xxl = {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 1}
    encoders = {
        name: (model, config_class, {**config, **(clip if "clip" in name else xxl)})
        for name, (model, config_class, config) in families.PUBLISHED_TEXT_ENCODERS.items()
    }
    kl = {"block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 4}
    kl |= {"down_block_types": ("DownEncoderBlock2D",) * 2}
    kl |= {"up_block_types": ("UpDecoderBlock2D",) * 2}
    vaes = {
        "sd3": ("AutoencoderKL", {**families.PUBLISHED_VAES["sd3"][1], **kl}),
        "flux": ("AutoencoderKL", {**families.PUBLISHED_VAES["flux"][1], **kl}),
        "wan2.1": (
            "AutoencoderKLWan",
            {**families.PUBLISHED_VAES["wan2.1"][1], "base_dim": 3, "dim_mult": [1, 1, 1, 1]},
        ),
    }
    monkeypatch.setattr(families, "PUBLISHED_TRANSFORMERS", transformers)
    monkeypatch.setattr(families, "PUBLISHED_TEXT_ENCODERS", encoders)
    monkeypatch.setattr(families, "PUBLISHED_VAES", vaes)


@pytest.mark.parametrize(
    ("preset", "layers"),
    [("sd35m-dpo", 2), ("sd35l-dpo-lora", 1), ("flux-dpo-lora", 1), ("wan-dpo-lora", 1)],
)
def test_random_flow_presets_train_end_to_end(tmp_path, monkeypatch, preset, layers):
    shrunk_tables(monkeypatch)
    resolution = "32" if preset.startswith("wan") else "16"  # Wan's VAE divides by 8
    flags = ["--preset", preset, "--pretrained", "random", "--resolution", resolution]
    flags += ["--train-batch-pairs", "2", "--gradient-accumulation", "1"]
    flags += ["--synthetic-pairs", "4", "--warmup-steps", "0", "--no-progress"]
    flags += ["--max-steps", "2", "--output-dir", str(tmp_path / preset)]
    config = config_from_args(flags)
    models = build_models(config, CPU)
    built = families.build_published_transformer(PRESET_RANDOM_ARCHITECTURES[preset])
    assert models.flow.transformer.config.num_layers == built.config.num_layers == layers
    assert len(models.text.encoders) == len(
        families.PUBLISHED_PIPELINES[PRESET_RANDOM_ARCHITECTURES[preset]].text_encoders
    )
    rows = train(config)["rows"]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    assert Path(config.output_dir, "transformer.pth").is_file()


def test_random_seed_decides_the_weights(monkeypatch):
    shrunk_tables(monkeypatch)
    first = families.build_random("flux.1-dev", 16, seed=1)
    again = families.build_random("flux.1-dev", 16, seed=1)
    other = families.build_random("flux.1-dev", 16, seed=2)
    name, weight = next(iter(first.transformer.state_dict().items()))
    assert torch.equal(weight, again.transformer.state_dict()[name])
    assert not torch.equal(weight, other.transformer.state_dict()[name])


def test_a_random_build_that_cannot_fit_is_refused_before_allocating(monkeypatch):
    # Wan 2.1 1.3B with umT5-XXL: ~29 GB of fp32 weights, more than the 24 GB CI machine has;
    # the OOM killer would end the process with no message. Refused from the meta-device count.
    needed = families.random_build_bytes("wan2.1-t2v-1.3b")
    without_encoders = families.random_build_bytes("wan2.1-t2v-1.3b", text_encoders=False)
    assert 25 * 2**30 < needed < 32 * 2**30
    assert 5 * 2**30 < without_encoders < 7 * 2**30  # 1.4B transformer + VAE: fits without T5
    monkeypatch.setattr(families, "available_memory_bytes", lambda device: 8 * 2**30)
    monkeypatch.setattr(families, "random_build_bytes", lambda *arguments: needed)
    built = []
    monkeypatch.setattr(families, "build_published_transformer", lambda *a: built.append(a))
    pattern = r"random:wan2.1-t2v-1.3b needs 2\d\.\d GiB .* 8\.0 GiB free; train from an sdpo-cache"
    with pytest.raises(UsageError, match=pattern):
        families.build_random("wan2.1-t2v-1.3b", 16, 0)
    assert built == []


def state_dicts_equal(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    one, two = first.state_dict(), second.state_dict()
    return one.keys() == two.keys() and all(torch.equal(one[key], two[key]) for key in one)


def test_each_random_part_is_the_same_whichever_others_are_built(monkeypatch):
    # A cached run builds no text encoders, sdpo-cache no transformer: the parts they do build
    # are the uncached run's, so a cache of random:NAME feeds the run that trains it.
    shrunk_tables(monkeypatch)
    full = families.build_random("sd3.5-medium", 16, seed=5)
    no_encoders = families.build_random("sd3.5-medium", 16, seed=5, text_encoders=False)
    no_transformer = families.build_random("sd3.5-medium", 16, seed=5, transformer=False)
    assert no_transformer.transformer is None and no_encoders.text_encoders() == []
    assert state_dicts_equal(full.transformer, no_encoders.transformer)
    for partial in (no_encoders, no_transformer):
        assert state_dicts_equal(full.vae, partial.vae)
    assert len(full.text_encoders()) == len(no_transformer.text_encoders()) == 3
    for built, again in zip(full.text_encoders(), no_transformer.text_encoders(), strict=True):
        assert state_dicts_equal(built, again)
    # Distinct seeds per part: the two CLIP encoders do not start from the same draws.
    clip_l, clip_g = (encoder.state_dict() for encoder in full.text_encoders()[:2])
    name = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(clip_l[name].flatten()[:16], clip_g[name].flatten()[:16])


@pytest.mark.parametrize(
    ("model", "architecture", "resolution"),
    [("sd3", "sd3.5-medium", 16), ("flux", "flux.1-dev", 16), ("wan", "wan2.1-t2v-1.3b", 32)],
)
def test_sdpo_cache_of_a_random_model_builds_no_transformer(
    tmp_path, monkeypatch, model, architecture, resolution
):
    """The cache runs only the VAE and the text encoders: it is written without building the
    transformer, and holds exactly what the whole pipeline's VAE and encoders give."""
    from safetensors.torch import load_file

    from sdpo.train import cache

    shrunk_tables(monkeypatch)

    def build(name: str) -> dict:
        return cache.build_cache(
            data=None, output_dir=str(tmp_path / name), model=model,
            pretrained=f"random:{architecture}", resolution=resolution, seed=3,
            synthetic_pairs=5, shard_pairs=3, storage_dtype="float32",
        )  # fmt: skip

    load = cache.load_flow_family
    with monkeypatch.context() as whole:  # the reference: the whole pipeline built
        whole.setattr(
            cache, "load_flow_family", lambda *a, **k: load(*a, **{**k, "transformer": True})
        )
        expected = build("whole")

    def refuse(name: str) -> None:
        raise AssertionError(f"sdpo-cache built the {name} transformer")

    monkeypatch.setattr(families, "build_published_transformer", refuse)
    index = build("cache")
    assert index == expected and index["pairs"] == 5
    files = sorted(path.name for path in (tmp_path / "whole").glob("*.safetensors"))
    assert files == sorted(path.name for path in (tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 3  # empty.safetensors and two shards
    for file in files:
        written, reference = (
            load_file(tmp_path / "cache" / file),
            load_file(tmp_path / "whole" / file),
        )
        assert written.keys() == reference.keys()
        for key in reference:
            assert torch.equal(written[key], reference[key]), (file, key)
