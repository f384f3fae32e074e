"""How ``sdpo-eval`` ends on an anticipated problem: one line ``sdpo-eval: error: ...``.

A refusal of a flag or an input (a suite, manifest, image or weight file; sdpo.train's
``UsageError``, and the ValueError / OSError the input checks raise) exits with status 2, before
the command has done its work. A ``RunFailure``, something that went wrong while it ran (an output
that could not be written, a download that failed, the device out of memory), exits with 1.
"""

from __future__ import annotations


class RunFailure(RuntimeError):
    """A failure during a run, not a refused input: one line, exit status 1."""
