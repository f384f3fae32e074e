"""sdpo.train: the trainer (`sdpo-train`, `python -m sdpo.train`)."""
