"""MaTS's leaderboard entries (`leaderboard/mats.py`) on micro zoos of each parameterisation (LoRA,
(IA)^3, full fine-tuning): every entry runs, the Fisher and RegMean merges equal their formulas with
statistics recomputed here by hand, the statistics read validation records only, CG starts from the
task-arithmetic model chosen on validation, and `leaderboard.run --adapter` picks the zoo."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from common import zoo, zoo_tasks
from leaderboard import entries, mats, run
from leaderboard.registry import expert_states, with_adapter, with_state
from projects.mats.model import encode, example_log_probs
from tests.test_zoo import MICRO, micro_context

LIBRARY = ("breast_cancer", "code_name")  # one classification, one generative task
SETTINGS = {
    "lora": MICRO,
    "ia3": dataclasses.replace(MICRO, adapter="ia3"),
    "full": dataclasses.replace(MICRO, adapter="full"),
}
MATS_ENTRIES = (
    "ties",
    "fisher_diag",
    "fisher_diag_true",
    "regmean",
    "mats_cg",
    "cg_regmean",
    "cg_diagonal_fisher",
    "cg_average",
    "mats_cg_from_regmean",
)
NOT_FOR_IA3 = {"regmean", "cg_regmean", "mats_cg_from_regmean"}


@pytest.fixture(scope="module", params=list(SETTINGS))
def ctx(request):
    settings = SETTINGS[request.param]
    return micro_context(LIBRARY, settings)


@pytest.fixture(scope="module")
def lora_ctx():
    return micro_context(LIBRARY, MICRO)


@pytest.fixture(scope="module")
def full_ctx():
    return micro_context(LIBRARY, SETTINGS["full"])


def _first(grid):
    return {k: v[len(v) // 2] for k, v in grid.items()}


def test_every_mats_entry_runs_on_each_parameterisation(ctx):
    base, models = expert_states(ctx)
    assert len(models) == len(LIBRARY)
    records = zoo.splits(LIBRARY[0], ctx.settings)["validation"]
    for name in MATS_ENTRIES:
        fn, grid = entries.ENTRIES[name]
        if ctx.settings.adapter == "ia3" and name in NOT_FOR_IA3:
            with pytest.raises(mats.NotApplicable, match="leave this entry out with --adapter ia3"):
                fn(ctx, **_first(grid))
            continue
        model = fn(ctx, **_first(grid)).model_for(LIBRARY[1])
        value = zoo.score(model, ctx.tokenizer, records, ctx.settings.max_new_tokens)
        assert 0.0 <= value <= 1.0
        if ctx.settings.adapter != "ia3":  # the merge moved the merged weights away from the base
            params = dict(model.named_parameters())
            assert any(not torch.equal(params[k].float(), base[k]) for k in base), name


def test_ia3_merged_vectors_build_the_experts_model(ctx):
    if ctx.settings.adapter != "ia3":
        pytest.skip("(IA)^3 plumbing")
    base, models = expert_states(ctx)
    assert all(k.endswith("ia3_l.default") for k in base) and all(torch.all(v == 1) for v in base.values())
    rebuilt = dict(with_state(ctx, models[1]).named_parameters())
    expert = dict(with_adapter(ctx, ctx.experts[LIBRARY[1]]).named_parameters())
    assert rebuilt.keys() == expert.keys()
    assert all(torch.allclose(rebuilt[k], expert[k]) for k in expert)


def test_full_experts_are_every_parameter_and_load_as_saved(ctx):
    if ctx.settings.adapter != "full":
        pytest.skip("full fine-tuning plumbing")
    base, models = expert_states(ctx)
    assert set(base) == {k for k, _ in ctx.base.named_parameters()}
    saved = dict(zoo.load_expert(ctx.experts[LIBRARY[0]], ctx.settings).named_parameters())
    assert all(torch.equal(models[0][k], saved[k].float()) for k in base)
    assert entries.adapter_params(ctx.experts[LIBRARY[0]]) == entries.count(ctx.base)


# --- the formulas, with statistics recomputed here one example at a time ------------------------------------


def _examples(ctx, task):
    return zoo.splits(task, ctx.settings)["validation"]


def _batch(ctx, record):
    return encode(
        ctx.tokenizer,
        [record["source"]],
        [record["target"]],
        encoder_decoder=False,
        max_source_len=ctx.settings.max_length,
    )


def _hand_fisher(ctx, task, name):
    """F = (1/N) Σn (∂ log p(yn|xn) / ∂W)², one backward per validation example (gold answers)."""
    model = with_adapter(ctx, ctx.experts[task]).float()
    weight = dict(model.named_parameters())[name]
    weight.requires_grad_(True)
    total = torch.zeros_like(weight)
    for record in _examples(ctx, task):
        (g,) = torch.autograd.grad(example_log_probs(model, _batch(ctx, record))[0], [weight])
        total += g**2
    return total / len(_examples(ctx, task))


def _hand_gram(ctx, task, module_name):
    """G = Σ x xᵀ / (number of tokens) over the module's inputs on the validation examples."""
    model = with_adapter(ctx, ctx.experts[task]).float()
    module = dict(model.named_modules())[module_name]
    seen = []
    handle = module.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].detach()[0]))
    with torch.no_grad():
        for record in _examples(ctx, task):
            model(**{k: v for k, v in _batch(ctx, record).items() if k != "labels"})
    handle.remove()
    x = torch.cat(seen).double()
    return x.T @ x / x.shape[0]


