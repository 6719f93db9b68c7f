"""The mbc_arrow real arm on a micro zoo: Arrow over adapter folders (hand-computed routing), MBC clusters of
zoo experts, the leaderboard entries end to end, the routing report per layer depth and analyze --real."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from common import zoo
from common.adapters import LoraFactors
from common.cache import cache_root
from leaderboard import entries, run
from leaderboard import mbc_arrow as lb_mbc_arrow
from projects.mbc_arrow import analyze, arrow_probe, real
from projects.mbc_arrow.expert_model import MultiExpertModel
from projects.mbc_arrow.routing_analysis import depth_of, layer_shares, own_share
from tests.test_leaderboard import expected_hparams
from tests.test_zoo import MICRO

LIBRARY = ("breast_cancer", "champ_category", "sentiment_airline", "language_id_a")
HELD_OUT = ("language_id_union",)


# --- Arrow with hand-made experts ------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2, bias=False)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0].proj(x)


def _toy_arrow(top_k: int) -> MultiExpertModel:
    # Both experts have A = [e1; e2]; B decides ΔW's top right singular vector: diag(3, 1) -> e1, diag(1, 3) -> e2.
    A = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    experts = {
        "first": {"layers.0.proj": LoraFactors(A, torch.diag(torch.tensor([3.0, 1.0])), 0.5)},
        "second": {"layers.0.proj": LoraFactors(A, torch.diag(torch.tensor([1.0, 3.0])), 0.5)},
    }
    toy = _Toy()
    with torch.no_grad():
        toy.layers[0].proj.weight.copy_(torch.arange(6.0).reshape(2, 3))
    return MultiExpertModel.from_factors(
        (toy, None),
        experts,
        {"first": ["a"], "second": ["b"]},
        {"name": "arrow", "top_k": top_k},
        base_model="toy",
    )


def test_arrow_sends_a_token_to_the_expert_with_the_largest_abs_projection_on_its_prototype():
    model = _toy_arrow(top_k=1)
    W = torch.arange(6.0).reshape(2, 3)
    dW = {
        0: 0.5 * torch.tensor([[3.0, 0, 0], [0, 1.0, 0]]),
        1: 0.5 * torch.tensor([[1.0, 0, 0], [0, 3.0, 0]]),
    }
    # prototypes ±e1 (first) and ±e2 (second): |x·p| = (|x1|, |x2|)
    protos = model.layers()["layers.0.proj"].protos
    assert torch.allclose(protos.abs(), torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), atol=1e-6)
    for x, chosen in (([1.0, 2.0, 0.0], 1), ([-3.0, 1.0, 5.0], 0), ([0.5, -0.75, 9.0], 1)):
        x = torch.tensor(x)
        assert torch.allclose(model.model(x[None]), (W @ x + dW[chosen] @ x)[None], atol=1e-5)


def test_arrow_top_2_weights_the_experts_by_the_softmax_of_their_abs_projections():
    model = _toy_arrow(top_k=2)
    x = torch.tensor([1.0, 2.0, 0.0])
    w = torch.softmax(torch.tensor([1.0, 2.0]), 0)  # logits |x·p| = 1, 2
    A = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    # mttl's parameter mixing: (Σ w s B)(Σ w A) x
    B = w[0] * 0.5 * torch.diag(torch.tensor([3.0, 1.0])) + w[1] * 0.5 * torch.diag(torch.tensor([1.0, 3.0]))
    want = torch.arange(6.0).reshape(2, 3) @ x + B @ ((w[0] + w[1]) * A) @ x
    assert torch.allclose(model.model(x[None])[0], want, atol=1e-5)


def test_genknowsub_subtracts_the_general_experts_mean_factors():
    a = {"m": LoraFactors(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0]]), 2.0)}
    g1 = {"m": LoraFactors(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0]]), 1.0)}
    g2 = {"m": LoraFactors(torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0]]), 1.0)}
    (out,) = real.genknowsub([a], [g1, g2])
    assert torch.equal(out["m"].A, torch.tensor([[0.5, 1.0]])) and torch.equal(
        out["m"].B, torch.tensor([[1.5]])
    )
    assert out["m"].scaling == 2.0


def test_depth_of_reads_the_block_index():
    assert depth_of("model.layers.12.self_attn.q_proj") == 12
    assert depth_of("transformer.h.3.attn.c_attn") == 3
    with pytest.raises(ValueError, match="lm_head"):
        depth_of("lm_head")


# --- the micro zoo ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ctx():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(real, "EXPERTS_PER_CLUSTER", 2)  # 4 micro experts -> 2 clusters
        for task in LIBRARY:
            zoo.expert(task, 0, MICRO)
        zoo.multitask(0, MICRO)
        real.train_clusters([0], MICRO, LIBRARY)
        yield run.context(0, MICRO, LIBRARY)


def test_mbc_clusters_of_zoo_experts_are_deterministic_and_group_identical_experts(ctx, tmp_path):
    experts = dict(ctx.experts)
    copy = tmp_path / "copy_of_champ"
    shutil.copytree(experts["champ_category"], copy)
    experts["champ_copy"] = copy
    first = real.zoo_clusters(experts, k=2)
    assert sorted(t for ts in first.values() for t in ts) == sorted(experts)
    assert any({"champ_category", "champ_copy"} <= set(ts) for ts in first.values())
    shutil.rmtree(cache_root() / "mbc_clusters")  # recomputed, not read back
    assert real.zoo_clusters(experts, k=2) == first
    clusters = real.zoo_clusters(ctx.experts)  # the entries' k: ceil(4 / 2) under the fixture's setting
    assert len(clusters) == 2 and sorted(t for ts in clusters.values() for t in ts) == sorted(LIBRARY)


def test_missing_cluster_experts_are_refused_with_the_command():
    clusters = {"cluster_0": ["breast_cancer", "champ_category"], "cluster_1": ["sentiment_airline"]}
    with pytest.raises(SystemExit, match=r"python -m projects\.mbc_arrow\.real clusters --seeds 5"):
        real.cluster_experts(clusters, 5, MICRO)  # seed 5 was never trained; nothing is trained here


def test_arrow_over_one_expert_is_that_expert(ctx):
    task = "champ_category"
    routed = real.arrow_model(ctx.base, ctx.tokenizer, {task: ctx.experts[task]}, {task: [task]}, top_k=1)
    expert = entries.with_adapter(ctx, ctx.experts[task])
    batch = ctx.tokenizer(["Which area: integrals of x squared"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(routed.model(**batch).logits, expert(**batch).logits, atol=1e-4)
        # GenKnowSub against the library's own mean: a lone expert minus itself is no update at all
        gks = real.arrow_model(
            ctx.base, ctx.tokenizer, {task: ctx.experts[task]}, {task: [task]}, top_k=1, gks="mean"
        )
        assert torch.allclose(gks.model(**batch).logits, ctx.base(**batch).logits, atol=1e-5)


def test_mbc_arrow_entries_run_end_to_end(ctx, tmp_path):
    names = ["base", "oracle", "uniform", "arrow", "arrow_gks", "mbc_oracle", "mbc_uniform", "mbc_arrow"]
    results = {r["entry"]: r for r in run.run([0], names, tmp_path / "lb", MICRO, LIBRARY, HELD_OUT)}
    clusters, experts = lb_mbc_arrow._mbc(ctx)
    for name in ("arrow", "arrow_gks", "mbc_arrow"):
        assert [s["hparams"]["top_k"] for s in results[name]["search"]] == [1, 2, 4]
        assert results[name]["hparams"] == expected_hparams(results[name]["search"])
        assert set(results[name]["test"]) == {*LIBRARY, *HELD_OUT}
    assert results["arrow"]["params_vs_base"] > results["mbc_arrow"]["params_vs_base"] > 1.0
    # mbc_oracle: each library task scored with its cluster's expert, no held-out answer
    assert set(results["mbc_oracle"]["test"]) == set(LIBRARY)
    cluster_of = {t: c for c, ts in clusters.items() for t in ts}
    records = zoo.splits("sentiment_airline", MICRO)["test"]
    own = entries.with_adapter(ctx, experts[cluster_of["sentiment_airline"]])
    assert results["mbc_oracle"]["test"]["sentiment_airline"] == zoo.score(
        own, ctx.tokenizer, records, MICRO.max_new_tokens
    )
    # mbc_uniform: the mean of the two cluster experts' weights
    merged = dict(entries.ENTRIES["mbc_uniform"][0](ctx).model_for("breast_cancer").named_parameters())
    a, b = (dict(entries.with_adapter(ctx, p).named_parameters()) for p in experts.values())
    name = next(n for n in merged if "v_proj" in n)
    assert torch.allclose(merged[name].float(), (a[name].float() + b[name].float()) / 2, atol=1e-6)

    # analyze --real reads them back into the project's table
    text = analyze.main_real(tmp_path / "real", tmp_path / "lb", routing=False, settings=MICRO, tasks=LIBRARY)
    assert all(f"| {e} |" in text for e in names)


def test_routing_report_shares_sum_to_one_per_layer(ctx, tmp_path):
    text = analyze.main_real(
        tmp_path / "real", _leaderboard(tmp_path), routing=True, seeds=[0], settings=MICRO, tasks=LIBRARY
    )
    report = json.loads((tmp_path / "real" / "seed_0" / "routing.json").read_text())
    again = analyze.seed_routing(tmp_path / "real", 0, MICRO, LIBRARY)  # reused, not recomputed
    assert again == report
    n_depth = zoo.load_base(MICRO)[0].config.num_hidden_layers
    private, mbc = report["libraries"]["private"], report["libraries"]["mbc"]
    assert private["experts"] == list(LIBRARY) and len(mbc["experts"]) == 2
    for lib in (private, mbc):
        for row in lib["tasks"].values():
            shares = torch.tensor(row["shares"])
            assert shares.shape == (n_depth, len(lib["experts"]))
            assert torch.allclose(shares.sum(-1), torch.ones(n_depth, dtype=shares.dtype))
    for task, row in private["tasks"].items():
        assert all(e <= c + 1e-12 for e, c in zip(row["own_expert"], row["own_cluster"]))
        assert row["own_expert"] == [s[LIBRARY.index(task)] for s in row["shares"]]
    assert "tokens routed to their own" in text
    for name in analyze.ROUTING_MAPS:
        assert (tmp_path / "real" / f"{name}.png").is_file() and (
            tmp_path / "real" / f"{name}.json"
        ).is_file()


def _leaderboard(tmp_path: Path) -> Path:
    out = tmp_path / "lb"
    run.run([0], ["base"], out, MICRO, LIBRARY, HELD_OUT)
    return out


def test_layer_shares_and_own_share_by_hand():
    counts = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 2.0]], dtype=torch.float64)
    shares = layer_shares(counts)
    assert shares.tolist() == [[0.75, 0.25, 0.0], [0.0, 0.0, 0.0], [0.25, 0.25, 0.5]]
    assert own_share(shares, [0, 2]) == [0.75, 0.0, 0.75]


def test_table_sh_real_branch_names_registered_entries_and_commands():
    script = (Path(__file__).resolve().parents[2] / "projects" / "mbc_arrow" / "table.sh").read_text()
    branch = script.split('if [ "$SCALE" = real ]; then', 1)[1].split("fi", 1)[0]
    listed = re.search(r"--entries ([\w ]+?) --seeds", branch).group(1).split()
    assert set(listed) <= set(entries.ENTRIES) and set(listed) <= set(analyze.REAL_ENTRIES)
    assert "projects.mbc_arrow.real clusters --seeds 0 1" in branch and "analyze --real" in branch
    probed = re.search(r"for v in ([\w ]+?); do", branch).group(1).split()
    for variant in probed:  # every probe variant the script runs is one the probe accepts
        arrow_probe.variant_settings(variant)
    assert {"base", "init_task", "gks_multitask"} <= set(probed) and "real probe --seed 0" in branch


def test_real_cli_refuses_an_unknown_task(capsys):
    from common.cli import run_main

    assert run_main(real.main, ["clusters", "--seeds", "0", "--tasks", "sentiment_airlines"]) == 2
    assert "sentiment_airlines" in capsys.readouterr().err


def test_analyze_real_without_leaderboard_results_names_the_command(tmp_path, capsys):
    from common.cli import run_main

    assert (
        run_main(analyze.main, ["--real", "--leaderboard", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    )
    assert "python -m leaderboard.run --entries" in capsys.readouterr().err


def test_real_results_write_results_json_with_the_gap_arrow_closes(tmp_path):
    scores = {  # seed -> entry -> (in-distribution, held-out)
        0: {"uniform": (0.2, 0.1), "oracle": (0.6, None), "arrow": (0.5, 0.3), "base": (0.1, 0.2)},
        1: {"uniform": (0.4, 0.1), "oracle": (0.8, None), "arrow": (0.5, 0.1), "base": (0.1, 0.2)},
    }
    for seed, by_entry in scores.items():
        for entry, (ins, held) in by_entry.items():
            record = {
                "entry": entry,
                "seed": seed,
                "in_distribution": ins,
                "held_out": held,
                "hparams": {},
                "params_vs_base": 1.0,
                "zoo_settings": {},
                "provenance": {},
            }
            (tmp_path / "lb" / f"seed_{seed}").mkdir(parents=True, exist_ok=True)
            (tmp_path / "lb" / f"seed_{seed}" / f"{entry}.json").write_text(json.dumps(record))
    text = analyze.real_results(tmp_path / "lb", tmp_path / "out")
    saved = [json.loads((tmp_path / "out" / f"seed_{s}" / "results.json").read_text()) for s in (0, 1)]
    assert [r["metrics"]["arrow"]["gap_closed"] for r in saved] == pytest.approx([0.75, 0.25])
    assert saved[0]["metrics"]["oracle"] == {"in_distribution": 0.6}  # no held-out answer, no key
    assert {(r["project"], r["experiment"], r["scale"]) for r in saved} == {("mbc_arrow", "zoo", "real")}
    assert "| arrow | 2 | 50.0 ± 0.0 | 20.0 ± 14.1 |" in text
    assert "closes (in distribution): 50.0 ± 35.4 %" in text


def test_delta_cosine_matches_the_dense_updates_and_ignores_the_lora_basis():
    from projects.mbc_arrow.clustering import delta_cosine

    g = torch.Generator().manual_seed(0)

    def expert():
        return {
            m: LoraFactors(torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g), s)
            for m, s in (("a", 0.5), ("b", 2.0))
        }

    experts = [expert() for _ in range(3)]
    R = torch.tensor([[2.0, 1.0], [0.0, 0.5]])  # the same ΔW from another basis: A' = R A, B' = B R⁻¹
    experts.append(
        {m: LoraFactors(R @ f.A, f.B @ torch.linalg.inv(R), f.scaling) for m, f in experts[0].items()}
    )
    dense = torch.stack([torch.cat([e[m].delta().flatten() for m in ("a", "b")]) for e in experts]).double()
    dense = dense / dense.norm(dim=1, keepdim=True)
    C = torch.from_numpy(delta_cosine(experts))
    assert torch.allclose(C, dense @ dense.T, atol=1e-6)
    assert C[0, 3] == pytest.approx(1.0, abs=1e-6)


def test_real_cli_previews_another_similarity_only_without_training(capsys):
    from common.cli import run_main

    assert run_main(real.main, ["clusters", "--seeds", "0", "--similarity", "factors"]) == 2
    assert "--dry-run" in capsys.readouterr().err


# --- the routing probes (arrow_probe) --------------------------------------------------------------

PROBE = ("breast_cancer", "champ_category", "sentiment_airline")


def test_a_cosine_by_hand():
    from projects.mbc_arrow.arrow_probe import a_cosine

    def expert(*rows):
        return {"m": LoraFactors(torch.tensor(rows), torch.ones(2, len(rows)), 1.0)}

    same, turned = expert([1.0, 0.0, 0.0]), expert([0.0, -2.0, 0.0])
    assert a_cosine([same, same]) == pytest.approx(1.0)
    assert a_cosine([same, expert([-3.0, 0.0, 0.0])]) == pytest.approx(1.0)  # |cos|: the sign is free
    assert a_cosine([same, turned]) == pytest.approx(0.0)
    # pairs (0.5 each): cos(e1, e1+e2) = 1/√2, cos(e1, -2e2) = 0, cos(e1+e2, -2e2) = 1/√2
    assert a_cosine([same, expert([1.0, 1.0, 0.0]), turned]) == pytest.approx(2**0.5 / 3)
    # two-row A flattened, and the mean over modules
    two = [{"m": f["m"], "n": expert([1.0, 0.0, 0.0], [0.0, 1.0, 0.0])["m"]} for f in (same, turned)]
    two[1]["n"] = expert([0.0, 1.0, 0.0], [1.0, 0.0, 0.0])["m"]  # rows swapped: flattened, orthogonal
    assert a_cosine(two) == pytest.approx(0.0)
    two[1]["n"] = two[0]["n"]
    assert a_cosine(two) == pytest.approx(0.5)  # module m: 0, module n: 1


def test_probe_variants_each_change_one_thing():
    from common.cli import UserError
    from projects.mbc_arrow.arrow_probe import variant_settings

    assert variant_settings("base", MICRO) == (MICRO, "none")
    assert variant_settings("init_task", MICRO) == (dataclasses.replace(MICRO, init="task"), "none")
    assert variant_settings("steps_300", MICRO) == (dataclasses.replace(MICRO, steps=300), "none")
    assert variant_settings("gks_mean", MICRO) == (MICRO, "mean")
    assert variant_settings("gks_multitask", MICRO) == (MICRO, "multitask")
    for bad in ("steps_0", "steps_x", "init_seed", "gks_none"):
        with pytest.raises(UserError, match="choose one of"):
            variant_settings(bad, MICRO)


def test_probe_refuses_missing_experts_with_the_command(tmp_path, monkeypatch):
    # a cache of its own: the seed-7 experts trained below must not reach other tests (phatgoose's test
    # expects the session cache to lack seed 7)
    monkeypatch.setenv("MOERGING_CACHE", str(tmp_path / "cache"))
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    settings = dataclasses.replace(MICRO, init="task")
    with pytest.raises(SystemExit, match=r"real probe --seed 7 --variant init_task --tasks breast_cancer "):
        arrow_probe.run_probe(7, "init_task", PROBE, tmp_path, settings=MICRO)
    assert not any(zoo.is_cached(t, 7, settings) for t in PROBE)  # nothing was trained
    with pytest.raises(SystemExit, match=r"\['multitask'\] of seed 7 .* --variant gks_multitask"):
        for t in PROBE:  # the experts alone do not do for GenKnowSub against the multitask expert
            zoo.expert(t, 7, MICRO)
        arrow_probe.run_probe(7, "gks_multitask", PROBE, tmp_path, settings=MICRO)
    assert not list(tmp_path.iterdir())


def test_probe_cli_refuses_untrained_real_experts_and_unknown_variants(tmp_path, capsys):
    from common.cli import run_main

    with pytest.raises(SystemExit, match=r"real probe --seed 1 --variant steps_300 --out .* --train"):
        run_main(real.main, ["probe", "--seed", "1", "--variant", "steps_300", "--out", str(tmp_path)])
    assert run_main(real.main, ["probe", "--variant", "init_random", "--out", str(tmp_path)]) == 2
    assert "init_random" in capsys.readouterr().err


def _own_share_by_hand(task_experts, tasks, own, settings):
    """Per depth, the share of `own`'s validation tokens whose |x·v_e| is largest for its own expert, with
    v_e the top right singular vector of the dense ΔW_e (SVD) and x each adapted linear's input in the
    routed model: an independent count of what the probe reports."""
    base, tok = zoo.load_base(settings)
    model = real.arrow_model(
        base, tok, task_experts, {t: [t] for t in tasks}, top_k=1, base_model=settings.base
    )
    factors = [real.zoo_factors(task_experts[t]) for t in tasks]
    layers = model.layers()
    n_depth = 1 + max(int(name.split(".")[2]) for name in layers)
    picks = torch.zeros(n_depth, len(tasks), dtype=torch.float64)
    margins = []

    def hook(name):
        protos = torch.stack([torch.linalg.svd(f[name].delta().double())[2][0] for f in factors])

        def record(_layer, args, _out):
            score = (args[0].double().reshape(-1, protos.shape[1]) @ protos.T).abs()
            top = score.topk(2, dim=-1).values
            margins.append(float((top[:, 0] - top[:, 1]).min()))
            picks[int(name.split(".")[2])] += torch.bincount(score.argmax(-1), minlength=len(tasks)).double()

        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    with torch.no_grad():
        for ex in zoo.splits(own, settings)["validation"]:
            model.model(
                **tok(ex["source"], return_tensors="pt", truncation=True, max_length=settings.max_length)
            )
    for h in handles:
        h.remove()
    return (picks[:, tasks.index(own)] / picks.sum(-1)).tolist(), min(margins)


def test_probe_end_to_end_on_a_micro_zoo(tmp_path, monkeypatch):
    records = {
        v: arrow_probe.run_probe(0, v, PROBE, tmp_path, settings=MICRO, train=True)
        for v in ("init_task", "base", "gks_mean")
    }
    record = json.loads((tmp_path / "seed_0" / "init_task.json").read_text())
    assert record == json.loads(json.dumps(records["init_task"]))
    n_depth = zoo.load_base(MICRO)[0].config.num_hidden_layers
    assert record["experts"] == list(PROBE) and record["chance"] == pytest.approx(1 / 3)
    for task, row in record["routing"].items():
        shares = torch.tensor(row["shares"])
        assert shares.shape == (n_depth, len(PROBE)) and "own_cluster" not in row  # private library only
        assert torch.allclose(shares.sum(-1), torch.ones(n_depth, dtype=shares.dtype))
        assert row["own_expert"] == [s[PROBE.index(task)] for s in row["shares"]]
        assert record["own_expert"][task] == pytest.approx(sum(row["own_expert"]) / n_depth)
    # the own share counted independently (dense-SVD prototypes, hooks on the routed model's inputs)
    settings = dataclasses.replace(MICRO, init="task")
    experts = {t: zoo.expert(t, 0, settings) for t in PROBE}
    by_hand, margin = _own_share_by_hand(experts, list(PROBE), "champ_category", settings)
    assert margin > 1e-6  # no near-tie that float rounding could flip
    assert record["routing"]["champ_category"]["own_expert"] == pytest.approx(by_hand, abs=1e-12)
    # what "competent" is judged by: the experts' own validation scores, from their expert.json
    info = json.loads((experts["breast_cancer"] / "expert.json").read_text())
    assert record["validation"]["breast_cancer"]["expert"] == info["validation"]["breast_cancer"]
    assert record["validation"]["breast_cancer"]["steps"] == MICRO.steps
    # one A per (seed, task) against the seed's shared A: the A cosine tells them apart
    assert records["base"]["a_cosine"] > 0.99 > 0.5 > records["init_task"]["a_cosine"]
    assert records["gks_mean"]["a_cosine"] == records["base"]["a_cosine"]  # the experts' own A
    assert records["gks_mean"]["key"]["gks"] == "mean" and records["gks_mean"]["experts"] == list(PROBE)
    table = (tmp_path / "probes.md").read_text()
    assert [line.split("|")[2].strip() for line in table.splitlines() if line.startswith("| 0 ")] == [
        "base",
        "init_task",
        "gks_mean",
    ]
    # a second run with the same experts reads the JSON back
    monkeypatch.setattr(real, "routing_report", lambda *a, **k: pytest.fail("routed again"))
    assert arrow_probe.run_probe(0, "init_task", PROBE, tmp_path, settings=MICRO) == record
