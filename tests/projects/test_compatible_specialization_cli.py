"""The README's commands, run as a user would, on the micro config (a random 4-layer GPT-2)."""

import json
import re

import pytest

from tests.cli import run_cli

pytestmark = pytest.mark.smoke
MAIN = ["-m", "projects.compatible_specialization.main"]
ANALYZE = ["-m", "projects.compatible_specialization.analyze"]


def _loss(stdout: str) -> float:
    return float(re.findall(r"Test loss:\s+([0-9.]+)", stdout)[-1])


@pytest.fixture(scope="module")
def specialists(tmp_path_factory):
    """Fine-tune a code and a math specialist (the original's --train_mlp runs); their snapshots and runs."""
    out = tmp_path_factory.mktemp("runs")
    found = {}
    for name, dataset in [("code", "tinycodes"), ("math", "orca-math-problems")]:
        proc = run_cli(
            [*MAIN, "--scale", "micro", "--arch", "gpt2", "--pretrained", "--datasets", dataset, "--train_mlp",
             "--batch_size", "4", "--grad_accum", "2", "--train_tokens", "24", "--lr", "1e-3", "--wd", "0.1",
             "--name", name, "--out_dir", str(out)],
            timeout=180,
        )  # fmt: skip
        found[name] = {"run": out / name, "stdout": proc.stdout}
    return out, found


def test_finetune_writes_early_and_later_snapshots(specialists):
    _, found = specialists
    for s in found.values():
        assert {p.name for p in (s["run"] / "snapshots").iterdir()} >= {
            "step_0.safetensors",
            "step_2.safetensors",
            "step_6.safetensors",
        }
        assert _loss(s["stdout"]) > 0
        assert (s["run"] / "results.json").exists()


def test_eval_specialist_prints_test_loss(specialists):
    _, found = specialists
    chkpt = found["code"]["run"] / "snapshots" / "step_6.safetensors"
    proc = run_cli(
        [*MAIN, "--scale", "micro", "--arch", "gpt2", "--dataset", "tinycodes", "--batch_size", "16",
         "--context", "16", "--eval", "--chkpt", str(chkpt)],
        timeout=120,
    )  # fmt: skip
    # The last snapshot is the final model, whose loss the fine-tuning run printed.
    assert _loss(proc.stdout) == pytest.approx(_loss(found["code"]["stdout"]), rel=1e-6)


def test_analyze_interpolation_writes_curve_and_plot(specialists):
    out, found = specialists
    code, math = (found[d]["run"] / "snapshots" / "step_2.safetensors" for d in ("code", "math"))
    proc = run_cli(
        [*ANALYZE, "--scale", "micro", "--arch", "gpt2", "--pretrained", "--datasets", "gsm-hard",
         "--batch_size", "16", "--context", "16", "--name", "eval_gpt2_base", "--eval_sep", "gsm-hard",
         "--router_ckpts", str(code), str(math), "--analyze", "--out_dir", str(out)],
        timeout=120,
    )  # fmt: skip
    assert proc.stdout.count("'gsm-hard')") == 11
    assert (out / "eval_gpt2_base" / "activation.png").exists()


@pytest.mark.parametrize(("L", "topk"), [(1, 2), (4, 8)])
def test_routing_trains_then_evaluates_the_routed_checkpoint(specialists, L, topk):
    out, found = specialists
    ckpts = [str(found[d]["run"] / "snapshots" / "step_6.safetensors") for d in ("code", "math")]
    common = ["--scale", "micro", "--arch", "gpt2", "--pretrained", "--datasets", "gsm-hard", "--context", "16",
              "--optim", "adamw", "--lr", "5e-3", "--wd", "1e-1", "--router_method", "standard", "--topk", str(topk),
              "--out_dir", str(out)]  # fmt: skip
    multi = ["--multi_layer_router", "--num_multi_layer_experts", str(L)] if L > 1 else []
    name = f"gpt_routed_multi_layer_cleaned_{L}"
    train = run_cli(
        [*MAIN, *common, *multi, "--batch_size", "4", "--grad_accum", "2", "--train_tokens", "8", "--name", name,
         "--router_ckpts", *ckpts],
        timeout=180,
    )  # fmt: skip
    routed = re.search(r"routed checkpoint: (\S+)", train.stdout)[1]
    # The README's evaluation form: placeholder --router_ckpts, the routed checkpoint decides the experts.
    evaluated = run_cli(
        [*MAIN, *common, *multi, "--batch_size", "92", "--train_tokens", "160000", "--name", "gpt_routed",
         "--router_ckpts", *ckpts, "--chkpt", routed, "--eval"],
        timeout=120,
    )  # fmt: skip
    assert _loss(evaluated.stdout) == pytest.approx(_loss(train.stdout), rel=1e-6)


