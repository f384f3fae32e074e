"""Flow-matching families: the math against diffusers' own scheduler, training utilities and
pipeline helpers, the whole step against a by-hand computation, LoRA reference, loading."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

import sdpo
from sdpo.train import families, flow_matching
from sdpo.train.flow_matching import FlowDensity

CPU = torch.device("cpu")
CAPTIONS = ["a red circle on a blue background", "a green square"]
# (family, resolution, pixel shape of one sample)
CASES = {
    "sd3": (families.SD3Family, 16, (3, 16, 16)),
    "flux": (families.FluxFamily, 16, (3, 16, 16)),
    "wan": (families.WanFamily, 32, (3, 5, 32, 32)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    family_class, resolution, pixel_shape = CASES[request.param]
    family = family_class.build_tiny(resolution, seed=0)
    generator = torch.Generator().manual_seed(1)
    pixels = torch.rand(2 * len(CAPTIONS), *pixel_shape, generator=generator) * 2 - 1
    latents = family.encode_images(pixels, generator)
    conditioning = family.encode_text(CAPTIONS, CPU)
    return family, latents, conditioning


def script_sigmas(scheduler, density: FlowDensity, batch: int, generator):
    """The SD3/FLUX DreamBooth scripts' draw: u, indices, timesteps, then get_sigmas' lookup."""
    u = compute_density_for_timestep_sampling(
        weighting_scheme="none" if density.density == "uniform" else density.density,
        batch_size=batch,
        logit_mean=density.logit_mean,
        logit_std=density.logit_std,
        mode_scale=density.mode_scale,
        generator=generator,
    )
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    return scheduler.sigmas[step_indices].flatten(), timesteps


@pytest.mark.parametrize("density_name", ["logit_normal", "mode", "uniform"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sigma_sampling_matches_the_training_scripts(density_name, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    density = FlowDensity(density=density_name, logit_mean=0.3, logit_std=1.2)
    sigmas, timesteps = flow_matching.sample_pair_sigmas(
        scheduler, 64, density, torch.Generator().manual_seed(5), CPU
    )
    expected_sigmas, expected_timesteps = script_sigmas(
        scheduler, density, 64, torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(sigmas, expected_sigmas, rtol=0, atol=0)
    torch.testing.assert_close(timesteps, expected_timesteps, rtol=0, atol=0)
    assert sigmas.unique().numel() > 32  # really random draws


def test_dynamic_shift_matches_the_pipelines_set_timesteps():
    from diffusers import FlowMatchEulerDiscreteScheduler

    family = families.FluxFamily.build_tiny(16, seed=0)
    scheduler = family.scheduler
    assert scheduler.config.use_dynamic_shifting
    image_seq_len = 1024  # a 512 px FLUX image: 64 x 64 latents, 32 x 32 tokens
    unshifted, _ = flow_matching.sample_pair_sigmas(
        scheduler, 16, FlowDensity(), torch.Generator().manual_seed(2), CPU
    )
    shifted, timesteps = flow_matching.sample_pair_sigmas(
        scheduler,
        16,
        FlowDensity(dynamic_shift=True),
        torch.Generator().manual_seed(2),
        CPU,
        image_seq_len=image_seq_len,
    )
    # The pipeline's way: calculate_shift on its config, then set_timesteps(sigmas=..., mu=...).
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = scheduler.config
    mu = calculate_shift(
        image_seq_len,
        config.base_image_seq_len,
        config.max_image_seq_len,
        config.base_shift,
        config.max_shift,
    )
    oracle = FlowMatchEulerDiscreteScheduler.from_config(config)
    oracle.set_timesteps(sigmas=unshifted.numpy().astype(np.float32), mu=mu)
    torch.testing.assert_close(shifted, oracle.sigmas[:-1].float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(timesteps, oracle.timesteps.float(), rtol=1e-6, atol=1e-4)
    assert (shifted > unshifted).all()  # mu > 0 at 1024 tokens pushes toward noise


def test_dynamic_shift_refuses_a_statically_shifted_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    with pytest.raises(ValueError, match="dynamic_shift"):
        flow_matching.sample_pair_sigmas(
            scheduler, 2, FlowDensity(dynamic_shift=True), None, CPU, 64
        )


def test_noising_and_target_follow_the_schedulers_conventions():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 16, 4, 4, generator=generator)
    noise = torch.randn(3, 16, 4, 4, generator=generator)
    sigmas, timesteps = flow_matching.sample_pair_sigmas(
        scheduler, 3, FlowDensity(), generator, CPU
    )
    noisy = flow_matching.noisy_latents(latents, noise, sigmas)
    expected = scheduler.scale_noise(latents, timesteps.repeat(2), noise.repeat(2, 1, 1, 1))
    torch.testing.assert_close(noisy, expected)
    target = flow_matching.velocity_target(latents, noise)
    torch.testing.assert_close(target, noise.repeat(2, 1, 1, 1) - latents)
    # The velocity is d x_t / d sigma: moving sigma by h moves x_t by h * target.
    step = 1e-3
    moved = flow_matching.noisy_latents(latents, noise, sigmas + step)
    torch.testing.assert_close((moved - noisy) / step, target, rtol=1e-3, atol=1e-3)


def test_noising_rejects_unshared_shapes():
    latents = torch.zeros(4, 2, 2, 2)
    with pytest.raises(ValueError, match="noise"):
        flow_matching.noisy_latents(latents, torch.zeros(4, 2, 2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="sigmas"):
        flow_matching.noisy_latents(latents, torch.zeros(2, 2, 2, 2), torch.zeros(4))


def test_density_settings_are_validated():
    with pytest.raises(ValueError, match="density"):
        FlowDensity(density="lognormal")
    with pytest.raises(ValueError, match="loss_weighting"):
        FlowDensity(loss_weighting="snr")
    with pytest.raises(ValueError, match="logit_std"):
        FlowDensity(logit_std=0.0)
    with pytest.raises(ValueError, match="mode_scale"):
        FlowDensity(mode_scale=float("nan"))


class Recorder(torch.nn.Module):
    """Wraps a transformer and keeps the keyword inputs of each call."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = []

    @property
    def dtype(self):
        return self.model.dtype

    @property
    def config(self):
        return self.model.config

    def forward(self, **kwargs):
        self.calls.append(kwargs)
        return self.model(**kwargs)


