"""Fine-tune specialists, train routers, or evaluate a checkpoint, with the original `main.py`'s flags.

    python -m projects.compatible_specialization.main --scale tiny --datasets tinycodes --train_mlp
    python -m projects.compatible_specialization.main --datasets tinycodes --eval --chkpt CKPT
    python -m projects.compatible_specialization.main --datasets gsm-hard --router_method standard --topk 2 \
        --router_ckpts CODE MATH [--multi_layer_router --num_multi_layer_experts L] [--eval --chkpt ROUTED]

`--dataset` works as an abbreviation of `--datasets`, as in the original's argparse. Trailing
`key=value` arguments override the config (e.g. `finetune.early_step=20`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common.cli import run_main
from common.distributed import is_main_process, prepare_process
from common.rundir import RunDir, seed_everything
from projects.compatible_specialization import experiments
from projects.compatible_specialization.checkpoints import (
    checkpoint_kind,
    load_base,
    load_routed,
    load_specialist,
)
from projects.compatible_specialization.config import SCALES, resolve
from projects.compatible_specialization.data import domain_of

PROJECT = "compatible_specialization"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="gpt2", help="gpt2 (the paper); heads of an imported .pt come from it")
    p.add_argument(
        "--datasets", nargs="+", default=["gsm-hard"], help="tinycodes | orca-math-problems | gsm-hard"
    )
    p.add_argument("--batch_size", type=int, help="windows per optimizer step (training) or per eval batch")
    p.add_argument("--context", type=int, help="window length in tokens")
    p.add_argument(
        "--eval", action="store_true", help="only evaluate --chkpt (or the base) and print Test loss"
    )
    p.add_argument(
        "--chkpt", help="a specialist or routed checkpoint: ours (.safetensors) or the authors' (.pt)"
    )
    p.add_argument(
        "--router_ckpts", nargs="+", help="the specialists to route between (code first, as the paper)"
    )
    p.add_argument(
        "--router_method", choices=["standard"], help="a learned bias-free linear router per layer"
    )
    p.add_argument("--topk", type=int, help="experts kept per token (softmax first, not renormalised)")
    p.add_argument("--renormalize", action="store_true", help="divide the kept top-k weights by their sum")
    p.add_argument(
        "--multi_layer_router", action="store_true", help="route over neighbouring layers' MLPs too"
    )
    p.add_argument(
        "--num_multi_layer_experts", type=int, help="L: layers per expert set (with --multi_layer_router)"
    )
    p.add_argument(
        "--train_tokens", type=int, help="training windows (the original counts windows, not tokens)"
    )
    p.add_argument("--optim", choices=["adamw"], default="adamw")
    p.add_argument("--lr", type=float)
    p.add_argument("--wd", type=float)
    p.add_argument("--grad_accum", type=int)
    p.add_argument(
        "--train_mlp", action="store_true", help="fine-tune the MLPs (the default without routers)"
    )
    p.add_argument("--name", help="run name (the run folder under out_dir)")
    p.add_argument("--pretrained", action="store_true", help="start from the pretrained base (always done)")
    p.add_argument("--eval_sep", nargs="*", help="accepted for compatibility; losses are per dataset already")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--scale",
        choices=SCALES,
        help="paper (default), tiny, micro or real (SmolLM2-135M): picks config.CONFIG_FILES[scale]",
    )
    p.add_argument("--config", help="a config file instead of the scale's")
    p.add_argument("--out_dir", help="where runs are written")
    p.add_argument(
        "--dry_run", action="store_true", help="build the paper model and routed model on meta; no data"
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


def _split_overrides(args: argparse.Namespace) -> None:
    """Move `key=value` items swallowed by a multi-valued flag into the overrides."""
    for flag in ("datasets", "router_ckpts", "eval_sep"):
        values = getattr(args, flag) or []
        kept = [v for v in values if "=" not in v or Path(v).exists()]
        args.overrides += [v for v in values if v not in kept]
        setattr(args, flag, kept or (["gsm-hard"] if flag == "datasets" else None))


def _mode(args: argparse.Namespace) -> str:
    if args.dry_run:
        return "dry_run"
    if args.eval:
        return "eval"
    return "routing" if args.router_ckpts else "finetune"


def config_from(args: argparse.Namespace) -> dict[str, Any]:
    """Flags into the config section of the mode they apply to (training flags: finetune or routing)."""
    mode = _mode(args)
    flags: dict[str, Any] = {
        "arch": args.arch,
        "context": args.context,
        "seed": args.seed,
        "out_dir": args.out_dir,
    }
    section = "routing" if args.router_method or args.router_ckpts else "finetune"
    for key, value in [
        ("train_tokens", args.train_tokens),
        ("lr", args.lr),
        ("wd", args.wd),
        ("grad_accum", args.grad_accum),
        ("batch_size", args.batch_size if mode != "eval" else None),
    ]:
        flags[f"{section}.{key}"] = value
    flags["eval_batch_size"] = args.batch_size if mode == "eval" else None
    flags["routing.topk"] = args.topk
    flags["routing.renormalize"] = True if args.renormalize else None
    if args.multi_layer_router:
        flags["routing.num_multi_layer_experts"] = args.num_multi_layer_experts
    return resolve(args.scale, args.config, args.overrides, flags)


def dry_run(cfg: dict[str, Any]) -> dict[str, Any]:
    """The paper's model, its routed version and the step counts, on `meta` (no weights, no data)."""
    from common.models import build_meta, count_parameters, paper_config
    from projects.compatible_specialization.checkpoints import configure, specialist_mlps
    from projects.compatible_specialization.mixture import routed_model

    if ":" in cfg["model"]["base"]:
        raise ValueError(
            f"--dry_run builds a paper model on meta; {cfg['model']['base']!r} (scale {cfg['scale']}) is a local "
            "base: use --scale paper, or run the real arm's commands with small train_tokens overrides"
        )
    config = paper_config(cfg["model"]["base"])
    model = configure(build_meta(config), cfg["model"]["activation_function"], cfg["model"]["untie_head"])
    routing = cfg["routing"]
    L = routing["num_multi_layer_experts"]
    routed = routed_model(
        model, [specialist_mlps(model)] * 2, top_k=min(routing["topk"], 2 * L), num_multi_layer_experts=L
    )
    info = {
        "parameters": count_parameters(model),
        "mlp_parameters": sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n),
        "router_parameters": sum(p.numel() for n, p in routed.named_parameters() if "router" in n),
        "finetune_steps": cfg["finetune"]["train_tokens"] // cfg["finetune"]["batch_size"],
        "routing_steps": routing["train_tokens"] // routing["batch_size"],
        "datasets": {d: cfg["data"][d] for d in ("code", "math", "target")},
    }
    for k, v in info.items():
        print(f"{k}: {v}")
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    prepare_process()  # one report from a multi-process launch; say if the launcher ignored a request
    args = parser().parse_args(argv)
    _split_overrides(args)
    cfg = config_from(args)
    mode = _mode(args)
    if mode == "dry_run":
        return dry_run(cfg)
    seed = cfg["seed"]
    seed_everything(seed)
    domain = domain_of(args.datasets[0])
    base, tokenizer = load_base(cfg["model"], cfg["scale"], cfg["device"])
    experiments.check_context(cfg, base)
    corpus = experiments.Corpus(cfg, tokenizer)
    test_split = cfg["data"]["test_split"]
    dataset = args.datasets[0]

    if mode == "eval":
        if not is_main_process():  # evaluation and its report are rank 0's
            return {}
        if args.chkpt is None:
            model = base
        elif checkpoint_kind(args.chkpt, cfg["arch"]) == "routed":
            L = cfg["routing"]["num_multi_layer_experts"] if args.multi_layer_router else None
            if Path(args.chkpt).suffix == ".pt":
                L = L or 1
            model = load_routed(
                args.chkpt, base, arch=cfg["arch"], top_k=args.topk, num_multi_layer_experts=L
            )
        else:
            model = load_specialist(args.chkpt, base, cfg["arch"])
        loss = experiments.evaluate(cfg, model, corpus.windows(domain, test_split))
        print(f"Test loss:       {loss}")
        return {"test_loss": loss}

    name = args.name or f"{cfg['arch']}-{dataset}-{mode}"
    run = RunDir(
        Path(cfg["out_dir"]) / name,
        project=PROJECT,
        experiment=mode,
        scale=cfg["scale"],
        seed=seed,
        config=cfg,
    )
    if mode == "finetune":
        model, snaps = experiments.finetune_specialist(cfg, base, corpus, domain, run.path, seed)
        if not is_main_process():  # every process trained; rank 0 alone evaluates and reports
            return {}
        metrics = {"test_loss": experiments.evaluate(cfg, model, corpus.windows(domain, test_split))}
        for label in ("early", "later"):
            step = cfg["finetune"][f"{label}_step"]
            if step in snaps:
                print(f"{label} checkpoint (step {step}): {snaps[step]}")
    else:
        if len(args.router_ckpts) < 2:
            raise ValueError("--router_ckpts needs at least two specialists to route between")
        specialists = [load_specialist(p, base, cfg["arch"]) for p in args.router_ckpts]
        L = cfg["routing"]["num_multi_layer_experts"]
        model, path = experiments.train_routed(cfg, base, specialists, corpus, run.path, seed, L)
        if not is_main_process():
            return {}
        metrics = {"test_loss": experiments.evaluate(cfg, model, corpus.windows(domain, test_split))}
        print(f"routed checkpoint: {path}")
    run.write_results(metrics, split=corpus.record(domain))
    print(f"Test loss:       {metrics['test_loss']}")
    return metrics


if __name__ == "__main__":
    sys.exit(run_main(main))
