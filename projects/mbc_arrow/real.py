"""The notebook's real arm on the expert zoo (SmolLM2-135M LoRA experts, `common/zoo.py`).

    python -m projects.mbc_arrow.real clusters --seeds 0 1 [--dry-run]   # MBC clusters + one expert each
    python -m projects.mbc_arrow.real probe --seed 0 --variant init_task [--train]   # a routing probe

The private library is the zoo's experts; the MBC library holds one expert per MBC cluster of them
(`zoo.group_expert`: the cluster's tasks drawn uniformly, the private experts' steps per member; a
one-task cluster keeps its private expert). Arrow routes each token in each adapted linear among either
library (`arrow_model`). The methods are leaderboard entries (`leaderboard/mbc_arrow.py`) scored by
`python -m leaderboard.run`; `analyze --real` writes the table, results.json and the routing heat maps.
`probe` measures Arrow's routing on a few tasks' experts changed in one respect (`arrow_probe`).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common import zoo
from common.adapters import LoraFactors, load_adapter, lora_factors_from_state
from common.cache import cached_dir
from common.cli import UserError, run_main
from common.io import read_json, write_json
from common.zoo_tasks import LIBRARY
from projects.mbc_arrow.clustering import delta_cosine, expert_vector, kmeans_on_similarity, mbc_cluster
from projects.mbc_arrow.expert_model import MultiExpertModel

# The notebook's MBC settings (s = 0.2; mttl's SVD width and seed). k: the notebook clusters its 8 experts
# into 2, four per cluster; the zoo's 13 experts at four per cluster give k = ceil(13 / 4) = 4.
# similarity: "factors" clusters the flattened LoRA A and B (mttl); "delta" the cosine of the ΔW (ours,
# blind to the A initialisation, which the zoo's experts do not all share: README "The real arm").
MBC = {"sparsity_threshold": 0.2, "n_components": 64, "seed": 42, "similarity": "delta"}
SIMILARITIES = ("factors", "delta")
EXPERTS_PER_CLUSTER = 4
GKS = ("none", "mean", "multitask")  # GenKnowSub's general expert: none, the experts' mean, the multitask
LIBRARIES = ("private", "mbc")  # the libraries `routing_report` routes among
_PEFT_PREFIX = "base_model.model."


def mbc_k(n_experts: int) -> int:
    """Number of MBC clusters for a library of `n_experts` (the notebook's four experts per cluster)."""
    return max(1, math.ceil(n_experts / EXPERTS_PER_CLUSTER))


def zoo_factors(path: str | Path) -> dict[str, LoraFactors]:
    """Module (the base model's name, no PEFT prefix) -> fp32 LoraFactors of a zoo adapter folder."""
    saved = load_adapter(path)
    raw = lora_factors_from_state(saved.state, saved.config)
    return {
        m.removeprefix(_PEFT_PREFIX): LoraFactors(f.A.float(), f.B.float(), f.scaling) for m, f in raw.items()
    }


def genknowsub(
    experts: Sequence[Mapping[str, LoraFactors]], general: Sequence[Mapping[str, LoraFactors]]
) -> list[dict[str, LoraFactors]]:
    """GenKnowSub ("General Knowledge Subtraction", as peft's Arrow `use_gks`): A_i - mean_g A_g and
    B_i - mean_g B_g per module, the factors (not ΔW) of the general experts averaged; the subtracted
    factors give both the prototypes and the experts' updates."""
    out = []
    for f in experts:
        sub = {}
        for m, fm in f.items():
            mean_a = torch.stack([g[m].A for g in general]).mean(0)
            mean_b = torch.stack([g[m].B for g in general]).mean(0)
            sub[m] = LoraFactors(fm.A - mean_a, fm.B - mean_b, fm.scaling)
        out.append(sub)
    return out


def arrow_factors(
    experts: Mapping[str, str | Path], gks: str = "none", general: str | Path | None = None
) -> dict[str, dict[str, LoraFactors]]:
    """Expert -> module -> the factors Arrow uses: the adapters' own (gks="none"), or after GenKnowSub of
    the experts' mean factors (gks="mean") or of the `general` expert's (gks="multitask")."""
    if gks not in GKS:
        raise UserError(f"gks={gks!r}: choose one of {list(GKS)}")
    names = list(experts)
    factors = [zoo_factors(experts[n]) for n in names]
    if gks == "mean":
        factors = genknowsub(factors, factors)
    elif gks == "multitask":
        if general is None:
            raise SystemExit("GenKnowSub with the multitask expert: the zoo has none (run `make zoo`)")
        factors = genknowsub(factors, [zoo_factors(general)])
    return dict(zip(names, factors))


def arrow_model(
    base: nn.Module,
    tokenizer: Any,
    experts: Mapping[str, str | Path],
    tasks: Mapping[str, Sequence[str]],
    *,
    top_k: int,
    gks: str = "none",
    general: str | Path | None = None,
    base_model: str = zoo.DEFAULT.base,
) -> MultiExpertModel:
    """A copy of `base` routing each token, in each adapted linear, among `experts` (name -> adapter folder)
    by Arrow (|x·p_e|, top_k, softmax over the kept; mttl's parameter mixing). `tasks`: each expert's tasks.
    gks="mean" subtracts the experts' mean factors first, gks="multitask" the `general` expert's."""
    model = MultiExpertModel.from_factors(
        (copy.deepcopy(base), tokenizer),
        arrow_factors(experts, gks, general),
        tasks,
        {"name": "arrow", "top_k": top_k},
        base_model=base_model,
    )
    model.model.eval()
    return model


# --- MBC -------------------------------------------------------------------------------------------


def zoo_clusters(
    experts: Mapping[str, str | Path], k: int | None = None, similarity: str | None = None
) -> dict[str, list[str]]:
    """MBC clusters {"cluster_i": [tasks]} of zoo experts (task -> adapter folder), cached per experts and
    config: their flattened LoRA A and B, sparsified, SVD-embedded, k-means on cosine rows (`clustering`);
    similarity="delta": k-means on the rows of the ΔW cosine matrix instead."""
    names = list(experts)
    cfg = {**MBC, "k": k or mbc_k(len(names)), "similarity": similarity or MBC["similarity"]}
    if cfg["similarity"] not in SIMILARITIES:
        raise UserError(f"MBC similarity {cfg['similarity']!r}: choose one of {list(SIMILARITIES)}")
    key = {"what": "mbc_clusters", "experts": {t: Path(p).name for t, p in experts.items()}, "config": cfg}

    def build(out: Path) -> None:
        if cfg["similarity"] == "delta":
            C = delta_cosine([zoo_factors(experts[n]) for n in names])
            clusters = kmeans_on_similarity(names, C, cfg["k"], cfg["seed"])
        else:
            vectors = [expert_vector(load_adapter(experts[n]).state) for n in names]
            if len({v.numel() for v in vectors}) > 1:
                raise UserError(
                    "MBC needs experts with the same modules and rank (their LoRA vectors differ)"
                )
            knobs = {c: v for c, v in cfg.items() if c != "similarity"}
            clusters = mbc_cluster(names, torch.stack(vectors), knobs)
        write_json(out / "clusters.json", {"clusters": {c: ts for c, ts in clusters.items() if ts}})

    return read_json(cached_dir("mbc_clusters", key, build) / "clusters.json")["clusters"]


def cluster_expert_name(members: Sequence[str]) -> str:
    """The zoo name of a cluster's expert: a one-task cluster keeps its private expert."""
    return members[0] if len(members) == 1 else zoo.group_name(members)


def cluster_experts(
    clusters: Mapping[str, Sequence[str]], seed: int, settings: zoo.ZooSettings, *, train: bool = False
) -> dict[str, Path]:
    """Cluster -> its expert's folder; missing ones are trained with `train`, else refused with the command."""
    names = {c: cluster_expert_name(ms) for c, ms in clusters.items()}
    missing = [n for n in names.values() if not zoo.is_cached(n, seed, settings)]
    if missing and not train:
        raise SystemExit(
            f"the MBC cluster experts {missing} of seed {seed} are not trained: run "
            f"`python -m projects.mbc_arrow.real clusters --seeds {seed}` first"
        )
    return {c: zoo.expert(n, seed, settings) for c, n in names.items()}


def library_experts(seed: int, settings: zoo.ZooSettings, tasks: Sequence[str]) -> dict[str, Path]:
    missing = [t for t in tasks if not zoo.is_cached(t, seed, settings)]
    if missing:
        raise SystemExit(f"the zoo lacks seed {seed}'s experts for {missing}: run `make zoo` first")
    return {t: zoo.expert(t, seed, settings) for t in tasks}


def train_clusters(
    seeds: Sequence[int],
    settings: zoo.ZooSettings = zoo.DEFAULT,
    tasks: Sequence[str] = LIBRARY,
    *,
    k: int | None = None,
    similarity: str | None = None,
    dry_run: bool = False,
) -> dict[int, dict[str, Any]]:
    """Per seed: the clusters of its zoo experts and their experts (trained where missing, unless dry_run)."""
    out = {}
    for seed in seeds:
        clusters = zoo_clusters(library_experts(seed, settings, tasks), k, similarity)
        plan = {c: cluster_expert_name(ms) for c, ms in clusters.items()}
        for c, name in plan.items():
            state = "cached" if zoo.is_cached(name, seed, settings) else "missing"
            steps = zoo.steps_of(name, settings)
            print(f"seed {seed} {c}: {clusters[c]} -> {name} ({steps} steps, {state})", flush=True)
        out[seed] = {"clusters": clusters, "experts": plan}
        if not dry_run:
            cluster_experts(clusters, seed, settings, train=True)
    return out


def routing_report(
    seed: int,
    settings: zoo.ZooSettings = zoo.DEFAULT,
    tasks: Sequence[str] = LIBRARY,
    *,
    split: str = "validation",
    gks: str = "none",
    libraries: Sequence[str] = LIBRARIES,
) -> dict[str, Any]:
    """Arrow's top-1 routing of each library task's `split` tokens, per layer depth: for the private library
    the share reaching the task's own expert and its own MBC cluster's experts, for the MBC library the share
    reaching its cluster's expert; beside chance (1/E, cluster size/E). Shares per depth sum to 1 over experts.
    `libraries`: which of LIBRARIES to route; without "mbc" there are no clusters (clusters None, and the
    private rows hold the own expert only)."""
    from projects.mbc_arrow.routing_analysis import layer_routing, layer_shares, own_share

    unknown = [lib for lib in libraries if lib not in LIBRARIES]
    if unknown or not libraries:
        raise UserError(f"routing_report: libraries {list(libraries)}: choose among {list(LIBRARIES)}")
    base, tok = zoo.load_base(settings)
    private = library_experts(seed, settings, tasks)
    clusters = zoo_clusters(private) if "mbc" in libraries else None
    cluster_of = {t: c for c, ms in (clusters or {}).items() for t in ms}
    examples = [r for t in tasks for r in zoo.splits(t, settings)[split]]
    general = (
        zoo.multitask(seed, settings)
        if gks == "multitask" and zoo.is_cached(zoo.MULTITASK, seed, settings)
        else None
    )
    report: dict[str, Any] = {"seed": seed, "split": split, "gks": gks, "clusters": clusters, "libraries": {}}
    chosen = {}
    if "private" in libraries:
        chosen["private"] = (private, {t: [t] for t in private})
    if clusters is not None:
        chosen["mbc"] = (cluster_experts(clusters, seed, settings), clusters)
    for lib, (experts, members) in chosen.items():
        model = arrow_model(
            base, tok, experts, members, top_k=1, gks=gks, general=general, base_model=settings.base
        )
        counts = layer_routing(model, examples, settings.max_length)
        names = list(experts)
        per_task = {}
        for t in tasks:
            shares = layer_shares(counts[t])
            if lib == "private":  # the task's own expert, and the experts of its cluster
                row = {"own_expert": own_share(shares, [names.index(t)]), "chance_own_expert": 1 / len(names)}
                own = [i for i, n in enumerate(names) if cluster_of[n] == cluster_of[t]] if clusters else []
            else:  # the cluster's expert
                row, own = {}, [names.index(cluster_of[t])]
            if own:
                row |= {"own_cluster": own_share(shares, own), "chance_own_cluster": len(own) / len(names)}
            per_task[t] = {"shares": shares.tolist(), **row}
        report["libraries"][lib] = {"experts": names, "tasks": per_task}
        del model
    return report


def main(argv: list[str] | None = None) -> None:
    from projects.mbc_arrow import arrow_probe

    parser = argparse.ArgumentParser(
        prog="python -m projects.mbc_arrow.real", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "clusters", help="MBC clusters of each seed's zoo experts; train the missing cluster experts"
    )
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    c.add_argument("--tasks", nargs="+", default=list(LIBRARY), help="library experts (default: all)")
    c.add_argument(
        "--dry-run", action="store_true", help="print the clusters and what is missing; train nothing"
    )
    c.add_argument(
        "--similarity",
        choices=SIMILARITIES,
        default=None,
        help="with --dry-run: preview another MBC similarity (the entries use MBC['similarity'] in real.py)",
    )
    p = sub.add_parser(
        "probe",
        help="Arrow's top-1 routing over a few tasks' private experts changed in one respect (arrow_probe)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--variant",
        required=True,
        help=f"one of {', '.join(arrow_probe.VARIANTS)} (projects/mbc_arrow/arrow_probe.py)",
    )
    p.add_argument("--tasks", nargs="+", default=list(arrow_probe.PROBE_TASKS), help="library tasks")
    p.add_argument(
        "--out", type=Path, default=arrow_probe.OUT, help="writes seed_<s>/<variant>.json, probes.md"
    )
    p.add_argument("--train", action="store_true", help="train the variant's missing experts (else refused)")
    args = parser.parse_args(argv)
    unknown = [t for t in args.tasks if t not in LIBRARY]
    if unknown:
        raise UserError(f"--tasks {unknown} are not library tasks of the zoo; choose from {list(LIBRARY)}")
    if args.command == "probe":
        record = arrow_probe.run_probe(args.seed, args.variant, args.tasks, args.out, train=args.train)
        share, chance = (f"{100 * record[k]:.1f}%" for k in ("own_expert_mean", "chance"))
        print(
            f"{args.variant} (seed {args.seed}): own expert {share} (chance {chance}); {args.out}/probes.md"
        )
        return
    if args.similarity not in (None, MBC["similarity"]) and not args.dry_run:
        raise UserError(
            f"--similarity {args.similarity} without --dry-run would train cluster experts the leaderboard "
            f"entries do not use (they cluster by MBC['similarity'] = {MBC['similarity']!r} in "
            "projects/mbc_arrow/real.py: change it there to switch)"
        )
    train_clusters(args.seeds, zoo.DEFAULT, args.tasks, similarity=args.similarity, dry_run=args.dry_run)


if __name__ == "__main__":
    sys.exit(run_main(main))
