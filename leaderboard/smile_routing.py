"""Where the SMILE model the leaderboard chose (`<out>/seed_<s>/smile.json`) routes each library task's tokens:
per task and decoder layer, the share of its tokens that the routers send to each expert, and the own
expert's share against chance 1/T (`python -m leaderboard.smile_routing --seeds 0 1`, after the leaderboard;
writes `<out>/smile_routing/seed_<s>.json`).

A module of its own, not a `__main__` of `leaderboard.smile`: run as a script, that module's entries would
be registered a second time when the leaderboard imports it.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from leaderboard.registry import Context
from leaderboard.smile import smile_model


def smile_routing(ctx: Context, hparams: dict[str, Any], n: int = 20, split: str = "validation") -> dict:
    """For the SMILE model with `hparams`: per library task, the share of its first `n` `split` prompts'
    tokens that each decoder layer's routers send to each expert (`projects.smile.routing.routing_by_layer`,
    the 7 projections of a layer pooled), the own expert's share per layer, and the chance level 1/T."""
    from common import zoo
    from projects.smile.routing import own_expert_by_layer, routing_by_layer

    model = smile_model(ctx, hparams.get("gate_k", 8), hparams.get("k", 8), hparams.get("top_k", 1))
    texts = {t: [r["source"] for r in zoo.splits(t, ctx.settings)[split][:n]] for t in ctx.experts}
    routing = routing_by_layer(model, ctx.tokenizer, texts, max_length=ctx.settings.max_length)
    experts = list(ctx.experts)
    return {
        "seed": ctx.seed,
        "hparams": hparams,
        "experts": experts,
        "split": split,
        "texts_per_task": n,
        "chance": 1 / len(experts),
        "routing": routing,
        "own_share_by_layer": own_expert_by_layer(routing, experts),
        "zoo_settings": ctx.settings.key(),
    }


def write_routing(
    seeds: Sequence[int], out: Path, n: int = 20, settings: Any = None, library: Sequence[str] | None = None
) -> list[Path]:
    """`<out>/smile_routing/seed_<s>.json` for the hyperparameters the leaderboard chose (`seed_<s>/smile.json`);
    an existing file made with the same zoo settings and hyperparameters is kept. (Not under seed_<s>/, whose
    JSONs are all leaderboard results to `leaderboard.report`.)"""
    from common import zoo
    from common.io import read_json, write_json
    from common.zoo_tasks import LIBRARY
    from leaderboard.run import context

    settings = settings or zoo.DEFAULT
    written = []
    for seed in seeds:
        chosen = out / f"seed_{seed}" / "smile.json"
        if not chosen.is_file():
            raise SystemExit(
                f"{chosen} is missing: run `python -m leaderboard.run --entries smile --seeds {seed}` first"
            )
        hparams = read_json(chosen)["hparams"]
        path = out / "smile_routing" / f"seed_{seed}.json"
        if path.is_file():
            old = read_json(path)
            if old.get("zoo_settings") == settings.key() and old.get("hparams") == hparams:
                written.append(path)
                continue
        ctx = context(seed, settings, library or LIBRARY)
        result = smile_routing(ctx, hparams, n)
        write_json(path, result)
        own = [statistics.fmean(v) for v in result["own_share_by_layer"].values()]
        print(f"smile routing: seed {seed}, own-expert share {100 * statistics.fmean(own):.1f}%", flush=True)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m leaderboard.smile_routing",
        description="Where the chosen SMILE model routes each library task's tokens, per layer.",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=Path("results/leaderboard"))
    parser.add_argument("--texts", type=int, default=20, help="validation prompts per task")
    args = parser.parse_args(argv)
    for path in write_routing(args.seeds, args.out, args.texts):
        print(path)


if __name__ == "__main__":
    main()
