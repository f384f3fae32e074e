"""`sdpo-train` that sends itself SIGTERM at a named moment, so the signal tests do not depend on
how fast the machine is: ``python signal_moments_main.py MOMENT ARGS...``.

The first SIGTERM is sent as the second micro-batch starts (the step in flight), so the stop
comes after step 1. The second, by MOMENT:

- ``in-the-step``: as the third micro-batch starts, before the stop's checkpoint is written;
- ``after-the-loop``: right after the training loop gave its signal handlers back (where the
  default action would end the process by the signal);
- ``after-the-line``: right after ``main`` printed the stop line and returned its status;
- ``at-exit``: in an ``atexit`` callback that runs after the trainer's own (late in the
  shutdown, where CPython is about to reset Python-level handlers to the default action).

A signal sent to this process with ``os.kill`` is taken by its Python handler at the next
bytecode boundary of the main thread, before the code that follows runs.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys

from sdpo.train import trainer
from sdpo.train.cli import main
from sdpo.train.preemption import StopRequests


def terminate() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def signal_at_micro_batches(calls_that_signal: tuple[int, ...]) -> None:
    original = trainer.Trainer._micro_step
    calls = {"count": 0}

    def micro_step(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] in calls_that_signal:
            terminate()
        return original(self, *args, **kwargs)

    trainer.Trainer._micro_step = micro_step


def signal_after_the_loop() -> None:
    original = StopRequests.restore

    def restore(self) -> None:
        original(self)
        terminate()

    StopRequests.restore = restore


def signal_at_exit() -> None:
    def late() -> None:
        # What survives CPython's reset of the handlers (it resets Python functions only).
        print(f"at exit: SIGTERM handler {signal.getsignal(signal.SIGTERM)!r}", file=sys.stderr)
        terminate()

    atexit.register(late)  # before main: runs after every callback main registers


if __name__ == "__main__":
    moment, argv = sys.argv[1], sys.argv[2:]
    signal_at_micro_batches((2, 3) if moment == "in-the-step" else (2,))
    if moment == "after-the-loop":
        signal_after_the_loop()
    elif moment == "at-exit":
        signal_at_exit()
    status = main(argv)
    if moment == "after-the-line":
        terminate()
    sys.exit(status)
