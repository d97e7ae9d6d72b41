"""``python -m evaluator.concepts RUN_URL [...]`` / ``... compare RUN_A RUN_B [...]`` (also ``dynsae concepts``)."""

from __future__ import annotations

import argparse
import sys

from store.cli import CommandHelp, command_parser
from store.config import add_storage_options_argument
from store.errors import UserError, run_cli

HELP = CommandHelp(
    does="Build a static browser of what each latent of a trained SAE fires on: top examples in context, "
         "activation histograms, firing rates (open index.html, no server needed). `compare RUN_A RUN_B` "
         "shows two SAEs' active latents token by token on one input. SAELens and sparsify folders work "
         "too, with --dataset.",
    reads="a run folder (or a SAELens / sparsify folder) and its dataset",
    writes="a concepts/ folder in the run (or --out) with index.html",
    example="runs/sweep1/variant-sparsemax_m-4096 --tokens 65536")
COMPARE_HELP = CommandHelp(
    does="Write a static page showing, token by token, the active latents of two SAEs on one input: a text, "
         "a sequence of the dataset, or an image.",
    reads="two run folders and the dataset of the first",
    writes="compare.html in the first run's concepts/ folder (or --out)",
    example="runs/sweep1/variant-sparsemax_m-4096 runs/sweep1/variant-topk_m-4096 --text 'def main():'")


def browser_parser() -> argparse.ArgumentParser:
    p = command_parser("python -m evaluator.concepts", HELP)
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
    p = command_parser("python -m evaluator.concepts", COMPARE_HELP, suffix=" compare")
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
