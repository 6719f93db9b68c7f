"""`benchmarks/mlp_finetune_step.py --quick` (micro:mistral): the fp32 and bf16-autocast MLP-only steps see the
same batches from the same weights, so their losses agree to bf16 rounding; only MLP weights move."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mlp_finetune_step


def test_quick_run_times_both_cases_on_the_same_curve(tmp_path):
    out = tmp_path / "mlp_quick.json"
    result = mlp_finetune_step.main(["--quick", "--out", str(out)])
    assert out.is_file()
    fp32, bf16 = result["losses"]["fp32"], result["losses"]["bf16 autocast"]
    assert len(fp32) == len(bf16) == 3  # 1 warm-up + 2 timed steps each
    assert fp32[0] == pytest.approx(bf16[0], rel=0.02)  # same weights, same first batch
    assert result["largest_loss_gap"] == pytest.approx(max(abs(a - b) for a, b in zip(fp32, bf16)))
    assert result["ratio_vs_fp32"]["fp32"] == 1.0


def test_step_trains_only_the_mlps():
    from dataclasses import replace

    from common.zoo import DEFAULT, load_base

    model, _ = load_base(replace(DEFAULT, base="micro:mistral"), dtype="float32")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = torch.randint(0, model.config.vocab_size, (2, 16))
    losses: list[float] = []
    mlp_finetune_step.stepper(model, [batch], True, losses)()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".mlp." in n for n in moved) and len(losses) == 1
