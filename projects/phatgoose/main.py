"""PHATGOOSE's command line: the original's bash wrappers and scripts, one subcommand each.

    python -m projects.phatgoose.main <command> [-exp_name N] [-dataset D] [-old_exp_name O]
        [-extra_bindings 'k=v k=v'] [--gin_files f.gin ...] [--gin_bindings 'k=v' ...]

Bindings apply in order: gin files (default configs/tiny.gin), --gin_bindings, -extra_bindings, then the
flags. Commands (see the README's command map): train_single_task_loralinear, train_gate, train_multitask,
eval_multitask, retriever, manipulations, concatenate, and `table` (the whole tiny pipeline for one seed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli import run_main
from common.distributed import prepare_process
from projects.phatgoose import configurables as C
from projects.phatgoose import procedures as P

CONFIGS = Path(__file__).resolve().parent / "configs"
COMMANDS = (
    "train_single_task_loralinear",
    "train_gate",
    "train_multitask",
    "eval_multitask",
    "retriever",
    "manipulations",
    "concatenate",
    "table",
)


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return text.lower() == "true"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="projects.phatgoose.main",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("--gin_files", nargs="*", default=[str(CONFIGS / "tiny.gin")])
    p.add_argument("--gin_bindings", nargs="*", default=[])
    p.add_argument("-exp_name")
    p.add_argument("-dataset")
    p.add_argument("-old_exp_name")
    p.add_argument("-extra_bindings", default="")
    p.add_argument("-datasets", nargs="*", help="train_multitask: the datasets (default: the Full setting)")
    p.add_argument("-make_expert_library", type=_bool, default=False)
    p.add_argument("-create_checkpoint", type=_bool, default=False)
    p.add_argument("-dataset_setting", default="Full")
    p.add_argument("-seed", type=int, help="training seed (default: Trainer.seed)")
    return p


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [f"-{n}" for n in names if not getattr(args, n)]
    if missing:
        raise SystemExit(f"{args.command} needs {' '.join(missing)}")


def run(argv: list[str] | None = None) -> object:
    args = parser().parse_args(argv)
    bindings = list(args.gin_bindings) + C.split_bindings(args.extra_bindings)
    if args.exp_name:
        bindings.append(f'main.exp_name="{args.exp_name}"')
    C.parse(args.gin_files, bindings)
    exp_name = C.main_settings()["exp_name"]
    if args.command == "train_single_task_loralinear":
        _require(args, "exp_name", "dataset")
        return P.train_single_task_loralinear(exp_name, args.dataset, args.seed)
    if args.command == "train_gate":
        _require(args, "exp_name", "dataset", "old_exp_name")
        return P.train_gate_step(exp_name, args.dataset, args.old_exp_name, args.seed)
    if args.command == "train_multitask":
        _require(args, "exp_name")
        return P.train_multitask(exp_name, args.datasets or P.expert_names("Full"), args.seed)
    if args.command == "eval_multitask":
        if not exp_name and C.scoped("M/MODEL", C.model_settings)["load_experts"]:
            raise SystemExit("eval_multitask needs -exp_name (or M/MODEL/Model.init_moma_calls=[])")
        return P.evaluate(exp_name)
    if args.command == "retriever":
        if args.make_expert_library:
            return P.retriever_library(args.dataset_setting)
        if args.create_checkpoint:
            return P.retriever_checkpoint(args.dataset_setting)
        return P.evaluate(P.retrieval_exp(args.dataset_setting), retrieval=True)
    if args.command in ("manipulations", "concatenate"):
        return P.manipulate()
    from projects.phatgoose.pipeline import run_table

    return run_table(args.seed if args.seed is not None else 0)


def main(argv: list[str] | None = None) -> None:
    prepare_process()  # one report from a multi-process launch; say if the launcher ignored a request
    out = run(argv)
    if isinstance(out, dict):
        print({k: v for k, v in out.items()})
    else:
        print(out)


if __name__ == "__main__":
    sys.exit(run_main(main))
