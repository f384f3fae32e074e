"""The one exception for a user's mistake: a bad flag, YAML key, data row or path.

``sdpo-train`` prints it as one line (``sdpo-train: error: ...``) and exits 2, where any other
exception still shows its traceback. It subclasses ValueError so that code (and tests) catching
ValueError for bad settings keeps working.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A problem the user fixes by changing a setting, a file or the data; the message says how."""
