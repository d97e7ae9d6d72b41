"""The concept browser: per-concept cards of a trained SAE run, as a static page set.

``python -m evaluator.concepts RUN_URL [--dataset URL] [--tokens N] [--top N] [--window W] [--out DIR]``
streams N tokens (vision: N images) of the run's dataset (eval split, the run's row filter
applied) through the SAE and writes ``<run_dir>/concepts/`` (see :mod:`.page` for the format):
open ``concepts/index.html`` straight from disk. ``python -m evaluator.concepts compare RUN_A
RUN_B --text ... | --seq ID | --image PATH`` writes ``compare.html`` (see :mod:`.compare`).

Modules: :mod:`.stats` (streaming per-concept statistics and the vectorised top-n),
:mod:`.data` (run, dataset, reads), :mod:`.cards` (the two passes and the card contents),
:mod:`.tokens` (display strings), :mod:`.images` (thumbnails), :mod:`.page` (the static site),
:mod:`.build` (the command), :mod:`.compare` (the compare view). Browser code: ``static/``.
"""
