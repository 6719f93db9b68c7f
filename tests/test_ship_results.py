"""common.ship_results: what a run folder ships into results/, and what it keeps out."""

import pytest

from common.ship_results import main, ship, shippable


def _tree(root, files):
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_ships_tables_results_and_plots_and_keeps_training_state_out(tmp_path):
    src, dest = tmp_path / "runs" / "p" / "real", tmp_path / "results" / "p" / "real"
    _tree(
        src,
        {
            "table.md": b"| a |",
            "routing.png": b"\x89PNG",
            "routing.json": b"{}",
            "seed_0/results.json": b'{"x": 1}',
            "seed_0/config.yaml": b"seed: 0",
            "seed_0/checkpoints/step_5/trainer_state.json": b"{}",
            "seed_0/snapshots/step_0.safetensors": b"w",
            "seed_0/weights.safetensors": b"w",
            "seed_0/train_log.jsonl": b"{}",
            "seed_0/.lock": b"",
            ".partial/seed_1/arrow.json": b"{}",
            "big.json": b"x" * 101,
        },
    )
    keep, large = shippable(src, max_bytes=100)
    assert [str(p) for p in keep] == [
        "routing.json",
        "routing.png",
        "seed_0/config.yaml",
        "seed_0/results.json",
        "table.md",
    ]
    assert [str(p) for p in large] == ["big.json"]
    report = ship(src, dest, max_bytes=100)
    assert (dest / "seed_0" / "results.json").read_bytes() == b'{"x": 1}'
    assert (dest / "routing.png").read_bytes() == b"\x89PNG"
    assert not (dest / "big.json").exists() and not (dest / "seed_0" / "checkpoints").exists()
    assert report["only_in_dest"] == []


def test_files_only_in_dest_are_kept_and_listed(tmp_path, capsys):
    src, dest = tmp_path / "src", tmp_path / "dest"
    _tree(src, {"seed_1/results.json": b"new"})
    _tree(dest, {"seed_0/results.json": b"old", "seed_1/results.json": b"stale"})
    main([str(src), str(dest)])
    assert (dest / "seed_0" / "results.json").read_bytes() == b"old"
    assert (dest / "seed_1" / "results.json").read_bytes() == b"new"
    out = capsys.readouterr().out
    assert "shipped 1 files" in out and "only in dest: seed_0/results.json" in out


def test_a_missing_or_empty_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="is not a folder"):
        ship(tmp_path / "nope", tmp_path / "dest")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    (tmp_path / "empty" / "checkpoints" / "latest.json").write_text("{}")
    with pytest.raises(SystemExit, match="holds no"):
        ship(tmp_path / "empty", tmp_path / "dest")
