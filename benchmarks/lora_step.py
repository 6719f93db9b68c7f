"""The zoo's LoRA training step on SmolLM2-135M: `common.training.train` against `transformers.Trainer` + peft.

Issue 21, row 1. Four runs of `--steps` optimizer steps on the same batches in the same order (a zoo task's
training records, encoded as the zoo encodes them, not shuffled), from the same LoRA initialisation:
- ours, as `common.zoo` trains an expert: `prepare_for_training` (base and LoRA in the run's dtype, eager
  attention), `target_only_loss` (the head only where a target token is predicted), batches padded to
  their longest row (`collate`), `common.training.train` (AdamW, linear warmup and decay, clip 1.0);
- the peer, what a user would write: `AutoModelForCausalLM.from_pretrained` (fp32, its default SDPA
  attention), `peft.get_peft_model` with the same LoraConfig, `DataCollatorForSeq2Seq` and
  `transformers.Trainer` with its CPU defaults and the same learning rate, schedule and clipping;
  `train_sampling_strategy="sequential"` only so that both see the same batches;
each in fp32 and in bf16 (ours: base and LoRA in bf16, the zoo's setting; the peer: `bf16=True`, autocast
over fp32 weights). Time per step is the median over steps 3.. of the gaps between step ends (step 1-2 pay
the first-call costs); tokens/s counts the non-padding tokens of those steps, the same for all four runs.
The runs go one after the other (a Trainer cannot be paused), so load that changes during the run falls
unevenly on them ("whole run" ratios); the speed ratio to read is the interleaved one: one step of each
setup outside the trainers (`interleaved_steps`), the cases taking turns. Writes results/lora_step.json
and a PNG of the four loss curves (the same data in the JSON); `--timing-only`: lora_step_interleaved.json.
Usage: python benchmarks/lora_step.py [--steps 50 --batch-size 8 --max-length 256 --threads 1]
       [--timing-only] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import environment, print_table, time_cases

from common.evaluation import pad_id
from common.io import read_json, write_json
from common.lm_finetune import collate, encode_example, prepare_for_training, target_only_loss
from common.zoo import DEFAULT, Examples, base_path, lora_for, training_records

RESULTS = Path(__file__).parent / "results"
SKIP = 2  # steps whose time is not counted (first calls: allocator, oneDNN kernels)
PRECISIONS = ("fp32", "bf16")


def encoded(tokenizer, task: str, count: int, max_length: int) -> list[dict[str, list[int]]]:
    """The first `count` training records of a zoo task (seed 0), encoded as the zoo encodes them."""
    records = training_records(task, 0)[:count]
    return [encode_example(tokenizer, r["source"], r["target"], max_length) for r in records]


def batches_tokens(examples: list[dict], batch_size: int, steps: int) -> list[int]:
    """Non-padding tokens of each step's batch, in the order both trainers read them (no shuffling)."""
    n = len(examples)
    return [
        sum(len(examples[(s * batch_size + i) % n]["input_ids"]) for i in range(batch_size))
        for s in range(steps)
    ]


