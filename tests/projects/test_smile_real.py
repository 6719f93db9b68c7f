"""SMILE on the expert zoo (leaderboard entries `smile`, `smile_top8`; per-layer routing; the real arm's
analysis), on a micro zoo: hand-computed mixtures, honest parameter counts, shares that sum to one."""

from __future__ import annotations

import pytest
import torch

from common.adapters import load_adapter, lora_factors_from_state
from common.io import read_json, write_json
from common.results_md import aggregate, check_claim, load_results
from leaderboard import entries, run, smile_routing
from leaderboard import smile as lb_smile
from projects.smile import analyze, real_table
from projects.smile.mistral import TARGETS
from projects.smile.upscale import SmileMoELinear
from tests.test_leaderboard import expected_hparams
from tests.test_zoo import MICRO, micro_context

LIBRARY = ("breast_cancer", "champ_category")
RANK = MICRO.rank  # every LoRA delta has rank ≤ 2: k = 2 keeps it whole


@pytest.fixture(scope="module")
def ctx():
    return micro_context(LIBRARY, MICRO)


@pytest.fixture(scope="module")
def ctx_one():
    return micro_context(LIBRARY[:1])


def _ids(ctx):
    return ctx.tokenizer(["The tumour is 12.5 mm wide", "count the lines"], return_tensors="pt", padding=True)


def test_one_expert_at_its_full_rank_is_the_merged_expert(ctx_one):
    smile = lb_smile.smile_model(ctx_one, gate_k=RANK, k=RANK, top_k=1)
    expert = entries.with_adapter(ctx_one, ctx_one.experts[LIBRARY[0]])
    batch = _ids(ctx_one)
    with torch.no_grad():
        want, got, base = (m(**batch).logits for m in (expert, smile, ctx_one.base))
    assert not torch.allclose(want, base, atol=1e-4)  # the expert changed the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _factor_delta(ctx, task, module):
    saved = load_adapter(ctx.experts[task])
    return lora_factors_from_state(saved.state, saved.config)[f"base_model.model.{module}"].delta().float()


def test_upscaled_layer_is_the_hand_computed_mixture(ctx):
    """y = W0 x + Σ_j w_j ΔW_j x with w = softmax_j ‖V_j[:, :gate_k]ᵀ x‖ (top_k = T: no expert dropped)."""
    model = lb_smile.smile_model(ctx, gate_k=RANK, k=RANK, top_k=len(LIBRARY))
    module = "model.layers.0.mlp.down_proj"
    layer = model.get_submodule(module)
    assert isinstance(layer, SmileMoELinear) and layer.top_k == 2
    w0 = ctx.base.get_submodule(module).weight.detach().float()
    deltas = [_factor_delta(ctx, t, module) for t in LIBRARY]  # from the LoRA factors, not the merged weights
    x = torch.randn(7, w0.shape[1], generator=torch.Generator().manual_seed(0))
    logits = torch.stack(
        [(torch.linalg.svd(d)[2][:RANK] @ x.T).norm(dim=0) for d in deltas], dim=-1
    )  # (7, T)
    w = logits.softmax(-1)
    want = x @ w0.T + sum(w[:, j : j + 1] * (x @ d.T) for j, d in enumerate(deltas))
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # top-1: each token gets its best expert only
    lb_smile.set_top_k(model, 1)
    best = logits.argmax(-1)
    want1 = x @ w0.T + torch.stack([x[i] @ deltas[int(best[i])].T for i in range(len(x))])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want1, atol=1e-5, rtol=1e-4)


def test_parameters_are_the_base_plus_every_gate_and_expert(ctx):
    gate_k, k, n = 8, 4, len(LIBRARY)
    candidate = entries.ENTRIES["smile"][0](ctx, gate_k=gate_k, k=k, top_k=1)
    added = sum(
        n * (gate_k * m.in_features + k * (m.in_features + m.out_features))
        for name, m in ctx.base.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rpartition(".")[2] in TARGETS
    )
    assert added > 0
    assert candidate.params == run.count(ctx.base) + added
    # run_entry reports it relative to the base
    assert candidate.params / run.count(ctx.base) > 1.0


def test_expert_models_hold_the_merged_weights_and_share_the_rest(ctx):
    models = lb_smile.expert_models(ctx)
    assert list(models) == list(LIBRARY)
    merged = dict(entries.with_adapter(ctx, ctx.experts[LIBRARY[1]]).named_parameters())
    got = dict(models[LIBRARY[1]].named_parameters())
    name = "model.layers.0.self_attn.v_proj.weight"
    torch.testing.assert_close(got[name].float(), merged[name].float(), atol=1e-6, rtol=0)
    embed = "model.embed_tokens.weight"
    assert got[embed].data_ptr() == dict(ctx.base.named_parameters())[embed].data_ptr()  # not copied


