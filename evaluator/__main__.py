"""``python -m evaluator run RUN_URL... [--json]``, ``report SWEEP_URL``, ``concepts ...``.

* ``run``: evaluate each run directory on its dataset's eval split; writes ``<run>/eval.json``
  and prints one line per run (or the reports as JSON with ``--json``). A SAELens or sparsify
  folder is evaluated too, on ``--dataset URL`` (:mod:`evaluator.foreign`); ``--out`` moves eval.json.
* ``report``: write ``<sweep>/report.md`` and its PNG plots from the runs' eval.json files.
* ``concepts``: the concept browser (:mod:`evaluator.concepts`), arguments passed through.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from store.cli import CommandHelp, subcommand_parser
from store.config import add_storage_options_argument
from store.errors import UserError, run_cli
from trainer.run_format import EVAL_FILE, REPORT_FILE

RUN_HELP = CommandHelp(
    does="Score trained SAEs on their dataset's held-out rows: reconstruction (fvu), sparsity (L0, dead "
         "latents), the model's loss with the SAE spliced in (CE), zero-shot accuracy for vision, and, where "
         "the dataset allows, recovery of a known dictionary and sparse probing. SAELens and sparsify folders "
         "are scored too, on --dataset.",
    reads="run folders (or SAELens / sparsify folders) and their dataset",
    writes=f"{EVAL_FILE} in each folder (or --out); prints one line per SAE, or JSON with --json",
    example="runs/sweep1/variant-relu_m-4096 --max-tokens 100000")
REPORT_HELP = CommandHelp(
    does="Write a sweep's report: each variant compared with the Sparsemax SAE at the same sparsity, with a "
         "verdict per metric, a table per dictionary size, every run, and plots.",
    reads="a sweep folder: its runs' configs and evaluations",
    writes=f"{REPORT_FILE} and PNG plots in the sweep folder; prints the report's URL",
    example="runs/sweep1")


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def cmd_run(args: argparse.Namespace) -> int:
    from evaluator.evaluate import evaluate_run
    from evaluator.zeroshot import ZeroShotConfig
    from store.config import load_config
    from trainer.run_format import eval_url

    zeroshot = load_config(ZeroShotConfig, args.zeroshot, args.set) if args.zeroshot else None
    if args.out and len(args.runs) > 1:
        raise UserError(f"--out {args.out} names one {EVAL_FILE} but {len(args.runs)} SAEs were given; "
                        "evaluate them one at a time or drop --out.")
    cache: dict = {}
    reports = []
    for url in args.runs:
        report = evaluate_run(url, max_tokens=args.max_tokens, ce_contexts=args.ce_contexts, device=args.device,
                              batch_size=args.batch_size, zeroshot=zeroshot, model_cache=cache,
                              progress=not args.json, dataset_url=args.dataset, out=args.out,
                              storage_options=args.storage_options)
        reports.append(report.model_dump(mode="json"))
        if not args.json:
            ce = (f"ce_degradation {_fmt(report.ce_degradation)} nats, ce_recovered {_fmt(report.ce_recovered)}"
                  if report.ce_skipped is None else f"CE skipped: {report.ce_skipped}")
            print(f"{url}: fvu {_fmt(report.fvu)} (unfiltered {_fmt(report.fvu_unfiltered)}), "
                  f"l0 {_fmt(report.l0, '.1f')}, dead {_fmt(report.dead_frac, '.3f')}, {ce}; "
                  f"{report.tokens.kept} tokens -> {args.out or eval_url(url)}")
    if args.json:
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from evaluator.report import write_report

    url = write_report(args.sweep, args.storage_options)
    print(url)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluator",
                                     description="Evaluate trained SAEs, write sweep reports, browse concepts.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = subcommand_parser(sub, "run", "python -m evaluator run", RUN_HELP)
    run.add_argument("runs", nargs="+", metavar="RUN_URL",
                     help="run directory, or a SAELens / sparsify folder (needs --dataset)")
    run.add_argument("--dataset", default=None, metavar="DATASET_URL",
                     help="dataset to evaluate on (required for SAELens/sparsify folders; default: the run's)")
    run.add_argument("--out", default=None, metavar="EVAL_JSON_URL",
                     help=f"where to write {EVAL_FILE} (default: inside the run or folder)")
    run.add_argument("--json", action="store_true", help="print the reports as JSON")
    add_storage_options_argument(run)
    run.add_argument("--max-tokens", type=int, default=None, help="cap on eval-split rows (default: all)")
    run.add_argument("--ce-contexts", type=int, default=64, help="eval contexts for CE (0 skips CE)")
    run.add_argument("--device", default="cpu")
    run.add_argument("--batch-size", type=int, default=4096)
    run.add_argument("--zeroshot", default=None, metavar="CONFIG.yaml",
                     help="zero-shot concept classification datasets (vision runs)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key of the zero-shot config")
    run.set_defaults(func=cmd_run)
    report = subcommand_parser(sub, "report", "python -m evaluator report", REPORT_HELP)
    report.add_argument("sweep", metavar="SWEEP_URL")
    add_storage_options_argument(report)
    report.set_defaults(func=cmd_report)
    sub.add_parser("concepts", help="concept browser (see python -m evaluator concepts --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "concepts":
        try:
            module = importlib.import_module("evaluator.concepts.__main__")
        except ModuleNotFoundError as err:
            raise UserError(f"the concept browser is not available in this build ({err.name} is missing).") from None
        return int(module.main(args[1:]) or 0)
    parsed = build_parser().parse_args(args)
    if getattr(parsed, "max_tokens", None) is not None and parsed.max_tokens <= 0:
        raise UserError(f"--max-tokens {parsed.max_tokens} must be positive; omit it to use the whole eval split.")
    return parsed.func(parsed)


if __name__ == "__main__":
    sys.exit(run_cli(main))
