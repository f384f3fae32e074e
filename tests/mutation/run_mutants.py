"""A small mutation audit: do the tests notice a trainer (or kernel) that is subtly wrong?

Each mutant in ``mutants.toml`` names a file, one or more exact snippets of it with their
replacements, and the pytest node ids that must fail with the mutant in place. For each mutant
this script checks that every snippet occurs exactly once, writes the mutated file, runs only
those tests (``OMP_NUM_THREADS=1``, ``TRITON_INTERPRET=1``, a timeout per mutant) and restores
the original bytes afterwards, always: on success, on failure, on Ctrl-C and on SIGTERM. A
mutant is "killed" when the tests fail, "survived" when they pass, "timeout" when they run past
the limit (counted as killed: the mutant changed behaviour), "stale" when a snippet no longer
matches the source (fix the list; tests/test_mutation_list.py, in CI, fails on a stale or
misnamed entry without running anything). Not run by CI: it runs each mutant's tests in turn
(39 mutants: 8 minutes measured on 2 otherwise idle cores; 36 took 27 minutes on 2 busy ones).

Usage, from the repository root with the environment active::

    python tests/mutation/run_mutants.py                    # every mutant in mutants.toml
    python tests/mutation/run_mutants.py --only no-lr-step ref-is-policy
    python tests/mutation/run_mutants.py --list other.toml --timeout 300 --markdown out.md

Exit status: 0 when every mutant was killed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LIST = Path(__file__).resolve().parent / "mutants.toml"


@dataclass
class Mutant:
    id: str
    file: str
    edits: list[tuple[str, str]]
    tests: list[str]
    group: str
    description: str


def load_mutants(path: Path) -> list[Mutant]:
    data = tomllib.loads(path.read_text())
    mutants = []
    for entry in data["mutant"]:
        edits = [(edit["original"], edit["replacement"]) for edit in entry["edit"]]
        mutants.append(
            Mutant(
                id=entry["id"],
                file=entry["file"],
                edits=edits,
                tests=list(entry["tests"]),
                group=entry.get("group", "added"),
                description=entry.get("description", ""),
            )
        )
    ids = [mutant.id for mutant in mutants]
    duplicates = {name for name in ids if ids.count(name) > 1}
    if duplicates:
        raise SystemExit(f"{path}: duplicate mutant ids {sorted(duplicates)}")
    return mutants


def mutated_text(text: str, mutant: Mutant) -> str | None:
    """The file with every edit applied, or None when a snippet does not occur exactly once."""
    for original, replacement in mutant.edits:
        if text.count(original) != 1:
            return None
        text = text.replace(original, replacement)
    return text


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated


def run_mutant(mutant: Mutant, timeout: float) -> tuple[str, float, str]:
    """(outcome, seconds, last output line); the file is restored before this returns."""
    path = ROOT / mutant.file
    original_bytes = path.read_bytes()
    mutated = mutated_text(original_bytes.decode(), mutant)
    if mutated is None:
        return "stale", 0.0, "a snippet does not occur exactly once"
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TRITON_INTERPRET": "1",
    }
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    command += ["--benchmark-disable", *mutant.tests]
    start = time.monotonic()
    try:
        path.write_text(mutated)
        try:
            result = subprocess.run(
                command,
                cwd=ROOT,
                env=environment,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return "timeout", time.monotonic() - start, f"over {timeout:.0f} s"
    finally:
        path.write_bytes(original_bytes)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if result.returncode == 5:  # no tests collected: a wrong node id, not a kill
        return "no-tests", time.monotonic() - start, last
    outcome = "survived" if result.returncode == 0 else "killed"
    return outcome, time.monotonic() - start, last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", type=Path, default=DEFAULT_LIST, help="the mutant list (TOML)")
    parser.add_argument("--only", nargs="+", default=None, help="mutant ids to run")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant")
    parser.add_argument("--markdown", type=Path, default=None, help="also write a table here")
    args = parser.parse_args(argv)
    mutants = load_mutants(args.list)
    if args.only:
        unknown = set(args.only) - {mutant.id for mutant in mutants}
        if unknown:
            parser.error(f"--only: unknown mutant ids {sorted(unknown)}")
        mutants = [mutant for mutant in mutants if mutant.id in args.only]
    signal.signal(signal.SIGTERM, _raise_terminated)
    rows = []
    try:
        for mutant in mutants:
            outcome, seconds, last = run_mutant(mutant, args.timeout)
            rows.append((mutant, outcome, seconds, last))
            print(f"{outcome:9s} {seconds:6.1f}s  {mutant.id}  ({last})", flush=True)
    except (KeyboardInterrupt, _Terminated):
        print("interrupted: the file under mutation was restored", file=sys.stderr)
        return 130
    table = ["| mutant | group | file | outcome | s |", "|---|---|---|---|---|"]
    for mutant, outcome, seconds, _ in rows:
        table.append(
            f"| {mutant.id} | {mutant.group} | {mutant.file} | {outcome} | {seconds:.0f} |"
        )
    for group in sorted({mutant.group for mutant, *_ in rows}):
        members = [outcome for mutant, outcome, *_ in rows if mutant.group == group]
        killed = sum(outcome in ("killed", "timeout") for outcome in members)
        table.append(f"\n{group}: {killed}/{len(members)} killed")
    print("\n".join(table))
    if args.markdown is not None:
        args.markdown.write_text("\n".join(table) + "\n")
    return 0 if all(outcome in ("killed", "timeout") for _, outcome, *_ in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