def test_experts_without_weight_deltas_are_refused(ctx):
    import dataclasses

    ia3 = dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, adapter="ia3"), cache={})
    with pytest.raises(ValueError, match="'ia3' experts have none"):
        lb_smile.expert_models(ia3)


def test_top_k_candidates_share_one_upscaling_and_keep_their_own_top_k(ctx):
    fn = entries.ENTRIES["smile"][0]
    one, two = fn(ctx, gate_k=8, k=4, top_k=1), fn(ctx, gate_k=8, k=4, top_k=2)
    m2 = two.model_for(LIBRARY[0])
    m1 = one.model_for(LIBRARY[0])
    assert m1 is m2  # the same upscaled model
    assert {m.top_k for m in m1.modules() if isinstance(m, SmileMoELinear)} == {1}
    assert {m.top_k for m in two.model_for(LIBRARY[1]).modules() if isinstance(m, SmileMoELinear)} == {2}
    with pytest.raises(ValueError, match="top_k must be in"):
        lb_smile.set_top_k(m1, 3)


def test_smile_entries_run_in_the_leaderboard(ctx):
    result = run.run_entry(ctx, "smile", ())
    grid = entries.ENTRIES["smile"][1]
    assert len(result["search"]) == len(grid["gate_k"]) * len(grid["k"]) * len(grid["top_k"])
    assert result["hparams"] == expected_hparams(result["search"])
    assert result["params_vs_base"] > 1.0 and set(result["test"]) == set(LIBRARY)
    top8 = run.run_entry(ctx, "smile_top8", ())
    assert [s["hparams"] for s in top8["search"]] == [{"gate_k": 8, "k": 8}]


def test_routing_shares_sum_to_one_per_layer(ctx, ctx_one):
    out = smile_routing.smile_routing(ctx, {"gate_k": 8, "k": 4, "top_k": 1}, n=2)
    assert out["experts"] == list(LIBRARY) and out["chance"] == 0.5
    for task in LIBRARY:
        layers = out["routing"][task]["by_layer"]
        assert list(layers) == ["0"]  # the micro model has one decoder layer
        assert sum(layers["0"]) == pytest.approx(1.0)
        assert out["own_share_by_layer"][task] == [layers["0"][LIBRARY.index(task)]]
    # one layer: the per-layer shares are the all-layer shares
    assert out["routing"][LIBRARY[0]]["by_layer"]["0"] == pytest.approx(out["routing"][LIBRARY[0]]["all"])
    single = smile_routing.smile_routing(ctx_one, {"gate_k": 2, "k": 2, "top_k": 1}, n=2)
    assert single["own_share_by_layer"] == {LIBRARY[0]: [1.0]}  # one expert gets every token


def _result(entry, seed, in_dist, params, search=(), held_out=None):
    return {
        "entry": entry,
        "seed": seed,
        "hparams": search[0]["hparams"] if search else {},
        "search": list(search),
        "test": {},
        "in_distribution": in_dist,
        "held_out": held_out,
        "params_vs_base": params,
    }


def _fake_leaderboard(root, with_top8=True):
    for seed, shift in ((0, 0.0), (1, 0.02)):
        smile_search = [
            {"hparams": {"gate_k": 8, "k": 8, "top_k": t}, "validation": v + shift}
            for t, v in ((1, 0.7), (2, 0.68), (4, 0.66))
        ]
        results = [
            _result("oracle", seed, 0.80 + shift, 1.02),
            _result("smile", seed, 0.78 + shift, 1.3, smile_search),
            _result(
                "task_arithmetic", seed, 0.60, 1.0, [{"hparams": {"model_lambda": 0.3}, "validation": 0.6}]
            ),
            _result("uniform", seed, 0.55, 1.0),
        ]
        if with_top8:
            results.append(
                _result(
                    "smile_top8", seed, 0.7, 1.3, [{"hparams": {"gate_k": 8, "k": 8}, "validation": 0.62}]
                )
            )
        for r in results:
            write_json(root / f"seed_{seed}" / f"{r['entry']}.json", r)
        write_json(
            root / real_table.ROUTING / f"seed_{seed}.json",
            {
                "seed": seed,
                "hparams": {"gate_k": 8, "k": 8, "top_k": 1},
                "chance": 0.5,
                "own_share_by_layer": {"breast_cancer": [0.5, 0.9 - shift], "champ_category": [0.3, 0.7]},
            },
        )


