"""MaTS command line: `python -m projects.mats.main <command> ...`, one command per script of the original.

train                 src/training.py                         (-c configs -td/-ed/-tr/-er/-m key=value -w N)
save_fisher           src/merging/save_metadata/save_fisher.py        (-f diagonal|blockwise)
save_gram_matrix      src/merging/save_metadata/save_gram_matrix.py
individual_models     src/merging/individual_models.py
average | task_vectors | ties | diagonal_fisherMerging | regmean
conjugateGradient_average | conjugateGradient_diagonalFisher | conjugateGradient_fisherMerging
inference             src/inference.py (-e run dir --checkpoint_idx N, or --merged_model path)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from common.cli import run_main
from common.config import ConfigError
from common.distributed import is_main_process, prepare_process
from common.io import MissingFileError, read_json, save_tensors
from common.rundir import RunDir, seed_everything
from projects.mats.experiment import (
    GROUP_FLAGS,
    checkpoint_paths,
    eval_data,
    evaluate,
    merge_dir,
    name_of_model,
    register_checkpoint,
    resolve,
)
from projects.mats.merge_run import fisher_file, gram_file, run_merge
from projects.mats.merging import MergeError
from projects.mats.metadata import fisher, gram_matrices
from projects.mats.model import build, load_state, merged_parameters, read_state
from projects.mats.tasks import P3_HOLDOUT, P3_TEMPLATES, load_task, tasks_of
from projects.mats.training import run_dir_of, train_model

# merge command -> (method, default λ, fixed hyperparameters); λ None sweeps 0..1 on validation.
MERGES: dict[str, tuple[str, float | None, dict[str, Any]]] = {
    "average": ("average", 1.0, {}),
    "task_vectors": ("task_arithmetic", None, {}),
    "ties": ("ties", None, {}),
    "diagonal_fisherMerging": ("diagonal_fisher", 1.0, {}),
    "regmean": ("regmean", None, {}),
    "conjugateGradient_average": ("conjugate_gradient", 1.0, {"objective": "average"}),
    "conjugateGradient_diagonalFisher": ("conjugate_gradient", 1.0, {"objective": "diagonal_fisher"}),
    "conjugateGradient_fisherMerging": ("conjugate_gradient", 1.0, {}),
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config_files", nargs="*", default=[], help="config files, later ones win")
    for flag, group in GROUP_FLAGS.items():
        p.add_argument(f"-{flag}", nargs="*", default=[], metavar="KEY=VALUE", help=f"overrides of {group}")
    p.add_argument("-o", "--override", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides")


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", "--dataset_mixture", required=True, help="mixture whose experts are merged")
    p.add_argument(
        "--checkpoint_descriptor", required=True, help="registry key of the experts (full_model, ia3)"
    )
    p.add_argument("--split", default="validation", help="split the metadata was computed on")
    p.add_argument("--use_true_fisher", action="store_true")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="projects.mats.main", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune an expert or the multitask model")
    _common(p)
    p.add_argument("-w", "--world_size", type=int, default=1, help="processes (GPUs), through accelerate")
    p.add_argument("--dry_run", action="store_true", help="build the model on `meta` and print the plan")
    p.add_argument("--register", metavar="REGISTRY.yaml", help="add the best checkpoint to this registry")
    for name in ("save_fisher", "save_gram_matrix"):
        p = sub.add_parser(name, help="save metadata next to each expert's checkpoint")
        _common(p)
        _merge_args(p)
        if name == "save_fisher":
            p.add_argument(
                "-f", "--fisher_approximation", choices=("diagonal", "blockwise"), default="diagonal"
            )
    p = sub.add_parser("individual_models", help="evaluate each expert on its own dataset")
    _common(p)
    _merge_args(p)
    for name in MERGES:
        p = sub.add_parser(name, help=f"merge with {MERGES[name][0]}")
        _common(p)
        _merge_args(p)
        p.add_argument("--model_lambda", type=float, default=None, help="-1 sweeps 0..1 on validation")
        if name == "ties":
            p.add_argument("--top_k", type=float, default=20.0, help="percentage of each task vector kept")
            p.add_argument("--ties_variant", choices=("mats", "mergekit", "peft"), default="mats")
            p.add_argument("--merge_func", choices=("mean", "sum"), default="mean")
        if name.startswith("conjugateGradient"):
            p.add_argument("--num_iterations", type=int, default=100)
            p.add_argument("--initialization", default=None, help="average | pretrained | merged model path")
            p.add_argument(
                "--cg_dtype", choices=("float32", "float64"), default="float32",
                help="CG precision (the original: scipy's cg in float32)",
            )  # fmt: skip
            p.add_argument(
                "--lm_head", choices=("original", "solve"), default="original",
                help="RegMean/K-FAC objective: original keeps the pretrained (RegMean) or averaged (K-FAC) "
                "lm_head; solve solves it with its input Gram",
            )  # fmt: skip
        if name == "conjugateGradient_fisherMerging":
            p.add_argument("-f", "--fisher_approximation", choices=("diagonal", "blockwise"), default=None)
            p.add_argument(
                "--use_backward", action="store_true", help="K-FAC objective (input and output Grams)"
            )
    p = sub.add_parser("inference", help="evaluate a training run's checkpoint or a merged model")
    _common(p)
    p.add_argument("-e", "--experiment_dir", help="a training run directory")
    p.add_argument("--checkpoint_idx", type=int, default=None, help="default: the run's best checkpoint")
    p.add_argument(
        "--merged_model",
        help="a merged_model folder (or a bare .safetensors / .pt state of the earlier layout)",
    )
    p.add_argument("-i", "--inference_dataset_mixture", default=None, help="mixture to evaluate")
    return ap


def _config(args: argparse.Namespace, files: Sequence[str] | None = None) -> dict[str, Any]:
    groups = {flag: getattr(args, flag) for flag in GROUP_FLAGS}
    return resolve(files if files is not None else args.config_files, groups, args.override)


def _launch_distributed(argv: Sequence[str], world_size: int) -> None:
    """Re-run this command under `accelerate launch` with `world_size` processes (the original's -w, one
    per GPU); without that many GPUs it stops with a clear error instead of launching CPU processes."""
    import torch

    if torch.cuda.device_count() < world_size:
        raise SystemExit(
            f"train -w {world_size}: needs {world_size} GPUs, this machine has {torch.cuda.device_count()}; "
            "drop -w (or use -w 1) to train in this process"
        )
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("-w", "--world_size"):
            skip = True
        elif not a.startswith(("-w=", "--world_size=")):
            rest.append(a)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(world_size)]
    subprocess.run([*launch, "-m", "projects.mats.main", *rest], check=True)


def cmd_train(args: argparse.Namespace, argv: Sequence[str]) -> None:
    cfg = _config(args)
    if args.dry_run:
        from common.adapters import add_adapter, ia3_config
        from common.models import build_meta, count_parameters

        model = build_meta(cfg["model"]["base"])
        if cfg["model"]["format"] == "ia3":
            model = add_adapter(model, ia3_config(model.config.model_type))
        merged = merged_parameters(model, cfg["model"]["format"])
        print(yaml.safe_dump(cfg, sort_keys=False))
        print(f"model {cfg['model']['base']}: {count_parameters(model)} parameters, "
              f"{sum(p.numel() for p in merged.values())} merged ({cfg['model']['format']}); "
              f"run dir {run_dir_of(cfg)}")  # fmt: skip
        for task in tasks_of(cfg["train_dataset"]["train_dataset"]):
            if task in P3_TEMPLATES:
                configs = P3_TEMPLATES[task]
                print(f"data {task}: bigscience/P3 configs {', '.join(configs)}; validation = the last "
                      f"{P3_HOLDOUT.get(task, 1000)} train examples")  # fmt: skip
        return
    if args.world_size > 1 and "LOCAL_RANK" not in os.environ:
        _launch_distributed(argv, args.world_size)
        return
    run_dir = train_model(cfg)
    if not is_main_process():  # every process trained; rank 0 registers the checkpoint and reports
        return
    if args.register:
        best = read_json(run_dir / "results.json")["checkpoint"]
        register_checkpoint(args.register, name_of_model(cfg), cfg["experiment"]["instruction_format"],
                            cfg["model"]["format"], cfg["train_dataset"]["train_dataset"], Path(best).resolve())  # fmt: skip
    print(f"trained: {run_dir}")


def cmd_metadata(args: argparse.Namespace) -> None:
    cfg = _config(args)
    tasks = tasks_of(args.dataset_mixture)
    paths = checkpoint_paths(cfg, args.checkpoint_descriptor, tasks)
    md = cfg["metadata"]
    seed_everything(md["seed"])
    for task, ckpt in paths.items():
        model, tokenizer = build(cfg["model"])
        fmt = cfg["model"]["format"]
        load_state(model, fmt, read_state(ckpt), where=str(ckpt))
        examples = load_task(task, args.split, md["num_examples"])
        kw = dict(
            true_fisher=args.use_true_fisher, seed=md["seed"], max_source_len=cfg["model"]["max_source_len"]
        )
        if args.command == "save_fisher":
            kind = args.fisher_approximation
            values = fisher(model, tokenizer, examples, merged_parameters(model, fmt), kind=kind, **kw)
            out = fisher_file(ckpt, kind, args.use_true_fisher, args.split)
            save_tensors(out, values)
            print(f"{task}: {out}")
        else:
            G, H = gram_matrices(model, tokenizer, examples, batch_size=md["gram_batch_size"], **kw)
            for which, values in (("input_activations", G), ("output_activation_gradients", H)):
                out = gram_file(ckpt, which, args.use_true_fisher, args.split)
                save_tensors(out, values)
                print(f"{task}: {out}")


def cmd_individual(args: argparse.Namespace) -> None:
    cfg = _config(args)
    tasks = tasks_of(args.dataset_mixture)
    paths = checkpoint_paths(cfg, args.checkpoint_descriptor, tasks)
    model, tokenizer = build(cfg["model"])
    split = cfg["eval_dataset"]["evaluation_split"]
    scores = {}
    for task, ckpt in paths.items():
        load_state(model, cfg["model"]["format"], read_state(ckpt), where=str(ckpt))
        scores[task] = evaluate(model, tokenizer, eval_data(cfg, split=split, dataset=task), cfg)[task]
    scores["average"] = sum(scores[t] for t in tasks) / len(tasks)
    out = merge_dir(cfg, args.dataset_mixture, args.checkpoint_descriptor, "individual_models")
    RunDir(out, project="mats", experiment="individual_models", scale=cfg["model"]["scale"], seed=None,
           config=cfg).write_results({split: scores})  # fmt: skip
    print(yaml.safe_dump({split: scores}, sort_keys=False))


def cg_method_dir(hparams: Mapping[str, Any], args: argparse.Namespace) -> str:
    """The original's descriptive folder, e.g. fisher_merging_blockwise_empirical_fisher_validation_..."""
    which = "true" if args.use_true_fisher else "empirical"
    objective = {"average": "average", "diagonal_fisher": f"diagonal_{which}_fisher_{args.split}",
                 "regmean": f"regmean_{args.split}", "blockwise_fisher":
                 f"fisher_merging_blockwise_{which}_fisher_{args.split}",
                 "kfac": f"fisher_merging_kfac_{which}_fisher_{args.split}"}[hparams["objective"]]  # fmt: skip
    init = hparams["initialization"]
    init_name = (
        init
        if init in ("average", "pretrained", "zeros")
        else Path(init).parent.parent.name + "_" + Path(init).parent.name
    )
    # Options away from the original's choices get their own folder, so that no run overwrites another.
    dtype, lm_head = hparams.get("dtype", "float32"), hparams.get("lm_head", "original")
    options = ("" if dtype == "float32" else f"_{dtype}") + (
        "" if lm_head == "original" else f"_lm_head_{lm_head}"
    )
    return f"conjugate_gradients/{objective}_initialize_{init_name}_model_lambda_{args.model_lambda}_iterations_{hparams['num_iterations']}{options}"


