"""`benchmarks/gpu_check.py` on the CPU: the kernel / bf16 checks, the timing table and
the JSON it writes (seconds); each project's pipeline under the guard with device="cpu" (slow)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check

from common.io import read_json


def test_max_rel_error_is_relative_to_the_largest_reference_entry():
    ref = torch.tensor([2.0, -4.0])
    assert gpu_check.max_rel_error(torch.tensor([2.5, -4.0]), ref) == pytest.approx(0.5 / 4)


def test_bf16_and_triton_checks_pass_on_cpu():
    s = gpu_check.SHAPES["small"]
    bf16 = gpu_check.check_bf16(torch.device("cpu"), s)
    assert set(bf16) == {"routed_lowrank", "smile_forward"}
    assert all(
        v["ok"] and v["dtype_out"] == "torch.bfloat16" and v["max_rel_error"] > 0 for v in bf16.values()
    )
    triton = gpu_check.check_triton(torch.device("cpu"), s)  # TRITON_INTERPRET=1 in the tests
    assert triton["torch.float32"]["max_rel_error"] <= 1e-5 and triton["torch.bfloat16"]["ok"]


def test_refuses_cuda_without_it(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_check.main(["--device", "cuda", "--only"]) == 2
    err = capsys.readouterr().err
    assert "gpu-check needs a CUDA GPU" in err and "--device cpu" in err


def test_run_check_writes_the_timing_table_and_checks_as_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = gpu_check.run_check("cpu", out, only=[], shapes="small")
    saved = read_json(out)
    assert saved["device"] == "cpu" and saved["ok"] and saved["failed"] == []
    rows = {
        "routed mixture, float32",
        "routed mixture, bfloat16",
        "SMILE forward, float32",
        "merges, float32",
    }
    assert rows <= set(saved["timings"])
    for row in saved["timings"].values():
        assert row["ratio"][row["baseline"]] == pytest.approx(1.0)
        assert all(t["repeats"] == gpu_check.SHAPES["small"]["repeats"] for t in row["times"].values())
    assert set(result["timings"]["merges, float32"]["times"]) == {
        "floor (sum of the models)",
        "task_arithmetic",
        "ties (mergekit, exact)",
    }


def test_unknown_pipeline_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown pipeline.*'mbc'"):
        gpu_check.run_check("cpu", tmp_path / "x.json", only=["mbc"], shapes="small")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(gpu_check.PIPELINES))
def test_pipeline_runs_on_the_device_it_was_given(name, tmp_path):
    """Each project's paper-shaped micro pipeline with device="cpu": every model load got "cpu", every
    checked forward saw parameters and inputs on the CPU."""
    report = gpu_check.check_pipeline(name, "cpu", tmp_path)
    assert report["forwards_checked"] > 0 and report["expected"] == "cpu"
    # the micro GPT-2 of compatible_specialization is built, not loaded; smile's fine-tuning CLI takes no
    # device (its load_model gets "auto": the GPU when there is one)
    allowed = {"cpu", "auto"} if name == "smile" else {"cpu"}
    assert set(report["load_model_devices"]) <= allowed