def test_real_analysis_writes_plots_with_data_and_the_claims_metrics(tmp_path):
    board, runs, out = tmp_path / "lb", tmp_path / "runs", tmp_path / "table"
    _fake_leaderboard(board)
    analyze.main([f"runs={runs}", f"out={out}", f"leaderboard={board}"])
    heat = read_json(out / "real_zoo" / "real_routing_own_share.json")
    assert (out / "real_zoo" / "real_routing_own_share.png").is_file()
    assert heat["tasks"] == ["breast_cancer", "champ_category"] and heat["layers"] == [0, 1]
    assert heat["share"][0] == pytest.approx([0.5, 0.89])  # mean over the two seeds
    points = {p["entry"]: p for p in read_json(out / "real_zoo" / "real_params_vs_accuracy.json")["points"]}
    assert (out / "real_zoo" / "real_params_vs_accuracy.png").is_file()
    assert points["smile"]["params_vs_base"] == 1.3 and points["smile"]["in_distribution"] == pytest.approx(
        0.79
    )
    table = (out / "table.md").read_text()
    assert "| smile | 2 | 79.0 ± 1.4 |" in table
    records = [r for r in load_results(runs, "real") if r["experiment"] == "real_zoo"]
    assert len(records) == 2
    m = records[0]["metrics"]
    assert m["smile.gap_to_individual"] == pytest.approx(0.02)
    assert (m["top_k_1_validation"], m["top_k_8_validation"]) == (0.7, 0.62)
    assert m["routing.own_share"] == pytest.approx((0.5 + 0.9 + 0.3 + 0.7) / 4)
    import yaml

    claims = [c for c in yaml.safe_load(analyze.PAPER.read_text())["claims"] if c["experiment"] == "real_zoo"]
    stats = aggregate(records)[("smile", "real_zoo")]
    assert [check_claim(c, stats) for c in claims] == ["yes", "yes", "yes", "yes"]


def test_claims_without_their_run_are_not_graded(tmp_path):
    board, runs = tmp_path / "lb", tmp_path / "runs"
    _fake_leaderboard(board, with_top8=False)
    real_table.write_summaries(board, runs)
    import yaml

    claims = [c for c in yaml.safe_load(analyze.PAPER.read_text())["claims"] if c["experiment"] == "real_zoo"]
    stats = aggregate(load_results(runs, "real"))[("smile", "real_zoo")]
    assert check_claim(claims[-1], stats) == "not run"  # top-8 was not run: "to be measured"


def test_routing_command_reads_the_chosen_hparams_and_is_reused(ctx, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match=r"smile.json is missing.*leaderboard.run --entries smile"):
        smile_routing.write_routing([0], tmp_path, 2, MICRO, LIBRARY)
    write_json(
        tmp_path / "seed_0" / "smile.json", {"entry": "smile", "hparams": {"gate_k": 8, "k": 4, "top_k": 2}}
    )
    [path] = smile_routing.write_routing([0], tmp_path, 2, MICRO, LIBRARY)
    written = read_json(path)
    assert written["hparams"] == {"gate_k": 8, "k": 4, "top_k": 2} and written["seed"] == 0
    assert set(written["own_share_by_layer"]) == set(LIBRARY)
    from leaderboard import report

    assert [r["entry"] for r in report.load(tmp_path)] == ["smile"]  # the routing file is not a result
    monkeypatch.setattr(smile_routing, "smile_routing", lambda *a, **k: pytest.fail("recomputed"))
    assert smile_routing.write_routing([0], tmp_path, 2, MICRO, LIBRARY) == [path]


def test_smile_votes_pick_the_argmax_of_the_pooled_router_probabilities(ctx):
    """The vote by hand: softmax of each SMILE layer's router logits, averaged over the text's tokens, then
    over the layers; its argmax."""
    from projects.smile.upscale import SmileMoELinear

    smile = lb_smile.smile_model(ctx, gate_k=RANK, k=RANK, top_k=1)
    text = "The tumour is 12.5 mm wide"
    inputs: list[torch.Tensor] = []
    layers = [m for m in smile.modules() if isinstance(m, SmileMoELinear)]
    handles = [m.register_forward_hook(lambda m, a, o: inputs.append((m, a[0]))) for m in layers]
    with torch.no_grad():
        smile(**ctx.tokenizer(text, return_tensors="pt"))
    for h in handles:
        h.remove()
    probs = [torch.softmax(m.gate(x.reshape(-1, m.in_features)).float(), -1).mean(0) for m, x in inputs]
    expected = int(torch.stack(probs).mean(0).argmax())
    assert lb_smile.smile_votes(smile, ctx.tokenizer, [text, text]) == [expected, expected]
    # a model with one layer's routers forced to expert 1 by a large margin: the vote follows when it
    # outweighs the rest (every layer forced: the vote must be 1)
    with torch.no_grad():
        for m in layers:
            w = m.gate.weight.view(m.num_experts, m.gate_k, -1)
            w[0].zero_()
            w[1].mul_(1e3)
    assert lb_smile.smile_votes(smile, ctx.tokenizer, [text]) == [1]
    ctx.cache.pop("smile", None)


