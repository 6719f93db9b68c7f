import pickle

import pytest
import torch

from common.io import atomic_dir, atomic_path, load_tensors, save_tensors, torch_load_safe


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_dir_replaces_whole(tmp_path):
    target = tmp_path / "lib"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(ValueError), atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
        raise ValueError
    assert [p.name for p in target.iterdir()] == ["a"]
    with atomic_dir(target) as tmp:
        (tmp / "c").write_text("3")
    assert [p.name for p in target.iterdir()] == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib"]


def test_safetensors_roundtrip_and_nan_refused(tmp_path):
    t = {"w": torch.randn(3, 4), "i": torch.arange(5)}
    save_tensors(tmp_path / "x.safetensors", t)
    back = load_tensors(tmp_path / "x.safetensors")
    assert torch.equal(back["w"], t["w"]) and torch.equal(back["i"], t["i"])
    with pytest.raises(ValueError, match=r"non-finite.*\['w'\]"):
        save_tensors(tmp_path / "y.safetensors", {"w": torch.tensor([1.0, float("nan")])})
    assert not (tmp_path / "y.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="no such safetensors"):
        load_tensors(tmp_path / "nope.safetensors")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_torch_load_safe_refuses_arbitrary_objects(tmp_path):
    ok = tmp_path / "ok.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "step": 3}, ok)
    assert torch.equal(torch_load_safe(ok)["state_dict"]["w"], torch.ones(2))
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(ValueError, match="weights_only=True"):
        torch_load_safe(evil)
