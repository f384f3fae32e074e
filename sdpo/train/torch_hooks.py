"""The two private parts of torch the optimizer step relies on, behind one place each, so a
torch release that changes them breaks here and in tests/train/test_torch_hooks.py, not
silently in the step.

- ``GradScaler._get_scale_async()``: the loss scale as a device tensor. The public
  ``get_scale()`` returns a Python float, a host sync every optimizer step.
- The fused AdamW kernels' ``found_inf`` attribute: with it set to a device 1.0 the update
  leaves the weights, the moments and the step count untouched (the mechanism GradScaler's
  ``step`` uses), so a non-finite step is skipped on the device without reading the flag.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor


def scale_on_device(scaler: torch.amp.GradScaler) -> Tensor:
    """The scaler's current loss scale, on its device, without a host sync."""
    return scaler._get_scale_async()


@contextlib.contextmanager
def skip_flag(optimizer: torch.optim.Optimizer, skip: Tensor) -> Iterator[None]:
    """Inside, the fused optimizer's ``step()`` skips its update where ``skip`` (a 0-dim device
    float, 1.0 = skip) is set; the flag is removed afterwards, also on an error."""
    optimizer.found_inf = skip
    try:
        yield
    finally:
        del optimizer.found_inf
