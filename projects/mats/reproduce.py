"""The paper's multitask-merging table (§5.1: individual, multitask, average, TA, TIES, Fisher, RegMean,
MaTS) for one format and seed, built by running the README's commands in-process (`main.main`).

Every merge hyperparameter is chosen on validation by the merge command; the test split is read once per
row, by `inference -ed evaluation_split=test`. MaTS is CG with the blockwise-Fisher objective for (IA)^3
and with the K-FAC objective (`--use_backward`) for full fine-tuning, both initialised from the task
arithmetic model chosen on validation, as the README's commands.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from common.cli import run_main
from common.io import read_json
from common.rundir import RunDir
from projects.mats.main import main
from projects.mats.tasks import tasks_of

CONFIGS = Path(__file__).resolve().parent / "configs"
SCALE_CONFIGS = {"tiny": ("tiny_t5.yaml", "tiny_ia3.yaml"), "micro": ("micro_t5.yaml", "micro_ia3.yaml")}
MIXTURE = {"tiny": "tiny_six", "micro": "micro_two"}
# The multitask model's run configs, after the model configs: {scale: {format: files}}.
MULTITASK_CONFIGS = {
    "tiny": {
        "full_model": ["tiny_multitask_run.yaml"],
        "ia3": ["tiny_multitask_run.yaml", "tiny_multitask_run_ia3.yaml"],
    },
    "micro": {"full_model": [], "ia3": []},
}


def _merged(out: Path, method_dir: str) -> Path:
    return Path(read_json(out / method_dir / "results.json")["merged_model"])


def _test(configs: list[str], weights: Path, mixture: str) -> dict[str, float]:
    main(
        [
            "inference",
            "-c",
            *configs,
            "--merged_model",
            str(weights),
            "-ed",
            "evaluation_split=test",
            "-i",
            mixture,
        ]
    )
    return read_json(weights.parent / "inference" / "test" / "results.json")["metrics"]["test"]


def run_seed(scale: str, fmt: str, seed: int, runs: Path) -> dict[str, Any]:
    """Train, compute metadata, merge and test one (format, seed); returns the table row's metrics."""
    full, ia3 = (str(CONFIGS / f) for f in SCALE_CONFIGS[scale])
    configs = [full] if fmt == "full_model" else [full, ia3]
    mixture = MIXTURE[scale]
    root = runs / scale / f"seed{seed}"
    registry = root / "checkpoints.yaml"
    common = ["-o", f"experiment.exp_out={root / 'exp_out'}", f"experiment.checkpoint_registry={registry}",
              f"train_run.seed={seed}", f"experiment.run_name=seed{seed}"]  # fmt: skip
    multitask = [str(CONFIGS / f) for f in MULTITASK_CONFIGS[scale][fmt]]
    for task in (*tasks_of(mixture), mixture):  # the experts, then the multitask model
        files = [*configs, *multitask] if task == mixture else configs
        main(["train", "-c", *files, "-td", f"train_dataset={task}", "-ed", f"evaluation_dataset={task}",
              "--register", str(registry), *common])  # fmt: skip
    args = ["-c", *configs, "-d", mixture, "--checkpoint_descriptor", fmt, "--split", "validation", *common]
    main(["save_fisher", *args, "-f", "diagonal"])
    main(
        [
            "save_fisher" if fmt == "ia3" else "save_gram_matrix",
            *args,
            *(["-f", "blockwise"] if fmt == "ia3" else []),
        ]
    )

    out = root / "exp_out" / "merging" / "offline" / mixture / f"{scale}-t5" / fmt
    metrics: dict[str, Any] = {}
    main(["individual_models", *args, "-ed", "evaluation_split=test"])
    metrics["individual"] = read_json(out / "individual_models" / "results.json")["metrics"]["test"]
    for command, method_dir in (("average", "average"), ("task_vectors", "task_vectors"), ("ties", "ties"),
                                ("diagonal_fisherMerging", "diagonal_fisherMerging")):  # fmt: skip
        main([command, *args])
        metrics[command] = _test(configs, _merged(out, method_dir), mixture)
    if fmt == "full_model":
        main(["regmean", *args])
        metrics["regmean"] = _test(configs, _merged(out, "regmean"), mixture)
    ta = _merged(out, "task_vectors")
    cg = ["--model_lambda", "1.0", "--initialization", str(ta)]
    if fmt == "ia3":
        main(["conjugateGradient_fisherMerging", *args, *cg, "--num_iterations", "10", "-f", "blockwise"])
    else:
        main(["conjugateGradient_fisherMerging", *args, *cg, "--num_iterations", "100", "--use_backward"])
    mats_dir = next((out / "conjugate_gradients").glob("fisher_merging_*"))
    metrics["mats"] = _test(configs, Path(read_json(mats_dir / "results.json")["merged_model"]), mixture)
    return metrics


def multitask_score(scale: str, fmt: str, seed: int, runs: Path) -> dict[str, float]:
    """Test accuracy of the model trained on the whole mixture (the paper's upper reference)."""
    mixture = MIXTURE[scale]
    run = runs / scale / f"seed{seed}" / "exp_out" / "offline" / mixture / f"{scale}-t5" / fmt / f"seed{seed}"
    main(["inference", "-e", str(run), "-ed", "evaluation_split=test", "-i", mixture])
    idx = read_json(run / "results.json")["metrics"]["best_checkpoint_idx"]
    return read_json(run / f"inference_checkpoint_{idx}" / "test" / "results.json")["metrics"]["test"]


def cli(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=tuple(SCALE_CONFIGS), default="tiny")
    ap.add_argument("--format", nargs="+", choices=("full_model", "ia3"), required=True)
    ap.add_argument("--seed", nargs="+", type=int, default=[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/mats"))
    a = ap.parse_args(argv)
    # One process for several cells shares the loaded data and tokenised questions (`tasks`, `experiment`).
    for fmt in a.format:
        for seed in a.seed:
            start = time.perf_counter()
            metrics = run_seed(a.scale, fmt, seed, a.runs)
            metrics["multitask"] = multitask_score(a.scale, fmt, seed, a.runs)
            config = {"scale": a.scale, "format": fmt, "seed": seed, "runs": str(a.runs)}
            rd = RunDir(a.runs / a.scale / fmt / f"seed{seed}", project="mats", experiment=f"{a.scale}_{fmt}",
                        scale=a.scale, seed=seed, config=config)  # fmt: skip
            rd.write_results({method: scores["average"] for method, scores in metrics.items()}, per_task=metrics,
                             seconds=round(time.perf_counter() - start, 1))  # fmt: skip
            print(fmt, seed, {method: round(scores["average"], 4) for method, scores in metrics.items()})


if __name__ == "__main__":
    sys.exit(run_main(cli))
