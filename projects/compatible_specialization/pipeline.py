"""One seed of the paper's experiments end to end (the tiny table): specialists, their test losses,
activation interpolation early and later, MoE routing early and later, multi-layer routing, CKA.

    python -m projects.compatible_specialization.pipeline --scale tiny --seed 0 [--out runs/...] [key=value ...]
    python -m projects.compatible_specialization.pipeline --scale real --seed 0   # SmolLM2-135M, resumable

`--experiments` runs some of them, so that one seed can use two cores or machines sharing the folder: the
evaluations beside the router training, with the same numbers as one process (every training is seeded by
itself):

    python -m projects.compatible_specialization.pipeline --scale real --seed 1 --experiments specialists,interpolation,cka &
    python -m projects.compatible_specialization.pipeline --scale real --seed 1 --experiments routing,multi_layer

Writes `<out>/seed_<s>/<experiment>/results.json` for experiments specialists, interpolation, routing,
multi_layer and cka (the schema of `common.rundir`); `analyze.py --table <out>` gathers the seeds.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.cli import UserError, run_main
from common.rundir import RunDir, finished_results, run_dir_busy, seed_everything
from projects.compatible_specialization import experiments
from projects.compatible_specialization.checkpoints import load_base, load_specialist
from projects.compatible_specialization.config import SCALES, resolve
from projects.compatible_specialization.mixture import decoder_blocks

PROJECT = "compatible_specialization"
STAGES = ("early", "later")
EXPERIMENTS = ("specialists", "interpolation", "routing", "multi_layer", "cka")
WAIT_POLL_S = 30.0  # how often routing looks again for the interpolation another process is computing


def parse_experiments(text: str) -> tuple[str, ...]:
    """`--experiments` "routing,multi_layer" -> the named experiments in the pipeline's order."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(EXPERIMENTS))
    if unknown or not names:
        raise UserError(f"--experiments: unknown {unknown or text!r}; choose from {', '.join(EXPERIMENTS)}")
    return tuple(e for e in EXPERIMENTS if e in names)


def run_seed(
    cfg: dict[str, Any], seed: int, out: Path, experiments_to_run: Sequence[str] = EXPERIMENTS
) -> dict[str, dict[str, Any]]:
    """The experiments of one seed (default all); returns {experiment: metrics} of those run.

    A re-run (after a kill) reuses every experiment whose `results.json` was written under this config and
    resumes the rest from their training checkpoints, so only unfinished work is redone. Every experiment
    needs the specialists' fine-tuning, which is run (or resumed, or read when finished) first; "specialists"
    adds their evaluation. Routing records the best interpolation beside it: run without "interpolation", it
    trains and evaluates its routers, then reads interpolation's results, waiting while another process
    works on the seed (`wait_for`). Multi-layer routing's L = 1 is routing's later result.
    """
    todo = set(experiments_to_run)
    root = out / f"seed_{seed}"
    saved = {name: finished_results(root / name, cfg) for name in EXPERIMENTS if name in todo}
    if all(metrics is not None for metrics in saved.values()):  # nothing to compute: no model is loaded
        return saved  # (so a seed whose results shipped without its multi-GB snapshots is not retrained)
    seed_everything(seed)
    base, tokenizer = load_base(cfg["model"], cfg["scale"], cfg["device"])
    experiments.check_context(cfg, base)
    corpus = experiments.Corpus(cfg, tokenizer)
    data, ft = cfg["data"], cfg["finetune"]
    split = {d: corpus.record(d) for d in ("code", "math", "target")}

    def rundir(name: str) -> RunDir:
        return RunDir(
            root / name, project=PROJECT, experiment=name, scale=cfg["scale"], seed=seed, config=cfg
        )

    def finished(name: str) -> dict[str, Any] | None:
        return finished_results(root / name, cfg)

    # Specialists: MLP-only fine-tuning on code and on math, snapshots at the early and later steps.
    spec_metrics = finished("specialists")
    spec_run = None
    if spec_metrics is None and "specialists" in todo:
        spec_run = rundir("specialists")  # first: its wall time covers the fine-tuning too
    snaps = {}
    for domain in ("code", "math"):
        _, snaps[domain] = experiments.finetune_specialist(
            cfg, base, corpus, domain, root / f"finetune_{domain}", seed
        )
    models = {
        (domain, stage): load_specialist(snaps[domain][ft[f"{stage}_step"]], base)
        for domain in ("code", "math")
        for stage in STAGES
    }
    test, select = data["test_split"], data["select_split"]
    target = {s: corpus.windows("target", s) for s in dict.fromkeys([select, test])}
    if spec_run is not None:
        spec_metrics = {
            f"{domain}_{stage}": experiments.evaluate(
                cfg, models[domain, stage], corpus.windows(domain, test)
            )
            for domain, stage in models
        }
        spec_metrics |= {
            f"{name}_on_target": experiments.evaluate(cfg, model, target[test], "float32")
            for name, model in [("base", base), *((f"{d}_{s}", m) for (d, s), m in models.items())]
        }
        spec_run.write_results(spec_metrics, split=split)

    # Activation interpolation on the target: α = 1 is the code model, α = 0 the math model.
    interp = finished("interpolation")
    if interp is None and "interpolation" in todo:
        interp_run, interp = rundir("interpolation"), {}
        curves = {}
        for stage in STAGES:
            curves[stage] = experiments.interpolation_sweep(
                cfg, base, models["code", stage], models["math", stage], target
            )
            best = experiments.best_alpha(curves[stage], select, test)
            ends = (curves[stage][test][0.0] + curves[stage][test][1.0]) / 2
            interp |= {f"{stage}_best_alpha": best["alpha"], f"{stage}_best": best["test_loss"]}
            interp |= {f"{stage}_min": best["test_min"], f"{stage}_sharpness": ends - best["test_min"]}
            interp |= {f"{stage}_alpha_{a:.1f}": loss for a, loss in curves[stage][test].items()}
        interp_run.write_results(
            interp,
            curves={
                s: {k: {str(a): v for a, v in c.items()} for k, c in cs.items()} for s, cs in curves.items()
            },
            split=split,
        )

    # MoE routing (N = 2 experts per layer, k = 2) early and later; multi-layer routing on the later models.
    routing = finished("routing")
    if routing is None and "routing" in todo:
        routing_run, routed = rundir("routing"), {}
        for stage in STAGES:
            model, _ = experiments.train_routed(
                cfg,
                base,
                [models["code", stage], models["math", stage]],
                corpus,
                root / f"routing_{stage}",
                seed,
            )
            routed[stage] = experiments.evaluate(cfg, model, target[test])
        interp = interp or wait_for(root / "interpolation", cfg, "routing")
        routing = {}
        for stage in STAGES:
            routing |= {f"routed_{stage}": routed[stage], f"interp_best_{stage}": interp[f"{stage}_best"]}
        routing_run.write_results(routing, split=split)

    multi = finished("multi_layer")
    if multi is None and "multi_layer" in todo:
        if routing is None:
            raise UserError(
                f"multi-layer routing's L = 1 is routing's result, and {root / 'routing'} has none under "
                "this config: run routing first (--experiments routing,multi_layer)"
            )
        multi_run = rundir("multi_layer")
        multi = {"L1": routing["routed_later"]}  # L = 1 is standard routing (same run)
        for L in cfg["routing"]["multi_layer"]:
            if L == 1 or L > len(decoder_blocks(base)):
                continue
            model, _ = experiments.train_routed(
                cfg, base, [models["code", "later"], models["math", "later"]], corpus,
                root / f"multi_layer_L{L}", seed, num_multi_layer_experts=L, top_k=2 * L,
            )  # fmt: skip
            multi[f"L{L}"] = experiments.evaluate(cfg, model, target[test])
        Ls = sorted(int(k[1:]) for k in multi)
        if len(Ls) >= 3:  # saturation: the first added layer helps more than the last
            multi["gain_first"] = multi[f"L{Ls[0]}"] - multi[f"L{Ls[1]}"]
            multi["gain_last"] = multi[f"L{Ls[-2]}"] - multi[f"L{Ls[-1]}"]
        multi_run.write_results(multi, split=split)

    # CKA between the code and math models' block outputs over fine-tuning.
    cka_metrics = finished("cka")
    if cka_metrics is None and "cka" in todo:
        cka_run = rundir("cka")
        cka = experiments.cka_curve(cfg, base, snaps["code"], snaps["math"], target[select])
        steps = sorted(cka)
        first = next(s for s in steps if s > 0)
        cka_metrics = {
            "cka_first": cka[first],
            "cka_last": cka[steps[-1]],
            "first_step": first,
            "last_step": steps[-1],
        }
        cka_run.write_results(cka_metrics, curve={str(s): v for s, v in cka.items()}, split=split)
    results = {
        "specialists": spec_metrics,
        "interpolation": interp,
        "routing": routing,
        "multi_layer": multi,
        "cka": cka_metrics,
    }
    return {name: results[name] for name in EXPERIMENTS if name in todo}


