"""``python -m bench [--list] [NAME [ARGS...]]``: the benchmarks of this folder.

Every ``bench/<name>_bench.py`` is a benchmark; its docstring's first line says what it times.
``--list`` prints the names with that line (read with ``ast``, nothing imported);
``NAME ARGS...`` runs one as ``__main__`` with ``ARGS`` as its command line (``NAME --help``
shows its options); no name runs all of them, one after the other, with their defaults.
"""

from __future__ import annotations

import argparse
import ast
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUFFIX = "_bench"


def benchmarks() -> dict[str, str]:
    """name -> the docstring's first sentence-paragraph (joined into one line) of every
    ``*_bench.py`` here, sorted by name."""
    found = {}
    for path in sorted(HERE.glob(f"*{SUFFIX}.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        found[path.stem[: -len(SUFFIX)]] = " ".join(doc.strip().split("\n\n")[0].split())
    return found


def run(name: str, args: list[str]) -> int:
    """Run ``bench/<name>_bench.py`` as ``__main__`` with ``args``; returns its exit status."""
    saved = sys.argv
    sys.argv = [str(HERE / f"{name}{SUFFIX}.py"), *args]
    try:
        result = runpy.run_module(f"{__package__ or 'bench'}.{name}{SUFFIX}", run_name="__main__")
    except SystemExit as done:  # argparse --help / errors, or a script's own sys.exit(main())
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    del result
    return 0


def parser(names: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--list", action="store_true", help="list the benchmarks and what each times")
    p.add_argument("name", nargs="?", choices=names, metavar="NAME", help=f"one of {', '.join(names)}")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark")
    return p


def main(argv: list[str] | None = None) -> int:
    found = benchmarks()
    args = parser(list(found)).parse_args(argv)
    if args.list:
        width = max(map(len, found), default=0)
        for name, line in found.items():
            print(f"{name:<{width}}  {line}")
        return 0
    if args.name:
        return run(args.name, args.args)
    for name in found:
        print(f"== bench {name}", flush=True)
        code = run(name, [])
        if code:
            print(f"error: benchmark {name} exited with status {code}; the others were not run.", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
