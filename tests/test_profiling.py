"""The profiling suite on a CPU: the overhead run's JSON, its steps' arithmetic, the Nsight
summarisers on hand-made reports, and the errors. No timing is asserted (CPU smoke run)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest
import torch

from sdpo.profiling import nsight, overhead
from sdpo.profiling.cli import main as profile_main
from sdpo.train.models import build_random

REQUIRED_OVERHEAD_KEYS = {
    "preset",
    "dpo_step_ms",
    "sdpo_step_ms",
    "sdpo_over_dpo_step_ratio",
    "reference_step_ms",
    "speedup_vs_reference",
    "peak_mem_gb",
    "mfu",
    "ladder",
    "not_run",
    "encoding_flops_per_step",
    "matmul_flops_per_s",
    "dense_bf16_peak_flops",
}


def test_overhead_cli_writes_well_formed_results(tmp_path):
    output = tmp_path / "results" / "cpu.json"
    command = [
        sys.executable,
        "-m",
        "sdpo.profiling.cli",
        "overhead",
        "--preset",
        "tiny",
        "--rounds",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--output",
        str(output),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    document = json.loads(output.read_text())
    assert {"device", "date", "torch", "triton", "overhead", "kernels"} <= set(document)
    assert document["timings_meaningful"] is False and document["kernels"] == []
    result = document["overhead"]
    assert REQUIRED_OVERHEAD_KEYS <= set(result)
    # Rows are labelled by what ran: sdpo-fused only where Triton runs (a GPU, or the interpreter
    # under TRITON_INTERPRET=1, as in CI), and not_run says why otherwise.
    expected_modes = {"reference/eager", "ours-online/eager", "dpo/eager", "sdpo-torch/eager"}
    fused = overhead.fused_available(torch.device("cpu"))
    ours = "sdpo-fused" if fused else "sdpo-torch"
    if fused:
        expected_modes.add("sdpo-fused/eager")
    else:
        assert "sdpo-fused" in result["not_run"]
    assert set(result["modes"]) == expected_modes
    for mode in result["modes"].values():
        assert mode["steps_timed"] == mode["n"] == 4  # 2 rounds x 2 steps
        assert mode["q1_ms"] <= mode["step_ms"] <= mode["q3_ms"]
        assert mode["iqr_ms"] == pytest.approx(mode["q3_ms"] - mode["q1_ms"])
        assert mode["pairs_per_s"] == pytest.approx(2 / (mode["step_ms"] * 1e-3))
        assert mode["mfu"] is None  # no datasheet peak for a CPU
        assert 0 < mode["mfu_vs_matmul"] < 1
    # The encoding modes count the VAE and text FLOPs on top of the model's.
    encoding = result["encoding_flops_per_step"]
    assert encoding > 0 and result["flops_per_step"] > 0
    assert result["modes"]["ours-online/eager"]["flops_per_step"] == pytest.approx(
        result["flops_per_step"] + encoding
    )
    assert result["modes"]["dpo/eager"]["flops_per_step"] == result["flops_per_step"]
    # CPU: no headline figure anywhere.
    assert result["headline_variant"] is None and result["speedup_vs_reference"] is None
    assert result["sdpo_over_dpo_step_ratio"] is None
    assert result["modes"]["sdpo-torch/eager"]["backend"] == "torch"
    assert [row["mode"] for row in result["ladder"]] == [
        "reference/eager",
        "ours-online/eager",
        f"{ours}/eager",
    ]
    markdown = output.with_suffix(".md").read_text()
    assert "| reference/eager |" in markdown and "claim nothing" in markdown
    assert "speed-up" not in markdown and "safeguard overhead" not in markdown
    assert ("| sdpo-fused/eager |" in markdown) == fused
    assert markdown.index("claim nothing") < markdown.index("| mode |")


def test_reference_work_step_computes_our_loss():
    """The reference-work step and ours do the same maths on the same draws (fp32, CPU), so the
    overhead suite compares equal work, done two ways."""
    workload = overhead.Workload(
        overhead.PRESETS["tiny"], batch_pairs=2, device=torch.device("cpu")
    )
    for group in workload.optimizer.param_groups:
        group["lr"] = 0.0  # keep the weights fixed between the two steps
    policies = overhead._Policies(workload.models)
    backend, ours = overhead.our_step(workload, policies, "sdpo-torch", "eager", step=7)
    _, theirs = overhead.reference_step(workload, step=7)
    assert backend == "torch"
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    _, other_draw = overhead.reference_step(workload, step=8)
    assert not torch.allclose(ours, other_draw)


def test_online_encoding_step_computes_the_cached_steps_loss():
    """ours-online encodes what the cache holds, with the same draws: the same loss (fp32)."""
    workload = overhead.Workload(
        overhead.PRESETS["tiny"], batch_pairs=2, device=torch.device("cpu")
    )
    for group in workload.optimizer.param_groups:
        group["lr"] = 0.0
    policies = overhead._Policies(workload.models)
    _, online = overhead.our_step(workload, policies, overhead.ONLINE_MODE, "eager", step=5)
    # Compared on the loss backend ours-online uses (the fused one where Triton runs): two
    # backends differ in fp32 rounding, which beta = 5000 lifts above the tolerance.
    cached_mode = "sdpo-fused" if overhead.fused_available(torch.device("cpu")) else "sdpo-torch"
    _, cached = overhead.our_step(workload, policies, cached_mode, "eager", step=5)
    torch.testing.assert_close(online, cached, rtol=1e-5, atol=1e-6)


def test_xformers_variant_is_not_timed_without_the_package(monkeypatch):
    real_find_spec = overhead.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "xformers" else real_find_spec(name, *args)

    monkeypatch.setattr(overhead.importlib.util, "find_spec", find_spec)
    # Our step is sdpo-torch here whether or not Triton's interpreter is on (CI sets it, and
    # then the fused mode runs on the CPU and is the one the ladder variants time).
    monkeypatch.setattr(overhead, "fused_available", lambda device: False)
    reasons = overhead.unavailable_variants(overhead.PRESETS["tiny"])
    assert reasons == {"xformers": overhead.XFORMERS_MISSING}
    schedule, not_run = overhead.plan_modes(["eager", "xformers"], torch.device("cpu"), reasons)
    assert ("sdpo-torch", "xformers") not in schedule
    assert not_run["sdpo-torch/xformers"] == overhead.XFORMERS_MISSING
    monkeypatch.setattr(overhead.importlib.util, "find_spec", lambda name, *args: object())
    assert "xformers" not in overhead.unavailable_variants(overhead.PRESETS["tiny"])
    # A flow model: channels-last too.
    assert "channels-last" in overhead.unavailable_variants(overhead.PRESETS["tiny-flux"])
    schedule, _ = overhead.plan_modes(["eager", "xformers"], torch.device("cpu"), {})
    assert schedule[-1] == ("sdpo-torch", "xformers")  # our SDPO step only, as an alternative


def test_xformers_variant_switches_both_unets_and_puts_every_processor_back(monkeypatch):
    """What the variant does around its steps on a GPU (xformers' kernels need CUDA, so the
    switch is stood in for by diffusers' plain AttnProcessor): both UNets switched inside, every
    attention module's own processor object back after, also when the switch fails."""
    from diffusers.models.attention_processor import AttnProcessor

    workload = overhead.Workload(
        overhead.PRESETS["tiny"], batch_pairs=2, device=torch.device("cpu")
    )
    unets = [workload.models.unet, workload.models.reference_unet]
    before = [
        [(module, module.processor) for module in unet.modules() if hasattr(module, "processor")]
        for unet in unets
    ]
    assert all(before)
    switched = []

    def enable(unet, attention_op=None):
        switched.append(unet)
        unet.set_attn_processor(AttnProcessor())

    monkeypatch.setattr(type(unets[0]), "enable_xformers_memory_efficient_attention", enable)
    with overhead.variant_context(workload, "xformers"):
        assert switched == unets
        for pairs in before:
            assert all(isinstance(module.processor, AttnProcessor) for module, _ in pairs)
    for pairs in before:
        assert all(module.processor is processor for module, processor in pairs)

    def broken(unet, attention_op=None):
        unet.set_attn_processor(AttnProcessor())
        raise ValueError("torch.cuda.is_available() should be True")

    monkeypatch.setattr(type(unets[0]), "enable_xformers_memory_efficient_attention", broken)
    with pytest.raises(RuntimeError, match="xformers is not usable here"):
        with overhead.variant_context(workload, "xformers"):
            pass
    for pairs in before:
        assert all(module.processor is processor for module, processor in pairs)


def test_xformers_variant_puts_a_flow_transformers_attention_backend_back(monkeypatch):
    """A flow transformer's attention (diffusers' attention dispatch) is switched by setting
    its processor's _attention_backend, not by a new processor: that is put back too."""
    workload = overhead.Workload(
        overhead.PRESETS["tiny-flux"], batch_pairs=2, device=torch.device("cpu")
    )
    from diffusers.models.attention_dispatch import AttentionBackendName

    transformer = workload.models.unet
    processors = [
        module.processor for module in transformer.modules() if hasattr(module, "processor")
    ]
    assert processors and all(p._attention_backend is None for p in processors)

    def enable(model, attention_op=None):
        # What diffusers' set_attention_backend("xformers") sets once xformers' probe passed.
        for module in model.modules():
            if hasattr(module, "set_attention_backend") and hasattr(module, "processor"):
                module.processor._attention_backend = AttentionBackendName("xformers")

    monkeypatch.setattr(type(transformer), "enable_xformers_memory_efficient_attention", enable)
    with overhead.variant_context(workload, "xformers"):
        assert all(p._attention_backend == AttentionBackendName.XFORMERS for p in processors)
    assert all(p._attention_backend is None for p in processors)


def test_rounds_alternate_their_order_and_drop_each_blocks_first_step(monkeypatch):
    """ABBA: the mode order reverses every round. Every block starts with one untimed step
    (dropped: after another mode's block; a compiled mode whose weights channels-last moved
    re-records there); the compile here is stood in for by the plain module."""
    monkeypatch.setattr(overhead, "compile_model", lambda module, cuda_graphs: module)
    # The modes below are the ones without the fused kernels, with or without Triton's
    # interpreter (CI sets it; the fused mode would then run too).
    monkeypatch.setattr(overhead, "fused_available", lambda device: False)
    calls = []
    timing = {"on": False}
    real_measure, real_step = overhead._Timer.measure, overhead.our_step

    def measure(self, function):
        timing["on"] = True
        try:
            return real_measure(self, function)
        finally:
            timing["on"] = False

    def step(workload, policies, mode, variant, step):
        calls.append((mode, variant, timing["on"]))
        return real_step(workload, policies, mode, variant, step)

    monkeypatch.setattr(overhead._Timer, "measure", measure)
    monkeypatch.setattr(overhead, "our_step", step)
    result = overhead.run_overhead(
        "tiny",
        device=torch.device("cpu"),
        variants=["eager", "compile", "channels-last"],
        rounds=2,
        steps_per_round=1,
        warmup_steps=1,
        batch_pairs=2,
        log=lambda message: None,
    )
    # First the model-FLOP count's one untimed step, then the warm-ups.
    assert calls[0] == ("dpo", "eager", False)
    calls = calls[1:]
    warmups = 6  # ours-online, dpo and sdpo-torch eager and compile, sdpo-torch channels-last
    assert all(not timed for _, _, timed in calls[:warmups])
    order = [
        ("ours-online", "eager"),
        ("dpo", "eager"),
        ("sdpo-torch", "eager"),
        ("dpo", "compile"),
        ("sdpo-torch", "compile"),
        ("sdpo-torch", "channels-last"),
    ]

    def blocks(modes):
        return [call for mode in modes for call in ((*mode, False), (*mode, True))]

    assert calls[warmups:] == blocks(order) + blocks(order[::-1])
    for mode in result["modes"].values():
        assert mode["n"] == 2  # the dropped steps are not counted


def test_model_flops_leave_out_the_gradient_checkpointing_recompute():
    plain = overhead.Workload(overhead.PRESETS["tiny"], batch_pairs=2, device=torch.device("cpu"))
    preset = overhead.trainer_preset("tiny", "--gradient-checkpointing")
    recomputing = overhead.Workload(preset, batch_pairs=2, device=torch.device("cpu"))
    assert recomputing.models.unet.is_gradient_checkpointing
    assert overhead.count_model_flops(recomputing) == overhead.count_model_flops(plain)
    assert recomputing.models.unet.is_gradient_checkpointing  # switched back on after counting


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 NVL", 835.5e12),  # not the SXM's 989.4 (a substring match gave it that)
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        # Unknown names: no guess.
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None),
        ("NVIDIA GH200 480GB", None),
        ("NVIDIA H800", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_dense_bf16_peaks_by_exact_device_name(name, peak):
    assert overhead.dense_bf16_peak(name) == peak
    reason = overhead.mfu_unavailable_reason(name, is_cuda=True)
    if peak is None:
        assert f"no datasheet dense bf16 peak for {name!r}" in reason
        assert "not reported rather than guessed" in reason
    else:
        assert reason is None


def test_unknown_gpu_reports_mfu_unavailable_naming_the_device(monkeypatch):
    """Without a datasheet peak every mode's MFU is None and the results carry the reason
    (mfu_unavailable); for a GPU the table lacks, the report names the device."""
    monkeypatch.setattr(overhead, "device_name", lambda device: "NVIDIA H100 NVL-prototype")
    result = overhead.run_overhead(
        "tiny",
        device=torch.device("cpu"),
        variants=["eager"],
        rounds=1,
        steps_per_round=1,
        warmup_steps=0,
        batch_pairs=2,
        log=lambda message: None,
    )
    # The run is on the CPU: its reason is the CPU's; the GPU path is the same function.
    assert result["mfu_unavailable"].startswith("a CPU has no datasheet bf16 peak")
    assert all(mode["mfu"] is None for mode in result["modes"].values())
    document = {
        "device": "NVIDIA H100 NVL-prototype", "date": "2026-12-08", "torch": "2.11",
        "triton": "3.6", "timings_meaningful": True, "kernels": [],
        "overhead": {
            **result,
            "mfu_unavailable": overhead.mfu_unavailable_reason("NVIDIA H100 NVL-prototype", True),
        },
    }  # fmt: skip
    report = overhead.markdown_report(document)
    assert (
        "MFU (peak) unavailable: no datasheet dense bf16 peak for 'NVIDIA H100 NVL-prototype'"
        in report
    )


def test_ladder_factors_chain_the_rungs():
    times = {
        "reference/eager": 400.0,
        "ours-online/eager": 200.0,
        "sdpo-fused/eager": 100.0,
        "sdpo-fused/compile": 80.0,
        "sdpo-fused/channels-last": 125.0,
    }
    modes = {key: {"step_ms": value} for key, value in times.items()}
    rows = overhead.attribution_ladder(modes, "sdpo-fused")
    assert [(row["mode"], row["factor"], row["factor_vs_reference"]) for row in rows] == [
        ("reference/eager", None, 1.0),
        ("ours-online/eager", 2.0, 2.0),
        ("sdpo-fused/eager", 2.0, 4.0),
        ("sdpo-fused/compile", 1.25, 5.0),  # cuda-graphs did not run: left out
        ("sdpo-fused/channels-last", 0.8, 3.2),  # an alternative to the eager rung
    ]
    assert rows[-1]["compared_with"] == "sdpo-fused/eager"


def test_random_architectures_match_the_public_checkpoints():
    with torch.device("meta"):
        sd15 = build_random("sd15", 512, seed=0)
        sdxl = build_random("sdxl", 1024, seed=0)

    def count(module):
        return sum(parameter.numel() for parameter in module.parameters())

    # Parameter counts of the released SD1.5 and SDXL-base UNets, text encoders and VAE.
    assert count(sd15.unet) == 859_520_964
    assert count(sdxl.unet) == 2_567_463_684
    assert count(sd15.vae) == 83_653_863
    assert count(sd15.text.encoders[0]) == 123_060_480
    assert count(sdxl.text.encoders[1]) == 694_659_840
    assert sdxl.unet.config.addition_embed_type == "text_time"
    with pytest.raises(ValueError, match="resolution"):
        build_random("sd15", 500, seed=0)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["overhead", "--preset", "sd14", "--output", "x.json"], "preset: unknown 'sd14'"),
        (["overhead", "--variants", "cuda-graphs", "--output", "x.json"], "needs a CUDA device"),
        (["overhead", "--variants", "xformers", "--output", "x.json"], "needs a CUDA device"),
        (["overhead", "--variants", "fast", "--output", "x.json"], "variants: unknown fast"),
        (["overhead"], "pass --output PATH"),
        (["nsys-summary", "missing.sqlite"], "nsys export --type sqlite"),
        (["ncu-summary", "missing.csv"], "no such file"),
    ],
)
def test_profile_cli_errors(arguments, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if torch.cuda.is_available() and "--output" not in arguments:
        pytest.skip("on a GPU, overhead without --output is valid")
    assert profile_main(arguments) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--rounds", "0", "--rounds: expected an integer >= 1, got 0"),
        ("--steps", "-1", "--steps: expected an integer >= 1, got -1"),
        ("--warmup", "-2", "--warmup: expected an integer >= 0, got -2"),
        ("--batch-pairs", "0", "--batch-pairs: expected an integer >= 1, got 0"),
        ("--rounds", "1.5", "--rounds: expected an integer >= 1, got '1.5'"),
        ("--device", "tpu", "--device: expected cpu, cuda or cuda:N, got 'tpu'"),
    ],
)
def test_profile_cli_refuses_bad_counts_and_devices_at_parse(flag, value, message, capsys):
    """Before the check a --warmup of -2 and a --batch-pairs of 0 (read as the preset's) ran, and
    --device tpu ended in torch's traceback."""
    with pytest.raises(SystemExit) as exit_info:
        profile_main(["overhead", "--preset", "tiny", "--output", "x.json", flag, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_profile_cli_refuses_a_cuda_index_past_the_visible_devices(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    arguments = ["overhead", "--preset", "tiny", "--output", "x.json", "--device", "cuda:3"]
    assert profile_main(arguments) == 2
    assert "device: cuda:3 requested but 1 CUDA device(s) are visible" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        (dict(warmup_steps=-1), "warmup: expected >= 0, got -1"),
        (dict(batch_pairs=0), "batch_pairs: expected >= 1, got 0"),
        (dict(rounds=2.0), "rounds: expected an integer >= 1, got 2.0"),
        (dict(steps_per_round=True), "steps: expected an integer >= 1, got True"),
    ],
)
def test_run_overhead_checks_its_counts_before_building_anything(keywords, message, monkeypatch):
    from sdpo.profiling import overhead

    def no_build(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(overhead, "Workload", no_build)
    arguments = dict(rounds=1, steps_per_round=1, warmup_steps=0, batch_pairs=None)
    with pytest.raises(ValueError, match=message):
        overhead.run_overhead(
            "tiny", device=torch.device("cpu"), variants=["eager"], **{**arguments, **keywords}
        )


def _nsys_database(path):
    """A report in the Nsight Systems SQLite schema: two threads, nested ranges, kernels."""
    connection = sqlite3.connect(path)
    connection.executescript(
        """
        CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT);
        CREATE TABLE NVTX_EVENTS (start INTEGER, end INTEGER, eventType INTEGER, text TEXT,
                                  textId INTEGER, globalTid INTEGER, domainId INTEGER);
        CREATE TABLE CUPTI_ACTIVITY_KIND_KERNEL (start INTEGER, end INTEGER, shortName INTEGER,
                                  demangledName INTEGER, correlationId INTEGER);
        CREATE TABLE CUPTI_ACTIVITY_KIND_RUNTIME (start INTEGER, end INTEGER,
                                  globalTid INTEGER, correlationId INTEGER);
        """
    )
    connection.executemany(
        "INSERT INTO StringIds VALUES (?, ?)",
        [(1, "gemm"), (2, "pair_sums_kernel"), (3, "backward"), (4, "elementwise")],
    )
    ms = 1_000_000
    connection.executemany(
        "INSERT INTO NVTX_EVENTS VALUES (?, ?, ?, ?, ?, ?, 0)",
        [
            (0, 10 * ms, 59, "policy forward", None, 1),
            (10 * ms, 12 * ms, 59, "loss and safeguard", None, 1),
            (12 * ms, 30 * ms, 59, None, 3, 1),  # a registered string: "backward"
            (0, 5 * ms, 59, "policy forward", None, 2),  # another thread
            (3 * ms, 4 * ms, 34, "a marker, not a range", None, 1),
        ],
    )
    # (launch thread, launch time, kernel start, kernel end, name id, correlation)
    kernels = [
        (1, 1 * ms, 1 * ms, 4 * ms, 1, 100),  # policy forward: gemm 3 ms
        (1, 11 * ms, 12 * ms, 13 * ms, 2, 101),  # loss: pair sums 1 ms
        (1, 13 * ms, 14 * ms, 20 * ms, 1, 102),  # backward: gemm 6 ms
        (1, 40 * ms, 40 * ms, 42 * ms, 4, 103),  # outside any range: 2 ms
        (2, 1 * ms, 5 * ms, 7 * ms, 4, 104),  # thread 2's policy forward: 2 ms
    ]
    for thread, launch, start, end, name, correlation in kernels:
        connection.execute(
            "INSERT INTO CUPTI_ACTIVITY_KIND_RUNTIME VALUES (?, ?, ?, ?)",
            (launch, launch + 1000, thread, correlation),
        )
        connection.execute(
            "INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL VALUES (?, ?, ?, ?, ?)",
            (start, end, name, name, correlation),
        )
    connection.commit()
    connection.close()


def test_nsys_summary_attributes_kernels_to_ranges(tmp_path):
    path = tmp_path / "report.sqlite"
    _nsys_database(path)
    summary = nsight.summarize_nsys(path)
    ranges = {row["name"]: row for row in summary["ranges"]}
    assert set(ranges) == {"policy forward", "loss and safeguard", "backward"}
    assert ranges["policy forward"]["count"] == 2
    assert ranges["policy forward"]["total_ms"] == pytest.approx(15.0)
    assert ranges["backward"]["mean_ms"] == pytest.approx(18.0)
    kernels = {row["name"]: row for row in summary["kernels"]}
    assert kernels["gemm"]["count"] == 2 and kernels["gemm"]["total_ms"] == pytest.approx(9.0)
    assert kernels["gemm"]["share"] == pytest.approx(9.0 / 14.0)
    assert summary["kernel_ms_total"] == pytest.approx(14.0)
    assert summary["gpu_ms_by_range"] == pytest.approx(
        {
            "policy forward": 5.0,
            "backward": 6.0,
            "loss and safeguard": 1.0,
            nsight.OUTSIDE_RANGES: 2.0,
        }
    )
    text = nsight.format_nsys_summary(summary)
    assert "pair_sums_kernel" in text and "policy forward" in text
    assert profile_main(["nsys-summary", str(path), "--json", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["kernel_ms_total"] == pytest.approx(14.0)


def test_nsys_summary_needs_kernels(tmp_path):
    path = tmp_path / "empty.sqlite"
    sqlite3.connect(path).execute(
        "CREATE TABLE StringIds (id INTEGER, value TEXT)"
    ).connection.close()
    with pytest.raises(ValueError, match="no kernel table"):
        nsight.summarize_nsys(path)


def test_ncu_summary_reads_units_and_averages(tmp_path):
    text = (
        '"ID","Kernel Name","gpu__time_duration.sum",'
        '"dram__throughput.avg.pct_of_peak_sustained_elapsed"\n'
        '"","","usecond","%"\n'
        '"0","pair_sums_kernel","12.5","80.0"\n'
        '"1","gradient_kernel","20","90.0"\n'
        '"2","pair_sums_kernel","13.5","84.0"\n'
    )
    rows = nsight.summarize_ncu_csv(text)
    assert [row["name"] for row in rows] == ["pair_sums_kernel", "gradient_kernel"]
    assert rows[0]["count"] == 2
    assert rows[0]["total_ms"] == pytest.approx(0.026)
    assert rows[0]["dram_pct_of_peak"] == pytest.approx(82.0)
    with pytest.raises(ValueError, match=r"gpu__time_duration\.sum"):
        nsight.summarize_ncu_csv('"ID","Kernel Name"\n"0","k"\n')


def test_overhead_presets_are_the_trainers_presets():
    # The overhead suite times the trainer's settings, not a restatement of them.
    from sdpo.train.config import PRESETS as TRAINER_PRESETS

    for name, trainer_name in (("sd15", "sd15-dpo"), ("sdxl", "sdxl-dpo"), ("tiny", "tiny")):
        preset = overhead.PRESETS[name]
        for key, value in TRAINER_PRESETS[trainer_name].items():
            assert getattr(preset, key) == value, (name, key)
    assert overhead.PRESETS["sd15"].granularity == "group:8"
    assert overhead.PRESETS["sd15"].pretrained == "random"


class _Killed(Exception):
    """Stands in for the deadline's SIGKILL in the middle of a round."""


def test_overhead_results_are_written_after_every_round(tmp_path, monkeypatch):
    """A run killed in its second round leaves the first round's results, marked partial."""
    monkeypatch.setattr(overhead, "fused_available", lambda device: False)
    monkeypatch.setattr(overhead, "matmul_flops_per_s", lambda device: 1e9)  # times no steps
    real_measure = overhead._Timer.measure
    timed = {"steps": 0}
    modes_per_round = 4  # reference, ours-online, dpo, sdpo-torch (eager)

    def measure(self, function):
        timed["steps"] += 1
        if timed["steps"] > modes_per_round + 1:  # one step into the second round
            raise _Killed
        return real_measure(self, function)

    monkeypatch.setattr(overhead._Timer, "measure", measure)
    output = tmp_path / "overhead.json"
    arguments = ["overhead", "--preset", "tiny", "--device", "cpu", "--rounds", "3"]
    arguments += ["--steps", "1", "--warmup", "0", "--batch-pairs", "2", "--output", str(output)]
    with pytest.raises(_Killed):
        profile_main(arguments)
    result = json.loads(output.read_text())["overhead"]
    assert result["complete"] is False and result["rounds_completed"] == 1
    assert {mode["n"] for mode in result["modes"].values()} == {1}
    assert len(result["modes"]) == modes_per_round
    assert "Partial: 1 of 3 rounds" in output.with_suffix(".md").read_text()


def test_ratio_interval_is_a_paired_t_interval_on_log_ratios():
    import math
    import statistics

    dpo = [100.0, 110.0, 105.0, 120.0, 100.0, 95.0]
    ratios = [1.004, 1.006, 1.002, 1.008, 1.005, 1.003]
    sdpo = [d * r for d, r in zip(dpo, ratios, strict=True)]
    interval = overhead.ratio_interval(sdpo, dpo)
    logs = [math.log(r) for r in ratios]
    half = 2.571 * statistics.stdev(logs) / math.sqrt(6)  # t(0.975, 5 degrees of freedom)
    assert interval["ratio"] == pytest.approx(math.exp(statistics.fmean(logs)))
    assert interval["low"] == pytest.approx(math.exp(statistics.fmean(logs) - half))
    assert interval["high"] == pytest.approx(math.exp(statistics.fmean(logs) + half))
    assert interval["rounds"] == 6 and interval["confidence"] == 0.95
    # The rounds' drift (dpo from 95 to 120 ms) is paired out: only the ratios' spread counts.
    assert interval["high"] - interval["low"] < 0.005
    assert overhead.ratio_interval([1.0], [1.0]) is None


@pytest.mark.parametrize(
    ("ratios", "expected"),
    [
        ([1.004, 1.006, 1.002, 1.008, 1.005, 1.003], "meets"),
        ([1.030, 1.032, 1.028, 1.031, 1.029, 1.030], "misses"),
        # Noise of a few % per round: the interval is wider than the 1% margin.
        ([0.97, 1.04, 1.00, 1.06, 0.95, 1.02], "not resolved: the 95% interval"),
        # Narrow, but it holds 1.01.
        ([1.008, 1.012, 1.009, 1.011, 1.010, 1.010], "not resolved: the interval"),
    ],
)
def test_ratio_verdict_on_synthetic_timings(ratios, expected):
    dpo = [100.0 + 3 * index for index in range(len(ratios))]
    sdpo = [d * r for d, r in zip(dpo, ratios, strict=True)]
    verdict = overhead.ratio_verdict(overhead.ratio_interval(sdpo, dpo))
    assert verdict.startswith(expected), verdict
    assert overhead.ratio_verdict(None) == "not resolved: fewer than 2 rounds"


def test_report_gives_the_ratio_with_its_interval_and_verdict():
    dpo = [100.0, 101.0, 99.0, 100.0, 102.0, 98.0]
    sdpo = [d * ratio for d, ratio in zip(dpo, [1.03, 1.031] * 3, strict=True)]
    interval = overhead.ratio_interval(sdpo, dpo)
    result = {
        "preset": "sd15", "batch_pairs": 8, "resolution": 512, "rounds": 6,
        "steps_per_round": 4, "headline_variant": "eager", "ours": "sdpo-fused",
        "sdpo_over_dpo_step_ratio": 1.03, "speedup_vs_reference": 2.5, "modes": {},
        "ladder": [], "not_run": {}, "sdpo_over_dpo_interval": interval,
        "sdpo_over_dpo_verdict": overhead.ratio_verdict(interval),
        "sdpo_over_dpo_target": 1.01,
    }  # fmt: skip
    document = {
        "device": "NVIDIA H100 80GB HBM3", "date": "2026-12-08", "torch": "2.11",
        "triton": "3.6", "timings_meaningful": True, "overhead": result, "kernels": [],
    }  # fmt: skip
    report = overhead.markdown_report(document)
    assert f"95% interval [{interval['low']:.4f}, {interval['high']:.4f}] over 6 rounds" in report
    assert "paired t interval on the log" in report
    assert "- verdict against <= 1.01: misses (> 1.01)" in report