def wait_for(path: Path, cfg: dict[str, Any], needed_by: str) -> dict[str, Any]:
    """The metrics of the finished experiment in `path`, waiting while another process works on the seed
    (holds the lock of one of its folders: it may be on an earlier experiment still). Refused when, twice
    `WAIT_POLL_S` apart (a process passes between two experiments' folders unlocked), none does."""
    idle = 0
    while (metrics := finished_results(path, cfg)) is None:
        busy = any(run_dir_busy(d) for d in path.parent.iterdir() if d.is_dir())
        idle = 0 if busy else idle + 1
        if idle == 2:
            raise UserError(
                f"{needed_by} records {path.name}'s results beside its own, and {path} has none under this "
                f"config: run {path.name} first, or beside this command (--experiments {path.name})"
            )
        time.sleep(WAIT_POLL_S)
    return metrics


def seed_parser(
    description: str, out_help: str = "default: <out_dir>/<scale>_table"
) -> argparse.ArgumentParser:
    """The arguments of a command on one seed's table folder: --scale / --config, --seed, --out, overrides."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--scale", choices=SCALES, help="default: the --config file's scale, else tiny")
    p.add_argument("--config", help="a config file instead of the scale's (e.g. configs/micro_real.yaml)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help=out_help)
    p.add_argument("overrides", nargs="*")
    return p


def resolve_seed_args(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """(resolved config, table folder) of `seed_parser`'s arguments: flags over overrides over the file."""
    scale = args.scale or (None if args.config else "tiny")
    cfg = resolve(scale, args.config, args.overrides, {"seed": args.seed})
    return cfg, Path(args.out or Path(cfg["out_dir"]) / f"{cfg['scale']}_table")


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = seed_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--experiments",
        default=",".join(EXPERIMENTS),
        help="comma-separated subset to run (default: all); e.g. the evaluations in one process and "
        "routing,multi_layer in another",
    )
    args = parser.parse_args(argv)
    todo = parse_experiments(args.experiments)
    cfg, out = resolve_seed_args(args)
    results = run_seed(cfg, args.seed, out, todo)
    for experiment, metrics in results.items():
        print(experiment, {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    return results


if __name__ == "__main__":
    sys.exit(run_main(main))
