"""Why do PHATGOOSE's gates not route the tiny union task? Token routing against an example-level vote.

On LANGUAGE_ID_UNION each input needs the language-ID expert of its language set (A or B). For a
library's router keys (PHATGOOSE gates or Average Activation keys) this measures, on the VALIDATION
split (the test split is left to the table):
- token level: the share of the encoder's (module, real token) top-1 picks that go to the input's own
  language-set expert, to the other one, to language-ID C, and to the five non-language experts;
- accuracy with the library's token routing, as the table's rows;
- example level: one vote per input, the expert with the highest routing probability averaged over the
  encoder's modules and real tokens (the same scores, pooled before the argmax); the share of inputs
  voted to their own expert, and the accuracy when each input is then sent, whole, to its voted expert
  (as Retrieval sends it to its retrieved one); and, as a ceiling, when sent to its own-set expert.
If the example-level vote finds the right expert where token routing does not, routing per token
dilutes a signal the gates hold; if neither does, the gates do not hold it.

    python -m projects.phatgoose.routing_probe runs/phatgoose/tiny  -> <dir>/routing_probe.json, .md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from common.cli import run_main
from common.evaluation import eval_mode
from common.io import write_json, write_text
from common.rundir import markdown_table
from projects.phatgoose import library as L
from projects.phatgoose.evaluate import evaluate_rows
from projects.phatgoose.experts import CHECKPOINT, load_base
from projects.phatgoose.moe import attach_experts, captured_inputs, moe_modules, routing_scores
from projects.phatgoose.tasks import LANGUAGES_A, load_task, subsample

LIBRARIES = {
    "phatgoose": "FullCompleteA2inpgatetrainnogumbel_t5_lora_concatenated",
    "average_activation": "FullCompleteA2_t5_lora_concatenated",
}
TASK = "LANGUAGE_ID_UNION"


def own_expert(language: str) -> str:
    return "LANGUAGE_ID_A" if language in LANGUAGES_A else "LANGUAGE_ID_B"


@torch.no_grad()
def encoder_route_probs(
    model: Any, tokenizer: Any, sources: list[str], batch_size: int = 32
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(N, E) routing probabilities averaged over encoder modules and real tokens, and per input the
    (modules x tokens) top-1 expert of every encoder module and real token."""
    modules = {n: m for n, m in moe_modules(model).items() if n.startswith("encoder.")}
    pooled, top1 = [], []
    with eval_mode(model):
        for start in range(0, len(sources), batch_size):
            enc = tokenizer(
                sources[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
            with captured_inputs(modules) as inputs:
                model.get_encoder()(**enc)
            mask = enc["attention_mask"].bool()  # (B, T)
            # (M, B, T, E): each encoder module's routing probabilities per token
            p = torch.stack([routing_scores(inputs[n][0], m.keys).softmax(-1) for n, m in modules.items()])
            w = mask[None, :, :, None].float()
            pooled.append((p * w).sum((0, 2)) / (w.sum((0, 2)) * p.shape[0]))  # mean: modules, real tokens
            picks = p.argmax(-1)  # (M, B, T)
            top1 += [picks[:, b, mask[b]] for b in range(mask.shape[0])]
    return torch.cat(pooled), top1


def probe(exp_out: Path, base: str, library: str, n: int | None = None) -> dict[str, Any]:
    model, tok = load_base(base)
    experts = L.read_library(exp_out / library / CHECKPOINT)
    names = [e.name for e in experts]
    missing = sorted({"LANGUAGE_ID_A", "LANGUAGE_ID_B", "LANGUAGE_ID_C"} - set(names))
    if missing:
        raise ValueError(
            f"the routing probe needs the tiny library's language-ID experts; {library} lacks {missing}"
        )
    attach_experts(model, experts)
    rows = list(subsample(load_task(TASK)["validation"], n))
    pooled, top1 = encoder_route_probs(model, tok, [r["source"] for r in rows])
    groups = {"own set": 0.0, "other set": 0.0, "LANGUAGE_ID_C": 0.0, "non-language experts": 0.0}
    for r, picks in zip(rows, top1):
        mine = own_expert(r["target"])
        own = names.index(mine)
        other = names.index("LANGUAGE_ID_B" if mine == "LANGUAGE_ID_A" else "LANGUAGE_ID_A")
        c = names.index("LANGUAGE_ID_C")
        total = picks.numel()
        groups["own set"] += (picks == own).sum().item() / total
        groups["other set"] += (picks == other).sum().item() / total
        groups["LANGUAGE_ID_C"] += (picks == c).sum().item() / total
        groups["non-language experts"] += (
            1 - ((picks == own) | (picks == other) | (picks == c)).sum().item() / total
        )
    token = {k: v / len(rows) for k, v in groups.items()}
    votes = pooled.argmax(-1).tolist()
    own_vote = sum(names[v] == own_expert(r["target"]) for v, r in zip(votes, rows)) / len(rows)
    res = evaluate_rows(model, tok, rows, experts_of_rows=votes, generation=False)
    token_res = evaluate_rows(model, tok, rows, generation=False)
    oracle = [names.index(own_expert(r["target"])) for r in rows]
    oracle_res = evaluate_rows(model, tok, rows, experts_of_rows=oracle, generation=False)
    return {
        "n": len(rows),
        "token_top1_share": token,
        "example_vote_own_set": own_vote,
        "example_vote_share": {nm: votes.count(i) / len(rows) for i, nm in enumerate(names)},
        "example_vote_accuracy": res["accuracy"],
        "token_routing_accuracy": token_res["accuracy"],
        "own_expert_accuracy": oracle_res["accuracy"],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="the table's folder (seed_*/exp_out inside)")
    ap.add_argument("--base", default="tiny:t5")
    ap.add_argument("--num_examples", type=int, default=None)
    args = ap.parse_args(argv)
    root = Path(args.root)
    out: dict[str, Any] = {}
    for seed_dir in sorted(root.glob("seed_*")):
        for method, library in LIBRARIES.items():
            if (seed_dir / "exp_out" / library / CHECKPOINT).is_dir():
                out.setdefault(method, {})[seed_dir.name] = probe(
                    seed_dir / "exp_out", args.base, library, args.num_examples
                )
    if not out:
        raise FileNotFoundError(f"no PHATGOOSE or Average Activation library under {root}/seed_*/exp_out")
    write_json(root / "routing_probe.json", out)
    rows = []
    for method, by_seed in out.items():
        for seed, r in by_seed.items():
            t = r["token_top1_share"]
            rows.append(
                {
                    "keys": method,
                    "seed": seed,
                    "token top-1: own set / other set / C / non-language (%)": " / ".join(
                        f"{100 * t[k]:.1f}" for k in t
                    ),
                    "example vote to own set (%)": f"{100 * r['example_vote_own_set']:.1f}",
                    "accuracy: token routing (%)": f"{100 * r['token_routing_accuracy']:.1f}",
                    "accuracy: example sent to its vote (%)": f"{100 * r['example_vote_accuracy']:.1f}",
                    "accuracy: example sent to its own-set expert (%)": f"{100 * r['own_expert_accuracy']:.1f}",
                }
            )
    write_text(root / "routing_probe.md", markdown_table(rows) + "\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    sys.exit(run_main(main))
