#!/usr/bin/env bash
# The reproduction table: every experiment of the paper for each seed, then mean ± std and the figures.
# SCALE=tiny (default; offline, one CPU thread, ~5 min per seed), SCALE=paper (GPT-2 124M, hub data, GPUs)
# or SCALE=real (SmolLM2-135M on the zoo's code / GSM tasks, one CPU thread, hours: README "The real arm").
# SEEDS: "0 1 2" (tiny, paper) or the zoo's "0 1" (real). Runs go to $OUT (runs/compatible_specialization/
# <scale>_table)/seed_<s>/<experiment>/; every training stage resumes from its checkpoints and a finished
# one is reused (a run folder trained for another config is refused), so a killed table is re-run as is.
# CONFIG=<file> replaces the scale's config (the tests run SCALE=real with configs/micro_real.yaml).
# SPLIT=1 runs each seed in two processes (two cores): the evaluations (specialists, interpolation, CKA)
# beside the router training (routing, multi-layer), the same numbers as one process; the fine-tuning runs
# once, in whichever process gets to it first (the other waits for it).
set -euo pipefail
SCALE=${SCALE:-tiny}
PY=${PY:-python}
if [ "$SCALE" = real ]; then
  SEEDS=${SEEDS:-"0 1"}  # the zoo's seeds
else
  SEEDS=${SEEDS:-"0 1 2"}
fi
OUT=${OUT:-runs/compatible_specialization/${SCALE}_table}
if [ -n "${CONFIG:-}" ]; then WHICH=(--config "$CONFIG"); else WHICH=(--scale "$SCALE"); fi
for seed in $SEEDS; do
  run=("$PY" -m projects.compatible_specialization.pipeline "${WHICH[@]}" --seed "$seed" --out "$OUT")
  if [ "${SPLIT:-0}" = 1 ]; then
    "${run[@]}" --experiments specialists,interpolation,cka &
    evals=$!
    "${run[@]}" --experiments routing,multi_layer
    wait "$evals"
  else
    "${run[@]}"
  fi
done
"$PY" -m projects.compatible_specialization.analyze --table "$OUT"
