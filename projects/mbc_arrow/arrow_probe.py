"""Why does Arrow route near chance on the zoo? One controlled probe per hypothesis (README "The real arm").

    python -m projects.mbc_arrow.real probe --seed 0 --variant init_task --train

Each variant is a private library of the PROBE_TASKS experts, changed in one respect from the zoo's:
- `base`: the zoo's own experts (`zoo.DEFAULT`), the reference;
- `init_task`: each expert's LoRA A initialised from (seed, task) instead of the seed alone
  (`ZooSettings.init="task"`): do the experts' prototypes coincide because their A does?
- `steps_<N>`: experts trained N steps instead of 100: are the experts too little trained?
- `gks_mean`, `gks_multitask`: the zoo's experts after GenKnowSub (peft's Arrow `use_gks`), subtracting the
  experts' mean or the multitask expert: does a shared general component dominate the prototypes?

Each run writes `<out>/seed_<s>/<variant>.json`: Arrow's top-1 routing of the tasks' validation tokens per
layer depth (`real.routing_report`, private library only) with each task's own-expert share beside chance
1/E, the experts' own validation scores (from their expert.json, before any GenKnowSub), the mean pairwise
|cos| of the experts' flattened A per module and of the prototypes Arrow uses, and provenance; then
`<out>/probes.md` tabulates every variant found. A run whose experts and settings are unchanged is reused.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from common import zoo
from common.adapters import LoraFactors
from common.cli import UserError
from common.io import read_json, write_json, write_text
from common.rundir import markdown_table, provenance
from projects.mbc_arrow import real
from projects.mbc_arrow.arrow import arrow_prototypes

PROBE_TASKS = ("sentiment_airline", "language_id_a", "shakespeare_genre", "champ_category")
VARIANTS = ("base", "init_task", "steps_<N>", "gks_mean", "gks_multitask")
OUT = Path("runs/mbc_arrow/real/probes")
_STEPS = re.compile(r"steps_([1-9][0-9]*)")


def variant_settings(variant: str, settings: zoo.ZooSettings = zoo.DEFAULT) -> tuple[zoo.ZooSettings, str]:
    """(zoo settings, GenKnowSub) of a probe variant, each a change of one thing from `settings`."""
    if variant == "base":
        return settings, "none"
    if variant == "init_task":
        return replace(settings, init="task"), "none"
    if variant in ("gks_mean", "gks_multitask"):
        return settings, variant.removeprefix("gks_")
    steps = _STEPS.fullmatch(variant)
    if steps:
        return replace(settings, steps=int(steps.group(1))), "none"
    raise UserError(f"probe variant {variant!r}: choose one of {list(VARIANTS)} (e.g. steps_300)")


def mean_pairwise_abs_cosine(vectors: Mapping[str, Sequence[torch.Tensor]]) -> float:
    """Module -> one tensor per expert: the mean over modules of the mean |cos| over pairs of experts of
    their flattened tensors (a zero tensor has cosine 0 with every other)."""
    per_module = []
    for module, tensors in vectors.items():
        if len(tensors) < 2:
            raise ValueError(f"{module}: a pairwise cosine needs two experts or more, got {len(tensors)}")
        V = torch.stack([t.double().flatten() for t in tensors])
        V = V / V.norm(dim=1, keepdim=True).clamp(min=torch.finfo(V.dtype).tiny)
        i, j = torch.triu_indices(len(tensors), len(tensors), 1)
        per_module.append(float((V @ V.T).abs()[i, j].mean()))
    return statistics.fmean(per_module)


def a_cosine(factors: Sequence[Mapping[str, LoraFactors]]) -> float:
    """Mean pairwise |cos| of the experts' flattened LoRA A per module, averaged over modules."""
    return mean_pairwise_abs_cosine({m: [f[m].A for f in factors] for m in factors[0]})


def prototype_cosine(factors: Sequence[Mapping[str, LoraFactors]]) -> float:
    """Mean pairwise |cos| of the experts' Arrow prototypes per module (sign-free, as Arrow's |x·p|)."""
    protos = [arrow_prototypes(f) for f in factors]
    return mean_pairwise_abs_cosine({m: [p[m] for p in protos] for m in protos[0]})


def probe_command(seed: int, variant: str, tasks: Sequence[str], out: Path = OUT) -> str:
    """The command that trains and probes one variant (the options that differ from the defaults)."""
    extra = "" if tuple(tasks) == PROBE_TASKS else f" --tasks {' '.join(tasks)}"
    extra += "" if Path(out) == OUT else f" --out {out}"
    return f"python -m projects.mbc_arrow.real probe --seed {seed} --variant {variant}{extra} --train"


