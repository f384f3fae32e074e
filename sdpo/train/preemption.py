"""Stopping on SIGTERM or SIGINT: finish the optimizer step in flight, checkpoint, exit.

The handler only records the signal. At each optimizer-step boundary the ranks agree whether to
stop (one all-reduce of a CPU flag over a gloo group: no GPU sync), so under torchrun, which
forwards the signal to every rank at slightly different moments, all ranks stop after the same
step and all reach the checkpoint's collectives. A second signal exits at once.
"""

from __future__ import annotations

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
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous.clear()

    def _handle(self, number: int, frame) -> None:
        if self.signal_number:
            print(
                f"sdpo-train: second {signal.Signals(number).name}: exiting now, no checkpoint",
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
