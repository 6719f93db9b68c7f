"""One leaderboard of every routing and merging method on the expert zoo (`make leaderboard`).

For each zoo seed and entry: hyperparameters chosen by the mean score over the library tasks'
validation splits, then one read of every task's test split (library tasks: in-distribution; held-out
tasks: zero-shot), the parameters stored to serve all tasks relative to the base, and tokens per second
of a forward pass over a fixed batch, measured in the same run. Each (seed, entry) is written to
`<out>/seed_<s>/<entry>.json` with its provenance and reused by a later run with the same zoo settings;
`leaderboard.report` then writes the table (mean ± std over seeds), the plot and RESULTS.md's section.
`--adapter ia3|full` runs MaTS's merges (MERGE_ENTRIES) on the (IA)^3 or full fine-tuning zoo into
`results/leaderboard/<adapter>/`, which the LoRA zoo's RESULTS.md section then shows under its own table.

    python -m leaderboard.run --seeds 0 1 [--entries base oracle ...] [--out results/leaderboard]
    python -m leaderboard.run --adapter ia3|full ...   # the (IA)^3 / full fine-tuning zoo (on zoo.MERGE_TASKS)
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from common import zoo
from common.cache import content_hash, weights_digest
from common.io import read_json, write_json
from common.rundir import provenance
from common.zoo_tasks import HELD_OUT, LIBRARY
from leaderboard.entries import ENTRIES, Candidate, Context, count
from leaderboard.report import fingerprint, publish

LEADERBOARD = Path("results/leaderboard")
THROUGHPUT_BATCH = 16  # validation prompts of the first library task, one forward pass
# --adapter -> (zoo settings, library tasks, held-out tasks). The MaTS zoos cover a subset (storage and time,
# common/zoo.py) and score no held-out task: the paper's merging table is in-distribution only, and the
# held-out test passes (a generative one among them) would be most of their evaluation time.
ADAPTER_ZOOS = {
    "lora": (zoo.DEFAULT, LIBRARY, HELD_OUT),
    "ia3": (zoo.IA3, zoo.MERGE_TASKS, ()),
    "full": (zoo.FULL, zoo.MERGE_TASKS, ()),
}
# MaTS's merges that need per-expert statistics (Fisher, Grams) or CG: the (IA)^3 and full zoos run them (the
# paper's parameterisations, issue 18). On the 13-expert LoRA zoo they would add about 14 h per seed and 26 GB
# of statistics (projects/mats/README.md, "The real scale"), so its default leaves them out; `--entries` runs
# them there.
STATISTICS_MERGES = (
    *("fisher_diag", "fisher_diag_true", "regmean"),
    *("mats_cg", "cg_regmean", "cg_diagonal_fisher", "cg_average", "mats_cg_from_regmean"),
)
# The rows of MaTS's merging table: what `--adapter ia3|full` runs unless --entries says otherwise (routing
# among the experts is the LoRA zoo's question). RegMean, closed form or as a CG objective, is not defined
# for (IA)^3 vectors: the paper has no such row.
MERGE_ENTRIES = ("oracle", "multitask", "base", "uniform", "task_arithmetic", "ties", *STATISTICS_MERGES)
ZOO_ENTRIES = {
    "lora": tuple(e for e in ENTRIES if e not in STATISTICS_MERGES),
    "ia3": tuple(e for e in MERGE_ENTRIES if "regmean" not in e),
    "full": MERGE_ENTRIES,
}


def zoo_models(
    seed: int, settings: zoo.ZooSettings = zoo.DEFAULT, library: Sequence[str] = LIBRARY
) -> tuple[dict[str, Path], Path | None]:
    """The cached expert folders of `seed` (task -> folder) and its multitask model's (None if not trained);
    nothing is trained here: missing experts are refused with the command that trains them."""
    missing = [t for t in library if not zoo.is_cached(t, seed, settings)]
    if missing:
        how = (
            "make zoo" if settings.adapter == "lora" else f"python -m common.zoo --adapter {settings.adapter}"
        )
        raise SystemExit(f"the zoo lacks seed {seed}'s experts for {missing}: run `{how}` first")
    experts = {t: zoo.expert(t, seed, settings) for t in library}
    name = zoo.multitask_name(library, settings)  # (IA)^3 / full: the group expert of their tasks
    multitask = zoo.expert(name, seed, settings) if zoo.is_cached(name, seed, settings) else None
    return experts, multitask


def models_record(experts: Mapping[str, Path], multitask: Path | None) -> dict[str, Any]:
    """Which weights a result was computed on: each expert's (and the multitask model's) `weights_digest`,
    and one fingerprint over them. The zoo settings say how the experts were to be trained; this says what
    training gave (retrained on another machine or by older code, the same settings give other weights)."""
    digests = {t: weights_digest(p) for t, p in experts.items()}
    mt = weights_digest(multitask) if multitask is not None else None
    return {"fingerprint": content_hash([digests, mt]), "experts": digests, "multitask": mt}


def zoo_fingerprint(
    seed: int, settings: zoo.ZooSettings = zoo.DEFAULT, library: Sequence[str] = LIBRARY
) -> str | None:
    """The fingerprint of `seed`'s cached expert weights (`models_record`), or None where the zoo lacks some of
    the seed's experts (a fresh machine): then saved results can be kept but not checked against weights."""
    if not all(zoo.is_cached(t, seed, settings) for t in library):
        return None
    return models_record(*zoo_models(seed, settings, library))["fingerprint"]


