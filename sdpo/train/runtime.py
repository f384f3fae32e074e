"""CPU thread count for CPU runs (the demo, the tiny preset, the tests).

torch's default is one intra-op thread per core. For the tiny models these runs use, each op
works on a few KB, so a second thread buys little compute and costs a synchronisation per op;
on a shared machine, where the other core is busy, every op then waits for a descheduled
thread. Measured on a 2-core machine with other jobs running: the demo took 1 h 46 min with
torch's default (2 threads) and 37 min with ``OMP_NUM_THREADS=1``; the tiny preset ran 10x
faster with one thread (see the README for this checkout's own timings). So one thread is the
default here; an explicit request (a ``--threads`` flag, then ``OMP_NUM_THREADS``) wins.
"""

from __future__ import annotations

import os
import sys

import torch

DEFAULT_CPU_THREADS = 1


def _positive_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{what}: expected a whole number >= 1, got {text!r}")
    return value


def configure_cpu_threads(
    requested: int | None = None,
    *,
    default: int = DEFAULT_CPU_THREADS,
    program: str = "sdpo",
    log: bool = True,
    how_to_change: str = "--threads or OMP_NUM_THREADS",
) -> int:
    """Sets torch's intra-op thread count and returns it; logs one line saying which and why.

    Precedence: ``requested`` (a ``--threads`` flag), then the ``OMP_NUM_THREADS`` environment
    variable, then ``default``. Raises ValueError naming the source for a count below 1 or an
    ``OMP_NUM_THREADS`` that is not a whole number.
    """
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"threads: expected a whole number >= 1, got {requested!r}")
        threads, source = requested, "requested"
    elif os.environ.get("OMP_NUM_THREADS", "").strip():
        threads = _positive_int(os.environ["OMP_NUM_THREADS"].strip(), "OMP_NUM_THREADS")
        source = "from OMP_NUM_THREADS"
    else:
        threads = _positive_int(str(default), "default threads")
        source = f"default; torch would use {torch.get_num_threads()}; change with {how_to_change}"
    torch.set_num_threads(threads)
    if log:
        print(f"{program}: CPU threads: {threads} ({source})", file=sys.stderr, flush=True)
    return threads
