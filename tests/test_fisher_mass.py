"""`leaderboard.fisher_mass`: each expert's share of the diagonal Fisher, on hand-made Fishers and on a
micro full fine-tuning zoo (the leaderboard's cached statistics)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from common import zoo
from common.io import read_json, save_tensors
from leaderboard import fisher_mass, mats, run
from tests.test_zoo import MICRO, micro_context

LIBRARY = ("breast_cancer", "code_name")


def test_mass_share_and_ownership_by_hand(tmp_path, monkeypatch):
    # a: w = [1, 3], v = [0.5]; b: w = [2, 0], v = [1.5]  ->  masses 4.5 and 3.5 (total 8);
    # the largest F per entry: w0 b, w1 a, v b  ->  a owns 1 of 3 entries, b 2 of 3
    fishers = {
        "a": {"w": torch.tensor([1.0, 3.0]), "v": torch.tensor([0.5])},
        "b": {"w": torch.tensor([2.0, 0.0]), "v": torch.tensor([1.5])},
    }
    for task, tensors in fishers.items():
        save_tensors(tmp_path / task / "fisher.safetensors", tensors)
    monkeypatch.setattr(mats, "stats_folder", lambda ctx, task, kind: tmp_path / task)
    ctx = SimpleNamespace(experts={"a": Path("a"), "b": Path("b")})
    got = fisher_mass.fisher_mass(ctx, "fisher")
    assert got["a"] == pytest.approx({"mass": 4.5, "share": 4.5 / 8, "owned": 1 / 3})
    assert got["b"] == pytest.approx({"mass": 3.5, "share": 3.5 / 8, "owned": 2 / 3})
    with pytest.raises(ValueError, match="diagonal Fisher"):
        fisher_mass.fisher_mass(ctx, "blockwise_fisher")


def test_micro_full_zoo_reads_the_leaderboards_statistics_and_reuses_its_result(tmp_path, monkeypatch):
    settings = dataclasses.replace(MICRO, adapter="full")
    ctx = micro_context(LIBRARY, settings)
    monkeypatch.setitem(run.ADAPTER_ZOOS, "full", (settings, LIBRARY, ()))
    paths = fisher_mass.write_fisher_mass([0], "full", tmp_path)
    result = read_json(tmp_path / "fisher_mass" / "seed_0.json")
    for kind in fisher_mass.KINDS:
        by_hand = {}
        for task in LIBRARY:  # the cached statistics the Fisher merges read, summed here directly
            stats = mats.expert_stats(ctx, task, kind)["fisher"]
            by_hand[task] = sum(float(t.double().sum()) for t in stats.values())
        total = sum(by_hand.values())
        for task in LIBRARY:
            got = result["kinds"][kind][task]
            assert got["mass"] == pytest.approx(by_hand[task], rel=1e-9)
            assert got["share"] == pytest.approx(by_hand[task] / total, rel=1e-9)
        assert sum(result["kinds"][kind][t]["owned"] for t in LIBRARY) == pytest.approx(1.0)
    assert set(result["scores"]) == set(LIBRARY) and result["models"]["fingerprint"]
    table = paths[-1].read_text()
    assert all(f"| 0 | {task} |" in table for task in LIBRARY)
    # a second run reuses the result made on the same weights and settings
    monkeypatch.setattr(fisher_mass, "fisher_mass", lambda *a: pytest.fail("recomputed"))
    fisher_mass.write_fisher_mass([0], "full", tmp_path)
    # a fresh machine (the zoo not cached): the saved result is kept and the table written, nothing computed
    monkeypatch.setattr(zoo, "is_cached", lambda *a, **k: False)
    table_again = fisher_mass.write_fisher_mass([0], "full", tmp_path)[-1].read_text()
    assert table_again == table
    with pytest.raises(SystemExit, match=r"python -m common\.zoo --adapter full"):  # a seed never computed
        fisher_mass.write_fisher_mass([1], "full", tmp_path)
