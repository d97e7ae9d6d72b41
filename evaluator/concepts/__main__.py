"""``python -m evaluator.concepts RUN_URL [...]`` / ``... compare RUN_A RUN_B [...]`` (also ``dynsae concepts``)."""

from __future__ import annotations

import argparse
import sys

from store.config import add_storage_options_argument
from store.errors import UserError, run_cli


def browser_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluator.concepts",
        description="Build the static concept browser of a trained run in <run_dir>/concepts/ "
                    "(open concepts/index.html, no server needed). "
                    "`python -m evaluator.concepts compare RUN_A RUN_B ...` compares two runs on one input.")
    p.add_argument("run", help="run directory (any fsspec URL) of a trained SAE, "
                              "or a SAELens / sparsify folder (needs --dataset)")
    p.add_argument("--dataset", default=None, help="dataset URL (default: the run's own dataset; required for "
                                                   "SAELens / sparsify folders)")
    p.add_argument("--tokens", type=int, default=65536,
                   help="tokens to stream (vision: images) from the split (default 65536)")
    p.add_argument("--top", type=int, default=20, help="top activating examples kept per concept (default 20)")
    p.add_argument("--window", type=int, default=8, help="tokens of context on each side (default 8)")
    p.add_argument("--split", default="eval", choices=("eval", "train", "all"), help="dataset split (default eval)")
    p.add_argument("--out", default=None, help="output folder (default <run_dir>/concepts)")
    p.add_argument("--device", default="cpu", help="torch device for the SAE (default cpu)")
    add_storage_options_argument(p)
    return p


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluator.concepts compare",
        description="Write a static compare.html: per token, the active concepts of two runs on one input.")
    p.add_argument("run_a")
    p.add_argument("run_b")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="text to tokenize and run through the dataset's model")
    src.add_argument("--seq", type=int, help="sequence (or image) id of run A's dataset")
    src.add_argument("--image", help="image file to run through the dataset's model (vision)")
    p.add_argument("--out", default=None, help="output file (default <RUN_A>/concepts/compare.html)")
    p.add_argument("--device", default="cpu")
    add_storage_options_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "compare":
        from evaluator.concepts.compare import write_compare

        c = compare_parser().parse_args(args[1:])
        path = write_compare(c.run_a, c.run_b, text=c.text, seq=c.seq, image=c.image, out=c.out,
                             device=c.device, storage_options=c.storage_options)
        print(f"wrote {path}")
        return 0
    ns = browser_parser().parse_args(args)
    for name in ("tokens", "top"):
        if getattr(ns, name) < 1:
            raise UserError(f"--{name} {getattr(ns, name)} must be at least 1.")
    if ns.window < 0:
        raise UserError(f"--window {ns.window} must be 0 or more.")
    from evaluator.concepts.build import write_browser

    page = write_browser(ns.run, dataset_url=ns.dataset, units=ns.tokens, top=ns.top, window=ns.window,
                         split=ns.split, out=ns.out, device=ns.device, storage_options=ns.storage_options)
    print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
