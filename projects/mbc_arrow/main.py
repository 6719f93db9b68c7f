"""MBC + Arrow (Ostapenko et al. 2024) on an expert library: the mttl notebook's steps as subcommands.

    python -m projects.mbc_arrow.main <command> -c <config.yaml> -k key=value ...

train-expert   one LoRA expert into a library (mttl train_experts.py; `finetune_task_path=clusters.json
               finetune_task_name=cluster_0` trains a cluster expert)
train-library  one expert per task of `tasks` (the notebook's bash loop)
library        list / clone / add (a PEFT adapter folder) / remove / import-mttl
mbc            MBC clusters of a library -> `output_file` (mttl mbc_clustering.py)
arrow          Arrow prototypes persisted in a library (ArrowTransform.transform(..., persist=True))
evaluate       Rouge-L of a library behind a selector (mttl eval_library.py, merge_or_route=...);
               `save_model=dir` saves the model with its selector; `downstream=True` adds the held-out task
downstream     held-out multiple-choice accuracy of a saved model (`model_path`) or of the base model
notebook       the whole notebook for one seed (the tiny table runs this)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from common.cli import run_main
from common.config import load_config
from common.distributed import prepare_process
from common.io import check_replaceable, write_json
from common.rundir import RunDir, seed_everything
from projects.mbc_arrow import arrow, clustering
from projects.mbc_arrow.library import ExpertInfo, get_expert_library

PROJECT = "mbc_arrow"
# mttl's flat `-k key=value` namespace (ExpertConfig + selector + transform fields), defaults as the code.
DEFAULTS: dict[str, Any] = {
    "scale": "tiny",
    "seed": 42,
    "output_dir": "runs/mbc_arrow/run",
    # model and data
    "base_model": "tiny:gpt_neo",
    "device": "auto",  # where models are loaded and evaluated: auto (cuda if available), cpu, cuda, cuda:N
    "precision": "32",  # mttl's flag: 32, bf16 (train under bf16 autocast, evaluate a bf16 model) or 16
    # offline (tiny/micro), flan (= sordonia/flan-10k-flat) or sordonia/flan-debug-flat (the notebook's)
    "dataset": "offline",
    "tasks": [],
    "finetune_task_name": None,
    "finetune_task_path": None,
    "expert_name": None,
    "max_train_examples": None,
    "max_eval_examples": None,
    "max_input_length": 2048,
    "max_output_length": 64,
    "prompt_format": "mttl",  # mttl's "<source> <target>"+eos; "answer": "<source>\nAnswer: <target>"+eos
    # LoRA (mttl LoRAConfig)
    "lora_rank": 4,
    "lora_alpha": 16.0,
    "lora_dropout": 0.05,
    "modify_layers": "q_proj|k_proj|v_proj",
    "tie_params": None,
    "lora_init": "mttl",  # A ~ U(±1/√(3·d_in)) as mttl's lora.py; "peft": peft's U(±1/√d_in)
    # training
    "learning_rate": 1e-4,
    "weight_decay": 0.0,
    "warmup_proportion": 0.06,
    "train_batch_size": 16,
    "micro_batch_size": 16,
    "num_train_epochs": 1.0,
    "total_steps": None,
    "log_backend": "jsonl",  # or "tensorboard": also write the logged scalars as TensorBoard events
    "max_grad_norm": 0.1,
    "eval_every": None,  # None / -1: validate every epoch (mttl); N: every N optimizer steps
    "force": False,
    # library
    "library_id": None,
    "mbc_library_id": None,
    "destination_id": None,
    "adapter_path": None,
    "task_name": None,
    # MBC (MBClusteringTransformConfig)
    "k": 10,
    "sparsity_threshold": 0.5,
    "n_components": 64,
    "mbc_seed": 42,
    "output_file": None,
    "recompute": False,
    # selectors (eval_library.py)
    "merge_or_route": "uniform",
    "top_k": -1,
    "router_temp": 1.0,
    "lora_merge_after": False,
    "arrow_top_k_grid": [],
    # evaluation
    "split": "test",
    "predict_batch_size": 16,
    "stop_at_newline": False,  # mttl stops generation at EOS or max_output_length only
    "save_model": None,
    "overwrite": False,  # let save_model replace a non-empty folder that is not a saved model
    "model_path": None,
    "downstream": False,
    # ours offline, or lm-eval task names: the paper's table (tasks.PAPER_ZERO_SHOT), the notebook's arc_easy
    "downstream_task": "tweet_sentiment_other",
    "downstream_limit": None,  # lm-eval's `limit` per task (None: the whole test set)
    "allow_code_execution": False,  # humaneval and mbpp run the generated code: opt in
    "heldout_examples": 300,
}
# keys whose value is one of a few names (checked when the config is read)
CHOICES = {"prompt_format": ("mttl", "answer"), "lora_init": ("mttl", "peft")}
# eval_library.py's merge_or_route values -> our selector configs
ROUTES = {
    "oracle": {"name": "task_name"},
    "uniform": {"name": "uniform"},
    "uniform_lora_after_op": {"name": "uniform", "lora_merge_after": True},
    "arrow": {"name": "arrow"},
}


def selector_for(cfg: dict[str, Any]) -> dict[str, Any]:
    from common.registry import lookup

    sel = dict(lookup(ROUTES, cfg["merge_or_route"], "merge_or_route"))
    if sel["name"] == "arrow":
        sel.update(
            top_k=cfg["top_k"], router_temp=cfg["router_temp"], lora_merge_after=cfg["lora_merge_after"]
        )
        sel["tie_params"] = cfg["tie_params"]
    return sel


def run_dir(cfg: dict[str, Any], experiment: str) -> RunDir:
    return RunDir(
        cfg["output_dir"],
        project=PROJECT,
        experiment=experiment,
        scale=cfg["scale"],
        seed=cfg["seed"],
        config=cfg,
    )


def need(cfg: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if cfg.get(k) in (None, "", [])]
    if missing:
        raise SystemExit(f"error: set {', '.join(f'{k}=...' for k in missing)} (with -k)")


def cmd_train_expert(cfg: dict[str, Any]) -> dict[str, Any]:
    from projects.mbc_arrow.train_expert import train_expert

    need(cfg, "finetune_task_name", "library_id")
    seed_everything(cfg["seed"])
    lib = get_expert_library(cfg["library_id"], create=True)
    rd = run_dir(cfg, "train_expert")
    out = train_expert(cfg, lib, str(rd.path / "train"))
    rd.write_results(out)
    return out


def cmd_train_library(cfg: dict[str, Any]) -> dict[str, Any]:
    need(cfg, "tasks", "library_id")
    out = {}
    for task in cfg["tasks"]:
        sub = {
            **cfg,
            "finetune_task_name": task,
            "expert_name": task,
            "output_dir": f"{cfg['output_dir']}/{task}",
        }
        out[task] = cmd_train_expert(sub)
    return out


def cmd_library(cfg: dict[str, Any], action: str) -> Any:
    if action == "import-mttl":
        from projects.mbc_arrow.mttl_import import import_mttl_library

        need(cfg, "adapter_path", "destination_id")
        return import_mttl_library(cfg["adapter_path"], cfg["destination_id"]).keys()
    need(cfg, "library_id")
    if action == "list":
        lib = get_expert_library(cfg["library_id"])
        return {
            n: {"tasks": lib.info(n).task_names, "base_model": lib.info(n).base_model} for n in lib.keys()
        }
    if action == "clone":
        need(cfg, "destination_id")
        return get_expert_library(cfg["library_id"]).clone(cfg["destination_id"], force=cfg["force"]).keys()
    if action == "add" and not cfg.get("base_model"):
        raise SystemExit(
            "error: `library add` needs base_model=... (with -k): the base the adapter was trained on, "
            "e.g. base_model=tiny:gpt_neo, a local folder or a hub id"
        )
    lib = get_expert_library(cfg["library_id"], create=action == "add")
    if action == "add":
        need(cfg, "adapter_path", "expert_name")
        info = ExpertInfo(
            expert_name=cfg["expert_name"],
            expert_task_name=cfg["task_name"] or cfg["expert_name"],
            base_model=cfg["base_model"],
            source="peft",
        )
        lib.add_adapter_dir(cfg["adapter_path"], info, force=cfg["force"])
    elif action == "remove":
        need(cfg, "expert_name")
        lib.remove_expert(cfg["expert_name"])
    return lib.keys()


def cmd_mbc(cfg: dict[str, Any]) -> dict[str, list[str]]:
    need(cfg, "library_id", "output_file")
    lib = get_expert_library(cfg["library_id"])
    mbc_cfg = {
        "k": cfg["k"],
        "sparsity_threshold": cfg["sparsity_threshold"],
        "n_components": cfg["n_components"],
        "seed": cfg["mbc_seed"],
    }
    clusters = clustering.mbc_transform(lib, mbc_cfg, recompute=cfg["recompute"])
    write_json(cfg["output_file"], clusters)
    return clusters


def cmd_arrow(cfg: dict[str, Any]) -> dict[str, int]:
    need(cfg, "library_id")
    lib = get_expert_library(cfg["library_id"])
    tie = cfg["tie_params"] or arrow.FROM_TRAINING  # unset: each expert's own, as mttl's ArrowTransformConfig
    protos = arrow.arrow_transform(lib, {"tie_params": tie}, recompute=cfg["recompute"])
    return {n: len(p) for n, p in protos.items()}


def cmd_evaluate(cfg: dict[str, Any]) -> dict[str, Any]:
    from projects.mbc_arrow.evaluators import downstream_scores, rouge_evaluate
    from projects.mbc_arrow.expert_model import MODEL_KIND, MultiExpertModel, precision
    from projects.mbc_arrow.tasks import HELDOUT_TASK, downstream_tasks, task_data

    need(cfg, "library_id")
    if cfg["downstream"]:
        downstream_tasks(cfg)  # a bad task list fails before any model is loaded
    if cfg["save_model"]:  # before the evaluation: a refusal costs nothing
        check_replaceable(cfg["save_model"], MODEL_KIND, cfg["overwrite"])
    seed_everything(cfg["seed"])
    rd = run_dir(cfg, "evaluate")
    lib = get_expert_library(cfg["library_id"])
    model = MultiExpertModel.from_pretrained_library(
        lib, selector_for(cfg), device=cfg["device"], dtype=precision(cfg["precision"])[1]
    )
    tasks = cfg["tasks"] or sorted({t for n in lib.keys() for t in lib.info(n).task_names})
    data = task_data(tasks, dataset=cfg["dataset"], max_eval=cfg["max_eval_examples"])[cfg["split"]]
    out = rouge_evaluate(
        model,
        data,
        max_output_length=cfg["max_output_length"],
        batch_size=cfg["predict_batch_size"],
        prompt_format=cfg["prompt_format"],
        stop_at_newline=cfg["stop_at_newline"],
    )
    if cfg["downstream"]:
        scores = downstream_scores(model.model, model.tokenizer, cfg)
        if HELDOUT_TASK in scores:
            out["downstream_acc"] = scores[HELDOUT_TASK]
        else:
            out["downstream"] = scores
    if cfg["save_model"]:
        model.save_pretrained(cfg["save_model"], overwrite=cfg["overwrite"])
    rd.write_results(out)
    return out


def cmd_downstream(cfg: dict[str, Any]) -> dict[str, Any]:
    from projects.mbc_arrow.evaluators import downstream_evaluate, zero_shot_evaluate
    from projects.mbc_arrow.expert_model import MultiExpertModel, load_base, precision
    from projects.mbc_arrow.tasks import HELDOUT_TASK, downstream_task, downstream_tasks

    names = downstream_tasks(cfg)  # a bad task list fails before any model is loaded
    rd = run_dir(cfg, "downstream")
    device, dtype = cfg["device"], precision(cfg["precision"])[1]
    if cfg["model_path"]:
        mem = MultiExpertModel.from_pretrained(cfg["model_path"], device, dtype)
        model, tok = mem.model, mem.tokenizer
    else:
        model, tok = load_base(cfg["base_model"], device, dtype)
    if names == [HELDOUT_TASK]:  # ours offline: lm-eval's full metrics of the one task
        out = dict(downstream_evaluate(model, tok, downstream_task(HELDOUT_TASK, cfg["heldout_examples"])))
    else:
        out = zero_shot_evaluate(
            model,
            tok,
            names,
            batch_size=cfg["predict_batch_size"],
            limit=cfg["downstream_limit"],
            allow_code_execution=cfg["allow_code_execution"],
        )
    rd.write_results(out)
    return out


def cmd_notebook(cfg: dict[str, Any]) -> dict[str, Any]:
    from projects.mbc_arrow.notebook import run_notebook

    return run_notebook(cfg, run_dir(cfg, "notebook"))


COMMANDS = {
    "train-expert": cmd_train_expert,
    "train-library": cmd_train_library,
    "mbc": cmd_mbc,
    "arrow": cmd_arrow,
    "evaluate": cmd_evaluate,
    "downstream": cmd_downstream,
    "notebook": cmd_notebook,
}
LIBRARY_ACTIONS = ("list", "clone", "add", "remove", "import-mttl")


def parse(argv: list[str] | None = None) -> tuple[str, str | None, dict[str, Any]]:
    p = argparse.ArgumentParser(prog="projects.mbc_arrow.main", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=[*COMMANDS, "library"])
    p.add_argument("action", nargs="?", choices=LIBRARY_ACTIONS, help="for `library`")
    p.add_argument("-c", "--config", action="append", default=[], help="YAML/JSON config (repeatable)")
    p.add_argument(
        "-k", "--keys", nargs="+", action="extend", default=[], help="key=value overrides (mttl -k)"
    )
    args = p.parse_args(argv)
    if (args.command == "library") != (args.action is not None):
        p.error("`library` takes one action of " + ", ".join(LIBRARY_ACTIONS) + "; other commands take none")
    defaults = DEFAULTS
    if args.action == "add":  # an expert's base is a fact about it: never the default, never guessed
        defaults = {**DEFAULTS, "base_model": None}
    cfg = load_config(defaults, args.config, args.keys)
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            p.error(f"{key}={cfg[key]!r} is not one of {', '.join(allowed)}")
    return args.command, args.action, cfg


def main(argv: list[str] | None = None) -> None:
    prepare_process()  # one report from a multi-process launch; say if the launcher ignored a request
    command, action, cfg = parse(argv)
    out = cmd_library(cfg, action) if command == "library" else COMMANDS[command](cfg)
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(run_main(main))
