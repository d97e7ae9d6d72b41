"""The one rule for a name that becomes a directory under a root we were given (a dataset's harvest
``name``, a run's ``name``, a sweep's ``name``): letters, digits and ``. _ = + -``, starting with a letter or
digit, so it can never climb out of its root (``..``, ``/``) or hide (``.name``)."""

from __future__ import annotations

import re

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]*")
NAME_RULE = "use letters, digits and . _ = + - only, starting with a letter or digit (it becomes a directory name)"


def check_dir_name(value: str | None) -> str | None:
    """``value`` unchanged when it follows the rule (None passes); else ValueError (pydantic validators use it)."""
    if value is not None and not NAME_PATTERN.fullmatch(value):
        raise ValueError(NAME_RULE)
    return value