def reusable(
    saved: Mapping[str, Any] | None, settings: zoo.ZooSettings, current: str | None, label: str
) -> bool:
    """Whether a saved result stands: made with these zoo settings on the cached weights (fingerprint
    `current`, from `zoo_fingerprint`), or, where the zoo is not cached (`current` None), on weights it
    records: then it is kept unchecked, and `label` says so."""
    if not saved or saved.get("zoo_settings") != settings.key() or fingerprint(saved) is None:
        return False
    if current is None:
        print(
            f"{label}: the zoo's experts are not cached here; keeping it "
            f"(computed on weights {fingerprint(saved)}, not checked against them)"
        )
        return True
    return fingerprint(saved) == current


def context(seed: int, settings: zoo.ZooSettings = zoo.DEFAULT, library: Sequence[str] = LIBRARY) -> Context:
    """The zoo's base (eval, the settings' dtype) and the cached experts of `seed`; nothing is trained here."""
    experts, multitask = zoo_models(seed, settings, library)
    base, tok = zoo.load_base(settings)
    return Context(settings, seed, base, tok, experts, multitask)


class Progress:
    """The per-task scores of one (seed, entry) computed so far, rewritten (atomically) after every task, so that
    a killed run resumes at the task it was on rather than at the entry's first grid point (one SMILE grid
    point is a ~20-minute validation pass). Scores made with other zoo settings are discarded. Each stage is
    "validation <hparams>" or "test"; a task the candidate has no model for is kept as None."""

    def __init__(self, path: Path | None, key: Mapping[str, Any]):
        self.path, self.key, self.scores = path, dict(key), {}
        if path is not None and path.is_file():
            saved = read_json(path)
            if saved.get("key") == self.key:
                self.scores = saved["scores"]

    def get(self, stage: str, task: str) -> object:
        """The saved score (a float, or None: no model for the task), or NOT_SCORED."""
        return self.scores.get(stage, {}).get(task, NOT_SCORED)

    def put(self, stage: str, task: str, score: float | None) -> None:
        self.scores.setdefault(stage, {})[task] = score
        if self.path is not None:
            write_json(self.path, {"key": self.key, "scores": self.scores})


NOT_SCORED = object()


def task_scores(
    ctx: Context,
    make: Callable[[], Candidate],
    tasks: Sequence[str],
    split: str,
    progress: Progress | None = None,
    stage: str = "",
    metric: Callable[[torch.nn.Module, Any, Sequence[Mapping[str, Any]]], float] | None = None,
) -> dict[str, float]:
    """Per-task score on `split` (tasks the candidate has no model for are left out). The candidate is
    built by `make` only if some task still needs scoring (`progress` holds those already scored).
    `metric(model, tokenizer, records)`: default `zoo.score` (accuracy or Rouge-L F)."""
    progress = progress or Progress(None, {})
    metric = metric or functools.partial(zoo.score, max_new_tokens=ctx.settings.max_new_tokens)

    out, candidate = {}, None
    for task in tasks:
        score = progress.get(stage, task)
        if score is NOT_SCORED:
            candidate = candidate or make()
            model = candidate.model_for(task)
            score = None
            if model is not None:
                score = metric(model, ctx.tokenizer, zoo.splits(task, ctx.settings)[split])
            progress.put(stage, task, score)
        if score is not None:
            out[task] = score
    return out