def fresh_lora_model(path: str, settings, seed: int, **load):
    """The base in fp32 with a new LoRA; seeded, so every run starts from the same A (B is zero)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **load)
    torch.manual_seed(seed)
    return get_peft_model(model, lora_for(settings))


def run_ours(path, tokenizer, examples, settings, args, precision, work: Path) -> dict:
    from common.training import TrainConfig, train

    # as common.zoo.load_base + _train: eager attention, then base and LoRA cast to the run's dtype
    model = fresh_lora_model(path, settings, args.seed, attn_implementation="eager")
    init = _lora_state(model)
    prepare_for_training(model, torch.bfloat16 if precision == "bf16" else torch.float32)
    ends: list[float] = []
    cfg = TrainConfig(
        lr=settings.lr,
        max_steps=args.steps,
        warmup_steps=args.warmup_steps,
        schedule="linear",
        batch_size=args.batch_size,
        seed=args.seed,
        shuffle=False,
        log_every=1,
        mixed_precision="no",
    )
    pad = pad_id(tokenizer)
    start = time.perf_counter()
    result = train(
        model,
        target_only_loss,
        Examples(examples),
        cfg,
        work / f"ours_{precision}",
        collate_fn=lambda batch: collate(batch, pad),
        callbacks=[lambda step, logs: ends.append(time.perf_counter())],
        device="cpu",
        label=f"ours {precision}",
    )
    return {"losses": [v for _, v in result.losses], "step_s": _gaps(start, ends), "init": init}


def run_peer(path, tokenizer, examples, settings, args, precision, work: Path) -> dict:
    from accelerate.state import AcceleratorState
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    AcceleratorState._reset_state(reset_partial_state=True)  # ours left one in its own precision
    model = fresh_lora_model(path, settings, args.seed)
    init = _lora_state(model)
    ends: list[float] = []
    targs = TrainingArguments(
        output_dir=str(work / f"peer_{precision}"),
        per_device_train_batch_size=args.batch_size,
        learning_rate=settings.lr,
        max_steps=args.steps,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="linear",
        bf16=precision == "bf16",
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
        train_sampling_strategy="sequential",
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=examples,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        callbacks=[StepEnds()],
    )
    start = time.perf_counter()
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    AcceleratorState._reset_state(reset_partial_state=True)
    return {"losses": losses, "step_s": _gaps(start, ends), "init": init, "optim": str(targs.optim)}


def interleaved_steps(path, tokenizer, examples, settings, args) -> dict[str, dict[str, float]]:
    """One optimizer step of each of the four setups, outside the trainers, the cases taking turns (so
    that load from other processes falls on all alike): forward, backward, clipping to 1.0 and AdamW on
    the first `batch_size` examples. Ours: eager attention, `target_only_loss`, base and LoRA in the
    run's dtype, torch's default AdamW (as `common.training`). The peer: SDPA, `model(**batch).loss` over
    the full head, fp32 weights with bf16 autocast for bf16 (what accelerate does for `bf16=True`), fused
    AdamW (the Trainer's default optimizer here)."""
    from transformers import DataCollatorForSeq2Seq

    pad = tokenizer.pad_token_id
    rows = examples[: args.batch_size]
    ours_batch = collate(rows, pad)
    peer_batch = dict(DataCollatorForSeq2Seq(tokenizer, padding=True)(rows))
    cases = {}
    for precision in args.precisions:
        bf16 = precision == "bf16"
        model = fresh_lora_model(path, settings, args.seed)
        opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=settings.lr, fused=True
        )
        cases[f"peer {precision}"] = _step(model, opt, lambda m, bf16=bf16: _peer_loss(m, peer_batch, bf16))
        model = fresh_lora_model(path, settings, args.seed, attn_implementation="eager")
        prepare_for_training(model, torch.bfloat16 if bf16 else torch.float32)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
        cases[f"ours {precision}"] = _step(model, opt, lambda m: target_only_loss(m, ours_batch))
    return time_cases(cases, args.timing_repeats, warmup=1)


def _peer_loss(model, batch, bf16: bool) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(**batch).loss


def _step(model, optimizer, loss_fn):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> None:
        loss_fn(model).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def _gaps(start: float, ends: list[float]) -> list[float]:
    stamps = [start, *ends]
    return [b - a for a, b in itertools.pairwise(stamps)]


def summarise(step_s: list[float], tokens: list[int]) -> dict[str, float]:
    timed, toks = step_s[SKIP:] or step_s, tokens[SKIP:] or tokens
    q = statistics.quantiles(timed, n=4) if len(timed) >= 2 else [timed[0]] * 3
    return {
        "median_step_s": statistics.median(timed),
        "p25_step_s": q[0],
        "p75_step_s": q[2],
        "tokens_per_s": sum(toks) / sum(timed),
        "timed_steps": len(timed),
    }


