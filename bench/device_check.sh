#!/usr/bin/env bash
# On a lent GPU machine (bench/README, "Prepared GPU check"): install the wheels that
# `python -m bench.device_kit` packed into .whl/ (what the machine's image lacks) into /tmp/site, then run
# the prepared check; its JSON and log go to $OUT (the device tool brings that folder back), else to
# bench/results. Arguments are passed to `python -m bench gpu` (e.g. --only train_steps sparsemax);
# PYTHON picks the interpreter (default: the image's python3).
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
out=${OUT:-bench/results}
site=${DEVICE_SITE:-/tmp/site}
if ! compgen -G ".whl/*.whl" > /dev/null; then
  echo "error: no wheels in .whl/; run \`python -m bench.device_kit\` on the development machine and carry .whl." >&2
  exit 2
fi
"$py" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
  || { echo "error: the wheels in .whl/ did not install for $("$py" -V 2>&1); pack them for it (--python-version)." >&2; exit 2; }
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  RAY_USAGE_STATS_ENABLED=0 WANDB_MODE=disabled
command -v nvidia-smi > /dev/null && nvidia-smi -L
mkdir -p "$out"
"$py" -m bench gpu --out "$out/gpu.json" "$@" 2>&1 | tee "$out/gpu.log"
exit "${PIPESTATUS[0]}"