def mean_score(ctx: Context, candidate: Candidate, tasks: Sequence[str], split: str) -> dict[str, float]:
    """Per-task score of a built candidate on `split` (tasks it has no model for are left out)."""
    return task_scores(ctx, lambda: candidate, tasks, split)


def tokens_per_second(ctx: Context, model: torch.nn.Module) -> float:
    records = zoo.splits(next(iter(ctx.experts)), ctx.settings)["validation"][:THROUGHPUT_BATCH]
    batch = ctx.tokenizer([r["source"] for r in records], return_tensors="pt", padding=True)
    n = int(batch["attention_mask"].sum())
    with torch.no_grad():
        model(**batch)  # warm-up
        start = time.perf_counter()
        model(**batch)
    return n / (time.perf_counter() - start)


def choose(
    ctx: Context, name: str, search: list[dict[str, Any]], progress: Progress | None = None
) -> tuple[dict[str, Any], str]:
    """The grid point with the best mean validation score; where several share it (the scores are flat, as
    Rouge-L often is across Arrow's top_k), the one with the lowest mean validation target loss
    (`zoo.target_loss`, written into those points' `search` rows). Returns (hparams, what decided)."""
    if not search:
        return {}, "no hyperparameters"
    best = max(s["validation"] for s in search)
    tied = [s for s in search if s["validation"] == best]
    if len(tied) == 1:
        return tied[0]["hparams"], "validation score"
    fn = ENTRIES[name][0]
    for s in tied:
        make = functools.partial(fn, ctx, **s["hparams"])
        stage = f"validation loss {json.dumps(s['hparams'])}"
        losses = task_scores(ctx, make, list(ctx.experts), "validation", progress, stage, zoo.target_loss)
        s["validation_loss"] = statistics.fmean(losses.values())
    winner = min(tied, key=lambda s: s["validation_loss"])
    return winner["hparams"], "validation loss (tied validation scores)"


def _build(
    fn: Callable[..., Candidate], ctx: Context, hparams: dict[str, Any], built: list[Candidate]
) -> Candidate:
    """`fn(ctx, **hparams)`, also appended to `built` (so that `run_entry` can keep it for the test pass)."""
    built.append(fn(ctx, **hparams))
    return built[-1]


def run_entry(
    ctx: Context, name: str, held_out: Sequence[str] = HELD_OUT, progress_path: Path | None = None
) -> dict[str, Any]:
    """Choose the entry's hyperparameters on validation, then score every task's test split once. With
    `progress_path`, scores are kept there task by task and a rerun after a kill starts where it stopped."""
    started = time.time()
    fn, grid = ENTRIES[name]
    library = list(ctx.experts)
    models = models_record(ctx.experts, ctx.multitask)
    progress = Progress(
        progress_path,
        {
            "entry": name,
            "seed": ctx.seed,
            "zoo_settings": ctx.settings.key(),
            "models": models["fingerprint"],
        },
    )
    search = []
    # The candidate of the best-scoring grid point so far, if this process built it, is kept for the test
    # pass: building is the costly part of some entries (a CG merge of full fine-tunes is ~40 min) and a
    # candidate is a function of (ctx, hparams) only, so building it again gives the same model.
    kept: tuple[dict[str, Any], Candidate] | None = None
    best = float("-inf")
    for combo in itertools.product(*grid.values()):
        hparams = dict(zip(grid, combo))
        built: list[Candidate] = []
        make = functools.partial(_build, fn, ctx, hparams, built)
        scores = task_scores(ctx, make, library, "validation", progress, f"validation {json.dumps(hparams)}")
        value = statistics.fmean(scores.values())
        search.append({"hparams": hparams, "validation": value, "per_task": scores})
        if value > best:
            best, kept = value, ((hparams, built[0]) if built else None)
    chosen, chosen_by = choose(ctx, name, search, progress)
    candidate = kept[1] if kept is not None and kept[0] == chosen else fn(ctx, **chosen)
    test = task_scores(ctx, lambda: candidate, [*library, *held_out], "test", progress, "test")
    in_dist = [test[t] for t in library if t in test]
    held = [test[t] for t in held_out if t in test]
    model = candidate.model_for(library[0])
    return {
        "entry": name,
        "seed": ctx.seed,
        "hparams": chosen,
        "chosen_by": chosen_by,
        "search": search,
        "test": test,
        "in_distribution": statistics.fmean(in_dist) if in_dist else None,
        "held_out": statistics.fmean(held) if held else None,
        "params_vs_base": candidate.params / count(ctx.base),
        "tokens_per_s": tokens_per_second(ctx, model) if model is not None else None,
        "note": candidate.note,
        "zoo_settings": ctx.settings.key(),
        "models": models,
        "provenance": provenance(ctx.seed, started),
    }


