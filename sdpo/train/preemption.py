"""Stopping on SIGTERM or SIGINT: finish the optimizer step in flight, checkpoint, exit.

The handler only records the signal. At each optimizer-step boundary the ranks agree whether to
stop (one all-reduce of a CPU flag over a gloo group: no GPU sync), so under torchrun, which
forwards the signal to every rank at slightly different moments, all ranks stop after the same
step and all reach the checkpoint's collectives. A second signal exits at once.

Once a stop is requested the process leaves with 128 + signal on every path, whenever a second
signal comes: the handler stays installed after the training loop (putting the default action
back would let a second SIGTERM end the process by the signal, status -15, between the
checkpoint line and the exit), and at interpreter exit, before CPython resets Python-level
handlers to the default action (``_PySignal_Fini``, after the ``atexit`` callbacks), the stop
signals are ignored: the exit status is already decided then.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

from sdpo.train.distributed import Distributed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(RuntimeError):
    """The run stopped on a signal after writing a checkpoint; ``exit_status`` is 128 + signal."""

    def __init__(self, signal_number: int, message: str) -> None:
        super().__init__(message)
        self.signal_number = signal_number
        self.exit_status = 128 + signal_number


class StopRequests:
    """Records SIGTERM/SIGINT while installed; ``agreed()`` is the signal every rank stops on."""

    def __init__(self, environment: Distributed) -> None:
        self.environment = environment
        self.signal_number = 0
        self.previous: dict[int, object] = {}
        # The checkpoint the stop wrote, once it is complete (then a second signal loses nothing).
        self.checkpoint: object | None = None
        self.group = None
        if environment.enabled:
            # NCCL would need a GPU tensor (and a sync to read it); a gloo group on the CPU
            # costs one small host rendezvous per step. Every rank creates it (a collective).
            self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for number in STOP_SIGNALS:
            self.previous[number] = signal.signal(number, self._handle)

    def restore(self) -> None:
        """The handlers from before ``install``, unless a stop was requested: then this
        process is on its way out with 128 + signal, and a further signal must still exit at
        once with a status of that form (the default action would end it by the signal)."""
        if self.signal_number and self.previous:
            _ignore_stop_signals_at_exit()
            return
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous.clear()

    def _handle(self, number: int, frame) -> None:
        if self.signal_number:
            written = (
                "no checkpoint"
                if self.checkpoint is None
                else f"checkpoint {self.checkpoint} is complete; continue with --resume"
            )
            print(
                f"sdpo-train: second {signal.Signals(number).name}: exiting now, {written}",
                file=sys.stderr,
                flush=True,
            )
            os._exit(128 + number)
        self.signal_number = number

    def agreed(self) -> int:
        """The signal to stop on (0: go on), the same on every rank: a collective."""
        if not self.environment.enabled:
            return self.signal_number
        flag = torch.tensor([self.signal_number], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())


_exit_hook_registered = False


def _ignore_stop_signals() -> None:
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


def _ignore_stop_signals_at_exit() -> None:
    """Ignores the stop signals from the first ``atexit`` callback on. Registered last, it runs
    first; the other callbacks and the rest of the shutdown then run with the exit status
    fixed, and ``SIG_IGN`` (unlike a Python handler) survives CPython's reset of the handlers
    to their default action late in the shutdown."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_ignore_stop_signals)
        _exit_hook_registered = True
