"""``sdpo-profile``: the overhead suite and the Nsight summarisers.

sdpo-profile overhead --preset sd15 [--variants eager,compile,cuda-graphs] [--kernels]
sdpo-profile nsys-summary REPORT.sqlite
sdpo-profile ncu-summary REPORT.csv
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from sdpo.profiling import RESULTS_DIR
from sdpo.train.config import integer_at_least

# (rounds, timed steps per mode per round, warm-up steps) when the flags are not given.
GPU_SCHEDULE = (5, 10, 3)
CPU_SCHEDULE = (2, 2, 1)


def _device(text: str) -> str:
    """cpu, cuda or cuda:N (what the overhead suite can time)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdpo-profile", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    overhead = commands.add_parser(
        "overhead",
        help="step time, peak memory and MFU of plain DPO, DPO + SDPO and the reference's work",
    )
    overhead.add_argument(
        "--preset",
        default="tiny",
        help="sd15, sdxl, sd35 (SD3.5 Medium), flux (FLUX.1-dev LoRA), wan (Wan 2.1 1.3B LoRA): "
        "random weights of the real architecture; tiny, tiny-sd3, tiny-flux, tiny-wan: CPU smoke "
        "runs",
    )
    overhead.add_argument(
        "--variants",
        default=None,
        help="comma list of eager, compile, cuda-graphs, channels-last, sdpa-flash, "
        "sdpa-efficient, sdpa-cudnn (default: all on a GPU, channels-last listed as not run for "
        "a flow preset; eager on a CPU)",
    )
    overhead.add_argument(
        "--rounds",
        type=integer_at_least(1),
        default=None,
        help="interleaved rounds (default 5 on a GPU, 2 on a CPU)",
    )
    overhead.add_argument(
        "--steps",
        type=integer_at_least(1),
        default=None,
        help="timed steps per mode per round (default 10 on a GPU, 2 on a CPU)",
    )
    overhead.add_argument(
        "--warmup",
        type=integer_at_least(0),
        default=None,
        help="untimed steps per mode first (default 3 on a GPU, 1 on a CPU)",
    )
    overhead.add_argument(
        "--batch-pairs",
        type=integer_at_least(1),
        default=None,
        help="pairs per step (default: the preset's)",
    )
    overhead.add_argument(
        "--kernels", action="store_true", help="also time the fused loss at the benchmark sizes"
    )
    overhead.add_argument(
        "--output",
        default=None,
        help="results JSON (a .md table is written beside it); default "
        "profiling/results/<device>-<date>.json on a GPU, required on a CPU",
    )
    overhead.add_argument(
        "--device",
        type=_device,
        default=None,
        help="cpu, cuda or cuda:N (default: cuda if present)",
    )
    nsys = commands.add_parser("nsys-summary", help="time per NVTX range and per kernel")
    nsys.add_argument("report", help="the SQLite export of an Nsight Systems report")
    nsys.add_argument("--json", default=None, help="also write the summary here")
    nsys.add_argument("--top", type=integer_at_least(1), default=15, help="kernels to list")
    ncu = commands.add_parser("ncu-summary", help="duration and DRAM throughput per kernel")
    ncu.add_argument("csv", help="`ncu --import R --csv --page raw --metrics ...` output")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    try:
        return _run(arguments)
    except (ValueError, FileNotFoundError) as error:
        print(f"sdpo-profile: error: {error}", file=sys.stderr)
        return 2


def _run(arguments: argparse.Namespace) -> int:
    if arguments.command == "nsys-summary":
        from sdpo.profiling import nsight

        summary = nsight.summarize_nsys(arguments.report)
        print(nsight.format_nsys_summary(summary, top=arguments.top))
        if arguments.json:
            Path(arguments.json).write_text(json.dumps(summary, indent=2) + "\n")
        return 0
    if arguments.command == "ncu-summary":
        from sdpo.profiling import nsight

        path = Path(arguments.csv)
        if not path.is_file():
            raise FileNotFoundError(f"ncu summary: no such file {path}")
        print(nsight.format_ncu_summary(nsight.summarize_ncu_csv(path.read_text())))
        return 0

    import datetime

    import torch

    from sdpo.profiling import overhead

    device = torch.device(arguments.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but no CUDA device is visible")
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device: {device} requested but {torch.cuda.device_count()} CUDA device(s) are "
                "visible (numbered from 0)"
            )
    variants = None  # the defaults for this device and preset (overhead.run_overhead)
    if arguments.variants is not None:
        variants = [variant.strip() for variant in arguments.variants.split(",") if variant.strip()]
    if arguments.output is None and device.type != "cuda":
        raise ValueError(
            "output: a CPU run is a smoke test and is not filed under profiling/results/; "
            "pass --output PATH"
        )
    output = (
        Path(arguments.output)
        if arguments.output
        else RESULTS_DIR
        / f"{overhead.device_slug(device)}-{arguments.preset}-{datetime.date.today().isoformat()}.json"
    )
    # A CPU run is a smoke test of the code path, not a measurement: at the GPU's 5 rounds x 10
    # steps x every mode, tiny-flux took 6.4 minutes on 2 cores; 2 x 2 runs each mode 6 times.
    defaults = CPU_SCHEDULE if device.type == "cpu" else GPU_SCHEDULE
    rounds, steps, warmup = (
        given if given is not None else default
        for given, default in zip(
            (arguments.rounds, arguments.steps, arguments.warmup), defaults, strict=True
        )
    )
    result = overhead.run_overhead(
        arguments.preset,
        device=device,
        variants=variants,
        rounds=rounds,
        steps_per_round=steps,
        warmup_steps=warmup,
        batch_pairs=arguments.batch_pairs,
        log=lambda message: print(message, file=sys.stderr, flush=True),
        # The results so far after every round: a run killed at a deadline keeps them.
        on_round=lambda partial: overhead.write_results(
            overhead.results_document(partial, [], device), output
        ),
    )
    kernels = overhead.measure_kernels(device) if arguments.kernels else []
    document = overhead.results_document(result, kernels, device)
    json_path, markdown_path = overhead.write_results(document, output)
    print(overhead.markdown_report(document))
    print(f"results: {json_path} and {markdown_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
