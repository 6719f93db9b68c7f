"""The real arm of PHATGOOSE, on the expert zoo (SmolLM2-135M LoRA experts, `common/zoo.py`).

    python -m projects.phatgoose.real gates --seeds 0 1      # every zoo expert's gates, cached, resumable
    python -m projects.phatgoose.real gates --seeds 0 1 --ship   # copy them into zoo/ (to commit)
    python -m projects.phatgoose.real probe --seeds 0 1      # routing probe -> runs/phatgoose/real/seed_<s>/

The methods themselves are leaderboard entries (`leaderboard/phatgoose.py`: phatgoose, retrieval,
average_activation, merged_experts), scored by `python -m leaderboard.run`; `analyze --real` turns the
leaderboard's results and the probe into the table, results.json and the routing heat map.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import zoo
from common.cli import UserError, run_main
from common.io import write_json
from common.zoo_tasks import HELD_OUT, LIBRARY
from projects.phatgoose import zoo_gates, zoo_routing

OUT = Path("runs/phatgoose/real")


def probe(
    seed: int,
    settings: zoo.ZooSettings = zoo.DEFAULT,
    gate: zoo_gates.GateSettings = zoo_gates.DEFAULT,
    *,
    top_k: int = 2,
    library: Sequence[str] = LIBRARY,
    tasks: Sequence[str] = HELD_OUT,
    split: str = "validation",
) -> dict[str, Any]:
    """Per held-out task: the share of its tokens' top-k picks reaching each expert, per layer, under
    PHATGOOSE routing with `seed`'s gates, and the share reaching the experts that hold its skill."""
    missing = [t for t in library if not zoo.is_cached(t, seed, settings)]
    if missing:
        raise SystemExit(f"the zoo lacks seed {seed}'s experts for {missing}: run `make zoo` first")
    base, tok = zoo.load_base(settings)
    paths = {t: zoo.expert(t, seed, settings) for t in library}
    gates = zoo_gates.zoo_gates(list(library), seed, settings, gate)
    model = zoo_routing.routed_model(base, zoo_routing.zoo_experts(paths, gates), top_k)
    out: dict[str, Any] = {"seed": seed, "top_k": top_k, "split": split, "tasks": {}}
    for task in tasks:
        shares = zoo_routing.routing_shares(
            model, tok, zoo.splits(task, settings)[split], list(library), max_length=settings.max_length
        )
        skills = [library.index(e) for e in zoo_routing.SKILLS.get(task, ()) if e in library]
        shares["skills"] = [library[i] for i in skills]
        shares["skill_share"] = [sum(row[i] for i in skills) for row in shares["share"]]
        shares["skill_share_uniform"] = len(skills) / len(library)
        out["tasks"][task] = shares
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m projects.phatgoose.real", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gates", help="train every zoo expert's gates where missing (cached, resumable)")
    p = sub.add_parser(
        "probe", help="routing probe: share of each held-out task's tokens per expert and layer"
    )
    for s in (g, p):
        s.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
        s.add_argument("--tasks", nargs="+", default=list(LIBRARY), help="library experts (default: all)")
        s.add_argument("--steps", type=int, default=zoo_gates.DEFAULT.steps, help="gate training steps")
        s.add_argument("--lr", type=float, default=zoo_gates.DEFAULT.lr, help="gate learning rate")
    g.add_argument("--ship", action="store_true", help="copy the cached gates into the shipped zoo (zoo/)")
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--split", default="validation", choices=["validation", "test"])
    p.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    unknown = [t for t in args.tasks if t not in LIBRARY]
    if unknown:
        raise UserError(f"--tasks {unknown} are not library tasks of the zoo; choose from {list(LIBRARY)}")
    gate = zoo_gates.GateSettings(
        steps=args.steps, lr=args.lr, warmup_steps=min(zoo_gates.DEFAULT.warmup_steps, args.steps - 1)
    )
    if args.command == "gates" and args.ship:
        written = zoo_gates.ship(args.seeds, args.tasks, gate=gate)
        print("\n".join(f"shipped {p}" for p in written) or "phatgoose: no new gates to ship")
        return
    if args.command == "gates":
        zoo_gates.train_missing(args.seeds, args.tasks, gate=gate)
        return
    for seed in args.seeds:
        result = probe(seed, gate=gate, top_k=args.top_k, library=args.tasks, split=args.split)
        write_json(args.out / f"seed_{seed}" / "routing_probe.json", result)
        for task, r in result["tasks"].items():
            by_layer = " ".join(f"{100 * s:.0f}" for s in r["skill_share"])
            print(f"seed {seed} {task}: % of picks to {r['skills']} per layer: {by_layer}", flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
