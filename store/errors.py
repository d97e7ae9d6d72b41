"""One exception type for every user-facing failure.

ARCHITECTURE.md, "Bad input": a bad input produces one clear sentence naming the file, URL, key or
value at fault and what would fix it. Code raises :class:`UserError` with that
sentence; every command line entry point catches it (see :func:`run_cli`) and
prints ``error: <sentence>`` with exit status 2 instead of a traceback. No sentence ever shows a
storage-options value (they may be credentials): the values are registered when parsed
(:func:`register_secrets`) and masked when printed (:func:`redact`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

#: Every string value of the storage options this process was given (they may be credentials); an error
#: sentence that would show one shows ``<redacted>`` instead (:func:`redact`).
_SECRETS: set[str] = set()
REDACTED = "<redacted>"
#: Options that are addresses, not credentials, and are shown so that an error says which endpoint failed
#: (unless the URL carries a user:password@ part).
PUBLIC_OPTIONS = ("endpoint_url",)


class UserError(Exception):
    """A failure caused by the user's input; ``str(err)`` is the one sentence to show."""


def register_secrets(options: Any) -> None:
    """Remember every string value inside ``options`` (storage options: a mapping, possibly nested) so that
    no error sentence ever prints one."""
    if isinstance(options, dict):
        for key, value in options.items():
            if key not in PUBLIC_OPTIONS or (isinstance(value, str) and "@" in value):
                register_secrets(value)
    elif isinstance(options, (list, tuple)):
        for value in options:
            register_secrets(value)
    elif isinstance(options, str) and len(options) >= 4:
        _SECRETS.add(options)


def redact(text: str) -> str:
    """``text`` with every registered storage-option value replaced by ``<redacted>`` (longest first)."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a CLI ``main``; turn a :class:`UserError` into one line on stderr and exit code 2."""
    try:
        code = main(argv)
    except UserError as err:
        print(f"error: {redact(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; committed work is kept and a re-run resumes it.", file=sys.stderr)
        return 130
    return int(code or 0)
