"""Test-wide settings: one thread (torch with 2 threads slows ~10x when the other core is busy),
hermetic Hugging Face caches under a temp dir, and Triton in interpreter mode (set before any kernel
module is imported, since @triton.jit reads it at decoration time)."""

import os
import tempfile

_cache = tempfile.mkdtemp(prefix="moerging-test-cache-")
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HOME": os.path.join(_cache, "hf"),
    "HF_DATASETS_CACHE": os.path.join(_cache, "datasets"),
    "TOKENIZERS_PARALLELISM": "false",
    "TRITON_INTERPRET": "1",
    "OMP_NUM_THREADS": "1",
    "MOERGING_CACHE": os.path.join(_cache, "moerging"),
    "MOERGING_SHIPPED": os.path.join(_cache, "shipped"),  # not the repository's zoo/
}.items():
    os.environ[key] = value

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
