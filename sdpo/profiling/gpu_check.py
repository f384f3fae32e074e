"""The whole GPU validation as one time-boxed command (entry point: profiling/gpu_check.sh).

    bash profiling/gpu_check.sh --wheels DIR --out OUT [--budget-s 520] [--dry-run]

Phases, in order, each in its own subprocess with a timeout from its share of what is left of
the budget (time a phase leaves unused goes to the later ones; a phase whose share is below its
minimum is skipped and says so). A phase that fails or times out is recorded and the next one
runs; the results are rewritten after every phase.

1. environment: GPU, SM count, driver, CUDA, torch, triton, the wheelhouse imports, measured
   copy bandwidth and bf16 matmul rate, and the eager fused op's host time with its launches
   stubbed on this host's CPU (target: <= 20 us per forward + backward beyond an empty
   autograd.Function's, the engine's fixed cost, timed in the same run);
2. build_and_tests: the CUDA C++ twin (cmake, the image's toolkit, this GPU's architecture),
   ``pytest -m "gpu and core"`` (kernels against the torch backend, CUDA-graph capture,
   compile), then ``pytest -m "gpu and not core and not slow"`` while time is left;
3. kernels: fused Triton, CUDA twin, torch eager and compiled, the reference trainer's sequence
   at the SD1.5 / SDXL / video sizes in bf16 and fp32; device time from CUDA-graph replay of a
   captured loop (events around the replay), the host time of one eager call separately;
4. trainer: ``python -m sdpo.train --model sd15 --pretrained random`` eager, then
   ``--cuda-graphs``, then (while time is left) ``--compile``, ``--channels-last`` and fp16,
   all with gradient accumulation 2, compared with eager; losses and final weights (tolerances
   below); fp16 runs to the end finite. Each run ends with ``--save-final weights`` and is read
   and deleted right after it;
5. overhead: ``sdpo-profile overhead --preset sd15`` as separate processes, cheapest first: the
   eager variants (reference -> online -> cached, plus channels-last and the SDPA kernels), then
   cuda-graphs, then compile (one cold compile each), each with its own results file written
   after every round; then (``--flow-overhead sd35,flux,wan``, optional) the flow presets
   eager-only at 2 pairs, then sdxl eager-only while time is left;
6. ncu: Nsight Compute over the fused kernels, when ``ncu`` is on PATH.

OUT receives at most four files: gpu_check.json, gpu_check.md, gpu_check.log and (phase 6)
ncu.csv. Scratch (trainer runs, raw profiler output) lives in a temporary folder.

``--dry-run`` walks the same phases on the CPU at tiny sizes (tiny preset, smoke kernel size,
Triton under its interpreter) so the script cannot rot; it finishes in about a minute.

Every run starts by printing the GPU run's plan (``plan``): per phase its share, its required
and optional seconds and its disk, estimated from the sizes and assumptions next to ``SLOT_S``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sdpo.profiling import REPOSITORY

# Modules the check imports that a CUDA PyTorch image may lack; the wheelhouse supplies them.
IMPORTS = ("torch", "triton", "diffusers", "transformers", "accelerate", "peft", "nvtx", "PIL")
# Reported when missing, not a failure, with what needs them: nvtx is the optional [profile]
# extra (the wheelhouse carries it for the GPU node, a plain `.[dev]` install does not); peft
# serves LoRA only, which no default phase runs (the GPU image has no peft).
OPTIONAL_IMPORTS = {
    "nvtx": "only --nvtx runs need it",
    "peft": "only LoRA runs need it: the flux and wan presets of --flow-overhead",
}
# Compiled and CUDA-graphed training against eager, bf16 autocast: per-step loss, model_mse_w
# and model_mse_l within 2% relative (bf16 has 8 mantissa bits, ~0.4% per rounding), and the
# final weights' distance from eager's at most 0.2 x the distance eager's last optimizer step
# moved them. The runs use AdamW with epsilon 1, learning rate 1 and no weight decay: with every
# gradient element far below 1 (the norm is clipped to 1 over 860M weights) the update is
# lr x gradient, so that ratio is the relative gradient error (bf16: a few %), while a
# gradient that drops or repeats a micro-batch of the accumulation is off by ~50% or more.
METRIC_RTOL = 2e-2
COMPARED_METRICS = ("loss", "model_mse_w", "model_mse_l")
WEIGHT_STEP_FRACTION = 0.2
# sdpo-profile overhead --variants: the whole attribution ladder in ONE interleaved run (same
# models, same process), so its factors compare like with like.
OVERHEAD_VARIANTS = (
    "eager",
    "compile",
    "cuda-graphs",
    "channels-last",
    "sdpa-flash",
    "sdpa-efficient",
    "sdpa-cudnn",
    "xformers",  # listed under not_run where xformers is not installed
)


@dataclass(frozen=True)
class Phase:
    name: str
    share: float  # of the budget left when the phase starts, over the shares of the phases left
    minimum_s: float  # below this the phase is skipped rather than started to be killed
    dry_minimum_s: float


# Shares sized by the plan below (`plan`, printed at the start of every run): each phase's
# required work fits its share of the default budget.
PHASES = (
    Phase("environment", 0.06, 20, 5),
    Phase("build_and_tests", 0.21, 40, 5),
    Phase("kernels", 0.10, 30, 5),
    Phase("trainer", 0.31, 60, 10),
    Phase("overhead", 0.27, 40, 5),
    Phase("ncu", 0.05, 20, 1),
)
# The last phase may overrun its deadline by the 10 s grace: 520 + 10 s fits the 540 s slot.
DEFAULT_BUDGET_S = 520.0


# ---------------------------------------------------------------------------------------------
# The driver: budget, subprocesses, results.


class Driver:
    def __init__(
        self,
        out: Path,
        budget_s: float,
        dry_run: bool,
        env: dict[str, str],
        flow_overhead: tuple[str, ...] = (),
    ):
        self.out = out
        self.flow_overhead = flow_overhead
        self.budget_s = budget_s
        self.dry_run = dry_run
        self.env = env
        self.start = time.monotonic()
        self.scratch = Path(tempfile.mkdtemp(prefix="sdpo-gpu-check-"))
        self.log_path = out / "gpu_check.log"
        self.results: dict = {
            "budget_s": budget_s,
            "dry_run": dry_run,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "phases": {},
        }

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def log(self, message: str) -> None:
        line = f"[gpu-check {time.monotonic() - self.start:6.1f}s] {message}"
        print(line, flush=True)
        with open(self.log_path, "a") as handle:
            handle.write(line + "\n")

    def run_command(self, command: list[str], timeout_s: float, env: dict | None = None) -> dict:
        """Runs a command in its own process group; its output goes to the log and the console.

        Returns rc (None on timeout), seconds and the last 4000 characters of output."""
        started = time.monotonic()
        self.log("$ " + " ".join(command) + f"  (timeout {timeout_s:.0f}s)")
        with tempfile.TemporaryFile(mode="w+") as capture:
            process = subprocess.Popen(
                command,
                cwd=REPOSITORY,
                env=env or self.env,
                stdout=capture,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                rc = process.wait(timeout=max(timeout_s, 1))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                rc = None
            capture.seek(0)
            output = capture.read()
        with open(self.log_path, "a") as handle:
            handle.write(output)
        sys.stdout.write(output)
        sys.stdout.flush()
        return {
            "command": " ".join(command),
            "rc": rc,
            "timed_out": rc is None,
            "seconds": round(time.monotonic() - started, 1),
            "output_tail": output[-4000:],
        }

    def flush(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.start, 1)
        json_path = self.out / "gpu_check.json"
        json_path.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        (self.out / "gpu_check.md").write_text(markdown(self.results))

    def run_phases(self, phases: tuple[Phase, ...]) -> None:
        for index, phase in enumerate(phases):
            shares_left = sum(p.share for p in phases[index:])
            share_s = self.left_s() * phase.share / shares_left
            minimum = phase.dry_minimum_s if self.dry_run else phase.minimum_s
            if share_s < minimum:
                reason = f"skipped: {share_s:.0f}s of budget left for it, needs >= {minimum:.0f}s"
                self.log(f"phase {phase.name}: {reason}")
                self.results["phases"][phase.name] = {"status": "skipped", "reason": reason}
                self.flush()
                continue
            self.log(f"phase {phase.name}: starting, {share_s:.0f}s of {self.left_s():.0f}s left")
            result_path = self.scratch / f"{phase.name}.json"
            deadline = time.time() + share_s
            command = [
                sys.executable,
                "-m",
                "sdpo.profiling.gpu_check",
                "--phase",
                phase.name,
                "--result",
                str(result_path),
                "--deadline",
                f"{deadline:.1f}",
                "--scratch",
                str(self.scratch),
                "--out",
                str(self.out),
            ] + (["--dry-run"] if self.dry_run else [])
            if self.flow_overhead:
                command += ["--flow-overhead", ",".join(self.flow_overhead)]
            # The phase watches its own deadline; 10 s grace for it to write what it has.
            run = self.run_command(command, share_s + 10)
            record = read_json(result_path)
            if run["timed_out"]:
                record["status"] = "timed out"
            elif run["rc"] != 0:
                record["status"] = f"failed (exit {run['rc']})"
                record.setdefault("error", run["output_tail"][-1500:])
            else:
                record.setdefault("status", "ok")
            record["seconds"] = run["seconds"]
            record["share_s"] = round(share_s, 1)
            self.results["phases"][phase.name] = record
            self.log(f"phase {phase.name}: {record['status']} in {run['seconds']:.0f}s")
            self.flush()


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------
# Phases (each runs in its own process: `python -m sdpo.profiling.gpu_check --phase NAME`).


class PhaseContext:
    """What a phase has: its deadline, a result dict written out after every step, scratch."""

    def __init__(self, arguments: argparse.Namespace):
        self.deadline = arguments.deadline
        self.result_path = Path(arguments.result)
        self.scratch = Path(arguments.scratch)
        self.out = Path(arguments.out)
        self.dry_run = arguments.dry_run
        self.flow_overhead = parse_flow_overhead(getattr(arguments, "flow_overhead", None))
        self.result: dict = {}

    def left_s(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        self.result_path.write_text(json.dumps(self.result, indent=2, default=str) + "\n")

    def say(self, message: str) -> None:
        print(f"  {message}", flush=True)

    def command(self, command: list[str], timeout_s: float, env: dict | None = None) -> dict:
        timeout_s = min(timeout_s, self.left_s())
        if timeout_s < 1:
            return {"command": " ".join(command), "rc": None, "skipped": "no time left"}
        started = time.monotonic()
        self.say("$ " + " ".join(command) + f"  (timeout {timeout_s:.0f}s)")
        try:
            completed = subprocess.run(
                command,
                cwd=REPOSITORY,
                env=env or os.environ.copy(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout_s,
                start_new_session=True,
            )
            rc, output = completed.returncode, completed.stdout
        except subprocess.TimeoutExpired as expired:
            rc = None
            output = expired.stdout.decode() if isinstance(expired.stdout, bytes) else ""
            output = (output or "") + f"\n(timed out after {timeout_s:.0f}s)"
        print(output, flush=True)
        return {
            "command": " ".join(command),
            "rc": rc,
            "seconds": round(time.monotonic() - started, 1),
            "output_tail": output[-2000:],
        }


def phase_environment(context: PhaseContext) -> None:
    import platform

    import torch

    result = context.result
    result["python"] = platform.python_version()
    versions = {}
    for module in IMPORTS:
        try:
            imported = __import__(module)
            versions[module] = {
                "version": getattr(imported, "__version__", None) or _distribution_version(module),
                "from": str(Path(imported.__file__).parent),
            }
        except Exception as error:
            versions[module] = {"error": f"{type(error).__name__}: {error}"}
    result["imports"] = versions
    result["declared_ranges"] = declared_range_check(versions)
    result["torch_cuda"] = torch.version.cuda
    result["cuda_available"] = torch.cuda.is_available()
    nvcc = shutil.which("nvcc")
    result["nvcc"] = _first_line([nvcc, "--version"], last=True) if nvcc else None
    result["ncu"] = shutil.which("ncu")
    result["nsys"] = shutil.which("nsys")
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        result["gpu"] = properties.name
        result["sm_count"] = properties.multi_processor_count
        result["compute_capability"] = f"{properties.major}.{properties.minor}"
        result["memory_gib"] = round(properties.total_memory / 2**30, 1)
        result["driver"] = _first_line(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        )
    else:
        result["gpu"] = None
    context.save()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    megabytes, matmul_n = (16, 256) if context.dry_run else (1024, 8192)
    result["copy_bandwidth_gbps"] = round(copy_bandwidth_gbps(device, megabytes), 1)
    context.save()
    result["matmul_tflops"] = round(matmul_tflops(device, matmul_n), 2)
    result["matmul"] = f"{matmul_n}^3, {'bf16' if device.type == 'cuda' else 'fp32 (CPU)'}"
    context.save()
    result["host_overhead"] = host_overhead(context)
    context.save()
    for key, value in result.items():
        context.say(f"{key}: {value}")
    missing = [
        name for name, info in versions.items() if "error" in info and name not in OPTIONAL_IMPORTS
    ]
    absent_optional = [name for name in OPTIONAL_IMPORTS if "error" in versions.get(name, {})]
    outside = [
        f"{name} {check['installed']} (pyproject: {name}>={check['minimum']})"
        for name, check in result["declared_ranges"].items()
        if check["in_range"] is False
    ]
    if outside:
        context.say(
            f"outside the range pyproject.toml declares and CI tests: {', '.join(outside)}; the "
            "check runs on, but its results are from an untested version"
        )
    if absent_optional:
        for name in absent_optional:
            context.say(f"optional, absent: {name} ({OPTIONAL_IMPORTS[name]})")
    if missing:
        raise SystemExit(f"environment: cannot import {', '.join(missing)} (see the wheelhouse)")


def _version_tuple(text: str) -> tuple[int, ...]:
    """(2, 11, 0) of "2.11.0+cu130" or "3.6.0": the leading dot-separated integers."""
    numbers = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(part) for part in numbers.group(0).split(".")) if numbers else ()


def declared_minimums(pyproject: Path | None = None) -> dict[str, str]:
    """{"torch": "2.13", "triton": "3.6"}: the lower bounds pyproject.toml's dependencies
    declare (the oldest versions CI runs)."""
    path = pyproject or REPOSITORY / "pyproject.toml"
    text = path.read_text()
    found = {}
    for name in ("torch", "triton"):
        match = re.search(rf'"{name}>=([0-9][0-9.]*)', text)
        if match:
            found[name] = match.group(1)
    return found


def declared_range_check(versions: dict) -> dict[str, dict]:
    """Per declared package: the installed version, the declared minimum and whether it is in
    range (None where it could not be imported). The GPU image's torch may be older than what
    CI can install and test; the results say so instead of passing for tested ones."""
    checks = {}
    for name, minimum in declared_minimums().items():
        installed = versions.get(name, {}).get("version")
        in_range = None
        if installed:
            in_range = _version_tuple(str(installed)) >= _version_tuple(minimum)
        checks[name] = {"installed": installed, "minimum": minimum, "in_range": in_range}
    return checks


# The eager fused op's host-time targets per forward + backward, measured with the kernel
# launches stubbed (sdpo/profiling/kernel_host_overhead.py) on this machine's CPU: the op layer's
# whole time was to be <= 30 us, but an empty autograd.Function alone (the autograd engine's
# fixed cost, which no custom op avoids) costs ~24 us on the 2-core development CPU. The verdict
# is on the op layer's time beyond that cost, measured in the same run: <= 20 us. Under
# --cuda-graphs neither is paid per step: the graph replays the kernels with no host work.
HOST_OVERHEAD_TARGET_US = 30.0
HOST_OVERHEAD_BEYOND_ENGINE_TARGET_US = 20.0


def host_overhead(context: PhaseContext) -> dict:
    """profiling.kernel_host_overhead in a subprocess (TRITON_INTERPRET=1 lets the Triton path
    take CPU tensors; no kernel runs): the op layer's, sdpo.preference_loss's and an empty
    autograd.Function's medians, and the verdict on the op layer's time beyond the last."""
    output = context.scratch / "host_overhead.json"
    repeats = "100" if context.dry_run else "2000"
    command = [sys.executable, "-m", "sdpo.profiling.kernel_host_overhead", "--repeats", repeats]
    environment = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    run = context.command([*command, "--output", str(output)], 90, env=environment)
    if run["rc"] != 0 or not output.is_file():
        return {"status": f"not measured (exit {run['rc']})", "run": run}
    measured = json.loads(output.read_text())
    return host_overhead_verdict(measured)


def host_overhead_verdict(measured: dict) -> dict:
    """The environment record of a kernel_host_overhead result: the medians (us, 0.1), the op
    layer's time beyond an empty autograd.Function's, judged against <= 20 us."""
    op_layer = measured["op_layer"]["median_us"]
    beyond_engine = measured["op_layer"]["median_us"] - measured["empty_function"]["median_us"]
    return {
        "op_layer_median_us": round(op_layer, 1),
        "preference_loss_median_us": round(measured["preference_loss"]["median_us"], 1),
        "empty_function_median_us": round(measured["empty_function"]["median_us"], 1),
        "op_layer_beyond_engine_us": round(beyond_engine, 1),
        "target_us": HOST_OVERHEAD_BEYOND_ENGINE_TARGET_US,
        "meets_target": beyond_engine <= HOST_OVERHEAD_BEYOND_ENGINE_TARGET_US,
        # The whole op layer against the original 30 us, for the record (not the verdict: it
        # includes the engine's fixed cost, ~24 us of it on a slow CPU).
        "whole_op_layer_target_us": HOST_OVERHEAD_TARGET_US,
        "whole_op_layer_meets_target": op_layer <= HOST_OVERHEAD_TARGET_US,
        # The autograd engine's fixed cost of one backward() call, paid once per training step
        # by any loss, and the op layer's time beyond it (context).
        "one_op_loss_backward_median_us": round(measured["one_op_loss_backward"]["median_us"], 1),
        "op_layer_beyond_backward_us": round(measured["op_layer_beyond_backward_us"], 1),
        "cuda_graphs": "--cuda-graphs replays the captured step: neither is paid per step",
        "n": measured["op_layer"]["n"],
        "cpu": measured.get("machine"),
    }


def _distribution_version(module: str) -> str:
    from importlib import metadata

    try:
        return metadata.version({"PIL": "pillow"}.get(module, module))
    except metadata.PackageNotFoundError:
        return "unknown"


def _first_line(command: list[str], last: bool = False) -> str | None:
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if not lines:
        return None
    return lines[-1] if last else lines[0]


def device_ms(step: Callable[[], object], device, inner: int, rounds: int) -> float:
    """Median ms per call: CUDA events around ``inner`` calls, or the wall clock on a CPU."""
    import torch

    from sdpo.profiling import kernel_bench

    if device.type == "cuda":
        return kernel_bench.time_cuda(step, inner=inner, rounds=rounds)
    step()
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(inner):
            step()
        samples.append((time.perf_counter() - started) * 1e3 / inner)
    torch.cpu.synchronize()
    return statistics.median(samples)


def copy_bandwidth_gbps(device, megabytes: int) -> float:
    """Bytes read + written per second by ``dst.copy_(src)`` of ``megabytes`` of fp32."""
    import torch

    source = torch.ones(megabytes * 2**20 // 4, device=device)
    destination = torch.empty_like(source)
    ms = device_ms(lambda: destination.copy_(source), device, inner=10, rounds=5)
    return 2 * source.numel() * 4 / (ms * 1e-3) / 1e9


def matmul_tflops(device, n: int) -> float:
    """bf16 n x n x n matmul rate (2 n^3 flops per call); fp32 on a CPU (bf16 is emulated)."""
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = device_ms(lambda: a @ b, device, inner=10, rounds=5)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def gpu_test_files() -> list[str]:
    """Test files holding a ``pytest.mark.gpu`` test (collecting only those saves ~20 s)."""
    return sorted(
        str(path.relative_to(REPOSITORY))
        for path in (REPOSITORY / "tests").rglob("test_*.py")
        if "mark.gpu" in path.read_text()
    )


def gpu_architecture() -> str | None:
    """The first GPU's compute capability as CMake names it ("90" for an H100/H200), or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}{minor}"