def plot(curves: dict[str, list[float]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name, linestyle="-" if "ours" in name else "--")
    ax.set(xlabel="step", ylabel="training loss (target tokens)", title=title)
    ax.legend(fontsize=8)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=DEFAULT.base, help="a base spec (real:..., micro:...) or folder")
    parser.add_argument(
        "--task", default="sentiment_airline", help="the zoo task whose records are trained on"
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=DEFAULT.batch_size)
    parser.add_argument("--max-length", type=int, default=DEFAULT.max_length)
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: steps // 10, as the zoo")
    parser.add_argument("--rank", type=int, default=DEFAULT.rank)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-repeats", type=int, default=5, help="steps per case, interleaved")
    parser.add_argument(
        "--timing-only",
        action="store_true",
        help="only the interleaved step timing (no trainer runs, no curves)",
    )
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument(
        "--quick", action="store_true", help="micro:mistral base, 4 steps of 2 x 32: a smoke run"
    )
    parser.add_argument("--out", type=Path, default=None, help="the JSON (the PNG goes beside it)")
    args = parser.parse_args(argv)
    if args.quick:
        args.base, args.steps, args.batch_size, args.max_length, args.rank = "micro:mistral", 4, 2, 32, 2
        args.timing_repeats = 2
    if args.warmup_steps is None:
        args.warmup_steps = max(1, args.steps // 10)
    name = "lora_step" + ("_interleaved" if args.timing_only else "") + ("_quick" if args.quick else "")
    out = args.out or RESULTS / f"{name}.json"

    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    settings = replace(DEFAULT, base=args.base, rank=args.rank, alpha=2.0 * args.rank)
    path = base_path(settings)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:  # the peer's collator needs one; ours pads with EOS likewise
        tokenizer.pad_token = tokenizer.eos_token
    examples = encoded(tokenizer, args.task, args.steps * args.batch_size, args.max_length)
    tokens = batches_tokens(examples, args.batch_size, args.steps)
    shapes = {
        "base": args.base,
        "task": args.task,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "mean_tokens_per_step": statistics.fmean(tokens),
        "lora": {"r": settings.rank, "alpha": settings.alpha, "modules": list(settings.modules)},
        "lr": settings.lr,
        "warmup_steps": args.warmup_steps,
        "threads": args.threads,
    }
    print(shapes)
    if args.timing_only:
        step_times = interleaved_steps(path, tokenizer, examples, settings, args)
        print_table("one step, the cases taking turns (interleaved)", step_times, "peer fp32")
        speedup = {
            p: step_times[f"peer {p}"]["median_ms"] / step_times[f"ours {p}"]["median_ms"]
            for p in args.precisions
        }
        print({"interleaved_step_speedup_vs_peer": speedup})
        write_json(
            out,
            {
                "environment": environment(),
                "shapes": shapes,
                "interleaved_step_times": step_times,
                "interleaved_step_speedup_vs_peer": speedup,
            },
        )
        print(f"wrote {out}")
        return read_json(out)
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="lora_step_") as work:
        for precision in args.precisions:
            runs[f"peer {precision}"] = run_peer(
                path, tokenizer, examples, settings, args, precision, Path(work)
            )
            runs[f"ours {precision}"] = run_ours(
                path, tokenizer, examples, settings, args, precision, Path(work)
            )

    step_times = interleaved_steps(path, tokenizer, examples, settings, args)
    first = next(iter(runs.values()))["init"]
    same_init = all(
        r["init"].keys() == first.keys() and all(torch.equal(r["init"][k], first[k]) for k in first)
        for r in runs.values()
    )
    times = {name: summarise(r["step_s"], tokens) for name, r in runs.items()}
    curves = {name: r["losses"] for name, r in runs.items()}
    compare = {}
    for precision in args.precisions:
        ours, peer = curves[f"ours {precision}"], curves[f"peer {precision}"]
        tail = max(1, len(ours) // 5)
        compare[precision] = {
            "interleaved_step_speedup_vs_peer": step_times[f"peer {precision}"]["median_ms"]
            / step_times[f"ours {precision}"]["median_ms"],
            "whole_run_speedup_vs_peer": times[f"peer {precision}"]["median_step_s"]
            / times[f"ours {precision}"]["median_step_s"],
            "tokens_per_s_ratio": times[f"ours {precision}"]["tokens_per_s"]
            / times[f"peer {precision}"]["tokens_per_s"],
            "first_loss_abs_diff": abs(ours[0] - peer[0]),
            "mean_abs_loss_diff": statistics.fmean(abs(a - b) for a, b in zip(ours, peer)),
            f"last_{tail}_mean_loss": {
                "ours": statistics.fmean(ours[-tail:]),
                "peer": statistics.fmean(peer[-tail:]),
            },
        }
    if set(PRECISIONS) <= set(args.precisions):  # the noise scale: the peer against itself in bf16
        compare["peer fp32 vs peer bf16 mean_abs_loss_diff"] = statistics.fmean(
            abs(a - b) for a, b in zip(curves["peer fp32"], curves["peer bf16"])
        )
    print(f"{'run':<12}{'median s/step':>15}{'p25-p75':>18}{'tokens/s':>11}{'final loss':>12}")
    for name, t in times.items():
        spread = f"{t['p25_step_s']:.3g}-{t['p75_step_s']:.3g}"
        print(
            f"{name:<12}{t['median_step_s']:>15.4g}{spread:>18}{t['tokens_per_s']:>11.1f}{curves[name][-1]:>12.4f}"
        )
    print_table("one step, the cases taking turns (interleaved)", step_times, "peer fp32")
    print({"same_lora_init": same_init, **compare})
    png = out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(curves, png, f"LoRA r{settings.rank}, {args.task}, batch {args.batch_size}")
    result = {
        "environment": environment(),
        "shapes": shapes,
        "peer_optimizer": runs[next(n for n in runs if n.startswith("peer"))]["optim"],
        "same_lora_init": same_init,
        "interleaved_step_times": step_times,
        "times": times,
        "compare": compare,
        "loss_curves": curves,
        "step_s": {name: r["step_s"] for name, r in runs.items()},
        "plot": png.name,
    }
    write_json(out, result)
    print(f"wrote {out} and {png}")
    return result


if __name__ == "__main__":
    main()
