"""constraints.txt: the exact versions of everything a green CI run installed.

The README's install passes it to pip (``pip install -e ".[dev]" -c constraints.txt``), so a
user installs the set CI tested, not whatever is newest that day; research users reproduce runs
months later. CI's second leg (``.ci/newest``) installs with no constraints and, when its tests
pass, writes the newest set with this same writer, so moving the constraints forward is copying
one file (``cp runs/ci-newest/constraints.txt constraints.txt``).

    python tools/constraints.py FREEZE_FILE [--out constraints.txt]

FREEZE_FILE is ``pip freeze --exclude-editable`` of the venv the tests ran in.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

# pip's own tools and the project itself are not constraints: pin neither.
NOT_PINNED = {"pip", "setuptools", "wheel", "diffusion-sdpo"}
HEADER = """\
# The exact versions of every package the last green CI run installed (Linux x86_64, Python
# 3.11, the CPU build of torch). The README's install uses it: pip install -e ".[dev]" -c
# constraints.txt. Written by tools/constraints.py from that run's pip freeze; CI's second leg
# (.ci/newest) tests the newest releases with no constraints and writes the next version of
# this file to runs/ci-newest/constraints.txt. torch and triton are installed first, by the
# README's own pins, which must equal the ones here (tests/test_constraints.py).
"""
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def normalized_name(name: str) -> str:
    """PEP 503's normal form: what pip compares (PyYAML == pyyaml, typing_extensions == ...-...)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(text: str, source: str) -> dict[str, str]:
    """{normalized name: version} from ``name==version`` lines; comments and blanks skipped.

    Local version labels are dropped (torch 2.13.0+cpu -> 2.13.0), so that the CUDA build of
    the same release satisfies the constraint too. Any other line is an error naming it.
    """
    pins: dict[str, str] = {}
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        match = _PIN.match(line)
        if match is None:
            raise ValueError(
                f"{source}:{number}: expected 'name==version', got {raw_line!r} (write the "
                "freeze with pip freeze --exclude-editable)"
            )
        name, version = normalized_name(match.group(1)), match.group(2).split("+", 1)[0]
        if name in pins and pins[name] != version:
            raise ValueError(f"{source}:{number}: {name} pinned twice ({pins[name]}, {version})")
        pins[name] = version
    return pins


def render(pins: dict[str, str]) -> str:
    """The constraints file for ``pins``: the header, then one sorted ``name==version`` a line."""
    lines = [f"{name}=={pins[name]}" for name in sorted(pins) if name not in NOT_PINNED]
    return HEADER + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("freeze", type=Path, help="pip freeze --exclude-editable output")
    parser.add_argument("--out", type=Path, default=Path("constraints.txt"))
    arguments = parser.parse_args(argv)
    try:
        pins = parse_pins(arguments.freeze.read_text(encoding="utf-8"), str(arguments.freeze))
    except (OSError, ValueError) as error:
        print(f"constraints: {error}", file=sys.stderr)
        return 1
    arguments.out.write_text(render(pins), encoding="utf-8")
    print(f"constraints: wrote {len(pins)} pins to {arguments.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
