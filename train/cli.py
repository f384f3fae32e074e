"""`sdpo-train` / `python -m sdpo.train`: see `sdpo-train --help` and the README.

A ``UsageError`` (a bad flag, YAML key, path or data row) is one line, ``sdpo-train: error: ...``,
and exit status 2; a run that stops on a non-finite loss is one line and status 1; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from sdpo.train.config import config_from_args
    from sdpo.train.errors import UsageError

    try:
        config = config_from_args(argv)
    except UsageError as error:
        print(f"sdpo-train: error: {error}", file=sys.stderr)
        return 2
    import os

    from sdpo.train.runlog import configure_logging
    from sdpo.train.trainer import NonFiniteLoss, summary_json, train

    configure_logging(os.environ.get("RANK", "0") == "0")  # torchrun sets RANK

    try:
        summary = train(config)
    except UsageError as error:
        print(f"sdpo-train: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, NonFiniteLoss) as error:
        print(f"sdpo-train: error: {error}", file=sys.stderr)
        return 1
    print(summary_json(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
