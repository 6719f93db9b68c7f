"""Smoke tests: the documented commands of projects/smile/README.md on micro configs, as subprocesses."""

import json

import pytest
import torch

from common.models import load_model
from common.tiny_world import tiny_base
from tests.cli import run_cli

pytestmark = pytest.mark.smoke
CONFIGS = "projects/smile/configs"


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Two micro CLIP experts, fine-tuned by the real CLI (`finetune.py`)."""
    out = tmp_path_factory.mktemp("smile") / "experts"
    run_cli(
        ["-m", "projects.smile.finetune", "--config", f"{CONFIGS}/micro_finetune.yaml", f"out={out}"],
        timeout=300,
    )
    assert (out / "mnist" / "model.safetensors").is_file() and (out / "results.json").is_file()
    return out


def _main(*args, timeout=180):
    return run_cli(["-m", "projects.smile.main", *args], timeout=timeout)


def test_smile_upscaling_report_and_saved_model(experts, tmp_path):
    report_path = tmp_path / "gate_k=2_k=4.json"
    _main(
        "method=smile_upscaling/smile_upscaling",
        "method.gate_k=2",
        "method.k=4",
        f"method.model_path={tmp_path / 'model'}",
        "modelpool=CLIPVisionModelPool/micro_clip",
        f"modelpool.expert_root={experts}",
        "taskpool=CLIPVisionModelTaskPool/micro_clip",
        f"report_save_path={report_path}",
    )
    report = json.loads(report_path.read_text())
    info = report["model_info"]
    assert info["added_params"] == info["added_params_formula"] > 0
    assert set(report) >= {"model_info", "mnist", "digits", "average"}
    assert report["average"]["accuracy"] == pytest.approx(
        (report["mnist"]["accuracy"] + report["digits"]["accuracy"]) / 2
    )
    assert json.loads((tmp_path / "gate_k=2_k=4" / "results.json").read_text())["provenance"]["git_sha"]
    # the saved upscaled model reloads to the same outputs as a fresh upscaling
    from projects.smile.methods import load_upscaled, smile_upscaling

    reloaded = load_upscaled(tmp_path / "model", "clip_vision")
    cfg = {
        "device": "cpu",
        "gate_k": 2,
        "k": 4,
        "top_k": 1,
        "routing_use_diff": True,
        "full_matrices": True,
        "average_experts": False,
    }
    pretrained = load_model(tiny_base("clip", "micro"), "clip_vision")
    fresh, _ = smile_upscaling(
        cfg, pretrained, {t: load_model(experts / t, "clip_vision") for t in ("mnist", "digits")}
    )
    x = torch.randn(3, 3, 28, 28)
    torch.testing.assert_close(reloaded(pixel_values=x).pooler_output, fresh(pixel_values=x).pooler_output)


def test_dummy_single_model_with_list_index_override(experts, tmp_path):
    out = tmp_path / "single.json"
    _main(
        "method=dummy",
        "modelpool=tiny_clip_individual",
        f"modelpool.models.0.path={experts}/digits",
        "modelpool.expert_root=null",
        "taskpool=CLIPVisionModelTaskPool/micro_clip",
        f"report_save_path={out}",
    )
    report = json.loads(out.read_text())
    assert report["model_info"]["params_ratio"] == 1.0 and "digits" in report


def test_baselines_and_projection_merging(experts, tmp_path):
    for method in ("simple_average", "task_arithmetic"):
        _main(
            f"method={method}",
            "modelpool=micro_clip",
            f"modelpool.expert_root={experts}",
            "taskpool=micro_clip",
            f"report_save_path={tmp_path / method}.json",
        )
    _main(
        "method=smile_upscaling/singular_projection_merging",
        "method.k=2",
        "method.rank=high",
        "method.full_matrices=true",
        "modelpool=micro_clip",
        f"modelpool.expert_root={experts}",
        "modelpool.models=[{name: _pretrained_, path: 'micro:clip'}, {name: mnist, path: '{expert_root}/mnist'}]",
        "taskpool=micro_clip",
        f"report_save_path={tmp_path / 'proj'}.json",
    )
    assert json.loads((tmp_path / "proj.json").read_text())["mnist"]["accuracy"] >= 0


def test_sweep_and_analyze(experts, tmp_path):
    run_cli(
        [
            "-m",
            "projects.smile.sweep",
            "--config",
            f"{CONFIGS}/micro_sweep.yaml",
            f"expert_root={experts}",
            f"out={tmp_path / 'seed_0'}",
        ],
        timeout=300,
    )
    summary = json.loads((tmp_path / "seed_0" / "summary" / "results.json").read_text())
    assert summary["experiment"] == "tiny_clip" and "smile_g2_k-1" in summary["metrics"]
    run_cli(["-m", "projects.smile.analyze", f"runs={tmp_path}", f"out={tmp_path / 'table'}"], timeout=120)
    table = (tmp_path / "table" / "table.md").read_text()
    assert "gate_k" in table and "space_II_III" in table
    assert (tmp_path / "table" / "grid_accuracy_vs_params.png").is_file()


def test_dry_run_paper_clip_counts_match_the_paper():
    proc = _main(
        "--dry_run",
        "method=smile_upscaling/smile_upscaling",
        "method.gate_k=16",
        "method.k=32",
        "modelpool=Seq2SeqLMPool/clip-vit-base-patch32_TA8",
        "taskpool=clip-vit-classification_TA8",
    )
    info = json.loads(proc.stdout)["model_info"]  # stdout is the report, as JSON
    assert info["all_params"] == 141203712  # the paper: 141.1M, 1.61x
    assert info["added_params_formula"] == 53747712


PAPER_CLIP = (
    "--dry_run",
    "method=smile_upscaling/smile_upscaling",
    "method.k=4",
    "modelpool=Seq2SeqLMPool/clip-vit-base-patch32_TA8",
    "taskpool=clip-vit-classification_TA8",
)


def test_multirun_sweeps_and_interpolates_report_paths(tmp_path):
    """`-m method.gate_k=1,2` runs both; `${method.gate_k}` in the report path resolves per run."""
    proc = _main(
        "-m", *PAPER_CLIP, "method.gate_k=1,2", f"report_save_path={tmp_path}/g${{method.gate_k}}.json"
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["report_save_path"] for line in lines] == [f"{tmp_path}/g1.json", f"{tmp_path}/g2.json"]
    for gate_k, line in zip((1, 2), lines):
        saved = json.loads((tmp_path / f"g{gate_k}.json").read_text())
        assert saved == line["report"]
    # each expert's router is gate_k x d_in per layer, so gate_k 1 -> 2 adds 8 experts x sum(d_in); ViT-B/32's
    # 12 layers upscale q, k, v, out_proj and fc1 (768 in) and fc2 (3072 in)
    added = [line["report"]["model_info"]["added_params"] for line in lines]
    assert added[1] - added[0] == 8 * 12 * (5 * 768 + 3072)
    assert not list(tmp_path.glob("*$*"))  # nothing written under a literal ${...} name


def test_sweeps_without_multirun_and_colliding_outputs_are_refused(tmp_path):
    with pytest.raises(AssertionError, match=r"'method.gate_k=1,2' is a sweep: add -m"):
        _main(*PAPER_CLIP, "method.gate_k=1,2")
    with pytest.raises(AssertionError, match=r"would all write report_save_path=.*put the swept keys in it"):
        _main("-m", *PAPER_CLIP, "method.gate_k=1,2", f"report_save_path={tmp_path}/same.json")
    assert not list(tmp_path.iterdir())


def test_clear_errors_from_the_cli(experts):
    with pytest.raises(AssertionError, match="CUDA is not available"):
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        _main(
            "method=smile_upscaling/smile_upscaling",
            "method.device=cuda",
            "modelpool=micro_clip",
            f"modelpool.expert_root={experts}",
            "taskpool=micro_clip",
        )
    with pytest.raises(AssertionError, match=r"unknown config key 'method\.gate_kk'"):
        _main("method=smile_upscaling/smile_upscaling", "method.gate_kk=3", "modelpool=micro_clip")
    with pytest.raises(AssertionError, match="no method config"):
        _main("method=smile_upscalin", "modelpool=micro_clip")
