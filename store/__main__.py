"""``python -m store ls ROOT | info URL [--json] | verify URL``.

``verify`` prints one sentence per problem and exits 1 when there is any (0 when sound).
Bad input (missing URL, bucket, ...) prints ``error: <sentence>`` and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from store.cli import CommandHelp, command_parser
from store.config import add_storage_options_argument
from store.errors import redact, run_cli

HELP = CommandHelp(
    does="List the datasets under a folder, describe one (model, hook, rows, splits, statistics), or check "
         "that one is complete and sound.",
    reads="datasets (a folder or bucket URL: ls; one dataset URL: info, verify)",
    writes="nothing; verify exits 1 when it finds a problem",
    example="verify s3://team-bucket/activations/gpt2-l8-openwebtext")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the store CLI."""
    p = command_parser("python -m store", HELP)
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("ls", help="list datasets under a root URL")
    ls.add_argument("root")
    add_storage_options_argument(ls)
    info = sub.add_parser("info", help="describe one dataset")
    info.add_argument("url")
    add_storage_options_argument(info)
    info.add_argument("--json", action="store_true", help="print the manifest and facts as JSON")
    ver = sub.add_parser("verify", help="check commits, checksums, lengths and NaN/Inf")
    ver.add_argument("url")
    add_storage_options_argument(ver)
    ver.add_argument("--sample-chunks", type=int, default=32, help="chunks of acts checked for NaN/Inf")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "ls":
        from store.catalog import list_datasets, summary_row

        found = list_datasets(args.root, args.storage_options)
        if not found:
            print(f"no datasets under {args.root}")
        for url, manifest in found:
            print(summary_row(url, manifest))
        return 0
    if args.command == "info":
        from store.catalog import dataset_info, format_info

        info = dataset_info(args.url, args.storage_options)
        print(json.dumps(info, indent=2) if args.json else format_info(info))
        return 0
    from store.verify import verify_dataset

    problems = verify_dataset(args.url, args.storage_options, sample_chunks=args.sample_chunks)
    for problem in problems:
        print(redact(problem))
    if problems:
        print(f"{len(problems)} problem(s) found in {args.url}.", file=sys.stderr)
        return 1
    print(f"ok: {args.url} is sealed, complete and matches its checksums.")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
