#!/usr/bin/env bash
# The reproduction table: every experiment of the paper for each seed, then mean ± std and the figures.
# SCALE=tiny (default; offline, one CPU thread, ~5 min per seed) or SCALE=paper (GPT-2 124M, hub data, GPUs).
# SEEDS="0 1 2" by default; runs go to runs/compatible_specialization/<scale>_table/seed_<s>/<experiment>/.
set -euo pipefail
SCALE=${SCALE:-tiny}
PY=${PY:-python}
SEEDS=${SEEDS:-"0 1 2"}
OUT=runs/compatible_specialization/${SCALE}_table
for seed in $SEEDS; do
  "$PY" -m projects.compatible_specialization.pipeline --scale "$SCALE" --seed "$seed" --out "$OUT"
done
"$PY" -m projects.compatible_specialization.analyze --table "$OUT"
