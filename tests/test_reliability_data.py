"""Reliability under faults and careless input (issue 22): nothing lost, nothing silently wrong, no hangs.

One test per defect; each failed on the code before its fix. Micro models only, seconds each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.io import OUTPUT_MARKER, OutputExistsError, atomic_dir

# --- 1. saving to an existing folder must not delete what the user had there -------------------------


def test_atomic_dir_refuses_a_folder_it_did_not_write(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    with (
        pytest.raises(OutputExistsError, match=r"mine.*not empty.*overwrite=true"),
        atomic_dir(user, kind="smile merged model") as tmp,
    ):
        (tmp / "model.safetensors").write_text("x")
    assert (user / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp folder left


def test_atomic_dir_replaces_its_own_output_of_the_same_kind_only(tmp_path):
    out = tmp_path / "model"
    for value in ("1", "2"):  # a re-run replaces the previous output of the same kind
        with atomic_dir(out, kind="smile merged model") as tmp:
            (tmp / "w").write_text(value)
    assert (out / "w").read_text() == "2"
    assert json.loads((out / OUTPUT_MARKER).read_text()) == {"kind": "smile merged model"}
    with pytest.raises(OutputExistsError, match="holds a smile merged model, not a previous other"):
        with atomic_dir(out, kind="other"):
            pass
    with atomic_dir(out, kind="other", overwrite=True) as tmp:  # explicit overwrite replaces
        (tmp / "v").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "v"]


def test_atomic_dir_never_replaces_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text("1,2")
    for overwrite in (False, True):
        with (
            pytest.raises(OutputExistsError, match="working directory"),
            atomic_dir(".", kind="smile merged model", overwrite=overwrite),
        ):
            pass
    assert (tmp_path / "data.csv").read_text() == "1,2"


def _clip_experts(root: Path) -> Path:
    """Two perturbed copies of the micro CLIP vision tower saved under `root` (micro_clip's expert_root)."""
    from common.models import load_model
    from common.tiny_world import tiny_base

    for i, name in enumerate(("mnist", "digits")):
        model = load_model(tiny_base("clip", "micro"), "clip_vision")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (i + 1))
        model.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def clip_experts(tmp_path_factory):
    return _clip_experts(tmp_path_factory.mktemp("clip_experts"))


def _smile_main(*args: str) -> dict:
    from projects.smile.main import main

    return main(["modelpool=CLIPVisionModelPool/micro_clip", *args])


def test_smile_merged_model_save_path_keeps_a_foreign_folder(clip_experts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "thesis.tex").write_text("years of work")
    pool = [f"modelpool.expert_root={clip_experts}", "method=simple_average"]
    with pytest.raises(OutputExistsError, match=r"working directory"):
        _smile_main(*pool, "merged_model_save_path=.")
    assert (tmp_path / "thesis.tex").read_text() == "years of work"
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("k")
    with pytest.raises(OutputExistsError, match=r"other.*overwrite=true"):
        _smile_main(*pool, f"merged_model_save_path={other}")
    assert (other / "keep.txt").read_text() == "k"
    _smile_main(*pool, f"merged_model_save_path={other}", "overwrite=true")
    assert (other / "model.safetensors").is_file() and not (other / "keep.txt").exists()
    _smile_main(*pool, f"merged_model_save_path={other}")  # its own output: replaced without the option


def test_smile_method_model_path_keeps_a_foreign_folder(clip_experts, tmp_path):
    target = tmp_path / "upscaled"
    target.mkdir()
    (target / "keep.txt").write_text("k")
    args = [
        f"modelpool.expert_root={clip_experts}",
        "method=smile_upscaling/smile_upscaling",
        "method.gate_k=1",
        "method.k=2",
        f"method.model_path={target}",
    ]
    with pytest.raises(OutputExistsError, match=r"upscaled.*overwrite=true"):
        _smile_main(*args)
    assert (target / "keep.txt").read_text() == "k"
    _smile_main(*args, "overwrite=true")
    assert (target / "smile.json").is_file()


# --- 2. RESULTS.md is merged per project, never replaced by empty tables ----------------------------

REPO = Path(__file__).resolve().parents[1]


def test_results_md_without_runs_leaves_the_committed_file(tmp_path):
    from common.results_md import main

    out = tmp_path / "RESULTS.md"
    committed = (REPO / "RESULTS.md").read_text()
    out.write_text(committed)
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit, match=r"no results\.json.*refusing to replace"):
        main(["--runs", str(tmp_path / "runs"), "--out", str(out)])
    assert out.read_text() == committed


def test_results_md_with_one_projects_runs_keeps_the_other_sections(tmp_path):
    from common.results_md import main, sections
    from common.rundir import RunDir

    out = tmp_path / "RESULTS.md"
    committed = (REPO / "RESULTS.md").read_text()
    out.write_text(committed)
    RunDir(
        tmp_path / "runs" / "a", project="mats", experiment="tiny_full_model", scale="tiny", seed=0, config={}
    ).write_results({"ties": 0.123})
    main(["--runs", str(tmp_path / "runs"), "--out", str(out)])
    before, after = sections(committed), sections(out.read_text())
    assert set(after) == set(before) and len(before) == 5
    for project in set(before) - {"mats"}:  # untouched, byte for byte
        assert after[project] == before[project], project
    assert "0.123 ± 0 (n=1)" in after["mats"] and after["mats"] != before["mats"]
