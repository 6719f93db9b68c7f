"""How the diagonal Fisher is shared among the experts: why a Fisher merge can drop a whole task.

    python -m leaderboard.fisher_mass --adapter full --seeds 0 1    (after `leaderboard.run --adapter full`)

Fisher merging (`fisher_diag`, `fisher_diag_true`) sets each merged parameter to

    θ_j = Σ_i F_i,j θ_i,j / Σ_i F_i,j,        F_i,j = E_x[(∂ log p_θi(y | x) / ∂θ_j)²]  (diagonal Fisher)

so an expert whose Fisher is small everywhere hands its parameters to the others. The empirical Fisher takes
y from the data and the true Fisher samples it from the expert: an expert that fits its validation examples
with near-certainty has near-zero gradients either way. For each seed and each diagonal kind this writes,
per library expert, its Fisher mass M_i = Σ_j F_i,j, its share M_i / Σ_k M_k, and the share of the merged
parameters where it holds the largest F_i,j (where it "owns" the merged weight), beside its own validation
score and the base's (from the zoo's expert.json). Statistics are the leaderboard's cached ones
(`leaderboard.mats.stats_folder`: each expert's own validation split), computed first if absent.
Writes `<out>/fisher_mass/seed_<s>.json` and `<out>/fisher_mass/table.md`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from common.io import read_json, write_json, write_text
from common.rundir import markdown_table, provenance
from leaderboard.registry import Context

KINDS = ("fisher", "true_fisher")


def fisher_mass(ctx: Context, kind: str) -> dict[str, dict[str, float]]:
    """{task: {"mass": M_i, "share": M_i / Σ M_k, "owned": share of parameter entries where F_i is the
    largest}} for the library experts' diagonal Fisher of `kind` ("fisher" or "true_fisher"), read one
    parameter at a time from the cache files (a full expert's Fisher is 0.5 GB)."""
    from safetensors import safe_open

    from leaderboard.mats import stats_folder

    if kind not in KINDS:
        raise ValueError(f"fisher_mass reads a diagonal Fisher: kind is one of {KINDS}, not {kind!r}")
    tasks = list(ctx.experts)
    mass = torch.zeros(len(tasks), dtype=torch.float64)
    owned = torch.zeros(len(tasks), dtype=torch.float64)
    entries = 0
    with ExitStack() as stack:
        paths = [stats_folder(ctx, t, kind) / "fisher.safetensors" for t in tasks]
        files = [stack.enter_context(safe_open(str(p), "pt")) for p in paths]
        for name in sorted(set.intersection(*(set(f.keys()) for f in files))):
            stacked = torch.stack([f.get_tensor(name).double().flatten() for f in files])
            mass += stacked.sum(dim=1)
            owned += torch.bincount(stacked.argmax(dim=0), minlength=len(tasks)).double()
            entries += stacked.shape[1]
    total = float(mass.sum())
    return {
        t: {
            "mass": float(mass[i]),
            "share": float(mass[i]) / total if total > 0 else float("nan"),
            "owned": float(owned[i]) / entries if entries else float("nan"),
        }
        for i, t in enumerate(tasks)
    }


def expert_scores(ctx: Context) -> dict[str, dict[str, float | None]]:
    """{task: {"validation": the expert's own validation score, "base": the base's}} from each zoo folder."""
    out = {}
    for task, folder in ctx.experts.items():
        meta = read_json(Path(folder) / "expert.json")  # every cached zoo expert has one (zoo.is_cached)
        out[task] = {"validation": meta["validation"].get(task), "base": meta["base_validation"].get(task)}
    return out


def table(results: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per (seed, expert) with each kind's mass, share and owned share (%), and the scores."""
    rows = []
    for r in results:
        for task, scores in r["scores"].items():
            row: dict[str, Any] = {"seed": r["seed"], "expert": task}
            for kind in KINDS:
                m = r["kinds"][kind][task]
                row[f"{kind} mass"] = f"{m['mass']:.3g}"
                row[f"{kind} share %"] = f"{100 * m['share']:.3g}"
                row[f"{kind} owned %"] = f"{100 * m['owned']:.3g}"
            for column, value in (
                ("expert validation", scores["validation"]),
                ("base validation", scores["base"]),
            ):
                row[column] = f"{value:.3f}" if value is not None else "—"
            rows.append(row)
    return markdown_table(rows)


def write_fisher_mass(seeds: Sequence[int], adapter: str, out: Path) -> list[Path]:
    """`<out>/fisher_mass/seed_<s>.json` for each seed (recomputed when the zoo settings or expert weights
    differ from the saved ones) and `<out>/fisher_mass/table.md` over them."""
    from leaderboard.run import ADAPTER_ZOOS, context, models_record, reusable, zoo_fingerprint

    settings, library, _ = ADAPTER_ZOOS[adapter]
    written, results = [], []
    for seed in seeds:
        path = out / "fisher_mass" / f"seed_{seed}.json"
        old = read_json(path) if path.is_file() else None
        if reusable(
            old, settings, zoo_fingerprint(seed, settings, library), f"fisher_mass: seed {seed}: {path}"
        ):
            written.append(path)
            results.append(old)
            continue
        started = time.time()
        ctx = context(seed, settings, library)  # refuses a seed whose zoo is not cached, with the command
        result = {
            "adapter": adapter,
            "seed": seed,
            "kinds": {kind: fisher_mass(ctx, kind) for kind in KINDS},
            "scores": expert_scores(ctx),
            "zoo_settings": settings.key(),
            "models": models_record(ctx.experts, ctx.multitask),
            "provenance": provenance(seed, started),
        }
        write_json(path, result)
        written.append(path)
        results.append(result)
    md = out / "fisher_mass" / "table.md"
    write_text(md, f"# Diagonal Fisher mass per expert ({adapter} zoo)\n\n{table(results)}\n")
    return [*written, md]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m leaderboard.fisher_mass",
        description="How the diagonal Fisher is shared among the zoo's experts (why a Fisher merge drops a task).",
    )
    parser.add_argument("--adapter", choices=("lora", "ia3", "full"), default="full")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--out", type=Path, help="default results/leaderboard/<adapter> (lora: results/leaderboard)"
    )
    args = parser.parse_args(argv)
    out = args.out or (Path("results/leaderboard") / ("" if args.adapter == "lora" else args.adapter))
    for path in write_fisher_mass(args.seeds, args.adapter, out):
        print(path)


if __name__ == "__main__":
    main()