def probe_experts(
    seed: int,
    variant: str,
    tasks: Sequence[str],
    settings: zoo.ZooSettings,
    gks: str,
    *,
    train: bool,
    out: Path = OUT,
) -> dict[str, Path]:
    """Task (and `multitask` for gks="multitask") -> expert folder; missing ones are trained with `train`,
    else refused with the command that trains them."""
    needed = [*tasks, *([zoo.MULTITASK] if gks == "multitask" else [])]
    missing = [t for t in needed if not zoo.is_cached(t, seed, settings)]
    if missing and not train:
        raise SystemExit(
            f"the {variant} probe's experts {missing} of seed {seed} are not trained: run "
            f"`{probe_command(seed, variant, tasks, out)}`"
        )
    return {t: zoo.expert(t, seed, settings) for t in needed}


def run_probe(
    seed: int,
    variant: str,
    tasks: Sequence[str] = PROBE_TASKS,
    out: Path = OUT,
    *,
    settings: zoo.ZooSettings = zoo.DEFAULT,
    train: bool = False,
) -> dict[str, Any]:
    """`out/seed_<s>/<variant>.json` (and `out/probes.md`) for one variant of `settings`; see the module doc."""
    started = time.time()
    tasks = list(tasks)
    if len(tasks) < 2:
        raise UserError(f"a routing probe needs two tasks or more, got {tasks}")
    probed, gks = variant_settings(variant, settings)
    experts = probe_experts(seed, variant, tasks, probed, gks, train=train, out=out)
    private = {t: experts[t] for t in tasks}
    general = experts.get(zoo.MULTITASK)
    key = {
        "experts": {t: p.name for t, p in experts.items()},
        "zoo_settings": probed.key(),
        "gks": gks,
        "split": "validation",
    }
    path = out / f"seed_{seed}" / f"{variant}.json"
    if path.is_file() and read_json(path).get("key") == key:
        record = read_json(path)
    else:
        report = real.routing_report(seed, probed, tasks, gks=gks, libraries=("private",))
        rows = report["libraries"]["private"]["tasks"]
        own = {t: statistics.fmean(rows[t]["own_expert"]) for t in tasks}
        infos = {t: read_json(private[t] / "expert.json") for t in tasks}
        validation = {
            t: {"expert": i["validation"][t], "base": i["base_validation"][t], "steps": i["steps"]}
            for t, i in infos.items()
        }
        record = {
            "key": key,
            "variant": variant,
            "seed": seed,
            "tasks": tasks,
            "experts": report["libraries"]["private"]["experts"],
            "routing": rows,  # per task: shares (depth × expert), own_expert (per depth), chance_own_expert
            "own_expert": own,  # per task, mean over depths
            "own_expert_mean": statistics.fmean(own.values()),
            "chance": 1 / len(tasks),
            "validation": validation,  # the experts as trained (before any GenKnowSub)
            "validation_mean": statistics.fmean(v["expert"] for v in validation.values()),
            "a_cosine": a_cosine([real.zoo_factors(private[t]) for t in tasks]),
            "prototype_cosine": prototype_cosine(list(real.arrow_factors(private, gks, general).values())),
            "provenance": provenance(seed, started),
        }
        write_json(path, record)
    write_text(out / "probes.md", summary(out))
    return record


def _order(record: Mapping[str, Any]) -> tuple:
    prefix = "steps_<N>" if _STEPS.fullmatch(record["variant"]) else record["variant"]
    steps = int(record["variant"].removeprefix("steps_")) if prefix == "steps_<N>" else 0
    return record["seed"], VARIANTS.index(prefix) if prefix in VARIANTS else len(VARIANTS), steps


def summary(out: Path) -> str:
    """The table of every `out/seed_*/<variant>.json`: own-expert share, chance, cosines, validation."""
    records = sorted((read_json(p) for p in sorted(out.glob("seed_*/*.json"))), key=_order)
    rows = [
        {
            "seed": r["seed"],
            "variant": r["variant"],
            "own-expert share (%)": f"{100 * r['own_expert_mean']:.1f}",
            "chance (%)": f"{100 * r['chance']:.1f}",
            "A |cos|": f"{r['a_cosine']:.3f}",
            "prototype |cos|": f"{r['prototype_cosine']:.3f}",
            "validation (mean)": f"{r['validation_mean']:.3f}",
            "steps": "/".join(sorted({str(v["steps"]) for v in r["validation"].values()})),
        }
        for r in records
    ]
    return "\n".join(
        [
            "# Arrow routing probes (private library, top-1)\n",
            "Share of each task's validation tokens that Arrow sends to the task's own expert, mean over tasks "
            "and layer depths, beside chance 1/E; mean pairwise |cos| of the experts' LoRA A (per module) and "
            "of the prototypes Arrow routes by (after GenKnowSub for gks_*); the experts' mean own-task "
            "validation score (accuracy or Rouge-L F, before GenKnowSub). `projects/mbc_arrow/arrow_probe.py`.\n",
            markdown_table(rows),
            "",
        ]
    )
