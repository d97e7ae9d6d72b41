"""dynsae: the thin CLI and end-to-end pipeline composing store, harvester, trainer and evaluator."""

__version__ = "0.1.0"