def test_fisher_entry_is_the_fisher_weighted_mean(lora_ctx):
    ctx = lora_ctx
    base, models = expert_states(ctx)
    name = next(k for k in base if "v_proj" in k)
    fishers = [_hand_fisher(ctx, t, name).clamp(min=1e-8) for t in LIBRARY]
    want = (fishers[0] * models[0][name] + fishers[1] * models[1][name]) / (fishers[0] + fishers[1])
    merged = dict(entries.ENTRIES["fisher_diag"][0](ctx).model_for(LIBRARY[0]).named_parameters())[name]
    stats = mats.library_stats(ctx, "fisher")
    for s, f in zip(stats, fishers):
        assert torch.allclose(s["fisher"][name].clamp(min=1e-8), f, rtol=1e-4, atol=1e-9)
    assert torch.allclose(merged, want, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(merged, (models[0][name] + models[1][name]) / 2, atol=1e-6)  # not the mean


def test_true_fisher_samples_classification_answers_and_falls_back_on_generative_tasks(lora_ctx):
    stats = mats.library_stats(lora_ctx, "true_fisher")
    assert [s["info"]["true_fisher"] for s in stats] == [True, False]
    assert [s["info"]["fallback"] for s in stats] == [False, True]
    empirical = mats.library_stats(lora_ctx, "fisher")
    name = next(iter(stats[1]["fisher"]))
    assert torch.equal(stats[1]["fisher"][name], empirical[1]["fisher"][name])
    note = entries.ENTRIES["fisher_diag_true"][0](lora_ctx).note
    assert note == "empirical Fisher for the generative tasks ['code_name']"


def test_regmean_entry_is_the_closed_form_on_one_layer(lora_ctx):
    ctx = lora_ctx
    base, models = expert_states(ctx)
    name = next(k for k in base if "q_proj" in k)
    module = name.removesuffix(".weight")
    grams = [_hand_gram(ctx, t, module) for t in LIBRARY]
    stats = mats.library_stats(ctx, "grams")
    for s, g in zip(stats, grams):
        assert torch.allclose(s["input_gram"][module].double(), g, rtol=1e-4, atol=1e-6)
    rhs = sum(g @ m[name].double().T for g, m in zip(grams, models))
    want = torch.linalg.solve(grams[0] + grams[1], rhs).T
    merged = dict(
        entries.ENTRIES["regmean"][0](ctx, model_lambda=1.0).model_for(LIBRARY[0]).named_parameters()
    )
    assert torch.allclose(merged[name].double(), want, rtol=1e-3, atol=1e-5)
    # λ = 0 keeps only the Grams' diagonals: a per-input-dimension weighted mean of the experts
    d = [torch.diagonal(g) for g in grams]
    want0 = (d[0] * models[0][name].double() + d[1] * models[1][name].double()) / (d[0] + d[1])
    merged0 = dict(
        entries.ENTRIES["regmean"][0](ctx, model_lambda=0.0).model_for(LIBRARY[0]).named_parameters()
    )
    assert torch.allclose(merged0[name].double(), want0, rtol=1e-4, atol=1e-6)


def test_layer_groups_split_at_transformer_layers():
    names = ["model.embed_tokens.weight", "model.layers.0.a.weight", "model.layers.1.a.weight"]
    names += ["model.layers.0.b.weight", "model.layers.10.a.weight", "model.norm.weight", "lm_head.weight"]
    assert mats.layer_groups(names) == [
        ["model.embed_tokens.weight"],
        ["model.layers.0.a.weight", "model.layers.0.b.weight"],
        ["model.layers.1.a.weight"],
        ["model.layers.10.a.weight"],
        ["model.norm.weight"],
        ["lm_head.weight"],
    ]


@pytest.mark.parametrize(
    ("method", "kind", "hparams"),
    [
        ("conjugate_gradient", "grams", {"objective": "kfac", "num_iterations": 20}),
        ("conjugate_gradient", "grams", {"objective": "regmean", "num_iterations": 20}),
        ("regmean", "grams", {"model_lambda": 0.9}),
        ("diagonal_fisher", "fisher", {"model_lambda": 0.5}),
    ],
)
def test_layer_by_layer_merge_equals_one_call_over_every_parameter(full_ctx, method, kind, hparams):
    from projects.mats.methods import METHODS

    base, models = expert_states(full_ctx)
    groups = mats.layer_groups(list(base))
    assert len(groups) > 2 and any(len(g) > 1 for g in groups)  # embeddings, the layer(s), the final norm
    stats = [{k: v for k, v in s.items() if k != "info"} for s in mats.library_stats(full_ctx, kind)]
    extra = {}
    if method == "conjugate_gradient":  # a merged initialisation, cut per layer
        extra["initialization"] = METHODS["task_arithmetic"](base, models, model_lambda=0.3)
    whole = METHODS[method](base, models, stats=stats, **hparams, **extra)
    by_layer = mats.merge_by_layer(full_ctx, method, kind, **hparams, **extra)
    assert by_layer.keys() == whole.keys()
    assert all(torch.allclose(by_layer[k], whole[k], rtol=1e-5, atol=1e-7) for k in whole)


def test_statistics_read_the_validation_records_only(lora_ctx, tmp_path, monkeypatch):
    monkeypatch.setenv("MOERGING_CACHE", str(tmp_path))  # nothing cached: every statistic is computed here
    ctx = dataclasses.replace(lora_ctx, cache={})
    seen = []
    for fn in ("fisher", "gram_matrices"):
        real = getattr(mats.metadata, fn)

        def record(model, tokenizer, examples, *args, _real=real, _fn=fn, **kwargs):
            seen.append((_fn, [ex["question"] for ex in examples]))
            return _real(model, tokenizer, examples, *args, **kwargs)

        monkeypatch.setattr(mats.metadata, fn, record)
    for kind in ("fisher", "true_fisher", "grams"):
        mats.library_stats(ctx, kind)
    validation = [[r["source"] for r in zoo.splits(t, MICRO)["validation"]] for t in LIBRARY]
    assert seen == [
        ("fisher", validation[0]),
        ("fisher", validation[1]),
        ("fisher", validation[0]),
        ("fisher", validation[1]),
        ("gram_matrices", validation[0]),
        ("gram_matrices", validation[1]),
    ]
    train = {r["source"] for t in LIBRARY for r in zoo.splits(t, MICRO)["train"]}
    assert train.isdisjoint(q for _, qs in seen for q in qs)
    assert all(s["info"]["split"] == "validation" for s in mats.library_stats(ctx, "grams"))
    # cached per expert: a second context computes nothing
    monkeypatch.setattr(mats.metadata, "fisher", lambda *a, **k: pytest.fail("recomputed"))
    mats.library_stats(dataclasses.replace(lora_ctx, cache={}), "fisher")


def test_mats_cg_starts_from_the_task_arithmetic_model_chosen_on_validation(lora_ctx):
    ctx = dataclasses.replace(lora_ctx, cache={})
    candidate = entries.ENTRIES["mats_cg"][0](ctx)
    chosen = run.run_entry(ctx, "task_arithmetic", ())["hparams"]["model_lambda"]
    assert ctx.cache["mats_init_task_arithmetic"][0]["model_lambda"] == chosen
    assert candidate.note.startswith(f"kfac objective, from task arithmetic λ={chosen}, 100 iterations")


def test_mats_cg_from_regmean_starts_cg_from_the_regmean_merge_chosen_on_validation(lora_ctx, monkeypatch):
    ctx = dataclasses.replace(lora_ctx, cache={})
    chosen = run.run_entry(ctx, "regmean", ())["hparams"]
    regmean = mats.merge_by_layer(ctx, "regmean", "grams", **chosen)
    seen = {}
    real = mats.merge_by_layer

    def spy(ctx, method, kind, **hparams):
        if method == "conjugate_gradient":
            seen.update(kind=kind, objective=hparams["objective"], init=hparams["initialization"])
        return real(ctx, method, kind, **hparams)

    monkeypatch.setattr(mats, "merge_by_layer", spy)
    candidate = entries.ENTRIES["mats_cg_from_regmean"][0](ctx)
    assert (seen["kind"], seen["objective"]) == ("grams", "kfac")  # the same system as mats_cg
    assert seen["init"].keys() == regmean.keys()
    assert all(torch.equal(seen["init"][k], regmean[k]) for k in regmean)
    assert candidate.note.startswith(
        f"kfac objective, from regmean λ={chosen['model_lambda']}, 100 iterations"
    )
    assert (
        "mats_cg_from_regmean" in run.ZOO_ENTRIES["full"]
        and "mats_cg_from_regmean" not in run.ZOO_ENTRIES["ia3"]
    )


def test_leaderboard_adapter_flag_picks_the_zoo(tmp_path):
    assert run.ADAPTER_ZOOS["full"] == (zoo.FULL, zoo.MERGE_TASKS, ())
    assert run.ADAPTER_ZOOS["ia3"] == (zoo.IA3, zoo.MERGE_TASKS, ())  # in-distribution only, as the paper
    assert run.ADAPTER_ZOOS["lora"] == (zoo.DEFAULT, zoo.LIBRARY, zoo_tasks.HELD_OUT)
    # the subset's multitask upper bound: one expert trained on exactly those tasks
    for settings in (zoo.IA3, zoo.FULL):
        assert zoo.multitask_name(zoo.MERGE_TASKS, settings) == zoo.group_name(zoo.MERGE_TASKS)
        assert zoo.group_members(zoo.multitask_name(zoo.MERGE_TASKS, settings)) == tuple(
            sorted(zoo.MERGE_TASKS)
        )
        assert zoo.multitask_name(list(reversed(zoo.LIBRARY)), settings) == zoo.MULTITASK
    assert zoo.multitask_name(zoo.MERGE_TASKS, zoo.DEFAULT) == zoo.MULTITASK  # the LoRA zoo's, whole library
    with pytest.raises(SystemExit, match=r"run `python -m common.zoo --adapter full` first"):
        run.main(["--adapter", "full", "--seeds", "7", "--entries", "base", "--out", str(tmp_path)])


@pytest.mark.parametrize("adapter", ["lora", "ia3", "full"])
def test_each_zoo_runs_its_own_entries_into_its_own_folder_by_default(adapter, monkeypatch):
    calls = {}
    monkeypatch.setattr(run, "run", lambda seeds, names, out, *a: calls.update(names=tuple(names), out=out))
    monkeypatch.setattr(run, "publish", lambda out, md: calls.update(published=out, results_md=md) or "")
    run.main(["--adapter", adapter, "--seeds", "0"])
    assert calls["names"] == run.ZOO_ENTRIES[adapter]
    expected = Path("results/leaderboard") if adapter == "lora" else Path("results/leaderboard", adapter)
    assert calls["out"] == calls["published"] == expected
    assert (calls["results_md"] is None) == (
        adapter != "lora"
    )  # RESULTS.md's section is written with the LoRA zoo's run
    run.main(["--adapter", adapter, "--seeds", "0", "--entries", "base", "ties"])
    assert calls["names"] == ("base", "ties")


# --- SCALE=real: table.sh's commands and the table from the leaderboard's results --------------------------


def test_real_table_from_the_leaderboard_results(lora_ctx, tmp_path):
    from common.io import read_json, write_json
    from projects.mats import analyze

    board = tmp_path / "leaderboard"
    results = run.run([0], ["uniform", "mats_cg"], board, MICRO, LIBRARY, ("language_id_union",))
    for r in results:  # a second seed, 10 points higher, to check mean ± std
        write_json(
            board / "seed_1" / f"{r['entry']}.json", {**r, "in_distribution": r["in_distribution"] + 0.1}
        )
    analyze.main(
        ["--runs", str(tmp_path / "runs"), "--scale", "real", "--leaderboard", f"full_model={board}"]
    )
    seed0 = read_json(tmp_path / "runs" / "real" / "full_model" / "seed0" / "results.json")
    mats_cg = next(r for r in results if r["entry"] == "mats_cg")
    assert seed0["metrics"]["mats"] == mats_cg["in_distribution"]
    assert seed0["per_task"]["mats"] == {t: mats_cg["test"][t] for t in LIBRARY}  # held-out tasks left out
    from common.results_md import load_results

    found = load_results(tmp_path / "runs", "real")  # the schema RESULTS.md reads; paper.yaml's real claims
    assert [(r["experiment"], r["seed"]) for r in found] == [("real_full_model", 0), ("real_full_model", 1)]
    table = (tmp_path / "runs" / "real" / "table.md").read_text()
    mean = 100 * (mats_cg["in_distribution"] + 0.05)
    row = next(line for line in table.splitlines() if line.startswith("| MaTS "))
    assert f"{mean:.1f} ± 7.1 (n=2)" in row
    assert "Rouge-L" in table and "CG, RegMean objective" not in table  # extra rows only where present
    with pytest.raises(analyze.UserError, match="holds no seed_<s>/ results"):
        analyze.from_leaderboard(tmp_path / "empty", "ia3", tmp_path / "runs")


def test_table_sh_real_runs_the_zoos_then_valid_leaderboard_entries(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "projects" / "mats" / "table.sh"
    out = subprocess.run(
        ["bash", str(script)],
        env={**os.environ, "SCALE": "real", "PY": "echo"},
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout.splitlines()
    assert out[:2] == ["-m common.zoo --adapter ia3 --seeds 0 1", "-m common.zoo --adapter full --seeds 0 1"]
    assert out[2:4] == [
        "-m leaderboard.run --adapter ia3 --seeds 0 1",
        "-m leaderboard.run --adapter full --seeds 0 1",
    ]
    # ... whose default entries are MaTS's table: every merge, RegMean only where it is defined
    boards = {a: set(run.ZOO_ENTRIES[a]) for a in ("ia3", "full")}
    assert all(b <= set(entries.ENTRIES) for b in boards.values())
    assert set(MATS_ENTRIES) - NOT_FOR_IA3 <= boards["ia3"] and not NOT_FOR_IA3 & boards["ia3"]
    assert set(MATS_ENTRIES) <= boards["full"] and {"oracle", "multitask", "uniform"} <= boards["full"]
    assert not boards["full"] & {"arrow", "phatgoose", "smile"}  # routing is the LoRA zoo's question
    # the LoRA zoo runs every entry but the merges that need statistics (hours per seed there; --entries)
    assert set(run.ZOO_ENTRIES["lora"]) == set(entries.ENTRIES) - set(run.STATISTICS_MERGES)
    assert set(run.STATISTICS_MERGES) <= boards["full"] and {"ties", "task_arithmetic"} <= set(
        run.ZOO_ENTRIES["lora"]
    )
    assert out[4:6] == [
        "-m leaderboard.fisher_mass --adapter ia3 --seeds 0 1",
        "-m leaderboard.fisher_mass --adapter full --seeds 0 1",
    ]
    assert out[6].startswith("-m projects.mats.analyze --runs runs/mats --scale real --leaderboard")
