"""Smoke tests: every command of the MaTS README, run as a user would on micro configs.

Each command is a fresh process (~10 s of imports and data loading on a busy CPU), so the tests that
need trained experts are also marked `slow`: `make smoke` runs them all. The default suite runs the
same commands in-process in test_mats_pipeline.py.
"""

import json
from pathlib import Path

import pytest
import yaml

from tests.cli import run_cli

pytestmark = pytest.mark.smoke
slow = pytest.mark.slow
MAIN = ["-m", "projects.mats.main"]
CONFIGS = Path(__file__).resolve().parents[2] / "projects" / "mats" / "configs"
FULL = ["-c", str(CONFIGS / "micro_t5.yaml")]
IA3 = ["-c", str(CONFIGS / "micro_t5.yaml"), str(CONFIGS / "micro_ia3.yaml")]
TASKS = ("gsm_language_id", "champ_category")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Train the micro experts through the CLI (the `train` smoke test) and register them."""
    root = tmp_path_factory.mktemp("mats")
    registry = root / "checkpoints.yaml"
    common = ["-o", f"experiment.exp_out={root / 'exp_out'}", f"experiment.checkpoint_registry={registry}"]
    for _fmt, configs in (("full_model", FULL), ("ia3", IA3)):
        for task in TASKS:
            run_cli([*MAIN, "train", *configs, "-td", f"train_dataset={task}", "-ed", f"evaluation_dataset={task}",
                     "-tr", "micro_train_batch_size=4", "-er", "eval_batch_size=8", "-w", "1",
                     "--register", str(registry), *common, "experiment.run_name=seed0"], timeout=120)  # fmt: skip
    return root, registry, common


def _merge(world, command, configs, descriptor, *extra):
    _, _, common = world
    proc = run_cli([*MAIN, command, *configs, "-d", "micro_two", "--checkpoint_descriptor", descriptor,
                    "-er", "eval_batch_size=8", *extra, *common], timeout=120)  # fmt: skip
    merged = Path(proc.stdout.strip().splitlines()[-1].split("merged model: ")[1])
    assert (merged / "adapter_config.json").is_file() or (merged / "config.json").is_file()
    return merged


@slow
def test_train_registers_best_checkpoints(world):
    root, registry, _ = world
    entries = yaml.safe_load(registry.read_text())["micro-t5"]["offline"]
    assert set(entries) == {"full_model", "ia3"} and all(set(e) == set(TASKS) for e in entries.values())
    run = root / "exp_out" / "offline" / "champ_category" / "micro-t5" / "ia3" / "seed0"
    results = json.loads((run / "results.json").read_text())
    assert (
        results["provenance"]["git_sha"] and (Path(results["checkpoint"]) / "adapter_config.json").is_file()
    )


@pytest.fixture(scope="module")
def meta(world):
    """Save the Fisher (diagonal; blockwise for (IA)^3) and the Grams of every expert."""
    _, _, common = world
    args = ["-d", "micro_two", "--split", "validation", *common]
    run_cli([*MAIN, "save_fisher", *FULL, "--checkpoint_descriptor", "full_model", "-f", "diagonal", *args])
    run_cli([*MAIN, "save_fisher", *IA3, "--checkpoint_descriptor", "ia3", "-f", "blockwise", *args])
    run_cli([*MAIN, "save_fisher", *IA3, "--checkpoint_descriptor", "ia3", "-f", "diagonal", *args])
    run_cli([*MAIN, "save_gram_matrix", *FULL, "--checkpoint_descriptor", "full_model", *args])
    return world


@slow
def test_metadata_commands(meta):
    root = meta[0]
    full = (
        root / "exp_out" / "offline" / "gsm_language_id" / "micro-t5" / "full_model" / "seed0" / "gram_matrix"
    )
    names = sorted(p.name.split("_", 2)[2] for p in full.iterdir())
    assert names == [
        "diagonal_empirical_fisher_validation.safetensors",
        "gram_matrix_input_activations_validation.safetensors",
        "gram_matrix_output_activation_gradients_validation.safetensors",
    ]
    ia3 = root / "exp_out" / "offline" / "gsm_language_id" / "micro-t5" / "ia3" / "seed0" / "gram_matrix"
    assert sorted(p.name.split("_", 2)[2] for p in ia3.iterdir()) == [
        "blockwise_empirical_fisher_validation.safetensors",
        "diagonal_empirical_fisher_validation.safetensors",
    ]


@slow
def test_individual_models(world):
    _, _, common = world
    proc = run_cli([*MAIN, "individual_models", *FULL, "-d", "micro_two", "--checkpoint_descriptor", "full_model",
                    "-er", "eval_batch_size=8", *common])  # fmt: skip
    scores = yaml.safe_load(proc.stdout)["validation"]
    assert set(scores) == {*TASKS, "average"}


@slow
@pytest.mark.parametrize(
    "command, fmt",
    [
        ("average", "full_model"),
        ("task_vectors", "ia3"),
        ("ties", "full_model"),
        ("diagonal_fisherMerging", "ia3"),
    ],
)
def test_simple_merges(meta, command, fmt):
    merged = _merge(meta, command, FULL if fmt == "full_model" else IA3, fmt)
    results = json.loads((merged.parents[1] / "results.json").read_text())
    expected = 11 if command in ("task_vectors", "ties") else 1  # λ swept on validation
    assert len(results["sweep"]) == expected


@slow
def test_regmean_and_conjugate_gradient(meta):
    world = meta
    _merge(world, "regmean", FULL, "full_model", "--split", "validation")
    ta = _merge(world, "task_vectors", FULL, "full_model", "--model_lambda", "0.3")
    assert ta.parent.name == "model_lambda_0.3"
    _merge(world, "conjugateGradient_average", FULL, "full_model", "--num_iterations", "100", "--model_lambda", "1.0",
           "--initialization", "average")  # fmt: skip
    _merge(world, "conjugateGradient_diagonalFisher", FULL, "full_model", "--split", "validation",
           "--num_iterations", "100", "--model_lambda", "1.0")  # fmt: skip
    _merge(world, "conjugateGradient_fisherMerging", FULL, "full_model", "--model_lambda", "1.0",
           "--num_iterations", "100", "--initialization", str(ta))  # fmt: skip
    kfac = _merge(world, "conjugateGradient_fisherMerging", FULL, "full_model", "--model_lambda", "1.0",
                  "--num_iterations", "100", "--use_backward", "--initialization", str(ta))  # fmt: skip
    log = json.loads((kfac.parents[1] / "log.json").read_text())[0]["blocks"]
    assert log and all({"initial_residual", "final_residual"} <= set(r) for r in log)
    blockwise = _merge(world, "conjugateGradient_fisherMerging", IA3, "ia3", "--model_lambda", "1.0",
                       "--num_iterations", "10", "--initialization", "pretrained", "-f", "blockwise")  # fmt: skip
    assert "fisher_merging_blockwise_empirical_fisher_validation" in str(blockwise)


@slow
def test_inference_on_run_and_merged_model(world):
    root = world[0]
    run = root / "exp_out" / "offline" / "champ_category" / "micro-t5" / "full_model" / "seed0"
    idx = json.loads((run / "results.json").read_text())["metrics"]["best_checkpoint_idx"]
    proc = run_cli([*MAIN, "inference", "-e", str(run), "--checkpoint_idx", str(idx), "-ed", "split=train",
                    "-er", "eval_batch_size=8"])  # fmt: skip
    assert "champ_category" in yaml.safe_load(proc.stdout)["train"]
    merged = _merge(world, "average", IA3, "ia3")
    proc = run_cli([*MAIN, "inference", "--merged_model", str(merged), "-ed", "evaluation_split=test",
                    "-i", "micro_two", "-er", "eval_batch_size=8"])  # fmt: skip
    assert set(yaml.safe_load(proc.stdout)["test"]) == {*TASKS, "average"}


def test_dry_run_paper_config():
    # timeout: a hang guard; the dry run takes ~20 s alone, minutes on a core shared by three processes
    proc = run_cli([*MAIN, "train", "--dry_run", "-c", str(CONFIGS / "paper_t5_large.yaml"),
                    str(CONFIGS / "paper_ia3.yaml"), str(CONFIGS / "paper_individual_task_run_ia3.yaml"),
                    "-td", "train_dataset=paws"], timeout=600)  # fmt: skip
    assert "783432704 parameters, 282624 merged (ia3)" in proc.stdout
    # The data plan, offline: paws's 11 P3 configs in promptsource's order, validation = last 1000 of train.
    plan = next(line for line in proc.stdout.splitlines() if line.startswith("data paws: "))
    assert plan.count("paws_labeled_final_") == 11 and plan.endswith("the last 1000 train examples")
    assert "data cosmos_qa" not in proc.stdout  # a single-task run reads its own dataset only


@slow
def test_reproduce_table_micro(tmp_path):
    for fmt in ("ia3", "full_model"):
        run_cli(["-m", "projects.mats.reproduce", "--scale", "micro", "--format", fmt, "--runs", str(tmp_path)],
                timeout=300)  # fmt: skip
    proc = run_cli(["-m", "projects.mats.analyze", "--runs", str(tmp_path), "--scale", "micro"])
    assert "| MaTS |" in proc.stdout and (tmp_path / "micro" / "table.md").is_file()
    results = json.loads((tmp_path / "micro" / "ia3" / "seed0" / "results.json").read_text())
    assert results["experiment"] == "micro_ia3" and "mats" in results["metrics"]
