"""The tiny reproduction for one seed: every README step, in process, then every method on the held-out tasks.

Methods (§4.2): the base model, Multitask, each single expert (and the best one, picked on validation),
Merged Experts, Average Activation, Retrieval, PHATGOOSE. Writes <exp_out>/../seed_<s>/results.json.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gin

from common.io import write_json
from common.rundir import RunDir
from projects.phatgoose import configurables as C
from projects.phatgoose import library as L
from projects.phatgoose import procedures as P
from projects.phatgoose.tasks import TINY_HELDOUT, check_heldout_disjoint

METHODS = (
    "base",
    "multitask",
    "single_expert_mean",
    "best_single_expert",
    "merged_experts",
    "average_activation",
    "retrieval",
    "phatgoose",
)


def build_library(seed: int, experts: list[str]) -> None:
    """Experts, gates, and the four libraries (PHATGOOSE, Average Activation, Merged, Retrieval)."""
    for d in experts:
        P.train_single_task_loralinear(f"{d}_t5_lora", d, seed)
        L.put_index_to_lora(
            P.checkpoint(f"{d}_t5_lora"), P.exp_dir(f"datasets_concatenated/{d}_t5_lora") / "checkpoint"
        )
        gate_exp = f"datasets_concatenated/{d}_t5_lora_inpgatetrainnogumbel"
        P.train_gate_step(gate_exp, d, f"datasets_concatenated/{d}_t5_lora", seed)
        L.use_input_gate_as_router(P.checkpoint(gate_exp))
    P.concatenate(
        "FullCompleteA2inpgatetrainnogumbel_t5_lora_concatenated", "t5_lora_inpgatetrainnogumbel", experts
    )
    P.concatenate("FullCompleteA2_t5_lora_concatenated", "t5_lora", experts, compute_hiddens=True)
    L.average_outer_product_lora_weights(
        P.checkpoint("FullCompleteA2_t5_lora_concatenated"),
        P.exp_dir("FullParameteravg_t5_lora_outerproduct") / "checkpoint",
    )
    P.retriever_library("Full")
    P.retriever_checkpoint("Full")
    P.train_multitask("multitask_t5_lora", experts, seed)


def run_table(seed: int) -> dict[str, Any]:
    """Build everything for `seed` under main.exp_out/seed_<seed> and evaluate every method."""
    root = Path(C.main_settings()["exp_out"]).parent / f"seed_{seed}"
    gin.bind_parameter("main.exp_out", str(root / "exp_out"))
    started = time.time()
    experts = P.expert_names("Full")
    heldout = [P.dataset_name(d) for d in C.scoped("P/EVALUATE", C.eval_settings).datasets]
    check_heldout_disjoint(experts, heldout)
    build_library(seed, experts)
    ev = dict(seed=seed, procedures=["P/EVALUATE"])
    results: dict[str, Any] = {
        "base": P.evaluate("", plain=True, **ev),
        "multitask": P.evaluate("multitask_t5_lora", **ev),
        "merged_experts": P.evaluate("FullParameteravg_t5_lora_outerproduct", **ev),
        "average_activation": P.evaluate(
            "FullCompleteA2_t5_lora_concatenated", analysis_dir=root / "average_activation", **ev
        ),
        "retrieval": P.evaluate(
            P.retrieval_exp("Full"), retrieval=True, analysis_dir=root / "retrieval", **ev
        ),
        "phatgoose": P.evaluate(
            "FullCompleteA2inpgatetrainnogumbel_t5_lora_concatenated", analysis_dir=root / "phatgoose", **ev
        ),
    }
    single, single_val = {}, {}
    for d in experts:
        single[d] = P.evaluate(f"datasets_concatenated/{d}_t5_lora", **ev)
        single_val[d] = P.evaluate(
            f"datasets_concatenated/{d}_t5_lora", seed=seed, procedures=["P/EVALUATE/VALIDATION"]
        )
    # Best individual: per held-out task, the expert best on that task's validation split.
    results["best_single_expert"] = {
        h: single[max(experts, key=lambda d: single_val[d][h]["accuracy"])][h] for h in heldout
    }
    results["single_expert_mean"] = {
        h: {"accuracy": sum(single[d][h]["accuracy"] for d in experts) / len(experts)} for h in heldout
    }
    metrics = {}
    for method in METHODS:
        r = results[method]
        accs = {h: r[h]["accuracy"] for h in heldout}
        metrics[method] = {**accs, "mean_accuracy": sum(accs.values()) / len(accs)}
        if all("exact_match" in r[h] for h in heldout):
            metrics[method]["mean_exact_match"] = sum(r[h]["exact_match"] for h in heldout) / len(heldout)
    run = RunDir(
        root,
        project="phatgoose",
        experiment="heldout_zero_shot",
        scale=P._scale(),
        seed=seed,
        config={"gin": gin.config_str(), "experts": experts, "heldout": heldout},
    )
    run.started = started
    write_json(root / "single_experts.json", {"test": single, "validation": single_val})
    run.write_results(
        metrics,
        details={k: v for k, v in results.items() if k not in ("best_single_expert",)},
        best_single_expert_choice={
            h: max(experts, key=lambda d: single_val[d][h]["accuracy"]) for h in heldout
        },
    )
    return metrics


__all__ = ["METHODS", "TINY_HELDOUT", "build_library", "run_table"]
