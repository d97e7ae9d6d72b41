"""``dynsae kernels``: compile the CPU kernels once into numba's on-disk cache.

The sparsemax candidate search (:mod:`trainer.sparsemax_cpu`) and the loader's row scatter
(:mod:`store.scatter`) are numba functions cached on disk next to their sources. Until that cache
exists, *every* process that uses them compiles them (~11 s of CPU for the sparsemax kernels on the
2-core box), and a sweep or a test run starts many such processes at once, each compiling the same
code. Running this once after installing (``make install`` does; a cluster image runs it in its build)
compiles them a single time; later processes load them in ~0.1 s. Safe to run again: it then loads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from store.cli import CommandHelp, command_parser
from store.errors import run_cli

HELP = CommandHelp(
    does="Compile the CPU kernels (the sparsemax candidate search, the loader's row scatter) into numba's "
         "on-disk cache, once per install, so that no training or loading process compiles them again. "
         "Running it again loads them from the cache.",
    reads="nothing",
    writes="numba's cache files in the installed packages' __pycache__ folders; prints, per kernel, "
           "whether it was compiled or loaded",
    example="--json")


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("python -m dynsae.kernels", HELP)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a sentence")
    args: argparse.Namespace = parser.parse_args(argv)
    from store import scatter
    from trainer.sparsemax_cpu import compile_kernels

    start = time.perf_counter()
    kernels = {f"sparsemax_cpu[{dtype}]": how for dtype, how in compile_kernels().items()}
    if scatter.kernel_ready(timeout=None):
        kernels["row_scatter"] = "compiled" if sum(scatter._scatter64.stats.cache_misses.values()) else "loaded"
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"kernels": kernels, "seconds": round(seconds, 2)}))
    else:
        listed = ", ".join(f"{name} {how}" for name, how in kernels.items())
        print(f"{listed or 'no kernels: numba is missing or its paths are off'} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