def test_cka_over_finetuning_snapshots(specialists):
    out, found = specialists
    proc = run_cli(
        [*ANALYZE, "--scale", "micro", "--cka", str(found["code"]["run"]), str(found["math"]["run"]),
         "--name", "cka", "--out_dir", str(out)],
        timeout=120,
    )  # fmt: skip
    assert "0: 1.0" in proc.stdout  # at step 0 both are the base
    assert (out / "cka" / "cka.png").exists()


@pytest.mark.slow  # ~30 s: every experiment of the table on the micro config
def test_pipeline_then_table(tmp_path):
    run_cli(
        [
            "-m",
            "projects.compatible_specialization.pipeline",
            "--scale",
            "micro",
            "--seed",
            "0",
            "--out",
            str(tmp_path),
        ],
        timeout=240,
    )
    proc = run_cli([*ANALYZE, "--table", str(tmp_path)], timeout=60)
    assert "multi-layer routing L=4 (k=8)" in proc.stdout
    for name in ("table.md", "activation.png", "multi_layer.png", "cka.png"):
        assert (tmp_path / name).exists()


def test_paper_dry_run_builds_gpt2_on_meta():
    proc = run_cli(
        [*MAIN, "--dry_run", "--multi_layer_router", "--num_multi_layer_experts", "4", "--topk", "8"],
        timeout=120,
    )
    assert "mlp_parameters: 56669184" in proc.stdout  # 12 × (768·3072·2 + 3072 + 768)
    assert "router_parameters: 73728" in proc.stdout  # 12 layers × (8 experts × 768)
    assert "finetune_steps: 8750" in proc.stdout and "routing_steps: 1739" in proc.stdout


def test_table_of_a_seed_still_running_shows_what_has_finished(tmp_path):
    """A real seed takes hours: the table and the figures of the finished experiments are written while the
    later ones (here multi-layer routing and CKA) have no results yet, and their rows stay empty."""
    from common.rundir import RunDir
    from projects.compatible_specialization import analyze

    cfg = {"data": {"test_split": "test"}}

    def write(experiment, metrics, **extra):
        run = RunDir(
            tmp_path / "seed_0" / experiment,
            project="compatible_specialization",
            experiment=experiment,
            scale="real",
            seed=0,
            config=cfg,
        )
        run.write_results(metrics, **extra)

    write("specialists", {"code_early": 2.1, "math_early": 2.3, "code_later": 2.0, "math_later": 3.5})
    curve = {"0.0": 3.0, "0.5": 2.5, "1.0": 2.8}
    write(
        "interpolation",
        {"early_best": 2.5, "later_best": 2.9, "early_best_alpha": 0.5, "later_best_alpha": 0.5},
        curves={"early": {"test": curve}, "later": {"test": {a: v + 0.4 for a, v in curve.items()}}},
    )
    write(
        "routing",
        {"routed_early": 2.6, "interp_best_early": 2.5, "routed_later": 2.9, "interp_best_later": 2.9},
    )
    text = analyze.table(tmp_path)
    assert "| interpolation early: loss at best α | 2.500 | 1.625 |" in text
    assert "| MoE routing later (k=2 of 2) | 2.900 |" in text
    assert "| CKA code vs math, last snapshot | — |" in text and "multi-layer routing" not in text
    data = json.loads((tmp_path / "activation.json").read_text())  # the plot's data: the curves as written
    assert data["early"] == curve and data["later"] == pytest.approx({a: v + 0.4 for a, v in curve.items()})
    assert (tmp_path / "activation.png").stat().st_size > 0
    assert not (tmp_path / "multi_layer.png").exists() and not (tmp_path / "cka.png").exists()