def test_winner_and_loser_share_noise_and_sigma(case):
    family, latents, conditioning = case
    recorder = Recorder(family.transformer)
    inputs = families.flow_preference_inputs(
        family,
        recorder,
        recorder,
        latents,
        conditioning,
        torch.Generator().manual_seed(3),
        FlowDensity(),
    )
    pairs = latents.shape[0] // 2
    call = recorder.calls[0]
    timestep = call["timestep"]
    torch.testing.assert_close(timestep[:pairs], timestep[pairs:], rtol=0, atol=0)
    noisy = call["hidden_states"]
    if family.name == "flux":
        noisy = families.FluxFamily.unpack(noisy, *latents.shape[-2:])
    sigma = inputs.sigmas.view(-1, *([1] * (latents.dim() - 1))).repeat(
        2, *([1] * (latents.dim() - 1))
    )
    recovered_noise = (noisy - (1 - sigma) * latents) / sigma
    torch.testing.assert_close(
        recovered_noise[:pairs], recovered_noise[pairs:], rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(recovered_noise[:pairs], inputs.noise, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(inputs.target[:pairs], inputs.target[pairs:])  # x_0 differ per row


def by_hand_predictions(family, model, latents, conditioning, seed):
    """The DreamBooth scripts' step written out with diffusers' own helpers."""
    from diffusers import FluxPipeline

    generator = torch.Generator().manual_seed(seed)
    pairs = latents.shape[0] // 2
    noise = torch.randn((pairs, *latents.shape[1:]), generator=generator)
    sigmas, timesteps = script_sigmas(family.scheduler, FlowDensity(), pairs, generator)
    noise_rows = noise.repeat(2, *([1] * (noise.dim() - 1)))
    sigma_rows = sigmas.repeat(2).view(-1, *([1] * (latents.dim() - 1)))
    noisy = (1.0 - sigma_rows) * latents + sigma_rows * noise_rows
    target = noise_rows - latents
    rows = {key: value.repeat(2, *([1] * (value.dim() - 1))) for key, value in conditioning.items()}
    timestep_rows = timesteps.repeat(2)
    if family.name == "sd3":
        pred = model(
            hidden_states=noisy,
            timestep=timestep_rows,
            encoder_hidden_states=rows["prompt_embeds"],
            pooled_projections=rows["pooled_projections"],
            return_dict=False,
        )[0]
    elif family.name == "wan":
        pred = model(
            hidden_states=noisy,
            timestep=timestep_rows,
            encoder_hidden_states=rows["prompt_embeds"],
            return_dict=False,
        )[0]
    else:
        count, channels, height, width = noisy.shape
        scale = 2 ** (len(family.vae.config.block_out_channels) - 1)
        packed = FluxPipeline._pack_latents(noisy, count, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(
            count, height // 2, width // 2, CPU, noisy.dtype
        )
        text_ids = torch.zeros(rows["prompt_embeds"].shape[1], 3)
        pred = model(
            hidden_states=packed,
            timestep=timestep_rows / 1000,
            guidance=torch.tensor([3.5]).expand(count),
            pooled_projections=rows["pooled_projections"],
            encoder_hidden_states=rows["prompt_embeds"],
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        pred = FluxPipeline._unpack_latents(pred, height * scale, width * scale, scale)
    return pred, target


def test_step_equals_preference_loss_on_the_same_draws_by_hand(case):
    family, latents, conditioning = case
    torch.manual_seed(0)
    policy = copy.deepcopy(family.transformer)
    with torch.no_grad():  # a policy that differs from the reference
        for parameter in policy.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    reference = families.make_reference(family.transformer)
    inputs = families.flow_preference_inputs(
        family,
        policy,
        reference,
        latents,
        conditioning,
        torch.Generator().manual_seed(7),
        FlowDensity(),
    )
    model_pred, target = by_hand_predictions(family, policy, latents, conditioning, seed=7)
    with torch.no_grad():
        ref_pred, _ = by_hand_predictions(family, reference, latents, conditioning, seed=7)
    torch.testing.assert_close(inputs.model_pred, model_pred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inputs.ref_pred, ref_pred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inputs.target, target, rtol=0, atol=0)
    settings = dict(
        method="diffusion-dpo", beta=5000.0, mu=0.9, granularity="pair", backend="torch"
    )
    ours = sdpo.preference_loss(inputs.model_pred, inputs.ref_pred, inputs.target, **settings)
    expected = sdpo.preference_loss(model_pred, ref_pred, target, **settings)
    torch.testing.assert_close(ours.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert ours.stats["margin"].abs() > 0  # policy and reference really differ
    ours.loss.backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all()
        for p in policy.parameters()
        if p.requires_grad
    )


def test_flux_packing_and_ids_match_the_pipelines_helpers():
    from diffusers import FluxPipeline

    latents = torch.randn(3, 16, 6, 8)
    packed = families.FluxFamily.pack(latents)
    torch.testing.assert_close(
        packed, FluxPipeline._pack_latents(latents, 3, 16, 6, 8), rtol=0, atol=0
    )
    torch.testing.assert_close(families.FluxFamily.unpack(packed, 6, 8), latents, rtol=0, atol=0)
    # The pipeline unpacks from pixel sizes: 8 x latent with FLUX's VAE.
    torch.testing.assert_close(
        FluxPipeline._unpack_latents(packed, 48, 64, 8), latents, rtol=0, atol=0
    )
    torch.testing.assert_close(
        families.FluxFamily.image_ids(6, 8, CPU, torch.float32),
        FluxPipeline._prepare_latent_image_ids(3, 3, 4, CPU, torch.float32),
        rtol=0,
        atol=0,
    )


def test_lora_reference_equals_the_base_model():
    from peft import LoraConfig

    family = families.SD3Family.build_tiny(16, seed=0)
    base = copy.deepcopy(family.transformer)
    policy = family.transformer
    policy.requires_grad_(False)
    policy.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"]
        )
    )
    with torch.no_grad():  # peft's "gaussian" init zeroes lora_B: move it off the base model
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    generator = torch.Generator().manual_seed(0)
    latents = family.encode_images(torch.rand(4, 3, 16, 16) * 2 - 1, generator)
    conditioning = family.encode_text(CAPTIONS, CPU)
    inputs = families.flow_preference_inputs(
        family, policy, None, latents, conditioning, torch.Generator().manual_seed(4), FlowDensity()
    )
    sigma_rows = inputs.sigmas.repeat(2)
    noisy = flow_matching.noisy_latents(latents, inputs.noise, inputs.sigmas)
    rows = {k: flow_matching.repeat_pairs(v) for k, v in conditioning.items()}
    with torch.no_grad():
        base_pred = family.prediction(base, noisy, sigma_rows, rows)
    torch.testing.assert_close(inputs.ref_pred, base_pred, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(inputs.model_pred, inputs.ref_pred, atol=1e-4)
    # Adapters are back on after the reference forward.
    with torch.no_grad():
        again = family.prediction(policy, noisy, sigma_rows, rows)
    torch.testing.assert_close(again, inputs.model_pred.detach())


def test_loss_weighting_scales_the_margin_and_keeps_pair_lambda():
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(2, 4, 3, 3, generator=generator)
    ref_pred = torch.randn(2, 4, 3, 3, generator=generator)
    # Correlated winner and loser errors (S_wl > 0) so that lambda < 1.
    error = torch.randn(1, 4, 3, 3, generator=generator)
    model_pred = target + torch.cat([error, error + 0.1 * torch.randn_like(error)])
    sigmas = torch.tensor([0.3])
    weight = flow_matching.loss_weights(sigmas, "cosmap")
    torch.testing.assert_close(weight, 2 / (torch.pi * (1 - 2 * sigmas + 2 * sigmas**2)))
    settings = dict(beta=10.0, mu=0.5, granularity="pair", backend="torch")
    plain = sdpo.preference_loss(model_pred, ref_pred, target, **settings)
    weighted = sdpo.preference_loss(
        *flow_matching.apply_pair_weights_inside_margin(model_pred, ref_pred, target, weight),
        **settings,
    )
    torch.testing.assert_close(weighted.stats["margin"], weight[0] * plain.stats["margin"])
    torch.testing.assert_close(weighted.stats["lambda"], plain.stats["lambda"])
    assert weighted.stats["lambda"].item() < 1  # the safeguard is active in this draw


def test_load_reads_a_saved_pipeline_and_dispatches_on_model_index(case, tmp_path):
    family, latents, conditioning = case
    family.pipeline.save_pretrained(tmp_path)
    loaded = families.load(
        str(tmp_path), family.resolution, max_sequence_length=family.max_sequence_length
    )
    assert type(loaded) is type(family)
    assert loaded.scheduler.config.shift == family.scheduler.config.shift
    torch.testing.assert_close(loaded.encode_text(CAPTIONS, CPU), conditioning)
    sigmas = torch.tensor([0.25, 0.75])
    noisy = flow_matching.noisy_latents(latents, torch.zeros_like(latents[:2]), sigmas)
    rows = {k: flow_matching.repeat_pairs(v) for k, v in conditioning.items()}
    with torch.no_grad():
        expected = family.prediction(family.transformer, noisy, sigmas.repeat(2), rows)
        got = loaded.prediction(loaded.transformer, noisy, sigmas.repeat(2), rows)
    torch.testing.assert_close(got, expected)


def test_load_rejects_an_unsupported_pipeline_in_one_line(tmp_path):
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline"})
    )
    with pytest.raises(
        ValueError, match=r"StableDiffusionPipeline.*supported: StableDiffusion3Pipeline"
    ) as error:
        families.load(str(tmp_path), 16)
    assert "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError, match=r"model_index\.json"):
        families.family_class_for(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        families.load(str(tmp_path / "nowhere"), 16)


def test_encode_images_applies_the_vae_shift_and_scale():
    family = families.SD3Family.build_tiny(16, seed=0)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = family.encode_images(pixels, torch.Generator().manual_seed(9))
    with torch.no_grad():
        distribution = family.vae.encode(pixels).latent_dist
    sample = distribution.mean + distribution.std * torch.randn(
        distribution.mean.shape, generator=torch.Generator().manual_seed(9)
    )
    config = family.vae.config
    torch.testing.assert_close(latents, (sample - config.shift_factor) * config.scaling_factor)


def test_wan_latents_invert_the_pipelines_denormalisation():
    family = families.WanFamily.build_tiny(32, seed=0)
    sample = torch.randn(1, 16, 2, 4, 4)
    latents = family.normalize_latents(sample)
    config = family.vae.config
    # WanPipeline before decoding: latents / (1 / std) + mean.
    mean = torch.tensor(config.latents_mean).view(1, 16, 1, 1, 1)
    inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(latents / inverse_std + mean, sample)
    assert family.scheduler.config.shift == 3.0  # the shipped UniPC scheduler's flow_shift


def test_wan_latent_statistics_are_built_once_per_device_and_dtype(monkeypatch):
    """The per-channel mean and std are made and copied to the device once, not per micro-step
    (each call had built two CPU tensors and copied them, blocking, to the device)."""
    family = families.WanFamily.build_tiny(32, seed=0)
    samples = {
        dtype: torch.randn(1, 16, 2, 4, 4).to(dtype) for dtype in (torch.float32, torch.bfloat16)
    }
    first = {dtype: family.normalize_latents(sample) for dtype, sample in samples.items()}
    built = []
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: built.append(a) or real_tensor(*a, **k))
    for dtype, sample in samples.items():
        again = family.normalize_latents(sample)
        assert again.dtype == dtype and torch.equal(again, first[dtype])
    assert built == []
    # The bf16 statistics are the config's values rounded to bf16, as before the cache.
    config = family.vae.config
    mean = real_tensor(config.latents_mean, dtype=torch.bfloat16).view(1, 16, 1, 1, 1)
    std = real_tensor(config.latents_std, dtype=torch.bfloat16).view(1, 16, 1, 1, 1)
    assert torch.equal(first[torch.bfloat16], (samples[torch.bfloat16] - mean) / std)


@pytest.mark.parametrize(
    ("name", "parameters"),
    [
        ("sd3.5-medium", 2_243_171_520),
        ("sd3.5-large", 8_056_627_520),
        ("flux.1-dev", 11_901_408_320),
        ("wan2.1-t2v-1.3b", 1_418_996_800),
    ],
)
def test_published_architectures_have_the_documented_parameter_counts(name, parameters):
    # The counts quoted in docs/flow_matching.md, built on the meta device (no memory).
    with torch.device("meta"):
        model = families.build_published_transformer(name)
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_timestep_weighting_is_refused_for_flow_models():
    flow_matching.refuse_timestep_weighting("none")
    with pytest.raises(ValueError, match="deterministic ODE"):
        flow_matching.refuse_timestep_weighting("dpo-cm")


def test_sigma_tables_are_cached_per_device():
    family = families.FluxFamily.build_tiny(16, seed=0)
    cache: dict = {}
    first, _ = flow_matching.sample_pair_sigmas(
        family.scheduler, 4, FlowDensity(), torch.Generator().manual_seed(0), CPU, table_cache=cache
    )
    tables = cache[CPU]
    second, _ = flow_matching.sample_pair_sigmas(
        family.scheduler, 4, FlowDensity(), torch.Generator().manual_seed(0), CPU, table_cache=cache
    )
    assert cache[CPU] is tables
    torch.testing.assert_close(first, second, rtol=0, atol=0)


class Wrapped(torch.nn.Module):
    """Like DDP: the model under ``.module``, no ``dtype`` or ``config`` of its own."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


def test_prediction_reads_dtype_and_config_through_wrappers(case):
    family, latents, conditioning = case
    rows = {k: flow_matching.repeat_pairs(v) for k, v in conditioning.items()}
    sigmas = torch.full((latents.shape[0],), 0.5)
    with torch.no_grad():
        direct = family.prediction(family.transformer, latents, sigmas, rows)
        wrapped = family.prediction(Wrapped(family.transformer), latents, sigmas, rows)
    torch.testing.assert_close(wrapped, direct, rtol=0, atol=0)


def test_bad_inputs_get_one_line_errors(case):
    family, latents, conditioning = case
    with pytest.raises(ValueError, match="captions"):
        family.encode_text("a red circle", CPU)
    with pytest.raises(ValueError, match="pixels"):
        family.encode_images(torch.zeros(2, 3, 4), None)
    with pytest.raises(ValueError, match="prompt_embeds"):
        families.flow_preference_inputs(
            family, family.transformer, family.transformer, latents, {}, None, FlowDensity()
        )
    with pytest.raises(ValueError, match="one per pair"):
        families.flow_preference_inputs(
            family,
            family.transformer,
            family.transformer,
            latents,
            {k: v[:1] for k, v in conditioning.items()},
            None,
            FlowDensity(),
        )
    with pytest.raises(ValueError, match="resolution"):
        type(family).from_pipeline(family.pipeline, family.resolution + 1)


@pytest.mark.parametrize("scale", [-1.0001, -3.0, flow_matching.MODE_SCALE_MAX + 1e-6, 5.0])
def test_mode_scale_outside_the_papers_range_is_refused(tmp_path, scale):
    """Below -1 diffusers' mode map leaves [0, 1] (draws clamped onto the table's ends); above
    2/(pi-2) it is no longer monotonic. Both the dataclass and sdpo-train's flag refuse it."""
    u = torch.linspace(0, 1, 10001)
    mapped = 1 - u - scale * (torch.cos(torch.pi * u / 2) ** 2 - 1 + u)
    leaves = bool((mapped < 0).any() or (mapped > 1).any())
    not_monotonic = bool((mapped.diff() > 0).any())
    assert leaves or not_monotonic  # what the bound protects against, at this scale
    with pytest.raises(ValueError, match=r"mode_scale: expected a number in \[-1, 1\.7519\]"):
        FlowDensity(density="mode", mode_scale=scale)
    from sdpo.train.config import FIELDS, config_from_args
    from sdpo.train.errors import UsageError

    assert FIELDS["mode_scale"].high == flow_matching.MODE_SCALE_MAX
    argv = ["--model", "sd3", "--pretrained", "tiny", "--flow-density", "mode"]
    with pytest.raises(
        UsageError, match=r"--mode-scale: expected a finite number in \[-1, 1\.75"
    ) as error:
        config_from_args([*argv, "--mode-scale", str(scale), "--output-dir", str(tmp_path)])
    assert "\n" not in str(error.value)
    for inside in (-1.0, 1.29, flow_matching.MODE_SCALE_MAX):  # the bound itself is allowed
        FlowDensity(density="mode", mode_scale=inside)


def test_a_positive_logit_mean_draws_less_noise():
    # diffusers' convention (docs/flow_matching.md): u = sigmoid(N(m, s)) indexes a table that
    # runs from most to least noise, so m > 0 means smaller sigmas: the SD3 paper's m is -m here.
    family = families.SD3Family.build_tiny(16, seed=0)
    means = {}
    for mean in (-2.0, 2.0):
        sigmas, _ = flow_matching.sample_pair_sigmas(
            family.scheduler,
            512,
            FlowDensity(logit_mean=mean),
            torch.Generator().manual_seed(0),
            CPU,
        )
        means[mean] = float(sigmas.mean())
    # (SD3's shift 3 moves both toward noise: 0.31 and 0.93 here.)
    assert means[2.0] + 0.4 < means[-2.0], means
