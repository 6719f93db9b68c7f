"""Smoke tests: the seed's Flan-T5 commands (projects/smile/README.md) on the micro T5, as subprocesses."""

import json

import pytest

from tests.cli import run_cli

pytestmark = pytest.mark.smoke
CONFIGS = "projects/smile/configs"


def _experts(root, config):
    run_cli(
        ["-m", "projects.smile.finetune_t5", "--config", f"{CONFIGS}/{config}", f"out={root}"], timeout=300
    )
    return root


@pytest.fixture(scope="module")
def full_experts(tmp_path_factory):
    """Two micro T5 experts, full fine-tunes by the real CLI (`finetune_t5.py`), saved with save_pretrained."""
    out = _experts(tmp_path_factory.mktemp("smile_t5") / "full", "micro_finetune_t5.yaml")
    assert (out / "champ" / "model.safetensors").is_file() and (out / "results.json").is_file()
    return out


@pytest.fixture(scope="module")
def lora_experts(tmp_path_factory):
    """Two micro T5 LoRA experts (PEFT adapter folders)."""
    out = _experts(tmp_path_factory.mktemp("smile_t5") / "lora", "micro_finetune_t5_lora.yaml")
    assert (out / "champ" / "adapter_config.json").is_file()
    return out


@pytest.mark.parametrize("arm", ["full", "lora"])
def test_flan_t5_smile_upscaling_report(arm, full_experts, lora_experts, tmp_path):
    # the seed: fusion_bench method=smile_upscaling/smile_upscaling method.gate_k=$gate_k method.k=$k
    #   modelpool=Seq2SeqLMPool/flan-t5-base_glue[_lora16] taskpool=flan-t5_glue_text_generation report_save_path=...
    experts = full_experts if arm == "full" else lora_experts
    pool = "Seq2SeqLMPool/micro_t5" + ("_lora" if arm == "lora" else "")
    report_path = tmp_path / "gate_k=1_k=2.json"
    run_cli(
        [
            "-m",
            "projects.smile.main",
            "method=smile_upscaling/smile_upscaling",
            "method.device=cpu",
            "method.gate_k=1",
            "method.k=2",
            f"modelpool={pool}",
            f"modelpool.expert_root={experts}",
            "taskpool=FlanT5GLUETextGenerationTaskPool/micro_t5",
            f"report_save_path={report_path}",
        ],
        timeout=180,
    )
    report = json.loads(report_path.read_text())
    info = report["model_info"]
    assert info["added_params"] == info["added_params_formula"] > 0
    assert set(report) >= {"model_info", "champ", "lang_eng_fra", "average"}
    assert set(report["champ"]) == {"accuracy", "exact_match", "loss"}
    layers = info["smile"]["upscaled_layers"]
    if arm == "lora":  # only q and v have deltas
        assert layers and {name.rpartition(".")[2] for name in layers} == {"q", "v"}
    else:  # every Linear, lm_head included
        assert "lm_head" in layers and any(name.endswith(".wo") for name in layers)


def test_flan_t5_sweep_and_analyze(lora_experts, tmp_path):
    run_cli(
        [
            "-m",
            "projects.smile.sweep",
            "--config",
            f"{CONFIGS}/micro_sweep_t5.yaml",
            f"expert_root={lora_experts}",
            f"out={tmp_path / 't5_lora' / 'seed_0'}",
        ],
        timeout=300,
    )
    summary = json.loads((tmp_path / "t5_lora" / "seed_0" / "summary" / "results.json").read_text())
    assert summary["experiment"] == "tiny_t5_lora"
    assert {"individual", "simple_average", "task_arithmetic", "smile_selected", "smile_g2_k2"} <= set(
        summary["metrics"]
    )
    run_cli(["-m", "projects.smile.analyze", f"runs={tmp_path}", f"out={tmp_path / 'table'}"], timeout=120)
    table = (tmp_path / "table" / "table.md").read_text()
    assert "tiny T5, LoRA" in table and "paper Flan-T5-base LoRA-16 (%)" in table
    assert (tmp_path / "table" / "grid_accuracy_vs_params_t5_lora.png").is_file()
