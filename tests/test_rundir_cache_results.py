import json

import pytest

from common.cache import cached_dir, content_hash
from common.results_md import aggregate, check_claim, load_results, render
from common.rundir import SCHEMA, RunDir, markdown_table


def test_rundir_writes_config_results_with_provenance(tmp_path):
    run = RunDir(tmp_path / "r", project="p", experiment="e", scale="micro", seed=3, config={"lr": 0.1})
    run.write_results({"loss": 1.5, "acc": {"a": 0.5}})
    rec = json.loads((tmp_path / "r" / "results.json").read_text())
    assert rec["schema"] == SCHEMA and rec["seed"] == 3 and rec["config"] == {"lr": 0.1}
    prov = rec["provenance"]
    assert {"git_sha", "packages", "torch_threads", "wall_time_s", "seed"} <= set(prov)
    assert prov["packages"]["torch"].startswith("2.") and prov["wall_time_s"] >= 0
    assert (tmp_path / "r" / "config.yaml").read_text().strip() == "lr: 0.1"
    with pytest.raises(ValueError, match="unknown scale"):
        RunDir(tmp_path / "s", project="p", experiment="e", scale="huge", seed=0, config={})


def test_markdown_table():
    assert (
        markdown_table([{"a": 1, "b": 0.123456}, {"a": 2}])
        == "| a | b |\n|---|---|\n| 1 | 0.1235 |\n| 2 |  |"
    )


def test_cache_builds_once_and_ignores_partial(tmp_path):
    calls = []

    def build(d):
        calls.append(1)
        (d / "f").write_text("x")

    key = {"b": 1, "a": [1, 2]}
    assert content_hash(key) == content_hash({"a": [1, 2], "b": 1})
    p1 = cached_dir("k", key, build, root=tmp_path)
    p2 = cached_dir("k", key, build, root=tmp_path)
    assert p1 == p2 and len(calls) == 1 and (p1 / "f").read_text() == "x"

    def crash(d):
        (d / "f").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_dir("k", {"other": 1}, crash, root=tmp_path)
    assert not (tmp_path / "k" / content_hash({"other": 1})).exists()


def test_results_md_aggregates_seeds_and_checks_claims(tmp_path):
    for seed, (a, b) in enumerate([(1.0, 2.0), (3.0, 2.0), (2.0, 2.0)]):
        run = RunDir(
            tmp_path / "runs" / f"s{seed}",
            project="demo",
            experiment="e1",
            scale="tiny",
            seed=seed,
            config={},
        )
        run.write_results({"moe": a, "interp": {"best": b}})
    RunDir(
        tmp_path / "runs" / "m", project="demo", experiment="e1", scale="micro", seed=0, config={}
    ).write_results({"moe": 100.0})
    records = load_results(tmp_path / "runs", scale="tiny")
    assert len(records) == 3
    stats = aggregate(records)[("demo", "e1")]
    mean, std, n = stats["moe"]
    assert (mean, round(std, 6), n) == (2.0, 1.0, 3)
    # moe = 2 ± 1 over seeds, interp.best = 2 ± 0: a difference under one std is flagged as noise.
    assert (
        check_claim({"lhs": "moe", "op": "<=", "rhs": "interp.best"}, stats) == "yes, within the seed spread"
    )
    assert check_claim({"lhs": "moe", "op": "<", "rhs": 1.5}, stats) == "no, within the seed spread"
    assert check_claim({"lhs": "moe", "op": "<", "rhs": 3.5}, stats) == "yes"
    assert check_claim({"lhs": "moe", "op": ">", "rhs": 3.5}, stats) == "no"
    assert check_claim({"lhs": "missing", "op": "<", "rhs": 1}, stats) == "not run"
    # one seed on either side: no spread to judge the gap by, and the grade says so
    one = {**stats, "solo": (1.0, 0.0, 1)}
    assert check_claim({"lhs": "solo", "op": "<", "rhs": "moe"}, one) == "yes, one seed"
    assert check_claim({"lhs": "moe", "op": "<", "rhs": "solo"}, one) == "no, one seed"
    assert check_claim({"lhs": "solo", "op": "<", "rhs": 3.5}, one) == "yes, one seed"
    with pytest.raises(KeyError, match="unknown comparison"):
        check_claim({"lhs": "moe", "op": "=<", "rhs": 1}, stats)
    proj = tmp_path / "projects" / "demo"
    proj.mkdir(parents=True)
    (proj / "paper.yaml").write_text(
        "paper: Demo\nexperiments:\n  e1:\n    title: Table 1\n    paper: {moe: 1.9}\n"
        "claims:\n  - {text: routing helps, experiment: e1, lhs: moe, op: '<=', rhs: interp.best}\n"
    )
    md = render(records, tmp_path / "projects")
    assert "| moe | 2 ± 1 (n=3) | 1.9 |" in md and "| routing helps | yes, within the seed spread |" in md


