"""The gate-budget sweep of tune_tiny: the budget reaches the gate trainer; scores come from validation."""

from __future__ import annotations

import gin
import pytest

from projects.phatgoose import configurables as C
from projects.phatgoose import gates
from projects.phatgoose import tune_tiny as T
from projects.phatgoose.pipeline import build_library

MICRO = str(C.CONFIGS / "micro.gin")
EXPERTS = ["TWEET_SENTIMENT_AIRLINE", "CHAMP_CATEGORY"]


def test_gate_settings_override_only_steps_lr_and_batch():
    C.parse([MICRO], ["P/TRAIN/GATE/Trainer.warmup_ratio=0.1"])
    try:
        s = T.gate_settings(T._parse_gate("600:2e-2:32"))
    finally:
        gin.clear_config()
    assert (s.num_steps, s.lr, s.batch_size) == (600, 2e-2, 32)
    # the rest is P/TRAIN/GATE's (micro.gin: max_length 32, cap 8; the binding above: warmup 10%)
    assert (s.max_length, s.max_train_examples, s.warmup_ratio) == (32, 8, 0.1)
    cfg = s.train_config(seed=3)
    assert (cfg.max_steps, cfg.lr, cfg.batch_size, cfg.warmup_steps, cfg.seed) == (600, 2e-2, 32, 60, 3)


@pytest.mark.smoke
def test_gate_sweep_trains_every_expert_at_the_budget_and_scores_validation(tmp_path, monkeypatch):
    exp_out = tmp_path / "exp_out"
    C.parse(
        [MICRO], [f'main.exp_out="{exp_out}"', 'P/EVALUATE/Evaluator.datasets=["D/TWEET_TOPIC_FRESH/EVAL"]']
    )
    try:
        build_library(0, EXPERTS)
        seen = []
        real_train = gates.train

        def spy(model, loss, data, cfg, *args, **kwargs):
            seen.append((cfg.max_steps, cfg.lr, cfg.batch_size, cfg.seed))
            return real_train(model, loss, data, cfg, *args, **kwargs)

        monkeypatch.setattr(gates, "train", spy)
        rec = T.run_gates(exp_out, T._parse_gate("3:1e-2:4"), seed=1, eval_batch=8)
    finally:
        gin.clear_config()
    assert seen == [(3, 1e-2, 4, 1)] * len(EXPERTS)
    assert rec["split"] == "validation"
    assert rec["gate_train_cpu_s"] > 0
    (task,) = rec["validation"]
    assert task == "TWEET_TOPIC_FRESH"
    share = rec["validation"][task]["routing_share"]
    assert list(share) == EXPERTS
    assert sum(share.values()) == pytest.approx(1.0)


def test_sweep_needs_one_kind_of_config_and_the_experts_for_gates():
    with pytest.raises(SystemExit):
        T.main([])
    with pytest.raises(SystemExit):
        T.main(["--gate_configs", "40:5e-3:8"])
