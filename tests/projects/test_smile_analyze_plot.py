"""The SMILE grid plot's log axis stays readable when the grid spans less than a decade of sizes."""

import itertools

import pytest

from common.rundir import RunDir
from projects.smile.analyze import plot_grid


@pytest.mark.parametrize("ratios", [(1.0, 1.15, 1.3, 1.6), (1.02, 1.9, 4.5), (1.1, 3.0, 12.0)])
def test_grid_plot_tick_labels_do_not_overlap(tmp_path, ratios):
    run = {"individual": 0.8, "task_arithmetic": 0.6}
    for i, r in enumerate(ratios):
        run |= {f"smile_g{i}_k4": 0.7, f"smile_g{i}_k4_params_ratio": r}
    rd = RunDir(tmp_path, project="smile", experiment="t", scale="micro", seed=None, config={})
    fig = plot_grid([run], rd)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    labels = [
        t
        for t in ax.get_xticklabels(minor=False) + ax.get_xticklabels(minor=True)
        if t.get_visible() and t.get_text() and lo <= t.get_position()[0] <= hi
    ]
    assert len(labels) >= 2  # the axis is still labelled
    boxes = [t.get_window_extent(renderer) for t in labels]
    overlapping = [
        (a.get_text(), b.get_text())
        for (a, ba), (b, bb) in itertools.combinations(zip(labels, boxes), 2)
        if ba.overlaps(bb)
    ]
    assert not overlapping
    assert (tmp_path / "grid_accuracy_vs_params.png").is_file()