def phase_build_and_tests(context: PhaseContext) -> None:
    result = context.result
    jobs = str(max(1, min(16, os.cpu_count() or 1)))
    configure = ["cmake", "-S", ".", "-B", "build"]
    if not context.dry_run:
        configure.append("-DSDPO_REQUIRE_CUDA=ON")
        architecture = gpu_architecture()
        if architecture:
            # This GPU's architecture alone: the 27 dtype instantiations take ~50 s of nvcc per
            # architecture (measured on 2 cores), and the phase's share of a 520 s budget is
            # ~109 s; the default list (80, 90) would spend half of it on code this GPU never runs.
            configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={architecture}")
        result["cuda_architectures"] = architecture
    if shutil.which("cmake") is None:
        result["build"] = {"status": "skipped: cmake not on PATH"}
    else:
        build = ["cmake", "--build", "build", "-j", jobs]
        if context.dry_run:  # the CUDA library's nvcc compile alone takes ~60 s on 2 cores
            build += ["--target", "sdpo_cuda_host"]
        steps = [context.command(configure, 60), context.command(build, 240)]
        failed = [step for step in steps if step["rc"] != 0]
        result["build"] = {"status": "failed" if failed else "ok", "steps": steps}
        library = REPOSITORY / "build" / "libsdpo_cuda.so"
        result["build"]["cuda_library"] = str(library) if library.is_file() else None
    context.save()
    files = gpu_test_files()
    # The core GPU tests first (kernels against the torch backend, CUDA-graph capture, compile:
    # `pytest.mark.core`), the other GPU tests only with the time left. "not slow": the
    # trainer-level GPU tests (several compiles of the tiny UNet, minutes) are left to the
    # trainer phase, which runs the same comparisons on SD1.5.
    failed = []
    for key, selection in GPU_TEST_SELECTIONS:
        if key != "gpu_tests_core" and context.left_s() < GPU_OTHER_TESTS_MINIMUM_S:
            result[key] = {"skipped": f"{context.left_s():.0f}s left in the phase"}
            context.save()
            continue
        pytest = [sys.executable, "-m", "pytest", "-q", "-m", selection, "-p", "no:cacheprovider"]
        test = context.command([*pytest, *files], context.left_s() - 2)
        test["summary"] = _pytest_summary(test.get("output_tail", ""))
        result[key] = test
        context.save()
        if test["rc"] is None and key != "gpu_tests_core":
            test["status"] = "timed out: the phase's share ended (the core tests ran first)"
        elif test["rc"] not in (0, 5):
            failed.append(key)
    problems = ["the build"] if result["build"].get("status") == "failed" else []
    problems += [f"pytest -m '{dict(GPU_TEST_SELECTIONS)[key]}'" for key in failed]
    if problems:
        raise SystemExit(f"build_and_tests: {' and '.join(problems)} failed (see the log)")


