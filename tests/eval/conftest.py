"""Fixtures shared by the evaluation tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def quiet_transformers():
    """transformers' warnings (torchvision missing) would land in the captured stderr that the
    one-line-error tests read."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    yield
    logging.set_verbosity(verbosity)
