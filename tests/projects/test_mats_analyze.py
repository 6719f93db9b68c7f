"""MaTS figures from stand-in results laid out as reproduce.py writes them: means checked by hand."""

import pytest

from common.io import read_json, write_json
from projects.mats.analyze import figures


def _seed(runs, seed, per_task, sweeps):
    root = runs / "micro" / "full_model" / f"seed{seed}"
    write_json(root / "results.json", {"metrics": {}, "per_task": per_task})
    merging = (
        runs / "micro" / f"seed{seed}" / "exp_out" / "merging" / "offline" / "mix" / "micro-t5" / "full_model"
    )
    for method_dir, (method, points) in sweeps.items():
        sweep = [{"model_lambda": lam, "average": acc, "t1": acc} for lam, acc in points]
        write_json(merging / method_dir / "results.json", {"merge": {"method": method}, "sweep": sweep})
    write_json(merging / "individual_models" / "results.json", {"metrics": {}})  # no sweep: not a curve


def test_per_task_bars_and_lambda_curves_average_over_seeds(tmp_path):
    _seed(
        tmp_path,
        0,
        {"mats": {"t1": 0.5, "t2": 0.7, "average": 0.6}, "average": {"t1": 0.2, "t2": 0.4, "average": 0.3}},
        {
            "regmean": ("regmean", [(0.0, 0.4), (0.5, 0.6)]),
            "conjugate_gradients/fisher_merging_x": ("conjugate_gradient", [(0.0, 0.1), (1.0, 0.3)]),
            "average": ("average", [(1.0, 0.2)]),  # one point: no curve
        },
    )
    _seed(
        tmp_path,
        1,
        {"mats": {"t1": 0.7, "t2": 0.9, "average": 0.8}},
        {"regmean": ("regmean", [(0.0, 0.6), (0.5, 0.8)])},
    )
    written = figures(tmp_path, "micro")
    assert sorted(p.name for p in written) == ["lambda_full_model.png", "per_task_full_model.png"]
    assert all(p.stat().st_size > 1000 for p in written)
    bars = read_json(tmp_path / "micro" / "per_task_full_model.json")
    assert bars["mean"]["mats"] == pytest.approx({"t1": 0.6, "t2": 0.8})  # (0.5 + 0.7) / 2, (0.7 + 0.9) / 2
    assert bars["mean"]["average"] == pytest.approx({"t1": 0.2, "t2": 0.4})  # one seed
    curves = read_json(tmp_path / "micro" / "lambda_full_model.json")
    assert curves["mean"]["regmean"] == pytest.approx({"0.0": 0.5, "0.5": 0.7})
    assert curves["mean"]["conjugate_gradient"] == pytest.approx({"0.0": 0.1, "1.0": 0.3})
    assert set(curves["mean"]) == {"regmean", "conjugate_gradient"}
