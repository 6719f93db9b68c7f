"""Streaming safetensors merges (issue 9, row 7) against the in-memory merges of the same state dicts."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from projects.mats.merging import MergeError
from projects.mats.methods import METHODS
from projects.mats.streaming import SafetensorsReader, merge_safetensors

SHAPES = {"emb.weight": (37, 16), "a.weight": (16, 16), "a.bias": (16,), "scalar": (), "empty": (0, 4)}


def _checkpoints(tmp_path, n=3, dtype=torch.float32, ties_at_threshold=False):
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}
    models = []
    for _ in range(n):
        if ties_at_threshold:  # deltas on a coarse grid: many |τ| tie at the TIES threshold
            models.append(
                {k: v + torch.randint(-2, 3, v.shape, generator=g).to(dtype) / 4 for k, v in base.items()}
            )
        else:
            models.append({k: v + 0.1 * torch.randn(v.shape, generator=g).to(dtype) for k, v in base.items()})
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i, m in enumerate(models):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(m, str(paths[-1]))
    return base, models, paths


@pytest.mark.parametrize(
    "method, hparams",
    [
        ("task_arithmetic", {"model_lambda": 0.3}),
        ("average", {}),
        ("ties", {"variant": "mergekit", "top_k": 20.0, "weights": [1.0, 0.5, 2.0]}),
        ("ties", {"variant": "peft", "top_k": 50.0}),
    ],
)
@pytest.mark.parametrize("ties_at_threshold", [False, True])
def test_streamed_merge_equals_the_in_memory_merge(tmp_path, method, hparams, ties_at_threshold):
    base, models, paths = _checkpoints(tmp_path, ties_at_threshold=ties_at_threshold)
    out = tmp_path / "out" / "merged.safetensors"
    merge_safetensors(
        tmp_path / "base.safetensors", paths, out, method, metadata={"method": method}, **hparams
    )
    expected = METHODS[method](base, models, **hparams)
    got = load_file(str(out))  # the safetensors library reads what we wrote
    assert sorted(got) == sorted(base)
    for k in base:
        assert got[k].dtype == base[k].dtype and got[k].shape == base[k].shape
        assert torch.equal(got[k], expected[k]), k
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"method": method}
    assert [p.name for p in out.parent.iterdir()] == ["merged.safetensors"]  # no temp file left


def test_reader_reads_every_dtype(tmp_path):
    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f16": torch.randn(7).half(),
        "f64": torch.randn(2, 2, 2).double(),
        "i64": torch.arange(6).reshape(2, 3),
        "bool": torch.tensor([True, False, True]),
    }
    save_file(tensors, str(tmp_path / "t.safetensors"))
    with SafetensorsReader(tmp_path / "t.safetensors") as r:
        for k, v in tensors.items():
            assert torch.equal(r.view(k), v) and r.view(k).dtype == v.dtype
            r.release(k)
            assert torch.equal(r.view(k), v)  # read again after the pages were dropped


def test_bf16_checkpoints_stream_like_the_in_memory_merge(tmp_path):
    base, models, paths = _checkpoints(tmp_path, dtype=torch.bfloat16)
    merge_safetensors(tmp_path / "base.safetensors", paths, tmp_path / "o.safetensors", "task_arithmetic")
    got, expected = load_file(str(tmp_path / "o.safetensors")), METHODS["task_arithmetic"](base, models)
    assert all(torch.equal(got[k], expected[k]) for k in base)


def test_missing_tensor_and_mismatched_shape_name_the_tensor_and_file(tmp_path):
    _, models, paths = _checkpoints(tmp_path)
    out = tmp_path / "merged.safetensors"
    broken = dict(models[1])
    del broken["a.bias"]
    save_file(broken, str(paths[1]))
    with pytest.raises(MergeError, match=r"'a.bias'.*missing from .*m1\.safetensors"):
        merge_safetensors(tmp_path / "base.safetensors", paths, out, "task_arithmetic")
    reshaped = dict(models[1], **{"a.weight": torch.zeros(16, 15)})
    save_file(reshaped, str(paths[1]))
    with pytest.raises(MergeError, match=r"'a.weight' has shape \(16, 15\) in .*m1\.safetensors"):
        merge_safetensors(tmp_path / "base.safetensors", paths, out, "task_arithmetic")
    extra = dict(models[1], extra=torch.zeros(2))
    save_file(extra, str(paths[1]))
    with pytest.raises(MergeError, match=r"'extra' of .*m1\.safetensors is not in the base"):
        merge_safetensors(tmp_path / "base.safetensors", paths, out, "task_arithmetic")
    assert not out.exists()


def test_non_finite_model_and_unsupported_merges_fail_clearly(tmp_path):
    _, models, paths = _checkpoints(tmp_path)
    out = tmp_path / "merged.safetensors"
    save_file(dict(models[0], **{"a.weight": torch.full((16, 16), float("nan"))}), str(paths[0]))
    with pytest.raises(MergeError, match=r"model 0: a\.weight has NaN"):
        merge_safetensors(tmp_path / "base.safetensors", paths, out, "task_arithmetic")
    assert not out.exists() and list(tmp_path.glob(".merged*")) == []
    with pytest.raises(MergeError, match="variant 'mats'"):
        merge_safetensors(tmp_path / "base.safetensors", paths, out, "ties")
    with pytest.raises(MergeError, match="regmean"):
        merge_safetensors(tmp_path / "base.safetensors", paths, out, "regmean")
    with pytest.raises(KeyError, match="Did you mean 'average'"):
        merge_safetensors(tmp_path / "base.safetensors", paths, out, "averag")
