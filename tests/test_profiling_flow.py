"""The overhead suite on the flow-matching families (tiny SD3 and FLUX on a CPU): every mode runs,
the modes compute the same loss on the same batch, the FLOPs and the ladder follow the timings,
and the sd35 / flux / wan presets are the trainer's presets on the released architectures."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from sdpo.profiling import overhead
from sdpo.profiling.cli import main as profile_main
from sdpo.train.config import PRESET_RANDOM_ARCHITECTURES, random_flow_architecture
from sdpo.train.config import PRESETS as TRAINER_PRESETS

CPU = torch.device("cpu")
TINY_FLOW = ("tiny-sd3", "tiny-flux", "tiny-wan")
# Two implementations of the same loss (another reduction order) agree to fp32 rounding of the
# per-row MSEs (about 2 x 1e-7 each), which u = -(beta/2)((L_w - L_l) - (R_w - R_l)) multiplies by
# beta/2 = 2500 over four terms: up to 2e-3 in u, and in the loss (|d loss / du| <= 1). Measured:
# 4e-4 at most (fused against torch, tiny-flux).
ROUNDING_ATOL = 2e-3


def frozen_workload(preset: str) -> overhead.Workload:
    """A workload whose optimizer leaves the weights alone (lr 0 through the LR schedule too),
    with the policy moved off the reference so the margin, and the loss, depend on both."""
    workload = overhead.Workload(overhead.PRESETS[preset], batch_pairs=2, device=CPU)
    workload.lr_schedule.base_lrs = [0.0 for _ in workload.lr_schedule.base_lrs]
    for group in workload.optimizer.param_groups:
        group["lr"] = 0.0
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in workload.parameters:  # LoRA: the adapters; full fine-tune: all weights
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return workload


@pytest.mark.parametrize("preset", TINY_FLOW)
def test_flow_modes_compute_the_same_loss_on_the_same_batch(preset):
    workload = frozen_workload(preset)
    assert workload.models.flow is not None
    # tiny-sd3 is the full fine-tune (a frozen copy), the others LoRA (the policy, adapters off).
    assert (workload.models.reference_unet is None) == (preset != "tiny-sd3")
    policies = overhead._Policies(workload.models)
    backend, torch_loss = overhead.our_step(workload, policies, "sdpo-torch", "eager", step=7)
    assert backend == "torch"
    _, dpo_loss = overhead.our_step(workload, policies, "dpo", "eager", step=7)
    _, reference_loss = overhead.reference_step(workload, step=7)
    assert torch.isfinite(torch_loss)
    # The policy differs from the reference: the loss is not log 2 (a zero margin).
    assert abs(torch_loss.item() - torch.log(torch.tensor(2.0)).item()) > 1e-3
    # The safeguard rescales the loser's gradient, not the loss value.
    torch.testing.assert_close(torch_loss, dpo_loss, rtol=1e-5, atol=1e-6)
    # The reference's work around the same flow components, on the same draws: the same loss.
    torch.testing.assert_close(torch_loss, reference_loss, rtol=0, atol=ROUNDING_ATOL)
    _, other_draw = overhead.reference_step(workload, step=8)
    assert not torch.allclose(torch_loss, other_draw)
    online_mode_backend = "torch"
    if overhead.fused_available(CPU):
        fused_backend, fused_loss = overhead.our_step(
            workload, policies, "sdpo-fused", "eager", step=7
        )
        assert fused_backend == "triton"
        torch.testing.assert_close(fused_loss, torch_loss, rtol=0, atol=ROUNDING_ATOL)
        online_mode_backend = "sdpo-fused"
    # ours-online encodes what the cache holds: the same loss as the cached step of its backend.
    _, online = overhead.our_step(workload, policies, overhead.ONLINE_MODE, "eager", step=5)
    cached_mode = "sdpo-fused" if online_mode_backend == "sdpo-fused" else "sdpo-torch"
    _, cached = overhead.our_step(workload, policies, cached_mode, "eager", step=5)
    torch.testing.assert_close(online, cached, rtol=1e-5, atol=1e-6)


def test_flow_suite_runs_every_mode_with_flops_and_a_consistent_ladder(tmp_path):
    output = tmp_path / "flux.json"
    arguments = ["overhead", "--preset", "tiny-flux", "--rounds", "2", "--steps", "2"]
    arguments += ["--warmup", "1", "--device", "cpu", "--output", str(output)]
    assert profile_main(arguments) == 0
    result = json.loads(output.read_text())["overhead"]
    assert result["preset"] == "tiny-flux" and result["resolution"] == 16
    fused = overhead.fused_available(CPU)
    ours = "sdpo-fused" if fused else "sdpo-torch"
    expected = {"reference/eager", "ours-online/eager", "dpo/eager", "sdpo-torch/eager"}
    assert set(result["modes"]) == expected | ({"sdpo-fused/eager"} if fused else set())
    for mode in result["modes"].values():
        assert mode["n"] == 4 and mode["step_ms"] > 0
    # FLOPs: the transformer's forward + backward and the reference forward; the encoding modes
    # add the VAE encoder and the CLIP + T5 encoders.
    assert result["flops_per_step"] > 0 and result["encoding_flops_per_step"] > 0
    assert result["modes"]["reference/eager"]["flops_per_step"] == pytest.approx(
        result["flops_per_step"] + result["encoding_flops_per_step"]
    )
    assert result["modes"]["dpo/eager"]["flops_per_step"] == result["flops_per_step"]
    assert result["modes"]["reference/eager"]["backend"] == "reference-sequence"
    ladder = result["ladder"]
    assert [row["mode"] for row in ladder] == [
        "reference/eager",
        "ours-online/eager",
        f"{ours}/eager",
    ]
    for previous, row in itertools.pairwise(ladder):
        times = result["modes"]
        assert row["compared_with"] == previous["mode"]
        assert row["factor"] == pytest.approx(
            times[previous["mode"]]["step_ms"] / times[row["mode"]]["step_ms"]
        )
        assert row["factor_vs_reference"] == pytest.approx(
            result["reference_step_ms"] / times[row["mode"]]["step_ms"]
        )


def test_flow_model_flops_count_the_transformer_without_recompute():
    # tiny-sd3 trains with gradient checkpointing (the sd35m-dpo preset): the count leaves its
    # recompute out, so it equals the count with checkpointing off.
    checkpointed = overhead.Workload(overhead.PRESETS["tiny-sd3"], batch_pairs=2, device=CPU)
    assert checkpointed.models.unet.is_gradient_checkpointing
    flops = overhead.count_model_flops(checkpointed)
    checkpointed.models.unet.disable_gradient_checkpointing()
    assert overhead.count_model_flops(checkpointed) == flops
    # One policy forward + backward (about 3 forwards) and one reference forward: about 4
    # forwards of the transformer over the 2B rows.
    from torch.utils.flop_counter import FlopCounterMode

    models = checkpointed.models
    latents = torch.zeros(4, 16, 8, 8)
    hidden = checkpointed.cached.hidden.repeat(2, 1, 1)
    pooled = {"text_embeds": checkpointed.cached.pooled.repeat(2, 1)}
    family = overhead.FlowMatchingFamily(models.flow, models.flow_density)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        family.predict(models.unet, latents, torch.full((4,), 0.5), hidden, pooled)
    forward = counter.get_total_flops()
    assert 3.5 * forward < flops < 4.5 * forward


def test_flow_overhead_presets_are_the_trainers_on_the_released_architectures():
    for name, trainer_name in (
        ("sd35", "sd35m-dpo"),
        ("flux", "flux-dpo-lora"),
        ("wan", "wan-dpo-lora"),
        ("tiny-sd3", "sd35m-dpo"),
        ("tiny-flux", "flux-dpo-lora"),
        ("tiny-wan", "wan-dpo-lora"),
    ):
        preset = overhead.PRESETS[name]
        for key, value in TRAINER_PRESETS[trainer_name].items():
            if name.startswith("tiny") and key in (
                "resolution",
                "train_batch_pairs",
                "granularity",
            ):
                continue
            assert getattr(preset, key) == value, (name, key)
    built = {
        name: random_flow_architecture(overhead.PRESETS[name]) for name in ("sd35", "flux", "wan")
    }
    assert built == {
        "sd35": "sd3.5-medium",
        "flux": "flux.1-dev",
        "wan": "wan2.1-t2v-1.3b",
    }
    assert built["sd35"] == PRESET_RANDOM_ARCHITECTURES["sd35m-dpo"]
    assert overhead.PRESETS["tiny-flux"].pretrained == "tiny"


def test_released_flow_presets_need_a_gpu(tmp_path, capsys):
    # Refused before anything is built: sd35 on a CPU would allocate > 60 GB.
    arguments = ["overhead", "--preset", "sd35", "--device", "cpu"]
    assert profile_main([*arguments, "--output", str(tmp_path / "x.json")]) == 2
    error = capsys.readouterr().err
    assert "sd3.5-medium" in error and "use --preset tiny-sd3" in error


@pytest.mark.parametrize("preset", TINY_FLOW)
def test_channels_last_named_for_a_flow_preset_is_refused_in_one_line(tmp_path, capsys, preset):
    # As sdpo-train refuses --channels-last for a flow model; Wan's Conv3d patch embedding used to
    # be recorded as torch's "required rank 4 tensor to use channels_last format".
    output = tmp_path / "x.json"
    arguments = ["overhead", "--preset", preset, "--variants", "eager,channels-last"]
    assert profile_main([*arguments, "--device", "cpu", "--output", str(output)]) == 2
    error = capsys.readouterr().err.strip()
    model = overhead.PRESETS[preset].model
    assert error == (
        f"sdpo-profile: error: variants: channels-last is for UNets (their convolutions); the "
        f"{model} transformer has none to speed up; drop it for --preset {preset}"
    )
    assert not output.exists()


def test_channels_last_in_the_default_variants_is_listed_not_run_for_a_flow_preset(monkeypatch):
    # The default list (every variant on a GPU) keeps the other variants and says why
    # channels-last was not timed; on a CPU the default is eager alone, so the list is set here.
    monkeypatch.setattr(overhead, "default_variants", lambda device: ["eager", "channels-last"])
    result = overhead.run_overhead(
        "tiny-wan", device=CPU, variants=None, rounds=1, steps_per_round=1, warmup_steps=1,
        log=lambda message: None,
    )  # fmt: skip
    # The modes' names depend on whether the fused kernels can run here (sdpo-fused under
    # TRITON_INTERPRET=1, as in CI; sdpo-torch without it): keyed by variant, not by mode.
    reasons = {
        reason for key, reason in result["not_run"].items() if key.endswith("/channels-last")
    }
    assert reasons == {
        "channels-last is for UNets (their convolutions); the wan transformer has none to speed "
        "up; not timed"
    }
    assert any(key.endswith("/eager") for key in result["modes"])
    assert not any(key.endswith("/channels-last") for key in result["modes"])
