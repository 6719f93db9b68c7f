"""Router-budget probe: the k = 2 routers of one finished seed trained again for longer, nothing else changed.

The real arm's routers (100 steps of 8 windows; the paper's ~1739 of 92) end level with the best fixed
interpolation while their selection loss is still falling (`routing_<stage>/router_selection.json`). This
probe asks whether routing beats interpolation once the routers have converged: the same specialists'
snapshots (the seed's `finetune_<domain>/`, reused, never retrained when finished), the same router
initialisation, data and selection, `routing.train_tokens` multiplied by `--factor`.

    python -m projects.compatible_specialization.router_probe --scale real --seed 0 --factor 4 [--out DIR]

Writes `<out>/seed_<s>/router_probe_x<factor>/results.json` (experiment `router_probe`: routed_<stage>
beside the seed's interp_best_<stage> and routed_<stage> of the 1x routers, and each router's steps) with
the routers' runs under `router_probe_x<factor>_<stage>/` (resumable). Needs the seed's pipeline run
(its specialists and interpolation) in `<out>`.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

from common.cli import UserError, run_main
from common.io import read_json
from common.rundir import RunDir, seed_everything
from projects.compatible_specialization import experiments
from projects.compatible_specialization.checkpoints import load_base, load_specialist
from projects.compatible_specialization.pipeline import PROJECT, STAGES, resolve_seed_args, seed_parser


def probe_config(cfg: dict[str, Any], factor: int) -> dict[str, Any]:
    """The seed's config with the routers' training budget multiplied by `factor` (steps follow the tokens)."""
    if factor < 1:
        raise UserError(f"--factor must be a whole number ≥ 1, got {factor}")
    probe = copy.deepcopy(cfg)
    probe["routing"]["train_tokens"] = cfg["routing"]["train_tokens"] * factor
    return probe


def run_probe(cfg: dict[str, Any], seed: int, out: Path, factor: int) -> dict[str, Any]:
    """Train and evaluate the longer routers of every stage; returns the metrics written."""
    root = out / f"seed_{seed}"
    finished = {name: root / name / "results.json" for name in ("interpolation", "routing")}
    missing = [str(p) for p in finished.values() if not p.is_file()]
    if missing:
        raise UserError(
            f"the probe compares with the seed's own run, which lacks {missing}: run "
            f"`python -m projects.compatible_specialization.pipeline --seed {seed} --out {out}` first"
        )
    before = {name: read_json(p)["metrics"] for name, p in finished.items()}
    seed_everything(seed)
    probe = probe_config(cfg, factor)
    base, tokenizer = load_base(cfg["model"], cfg["scale"], cfg["device"])
    corpus = experiments.Corpus(cfg, tokenizer)
    snaps = {
        domain: experiments.finetune_specialist(cfg, base, corpus, domain, root / f"finetune_{domain}", seed)[
            1
        ]
        for domain in ("code", "math")
    }
    target = corpus.windows("target", cfg["data"]["test_split"])
    run = RunDir(
        root / f"router_probe_x{factor}",
        project=PROJECT,
        experiment="router_probe",
        scale=cfg["scale"],
        seed=seed,
        config=probe,
    )
    metrics: dict[str, Any] = {"factor": factor}
    for stage in STAGES:
        step = cfg["finetune"][f"{stage}_step"]
        specialists = [load_specialist(snaps[d][step], base) for d in ("code", "math")]
        model, path = experiments.train_routed(
            probe, base, specialists, corpus, root / f"router_probe_x{factor}_{stage}", seed
        )
        metrics[f"routed_{stage}"] = experiments.evaluate(cfg, model, target)
        metrics[f"routed_{stage}_1x"] = before["routing"][f"routed_{stage}"]
        metrics[f"interp_best_{stage}"] = before["interpolation"][f"{stage}_best"]
        metrics[f"best_step_{stage}"] = read_json(path.parent / "router_selection.json")["best_step"]
    run.write_results(metrics)
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = seed_parser(
        __doc__.splitlines()[0], out_help="the seed's pipeline folder (default: <out_dir>/<scale>_table)"
    )
    p.add_argument("--factor", type=int, default=4, help="router training tokens x this (default 4)")
    args = p.parse_args(argv)
    cfg, out = resolve_seed_args(args)
    metrics = run_probe(cfg, args.seed, out, args.factor)
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    return metrics


if __name__ == "__main__":
    sys.exit(run_main(main))
