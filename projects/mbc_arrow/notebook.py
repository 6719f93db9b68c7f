"""The notebook end to end for one seed: private library -> MBC -> cluster experts -> Rouge-L of
oracle / uniform / Arrow on both libraries -> held-out multiple choice of base / uniform / Arrow.

Arrow's top_k is chosen on the validation split from `arrow_top_k_grid` (or fixed by `top_k` when the
grid is empty); the test split is read once per configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.io import write_json
from common.rundir import RunDir, seed_everything
from projects.mbc_arrow import clustering
from projects.mbc_arrow.evaluators import downstream_scores, rouge_evaluate, target_loss
from projects.mbc_arrow.expert_model import MultiExpertModel, load_base, precision
from projects.mbc_arrow.library import get_expert_library
from projects.mbc_arrow.tasks import HELDOUT_TASK, check_heldout, downstream_task, downstream_tasks, task_data
from projects.mbc_arrow.train_expert import train_expert

IN_DISTRIBUTION = ("oracle", "uniform", "arrow", "oracle_mbc", "uniform_mbc", "arrow_mbc")
DOWNSTREAM = ("base", "uniform", "arrow")


def _train_all(
    cfg: dict[str, Any], library_id: str, jobs: list[tuple[str, str, str | None]], out: Path
) -> dict:
    lib = get_expert_library(library_id, create=True)
    logs = {}
    for name, task, task_path in jobs:
        sub = {**cfg, "expert_name": name, "finetune_task_name": task, "finetune_task_path": task_path}
        if name not in lib:  # a re-run resumes where it stopped
            logs[name] = train_expert(sub, lib, str(out / "train" / name))
    return logs


def plot_bars(rd: RunDir, name: str, values: dict[str, float], ylabel: str, arrow_color: str = "red") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    colors = [arrow_color if k.startswith("arrow") else "tab:blue" for k in values]
    ax.bar(list(values), list(values.values()), color=colors)
    ax.set_ylabel(ylabel)
    rd.save_plot(fig, name, values)
    plt.close(fig)


def run_notebook(cfg: dict[str, Any], rd: RunDir) -> dict[str, Any]:
    seed_everything(cfg["seed"])
    out = rd.path
    tasks = list(cfg["tasks"])
    device, dtype = cfg["device"], precision(cfg["precision"])[1]
    offline_heldout = downstream_tasks(cfg) == [HELDOUT_TASK]  # else lm-eval tasks (paper scale)
    heldout = downstream_task(HELDOUT_TASK, cfg["heldout_examples"]) if offline_heldout else None
    if heldout is not None and cfg["dataset"] == "offline":
        check_heldout(heldout, tasks)  # the held-out task shares no text with any expert task
    private_id, mbc_id = f"local://{out / 'library'}", f"local://{out / 'mbc_library'}"
    train_logs = _train_all(cfg, private_id, [(t, t, None) for t in tasks], out)
    private = get_expert_library(private_id)
    mbc_cfg = {"k": cfg["k"], "sparsity_threshold": cfg["sparsity_threshold"], "seed": cfg["mbc_seed"]}
    mbc_cfg["n_components"] = cfg["n_components"]
    clusters = clustering.mbc_transform(private, mbc_cfg)
    write_json(out / "mbc_clusters.json", clusters)
    jobs = [(c, c, str(out / "mbc_clusters.json")) for c in clusters if clusters[c]]
    train_logs |= _train_all(cfg, mbc_id, jobs, out)

    data = task_data(tasks, dataset=cfg["dataset"], max_eval=cfg["max_eval_examples"])
    arrow_sel = {
        "name": "arrow",
        "router_temp": cfg["router_temp"],
        "lora_merge_after": cfg["lora_merge_after"],
    }
    arrow_sel["tie_params"] = cfg["tie_params"]

    def rouge(model: MultiExpertModel, split: str) -> dict[str, Any]:
        return rouge_evaluate(
            model,
            data[split],
            max_output_length=cfg["max_output_length"],
            batch_size=cfg["predict_batch_size"],
            prompt_format=cfg["prompt_format"],
            stop_at_newline=cfg["stop_at_newline"],
        )

    def loss(model: MultiExpertModel, name: str) -> None:
        r = target_loss(
            model,
            data["test"],
            max_input_length=cfg["max_input_length"],
            max_output_length=cfg["max_output_length"],
            prompt_format=cfg["prompt_format"],
        )
        losses[name], per_task[f"loss_{name}"] = r["loss"], r["per_task"]

    rouge_scores, per_task, top_k, losses = {}, {}, {}, {}
    for suffix, lib_id in (("", private_id), ("_mbc", mbc_id)):
        model = MultiExpertModel.from_pretrained_library(
            lib_id, {"name": "task_name"}, device=device, dtype=dtype
        )
        for name, sel in (("oracle", {"name": "task_name"}), ("uniform", {"name": "uniform"})):
            model.set_selector(sel)
            r = rouge(model, "test")
            rouge_scores[name + suffix], per_task[name + suffix] = r["rougeL"], r["per_task"]
            loss(model, name + suffix)
            if name == "uniform" and not suffix:
                model.save_pretrained(out / "uniform_model", overwrite=True)  # the notebook's own folder
        grid = cfg["arrow_top_k_grid"] or [cfg["top_k"]]
        val = {}
        for k in grid if len(grid) > 1 else []:
            model.set_selector({**arrow_sel, "top_k": k})
            val[k] = rouge(model, "validation")["rougeL"]
        top_k[suffix or "private"] = best = max(val, key=val.get) if val else grid[0]
        model.set_selector({**arrow_sel, "top_k": best})
        r = rouge(model, "test")
        rouge_scores["arrow" + suffix], per_task["arrow" + suffix] = r["rougeL"], r["per_task"]
        loss(model, "arrow" + suffix)
        if not suffix:
            model.save_pretrained(out / "arrow_model", overwrite=True)
        top_k[f"validation{suffix}"] = val

    del model
    base, tok = load_base(cfg["base_model"], device, dtype)
    scores = {"base": downstream_scores(base, tok, cfg, heldout)}
    del base
    for name in ("uniform", "arrow"):  # reloaded as the notebook does: from_pretrained of the saved model
        m = MultiExpertModel.from_pretrained(out / f"{name}_model", device, dtype)
        scores[name] = downstream_scores(m.model, m.tokenizer, cfg, heldout)
    # one number per model: the held-out task's accuracy, or the mean over the lm-eval tasks
    key = HELDOUT_TASK if offline_heldout else "average"
    downstream = {name: s[key] for name, s in scores.items()}

    plot_bars(rd, "rouge_in_distribution", rouge_scores, "Rouge-L (test)")
    label = f"accuracy on {HELDOUT_TASK}" if offline_heldout else "mean score over the lm-eval tasks"
    plot_bars(rd, "downstream_heldout", downstream, label)
    plot_bars(rd, "target_loss_in_distribution", losses, "target loss (test, lower is better)")
    metrics = {"rouge": rouge_scores, "loss": losses, "downstream": downstream}
    if not offline_heldout:
        per_task["downstream"] = scores
    rd.write_results(metrics, per_task=per_task, clusters=clusters, arrow_top_k=top_k, training=train_logs)
    return metrics
