#!/usr/bin/env bash
# make table-phatgoose: the tiny reproduction (3 seeds, every method on the held-out tasks), then the table.
# Env: SCALE=tiny|real|paper, PY=<python>. Each seed is one run of `main.py table` (the README steps in process).
# SCALE=real: the expert zoo (SmolLM2-135M, `make zoo` first), zoo seeds 0 1 (README "The real arm").
set -euo pipefail
SCALE="${SCALE:-tiny}"
PY="${PY:-.venv/bin/python}"
if [ "$SCALE" = "real" ]; then
  SEEDS="${SEEDS:-0 1}"
  # 1. the gates of every zoo expert (cached per expert, seed and settings; a killed run resumes)
  "$PY" -m projects.phatgoose.real gates --seeds $SEEDS
  # 2. every method on every zoo task (k chosen on the library tasks' validation; test read once)
  "$PY" -m leaderboard.run --seeds $SEEDS --entries phatgoose retrieval average_activation merged_experts \
    best_single_expert multitask oracle base
  # 3. the routing probe (held-out validation splits), 4. the table, results.json and the heat map
  "$PY" -m projects.phatgoose.real probe --seeds $SEEDS --out runs/phatgoose/real
  "$PY" -m projects.phatgoose.analyze --real runs/phatgoose/real --leaderboard results/leaderboard
  # 5. RESULTS.md's phatgoose section from every phatgoose run (tiny and real; other sections kept)
  "$PY" -m common.results_md --runs runs/phatgoose --scale '' --out RESULTS.md
  exit 0
fi
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
