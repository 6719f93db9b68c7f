#!/usr/bin/env bash
# `make table-mats`: the multitask merging table (full fine-tuning and (IA)^3, 3 seeds) at SCALE=tiny.
# Env: SCALE (tiny | real | paper), PY (python). Writes runs/mats/<scale>/{full_model,ia3}/seed<N>/results.json
# and runs/mats/<scale>/table.md.
# SCALE=real: the SmolLM2-135M (IA)^3 and full fine-tuning zoos (seeds $SEEDS, default 0 1; cached and
# resumable), the leaderboard's MaTS entries on each (cached per seed and entry), then the table.
set -euo pipefail
SCALE=${SCALE:-tiny}
PY=${PY:-python}
if [ "$SCALE" = "paper" ]; then
  echo "table-mats: paper scale needs GPUs and bigscience/P3 (the hub, or MOERGING_P3_DIR); run the README's commands with the paper_*.yaml configs"
  exit 1
fi
if [ "$SCALE" = "real" ]; then
  SEEDS=${SEEDS:-0 1}
  $PY -m common.zoo --adapter ia3 --seeds $SEEDS
  $PY -m common.zoo --adapter full --seeds $SEEDS
  # MaTS's merges on each zoo (leaderboard.run's MERGE_ENTRIES; RegMean is not defined for (IA)^3 vectors)
  $PY -m leaderboard.run --adapter ia3 --seeds $SEEDS
  $PY -m leaderboard.run --adapter full --seeds $SEEDS
  # each expert's share of the diagonal Fisher (why a Fisher merge can drop a task; cached statistics)
  $PY -m leaderboard.fisher_mass --adapter ia3 --seeds $SEEDS
  $PY -m leaderboard.fisher_mass --adapter full --seeds $SEEDS
  $PY -m projects.mats.analyze --runs runs/mats --scale real \
    --leaderboard ia3=results/leaderboard/ia3 full_model=results/leaderboard/full
  exit 0
fi
# One process for the six cells: the data and tokenised questions are loaded once.
$PY -m projects.mats.reproduce --scale "$SCALE" --format ia3 full_model --seed 0 1 2 --runs runs/mats
$PY -m projects.mats.analyze --runs runs/mats --scale "$SCALE"
