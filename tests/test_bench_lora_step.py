"""`benchmarks/lora_step.py --quick` (micro:mistral): our zoo training step and transformers.Trainer + peft
see the same batches from the same LoRA initialisation, so their loss curves agree to rounding in fp32."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lora_step

from common.io import read_json


def test_quick_run_learns_the_same_curve_as_the_trainer(tmp_path, monkeypatch):
    monkeypatch.setenv("MOERGING_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "lora_step_quick.json"
    lora_step.main(["--quick", "--out", str(out)])
    result = read_json(out)
    assert result["same_lora_init"]
    curves = result["loss_curves"]
    assert set(curves) == {"peer fp32", "ours fp32", "peer bf16", "ours bf16"}
    assert all(len(c) == 4 for c in curves.values())
    # fp32: the same loss on the same batches after the same updates (a shuffled order, another loss
    # normalisation or another schedule would differ by far more than rounding)
    assert result["compare"]["fp32"]["first_loss_abs_diff"] < 1e-5
    assert result["compare"]["fp32"]["mean_abs_loss_diff"] < 1e-4
    assert result["compare"]["bf16"]["mean_abs_loss_diff"] < 1e-2  # bf16 rounding
    assert set(result["interleaved_step_times"]) == set(curves)
    assert (tmp_path / "lora_step_quick.png").is_file()
