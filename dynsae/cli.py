"""The ``dynsae`` console script: a thin dispatcher over the four packages.

``dynsae store ...``   -> ``python -m store ...``
``dynsae harvest ...`` -> ``python -m harvester run ...``
``dynsae synth ...``   -> ``python -m harvester synth ...`` (synthetic activations, known dictionary)
``dynsae train ...``   -> :mod:`dynsae.train` (``python -m trainer run`` + the evaluator's metrics)
``dynsae sweep ...``   -> :mod:`dynsae.sweep` (``python -m trainer sweep`` + the evaluator)
``dynsae eval ...``    -> ``python -m evaluator run ...``
``dynsae report ...``  -> ``python -m evaluator report ...``
``dynsae concepts ...``-> ``python -m evaluator.concepts ...``
``dynsae export ...``  -> ``python -m dynsae.export ...`` (SAELens / sparsify folders)
``dynsae demo``        -> the end-to-end demo (:mod:`dynsae.demo`)
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module whose ``main(argv)`` runs it, argv prefix)
ROUTES: dict[str, tuple[str, list[str]]] = {
    "store": ("store.__main__", []),
    "harvest": ("harvester.__main__", ["run"]),
    "synth": ("harvester.__main__", ["synth"]),
    "train": ("dynsae.train", []),
    "sweep": ("dynsae.sweep", []),
    "eval": ("evaluator.__main__", ["run"]),
    "report": ("evaluator.__main__", ["report"]),
    "concepts": ("evaluator.concepts.__main__", []),
    "export": ("dynsae.export", []),
    "demo": ("dynsae.demo", []),
}

USAGE = "usage: dynsae {" + ",".join(ROUTES) + "} ...\n\n" + (__doc__ or "")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    sub = args[0]
    if sub not in ROUTES:
        print(f"error: unknown subcommand {sub!r}; choose one of {', '.join(ROUTES)}.", file=sys.stderr)
        return 2
    module_name, prefix = ROUTES[sub]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        print(f"error: `dynsae {sub}` is not available in this build ({err.name} is missing).", file=sys.stderr)
        return 2
    from store.errors import run_cli

    return run_cli(module.main, prefix + args[1:])


if __name__ == "__main__":
    sys.exit(main())
