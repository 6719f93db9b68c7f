"""Run a merge as the original's `src/merging/<method>.py`: load the experts of a checkpoint descriptor and
their metadata, merge for each λ of the sweep, pick λ on the validation mixture, save the merged model.

The test split is never read here: evaluate the chosen model with `inference --merged_model ...
-ed evaluation_split=test`, as the original does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from common.io import load_tensors, write_json
from common.registry import lookup
from common.rundir import RunDir
from projects.mats.experiment import checkpoint_paths, eval_data, evaluate, merge_dir
from projects.mats.merging import MergeError
from projects.mats.methods import METHODS
from projects.mats.model import build, load_state, read_state, save_model, state_of
from projects.mats.tasks import tasks_of


def metadata_dir(checkpoint: str | Path) -> Path:
    return Path(checkpoint).parent / "gram_matrix"


def checkpoint_stem(checkpoint: str | Path) -> str:
    """'checkpoint_7' for '.../checkpoint_7' (or the earlier '.../checkpoint_7.safetensors')."""
    return Path(checkpoint).name.split(".")[0]


def fisher_file(checkpoint: str | Path, kind: str, true_fisher: bool, split: str) -> Path:
    """checkpoint_X_{diagonal|blockwise}_{empirical|true}_fisher_{split}.safetensors, beside the checkpoint."""
    which = "true" if true_fisher else "empirical"
    return (
        metadata_dir(checkpoint) / f"{checkpoint_stem(checkpoint)}_{kind}_{which}_fisher_{split}.safetensors"
    )


def gram_file(checkpoint: str | Path, which: str, true_fisher: bool, split: str) -> Path:
    """checkpoint_X[_true]_gram_matrix_{input_activations|output_activation_gradients}_{split}.safetensors."""
    true = "_true" if true_fisher else ""
    return (
        metadata_dir(checkpoint)
        / f"{checkpoint_stem(checkpoint)}{true}_gram_matrix_{which}_{split}.safetensors"
    )


def stats_kinds(method: str, hparams: Mapping[str, Any]) -> list[str]:
    """Which metadata a merge reads."""
    if method == "diagonal_fisher":
        return ["fisher"]
    if method == "regmean":
        return ["input_gram"]
    if method == "conjugate_gradient":
        return {
            "average": [],
            "diagonal_fisher": ["fisher"],
            "regmean": ["input_gram"],
            "blockwise_fisher": ["blockwise_fisher"],
            "kfac": ["input_gram", "output_gram"],
        }[hparams.get("objective", "regmean")]
    return []


def load_stats(
    checkpoints: Sequence[Path], kinds: Sequence[str], *, split: str, true_fisher: bool
) -> list[dict[str, Any]] | None:
    """Each expert's saved metadata by kind, with the command to run when a file is missing."""
    if not kinds:
        return None
    files = {
        "fisher": lambda c: fisher_file(c, "diagonal", true_fisher, split),
        "blockwise_fisher": lambda c: fisher_file(c, "blockwise", true_fisher, split),
        "input_gram": lambda c: gram_file(c, "input_activations", true_fisher, split),
        "output_gram": lambda c: gram_file(c, "output_activation_gradients", true_fisher, split),
    }
    out = []
    for c in checkpoints:
        entry = {}
        for kind in kinds:
            path = files[kind](c)
            if not path.is_file():
                command = "save_gram_matrix" if "gram" in kind else "save_fisher"
                raise MergeError(
                    f"missing metadata {path}: run `main.py {command}` for this checkpoint first"
                )
            entry[kind] = load_tensors(path)
        out.append(entry)
    return out


def lambdas(model_lambda: float | None, step: float = 0.1) -> list[float]:
    """None or -1 sweeps 0, step, ..., 1 (the original's convention, step 0.1); otherwise the one value."""
    if model_lambda is not None and model_lambda != -1:
        return [float(model_lambda)]
    n = round(1 / step)
    if abs(n * step - 1) > 1e-9:
        raise ValueError(f"merge.lambda_step {step} does not divide 1")
    return [round(i / n, 4) for i in range(n + 1)]


def run_merge(
    cfg: Mapping[str, Any],
    method: str,
    *,
    mixture: str,
    descriptor: str,
    method_dir: str,
    model_lambda: float | None,
    hparams: Mapping[str, Any] | None = None,
    split: str = "validation",
    true_fisher: bool = False,
    scale: str | None = None,
) -> dict[str, Any]:
    """Merge, sweep λ on validation, save the best as {method_dir}/model_lambda_{λ}/merged_model/
    (a `save_pretrained` folder, or a PEFT adapter folder for (IA)^3)."""
    merge = lookup(METHODS, method, "merge method")
    hparams = dict(hparams or {})
    tasks = tasks_of(mixture)
    paths = checkpoint_paths(cfg, descriptor, tasks)
    model, tokenizer = build(cfg["model"])
    fmt = cfg["model"]["format"]
    base = state_of(model, fmt)
    experts = [read_state(paths[t]) for t in tasks]
    stats = load_stats(
        list(paths.values()), stats_kinds(method, hparams), split=split, true_fisher=true_fisher
    )
    init = hparams.get("initialization")
    if isinstance(init, (str, Path)) and (
        Path(init).suffix in (".safetensors", ".pt") or Path(init).is_dir()
    ):
        hparams["initialization"] = read_state(hparams["initialization"])
    val = eval_data(cfg, split="validation", dataset=mixture)
    out_dir = merge_dir(cfg, mixture, descriptor, method_dir)
    sweep, log = [], []
    best = None
    for lam in tqdm(lambdas(model_lambda, cfg["merge"]["lambda_step"]), desc=f"{method} λ"):
        block_log: list[dict] = []
        extra = {"log": block_log} if method == "conjugate_gradient" else {}
        merged = merge(base, experts, stats=stats, model_lambda=lam, **hparams, **extra)
        load_state(model, fmt, merged, where=f"{method} merge")
        scores = evaluate(model, tokenizer, val, cfg)
        sweep.append({"model_lambda": lam, **scores})
        log.append({"model_lambda": lam, "blocks": block_log})
        if best is None or scores["average"] > best[1]["average"]:
            best = (lam, scores, merged)
    lam, scores, merged = best
    lam_dir = out_dir / f"model_lambda_{lam}"
    load_state(model, fmt, merged, where=f"{method} merge")
    save_model(model, fmt, lam_dir / "merged_model", tokenizer)
    if method == "conjugate_gradient":
        write_json(out_dir / "log.json", log)
    config = {**cfg, "eval_dataset": {**cfg["eval_dataset"], "evaluation_dataset": mixture}}
    merge_info = {"method": method, "mixture": mixture, "descriptor": descriptor,
                  **{k: v for k, v in hparams.items() if isinstance(v, (str, int, float))}}  # fmt: skip
    RunDir(out_dir, project="mats", experiment=f"merge_{method_dir}", scale=scale or cfg["model"]["scale"],
           seed=None, config=config).write_results(
        {"validation": scores, "model_lambda": lam}, merge=merge_info, sweep=sweep,
        merged_model=str(lam_dir / "merged_model"),
    )  # fmt: skip
    return {"model_lambda": lam, "validation": scores, "merged_model": lam_dir / "merged_model",
            "out_dir": out_dir, "sweep": sweep}  # fmt: skip
