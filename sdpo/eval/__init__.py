"""Evaluation: ``sdpo-eval generate``, ``score`` and ``compare`` (see sdpo/eval/cli.py)."""