def cmd_merge(args: argparse.Namespace) -> None:
    method, default_lambda, hparams = MERGES[args.command]
    hparams = dict(hparams)
    if args.model_lambda is None:
        args.model_lambda = default_lambda
    method_dir = args.command
    if args.command == "ties":
        if not 0 < args.top_k <= 100:  # checked before any model is loaded
            raise MergeError(f"--top_k {args.top_k:g}: the percentage of each task vector kept, in (0, 100]")
        hparams.update(top_k=args.top_k, variant=args.ties_variant, merge_func=args.merge_func)
        if args.ties_variant != "mats" or args.merge_func != "mean" or args.top_k != 20.0:
            method_dir = f"ties_{args.ties_variant}_{args.merge_func}_top{args.top_k:g}"
    if method == "conjugate_gradient":
        if args.command == "conjugateGradient_fisherMerging":
            hparams["objective"] = (
                "kfac"
                if args.use_backward
                else "blockwise_fisher"
                if args.fisher_approximation == "blockwise"
                else "regmean"
            )
        hparams.update(num_iterations=args.num_iterations, initialization=args.initialization or "zeros",
                       dtype=args.cg_dtype, lm_head=args.lm_head)  # fmt: skip
        method_dir = cg_method_dir(hparams, args)
    cfg = _config(args)
    result = run_merge(
        cfg, method, mixture=args.dataset_mixture, descriptor=args.checkpoint_descriptor, method_dir=method_dir,
        model_lambda=args.model_lambda, hparams=hparams, split=args.split, true_fisher=args.use_true_fisher,
    )  # fmt: skip
    print(f"model_lambda {result['model_lambda']}: validation {result['validation']['average']:.4f}")
    print(f"merged model: {result['merged_model']}")


