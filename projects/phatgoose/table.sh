#!/usr/bin/env bash
# make table-phatgoose: the tiny reproduction (3 seeds, every method on the held-out tasks), then the table.
# Env: SCALE=tiny|paper, PY=<python>. Each seed is one run of `main.py table` (the README steps in process).
set -euo pipefail
SCALE="${SCALE:-tiny}"
PY="${PY:-.venv/bin/python}"
if [ "$SCALE" = "paper" ]; then
  echo "phatgoose at paper scale: run the README's per-step commands with --gin_files" \
       "projects/phatgoose/configs/paper_p3.gin (or paper_flan.gin); it needs GPUs and the hub." >&2
  exit 2
fi
for seed in 0 1 2; do
  "$PY" -m projects.phatgoose.main table -seed "$seed" --gin_files projects/phatgoose/configs/tiny.gin
done
"$PY" -m projects.phatgoose.analyze runs/phatgoose/tiny
# why the gates do not route the union task (validation split; README "the routing probe", ~2.5 CPU-min)
"$PY" -m projects.phatgoose.routing_probe runs/phatgoose/tiny
