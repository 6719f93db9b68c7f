"""MaTS's merges (Tam et al. 2024) on the zoo, for each parameterisation (`ctx.settings.adapter`): the
LoRA zoo (each expert seen as the full weights θ0 + BA it stands for), (IA)^3 (the vectors) and full
fine-tuning (every parameter). Every merge is `projects.mats.methods.METHODS[...]`; the statistics are the
project's (`projects.mats.metadata`), computed on each task's **validation** split with its own expert
and cached per expert under `$MOERGING_CACHE/mats_stats/<hash>/`.

| entry | merge (paper §2-3) | hyperparameters (chosen on validation) |
|---|---|---|
| `ties` | TIES (MaTS's variant: global top 20%, elected sign, disjoint mean) | λ ∈ TIES_LAMBDAS |
| `fisher_diag`, `fisher_diag_true` | θ = Σ F̃i⊙θi / Σ F̃i, empirical / true diagonal Fisher | — |
| `regmean` | Wᵀ = (Σ G̃i)⁻¹ Σ G̃i Wiᵀ (not for (IA)^3, as the paper) | off-diagonal shrink λ ∈ REGMEAN_LAMBDAS |
| `mats_cg` | MaTS: CG on the paper's objective, K-FAC (LoRA, full) or blockwise Fisher ((IA)^3), from TA | — |
| `mats_cg_from_regmean` | ablation: `mats_cg`'s K-FAC CG started from RegMean's closed form (LoRA, full) | — |
| `cg_regmean` | CG on the RegMean objective from TA (full fine-tuning row of the paper) | — |
| `cg_diagonal_fisher` | CG on the diagonal Fisher objective, x0 = 0 (as the original's README) | — |
| `cg_average` | CG on the identity objective from the average | — |

CG follows the original's commands (spec "CG runs"): 100 iterations (10 for blockwise Fisher),
`model_lambda` 1.0, initialised from the task-arithmetic model whose λ the `task_arithmetic` entry's grid
chose on validation. `uniform` and `task_arithmetic` (the average and TA) are in `baselines.py`.
"""

from __future__ import annotations

import copy
import itertools
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common import zoo
from common.cache import cached_dir
from common.cli import UserError
from common.io import check_finite, load_tensors, read_json, save_tensors, write_json
from leaderboard.registry import Candidate, Context, count, expert_states, register, with_state
from projects.mats import metadata

# One validation pass over the 13 library tasks costs ~12 min on one core (README "The real scale"), so the
# leaderboard searches 4 values of each λ rather than the original's 11 (README "Where we differ").
TIES_LAMBDAS = (0.3, 0.5, 0.7, 1.0)  # TIES's scale of the merged task vector
REGMEAN_LAMBDAS = (0.5, 0.7, 0.9, 1.0)  # RegMean's off-diagonal shrink (1 keeps the Grams as they are)
STATS_VERSION = 1
STAT_KINDS = ("fisher", "true_fisher", "blockwise_fisher", "grams")
# CG runs of the original (spec "CG runs"): iterations per objective; model_lambda is 1.0 in every one
CG_ITERATIONS = {"blockwise_fisher": 10}
CG_DEFAULT_ITERATIONS = 100


class NotApplicable(UserError):
    """A merge the paper does not define for this parameterisation."""


# --- statistics on the validation split ------------------------------------------------------------------


def validation_examples(ctx: Context, task: str) -> list[dict[str, Any]]:
    """The task's validation records in the project's example format (question, choices, label, target)."""
    return [
        {
            "task": r["task"],
            "question": r["source"],
            "choices": list(r["choices"]),
            "label": r["label"],
            "target": r["target"],
        }
        for r in zoo.splits(task, ctx.settings)["validation"]
    ]


def _stats_model(ctx: Context, task: str) -> tuple[nn.Module, dict[str, nn.Parameter], Any]:
    """(expert in fp32, {merged parameter name: parameter}, tokenizer): the model the statistics are taken on,
    its parameters named as `expert_states` names them."""
    fp32 = replace(ctx.settings, dtype="float32")
    path = ctx.experts[task]
    if ctx.settings.adapter == "ia3":
        from peft import PeftModel

        from projects.mats.model import merged_parameters

        base, _ = zoo.load_base(fp32)
        model = PeftModel.from_pretrained(base, str(path))
        params = merged_parameters(model, "ia3")
    else:
        model = zoo.load_expert(path, fp32)
        names = set(expert_states(ctx)[0])
        params = {k: p for k, p in model.named_parameters() if k in names}
    model.requires_grad_(True)  # every parameter: the Grams' output-gradient hooks need grads everywhere
    tokenizer = copy.copy(ctx.tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), params, tokenizer


