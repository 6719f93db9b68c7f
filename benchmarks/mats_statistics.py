"""MaTS statistics over a validation split on SmolLM2-135M shapes: the batched paths against the per-example loop.
(Not `statistics.py`: that name would shadow the standard library module `_timing` imports.)

Cases (issue 21 row 2, target ≥ 2x): the empirical diagonal Fisher of `projects.mats.metadata.fisher` with
per-example gradients batched by vmap (`batch_size` 8) against the plain loop with one backward per
example (`batch_size=1`), and the RegMean / K-FAC Grams of `gram_matrices` (input G and output-gradient H of
every Linear) in padded batches of 8 against batches of one. The examples are `general_text` passages cut
into a question (the first 240 characters) and a one-choice answer (the next 60), so lengths are real and
padding is present. The model is SmolLM2-135M-Instruct (`common.tiny_world.real_base`), or with `--quick`
the same config cut to 2 layers with random weights; the Fisher is taken over the parameters of the last
2 decoder layers (the gradients still flow through the whole model). One thread, fp32; the cases take turns.

Usage: python benchmarks/mats_statistics.py [--quick] [--examples 16] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import environment, print_table, ratios, time_cases

from common.io import write_json
from projects.mats.metadata import fisher, gram_matrices

RESULTS = Path(__file__).parent / "results" / "mats_statistics.json"


def _model_tokenizer(quick: bool):
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from common.models import load_model
    from common.tiny_world import real_base

    path = real_base("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if quick:
        config = AutoConfig.from_pretrained(path)
        config.num_hidden_layers = 2
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    else:
        model = load_model(path)
    return model.eval(), tokenizer


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 random layers of SmolLM2-135M")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from common.tiny_world import general_text

    torch.set_num_threads(args.threads)
    model, tok = _model_tokenizer(args.quick)
    texts = [t for t in general_text(400_000) if len(t) >= 300][: args.examples]
    examples = [{"question": t[:240], "choices": [t[240:300]], "label": 0} for t in texts]
    layers = model.config.num_hidden_layers
    last = tuple(f"model.layers.{i}." for i in (layers - 2, layers - 1))
    params = {k: p for k, p in model.named_parameters() if k.startswith(last)}
    kw = {"max_source_len": 512}
    bs = args.batch_size
    cases = {
        "fisher, per-example loop": lambda: fisher(model, tok, examples, params, batch_size=1, **kw),
        f"fisher, vmap batch {bs}": lambda: fisher(model, tok, examples, params, batch_size=bs, **kw),
        "grams, per-example loop": lambda: gram_matrices(model, tok, examples, batch_size=1, **kw),
        f"grams, batch {bs}": lambda: gram_matrices(model, tok, examples, batch_size=bs, **kw),
    }
    # Same numbers first (the tests check this on micro models; here at the benchmark's shapes).
    loop, batched = cases["fisher, per-example loop"](), cases[f"fisher, vmap batch {bs}"]()
    fisher_err = max(float((batched[k] - loop[k]).abs().max() / loop[k].abs().max()) for k in loop)
    (g1, h1), (g8, h8) = cases["grams, per-example loop"](), cases[f"grams, batch {bs}"]()
    gram_err = max(
        float((b[k] - a[k]).abs().max() / a[k].abs().max()) for a, b in ((g1, g8), (h1, h8)) for k in a
    )
    times = time_cases(cases, args.repeats, warmup=0)
    speedup = {
        "fisher": times["fisher, per-example loop"]["median_ms"]
        / times[f"fisher, vmap batch {bs}"]["median_ms"],
        "grams": times["grams, per-example loop"]["median_ms"] / times[f"grams, batch {bs}"]["median_ms"],
    }
    shapes = {
        "model": "SmolLM2-135M config, 2 random layers" if args.quick else "SmolLM2-135M-Instruct",
        "examples": len(examples),
        "batch_size": bs,
        "fisher_params": sum(p.numel() for p in params.values()),
        "tokens": [len(tok(e["question"] + " " + e["choices"][0])["input_ids"]) for e in examples],
    }
    print_table(f"{shapes}, {args.threads} thread(s)", times, "fisher, per-example loop")
    print(f"speed-up of the batched path: {speedup}")
    print(f"max relative difference to the loop: Fisher {fisher_err:.2e}, Grams {gram_err:.2e}")
    result = {
        "environment": environment(),
        "shapes": shapes,
        "repeats": args.repeats,
        "times": times,
        "ratio_vs_fisher_loop": ratios(times, "fisher, per-example loop"),
        "speedup_vs_loop": speedup,
        "max_relative_difference": {"fisher": fisher_err, "grams": gram_err},
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