# (result key, pytest -m expression), in the order they run.
GPU_TEST_SELECTIONS = (
    ("gpu_tests_core", "gpu and core"),
    ("gpu_tests_other", "gpu and not core and not slow"),
)
GPU_OTHER_TESTS_MINIMUM_S = 20.0


def _pytest_summary(output: str) -> str:
    pattern = re.compile(r"\d+ (passed|failed|skipped|deselected|errors?)\b.* in [\d.]+s")
    lines = [line.strip("= ") for line in output.splitlines() if pattern.search(line)]
    return lines[-1] if lines else ""


def phase_kernels(context: PhaseContext) -> None:
    import torch

    from sdpo.cuda_backend import library_path
    from sdpo.ops import interpreter_enabled
    from sdpo.profiling import kernel_bench

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = kernel_bench.SMOKE_SIZES if context.dry_run else kernel_bench.SIZES
    rows: list[dict] = []
    context.result["rows"] = rows
    context.result["timing"] = (
        "graph_ms: CUDA-graph replay of a captured loop of forward + backward calls over input "
        "copies rotated past L2, events around the replay (device time, no host overhead); "
        "eager_ms: events around back-to-back eager calls; host_ms: wall time of one eager call "
        "to return, GPU idle at its start (launch overhead)"
    )
    copy_gbps = None
    if device.type == "cuda":
        copy_gbps = kernel_bench.copy_bandwidth_gbps(device)
    context.result["copy_bandwidth_gbps"] = copy_gbps
    # Most telling first, in case the phase's share runs out: bf16 before fp32, the video size
    # (where the bandwidth target is set) before the smaller ones, torch.compile (one inductor
    # compile per shape and dtype, ~10-20 s each) last.
    size_order = sorted(sizes, key=lambda size: size != "video")
    implementations = sorted(kernel_bench.IMPLEMENTATIONS, key=lambda name: name == "torch-compile")
    for dtype_name, dtype in kernel_bench.DTYPES.items():
        for size_name in size_order:
            batch_pairs, sample_shape = sizes[size_name]
            for name in implementations:
                row = {"size": size_name, "dtype": dtype_name, "implementation": name}
                rows.append(row)
                skip = _kernel_skip_reason(name, device, context, library_path, interpreter_enabled)
                if skip is None and context.left_s() < 10:
                    skip = "no time left in the phase"
                if skip:
                    row["skipped"] = skip
                    context.save()
                    continue
                try:
                    row.update(
                        _time_case(kernel_bench, name, batch_pairs, sample_shape, dtype, device)
                    )
                    timed_ms = row.get("graph_ms") or row.get("eager_ms")
                    if copy_gbps and timed_ms:
                        row["gbps_from"] = "graph_ms" if row.get("graph_ms") else "eager_ms"
                        gbps = row["bytes"] / (timed_ms * 1e-3) / 1e9
                        row["gbps"] = round(gbps, 1)
                        row["pct_of_copy_bandwidth"] = round(100 * gbps / copy_gbps, 1)
                except Exception as error:
                    row["error"] = f"{type(error).__name__}: {error}"[:500]
                context.say(f"{size_name} {dtype_name} {name}: {row}")
                context.save()
    errors = [row for row in rows if "error" in row]
    if errors:
        raise SystemExit(f"kernels: {len(errors)} case(s) failed (see rows)")


