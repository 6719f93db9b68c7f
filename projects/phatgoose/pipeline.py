"""The tiny reproduction for one seed: every README step, in process, then every method on the held-out tasks.

Methods (§4.2): the base model, Multitask, the best single expert (picked per task on validation),
Merged Experts, Average Activation, Retrieval, PHATGOOSE. Writes <exp_out>/../seed_<s>/results.json.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    "best_single_expert",
    "merged_experts",
    "average_activation",
    "retrieval",
    "phatgoose",
)
METRICS = ("accuracy", "balanced_accuracy")  # rank classification; balanced = mean recall over classes


class Timer:
    """Wall and CPU (this process) seconds per phase, summed over repeated phases (`with timer("experts"): ...`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0, c0 = time.time(), time.process_time()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.time() - t0
            self.cpu_seconds[phase] = self.cpu_seconds.get(phase, 0.0) + time.process_time() - c0


def build_library(seed: int, experts: list[str], timer: Timer | None = None) -> None:
    """Experts, gates, and the four libraries (PHATGOOSE, Average Activation, Merged, Retrieval)."""
    timer = timer or Timer()
    for d in experts:
        with timer("train experts"):
            P.train_single_task_loralinear(f"{d}_t5_lora", d, seed)
            L.put_index_to_lora(
                P.checkpoint(f"{d}_t5_lora"), P.exp_dir(f"datasets_concatenated/{d}_t5_lora") / "checkpoint"
            )
        with timer("train gates"):
            gate_exp = f"datasets_concatenated/{d}_t5_lora_inpgatetrainnogumbel"
            P.train_gate_step(gate_exp, d, f"datasets_concatenated/{d}_t5_lora", seed)
            L.use_input_gate_as_router(P.checkpoint(gate_exp))
    with timer("libraries (concatenate, average activation, merge, retriever)"):
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
    with timer("train multitask"):
        P.train_multitask("multitask_t5_lora", experts, seed)


def run_table(seed: int) -> dict[str, Any]:
    """Build everything for `seed` under main.exp_out/seed_<seed> and evaluate every method."""
    root = Path(C.main_settings()["exp_out"]).parent / f"seed_{seed}"
    gin.bind_parameter("main.exp_out", str(root / "exp_out"))
    started, cpu_started = time.time(), time.process_time()
    experts = P.expert_names("Full")
    heldout = [P.dataset_name(d) for d in C.scoped("P/EVALUATE", C.eval_settings).datasets]
    check_heldout_disjoint(experts, heldout)
    timer = Timer()
    build_library(seed, experts, timer)
    ev = dict(seed=seed, procedures=["P/EVALUATE"])
    with timer("evaluate 6 methods (test)"):
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
                "FullCompleteA2inpgatetrainnogumbel_t5_lora_concatenated",
                analysis_dir=root / "phatgoose",
                **ev,
            ),
        }
    single_val = {}
    for d in experts:
        with timer("evaluate single experts (validation)"):
            single_val[d] = P.evaluate(
                f"datasets_concatenated/{d}_t5_lora", seed=seed, procedures=["P/EVALUATE/VALIDATION"]
            )
    # Best individual: per held-out task and metric, the expert best on that task's validation split
    # by that metric (an oracle-like row: validation shares the test split's class prior); only the
    # picked experts are read on test, each on the tasks it was picked for.
    choice = {
        m: {h: max(experts, key=lambda d, h=h, m=m: single_val[d][h][m]) for h in heldout} for m in METRICS
    }
    picked: dict[str, list[str]] = {}
    for h in heldout:
        for d in dict.fromkeys(choice[m][h] for m in METRICS):
            picked.setdefault(d, []).append(h)
    single = {}
    with timer("evaluate the picked single experts (test)"):
        for d, tasks in picked.items():
            # P/EVALUATE/SINGLE inherits P/EVALUATE (tiny.gin turns generation off there: only rank
            # classification of the single experts is reported)
            single[d] = P.evaluate(
                f"datasets_concatenated/{d}_t5_lora",
                seed=seed,
                procedures=["P/EVALUATE/SINGLE"],
                datasets=[f"D/{h}/EVAL" for h in tasks],
            )
    results["best_single_expert"] = {
        h: {
            **{m: single[choice[m][h]][h][m] for m in METRICS},
            **{k: v for k, v in single[choice["accuracy"][h]][h].items() if k == "exact_match"},
        }
        for h in heldout
    }
    metrics = {}
    for method in METHODS:
        r = results[method]
        accs = {h: r[h]["accuracy"] for h in heldout}
        bal = {f"{h}/balanced": r[h]["balanced_accuracy"] for h in heldout}
        metrics[method] = {
            **accs,
            "mean_accuracy": sum(accs.values()) / len(accs),
            **bal,
            "mean_balanced_accuracy": sum(bal.values()) / len(bal),
        }
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
        seconds_by_phase={k: round(v, 1) for k, v in timer.seconds.items()},
        cpu_seconds_by_phase={k: round(v, 1) for k, v in timer.cpu_seconds.items()},
        cpu_time_s=round(time.process_time() - cpu_started, 1),
        best_single_expert_choice=choice,
    )
    return metrics


__all__ = ["METHODS", "TINY_HELDOUT", "build_library", "run_table"]
