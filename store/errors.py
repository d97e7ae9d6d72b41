"""One exception type for every user-facing failure.

ARCHITECTURE.md, "Bad input": a bad input produces one clear sentence naming the file, URL, key or
value at fault and what would fix it. Code raises :class:`UserError` with that
sentence; every command line entry point catches it (see :func:`run_cli`) and
prints ``error: <sentence>`` with exit status 2 instead of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A failure caused by the user's input; ``str(err)`` is the one sentence to show."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a CLI ``main``; turn a :class:`UserError` into one line on stderr and exit code 2."""
    try:
        code = main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; committed work is kept and a re-run resumes it.", file=sys.stderr)
        return 130
    return int(code or 0)
