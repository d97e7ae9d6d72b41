"""How a command describes itself to its user (the ``--help`` of every command, ``dynsae`` or ``python -m``).

Every command's parser is made by :func:`command_parser` from a :class:`CommandHelp`: what the command
does for the user, what it reads, what it writes, and one example. That is all ``--help`` shows besides
the options; module docstrings (internal names, decisions) are for readers of the code and never
printed. ``dynsae`` runs a command under the name the user typed (:func:`invoked_as`), so the usage
line and the example read ``dynsae eval ...`` there and ``python -m evaluator run ...`` otherwise.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

_INVOKED_AS: ContextVar[str | None] = ContextVar("dynsae_invoked_as", default=None)


@dataclass(frozen=True)
class CommandHelp:
    """A command's help for users: plain sentences, no markup. ``example`` holds the arguments after
    the command's name (``"RUN_DIR --dataset DATA_URL"``)."""

    does: str
    reads: str
    writes: str
    example: str


@contextmanager
def invoked_as(name: str) -> Iterator[None]:
    """Run the commands inside under the name the user typed (e.g. ``"dynsae eval"``)."""
    token = _INVOKED_AS.set(name)
    try:
        yield
    finally:
        _INVOKED_AS.reset(token)


def prog(default: str) -> str:
    """The command's name as the user typed it: the ``dynsae`` name when run by ``dynsae``, else ``default``."""
    return _INVOKED_AS.get() or default


def _text(name: str, help: CommandHelp) -> dict[str, object]:
    return {"description": help.does,
            "epilog": f"reads:   {help.reads}\nwrites:  {help.writes}\nexample:\n  {name} {help.example}",
            "formatter_class": argparse.RawDescriptionHelpFormatter}


def command_parser(default_prog: str, help: CommandHelp, suffix: str = "") -> argparse.ArgumentParser:
    """The parser of a command (``default_prog``: its ``python -m`` name; ``suffix``: a sub-command's name
    after it, e.g. ``" compare"``)."""
    name = prog(default_prog) + suffix
    return argparse.ArgumentParser(prog=name, **_text(name, help))


def subcommand_parser(subparsers: argparse._SubParsersAction, sub: str, default_prog: str,
                      help: CommandHelp) -> argparse.ArgumentParser:
    """A sub-command's parser (``python -m evaluator run``) that is also a ``dynsae`` command
    (``dynsae eval``): named as the user typed it."""
    name = prog(default_prog)
    return subparsers.add_parser(sub, prog=name, help=help.does.split(". ")[0].rstrip("."), **_text(name, help))
