"""analyze.py's causal-LM arms: per-seed summaries (bits per byte, routing share, recovery) by hand."""

import pytest

from common.io import read_json
from common.rundir import RunDir
from projects.smile.analyze import lm_summaries, lm_table


def _report(tmp_path, seed, name, bpb, routing=None):
    metrics = {"model_info": {"params_ratio": 1.05 if routing else 1.0}, "average": {"bits_per_byte": 0.0}}
    metrics |= {d: {"bits_per_byte": v} for d, v in bpb.items()}
    if routing:
        metrics["model_info"]["smile"] = {"experts": ["math", "code"]}
        metrics["routing"] = routing
    run = RunDir(
        tmp_path / "smollm2" / f"seed_{seed}" / name,
        project="smile",
        experiment="x",
        scale="tiny",
        seed=seed,
        config={},
    )
    run.write_results(metrics)


def test_lm_summaries_flatten_reports_and_compute_recovery_by_hand(tmp_path):
    for seed, shift in ((0, 0.0), (1, 0.1)):
        _report(tmp_path, seed, "M0", {"math": 1.0 + shift, "code": 1.0})
        _report(tmp_path, seed, "M_math", {"math": 0.6 + shift, "code": 1.1})
        _report(tmp_path, seed, "M_code", {"math": 1.1 + shift, "code": 0.8})
        routing = {"math": {"all": [0.8, 0.2]}, "code": {"all": [0.4, 0.6]}, "general": {"all": [0.5, 0.5]}}
        _report(tmp_path, seed, "smile_both_k8", {"math": 0.7 + shift, "code": 0.9}, routing)
    written = lm_summaries(tmp_path, "smollm2")
    assert [p.parent.parent.name for p in written] == ["seed_0", "seed_1"]
    record = read_json(written[1])
    m = record["metrics"]
    assert record["experiment"] == "tiny_smollm2_summary" and record["seed"] == 1
    assert m["smile_both_k8.recovery.math"] == pytest.approx((1.1 - 0.8) / (1.1 - 0.7))  # 0.75
    assert m["smile_both_k8.recovery.code"] == pytest.approx((1.0 - 0.9) / (1.0 - 0.8))  # 0.5
    assert m["smile_both_k8.own_share.math"] == 0.8 and m["smile_both_k8.own_share.code"] == 0.6
    assert m["M_code.code"] == 0.8 and m["smile_both_k8.params_ratio"] == 1.05
    assert "M0.recovery.math" not in m  # only SMILE models get a recovery
    # the summaries are not models: the table still has the four, each over both seeds
    rows = lm_table(tmp_path, "smollm2")
    assert [r["model"] for r in rows] == ["M0", "M_code", "M_math", "smile_both_k8"]
    assert all(r["seeds"] == 2 for r in rows)
    assert rows[-1]["math → math expert (%)"] == "80.0 ± 0.0"


def test_t5_routing_table_by_hand(tmp_path):
    import json

    from projects.smile.analyze import t5_routing_table

    folder = tmp_path / "t5_full" / "routing"
    folder.mkdir(parents=True)
    experts = ["a", "b"]
    for seed, (own_enc, dec_a) in enumerate(((0.6, 0.1), (0.8, 0.3))):
        routing = {
            "a": {
                "by_stack": {
                    "encoder": [own_enc, 1 - own_enc],
                    "cross_kv": [0.5, 0.5],
                    "decoder": [dec_a, 1 - dec_a],
                }
            },
            "b": {"by_stack": {"encoder": [0.5, 0.5], "cross_kv": [0.2, 0.8], "decoder": [0.9, 0.1]}},
        }
        report = {
            "model_info": {"smile": {"experts": experts}},
            "a": {"accuracy": 0.5 + 0.1 * seed},
            "b": {"accuracy": 0.0},
            "routing": routing,
        }
        (folder / f"seed_{seed}.json").write_text(json.dumps(report))
    (folder / "not_a_routing_report.json").write_text(json.dumps({"average": {}}))
    rows = t5_routing_table(tmp_path)
    assert [r["task"] for r in rows] == ["a", "b"]
    assert rows[0]["accuracy (%)"] == "55.0 ± 7.1"
    assert rows[0]["own expert, encoder (%)"] == "70.0 ± 14.1"
    assert rows[0]["decoder's most chosen expert, per seed"] == "b 90%, b 70%"
    assert rows[1]["own expert, cross-attention k/v (%)"] == "80.0 ± 0.0"
    assert rows[1]["own expert, decoder first step (%)"] == "10.0 ± 0.0"
    assert t5_routing_table(tmp_path, arm="t5_lora") == []
