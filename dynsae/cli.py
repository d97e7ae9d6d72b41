"""The ``dynsae`` console script: one command per thing a user does, dispatched to the room that does it.

``COMMANDS`` maps each command to the module whose ``main(argv)`` runs it, the arguments put in
front (``dynsae eval`` is ``python -m evaluator run``), and the one line ``dynsae --help`` shows.
A command's own ``--help`` comes from its parser, made with :func:`store.cli.command_parser` (what it
does, reads and writes, one example); :func:`store.cli.invoked_as` makes it read ``dynsae <command>``.
Adding a command = one entry here + a parser made that way; ``tests/test_cli_help.py`` checks both.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """A ``dynsae`` command: the module that runs it, the arguments put in front, one line for users."""

    module: str
    prefix: tuple[str, ...]
    summary: str


COMMANDS: dict[str, Command] = {
    "harvest": Command("harvester.__main__", ("run",),
                       "record a model's activations on a text or image corpus into a dataset"),
    "synth": Command("harvester.__main__", ("synth",),
                     "make a synthetic dataset from a known dictionary, to test whether SAEs recover it"),
    "store": Command("store.__main__", (), "list, describe and check datasets"),
    "train": Command("dynsae.train", (), "train one sparse autoencoder on a dataset"),
    "sweep": Command("dynsae.sweep", (), "train and evaluate a grid of sparse autoencoders on one shared stream"),
    "eval": Command("evaluator.__main__", ("run",),
                    "score trained SAEs on a dataset's held-out rows (reconstruction, sparsity, CE, ...)"),
    "report": Command("evaluator.__main__", ("report",),
                      "write a sweep's report: variants compared at matched sparsity, tables and plots"),
    "concepts": Command("evaluator.concepts.__main__", (),
                        "build a browser of what each latent of a trained SAE fires on"),
    "export": Command("dynsae.export", (), "write a trained SAE as a SAELens or sparsify folder"),
    "demo": Command("dynsae.demo", (), "run the whole pipeline end to end on a small example, offline"),
    "kernels": Command("dynsae.kernels", (), "compile the CPU kernels once into numba's disk cache (after install)"),
}

INTRO = "dynsae: sparse autoencoders on shared activation datasets, from harvest to report."


def usage() -> str:
    """What ``dynsae --help`` prints: every command with its one line."""
    width = max(map(len, COMMANDS))
    lines = ["usage: dynsae COMMAND [ARGS ...]", "", INTRO, "", "commands:"]
    lines += [f"  {name.ljust(width)}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    lines += ["", "`dynsae COMMAND --help` says what a command reads and writes, with an example."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    name = args[0]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose one of {', '.join(COMMANDS)} (dynsae --help lists them).",
              file=sys.stderr)
        return 2
    command = COMMANDS[name]
    try:
        module = importlib.import_module(command.module)
    except ModuleNotFoundError as err:
        print(f"error: `dynsae {name}` is not available in this build ({err.name} is missing).", file=sys.stderr)
        return 2
    from store.cli import invoked_as
    from store.errors import run_cli

    with invoked_as(f"dynsae {name}"):
        return run_cli(module.main, [*command.prefix, *args[1:]])


if __name__ == "__main__":
    sys.exit(main())
