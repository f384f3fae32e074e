"""``sdpo-pairs``: preference pairs from a model's own samples (on-policy data).

The in-process entry point is :func:`sdpo.pairs.make.make_pairs`; the rules are in ``rules``,
the rewards in ``rewards``, the models it samples in ``samplers``, the command line in ``cli``.
"""
