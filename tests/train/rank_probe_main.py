"""`sdpo-train` under torchrun with each rank's work recorded, for the tests of what each rank
does (tests/train/test_ranks.py): torchrun starts its processes from a script, so the
recording cannot be monkeypatched from the test itself.

Each rank writes ``$SDPO_RANK_PROBE/rank-N.json``: the pair indices of every batch it read
(epoch, batch, indices), and per loss call its loss and the sum of its target (the noise
stream). ``SDPO_RANK_PROBE_POISON=RANK:CALL`` makes that rank's loss at that call non-finite.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import sdpo
from sdpo.train import data
from sdpo.train.cli import main

if __name__ == "__main__":
    rank = int(os.environ.get("RANK", "0"))
    record: dict[str, list] = {"batches": [], "calls": []}
    poison_rank, _, poison_call = os.environ.get("SDPO_RANK_PROBE_POISON", "-1:-1").partition(":")

    real_indices = data.PairBatches.indices

    def indices(self, epoch: int, batch_index: int) -> list[int]:
        chosen = real_indices(self, epoch, batch_index)
        record["batches"].append([epoch, batch_index, chosen])
        return chosen

    real_loss = sdpo.preference_loss

    def loss(model_pred, ref_pred, target, **kwargs):
        result = real_loss(model_pred, ref_pred, target, **kwargs)
        record["calls"].append([float(result.loss), float(target.double().sum())])
        if rank == int(poison_rank) and len(record["calls"]) == int(poison_call):
            return sdpo.PreferenceLoss(result.loss * float("inf"), result.stats)
        return result

    data.PairBatches.indices = indices
    sdpo.preference_loss = loss
    try:
        status = main(sys.argv[1:])
    finally:
        path = Path(os.environ["SDPO_RANK_PROBE"]) / f"rank-{rank}.json"
        path.write_text(json.dumps(record))
    assert torch.distributed.is_available()
    sys.exit(status)