def test_check_same_config_refuses_a_folder_made_with_another_config(tmp_path):
    from common.rundir import check_same_config

    cfg = {"lr": 0.1, "tasks": ("a", "b"), "train": {"steps": 5}}
    check_same_config(tmp_path, cfg)  # no config.yaml yet: nothing to compare
    RunDir(tmp_path, project="p", experiment="e", scale="micro", seed=0, config=cfg)
    check_same_config(tmp_path, dict(cfg))  # same config (the tuple reads back as a list)
    check_same_config(tmp_path, {**cfg, "tasks": ["c"]}, may_change=("tasks",))
    with pytest.raises(ValueError, match=r"'train': \(\{'steps': 5\}, \{'steps': 6\}\)"):
        check_same_config(tmp_path, {**cfg, "train": {"steps": 6}})
    with pytest.raises(ValueError, match="'new_key': \\(None, 1\\)"):
        check_same_config(tmp_path, {**cfg, "new_key": 1})
    # where logs go changes no result: a folder made before `log_backend` existed is still reused
    check_same_config(tmp_path, {**cfg, "train": {"steps": 5, "log_backend": "tensorboard"}})


def test_weights_digest_is_over_the_safetensors_bytes_and_follows_a_rewrite(tmp_path):
    import hashlib

    import torch
    from safetensors.torch import save_file

    from common.cache import weights_digest

    with pytest.raises(FileNotFoundError, match=r"no \.safetensors weights"):
        weights_digest(tmp_path)
    save_file({"w": torch.ones(3)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")  # not weights: not hashed
    blob = (tmp_path / "model.safetensors").read_bytes()
    assert weights_digest(tmp_path) == hashlib.sha256(b"model.safetensors\0" + blob).hexdigest()[:16]
    before = weights_digest(tmp_path)
    save_file({"w": torch.full((3,), 2.0)}, tmp_path / "model.safetensors")  # retrained: other bytes
    assert weights_digest(tmp_path) != before


def test_a_scale_with_tables_of_its_own_does_not_overwrite_the_others(tmp_path):
    """The real arm runs the tiny arm's experiments under the same names: paper.yaml tables that name an
    experiment and a scale take those runs, and the experiment's own table keeps the other scales'."""
    for scale, value in (("tiny", 5.0), ("real", 2.0)):
        RunDir(
            tmp_path / "runs" / scale, project="demo", experiment="e1", scale=scale, seed=0, config={}
        ).write_results({"moe": value})
    proj = tmp_path / "projects" / "demo"
    proj.mkdir(parents=True)
    (proj / "paper.yaml").write_text(
        "paper: Demo\nexperiments:\n  e1:\n    title: Tiny table\n"
        "  real_e1:\n    title: Real table\n    experiment: e1\n    scale: real\n"
        "claims:\n  - {text: tiny claim, experiment: e1, lhs: moe, op: '<', rhs: 3}\n"
        "  - {text: real claim, experiment: real_e1, lhs: moe, op: '<', rhs: 3}\n"
    )
    both = render(load_results(tmp_path / "runs", scale=None), tmp_path / "projects")
    tiny_part, real_part = both.split("### Real table")
    assert "| moe | 5 (n=1) |" in tiny_part and "| moe | 2 (n=1) |" in real_part
    assert "| tiny claim | no, one seed |" in both and "| real claim | yes, one seed |" in both
    # the real runs alone: the tiny table and its grade stay as the file had them
    real_only = render(load_results(tmp_path / "runs", scale="real"), tmp_path / "projects", previous=both)
    assert real_only == both


def test_finished_results_are_reused_only_under_the_same_config(tmp_path):
    from common.rundir import finished_results

    cfg = {"lr": 0.1, "tasks": ("a", "b"), "train": {"steps": 5}}
    assert finished_results(tmp_path, cfg) is None  # nothing written
    run = RunDir(tmp_path, project="p", experiment="e", scale="micro", seed=0, config=cfg)
    assert finished_results(tmp_path, cfg) is None  # config written, no results yet (a killed run)
    run.write_results({"loss": 1.5})
    assert finished_results(tmp_path, dict(cfg)) == {
        "loss": 1.5
    }  # the tuple as results.json holds it (a list)
    assert finished_results(tmp_path, {**cfg, "train": {"steps": 5, "log_backend": "tensorboard"}}) == {
        "loss": 1.5
    }  # a result-neutral key
    assert finished_results(tmp_path, {**cfg, "train": {"steps": 6}}) is None
    assert finished_results(tmp_path, {**cfg, "new_key": 1}) is None
