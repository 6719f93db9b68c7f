#!/usr/bin/env bash
# `make table-mats`: the multitask merging table (full fine-tuning and (IA)^3, 3 seeds) at SCALE=tiny.
# Env: SCALE (tiny | paper), PY (python). Writes runs/mats/<scale>/{full_model,ia3}/seed<N>/results.json
# and runs/mats/<scale>/table.md.
set -euo pipefail
SCALE=${SCALE:-tiny}
PY=${PY:-python}
if [ "$SCALE" = "paper" ]; then
  echo "table-mats: paper scale needs GPUs and bigscience/P3 (the hub, or MOERGING_P3_DIR); run the README's commands with the paper_*.yaml configs"
  exit 1
fi
# One process for the six cells: the data and tokenised questions are loaded once.
$PY -m projects.mats.reproduce --scale "$SCALE" --format ia3 full_model --seed 0 1 2 --runs runs/mats
$PY -m projects.mats.analyze --runs runs/mats --scale "$SCALE"