def run(
    seeds: Sequence[int],
    entries: Sequence[str],
    out: Path,
    settings: zoo.ZooSettings = zoo.DEFAULT,
    library: Sequence[str] = LIBRARY,
    held_out: Sequence[str] = HELD_OUT,
) -> list[dict[str, Any]]:
    """Every (seed, entry) result, computed where missing, made with other zoo settings, or made on other
    expert weights than the cached ones (or before results recorded them: `models_record`). A seed whose
    experts are not cached (a fresh machine) keeps its saved results that record their weights, unchecked
    and said so, and is refused with the command that trains the zoo only if something must be computed."""
    results = []
    for seed in seeds:
        ctx = None
        current = zoo_fingerprint(seed, settings, library)
        for name in entries:
            path = out / f"seed_{seed}" / f"{name}.json"
            saved = read_json(path) if path.is_file() else None
            if reusable(saved, settings, current, f"leaderboard: seed {seed} {name}: {path}"):
                results.append(saved)
                continue
            if saved:
                if saved.get("zoo_settings") != settings.key():
                    why = "other zoo settings"
                elif fingerprint(saved) is None:
                    why = "no record of its expert weights"
                else:
                    why = "other expert weights"
                print(f"leaderboard: seed {seed} {name}: {path} was made with {why}; recomputing")
            ctx = ctx or context(seed, settings, library)
            print(f"leaderboard: seed {seed} {name}", flush=True)
            partial = (
                out / ".partial" / f"seed_{seed}" / f"{name}.json"
            )  # not a result: report.py reads seed_*/
            results.append(run_entry(ctx, name, held_out, partial))
            write_json(path, results[-1])
            partial.unlink(missing_ok=True)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m leaderboard.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--entries",
        nargs="+",
        choices=list(ENTRIES),
        help="default: ZOO_ENTRIES (lora: every entry but STATISTICS_MERGES; ia3, full: MERGE_ENTRIES)",
    )
    parser.add_argument(
        "--adapter",
        choices=list(ADAPTER_ZOOS),
        default="lora",
        help="which zoo: lora (default), ia3 (zoo.IA3) or full (zoo.FULL), both on zoo.MERGE_TASKS",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="default results/leaderboard (lora), results/leaderboard/<adapter> (ia3, full)",
    )
    parser.add_argument(
        "--results-md", default="RESULTS.md", help="'' to leave it alone (always left alone for ia3 and full)"
    )
    args = parser.parse_args(argv)
    settings, library, held_out = ADAPTER_ZOOS[args.adapter]
    lora = args.adapter == "lora"
    args.out = args.out or (LEADERBOARD if lora else LEADERBOARD / args.adapter)
    run(args.seeds, args.entries or ZOO_ENTRIES[args.adapter], args.out, settings, library, held_out)
    # RESULTS.md's leaderboard section is written with the LoRA zoo's results (and the (IA)^3 and full zoos'
    # tables found in its <adapter>/ subfolders); a run on one of those zoos publishes its own folder
    print(publish(args.out, Path(args.results_md) if args.results_md and lora else None))


if __name__ == "__main__":
    main()
