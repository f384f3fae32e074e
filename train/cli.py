"""`sdpo-train` / `python -m sdpo.train`: see `sdpo-train --help` and the README."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from sdpo.train.config import config_from_args

    try:
        config = config_from_args(argv)
    except ValueError as error:
        print(f"sdpo-train: error: {error}", file=sys.stderr)
        return 2
    from sdpo.train.trainer import NonFiniteLoss, summary_json, train

    try:
        summary = train(config)
    except (ValueError, FileNotFoundError, NonFiniteLoss) as error:
        print(f"sdpo-train: error: {error}", file=sys.stderr)
        return 1
    print(summary_json(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
