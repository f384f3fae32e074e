"""The mutation audit's list stays current: every mutant still applies and names real tests.

The audit itself (tests/mutation/run_mutants.py, ~8 minutes) is not run by CI, so a change that
rewrites a mutated line would leave that mutant "stale" (never applied, silently untested) until
someone ran it: a change to the uncached copy in sdpo/train/step.py did exactly that. This check is
cheap: it applies nothing and runs no test, it only reads the files.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "run_mutants", ROOT / "tests" / "mutation" / "run_mutants.py"
)
run_mutants = importlib.util.module_from_spec(_spec)
sys.modules["run_mutants"] = run_mutants  # @dataclass looks its module up there
_spec.loader.exec_module(run_mutants)
MUTANTS = run_mutants.load_mutants(run_mutants.DEFAULT_LIST)


@pytest.mark.parametrize("mutant", MUTANTS, ids=[mutant.id for mutant in MUTANTS])
def test_mutant_applies_and_changes_its_file(mutant):
    source = (ROOT / mutant.file).read_text()
    mutated = run_mutants.mutated_text(source, mutant)
    assert mutated is not None, (
        f"{mutant.id}: a snippet no longer occurs exactly once in {mutant.file}; update "
        "tests/mutation/mutants.toml to the current code"
    )
    assert mutated != source


@pytest.mark.parametrize("mutant", MUTANTS, ids=[mutant.id for mutant in MUTANTS])
def test_mutant_names_tests_that_exist(mutant):
    assert mutant.tests, f"{mutant.id}: names no test"
    for node in mutant.tests:
        path, _, name = node.partition("::")
        assert (ROOT / path).is_file(), f"{mutant.id}: no test file {path}"
        function = re.sub(r"\[.*\]$", "", name.split("::")[-1])
        assert re.search(rf"^\s*def {re.escape(function)}\(", (ROOT / path).read_text(), re.M), (
            f"{mutant.id}: {path} has no test {function}"
        )