def _compute(ctx: Context, task: str, kind: str, out: Path) -> None:
    examples = validation_examples(ctx, task)
    model, params, tokenizer = _stats_model(ctx, task)
    max_len = ctx.settings.max_length
    info: dict[str, Any] = {"task": task, "split": "validation", "examples": len(examples)}
    if kind == "grams":
        inputs, outputs = metadata.gram_matrices(model, tokenizer, examples, max_source_len=max_len)
        kept = {linear for linear in inputs if f"{linear}.weight" in params}  # the merged weights' modules
        save_tensors(out / "input_gram.safetensors", {k: v for k, v in inputs.items() if k in kept})
        save_tensors(out / "output_gram.safetensors", {k: v for k, v in outputs.items() if k in kept})
    else:
        true = kind == "true_fisher" and all(ex["choices"] for ex in examples)
        # The true Fisher of a generative task samples a generation in the original; the project has no
        # such sampler (metadata.answers says so), so those tasks take the empirical Fisher, and say so.
        info["true_fisher"] = true
        info["fallback"] = kind == "true_fisher" and not true
        fisher = metadata.fisher(
            model,
            tokenizer,
            examples,
            params,
            kind="blockwise" if kind == "blockwise_fisher" else "diagonal",
            true_fisher=true,
            seed=ctx.seed,
            max_source_len=max_len,
        )
        save_tensors(out / "fisher.safetensors", fisher)
    write_json(out / "stats.json", info)


def stats_folder(ctx: Context, task: str, kind: str) -> Path:
    """The cache folder of one expert's statistics of `kind` (STAT_KINDS), computed now if absent:
    `fisher.safetensors` ({param: F}) or `input_gram.safetensors` / `output_gram.safetensors`
    ({module: G or H}), and `stats.json` (the split, the number of examples, whether a true Fisher fell
    back to the empirical one)."""
    if kind not in STAT_KINDS:
        raise ValueError(f"unknown statistics {kind!r}; choose one of {STAT_KINDS}")
    key = {
        "what": "mats_stats",
        "kind": kind,
        "expert": ctx.experts[task].name,  # the zoo folder's name: the hash of everything behind the weights
        "task": task,
        "adapter": ctx.settings.adapter,
        "settings": ctx.settings.key(),
        "data": zoo.data_digest(zoo.splits(task, ctx.settings)["validation"]),
        "seed": ctx.seed,
        "version": STATS_VERSION,
    }
    return cached_dir("mats_stats", key, lambda out: _compute(ctx, task, kind, out))


# kind -> {the metadata name `projects.mats.merging` reads: its file}
STAT_FILES = {
    "fisher": {"fisher": "fisher.safetensors"},
    "true_fisher": {"fisher": "fisher.safetensors"},
    "blockwise_fisher": {"blockwise_fisher": "fisher.safetensors"},
    "grams": {"input_gram": "input_gram.safetensors", "output_gram": "output_gram.safetensors"},
}


def expert_stats(ctx: Context, task: str, kind: str) -> dict[str, Any]:
    """One expert's statistics, all in memory: {"fisher" | "blockwise_fisher": {param: F}} or
    {"input_gram": {module: G}, "output_gram": {module: H}}, plus "info" (`stats_folder`'s stats.json)."""
    folder = stats_folder(ctx, task, kind)
    out: dict[str, Any] = {part: load_tensors(folder / f) for part, f in STAT_FILES[kind].items()}
    return {**out, "info": read_json(folder / "stats.json")}


def library_stats(ctx: Context, kind: str) -> list[dict[str, Any]]:
    """`expert_stats` of every library expert, in the library's order (not kept in `ctx.cache`: a SmolLM2
    expert's Grams take 1.2 GB and its diagonal Fisher 0.4-0.5 GB; the merges read them layer by layer)."""
    return [expert_stats(ctx, task, kind) for task in ctx.experts]