def _saved_config(path: Path) -> Path | None:
    for parent in (path.parent, path.parent.parent):
        if (parent / "config.yaml").is_file():
            return parent / "config.yaml"
    return None


def cmd_inference(args: argparse.Namespace) -> None:
    if bool(args.experiment_dir) == bool(args.merged_model):
        raise SystemExit("inference: give exactly one of -e <run dir> and --merged_model <file>")
    if args.experiment_dir:
        run = Path(args.experiment_dir)
        files = [run / "config.yaml", *args.config_files]
        idx = args.checkpoint_idx
        if idx is None:
            idx = read_json(run / "results.json")["metrics"]["best_checkpoint_idx"]
        weights = run / f"checkpoint_{idx}"
        if not weights.is_dir():  # a run of the earlier layout kept a bare state dict
            weights = run / f"checkpoint_{idx}.safetensors"
        if not weights.exists():  # training keeps the best checkpoint only
            kept = sorted(p.name for p in run.glob("checkpoint_[0-9]*"))
            raise SystemExit(f"inference: {run} has no checkpoint {idx}; it keeps {kept}")
        out = run / f"inference_checkpoint_{idx}"
    else:
        weights = Path(args.merged_model)
        if (
            not weights.exists()
        ):  # a save_pretrained / PEFT folder, or a bare state file of the earlier layout
            raise MissingFileError(f"inference --merged_model {weights}: no such file or folder")
        saved = _saved_config(weights)
        if not (args.config_files or saved):
            raise ConfigError(
                f"inference --merged_model {weights}: no config.yaml beside it (in {weights.parent} or "
                f"{weights.parent.parent}) says which model it merges; pass the merge's config with -c <file>"
            )
        files = args.config_files or [saved]
        out = weights.parent / "inference"
    cfg = _config(args, files)
    model, tokenizer = build(cfg["model"])
    load_state(model, cfg["model"]["format"], read_state(weights), where=str(weights))
    split = cfg["eval_dataset"]["evaluation_split"]
    scores = evaluate(
        model, tokenizer, eval_data(cfg, split=split, dataset=args.inference_dataset_mixture), cfg
    )
    out = out / split
    RunDir(out, project="mats", experiment="inference", scale=cfg["model"]["scale"], seed=None,
           config=cfg).write_results({split: scores}, weights=str(weights))  # fmt: skip
    print(yaml.safe_dump({split: scores, "model": name_of_model(cfg)}, sort_keys=False))


def main(argv: Sequence[str] | None = None) -> None:
    prepare_process()  # one report from a multi-process launch; say if the launcher ignored a request
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.command == "train":
        cmd_train(args, argv)
    elif args.command in ("save_fisher", "save_gram_matrix"):
        cmd_metadata(args)
    elif args.command == "individual_models":
        cmd_individual(args)
    elif args.command == "inference":
        cmd_inference(args)
    else:
        cmd_merge(args)


if __name__ == "__main__":
    sys.exit(run_main(main))
