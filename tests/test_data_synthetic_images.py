"""The generated image domains of the tiny CLIP's distinct task pool (issue 17): shapes, determinism, classes
that can be told apart, a background per domain, and the task pool configs that list them."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import yaml

from common.data import IMAGE_TASKS, TINY_CLIP_DISTINCT_TASKS, TINY_CLIP_TASKS, load_image_task
from common.data import synthetic_images as synth

GENERATORS = {
    "greek": lambda n, seed=0: synth.glyphs("greek", n, seed),
    "cyrillic": lambda n, seed=0: synth.glyphs("cyrillic", n, seed),
    "symbols": lambda n, seed=0: synth.glyphs("symbols", n, seed),
    "shapes": lambda n, seed=0: synth.shapes(n, seed),
    "textures": lambda n, seed=0: synth.textures(n, seed),
}
CONFIGS = Path(__file__).resolve().parents[1] / "projects" / "smile" / "configs"


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generated_task_is_deterministic_28x28_with_ten_balanced_classes(name):
    images, labels, classes = GENERATORS[name](4)
    assert images.shape == (40, 1, 28, 28) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 255 and images.std() > 10
    assert len(classes) == 10 == len(set(classes)) and np.bincount(labels).tolist() == [4] * 10
    again, _, _ = GENERATORS[name](4)
    assert np.array_equal(images, again)
    assert not np.array_equal(images, GENERATORS[name](4, seed=1)[0])


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generated_classes_can_be_told_apart(name):
    """A nearest-centroid classifier on raw pixels beats chance (10%) twice over on held-out images (it cannot
    undo the random position, rotation and phase, so no more is asked)."""
    images, labels, _ = GENERATORS[name](24)
    x = images.reshape(len(labels), -1)
    train = np.arange(len(labels)) % 24 < 16
    centroids = np.stack([x[train & (labels == c)].mean(0) for c in range(10)])
    predicted = ((x[~train][:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == labels[~train]).mean() > 0.2


def test_each_generated_domain_has_its_own_background():
    """The per-domain "camera" (background level) that lets a 7x7 patch tell domains apart."""
    backgrounds = {
        n: float(np.median(GENERATORS[n](2)[0])) for n in ("greek", "cyrillic", "symbols", "shapes")
    }
    levels = sorted([0.0, *backgrounds.values()])  # 0: MNIST, digits and Animal-MNIST's black
    assert min(b - a for a, b in itertools.pairwise(levels)) > 30, backgrounds


def test_distinct_task_pool_lists_the_distinct_tasks_and_the_old_pool_is_kept():
    assert len(set(TINY_CLIP_DISTINCT_TASKS)) == 8 and set(TINY_CLIP_DISTINCT_TASKS) <= set(IMAGE_TASKS)
    read = lambda p: yaml.safe_load((CONFIGS / p).read_text())  # noqa: E731
    assert (
        read("taskpool/CLIPVisionModelTaskPool/tiny_clip_distinct8.yaml")["tasks"] == TINY_CLIP_DISTINCT_TASKS
    )
    assert read("tiny_finetune_distinct.yaml")["tasks"] == TINY_CLIP_DISTINCT_TASKS
    pool = read("modelpool/CLIPVisionModelPool/tiny_clip_distinct8.yaml")["models"]
    assert [m["name"] for m in pool] == ["_pretrained_", *TINY_CLIP_DISTINCT_TASKS]
    sweep = read("tiny_sweep_distinct.yaml")
    assert sweep["modelpool"].endswith("tiny_clip_distinct8") and sweep["taskpool"].endswith(
        "tiny_clip_distinct8"
    )
    assert sweep["experiment"] == "tiny_clip_distinct"
    # the old eight stay available under their names
    assert read("taskpool/CLIPVisionModelTaskPool/tiny_clip_TA8.yaml")["tasks"] == TINY_CLIP_TASKS


def test_generated_task_splits_are_stratified():
    splits, _ = load_image_task("textures", seed=0)
    assert sum(len(s) for s in splits.values()) == 10 * synth.PER_CLASS
    for split in splits.values():
        counts = np.bincount(split[:]["label"], minlength=10)
        assert counts.max() - counts.min() <= 1
