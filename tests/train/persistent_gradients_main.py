"""`sdpo-train` with the persistent-gradient path forced on (what --cuda-graphs with gradient
accumulation uses on a GPU), for torchrun tests on the CPU: torchrun starts its processes from a
script, so the switch cannot be monkeypatched from the test itself."""

from __future__ import annotations

import sys

from sdpo.train import trainer
from sdpo.train.cli import main

if __name__ == "__main__":
    trainer.uses_persistent_gradients = lambda config: True
    sys.exit(main(sys.argv[1:]))