def test_smile_vote_entry_sends_each_example_to_its_voted_expert(ctx, monkeypatch):
    """The entry scores each example with the one LoRA expert its vote names: forcing the vote to the own
    expert gives the oracle's scores, forcing it to the other expert gives that expert's."""
    ctx.cache.pop("smile", None)
    result = run.run_entry(ctx, "smile_vote", ())
    assert [s["hparams"] for s in result["search"]] == [{"gate_k": 8}]
    assert set(result["test"]) == set(LIBRARY) and result["params_vs_base"] > 1.0
    oracle = run.run_entry(ctx, "oracle", ())
    for expect in ("own", "other"):
        for task in LIBRARY:
            vote = LIBRARY.index(task) if expect == "own" else 1 - LIBRARY.index(task)
            monkeypatch.setattr(lb_smile, "smile_votes", lambda *a, _e=vote, **k: [_e] * len(a[2]))
            candidate = entries.ENTRIES["smile_vote"][0](ctx)
            model = candidate.model_for(task)
            from common import zoo

            records = zoo.splits(task, ctx.settings)["test"]
            got = zoo.score(model, ctx.tokenizer, records, ctx.settings.max_new_tokens)
            if expect == "own":
                assert got == pytest.approx(oracle["test"][task], abs=1e-6), task
            else:
                other = entries.with_adapter(ctx, ctx.experts[LIBRARY[1 - LIBRARY.index(task)]])
                ref = zoo.score(other, ctx.tokenizer, records, ctx.settings.max_new_tokens)
                assert got == pytest.approx(ref, abs=1e-6), task


def test_routing_command_runs_as_a_script(tmp_path):
    """`python -m leaderboard.smile_routing` imports the leaderboard's entries (run as `-m leaderboard.smile`,
    the entries module was imported a second time and 'smile' registered twice); with no leaderboard result
    it stops with the one-line message."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "leaderboard.smile_routing", "--seeds", "0", "--out", str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "smile.json is missing" in done.stderr and "Traceback" not in done.stderr


def test_table_sh_real_branch_runs_the_leaderboard_then_routing_then_analysis(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    log = tmp_path / "calls.txt"
    fake = tmp_path / "py"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, SCALE="real", PY=str(fake), LEADERBOARD_OUT="lb")
    subprocess.run(["bash", "projects/smile/table.sh"], cwd=root, env=env, check=True)
    assert log.read_text().splitlines() == [
        "-m leaderboard.run --entries smile smile_top8 uniform task_arithmetic oracle --seeds 0 1 --out lb",
        "-m leaderboard.smile_routing --seeds 0 1 --out lb",
        "-m projects.smile.analyze runs=runs/smile/real out=runs/smile/real/table leaderboard=lb",
    ]


@pytest.mark.smoke
def test_distinct_domain_experts_fine_tune_upscale_and_score_on_micro(tmp_path):
    """The distinct-domain CLIP arm's commands on the micro CLIP, two of its generated domains."""
    import json

    from tests.cli import run_cli

    tasks = ["greek_glyphs", "textures"]
    experts = tmp_path / "experts"
    run_cli(
        [
            "-m",
            "projects.smile.finetune",
            "--config",
            "projects/smile/configs/micro_finetune.yaml",
            f"tasks=[{','.join(tasks)}]",
            f"out={experts}",
        ],
        timeout=300,
    )
    models = "[{name: _pretrained_, path: 'micro:clip'}, " + ", ".join(
        f"{{name: {t}, path: '{{expert_root}}/{t}'}}" for t in tasks
    )
    report = tmp_path / "report.json"
    run_cli(
        [
            "-m",
            "projects.smile.main",
            "method=smile_upscaling/smile_upscaling",
            "method.gate_k=2",
            "method.k=-1",
            "modelpool=CLIPVisionModelPool/micro_clip",
            f"modelpool.models={models}]",
            f"modelpool.expert_root={experts}",
            "taskpool=CLIPVisionModelTaskPool/micro_clip",
            f"taskpool.tasks=[{','.join(tasks)}]",
            f"report_save_path={report}",
        ],
        timeout=300,
    )
    out = json.loads(report.read_text())
    assert set(out) >= {*tasks, "average"} and 0 <= out["average"]["accuracy"] <= 1
