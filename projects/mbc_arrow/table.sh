#!/usr/bin/env bash
# The tiny (or paper) notebook table: 3 seeds of the whole notebook, then mean ± std (make table-mbc_arrow).
set -euo pipefail
SCALE=${SCALE:-tiny}
PY=${PY:-.venv/bin/python}
OUT=runs/mbc_arrow/${SCALE}
CONFIG=projects/mbc_arrow/configs/${SCALE}_notebook.yaml
[ "$SCALE" = paper ] && CONFIG=projects/mbc_arrow/configs/paper_gptneo_125m.yaml
for SEED in 1 2 3; do
  "$PY" -m projects.mbc_arrow.main notebook -c "$CONFIG" -k seed=$SEED output_dir="$OUT/seed$SEED"
done
"$PY" -m projects.mbc_arrow.analyze --runs "$OUT" --out "$OUT/table" --routing
