"""PHATGOOSE's real arm on a micro zoo: gate training (only the gates move; cached; resumed), routing by
hand-made keys against a hand computation, the four leaderboard entries end to end, and the probe."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import common.training
from common import zoo
from common.cache import cache_root, content_hash
from common.cli import UserError
from common.evaluation import generate
from common.io import read_json
from common.lm_finetune import encode_example
from leaderboard import entries, run
from projects.phatgoose import analyze, real, zoo_gates, zoo_routing
from projects.phatgoose.moe import captured_inputs, moe_modules, set_mode
from tests.test_zoo import MICRO, micro_context

LIBRARY = ("breast_cancer", "champ_category")
HELD_OUT = ("language_id_union",)
GATES = zoo_gates.GateSettings(steps=3, lr=0.1, batch_size=2, warmup_steps=0)


@pytest.fixture(scope="module")
def ctx():
    return micro_context(LIBRARY, MICRO)


@pytest.fixture(scope="module")
def gates(ctx):
    return {t: zoo_gates.load_gates(zoo_gates.gates(t, 0, MICRO, GATES)) for t in LIBRARY}


def _ln(x: torch.Tensor) -> torch.Tensor:  # LayerNorm without affine, by its formula
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-5)


# --- gates ---------------------------------------------------------------------------------------------


def test_gate_training_changes_only_the_gates(monkeypatch):
    seen = {}
    real_train = common.training.train

    def spy(model, *args, params=None, **kwargs):
        before = {n: t.detach().clone() for n, t in model.state_dict().items()}
        out = real_train(model, *args, params=params, **kwargs)
        seen["before"], seen["after"] = before, model.state_dict()
        seen["params"] = {id(p) for p in params}
        seen["gates"] = {n for n, p in model.named_parameters() if id(p) in seen["params"]}
        return out

    zoo.expert("breast_cancer", 0, MICRO)
    monkeypatch.setattr(common.training, "train", spy)
    other = dataclasses.replace(GATES, lr=0.05)  # a fresh cache entry: trained in this test
    path = zoo_gates.gates("breast_cancer", 0, MICRO, other)
    before, after = seen["before"], seen["after"]
    gate_names = seen["gates"]
    assert gate_names and all(n.endswith(".gate") for n in gate_names)
    assert len(gate_names) == len(zoo.SEVEN_PROJECTIONS)  # micro:mistral has one layer, 7 adapted linears
    for name, value in after.items():
        if name in gate_names:
            assert torch.all(before[name] == 0) and not torch.equal(value, before[name]), name
        else:
            assert torch.equal(value, before[name]), f"{name} changed"  # base weights and LoRA factors
    saved = zoo_gates.load_gates(path)
    assert {f"{m}.gate" for m in saved} == gate_names
    for m, g in saved.items():
        assert torch.equal(g, after[f"{m}.gate"].float())
    info = read_json(path / zoo_gates.INFO_FILE)
    assert info["steps"] == other.steps and info["expert"] == content_hash(
        zoo.expert_key("breast_cancer", 0, MICRO)
    )


def test_gates_are_cached_per_settings_and_never_retrained(ctx, gates, monkeypatch):
    monkeypatch.setattr(zoo_gates, "_train", lambda *a, **k: pytest.fail("trained again"))
    assert zoo_gates.is_cached("breast_cancer", 0, MICRO, GATES)
    again = zoo_gates.load_gates(zoo_gates.gates("breast_cancer", 0, MICRO, GATES))
    assert all(torch.equal(again[m], gates["breast_cancer"][m]) for m in again)
    assert not zoo_gates.is_cached("breast_cancer", 0, MICRO, dataclasses.replace(GATES, steps=4))
    assert not zoo_gates.is_cached("breast_cancer", 1, MICRO, GATES)
    with pytest.raises(SystemExit, match=r"no PHATGOOSE gates.*real gates --seeds 1"):
        zoo_gates.zoo_gates(list(LIBRARY), 1, MICRO, GATES)  # the leaderboard never trains gates
    with pytest.raises(SystemExit, match=r"lacks seed 7's breast_cancer expert"):
        zoo_gates.gates("breast_cancer", 7, MICRO, GATES)  # nor does the gates command train experts


def test_shipped_gates_fill_a_fresh_cache(ctx, gates, monkeypatch, tmp_path):
    monkeypatch.setenv("MOERGING_SHIPPED", str(tmp_path / "shipped"))
    dest = zoo_gates.shipped_path("breast_cancer", 0, MICRO, GATES)
    assert dest.parent.name.startswith("phatgoose_gates-") and dest.parent.parent.name == "seed_0"
    assert zoo_gates.ship([0], ["breast_cancer"], MICRO, GATES) == [dest]
    zoo.ship([0], MICRO)  # the expert ships beside them
    monkeypatch.setenv("MOERGING_CACHE", str(tmp_path / "fresh"))
    monkeypatch.setattr(zoo_gates, "_train", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(zoo, "_train", lambda *a, **k: pytest.fail("trained"))
    assert zoo_gates.is_cached("breast_cancer", 0, MICRO, GATES)
    assert not zoo_gates.is_cached("champ_category", 0, MICRO, GATES)  # not shipped
    copied = zoo_gates.load_gates(zoo_gates.gates("breast_cancer", 0, MICRO, GATES))
    assert copied.keys() == gates["breast_cancer"].keys()
    assert all(torch.equal(copied[m], gates["breast_cancer"][m]) for m in copied)


def test_the_repositorys_shipped_gates_are_the_current_code_s():
    """Every gate folder shipped in zoo/ carries the key the current code asks for, for the expert shipped
    beside it (else `gates` would train them anew), and sits where `shipped_path` looks."""
    from common.cache import KEY_FILE, holds

    root = Path(__file__).resolve().parents[2] / "zoo"
    entries = sorted(p.parent for p in root.glob("*/seed_*/phatgoose_gates*/*/" + KEY_FILE))
    if not entries:
        pytest.skip("no shipped gates in this checkout")
    for entry in entries:
        key = read_json(entry / KEY_FILE)
        expert_key = read_json(entry.parent.parent / key["task"] / KEY_FILE)  # the expert it gates
        settings = zoo.ZooSettings.from_key(expert_key["settings"])
        gate = zoo_gates.GateSettings(**key["gate"])
        assert holds(entry, zoo_gates.gate_key(key["task"], key["seed"], settings, gate)), entry
        assert entry == zoo_gates.shipped_path(key["task"], key["seed"], settings, gate, root)
        assert (entry / zoo_gates.GATES_FILE).is_file()


def test_an_interrupted_gate_run_resumes_to_the_uninterrupted_result(ctx, monkeypatch, tmp_path):
    settings = dataclasses.replace(GATES, steps=4, lr=0.07)
    real_train = common.training.train
    steps: list[int] = []

    class Killed(Exception):
        pass

    def killed_after_two(model, loss_fn, data, cfg, run_dir, **kwargs):
        real_train(model, loss_fn, data, dataclasses.replace(cfg, max_steps=2), run_dir, **kwargs)
        raise Killed

    def counting(*args, **kwargs):
        return real_train(*args, callbacks=[lambda step, logs: steps.append(step)], **kwargs)

    monkeypatch.setattr(common.training, "train", killed_after_two)
    with pytest.raises(Killed):
        zoo_gates.gates("champ_category", 0, MICRO, settings)
    assert not zoo_gates.is_cached("champ_category", 0, MICRO, settings)  # nothing half-made is cached
    monkeypatch.setattr(common.training, "train", counting)
    resumed = zoo_gates.load_gates(zoo_gates.gates("champ_category", 0, MICRO, settings))
    assert steps == [3, 4]  # resumed from the step-2 checkpoint

    # The same run, uninterrupted, in a cache holding only the zoo: bitwise the same gates.
    original = cache_root()
    monkeypatch.setenv("MOERGING_CACHE", str(tmp_path))
    for entry in original.iterdir():
        if not entry.name.startswith("phatgoose_"):
            (tmp_path / entry.name).symlink_to(entry)
    steps.clear()
    fresh = zoo_gates.load_gates(zoo_gates.gates("champ_category", 0, MICRO, settings))
    assert steps == [1, 2, 3, 4]
    assert fresh.keys() == resumed.keys() and all(torch.equal(fresh[m], resumed[m]) for m in fresh)


# --- routing -------------------------------------------------------------------------------------------


def _hand_keys(ctx, opposite: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    modules = zoo_routing.zoo_experts(ctx.experts)[0].A
    first = {m: torch.randn(a.shape[1], generator=g) for m, a in modules.items()}
    second = {m: (-v if opposite else torch.randn(v.shape[0], generator=g)) for m, v in first.items()}
    return dict(zip(LIBRARY, (first, second)))


@pytest.mark.parametrize("top_k", [1, 2])
def test_routing_by_hand_made_gates_matches_the_formula(ctx, top_k):
    keys = _hand_keys(ctx)
    experts = zoo_routing.zoo_experts(ctx.experts, keys)
    model = zoo_routing.routed_model(ctx.base, experts, top_k)
    for name, module in moe_modules(model).items():
        u = torch.randn(2, 5, module.A.shape[-1])
        # s_e = LN(u)·LN(g_e)/√d; top-1: the argmax expert alone; top-2 of 2: softmax over both
        s = torch.stack([_ln(u) @ _ln(keys[t][name]) for t in LIBRARY], -1) / math.sqrt(u.shape[-1])
        w = F.one_hot(s.argmax(-1), 2).float() if top_k == 1 else s.softmax(-1)
        want = module.base(u)
        for e, ex in enumerate(experts):
            want = want + w[..., e : e + 1] * ex.scaling * (u @ ex.A[name].T) @ ex.B[name].T
        assert torch.allclose(module(u), want, atol=1e-5), name
    assert s.argmax(-1).unique().numel() == 2  # both experts win some tokens: the check is not vacuous


def test_routing_shares_count_each_tokens_top_pick(ctx, monkeypatch):
    keys = _hand_keys(ctx, opposite=True)  # g_1 = -g_0: expert 0 wins exactly where LN(u)·LN(g_0) > 0
    model = zoo_routing.routed_model(ctx.base, zoo_routing.zoo_experts(ctx.experts, keys), top_k=1)
    records = zoo.splits("language_id_union", MICRO)["validation"]
    shares = zoo_routing.routing_shares(
        model, ctx.tokenizer, records, list(LIBRARY), max_length=MICRO.max_length
    )
    modules = moe_modules(model)
    wins, total = [], 0
    for r in records:
        row = encode_example(ctx.tokenizer, r["source"], r["target"], MICRO.max_length)
        with captured_inputs(modules) as inputs:
            model.model(input_ids=torch.tensor([row["input_ids"]]))
        wins.append({n: float((_ln(inputs[n][0][0]) @ _ln(keys[LIBRARY[0]][n]) > 0).sum()) for n in modules})
        total += len(row["input_ids"])
    want = sum(sum(w[n] for w in wins) / total for n in modules) / len(modules)
    assert shares["layers"] == [0] and shares["tokens"] == total
    assert shares["share"][0][0] == pytest.approx(want, abs=1e-6)
    assert sum(shares["share"][0]) == pytest.approx(1.0)


def test_example_router_matches_rows_by_longest_prefix_and_falls_back(ctx):
    model = zoo_routing.routed_model(ctx.base, zoo_routing.zoo_experts(ctx.experts, _hand_keys(ctx)))
    asked = []
    router = zoo_routing.ExampleRouter(
        model,
        [([5, 6, 7, 8], 0), ([5, 6, 9, 9], 1)],
        fallback=lambda texts: asked.extend(texts) or [1] * len(texts),
        tokenizer=ctx.tokenizer,
        min_prefix=3,
    )
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 3], [5, 6, 9, 9, 4, 4, 4], [0, 0, 0, 0, 11, 12, 13]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7, [0, 0, 0, 0, 1, 1, 1]])
    assert router.experts_for(ids, mask).tolist() == [0, 1, 1]
    assert asked == [ctx.tokenizer.decode([11, 12, 13], skip_special_tokens=True)]  # only the unknown row


def test_example_router_keeps_its_choice_on_a_decoding_step_without_a_readable_cache(ctx, monkeypatch):
    # SmolLM2's generate reached the hook with one new token per row, a mask over the whole sequence and
    # no cache the hook could measure: that step must keep the rows' experts (it raised an IndexError).
    model = zoo_routing.routed_model(ctx.base, zoo_routing.zoo_experts(ctx.experts, _hand_keys(ctx)))
    router = zoo_routing.ExampleRouter(model, [([5, 6, 7, 8], 0)], min_prefix=3)
    routed = []
    monkeypatch.setattr(
        zoo_routing, "set_example_experts", lambda m, experts: routed.append(experts.tolist())
    )
    router._route(model, (), {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4)})
    router._route(model, (), {"input_ids": torch.tensor([[3]]), "attention_mask": torch.ones(1, 5)})
    assert routed == [[0]]


# --- the leaderboard entries -----------------------------------------------------------------------------


@pytest.fixture()
def small(monkeypatch):
    from leaderboard import phatgoose as entry_module

    monkeypatch.setattr(zoo_gates, "DEFAULT", GATES)
    monkeypatch.setattr(entry_module, "RETRIEVAL_EXAMPLES", 20)
    monkeypatch.setattr(entry_module, "AVERAGE_ACTIVATION_EXAMPLES", 6)
    return entry_module


@pytest.mark.parametrize("name", ["phatgoose", "average_activation", "retrieval", "merged_experts"])
def test_entries_run_end_to_end_on_a_micro_zoo(ctx, gates, small, name):
    result = run.run_entry(ctx, name, HELD_OUT)
    assert set(result["test"]) == {*LIBRARY, *HELD_OUT}
    assert all(0.0 <= v <= 1.0 for v in result["test"].values())
    assert result["held_out"] == result["test"]["language_id_union"]
    assert result["tokens_per_s"] > 0
    if name in ("phatgoose", "average_activation"):
        assert [s["hparams"]["top_k"] for s in result["search"]] == [1, 2, 4]
        assert result["params_vs_base"] > 1.0


def test_entries_and_gates_refuse_a_zoo_of_non_lora_experts(ctx):
    ia3 = dataclasses.replace(ctx, settings=dataclasses.replace(MICRO, adapter="ia3"))
    for name in ("phatgoose", "average_activation", "retrieval", "merged_experts"):
        with pytest.raises(ValueError, match="route among LoRA experts; this zoo's adapter is 'ia3'"):
            entries.ENTRIES[name][0](ia3)
    with pytest.raises(UserError, match="adapter is 'ia3'"):
        zoo_gates.gates("breast_cancer", 0, ia3.settings, GATES)


def test_merged_experts_is_the_uniform_merge_of_the_lora_updates(ctx):
    merged = dict(entries.ENTRIES["merged_experts"][0](ctx).model_for("breast_cancer").named_parameters())
    uniform = dict(entries.ENTRIES["uniform"][0](ctx).model_for("breast_cancer").named_parameters())
    base = dict(ctx.base.named_parameters())
    name = next(n for n in base if "down_proj" in n)
    assert not torch.equal(merged[name], base[name])
    for n in merged:
        assert torch.allclose(merged[n], uniform[n], atol=1e-6), n


def test_retrieval_sends_each_example_whole_to_its_retrieved_expert(ctx, small):
    retriever = small._retriever(ctx)
    experts = zoo_routing.zoo_experts(ctx.experts)
    queries = [r for t in ("breast_cancer", "champ_category") for r in zoo.splits(t, MICRO)["validation"]]
    picks = retriever.retrieve([zoo_routing.retrieval_text(q, bool(q["choices"])) for q in queries]).tolist()
    assert set(picks) == {0, 1}  # both experts used: the check below is not vacuous
    model = zoo_routing.retrieval_model(ctx.base, ctx.tokenizer, experts, retriever, queries)
    alone = [zoo_routing.routed_model(ctx.base, experts) for _ in experts]
    for e, m in enumerate(alone):
        set_mode(m, "fixed", e)
    sources = [q["source"] for q in queries]
    together = generate(model, ctx.tokenizer, sources, 4, batch_size=len(sources), disable=True)
    for source, pick, out in zip(sources, picks, together):
        assert generate(alone[pick], ctx.tokenizer, [source], 4, disable=True) == [out]
    batch = ctx.tokenizer(sources, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
        for b, pick in enumerate(picks):
            real = batch["attention_mask"][b].bool()
            one = alone[pick](input_ids=batch["input_ids"][b : b + 1, real]).logits[0]
            pos = real.nonzero().squeeze(-1)
            assert torch.allclose(logits[b, pos], one, atol=1e-4)


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_average_activation_keys_are_the_mean_module_input_with_the_expert_alone(ctx, pool):
    experts = zoo_routing.zoo_experts(ctx.experts)
    records = {t: zoo.training_records(t, 0, MICRO)[:3] for t in LIBRARY}
    keys = zoo_routing.average_activation_keys(
        ctx.base, ctx.tokenizer, experts, records, pool=pool, max_length=MICRO.max_length, batch_size=2
    )
    for task in LIBRARY:
        merged = entries.with_adapter(ctx, ctx.experts[task])  # peft's merged expert: a reference model
        for name in ("model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj"):
            seen = []
            handle = merged.get_submodule(name).register_forward_pre_hook(
                lambda m, a, seen=seen: seen.append(a[0][0])
            )
            with torch.no_grad():
                for r in records[task]:
                    row = encode_example(ctx.tokenizer, r["source"], r["target"], MICRO.max_length)
                    merged(input_ids=torch.tensor([row["input_ids"]]))
            handle.remove()
            want = torch.stack([u.mean(0) if pool == "mean" else u[-1] for u in seen]).mean(0)
            assert torch.allclose(keys[task][name], want, atol=1e-4), (task, name)
    assert not torch.allclose(
        keys["breast_cancer"]["model.layers.0.mlp.down_proj"],
        keys["champ_category"]["model.layers.0.mlp.down_proj"],
    )


# --- the probe, the table and the CLI ----------------------------------------------------------------------


def test_probe_and_real_analysis_write_the_heat_map_table_and_results(ctx, gates, monkeypatch, tmp_path):
    from common.io import write_json
    from common.results_md import load_results, render

    monkeypatch.setattr(zoo_routing, "SKILLS", {"language_id_union": ("champ_category",)})
    result = real.probe(0, MICRO, GATES, library=LIBRARY, tasks=HELD_OUT)
    probe = result["tasks"]["language_id_union"]
    assert probe["experts"] == list(LIBRARY) and probe["skills"] == ["champ_category"]
    for row, skill in zip(probe["share"], probe["skill_share"]):
        assert sum(row) == pytest.approx(1.0) and skill == row[1]
    assert probe["skill_share_uniform"] == 0.5
    write_json(tmp_path / "real" / "seed_0" / "routing_probe.json", result)
    assert analyze.plot_real_routing(tmp_path / "real").is_file()
    heat = read_json(tmp_path / "real" / "routing_real.json")["language_id_union"]
    assert heat["share"] == probe["share"] and heat["seeds"] == [0]

    board = run.run([0], ["base", "merged_experts"], tmp_path / "lb", MICRO, LIBRARY, HELD_OUT)
    text = analyze.main_real(tmp_path / "real", tmp_path / "lb")
    assert "Merged Experts" in text and "Base model" in text and (tmp_path / "real" / "table.md").is_file()
    [record] = load_results(tmp_path / "real", scale="real")
    assert record["experiment"] == "zoo_heldout" and record["seed"] == 0
    merged = next(r for r in board if r["entry"] == "merged_experts")
    assert record["metrics"]["merged_experts"]["held_out"] == merged["held_out"]
    assert record["metrics"]["merged_experts"]["language_id_union"] == merged["test"]["language_id_union"]
    section = render([record])  # RESULTS.md: the zoo experiment and its claims from paper.yaml
    assert f"merged_experts.held_out | {merged['held_out']:.4g} (n=1)" in section
    assert "| PHATGOOSE outperforms Merged Experts (the zoo) | not run |" in section  # no phatgoose row here


def test_cli_rejects_a_task_outside_the_library():
    with pytest.raises(UserError, match=r"--tasks \['language_id_union'\] are not library tasks"):
        real.main(["gates", "--tasks", "language_id_union"])


def test_best_single_expert_picks_the_best_on_the_held_out_validation_split(ctx, monkeypatch):
    candidate = entries.ENTRIES["best_single_expert"][0](ctx)
    records = zoo.splits("language_id_union", MICRO)["validation"]
    scores = [
        zoo.score(entries.with_adapter(ctx, ctx.experts[t]), ctx.tokenizer, records, MICRO.max_new_tokens)
        for t in LIBRARY
    ]
    best = LIBRARY[scores.index(max(scores))]
    model = candidate.model_for("language_id_union")
    want = dict(entries.with_adapter(ctx, ctx.experts[best]).named_parameters())
    assert all(torch.equal(p, want[n]) for n, p in model.named_parameters())
    own = dict(candidate.model_for("champ_category").named_parameters())  # a library task: its own expert
    want = dict(entries.with_adapter(ctx, ctx.experts["champ_category"]).named_parameters())
    assert all(torch.equal(p, want[n]) for n, p in own.items())


def test_cli_trains_the_gates_that_the_leaderboard_entry_reads(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(
        zoo_gates, "train_missing", lambda seeds, tasks, gate: calls.append((seeds, tasks, gate))
    )
    real.main(["gates", "--seeds", "0", "1"])
    assert calls == [([0, 1], list(zoo.LIBRARY), zoo_gates.DEFAULT)]  # the defaults are the entry's gates
    real.main(["gates", "--seeds", "1", "--tasks", "breast_cancer", "--steps", "4", "--lr", "0.01"])
    assert calls[-1] == ([1], ["breast_cancer"], zoo_gates.GateSettings(steps=4, lr=0.01, warmup_steps=3))

    monkeypatch.setattr(real, "probe", lambda seed, **kw: {"seed": seed, "tasks": {}, **kw})
    real.main(["probe", "--seeds", "0", "--top_k", "1", "--out", str(tmp_path)])
    written = read_json(tmp_path / "seed_0" / "routing_probe.json")
    assert written["seed"] == 0 and written["top_k"] == 1 and written["split"] == "validation"