def _read(path: Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The tensors of `names` that a safetensors file holds (read one by one; NaN/inf refused)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        held = set(f.keys())
        out = {n: f.get_tensor(n) for n in names if n in held}
    check_finite(out, path)
    return out


def layer_groups(names: Sequence[str]) -> list[list[str]]:
    """Parameter names grouped by transformer layer ('...layers.<i>.'); any other name is its own group."""
    groups: dict[str, list[str]] = {}
    for name in names:
        layer = re.search(r"(^|\.)layers\.\d+\.", name)
        groups.setdefault(name[: layer.end()] if layer else name, []).append(name)
    return list(groups.values())


def merge_by_layer(ctx: Context, method: str, kind: str | None, **hparams: Any) -> dict[str, torch.Tensor]:
    """`METHODS[method](base, models, stats=..., **hparams)` run one layer at a time, each layer's statistics
    read from the cache files just then: the same result as one call over every parameter (these merges
    treat each parameter, or each Linear's system, on its own), with the statistics of one layer in memory
    instead of all of them (13 LoRA experts' Grams alone are 16 GB). A merged `initialization` is cut
    to each layer the same way."""
    from projects.mats.merging import linear_module
    from projects.mats.methods import METHODS

    base, models = expert_states(ctx)
    folders = [stats_folder(ctx, task, kind) for task in ctx.experts] if kind else []
    init = hparams.pop("initialization", None)
    out: dict[str, torch.Tensor] = {}
    for group in layer_groups(list(base)):
        names = [*group, *(m for m in map(linear_module, group) if m)]  # parameters and their modules
        stats = [{part: _read(f / file, names) for part, file in STAT_FILES[kind].items()} for f in folders]
        extra = {}
        if init is not None:
            extra["initialization"] = init if isinstance(init, str) else {k: init[k] for k in group}
        sub = [{k: m[k] for k in group} for m in models]
        out.update(METHODS[method]({k: base[k] for k in group}, sub, stats=stats or None, **hparams, **extra))
    return out


def _fallback_tasks(ctx: Context, kind: str) -> list[str]:
    return [t for t in ctx.experts if read_json(stats_folder(ctx, t, kind) / "stats.json").get("fallback")]


# --- the entries ------------------------------------------------------------------------------------------


def _no_ia3(ctx: Context, what: str) -> None:
    if ctx.settings.adapter == "ia3":
        raise NotApplicable(
            f"{what} merges Linear weights with their input Grams; (IA)^3 vectors are not Linear weights, and "
            "the paper has no RegMean row for (IA)^3: leave this entry out with --adapter ia3"
        )


def _candidate(ctx: Context, merged: Mapping[str, torch.Tensor], note: str = "") -> Candidate:
    model = with_state(ctx, merged)
    return Candidate(lambda task: model, count(ctx.base), note)


@register("ties", {"model_lambda": TIES_LAMBDAS})
def ties_entry(ctx: Context, model_lambda: float = 1.0) -> Candidate:
    """TIES (Yadav et al. 2023) as MaTS's code: top 20% of |τ| over all merged parameters, elected sign, mean."""
    from projects.mats.methods import METHODS

    base, models = expert_states(ctx)
    return _candidate(ctx, METHODS["ties"](base, models, model_lambda=model_lambda))


def _fisher(ctx: Context, kind: str) -> Candidate:
    # λ weighs a pair only (F1·λ, F2·(1−λ)); with two experts 0.5 is the plain Fisher-weighted mean
    lam = 0.5 if len(ctx.experts) == 2 else 1.0
    merged = merge_by_layer(ctx, "diagonal_fisher", kind, model_lambda=lam)
    tasks = _fallback_tasks(ctx, kind)
    return _candidate(ctx, merged, f"empirical Fisher for the generative tasks {tasks}" if tasks else "")


@register("fisher_diag")
def fisher_diag_entry(ctx: Context) -> Candidate:
    """Fisher merging (Matena & Raffel 2022) with the empirical diagonal Fisher (gold answers)."""
    return _fisher(ctx, "fisher")


@register("fisher_diag_true")
def fisher_diag_true_entry(ctx: Context) -> Candidate:
    """Fisher merging with the true diagonal Fisher (answers sampled from the expert)."""
    return _fisher(ctx, "true_fisher")


@register("regmean", {"model_lambda": REGMEAN_LAMBDAS})
def regmean_entry(ctx: Context, model_lambda: float = 1.0) -> Candidate:
    """RegMean (Jin et al. 2023) with the Grams' off-diagonals scaled by λ."""
    _no_ia3(ctx, "RegMean")
    return _candidate(ctx, merge_by_layer(ctx, "regmean", "grams", model_lambda=model_lambda))


def validation_chosen_merge(
    ctx: Context, entry: str, merge: Callable[..., dict[str, torch.Tensor]]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(hparams and their validation score, `merge(**hparams)`) for the grid point `entry`'s own search
    chooses on the library's validation splits (ties broken as the entry breaks them); kept in `ctx.cache`."""
    key = f"mats_init_{entry}"
    if key not in ctx.cache:
        from leaderboard.registry import ENTRIES
        from leaderboard.run import choose, mean_score

        fn, grid = ENTRIES[entry]
        search = []
        for combo in itertools.product(*grid.values()):
            hparams = dict(zip(grid, combo))
            print(f"leaderboard: the CG start, {entry} {hparams} on validation", flush=True)
            scores = mean_score(ctx, fn(ctx, **hparams), list(ctx.experts), "validation")
            search.append({"hparams": hparams, "validation": statistics.fmean(scores.values())})
        chosen, _ = choose(ctx, entry, search)
        value = next(s["validation"] for s in search if s["hparams"] == chosen)
        ctx.cache[key] = ({**chosen, "validation": value}, merge(**chosen))
    return ctx.cache[key]


def task_arithmetic_init(ctx: Context) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(λ, θ0 + λ Σ τi) with λ chosen by the `task_arithmetic` entry's grid on the library's validation
    splits (the original initialises CG from the task-arithmetic model chosen on validation)."""
    from projects.mats.methods import METHODS

    return validation_chosen_merge(
        ctx, "task_arithmetic", lambda **hp: METHODS["task_arithmetic"](*expert_states(ctx), **hp)
    )


def regmean_init(ctx: Context) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """RegMean's closed form Wᵀ = (Σ G̃i)⁻¹ Σ G̃i Wiᵀ at the off-diagonal shrink λ its entry's grid chooses
    on validation: the starting point of the `mats_cg_from_regmean` ablation."""
    return validation_chosen_merge(ctx, "regmean", lambda **hp: merge_by_layer(ctx, "regmean", "grams", **hp))


INITIALIZATIONS = {"task_arithmetic": task_arithmetic_init, "regmean": regmean_init}


def _cg(ctx: Context, objective: str, initialization: str) -> Candidate:
    kind = {
        "average": None,
        "diagonal_fisher": "fisher",
        "blockwise_fisher": "blockwise_fisher",
        "regmean": "grams",
        "kfac": "grams",
    }[objective]
    note = f"{objective} objective"
    init: str | dict[str, torch.Tensor] = initialization
    if initialization in INITIALIZATIONS:
        chosen, init = INITIALIZATIONS[initialization](ctx)
        note += f", from {initialization.replace('_', ' ')} λ={chosen['model_lambda']}"
    iterations = CG_ITERATIONS.get(objective, CG_DEFAULT_ITERATIONS)
    log: list[dict[str, Any]] = []
    merged = merge_by_layer(
        ctx,
        "conjugate_gradient",
        kind,
        objective=objective,
        model_lambda=1.0,
        num_iterations=iterations,
        initialization=init,
        log=log,
    )
    converged = sum(r["converged"] for r in log)
    if log:
        note += f", {iterations} iterations, {converged}/{len(log)} blocks converged"
    return _candidate(ctx, merged, note)


@register("mats_cg")
def mats_cg_entry(ctx: Context) -> Candidate:
    """MaTS as the paper runs it: CG from task arithmetic on K-FAC (full weights: full fine-tuning, and the
    LoRA experts' merged weights) or on the blockwise Fisher ((IA)^3)."""
    objective = "blockwise_fisher" if ctx.settings.adapter == "ia3" else "kfac"
    return _cg(ctx, objective, "task_arithmetic")


@register("mats_cg_from_regmean")
def mats_cg_from_regmean_entry(ctx: Context) -> Candidate:
    """An initialisation ablation of MaTS (not a row of the paper): the same K-FAC CG as `mats_cg`, started
    from RegMean's closed form instead of task arithmetic. Where `regmean` beats `mats_cg`, it tells the K-FAC
    objective (CG moves away from RegMean's weights and loses accuracy) from its unconverged solve (CG
    started there keeps or improves them)."""
    _no_ia3(ctx, "CG from RegMean")
    return _cg(ctx, "kfac", "regmean")


@register("cg_regmean")
def cg_regmean_entry(ctx: Context) -> Candidate:
    """CG on the RegMean objective from task arithmetic (the paper's other full fine-tuning CG row)."""
    _no_ia3(ctx, "CG with the RegMean objective")
    return _cg(ctx, "regmean", "task_arithmetic")


@register("cg_diagonal_fisher")
def cg_diagonal_fisher_entry(ctx: Context) -> Candidate:
    """CG on the diagonal Fisher objective, x0 = 0 (the original's README gives no initialisation)."""
    return _cg(ctx, "diagonal_fisher", "zeros")


@register("cg_average")
def cg_average_entry(ctx: Context) -> Candidate:
    """CG on the identity objective (the average) from the average."""
    return _cg(ctx, "average", "average")