def _kernel_skip_reason(name, device, context, library_path, interpreter_enabled) -> str | None:
    if name == "fused" and device.type != "cuda" and not interpreter_enabled():
        return "Triton needs CUDA or TRITON_INTERPRET=1"
    if name == "cuda" and (device.type != "cuda" or not library_path().is_file()):
        return "the CUDA twin needs a GPU and build/libsdpo_cuda.so"
    if name == "torch-compile" and context.dry_run:
        return "dry run: inductor's CPU compile alone takes longer than the dry run's minute"
    return None


def _time_case(kernel_bench, name, batch_pairs, sample_shape, dtype, device) -> dict:
    import torch

    case = kernel_bench.prepare_case(name, batch_pairs, sample_shape, dtype, device)
    row: dict = {"bytes": case.bytes_moved, "max_rel_grad_error_vs_torch": case.error}
    inner, rounds = (2, 2) if device.type != "cuda" else (20, 5)
    row["eager_ms"] = round(device_ms(case.step, device, inner, rounds), 4)
    host = []
    for _ in range(20 if device.type == "cuda" else 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        case.step()
        host.append((time.perf_counter() - started) * 1e3)
    row["host_ms"] = round(statistics.median(host), 4)
    if device.type == "cuda":
        try:
            row["graph_ms"] = round(_graph_ms(case.step, calls=20), 4)
        except Exception as error:  # e.g. a host sync inside the step: kept, eager time stands
            row["graph_error"] = f"{type(error).__name__}: {error}"[:300]
            torch.cuda.synchronize()
    return row


def _graph_ms(step: Callable[[], object], calls: int) -> float:
    """Device ms per call: ``calls`` calls captured in one CUDA graph, replayed between events."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up on a side stream, as capture requires
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            step()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / calls)
    return statistics.median(samples)


# name: (flags after the common ones, the run it is compared with; None: a baseline). Every
# variant runs at the common gradient accumulation (2): CUDA graphs included, whose gradients
# the trainer keeps in buffers outside the graph pool (train.step.PersistentGradients); a lost
# or doubled micro-batch moves the weights by about half the last step, 2.5x the tolerance.
# In the order they run: the comparison that matters most (CUDA graphs with accumulation
# against eager) first, so a share that runs out leaves it decided.
TRAIN_VARIANTS: dict[str, tuple[list[str], str | None]] = {
    "eager": ([], None),
    "cuda-graphs": (["--cuda-graphs"], "eager"),
    "compile": (["--compile"], "eager"),
    "channels-last": (["--channels-last"], "eager"),
    # fp16 with loss scaling: must run to the end with finite losses (a baseline of its own: its
    # rounding differs from bf16's, so no 2% comparison is claimed). The trainer checks the final
    # weights are finite before the end, so it writes nothing (--save-final none).
    "fp16": (["--mixed-precision", "fp16"], None),
}
# The runs the phase's share is planned for; the others run while time is left.
REQUIRED_TRAIN_VARIANTS = ("eager", "cuda-graphs")


def trainer_commands(dry_run: bool) -> dict[str, tuple[list[str], str | None]]:
    """{run: (its sdpo-train flags less --output-dir, the run it is compared with)}, in order.

    Every run ends with ``--save-final weights`` (unet/ alone: no optimizer state, no .pth, no
    final checkpoint); a baseline that others compare with also checkpoints one step before the
    end (its last step's size is the yardstick of the weight comparison); a baseline nothing
    compares with writes nothing."""
    if dry_run:
        base = ["--preset", "tiny", "--max-steps", "2", "--gradient-accumulation", "2"]
        # CPU: --compile and --cuda-graphs need inductor / CUDA; a second eager run exercises the
        # comparison (it must match exactly: same seed, same device).
        variants: dict[str, tuple[list[str], str | None]] = {
            "eager": ([], None),
            "eager-again": ([], "eager"),
        }
    else:
        base = [
            "--model", "sd15", "--pretrained", "random", "--resolution", "512",
            "--train-batch-pairs", "1", "--gradient-accumulation", "2", "--max-steps", "3",
            "--synthetic-pairs", "8", "--learning-rate", "1", "--adam-epsilon", "1",
            "--weight-decay", "0", "--max-grad-norm", "1", "--warmup-steps", "0",
            "--mixed-precision", "bf16", "--method", "diffusion-dpo", "--beta", "5000",
            "--mu", "0.9",
        ]  # fmt: skip
        variants = TRAIN_VARIANTS
    base += ["--seed", "0", "--log-every", "1", "--no-progress"]
    max_steps = int(base[base.index("--max-steps") + 1])
    compared_with = {baseline for _, baseline in variants.values() if baseline}
    commands = {}
    for name, (flags, baseline) in variants.items():
        if baseline is None and name in compared_with:
            ending = ["--save-final", "weights", "--checkpoint-every", str(max_steps - 1)]
        elif baseline is None:
            ending = ["--save-final", "none", "--checkpoint-every", "0"]
        else:
            ending = ["--save-final", "weights", "--checkpoint-every", "0"]
        commands[name] = ([*base, *flags, *ending], baseline)
    return commands


def _flag(flags: list[str], name: str, default: str | None = None) -> str | None:
    return flags[flags.index(name) + 1] if name in flags else default


def phase_trainer(context: PhaseContext) -> None:
    commands = trainer_commands(context.dry_run)
    runs: dict = {}
    context.result["runs"] = runs
    context.result["tolerance"] = (
        f"{', '.join(COMPARED_METRICS)} within {METRIC_RTOL:g} relative of the baseline's at "
        f"every step; final weights closer to the baseline's than {WEIGHT_STEP_FRACTION:g} x "
        "the distance the baseline's last step moved them"
    )
    # Each run's weights are read (and its folder deleted) right after it ends: at most one run's
    # files are on disk at a time (SD1.5: 13.8 GB for eager's, 3.44 GB for the others').
    yardsticks: dict[str, tuple[dict, float | None]] = {}
    failures, unfinished = [], []
    estimates = {name: trainer_run_estimate(flags) for name, (flags, _) in commands.items()}
    for name, (flags, baseline) in commands.items():
        output = context.scratch / f"train-{name}"
        shutil.rmtree(output, ignore_errors=True)
        needed_s = 5.0 if context.dry_run else estimates[name]["seconds"]
        if context.left_s() - 5 < needed_s and name not in REQUIRED_TRAIN_VARIANTS:
            runs[name] = {"skipped": f"{context.left_s():.0f}s left, needs ~{needed_s:.0f}s"}
            unfinished.append(name)
            context.save()
            continue
        command = [sys.executable, "-m", "sdpo.train", *flags, "--output-dir", str(output)]
        # What is left, less the estimates of the required runs after this one (the estimates
        # are not measurements: a run slower than its estimate still gets the time to end).
        later = list(commands)[list(commands).index(name) + 1 :]
        reserved = sum(
            estimates[other]["seconds"]
            for other in later
            if other in REQUIRED_TRAIN_VARIANTS and not context.dry_run
        )
        run = context.command(command, context.left_s() - 5 - reserved)
        run["metrics"] = _metrics(output / "metrics.jsonl")
        run["losses"] = run["metrics"].get("loss", [])
        run["compared_with"] = baseline
        runs[name] = run
        try:
            _judge_trainer_run(context, name, flags, baseline, runs, yardsticks)
        finally:
            shutil.rmtree(output, ignore_errors=True)
        if run["rc"] is None:
            unfinished.append(name)
        elif run["rc"] != 0:
            failures.append(f"{name}: exit {run['rc']}")
        elif run.get("matches_eager") is False:
            failures.append(
                f"{name}: metric error {run['max_metric_rel_error']}, weight distance "
                f"{run['weight_distance_to_eager']}"
            )
        elif run.get("unjudged"):
            unfinished.append(f"{name} ({run['unjudged']})")
        context.save()
    first = next(iter(commands))
    if runs[first].get("rc") is None:
        context.result["status"] = "skipped: the eager run did not finish in the phase's share"
        return
    if runs[first]["rc"] != 0:
        raise SystemExit("trainer: the eager run failed")
    if failures:
        raise SystemExit("trainer: " + "; ".join(failures))
    if unfinished:
        context.result["status"] = f"ok, but no verdict for {', '.join(unfinished)} (timed out)"


def _judge_trainer_run(
    context: PhaseContext,
    name: str,
    flags: list[str],
    baseline: str | None,
    runs: dict,
    yardsticks: dict[str, tuple[dict, float | None]],
) -> None:
    """A finished run's verdict while its folder still exists: a baseline keeps its final
    weights (in memory) and its last step's size; a compared run is measured against them."""
    run = runs[name]
    if run["rc"] != 0:
        return
    run_dir = context.scratch / f"train-{name}"
    if baseline is None:
        if _flag(flags, "--save-final") == "none":
            return
        max_steps = int(_flag(flags, "--max-steps"))
        weights = _final_weights(run_dir)
        before_last = _checkpoint_weights(run_dir, max_steps - 1)
        last_step = _distance(weights, before_last) if before_last else None
        yardsticks[name] = (weights, last_step)
        run["last_step_distance"] = last_step
        if name == "eager" or "eager_last_step_distance" not in context.result:
            context.result["eager_last_step_distance"] = last_step
        return
    if baseline not in yardsticks:
        run["unjudged"] = f"its baseline {baseline} did not finish"
        return
    reference, last_step = yardsticks[baseline]
    errors = [
        _max_relative(run["metrics"].get(key, []), runs[baseline]["metrics"].get(key, []))
        for key in COMPARED_METRICS
    ]
    loss_error = None if None in errors else max(errors)
    distance = _distance(_final_weights(run_dir), reference)
    run["max_metric_rel_error"] = loss_error
    run["weight_distance_to_eager"] = distance
    limit = WEIGHT_STEP_FRACTION * last_step if last_step else None
    ok = loss_error is not None and loss_error <= METRIC_RTOL
    ok = ok and distance is not None and (limit is None or distance <= limit)
    if context.dry_run:  # same device, same seed: must be bit-identical
        ok = loss_error == 0.0 and distance == 0.0
    run["matches_eager"] = ok


def _metrics(path: Path) -> dict[str, list[float]]:
    """The compared columns of a run's metrics.jsonl, one value per optimizer step."""
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {key: [row[key] for row in rows if key in row] for key in COMPARED_METRICS}


def _max_relative(values: list[float], reference: list[float]) -> float | None:
    if not values or len(values) != len(reference):
        return None
    return max(
        abs(value - expected) / max(abs(expected), 1e-12)
        for value, expected in zip(values, reference, strict=True)
    )


def _load_tensors(folder: Path) -> dict:
    """Every tensor in the safetensors / .pth / .bin files under ``folder``, keyed by file/name."""
    import torch
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".safetensors":
            loaded = load_file(str(path))
        elif path.suffix in (".pth", ".bin", ".pt"):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            loaded = loaded if isinstance(loaded, dict) else {}
        else:
            continue
        for key, value in loaded.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                tensors[key] = value.float()
    return tensors


def _final_weights(run_dir: Path) -> dict:
    return _load_tensors(run_dir / "unet") if (run_dir / "unet").is_dir() else {}


def _checkpoint_weights(run_dir: Path, step: int) -> dict:
    """The weights file of checkpoint-STEP; its training state (6.9 GB of AdamW moments for
    SD1.5) is not read."""
    from safetensors.torch import load_file

    from sdpo.train.checkpoint import MODEL_FILE

    path = run_dir / f"checkpoint-{step}" / MODEL_FILE
    if not path.is_file():
        return {}
    return {
        key: value.float()
        for key, value in load_file(str(path)).items()
        if value.is_floating_point()
    }


def _distance(tensors: dict, reference: dict) -> float | None:
    """L2 distance over the tensors both hold with the same shape; None if they share none."""
    total, shared = 0.0, 0
    for key, value in tensors.items():
        other = reference.get(key)
        if other is not None and other.shape == value.shape:
            total += float((value - other).double().pow(2).sum())
            shared += 1
    return math.sqrt(total) if shared else None


# --flow-overhead: the flow presets' overhead runs, eager at 2 pairs: at the sd35 preset's 8 pairs
# one SD3.5 Medium step at 1024 px is ~1.3e15 FLOP (2 x 2.24e9 parameters x ~4400 tokens per row,
# x4 for forward + backward + reference, x16 rows), ~3 s at 40% of an H100's bf16 peak, and five
# modes x 11 steps would take the whole phase. A dry run times the tiny preset of each family.
# The seconds each needs at least: placing the random transformer and T5-XXL / umT5-XXL
# (4.8-5.7B parameters) on the GPU, then the timed steps.
FLOW_OVERHEAD_PRESETS = {"sd35": "tiny-sd3", "flux": "tiny-flux", "wan": "tiny-wan"}
FLOW_OVERHEAD_NEEDED_S = {"sd35": 90, "flux": 120, "wan": 90}


def parse_flow_overhead(text: str | None) -> tuple[str, ...]:
    """``--flow-overhead sd35,flux`` -> ("sd35", "flux"); SystemExit naming an unknown one."""
    names = tuple(name.strip() for name in (text or "").split(",") if name.strip())
    unknown = [name for name in names if name not in FLOW_OVERHEAD_PRESETS]
    if unknown:
        raise SystemExit(
            f"gpu_check: --flow-overhead: unknown {', '.join(unknown)}; expected some of "
            f"{', '.join(FLOW_OVERHEAD_PRESETS)}"
        )
    return names


# The overhead variants of the alternatives run: the ladder's alternatives to its cached eager
# rung, with eager itself so their factors compare within one process.
OVERHEAD_ALTERNATIVES = ",".join(
    v for v in OVERHEAD_VARIANTS if v not in ("compile", "cuda-graphs")
)
# Variants that time only our SDPO step (sdpo.profiling.overhead.LADDER_ONLY_VARIANTS).
OVERHEAD_LADDER_ONLY = ("channels-last", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "xformers")


@dataclass(frozen=True)
class OverheadRun:
    """One sdpo-profile overhead process: preset, variants and its timing settings."""

    preset: str
    variants: str
    rounds: int
    steps: int
    warmup: int
    batch_pairs: int | None = None
    device: str | None = None

    def flags(self) -> list[str]:
        flags = ["--preset", self.preset, "--variants", self.variants]
        flags += ["--rounds", str(self.rounds), "--steps", str(self.steps)]
        flags += ["--warmup", str(self.warmup)]
        if self.batch_pairs is not None:
            flags += ["--batch-pairs", str(self.batch_pairs)]
        return flags + (["--device", self.device] if self.device else [])


def overhead_runs(dry_run: bool, flow_overhead: tuple[str, ...]) -> list[OverheadRun]:
    """The overhead phase's processes, cheapest first. sd15 eager with 6 ABBA rounds of 4 timed
    steps (each block's first step dropped: the SDPO/DPO ratio's interval needs the rounds),
    then cuda-graphs and compile (one cold SD1.5 compile each, ~75 s), then the eager
    alternatives (channels-last, SDPA kernels) at 3 x 3, then the flow presets and sdxl eager.
    Each writes its own results, after every round, so a share that runs out keeps every run
    before it and the rounds of the one it stopped."""
    if dry_run:
        runs = [OverheadRun("tiny", "eager,channels-last,sdpa-flash", 1, 1, 1, device="cpu")]
        runs += [
            OverheadRun(FLOW_OVERHEAD_PRESETS[name], "eager", 1, 1, 1, device="cpu")
            for name in flow_overhead
        ]
        return runs
    runs = [
        OverheadRun("sd15", "eager", 6, 4, 2),
        OverheadRun("sd15", "cuda-graphs", 6, 4, 2),
        OverheadRun("sd15", "compile", 6, 4, 2),
        OverheadRun("sd15", OVERHEAD_ALTERNATIVES, 3, 3, 2),
    ]
    runs += [OverheadRun(name, "eager", 2, 2, 1, batch_pairs=2) for name in flow_overhead]
    return [*runs, OverheadRun("sdxl", "eager", 3, 3, 2)]


def overhead_output_name(run: OverheadRun) -> str:
    """overhead-sd15-eager.json, overhead-sd15-cuda-graphs.json, overhead-sd15-alternatives.json:
    one file per run."""
    names = run.variants.split(",")
    group = names[0] if len(names) == 1 else "alternatives"
    return f"overhead-{run.preset}-{group}.json"


def phase_overhead(context: PhaseContext) -> None:
    reports: dict = {}
    context.result["runs"] = reports
    failed = []
    for run_settings in overhead_runs(context.dry_run, context.flow_overhead):
        key = f"{run_settings.preset}/{run_settings.variants}"
        needed_s = 5.0 if context.dry_run else overhead_run_estimate(run_settings)
        first = not reports
        if context.left_s() < needed_s and not first:
            reports[key] = {"skipped": f"{context.left_s():.0f}s left, needs ~{needed_s:.0f}s"}
            context.save()
            continue
        output = context.scratch / overhead_output_name(run_settings)
        command = [sys.executable, "-m", "sdpo.profiling.cli", "overhead", *run_settings.flags()]
        command += ["--output", str(output)]
        run = context.command(command, context.left_s() - 2)
        # Written after every round: a run killed at its deadline keeps the rounds it finished.
        run["results"] = read_json(output)
        markdown_path = output.with_suffix(".md")
        run["markdown"] = markdown_path.read_text() if markdown_path.is_file() else None
        reports[key] = run
        if run["rc"] not in (0, None):
            failed.append(key)
        context.save()
    if failed:
        raise SystemExit(f"overhead: sdpo-profile overhead failed for {', '.join(failed)}")


# Nsight Compute locks the GPU's clocks to base while it profiles unless told not to; the slot's
# rules leave the accelerator's settings as they are, so every profiling ncu call (here,
# profiling/ncu.sh, CMake's ncu-kernels) passes these. Durations are then at the clocks the
# trainer runs at (boost), not base.
NCU_CLOCK_FLAGS = ("--clock-control", "none")


def phase_ncu(context: PhaseContext) -> None:
    ncu = shutil.which("ncu")
    if ncu is None:
        context.result["status"] = "skipped: ncu not on PATH"
        context.save()
        return
    report = context.scratch / "ncu-fused"
    size = "smoke" if context.dry_run else "sdxl"
    script = (
        "import torch, sdpo\n"
        "from sdpo.profiling import kernel_bench\n"
        f"case = kernel_bench.prepare_case('fused', *kernel_bench.{'SMOKE_SIZES' if context.dry_run else 'SIZES'}"
        f"['{size}'], torch.bfloat16, torch.device('cuda'))\n"
        "case.step(); torch.cuda.synchronize()\n"
    )
    profile = context.command(
        [ncu, *NCU_CLOCK_FLAGS, "--target-processes", "all", "--kernel-name",
         "regex:pair_sums|finalize|gradient",
         "--launch-count", "6", "--section", "SpeedOfLight", "--section",
         "MemoryWorkloadAnalysis", "--export", str(report), "--force-overwrite",
         sys.executable, "-c", script],
        context.left_s() - 15,
    )  # fmt: skip
    context.result["profile"] = profile
    context.save()
    csv_path = context.out / "ncu.csv"
    if profile["rc"] == 0:
        completed = subprocess.run(
            [ncu, "--import", f"{report}.ncu-rep", "--csv", "--page", "raw"],
            capture_output=True,
            text=True,
            timeout=max(5, min(60, context.left_s())),
        )
        csv_path.write_text(completed.stdout)
        context.result["csv"] = str(csv_path)
        from sdpo.profiling import nsight

        try:
            context.result["summary"] = nsight.format_ncu_summary(
                nsight.summarize_ncu_csv(completed.stdout)
            )
        except Exception as error:
            context.result["summary_error"] = f"{type(error).__name__}: {error}"
    context.save()
    if profile["rc"] != 0:
        raise SystemExit("ncu: profiling the fused kernels failed")


PHASE_FUNCTIONS = {
    "environment": phase_environment,
    "build_and_tests": phase_build_and_tests,
    "kernels": phase_kernels,
    "trainer": phase_trainer,
    "overhead": phase_overhead,
    "ncu": phase_ncu,
}


# ---------------------------------------------------------------------------------------------
# The plan: per phase its share of the budget, and its time and disk estimates computed from the
# sizes below. tests/test_gpu_check.py fails when a phase's required work does not fit its share
# or the whole does not fit the slot. The seconds are ESTIMATES, not measurements (no GPU run
# has been recorded): each says what it assumes, so the first GPU log can correct it.

# The slot: one command of at most ~560 s after the machine starts, on a 64 GiB disk that also
# holds the image and the checkout; the check keeps 20 s and 24 GB of that spare.
SLOT_S = 540.0
SLOT_DISK_GB = 40.0
# `python -m ...` importing torch, diffusers and transformers: 7.6 s measured on the 2-core
# development machine; a GPU host's CPU is not slower.
PROCESS_START_S = 10.0
# SD1.5's UNet: 859,520,964 parameters (diffusers' UNet2DConditionModel at the SD1.5 config),
# fp32 weights; AdamW keeps two fp32 moments per weight.
SD15_UNET_PARAMETERS = 859_520_964
SD15_WEIGHTS_GB = SD15_UNET_PARAMETERS * 4 / 1e9  # 3.44 GB
SD15_ADAMW_STATE_GB = 2 * SD15_WEIGHTS_GB  # 6.88 GB
# Random SD1.5 (policy, reference copy, VAE, CLIP) initialised on the GPU: assumed 15 s.
SD15_BUILD_S = 15.0
# One trainer optimizer step at 512 px, 1 pair x accumulation 2, bf16, eager: assumed 1.5 s
# (~0.3 s of compute on an H100, the rest the first step's cuDNN autotuning, spread over 3).
SD15_TRAIN_STEP_S = 1.5
# A cold inductor compile of the policy (forward + backward) and the reference (forward):
# assumed 75 s on 16 cores; CUDA graphs record in the first steps on top (in the estimate).
SD15_COMPILE_S = 75.0
# One overhead-suite step (8 pairs at 512 px: 16 policy rows forward + backward, 16 reference
# rows forward), eager bf16: assumed 0.6 s; a compiled one 0.45 s.
SD15_OVERHEAD_STEP_S = 0.6
SD15_OVERHEAD_COMPILED_STEP_S = 0.45
# Checkpoints are fsync'd: the disk's sustained write rate, assumed 1 GB/s; reading back from
# the page cache 2 GB/s.
DISK_WRITE_GBPS = 1.0
DISK_READ_GBPS = 2.0
# nvcc for one architecture (the 27 dtype instantiations in one file): ~50 s measured on 2 cores.
NVCC_ONE_ARCHITECTURE_S = 50.0
BUILD_FOLDER_GB = 0.2
# The core GPU tests (kernels against the torch backend, graph capture, compile): assumed 40 s
# of tests plus collection.
GPU_CORE_TESTS_S = 40.0
GPU_OTHER_TESTS_S = 60.0
# A kernel benchmark case (prepare, eager timing, host timing, graph capture and replay) 1.5 s;
# a torch-compile case 15 s (one inductor compile per shape and dtype).
KERNEL_CASE_S = 1.5
KERNEL_COMPILE_CASE_S = 15.0
# The inductor / Triton caches one compiled process leaves under /tmp: assumed 0.5 GB.
COMPILE_CACHE_GB = 0.5
# ncu's replay of 6 kernels with two sections: assumed 15 s; its report ~0.05 GB.
NCU_REPLAY_S = 15.0


@dataclass(frozen=True)
class PlanItem:
    label: str
    seconds: float
    disk_gb: float = 0.0
    required: bool = True  # planned into the phase's share; optional items run if time is left
    kept: bool = True  # on disk until the check ends; False: deleted right after the item


def trainer_run_disk_gb(flags: list[str]) -> float:
    """What one SD1.5 `sdpo-train` run with ``flags`` writes: a checkpoint is the weights and
    AdamW's moments; the end writes (--save-final) full: a checkpoint, unet/ and unet.pth;
    weights: unet/; none: nothing."""
    max_steps = int(_flag(flags, "--max-steps"))
    every = int(_flag(flags, "--checkpoint-every", "0"))
    checkpoint_gb = SD15_WEIGHTS_GB + SD15_ADAMW_STATE_GB
    intermediate = (max_steps - 1) // every if every else 0
    final = {
        "full": checkpoint_gb + 2 * SD15_WEIGHTS_GB,
        "weights": SD15_WEIGHTS_GB,
        "none": 0.0,
    }[_flag(flags, "--save-final", "full")]
    return intermediate * checkpoint_gb + final


def trainer_run_estimate(flags: list[str]) -> dict:
    """{"seconds", "disk_gb"} of one SD1.5 trainer run, from the sizes above: start, build,
    compile (--compile or --cuda-graphs), steps, writing, and the check reading its weights."""
    disk_gb = trainer_run_disk_gb(flags)
    compiled = "--compile" in flags or "--cuda-graphs" in flags
    read_gb = SD15_WEIGHTS_GB * (2 if _flag(flags, "--checkpoint-every", "0") != "0" else 1)
    read_gb = read_gb if _flag(flags, "--save-final", "full") != "none" else 0.0
    seconds = PROCESS_START_S + SD15_BUILD_S + (SD15_COMPILE_S if compiled else 0.0)
    seconds += int(_flag(flags, "--max-steps")) * SD15_TRAIN_STEP_S
    seconds += disk_gb / DISK_WRITE_GBPS + read_gb / DISK_READ_GBPS
    return {"seconds": round(seconds, 1), "disk_gb": round(disk_gb, 2)}


def overhead_run_estimate(run: OverheadRun) -> float:
    """Seconds of one sdpo-profile overhead run on the GPU: per mode its warm-up and, per round,
    one dropped and ``steps`` timed steps (plus the reference and online modes every run has);
    flow presets and sdxl: FLOW_OVERHEAD_NEEDED_S / the 60 s sdxl needs to place its weights,
    plus 30 s of steps."""
    names = run.variants.split(",")
    if run.preset != "sd15":
        return float(FLOW_OVERHEAD_NEEDED_S.get(run.preset, 60)) + 30.0
    compiled = names[0] in ("compile", "cuda-graphs")
    available = [name for name in names if name != "xformers"]  # not in the image
    steps_per_mode = run.warmup + run.rounds * (run.steps + 1)
    eager_modes = 2 + sum(1 if n in OVERHEAD_LADDER_ONLY else 3 for n in available if not compiled)
    step_s = SD15_OVERHEAD_COMPILED_STEP_S if compiled else SD15_OVERHEAD_STEP_S
    seconds = PROCESS_START_S + SD15_BUILD_S + 5.0  # + FLOP counting and the matmul rate
    seconds += eager_modes * steps_per_mode * SD15_OVERHEAD_STEP_S
    if compiled:
        seconds += SD15_COMPILE_S + 3 * steps_per_mode * step_s
    return round(seconds, 1)


def phase_plan_items(name: str, flow_overhead: tuple[str, ...] = ()) -> list[PlanItem]:
    """What a GPU run of phase ``name`` does, item by item, with its estimates."""
    if name == "environment":
        return [
            PlanItem("imports, versions, nvidia-smi", PROCESS_START_S + 2),
            PlanItem("copy bandwidth and bf16 matmul rate", 3),
            PlanItem("host overhead (kernels stubbed, subprocess)", PROCESS_START_S + 5),
        ]
    if name == "build_and_tests":
        return [
            PlanItem("cmake configure + nvcc for this GPU's architecture", 5 + NVCC_ONE_ARCHITECTURE_S,
                     BUILD_FOLDER_GB),
            PlanItem("pytest -m 'gpu and core'", PROCESS_START_S + GPU_CORE_TESTS_S),
            PlanItem("pytest -m 'gpu and not core and not slow'", GPU_OTHER_TESTS_S,
                     required=False),
        ]  # fmt: skip
    if name == "kernels":
        from sdpo.profiling import kernel_bench

        cases = len(kernel_bench.SIZES) * len(kernel_bench.DTYPES)
        plain = [n for n in kernel_bench.IMPLEMENTATIONS if n != "torch-compile"]
        return [
            PlanItem("phase start, copy bandwidth", PROCESS_START_S + 2),
            PlanItem(f"{cases * len(plain)} cases: {', '.join(plain)}", cases * len(plain) * KERNEL_CASE_S),
            PlanItem(f"{cases} torch-compile cases", cases * KERNEL_COMPILE_CASE_S, required=False),
        ]  # fmt: skip
    if name == "trainer":
        items = []
        for run, (flags, baseline) in trainer_commands(dry_run=False).items():
            estimate = trainer_run_estimate(flags)
            against = f" vs {baseline}" if baseline else ""
            items.append(
                PlanItem(
                    f"sdpo-train sd15 {run}{against}",
                    estimate["seconds"],
                    estimate["disk_gb"],
                    required=run in REQUIRED_TRAIN_VARIANTS,
                    kept=False,  # read and deleted right after the run
                )
            )
        return items
    if name == "overhead":
        return [
            PlanItem(
                f"sdpo-profile overhead {run.preset} {run.variants} ({run.rounds}x{run.steps})",
                overhead_run_estimate(run),
                COMPILE_CACHE_GB if run.variants in ("compile", "cuda-graphs") else 0.0,
                required=index == 0,
            )
            for index, run in enumerate(overhead_runs(False, flow_overhead))
        ]
    if name == "ncu":
        return [PlanItem("ncu over the fused kernels (sdxl size)", PROCESS_START_S + NCU_REPLAY_S,
                         0.05)]  # fmt: skip
    raise ValueError(f"plan: unknown phase {name!r}")


def plan(
    budget_s: float, phases: tuple[Phase, ...] = PHASES, flow_overhead: tuple[str, ...] = ()
) -> dict:
    """Per phase: its share of ``budget_s`` (as at the start: a phase that ends early gives the
    later ones more), the seconds of its required and optional items, and its peak disk; the
    check's peak disk (what is kept, plus the largest item deleted after it ran)."""
    total_share = sum(phase.share for phase in phases)
    rows = []
    kept_gb, transient_gb = 0.0, 0.0
    for phase in phases:
        items = phase_plan_items(phase.name, flow_overhead)
        kept = sum(item.disk_gb for item in items if item.kept)
        transient = max((item.disk_gb for item in items if not item.kept), default=0.0)
        kept_gb += kept
        transient_gb = max(transient_gb, transient)
        rows.append(
            {
                "phase": phase.name,
                "share_s": round(budget_s * phase.share / total_share, 1),
                "required_s": round(sum(i.seconds for i in items if i.required), 1),
                "optional_s": round(sum(i.seconds for i in items if not i.required), 1),
                "disk_gb": round(kept + transient, 2),
                "items": [dataclasses.asdict(item) for item in items],
            }
        )
    return {
        "budget_s": budget_s,
        "slot_s": SLOT_S,
        "slot_disk_gb": SLOT_DISK_GB,
        "required_s": round(sum(row["required_s"] for row in rows), 1),
        "peak_disk_gb": round(kept_gb + transient_gb, 2),
        "phases": rows,
    }


def plan_problems(planned: dict) -> list[str]:
    """What in the plan does not fit: a phase's required work over its share, the budget or the
    required total over the slot, the peak disk over the slot's."""
    problems = [
        f"{row['phase']}: required ~{row['required_s']:.0f}s > its share {row['share_s']:.0f}s"
        for row in planned["phases"]
        if row["required_s"] > row["share_s"]
    ]
    if planned["budget_s"] > planned["slot_s"]:
        problems.append(f"budget {planned['budget_s']:.0f}s > the slot's {planned['slot_s']:.0f}s")
    if planned["required_s"] > planned["budget_s"]:
        problems.append(
            f"required ~{planned['required_s']:.0f}s > the budget {planned['budget_s']:.0f}s"
        )
    if planned["peak_disk_gb"] > planned["slot_disk_gb"]:
        problems.append(
            f"peak disk ~{planned['peak_disk_gb']:.1f} GB > {planned['slot_disk_gb']:.0f} GB"
        )
    return problems


def format_plan(planned: dict) -> str:
    lines = [
        f"plan for a GPU run, budget {planned['budget_s']:.0f}s (slot {planned['slot_s']:.0f}s, "
        f"{planned['slot_disk_gb']:.0f} GB); estimates, not measurements:",
        f"  {'phase':<16} {'share s':>8} {'required s':>11} {'optional s':>11} {'disk GB':>8}",
    ]
    for row in planned["phases"]:
        lines.append(
            f"  {row['phase']:<16} {row['share_s']:>8.0f} {row['required_s']:>11.0f} "
            f"{row['optional_s']:>11.0f} {row['disk_gb']:>8.1f}"
        )
    lines.append(
        f"  required ~{planned['required_s']:.0f}s; peak disk ~{planned['peak_disk_gb']:.1f} GB"
    )
    for problem in plan_problems(planned):
        lines.append(f"  DOES NOT FIT: {problem}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Report.


def markdown(results: dict) -> str:
    lines = [
        "# GPU check"
        + (" (dry run, CPU, tiny sizes: no timing claims)" if results["dry_run"] else ""),
        "",
        f"Started {results['started']}, budget {results['budget_s']:.0f}s, "
        f"elapsed {results.get('elapsed_s', 0):.0f}s.",
        "",
        "| phase | status | seconds | share s |",
        "|---|---|---|---|",
    ]
    for name, record in results["phases"].items():
        status = record.get("status", "?")
        reason = record.get("reason", "")
        lines.append(
            f"| {name} | {status} {reason} | {record.get('seconds', '')} | "
            f"{record.get('share_s', '')} |"
        )
    if results.get("plan"):
        lines += ["", "## Plan (estimates for a GPU run, not measurements)", "", "```"]
        lines += [format_plan(results["plan"]), "```"]
    environment = results["phases"].get("environment", {})
    if environment.get("imports"):
        lines += ["", "## Environment", ""]
        for key in ("gpu", "sm_count", "driver", "torch_cuda", "nvcc", "python"):
            lines.append(f"- {key}: {environment.get(key)}")
        for module, info in environment["imports"].items():
            lines.append(f"- {module}: {info.get('version', info.get('error'))}")
        for name, check in (environment.get("declared_ranges") or {}).items():
            if check["in_range"] is False:
                lines.append(
                    f"- **{name} {check['installed']} is below pyproject's {name}>="
                    f"{check['minimum']}**: CI never runs this version (`tests/torch_floor.sh` "
                    "runs the check's tests on it on a CPU); read the results with that"
                )
        lines.append(f"- copy bandwidth: {environment.get('copy_bandwidth_gbps')} GB/s")
        lines.append(
            f"- matmul {environment.get('matmul')}: {environment.get('matmul_tflops')} TFLOP/s"
        )
        overhead = environment.get("host_overhead") or {}
        if "op_layer_median_us" in overhead:
            verdict = "meets" if overhead["meets_target"] else "misses"
            lines.append(
                f"- eager fused op, host time with launches stubbed (median of {overhead['n']}): "
                f"op layer {overhead['op_layer_median_us']} us, of which an empty "
                f"autograd.Function (the engine's fixed cost) {overhead['empty_function_median_us']}"
                f" us; beyond it {overhead['op_layer_beyond_engine_us']} us: {verdict} the "
                f"<= {overhead['target_us']:g} us target; sdpo.preference_loss "
                f"{overhead['preference_loss_median_us']} us. Under --cuda-graphs none of this is "
                "paid per step (the graph replays the kernels with no host work)"
            )
        elif overhead:
            lines.append(f"- eager fused op host time: {overhead.get('status')}")
    build = results["phases"].get("build_and_tests", {})
    if build:
        lines += ["", "## Build and GPU tests", ""]
        lines.append(f"- CUDA twin build: {build.get('build', {}).get('status')}")
        for key, selection in GPU_TEST_SELECTIONS:
            record = build.get(key, {})
            summary = record.get("status") or record.get("summary") or record.get("skipped")
            lines.append(f"- pytest -m '{selection}': {summary}")
    kernels = results["phases"].get("kernels", {})
    if kernels.get("rows"):
        lines += ["", "## Kernels (forward + backward)", "", kernels.get("timing", ""), ""]
        lines += [
            "| size | dtype | implementation | graph ms | eager ms | host ms | GB/s | % copy | note |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in kernels["rows"]:
            note = row.get("skipped") or row.get("error") or row.get("graph_error") or ""
            lines.append(
                f"| {row['size']} | {row['dtype']} | {row['implementation']} | "
                f"{row.get('graph_ms', '')} | {row.get('eager_ms', '')} | "
                f"{row.get('host_ms', '')} | {row.get('gbps', '')} | "
                f"{row.get('pct_of_copy_bandwidth', '')} | {note} |"
            )
    trainer = results["phases"].get("trainer", {})
    if trainer.get("runs"):
        lines += ["", "## Trainer", "", f"Tolerance: {trainer.get('tolerance')}", ""]
        lines += ["| run | exit | seconds | losses | metric rel err | weight dist | matches |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for name, run in trainer["runs"].items():
            losses = ", ".join(f"{loss:.5g}" for loss in run.get("losses", []))
            lines.append(
                f"| {name} | {run.get('rc')} | {run.get('seconds')} | {losses} | "
                f"{run.get('max_metric_rel_error', '')} | {run.get('weight_distance_to_eager', '')}"
                f" | {run.get('matches_eager', '')} |"
            )
        lines.append(
            f"\nEager's last step moved the weights by {trainer.get('eager_last_step_distance')}."
        )
    overhead = results["phases"].get("overhead", {})
    for key, run in overhead.get("runs", {}).items():
        lines += ["", f"## Overhead: {key}", ""]
        lines.append(run.get("markdown") or run.get("skipped") or f"exit {run.get('rc')}")
    ncu = results["phases"].get("ncu", {})
    if ncu.get("summary"):
        lines += ["", "## Nsight Compute (fused kernels)", "", "```", ncu["summary"], "```"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Command line.


def install_wheels(driver: Driver, wheels: Path) -> Path:
    """pip installs the wheelhouse into wheels/site with no index and no dependencies, so the
    image's torch, triton and CUDA stay as they are."""
    site = wheels / "site"
    files = sorted(str(path) for path in wheels.glob("*.whl"))
    if not files:
        raise SystemExit(
            f"gpu_check: --wheels {wheels} holds no .whl files (profiling/wheelhouse.sh)"
        )
    # By name from the folder, not by file: it holds wheels for several Pythons, and pip picks
    # the one this interpreter can use.
    names = sorted({Path(file).name.split("-")[0] for file in files})
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
    command += ["--upgrade", "--find-links", str(wheels), "--target", str(site), *names]
    run = driver.run_command(command, max(30, min(120, driver.left_s() / 4)))
    driver.results["install"] = {k: run[k] for k in ("command", "rc", "seconds")}
    if run["rc"] != 0:
        raise SystemExit("gpu_check: installing the wheelhouse failed (see gpu_check.log)")
    return site


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu_check.sh", description="The whole GPU validation as one time-boxed command."
    )
    parser.add_argument("--wheels", default=None, help="the folder profiling/wheelhouse.sh filled")
    parser.add_argument("--out", required=True, help="results folder (at most 4 files)")
    parser.add_argument(
        "--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall-clock budget, s"
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, ~1 minute")
    parser.add_argument("--phases", default=None, help="comma list, default all, in order")
    parser.add_argument(
        "--flow-overhead",
        default=None,
        help="comma list of sd35, flux, wan: also time these flow presets' overhead (eager, "
        "2 pairs, random weights; 90-120 s each); the dry run times tiny-sd3/-flux/-wan",
    )
    # Internal: run one phase (the driver starts these).
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    if arguments.phase is not None:
        context = PhaseContext(arguments)
        try:
            PHASE_FUNCTIONS[arguments.phase](context)
        finally:
            context.save()
        return 0
    if not math.isfinite(arguments.budget_s) or arguments.budget_s < 30:
        print(
            f"gpu_check: --budget-s must be >= 30 seconds, got {arguments.budget_s}",
            file=sys.stderr,
        )
        return 2
    phases = PHASES
    if arguments.phases:
        wanted = [name.strip() for name in arguments.phases.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in PHASE_FUNCTIONS]
        if unknown:
            print(
                f"gpu_check: --phases: unknown {', '.join(unknown)}; expected some of "
                f"{', '.join(PHASE_FUNCTIONS)}",
                file=sys.stderr,
            )
            return 2
        phases = tuple(phase for phase in PHASES if phase.name in wanted)
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("gpu_check.json", "gpu_check.md", "gpu_check.log", "ncu.csv"):
        (out / name).unlink(missing_ok=True)
    env = os.environ.copy()
    try:
        flow_overhead = parse_flow_overhead(arguments.flow_overhead)
    except SystemExit as error:
        print(error, file=sys.stderr)
        return 2
    driver = Driver(out, arguments.budget_s, arguments.dry_run, env, flow_overhead)
    python_path = [str(REPOSITORY)]
    inherited = [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry]
    if arguments.wheels:
        wheels = Path(arguments.wheels)
        if not wheels.is_dir():
            print(f"gpu_check: --wheels {wheels} is not a folder", file=sys.stderr)
            return 2
        python_path.insert(0, str(install_wheels(driver, wheels.resolve())))
    env["PYTHONPATH"] = os.pathsep.join(
        [*python_path, *(entry for entry in inherited if entry not in python_path)]
    )
    env.setdefault("PYTHONUNBUFFERED", "1")
    if arguments.dry_run:
        env.setdefault("TRITON_INTERPRET", "1")
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
    driver.log(f"budget {arguments.budget_s:.0f}s, out {out}, PYTHONPATH {env['PYTHONPATH']}")
    # The GPU run's plan, on a dry run too (it runs the tiny sizes, but plans what a GPU does).
    planned = plan(arguments.budget_s, phases, flow_overhead)
    driver.results["plan"] = planned
    for line in format_plan(planned).splitlines():
        driver.log(line)
    try:
        driver.run_phases(phases)
    finally:
        shutil.rmtree(driver.scratch, ignore_errors=True)
        driver.flush()
    statuses = {name: record.get("status") for name, record in driver.results["phases"].items()}
    driver.log("done: " + ", ".join(f"{name} {status}" for name, status in statuses.items()))
    driver.log(f"results: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}, {driver.log_path}")
    bad = [
        name for name, status in statuses.items() if not str(status).startswith(("ok", "skipped"))
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
