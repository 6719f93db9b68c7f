#!/usr/bin/env bash
# make table-mbc_arrow. SCALE=tiny (default) or paper: 3 seeds of the whole notebook, then mean ± std.
# SCALE=real: the notebook on the expert zoo (needs `make zoo`): MBC clusters and their experts, the
# leaderboard's entries for seeds 0 1, then the table and Arrow's routing per layer (README "The real arm").
set -euo pipefail
SCALE=${SCALE:-tiny}
PY=${PY:-.venv/bin/python}
if [ "$SCALE" = real ]; then
  "$PY" -m projects.mbc_arrow.real clusters --seeds 0 1
  "$PY" -m leaderboard.run --entries oracle uniform arrow arrow_gks mbc_oracle mbc_uniform mbc_arrow base --seeds 0 1
  "$PY" -m projects.mbc_arrow.analyze --real --leaderboard results/leaderboard --out runs/mbc_arrow/real --routing --seeds 0 1
  # Arrow's routing probes (zoo seed 0, four tasks; README "The real arm"): GenKnowSub, each expert its own
  # LoRA A initialisation, experts trained 3x longer (the last two train four experts each, cached)
  for v in base gks_mean gks_multitask init_task steps_300; do
    "$PY" -m projects.mbc_arrow.real probe --seed 0 --variant "$v" --train --out runs/mbc_arrow/real/probes
  done
  exit 0
fi
OUT=runs/mbc_arrow/${SCALE}
CONFIG=projects/mbc_arrow/configs/${SCALE}_notebook.yaml
[ "$SCALE" = paper ] && CONFIG=projects/mbc_arrow/configs/paper_gptneo_125m.yaml
for SEED in 1 2 3; do
  "$PY" -m projects.mbc_arrow.main notebook -c "$CONFIG" -k seed=$SEED output_dir="$OUT/seed$SEED"
done
"$PY" -m projects.mbc_arrow.analyze --runs "$OUT" --out "$OUT/table" --routing
