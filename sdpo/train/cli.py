"""`sdpo-train` / `python -m sdpo.train`: see `sdpo-train --help` and the README.

A ``UsageError`` (a bad flag, YAML key, path or data row) is one line, ``sdpo-train: error: ...``,
and exit status 2; a run that stops on a non-finite loss is one line and status 1; anything else
is a bug and keeps its traceback. A failed write of any output (a full disk, a read-only file
system: sdpo.train.outputs) is one line naming the file and status 1; a run stopped by SIGTERM or
SIGINT (after its checkpoint) is one line and status 143 or 130. A second run on an output folder
in use is refused (one line, status 2) before any model loads.
"""

from __future__ import annotations

import os
import sys


def _configure_threads(model: str) -> None:
    """On a CPU-only machine, picks torch's thread count and says so (sdpo.train.runtime).

    The tiny model's ops are too small to gain from a second thread (10x slower per step with
    torch's default on a shared 2-core machine); real models use the cores this process has
    (cores / processes under torchrun). ``OMP_NUM_THREADS`` overrides both."""
    import torch

    if torch.cuda.is_available():
        return
    from sdpo.train.runtime import configure_cpu_threads

    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))))
    default = 1 if model == "tiny" else max(1, (os.cpu_count() or 1) // processes)
    # Said in the start banner (runlog.banner_lines), not here: anticipated errors stay one line.
    configure_cpu_threads(None, default=default, program="sdpo-train", log=False)


def main(argv: list[str] | None = None) -> int:
    from sdpo.train.config import config_from_args
    from sdpo.train.errors import UsageError

    try:
        config = config_from_args(argv)
    except UsageError as error:
        print(f"sdpo-train: error: {error}", file=sys.stderr)
        return 2
    try:
        _configure_threads(config.model)
    except ValueError as error:
        print(f"sdpo-train: error: {error}", file=sys.stderr)
        return 2
    from sdpo.train.outputs import WriteError, as_write_error
    from sdpo.train.preemption import Preempted
    from sdpo.train.runlog import configure_logging
    from sdpo.train.trainer import NonFiniteLoss, summary_json, train

    main_process = os.environ.get("RANK", "0") == "0"  # torchrun sets RANK
    configure_logging(main_process)

    try:
        summary = train(config)
    except UsageError as error:
        print(f"sdpo-train: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, NonFiniteLoss, WriteError) as error:
        print(f"sdpo-train: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        failure = as_write_error(error)  # a full disk outside every writer's own handling
        if failure is None:
            raise
        print(f"sdpo-train: error: {failure}", file=sys.stderr)
        return 1
    except Preempted as stop:
        if main_process:  # one line per run, not per torchrun rank
            print(f"sdpo-train: {stop}", file=sys.stderr, flush=True)
        return stop.exit_status
    if main_process:  # one summary per run: the counts in it are already reduced over ranks
        print(summary_json(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
