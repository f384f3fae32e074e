"""sdpo/profiling/gpu_check.py: the budget, the timeouts, the offline install and the comparisons.

The whole dry run (every phase on the CPU) runs in the README's test block; these tests pin the
parts a dry run cannot show failing: a phase that overruns is killed and the next one still runs,
a phase with too small a share is skipped and says so, and bad arguments are refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from sdpo.profiling import gpu_check


def make_driver(tmp_path: Path, budget_s: float) -> gpu_check.Driver:
    out = tmp_path / "out"
    out.mkdir()
    return gpu_check.Driver(out, budget_s, dry_run=True, env={"PATH": "/usr/bin:/bin"})


def test_run_command_kills_an_overrunning_process_group(tmp_path):
    driver = make_driver(tmp_path, 60)
    marker = tmp_path / "child-survived"
    # The child outlives its parent shell unless the whole process group is killed.
    script = f"(sleep 3; touch {marker}) & sleep 30"
    started = time.monotonic()
    run = driver.run_command(["bash", "-c", script], timeout_s=1)
    assert run["timed_out"] and run["rc"] is None
    assert time.monotonic() - started < 10
    time.sleep(3.5)
    assert not marker.exists(), "a process of the timed-out phase kept running"


def test_overrunning_phase_is_recorded_and_the_next_phase_runs(tmp_path, monkeypatch):
    driver = make_driver(tmp_path, 60)
    commands = []

    def fake_run(command, timeout_s, env=None):
        name = command[command.index("--phase") + 1]
        commands.append((name, timeout_s))
        result = Path(command[command.index("--result") + 1])
        if name == "first":
            result.write_text(json.dumps({"partial": 1}))
            return {"rc": None, "timed_out": True, "seconds": timeout_s, "output_tail": ""}
        return {"rc": 0, "timed_out": False, "seconds": 1.0, "output_tail": ""}

    monkeypatch.setattr(driver, "run_command", fake_run)
    phases = (gpu_check.Phase("first", 0.5, 1, 1), gpu_check.Phase("second", 0.5, 1, 1))
    driver.run_phases(phases)
    saved = json.loads((driver.out / "gpu_check.json").read_text())
    assert saved["phases"]["first"]["status"] == "timed out"
    assert saved["phases"]["first"]["partial"] == 1  # what it wrote before the kill is kept
    assert saved["phases"]["second"]["status"] == "ok"
    assert [name for name, _ in commands] == ["first", "second"]
    # Half the budget each (plus the 10 s grace for a phase to write what it has).
    assert commands[0][1] == pytest.approx(30 + 10, abs=1)


def test_phase_below_its_minimum_is_skipped_with_the_reason(tmp_path, monkeypatch):
    driver = make_driver(tmp_path, 60)
    monkeypatch.setattr(driver, "run_command", lambda *a, **k: pytest.fail("must not start"))
    driver.run_phases((gpu_check.Phase("big", 1.0, 600, 600),))
    record = json.loads((driver.out / "gpu_check.json").read_text())["phases"]["big"]
    assert record["status"] == "skipped"
    assert "needs >= 600s" in record["reason"]
    assert "| big | skipped" in (driver.out / "gpu_check.md").read_text()


def test_unused_time_goes_to_the_later_phases(tmp_path, monkeypatch):
    driver = make_driver(tmp_path, 100)
    shares = []

    def fake_run(command, timeout_s, env=None):
        shares.append(timeout_s - 10)
        return {"rc": 0, "timed_out": False, "seconds": 0.0, "output_tail": ""}

    monkeypatch.setattr(driver, "run_command", fake_run)
    phases = tuple(gpu_check.Phase(name, 0.25, 1, 1) for name in "abcd")
    driver.run_phases(phases)
    # Each phase returned at once, so each later one gets a larger part of what is left.
    assert shares[0] == pytest.approx(25, abs=1)
    assert shares[1] == pytest.approx(100 / 3, abs=1)
    assert shares[3] == pytest.approx(100, abs=1)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--budget-s", "10"], "--budget-s must be >= 30"),
        (["--budget-s", "nan"], "--budget-s must be >= 30"),
        (["--phases", "environment,bogus"], "unknown bogus"),
        (["--wheels", "/nonexistent/wheels"], "is not a folder"),
        (["--flow-overhead", "sd35,sdxl"], "--flow-overhead: unknown sdxl"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, capsys, arguments, message):
    assert gpu_check.main(["--out", str(tmp_path / "out"), *arguments]) == 2
    assert message in capsys.readouterr().err


def test_flow_overhead_reaches_the_overhead_phase(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    driver = gpu_check.Driver(out, 60, True, {"PATH": "/usr/bin:/bin"}, ("sd35", "flux"))
    commands = []

    def fake_run(command, timeout_s, env=None):
        commands.append(command)
        return {"rc": 0, "timed_out": False, "seconds": 0.0, "output_tail": ""}

    monkeypatch.setattr(driver, "run_command", fake_run)
    driver.run_phases((gpu_check.Phase("overhead", 1.0, 1, 1),))
    assert commands[0][commands[0].index("--flow-overhead") + 1] == "sd35,flux"


@pytest.mark.parametrize("dry_run", [False, True])
def test_overhead_phase_runs_the_requested_flow_presets(tmp_path, monkeypatch, dry_run):
    arguments = gpu_check._parser().parse_args(
        ["--out", str(tmp_path), "--result", str(tmp_path / "r.json"), "--scratch", str(tmp_path)]
        + ["--deadline", str(time.time() + 3600), "--flow-overhead", "flux,sd35"]
        + (["--dry-run"] if dry_run else [])
    )
    context = gpu_check.PhaseContext(arguments)
    commands = []

    def fake_command(command, timeout_s, env=None):
        commands.append(command)
        return {"rc": 0}

    monkeypatch.setattr(context, "command", fake_command)
    gpu_check.phase_overhead(context)
    presets = [command[command.index("--preset") + 1] for command in commands]
    if dry_run:
        assert presets == ["tiny", "tiny-flux", "tiny-sd3"]
        return
    # sd15's ladder as three processes, cheapest first (its eager variants, then each cold
    # compile alone), each with its own results file; then the flow presets, eager at 2 pairs,
    # then sdxl.
    assert presets == ["sd15", "sd15", "sd15", "sd15", "flux", "sd35", "sdxl"]
    variants = [command[command.index("--variants") + 1] for command in commands]
    assert variants[:3] == ["eager", "cuda-graphs", "compile"]
    assert variants[3].startswith("eager,channels-last,")
    # The SDPO/DPO ratio's runs: at least 6 rounds of 4 steps.
    for command in commands[:3]:
        assert int(command[command.index("--rounds") + 1]) >= 6
        assert int(command[command.index("--steps") + 1]) >= 4
    outputs = [command[command.index("--output") + 1] for command in commands]
    assert len(set(outputs)) == len(outputs)
    for command in commands[4:6]:
        assert command[command.index("--variants") + 1] == "eager"
        assert command[command.index("--batch-pairs") + 1] == "2"
    assert "--batch-pairs" not in commands[0] and "--batch-pairs" not in commands[6]


def test_empty_wheel_folder_is_refused(tmp_path):
    (tmp_path / "wheels").mkdir()
    with pytest.raises(SystemExit, match=r"holds no \.whl files"):
        gpu_check.main(["--out", str(tmp_path / "out"), "--wheels", str(tmp_path / "wheels")])


def build_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel holding module ``name`` with ``VERSION = version``."""
    files = {
        f"{name}.py": f"VERSION = {version!r}\n",
        f"{name}-{version}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        ),
        f"{name}-{version}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record_lines = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record_lines.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record = f"{name}-{version}.dist-info/RECORD"
    files[record] = "\n".join([*record_lines, f"{record},,"]) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def test_wheelhouse_installs_offline_into_its_site_folder(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build_wheel(wheels, "sdpo_offline_probe", "1.2.3")
    driver = make_driver(tmp_path, 120)
    driver.env = {"PATH": "/usr/bin:/bin", "PIP_NO_INDEX": "1"}
    site = gpu_check.install_wheels(driver, wheels)
    assert site == wheels / "site"
    assert driver.results["install"]["rc"] == 0
    version = subprocess.run(
        [sys.executable, "-c", "import sdpo_offline_probe as m; print(m.VERSION)"],
        env={"PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert version == "1.2.3"


def test_loss_and_weight_comparisons():
    import torch

    assert gpu_check._max_relative([1.0, 2.02], [1.0, 2.0]) == pytest.approx(0.01)
    assert gpu_check._max_relative([1.0], [1.0, 2.0]) is None  # a missing step is no match
    a = {"w": torch.zeros(2, 2), "b": torch.zeros(3)}
    b = {"w": torch.full((2, 2), 0.5), "b": torch.zeros(3), "other": torch.ones(1)}
    assert gpu_check._distance(a, b) == pytest.approx(1.0)  # sqrt(4 x 0.25)
    assert gpu_check._distance({"x": torch.zeros(1)}, b) is None


def test_pytest_summary_line_is_found():
    output = "sss\n169 skipped, 320 deselected in 10.54s\n"
    assert gpu_check._pytest_summary(output) == "169 skipped, 320 deselected in 10.54s"
    assert (
        gpu_check._pytest_summary("== 3 passed, 1 failed in 2.00s ==")
        == "3 passed, 1 failed in 2.00s"
    )
    assert gpu_check._pytest_summary("no tests ran") == ""


REPOSITORY = Path(__file__).resolve().parent.parent


def test_toolchain_matrix_oldest_leg_is_the_declared_triton_bound():
    pyproject = (REPOSITORY / "pyproject.toml").read_text()
    declared = re.search(r'"triton>=([\d.]+)', pyproject).group(1)
    matrix = (REPOSITORY / "tests" / "toolchain_matrix.sh").read_text()
    oldest = re.search(r'"([\d.]+):oldest declared', matrix).group(1)
    # pyproject says ">=3.6"; the leg installs exactly 3.6.0, the oldest release that allows.
    assert oldest.split(".")[: len(declared.split("."))] == declared.split(".")
    assert oldest.endswith(".0")


def test_toolchain_matrix_refuses_a_version_it_has_no_leg_for():
    completed = subprocess.run(
        ["bash", str(REPOSITORY / "tests" / "toolchain_matrix.sh"), "9.9.9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2
    assert "no leg for Triton 9.9.9" in completed.stderr


def fake_trainer(tmp_path: Path, outcomes: dict, monkeypatch) -> gpu_check.PhaseContext:
    """A trainer phase whose runs write chosen metrics and weights instead of training.

    ``outcomes[variant]`` = (exit code, loss scale, final weight); eager ends at weight 1.0 after
    a last step from 0.9 (so a step moved each of its 4 elements by 0.1: distance 0.2)."""
    import torch
    from safetensors.torch import save_file

    from sdpo.train.checkpoint import MODEL_FILE

    arguments = argparse_namespace(tmp_path)
    context = gpu_check.PhaseContext(arguments)

    def command(command, timeout_s, env=None):
        output = Path(command[command.index("--output-dir") + 1])
        variant = output.name.removeprefix("train-")
        rc, loss_scale, weight = outcomes[variant]
        if rc == 0:
            (output / "unet").mkdir(parents=True)
            rows = [
                {"step": step, "loss": 0.69 * loss_scale, "model_mse_w": 1.0, "model_mse_l": 1.1}
                for step in (1, 2, 3)
            ]
            (output / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            save_file({"w": torch.full((4,), weight)}, str(output / "unet" / "model.safetensors"))
            if command[command.index("--checkpoint-every") + 1] != "0":
                folder = output / "checkpoint-2"
                folder.mkdir()
                save_file({"w": torch.full((4,), 0.9)}, str(folder / MODEL_FILE))
        return {"command": " ".join(command), "rc": rc}

    monkeypatch.setattr(context, "command", command)
    return context


def argparse_namespace(tmp_path: Path):
    import argparse

    return argparse.Namespace(
        deadline=time.time() + 600,
        result=str(tmp_path / "trainer.json"),
        scratch=str(tmp_path),
        out=str(tmp_path),
        dry_run=False,
    )


ALL_FINE = {name: (0, 1.0, 1.0) for name in gpu_check.TRAIN_VARIANTS}


def test_trainer_runs_graphs_with_accumulation_against_eager(tmp_path, monkeypatch):
    context = fake_trainer(tmp_path, dict(ALL_FINE), monkeypatch)
    gpu_check.phase_trainer(context)
    runs = context.result["runs"]
    graphs = runs["cuda-graphs"]["command"].split()
    # The last --gradient-accumulation on the command line wins: the graphs accumulate 2.
    last = len(graphs) - 1 - graphs[::-1].index("--gradient-accumulation")
    assert graphs[last + 1] == "2"
    assert "--cuda-graphs" in graphs
    assert runs["cuda-graphs"]["compared_with"] == "eager"
    assert runs["cuda-graphs"]["matches_eager"] is True


def test_trainer_comparison_accepts_bf16_noise_and_catches_a_lost_micro_batch(
    tmp_path, monkeypatch
):
    # compile: 0.5% loss noise, weights 0.01 off per element (distance 0.02 = 0.1 x the step).
    # cuda-graphs: weights half a step off (what dropping one of two micro-batches looks like).
    outcomes = {**ALL_FINE, "compile": (0, 1.005, 1.01), "cuda-graphs": (0, 1.0, 1.05)}
    context = fake_trainer(tmp_path, outcomes, monkeypatch)
    with pytest.raises(
        SystemExit, match=r"cuda-graphs: metric error 0\.0, weight distance 0\.09999"
    ):
        gpu_check.phase_trainer(context)
    runs = context.result["runs"]
    assert context.result["eager_last_step_distance"] == pytest.approx(0.2)
    assert runs["compile"]["matches_eager"] is True
    assert runs["cuda-graphs"]["matches_eager"] is False


def test_trainer_comparison_catches_a_loss_off_by_more_than_two_percent(tmp_path, monkeypatch):
    outcomes = {**ALL_FINE, "compile": (0, 1.03, 1.0)}
    context = fake_trainer(tmp_path, outcomes, monkeypatch)
    with pytest.raises(SystemExit, match=r"compile: metric error 0\.03"):
        gpu_check.phase_trainer(context)


def test_trainer_records_a_failing_variant_and_a_timed_out_one(tmp_path, monkeypatch):
    outcomes = {**ALL_FINE, "compile": (None, 1.0, 1.0), "cuda-graphs": (1, 1.0, 1.0)}
    context = fake_trainer(tmp_path, outcomes, monkeypatch)
    with pytest.raises(SystemExit, match="cuda-graphs: exit 1"):
        gpu_check.phase_trainer(context)
    outcomes["cuda-graphs"] = (0, 1.0, 1.0)
    context = fake_trainer(tmp_path / "again", outcomes, monkeypatch)
    gpu_check.phase_trainer(context)
    assert context.result["status"] == "ok, but no verdict for compile (timed out)"


def test_environment_phase_passes_without_the_optional_nvtx(tmp_path):
    """nvtx is the optional [profile] extra: a `.[dev]` install (CI's) lacks it, and the
    environment phase must say so without failing (it failed the first clean-clone dry run)."""
    blocked = tmp_path / "blocked" / "nvtx"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text('raise ModuleNotFoundError("No module named nvtx")\n')
    command = [
        sys.executable,
        "-m",
        "sdpo.profiling.gpu_check",
        "--phase",
        "environment",
        "--result",
        str(tmp_path / "environment.json"),
        "--deadline",
        str(time.time() + 100),
        "--scratch",
        str(tmp_path / "scratch"),
        "--out",
        str(tmp_path / "out"),
        "--dry-run",
    ]
    (tmp_path / "scratch").mkdir()
    environment = {**os.environ, "PYTHONPATH": str(blocked.parent)}
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=environment
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "optional, absent: nvtx" in completed.stdout + completed.stderr
    # The host-overhead measurement ran (kernels stubbed) and was judged against the target.
    phase_record = json.loads((tmp_path / "environment.json").read_text())
    overhead = phase_record["host_overhead"]
    # The verdict: the op layer beyond an empty autograd.Function timed in the same run.
    assert overhead["op_layer_median_us"] > 0 and overhead["empty_function_median_us"] > 0
    assert overhead["target_us"] == 20.0
    beyond = overhead["op_layer_median_us"] - overhead["empty_function_median_us"]
    assert abs(overhead["op_layer_beyond_engine_us"] - beyond) <= 0.11
    assert overhead["meets_target"] == (overhead["op_layer_beyond_engine_us"] <= 20.0)
    assert overhead["one_op_loss_backward_median_us"] > 0
    report = gpu_check.markdown(
        {
            "dry_run": True,
            "started": "now",
            "budget_s": 1,
            "phases": {"environment": phase_record},
        }
    )
    assert f"beyond it {overhead['op_layer_beyond_engine_us']} us:" in report
    assert "Under --cuda-graphs none of this is paid per step" in report


def _host_result(op_layer_us: float, empty_us: float) -> dict:
    summary = {"median_us": 0.0, "n": 2000}
    return {
        "op_layer": {**summary, "median_us": op_layer_us},
        "preference_loss": {**summary, "median_us": op_layer_us + 5},
        "one_op_loss_backward": {**summary, "median_us": 20.0},
        "empty_function": {**summary, "median_us": empty_us},
        "op_layer_beyond_backward_us": op_layer_us - 20.0,
        "machine": "x86_64",
    }


@pytest.mark.parametrize(
    ("op_layer_us", "empty_us", "meets", "whole_meets"),
    [
        (42.0, 24.0, True, False),  # the dev CPU's case: 18 us of its own, over 30 in all
        (50.0, 24.0, False, False),  # 26 us beyond the engine's cost
        (25.0, 10.0, True, True),
    ],
)
def test_host_overhead_verdict_subtracts_the_engines_fixed_cost(
    op_layer_us, empty_us, meets, whole_meets
):
    verdict = gpu_check.host_overhead_verdict(_host_result(op_layer_us, empty_us))
    assert verdict["op_layer_beyond_engine_us"] == pytest.approx(op_layer_us - empty_us)
    assert verdict["meets_target"] is meets and verdict["target_us"] == 20.0
    assert verdict["whole_op_layer_meets_target"] is whole_meets


def test_build_phase_compiles_for_the_gpus_own_architecture_and_skips_slow_tests(
    tmp_path, monkeypatch
):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (9, 0))
    folder, deadline = str(tmp_path), str(time.time() + 3600)
    arguments = gpu_check._parser().parse_args(
        [
            "--out",
            folder,
            "--result",
            f"{folder}/r.json",
            "--scratch",
            folder,
            "--deadline",
            deadline,
        ]
    )
    context = gpu_check.PhaseContext(arguments)
    commands = []

    def fake_command(command, timeout_s, env=None):
        commands.append(command)
        return {"rc": 0, "output_tail": "3 passed in 1.0s"}

    monkeypatch.setattr(context, "command", fake_command)
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: f"/usr/bin/{name}")
    gpu_check.phase_build_and_tests(context)
    configure = next(command for command in commands if command[:2] == ["cmake", "-S"])
    assert "-DCMAKE_CUDA_ARCHITECTURES=90" in configure
    assert "-DSDPO_REQUIRE_CUDA=ON" in configure
    selections = [
        command[command.index("-m", 3) + 1] for command in commands if "pytest" in command
    ]
    # The core GPU tests first, then the others (never the slow trainer-level ones).
    assert selections == ["gpu and core", "gpu and not core and not slow"]
    assert context.result["cuda_architectures"] == "90"


def test_build_phase_runs_the_other_gpu_tests_only_with_time_left(tmp_path, monkeypatch):
    context = gpu_check.PhaseContext(argparse_namespace(tmp_path))
    commands = []

    def fake_command(command, timeout_s, env=None):
        commands.append(command)
        if "pytest" in command:  # the core tests take the phase's time
            context.deadline = time.time() + 5
        return {"rc": 0, "output_tail": "3 passed in 1.0s"}

    monkeypatch.setattr(context, "command", fake_command)
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: f"/usr/bin/{name}")
    gpu_check.phase_build_and_tests(context)
    pytest_commands = [command for command in commands if "pytest" in command]
    assert len(pytest_commands) == 1
    assert pytest_commands[0][pytest_commands[0].index("-m", 3) + 1] == "gpu and core"
    assert context.result["gpu_tests_core"]["summary"] == "3 passed in 1.0s"
    assert context.result["gpu_tests_other"]["skipped"].endswith("s left in the phase")


def test_core_gpu_tests_are_the_kernels_capture_and_compile_checks():
    """Every test marked core is a GPU test; the core set covers the fused Triton kernels and
    the CUDA twin against the torch backend, CUDA-graph capture and torch.compile."""
    core = {}
    for path in (REPOSITORY / "tests").rglob("test_*.py"):
        text = path.read_text()
        for match in re.finditer(
            r"((?:@pytest\.mark\.[^\n]*\n|    [^\n]*\n|\)\n)*)def (test_\w+)", text
        ):
            decorators, name = match.group(1), match.group(2)
            if "@pytest.mark.core" in decorators:
                assert "@pytest.mark.gpu" in decorators, f"{path.name}::{name} is core, not gpu"
                core[name] = path.name
    assert core == {
        "test_video_size_on_gpu": "test_triton_backend.py",
        "test_cuda_graph_captures_forward_and_backward": "test_triton_backend.py",
        "test_gpu_matches_torch": "test_cuda_backend.py",
        "test_gpu_layouts_weights_compile_and_graph_capture": "test_cuda_backend.py",
        "test_torch_backend_is_sync_free_under_cuda_graph_capture": "test_objectives.py",
    }


def test_declared_ranges_come_from_pyproject_and_flag_an_older_torch(tmp_path):
    """The GPU image's torch (2.11) is older than pyproject's torch>=2.13 (what CI can install):
    the environment record and the report say so instead of passing it off as tested."""
    import tomllib

    declared = gpu_check.declared_minimums()
    pyproject = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())
    dependencies = pyproject["project"]["dependencies"]
    assert f"torch>={declared['torch']}" in dependencies
    assert any(entry.startswith(f"triton>={declared['triton']}") for entry in dependencies)

    versions = {
        "torch": {"version": "2.11.0+cu130"},
        "triton": {"version": declared["triton"] + ".0"},
    }
    checks = gpu_check.declared_range_check(versions)
    assert checks["torch"] == {
        "installed": "2.11.0+cu130",
        "minimum": declared["torch"],
        "in_range": False,
    }
    assert checks["triton"]["in_range"] is True
    assert gpu_check.declared_range_check({"torch": {"error": "x"}})["torch"]["in_range"] is None
    assert gpu_check._version_tuple("2.13.0+cpu") > gpu_check._version_tuple("2.9")
    report = gpu_check.markdown(
        {
            "dry_run": False,
            "started": "now",
            "budget_s": 1,
            "phases": {
                "environment": {"status": "ok", "imports": versions, "declared_ranges": checks}
            },
        }
    )
    assert f"torch 2.11.0+cu130 is below pyproject's torch>={declared['torch']}" in report
    assert "triton" not in report.split("is below")[-1]  # only the one outside is flagged


def _profiling_ncu_calls(arguments_per_call: list[list[str]]) -> list[list[str]]:
    """The ncu calls that launch a program under the profiler (``--import`` only reads one)."""
    return [arguments for arguments in arguments_per_call if "--import" not in arguments]


def _has_clock_control_none(arguments: list[str]) -> bool:
    return any(
        arguments[index : index + 2] == ["--clock-control", "none"]
        for index in range(len(arguments) - 1)
    )


def test_gpu_check_ncu_leaves_the_clocks_alone(tmp_path, monkeypatch):
    context = gpu_check.PhaseContext(argparse_namespace(tmp_path))
    calls = []

    def fake_command(command, timeout_s, env=None):
        calls.append(command[1:])
        return {"rc": 0}

    def fake_run(command, **kwargs):
        calls.append(command[1:])
        return subprocess.CompletedProcess(command, 0, stdout="", stderr="")

    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: "/opt/nsight/ncu")
    monkeypatch.setattr(context, "command", fake_command)
    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    gpu_check.phase_ncu(context)
    profiling = _profiling_ncu_calls(calls)
    assert profiling and all(_has_clock_control_none(call) for call in profiling), calls


def test_ncu_script_leaves_the_clocks_alone(tmp_path):
    """profiling/ncu.sh with a recording ncu (and a python that does nothing) on PATH."""
    log = tmp_path / "ncu-calls"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ncu").write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {log}\n')
    (fake / "python").write_text("#!/bin/sh\nexit 0\n")
    for name in ("ncu", "python"):
        (fake / name).chmod(0o755)
    completed = subprocess.run(
        ["bash", str(REPOSITORY / "profiling" / "ncu.sh"), str(tmp_path / "out" / "loss")],
        env={"PATH": f"{fake}:/usr/bin:/bin"},
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    calls = [line.split() for line in log.read_text().splitlines()]
    profiling = _profiling_ncu_calls(calls)
    assert len(profiling) == 1 and _has_clock_control_none(profiling[0]), calls


def test_cmake_ncu_target_leaves_the_clocks_alone():
    text = (REPOSITORY / "CMakeLists.txt").read_text()
    # Every ncu command word of the file, up to the end of its CMake call.
    calls = [
        match.group(1).split()
        for match in re.finditer(r"(?m)^\s*(?:COMMAND\s.*?\s)?ncu\s([^)]*)", text)
    ]
    assert calls, "no ncu call found in CMakeLists.txt"
    assert all(_has_clock_control_none(call) for call in _profiling_ncu_calls(calls)), calls


def test_plan_fits_every_phase_share_the_slot_and_its_disk():
    """The GPU run's plan at the default budget: each phase's required work within its share,
    the budget and the required total within the 540 s slot, the peak disk within 40 GB."""
    planned = gpu_check.plan(gpu_check.DEFAULT_BUDGET_S, flow_overhead=("sd35", "flux", "wan"))
    assert gpu_check.plan_problems(planned) == []
    assert planned["budget_s"] + 10 <= gpu_check.SLOT_S  # + the last phase's grace
    trainer = next(row for row in planned["phases"] if row["phase"] == "trainer")
    # Runs are deleted after each: the peak is eager's checkpoint-2 (weights + AdamW) + unet/.
    assert trainer["disk_gb"] == pytest.approx(4 * gpu_check.SD15_WEIGHTS_GB, abs=0.01)


def test_plan_names_what_does_not_fit(monkeypatch):
    short = gpu_check.plan(300)
    problems = gpu_check.plan_problems(short)
    assert any(problem.startswith("trainer: required") for problem in problems), problems
    assert any(problem.startswith("required ~") for problem in problems), problems
    assert "DOES NOT FIT: trainer" in gpu_check.format_plan(short)
    assert "budget 600s > the slot's 540s" in gpu_check.plan_problems(gpu_check.plan(600))
    # A model three times SD1.5's size: eager's checkpoint + export alone pass 40 GB.
    monkeypatch.setattr(gpu_check, "SD15_WEIGHTS_GB", 3 * gpu_check.SD15_WEIGHTS_GB)
    monkeypatch.setattr(gpu_check, "SD15_ADAMW_STATE_GB", 2 * gpu_check.SD15_WEIGHTS_GB)
    problems = gpu_check.plan_problems(gpu_check.plan(gpu_check.DEFAULT_BUDGET_S))
    assert any(problem.startswith("peak disk ~") for problem in problems), problems


def test_trainer_disk_estimate_comes_from_each_runs_flags():
    weights = gpu_check.SD15_WEIGHTS_GB
    assert weights == pytest.approx(3.44, abs=0.005)
    commands = gpu_check.trainer_commands(dry_run=False)
    disk = {name: gpu_check.trainer_run_disk_gb(flags) for name, (flags, _) in commands.items()}
    # eager: checkpoint-2 (weights + two AdamW moments) and unet/; compared runs unet/ alone;
    # fp16 (compared with nothing) writes nothing.
    assert disk["eager"] == pytest.approx(4 * weights)
    assert disk["cuda-graphs"] == disk["compile"] == disk["channels-last"] == pytest.approx(weights)
    assert disk["fp16"] == 0
    # What the phase wrote before --save-final: every run's end a checkpoint + unet/ + unet.pth,
    # both baselines a checkpoint-2 as well: ~107 GB.
    before = [
        [flag for flag in flags if flag not in ("--save-final", "weights", "none")]
        for flags, _ in commands.values()
    ]
    for flags in before:
        flags[flags.index("--checkpoint-every") + 1] = "2"
        flags += ["--save-final", "full"]
    before[1][before[1].index("--checkpoint-every") + 1] = "0"  # compared runs: no checkpoint
    before[2][before[2].index("--checkpoint-every") + 1] = "0"
    before[3][before[3].index("--checkpoint-every") + 1] = "0"
    total = sum(gpu_check.trainer_run_disk_gb(flags) for flags in before)
    assert total == pytest.approx(107, abs=1)


def test_trainer_phase_deletes_each_run_before_the_next(tmp_path, monkeypatch):
    context = fake_trainer(tmp_path, dict(ALL_FINE), monkeypatch)
    recorded = context.command
    seen = []

    def command(command, timeout_s, env=None):
        seen.append(sorted(path.name for path in Path(context.scratch).glob("train-*")))
        return recorded(command, timeout_s, env)

    monkeypatch.setattr(context, "command", command)
    gpu_check.phase_trainer(context)
    assert seen == [[]] * len(gpu_check.TRAIN_VARIANTS)
    assert not list(Path(context.scratch).glob("train-*"))
    assert list(context.result["runs"]) == [
        "eager",
        "cuda-graphs",
        "compile",
        "channels-last",
        "fp16",
    ]
    assert context.result["runs"]["cuda-graphs"]["matches_eager"] is True


def test_dry_run_prints_the_gpu_plan(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--phases", "ncu"]) == 0
    printed = capsys.readouterr().out
    assert "plan for a GPU run, budget 520s" in printed
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [row["phase"] for row in saved["plan"]["phases"]] == ["ncu"]
    assert "## Plan" in (tmp_path / "gpu_check.md").read_text()


def test_overhead_ladder_only_list_matches_the_suite():
    from sdpo.profiling import overhead

    assert gpu_check.OVERHEAD_LADDER_ONLY == overhead.LADDER_ONLY_VARIANTS


@pytest.mark.parametrize("dry_run", [False, True])
def test_trainer_run_timeouts_keep_time_for_the_required_runs_after(tmp_path, monkeypatch, dry_run):
    context = fake_trainer(tmp_path, dict(ALL_FINE, **{"eager-again": (0, 1.0, 1.0)}), monkeypatch)
    context.dry_run = dry_run
    recorded = context.command
    timeouts = {}

    def command(command, timeout_s, env=None):
        name = Path(command[command.index("--output-dir") + 1]).name.removeprefix("train-")
        timeouts[name] = (timeout_s, context.left_s())
        return recorded(command, timeout_s, env)

    monkeypatch.setattr(context, "command", command)
    gpu_check.phase_trainer(context)
    flags = dict(gpu_check.trainer_commands(dry_run))
    for name, (timeout_s, left_s) in timeouts.items():
        later = list(flags)[list(flags).index(name) + 1 :]
        reserved = (
            0.0
            if dry_run
            else sum(
                gpu_check.trainer_run_estimate(flags[other][0])["seconds"]
                for other in later
                if other in gpu_check.REQUIRED_TRAIN_VARIANTS
            )
        )
        # Not capped at a multiple of an estimate (the dry run's CPU runs take minutes).
        assert timeout_s == pytest.approx(left_s - 5 - reserved, abs=1), name
    if not dry_run:
        assert timeouts["eager"][0] < timeouts["cuda-graphs"][0] - 90
