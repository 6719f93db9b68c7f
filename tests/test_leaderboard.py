"""The leaderboard harness on a micro zoo: entries from the projects' code, hyperparameters chosen on
validation, the test split read once, mean ± std over seeds."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from common import zoo
from leaderboard import entries, report, run
from tests.test_zoo import MICRO, micro_context

LIBRARY = ("breast_cancer", "champ_category")
HELD_OUT = ("language_id_union",)


@pytest.fixture(scope="module")
def ctx():
    return micro_context(LIBRARY, MICRO)


def expected_hparams(search):
    """The rule `run.choose` follows, read off a result's search rows: the best mean validation score, ties
    broken by the lowest validation loss (which the run writes into the tied rows)."""
    best = max(s["validation"] for s in search)
    return min((s for s in search if s["validation"] == best), key=lambda s: s.get("validation_loss", 0))[
        "hparams"
    ]


def _merged_expert(ctx, task):
    return dict(entries.with_adapter(ctx, ctx.experts[task]).named_parameters())


def test_uniform_merge_is_the_mean_of_the_experts_weights(ctx):
    uniform = dict(entries.ENTRIES["uniform"][0](ctx).model_for("breast_cancer").named_parameters())
    a, b = (_merged_expert(ctx, t) for t in LIBRARY)
    base = dict(ctx.base.named_parameters())
    name = next(n for n in base if "q_proj" in n)
    assert not torch.equal(a[name], base[name])  # the expert changed it
    assert torch.allclose(uniform[name].float(), (a[name].float() + b[name].float()) / 2, atol=1e-6)
    untouched = next(n for n in base if "embed" in n)
    assert torch.equal(uniform[untouched], base[untouched])


def test_task_arithmetic_is_base_plus_lambda_times_the_summed_deltas(ctx):
    model = entries.ENTRIES["task_arithmetic"][0](ctx, model_lambda=0.3).model_for("champ_category")
    merged = dict(model.named_parameters())
    a, b = (_merged_expert(ctx, t) for t in LIBRARY)
    base = dict(ctx.base.named_parameters())
    name = next(n for n in base if "down_proj" in n)
    want = base[name].float() + 0.3 * (
        a[name].float() - base[name].float() + b[name].float() - base[name].float()
    )
    assert torch.allclose(merged[name].float(), want, atol=1e-6)


def test_entry_chooses_on_validation_and_reads_test_once(ctx, monkeypatch):
    reads = []
    score = zoo.score

    def counting(model, tok, records, max_new_tokens=48):
        reads.append((records[0]["task"], id(records)))
        return score(model, tok, records, max_new_tokens)

    monkeypatch.setattr(zoo, "score", counting)
    result = run.run_entry(ctx, "task_arithmetic", HELD_OUT)
    assert result["hparams"] == expected_hparams(result["search"])
    assert [s["hparams"]["model_lambda"] for s in result["search"]] == list(
        entries.ENTRIES["task_arithmetic"][1]["model_lambda"]
    )
    test_ids = {id(zoo.splits(t, MICRO)["test"]) for t in (*LIBRARY, *HELD_OUT)}
    assert sum(i in test_ids for _, i in reads) == len(LIBRARY) + len(HELD_OUT)  # each test split once
    assert set(result["test"]) == {*LIBRARY, *HELD_OUT}
    assert result["params_vs_base"] == 1.0 and result["tokens_per_s"] > 0


def test_a_killed_entry_resumes_at_the_task_it_was_on(ctx, tmp_path, monkeypatch):
    """Scores are kept task by task: after a kill, only the unscored (grid point, task) pairs are computed,
    the candidate of a fully scored grid point is not even built, and the result equals an unkilled run."""
    score, calls = zoo.score, []

    def dying(model, tok, records, max_new_tokens=48):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the session ends mid-entry
        calls.append(records[0]["task"])
        return score(model, tok, records, max_new_tokens)

    monkeypatch.setattr(zoo, "score", dying)
    partial = tmp_path / "partial.json"
    with pytest.raises(KeyboardInterrupt):
        run.run_entry(ctx, "task_arithmetic", HELD_OUT, partial)
    saved = json.loads(partial.read_text())["scores"]
    assert sum(len(v) for v in saved.values()) == 3  # two tasks of λ's first grid point, one of its second
    builds, fn = [], entries.ENTRIES["task_arithmetic"][0]
    monkeypatch.setitem(
        entries.ENTRIES,
        "task_arithmetic",
        (lambda c, **h: builds.append(h) or fn(c, **h), entries.ENTRIES["task_arithmetic"][1]),
    )
    monkeypatch.setattr(zoo, "score", score)
    calls.clear()
    resumed = run.run_entry(ctx, "task_arithmetic", HELD_OUT, partial)
    grid = entries.ENTRIES["task_arithmetic"][1]["model_lambda"]
    assert builds[0] == {"model_lambda": grid[1]}  # the first grid point was complete: never rebuilt
    fresh = run.run_entry(ctx, "task_arithmetic", HELD_OUT)
    assert resumed["search"] == fresh["search"] and resumed["test"] == fresh["test"]
    key = {"entry": "task_arithmetic", "seed": ctx.seed + 1, "zoo_settings": ctx.settings.key()}
    assert run.Progress(partial, key).scores == {}  # another seed's (or zoo's) partial scores: not reused


def test_oracle_answers_library_tasks_only_with_each_expert(ctx):
    result = run.run_entry(ctx, "oracle", HELD_OUT)
    assert set(result["test"]) == set(LIBRARY) and result["held_out"] is None
    expert = entries.with_adapter(ctx, ctx.experts["champ_category"])
    records = zoo.splits("champ_category", MICRO)["test"]
    assert result["test"]["champ_category"] == zoo.score(expert, ctx.tokenizer, records, MICRO.max_new_tokens)
    assert result["params_vs_base"] > 1.0


def test_results_are_cached_per_seed_and_tabled_as_mean_and_std(ctx, tmp_path, monkeypatch):
    first = run.run([0], ["base"], tmp_path, MICRO, LIBRARY, HELD_OUT)
    monkeypatch.setattr(run, "run_entry", lambda *a, **k: pytest.fail("recomputed"))
    assert run.run([0], ["base"], tmp_path, MICRO, LIBRARY, HELD_OUT) == first
    other = dataclasses.replace(MICRO, max_new_tokens=5)  # another zoo: not reused, and never trained here
    with pytest.raises(SystemExit, match=r"lacks seed 0's experts.*make zoo"):
        run.run([0], ["base"], tmp_path, other, LIBRARY, HELD_OUT)
    rows = report.rows(
        [
            {
                "entry": "x",
                "in_distribution": 0.5,
                "held_out": None,
                "params_vs_base": 1.0,
                "tokens_per_s": 10.0,
                "hparams": {},
            },
            {
                "entry": "x",
                "in_distribution": 0.7,
                "held_out": None,
                "params_vs_base": 1.0,
                "tokens_per_s": 30.0,
                "hparams": {},
            },
        ]
    )
    assert rows == [
        {
            "method": "x",
            "seeds": 2,
            "in-distribution": "60.0 ± 14.1",
            "held-out": "—",
            "params / base": "1.000",
            "tokens/s": "20",
            "chosen on validation": "—",
        }
    ]


def test_publish_writes_table_plot_and_only_the_leaderboard_section(tmp_path):
    out = tmp_path / "lb"
    for seed, score in ((0, 0.5), (1, 0.7)):
        write = {
            "entry": "uniform",
            "seed": seed,
            "in_distribution": score,
            "held_out": 0.25,
            "params_vs_base": 1.0,
            "tokens_per_s": 5.0,
            "hparams": {"model_lambda": 0.3},
        }
        (out / f"seed_{seed}").mkdir(parents=True)
        (out / f"seed_{seed}" / "uniform.json").write_text(json.dumps(write))
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nintro\n\n## mats: a paper\n\nmats table\n")
    report.publish(out, md)
    text = md.read_text()
    assert text.index("## leaderboard") < text.index("## mats: a paper") and "mats table" in text
    assert "60.0 ± 14.1" in text and "25.0 ± 0.0" in text
    data = json.loads((out / "leaderboard_plot.json").read_text())
    assert data["uniform"]["in_distribution"][:2] == pytest.approx([0.6, 0.1414213], rel=1e-5)
    assert (out / "leaderboard.png").stat().st_size > 0 and (out / "table.md").is_file()
    report.publish(out, md)  # again: the section is replaced, not repeated
    assert md.read_text().count("## leaderboard") == 1


def test_results_md_keeps_the_leaderboard_section(tmp_path):
    from common import results_md

    previous = "# Results\n\n## leaderboard: zoo\n\nboard\n\n## mats: p\n\nold mats\n"
    text = results_md.render([], previous=previous)
    assert "## leaderboard: zoo\n\nboard" in text and "old mats" in text


def test_the_merge_zoos_get_their_own_tables_in_the_leaderboard_section(tmp_path):
    def result(folder, entry, seed, score, test):
        (folder / f"seed_{seed}").mkdir(parents=True, exist_ok=True)
        record = {
            "entry": entry,
            "seed": seed,
            "in_distribution": score,
            "held_out": None if test else 0.5,
            "params_vs_base": 1.0,
            "tokens_per_s": 5.0,
            "hparams": {},
            "test": test or {"a": score},
        }
        (folder / f"seed_{seed}" / f"{entry}.json").write_text(json.dumps(record))

    out = tmp_path / "lb"
    result(out, "uniform", 0, 0.5, None)
    for seed, score in ((0, 0.8), (1, 0.6)):
        result(out / "full", "mats_cg", seed, score, {"t1": score, "t2": score})
    result(out / "full", "ties", 0, 0.65, {"t1": 0.6, "t2": 0.7})
    md = tmp_path / "RESULTS.md"
    report.publish(out, md)
    report.publish(out, md)
    text = md.read_text()
    assert text.count("### MaTS's merges on the full fine-tuning zoo") == 1 and "(IA)^3 zoo" not in text
    board, full = text.split("### MaTS's merges on the full fine-tuning zoo")
    assert "| uniform | 1 | 50.0 | 50.0 |" in board and "mats_cg" not in board  # the LoRA zoo's table
    assert "averaged over its 2 tasks (t1, t2)" in full and "held-out" not in full
    assert full.index("| mats_cg | 2 | 70.0 ± 14.1 |") < full.index("| ties | 1 | 65.0 |")
    assert not list(out.glob("seed_*/mats_cg.json"))  # the LoRA table does not read the subfolders


def test_results_record_the_expert_weights_and_are_recomputed_on_other_ones(ctx, tmp_path, monkeypatch):
    """A result names the weights it was computed on (a cache key says only how they were to be trained);
    one made on other weights, or before they were recorded, is recomputed, not mixed in."""
    import hashlib

    first = run.run([0], ["base"], tmp_path, MICRO, LIBRARY, HELD_OUT)[0]
    assert set(first["models"]["experts"]) == set(LIBRARY)
    for task, folder in ctx.experts.items():  # sha256 over each safetensors file's name and bytes, by hand
        h = hashlib.sha256()
        for f in sorted(folder.glob("*.safetensors")):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        assert first["models"]["experts"][task] == h.hexdigest()[:16]
    assert run.fingerprint(first) == run.models_record(ctx.experts, ctx.multitask)["fingerprint"]
    recomputed = []
    real_entry = run.run_entry
    monkeypatch.setattr(run, "run_entry", lambda *a, **k: recomputed.append(a[1]) or real_entry(*a, **k))
    run.run([0], ["base"], tmp_path, MICRO, LIBRARY, HELD_OUT)
    assert recomputed == []  # the same weights: reused
    digest = run.weights_digest
    retrained = ctx.experts["champ_category"]  # as if retrained to other weights
    monkeypatch.setattr(run, "weights_digest", lambda p: "0" * 16 if p == retrained else digest(p))
    again = run.run([0], ["base"], tmp_path, MICRO, LIBRARY, HELD_OUT)[0]
    assert recomputed == ["base"] and again["models"]["experts"]["champ_category"] == "0" * 16
    monkeypatch.setattr(run, "weights_digest", digest)
    legacy = {k: v for k, v in again.items() if k != "models"}  # written before results recorded weights
    (tmp_path / "seed_0" / "base.json").write_text(json.dumps(legacy))
    run.run([0], ["base"], tmp_path, MICRO, LIBRARY, HELD_OUT)
    assert recomputed == ["base", "base"]


def test_saved_results_are_kept_where_the_zoo_is_not_cached(ctx, tmp_path, monkeypatch, capsys):
    """On a fresh machine (the seed's experts not cached) results that record their weights are kept, said so,
    and reported; an entry that must be computed, or a result with no record of its weights, is refused with
    the command that trains the zoo."""
    first = run.run([0], ["base", "uniform"], tmp_path, MICRO, LIBRARY, HELD_OUT)
    monkeypatch.setattr(zoo, "is_cached", lambda *a, **k: False)
    monkeypatch.setattr(run, "run_entry", lambda *a, **k: pytest.fail("computed without a zoo"))
    assert run.zoo_fingerprint(0, MICRO, LIBRARY) is None
    kept = run.run([0], ["base", "uniform"], tmp_path, MICRO, LIBRARY, HELD_OUT)
    assert kept == first
    assert "not cached here; keeping" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="make zoo"):
        run.run([0], ["base", "task_arithmetic"], tmp_path, MICRO, LIBRARY, HELD_OUT)
    legacy = {k: v for k, v in first[0].items() if k != "models"}
    (tmp_path / "seed_0" / "base.json").write_text(json.dumps(legacy))
    with pytest.raises(SystemExit, match="make zoo"):
        run.run([0], ["base"], tmp_path, MICRO, LIBRARY, HELD_OUT)
    assert "no record of its expert weights" in capsys.readouterr().out


def _write_result(root, seed, entry, models, adapter):
    """A minimal saved result `root/seed_<seed>/<entry>.json` ({} for `models`: written before weights were
    recorded)."""
    (root / f"seed_{seed}").mkdir(exist_ok=True)
    record = {"entry": entry, "seed": seed, "zoo_settings": {"adapter": adapter}, **models}
    (root / f"seed_{seed}" / f"{entry}.json").write_text(json.dumps(record))


def test_a_table_mixing_expert_weights_within_a_seed_is_refused(tmp_path):
    def write(seed, entry, models):
        _write_result(tmp_path, seed, entry, models, "full")

    write(0, "uniform", {"models": {"fingerprint": "aa"}})
    write(0, "ties", {"models": {"fingerprint": "aa"}})
    write(1, "uniform", {"models": {"fingerprint": "bb"}})  # seeds differ: each its own experts
    assert len(report.load(tmp_path)) == 3
    write(0, "arrow", {})
    with pytest.raises(SystemExit) as refused:
        report.load(tmp_path)
    message = str(refused.value)
    assert "seed 0's entries were computed on different expert weights" in message
    assert "arrow on unrecorded weights (older results); ties, uniform on aa" in message
    assert "leaderboard.run --adapter full --seeds 0 --entries arrow ties uniform --out" in message


def test_a_table_mixing_older_seeds_with_recorded_ones_is_refused(tmp_path):
    """Seeds whose results all predate the weights record load together (one zoo, unchecked); beside seeds
    that record their weights they are refused, with the command that recomputes the older seeds."""

    def write(seed, entry, models):
        _write_result(tmp_path, seed, entry, models, "lora")

    write(1, "uniform", {})
    write(2, "uniform", {})
    write(2, "ties", {})  # results from before weights were recorded, all alike: kept
    assert len(report.load(tmp_path)) == 3
    write(0, "uniform", {"models": {"fingerprint": "aa"}})
    with pytest.raises(SystemExit) as refused:
        report.load(tmp_path)
    message = str(refused.value)
    assert "seed_1, seed_2 hold results with no record of their expert weights" in message
    assert "leaderboard.run --adapter lora --seeds 1 2 --out" in message
    with pytest.raises(SystemExit, match="seed_1, seed_2 hold results"):
        report.publish(tmp_path, None)
    assert not (tmp_path / "table.md").exists()


def test_zoo_target_loss_is_the_fine_tuning_loss_of_the_references(ctx):
    """zoo.target_loss (the shared scoring path) against the training loss of `encode_example`'s format
    (HF's mean cross-entropy over the label tokens), token-weighted over records of different lengths."""
    from common.lm_finetune import collate, encode_example

    model = entries.with_adapter(ctx, ctx.experts["breast_cancer"])
    records = (
        zoo.splits("breast_cancer", MICRO)["validation"] + zoo.splits("champ_category", MICRO)["validation"]
    )
    total = count = 0
    limit = model.config.max_position_embeddings  # both paths cut long sources on the left to fit
    with torch.no_grad():
        for r in records:
            example = encode_example(ctx.tokenizer, r["source"], r["target"], limit)
            n = sum(t != -100 for t in example["labels"])
            total += float(model(**collate([example], 0)).loss) * n
            count += n
    assert zoo.target_loss(model, ctx.tokenizer, records) == pytest.approx(total / count, rel=1e-4)


def test_tied_validation_scores_are_broken_by_validation_loss(ctx, monkeypatch):
    """Where every grid point scores the same on validation (flat, as Rouge-L across Arrow's top_k), the
    lowest mean validation target loss chooses; otherwise the score does and no loss is computed."""
    monkeypatch.setattr(zoo, "score", lambda *a, **k: 0.5)
    result = run.run_entry(ctx, "task_arithmetic", HELD_OUT)
    grid = entries.ENTRIES["task_arithmetic"][1]["model_lambda"]
    losses = {}
    for lam in grid:
        merged = entries.ENTRIES["task_arithmetic"][0](ctx, model_lambda=lam)
        losses[lam] = sum(
            zoo.target_loss(merged.model_for(t), ctx.tokenizer, zoo.splits(t, MICRO)["validation"])
            for t in LIBRARY
        ) / len(LIBRARY)
    assert [s["validation_loss"] for s in result["search"]] == pytest.approx([losses[lam] for lam in grid])
    assert result["hparams"] == {"model_lambda": min(grid, key=losses.get)}
    assert result["chosen_by"] == "validation loss (tied validation scores)"
    assert len(set(losses.values())) == len(grid)  # the losses do separate the grid points
    scores = iter([i / 100 for i in range(100)])  # every grid point its own mean
    monkeypatch.setattr(zoo, "score", lambda *a, **k: next(scores))
    monkeypatch.setattr(zoo, "target_loss", lambda *a, **k: pytest.fail("no tie: no loss needed"))
    result = run.run_entry(ctx, "task_arithmetic", HELD_OUT)
    assert result["chosen_by"] == "validation score" and "validation_loss" not in result["search"][0]


def test_the_chosen_candidate_built_for_validation_is_reused_for_the_test_pass(ctx, monkeypatch):
    """Each grid point is built once: the chosen one's validation candidate serves the test pass (a CG merge
    of full fine-tunes takes ~40 min to build), with the same scores as a rebuilt one."""
    builds, fn = [], entries.ENTRIES["task_arithmetic"][0]
    grid = entries.ENTRIES["task_arithmetic"][1]
    monkeypatch.setitem(
        entries.ENTRIES, "task_arithmetic", (lambda c, **h: builds.append(h) or fn(c, **h), grid)
    )
    scores = iter([i / 100 for i in range(100)])  # every grid point its own mean: no tie, the last one best
    monkeypatch.setattr(zoo, "score", lambda *a, **k: next(scores))
    result = run.run_entry(ctx, "task_arithmetic", HELD_OUT)
    assert builds == [{"model_lambda": lam} for lam in grid["model_lambda"]]  # no build for the test pass
    assert result["hparams"] == {"model_lambda": grid["model_lambda"][-1]}
    # an entry without hyperparameters (mats_cg, fisher_diag, ...) is built once, not twice
    monkeypatch.setitem(
        entries.ENTRIES, "uniform", (lambda c: builds.append("u") or fn(c, model_lambda=0.5), {})
    )
    builds.clear()
    run.run_entry(ctx, "uniform", HELD_OUT)
    assert builds == ["u"]
    # where the validation scores tie, the loss may choose another point than the first best: rebuilt
    monkeypatch.setattr(zoo, "score", lambda *a, **k: 0.5)
    builds.clear()
    result = run.run_entry(ctx, "task_arithmetic", HELD_OUT)
    first = {"model_lambda": grid["model_lambda"][0]}
    assert builds.count(result["hparams"]) == (1 if result["hparams"] == first else 2) + 1  # + its loss pass
