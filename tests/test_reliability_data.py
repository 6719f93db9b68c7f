"""Reliability under faults and careless input (issue 22): nothing lost, nothing silently wrong, no hangs.

One test per defect; each failed on the code before its fix. Micro models only, seconds each.
"""

from __future__ import annotations

import json
import math
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
    assert (target / "config.json").is_file() and not (target / "keep.txt").exists()


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


def _results_md_after_one_mats_run(tmp_path) -> tuple[str, str]:
    """(the committed RESULTS.md, the file after `results_md` read one run of mats' tiny_full_model)."""
    from common.results_md import main
    from common.rundir import RunDir

    out = tmp_path / "RESULTS.md"
    committed = (REPO / "RESULTS.md").read_text()
    out.write_text(committed)
    RunDir(
        tmp_path / "runs" / "a", project="mats", experiment="tiny_full_model", scale="tiny", seed=0, config={}
    ).write_results({"ties": 0.123})
    main(["--runs", str(tmp_path / "runs"), "--out", str(out)])
    return committed, out.read_text()


def test_results_md_with_one_projects_runs_keeps_the_other_sections(tmp_path):
    from common.results_md import sections

    committed, new = _results_md_after_one_mats_run(tmp_path)
    before, after = sections(committed), sections(new)
    assert set(after) == set(before) and {"mats", "smile", "leaderboard"} <= set(before)
    for project in set(before) - {"mats"}:  # untouched, byte for byte
        assert after[project] == before[project], project
    assert "0.123 (n=1)" in after["mats"] and after["mats"] != before["mats"]


def test_results_md_with_one_experiments_runs_keeps_the_projects_other_tables_and_grades(tmp_path):
    """Runs of one arm (here mats' tiny_full_model) redraw that experiment's table and the claims on it;
    the project's other tables and the other claims' grades stay as committed."""
    import yaml

    from common.results_md import sections

    committed, new = _results_md_after_one_mats_run(tmp_path)
    before, after = sections(committed)["mats"], sections(new)["mats"]
    spec = yaml.safe_load((REPO / "projects" / "mats" / "paper.yaml").read_text())
    titles = {e: info.get("title", e) for e, info in spec["experiments"].items()}

    def table(section: str, title: str) -> str:
        return section.split(f"### {title}\n", 1)[1].split("\n### ", 1)[0]

    for exp, title in titles.items():
        if exp != "tiny_full_model":
            assert table(after, title) == table(before, title), exp
    assert "0.123 (n=1)" in table(after, titles["tiny_full_model"])
    claims_before = table(before, "Claims").strip().splitlines()
    claims_after = table(after, "Claims").strip().splitlines()
    assert len(claims_after) == len(claims_before)
    for c, old, new in zip(spec["claims"], claims_before[2:], claims_after[2:], strict=False):
        if c["experiment"] != "tiny_full_model":
            assert new == old, c["text"]
        else:  # graded on the new runs: only 'ties' exists, so every claim on the arm reads "not run"
            assert new.endswith("| not run |"), new


# --- 4. a failed re-run leaves the folder's config.yaml alone ---------------------------------------


def test_failed_rerun_keeps_the_saved_config(tmp_path):
    from common.config import read_config_file
    from common.rundir import RunDir

    first = {"task": "code", "lr": 0.1}
    RunDir(tmp_path, project="p", experiment="e", scale="micro", seed=0, config=first).write_results({"x": 1})
    rerun = RunDir(tmp_path, project="p", experiment="e", scale="micro", seed=0, config={**first, "lr": 0.2})
    # ... the re-run fails here (its config check refuses the folder's checkpoints): no results written
    assert read_config_file(tmp_path / "config.yaml") == first
    rerun.write_results({"x": 2})  # a re-run that finishes owns the folder: its config goes with its results
    assert read_config_file(tmp_path / "config.yaml") == {**first, "lr": 0.2}


def test_failed_mats_train_rerun_keeps_the_saved_config(mats_run):
    from common.config import read_config_file
    from projects.mats.main import main

    run, _args = mats_run
    saved = (run / "config.yaml").read_text()
    with pytest.raises(ValueError, match="cannot resume"):
        main(_mats_args(run.parents[5], "lr=0.5"))
    assert (run / "config.yaml").read_text() == saved
    assert read_config_file(run / "config.yaml")["train_run"]["lr"] != 0.5


# --- 3. a repeated run keeps the validation-chosen checkpoint ---------------------------------------

MATS_CONFIGS = REPO / "projects" / "mats" / "configs"


def _mats_args(root: Path, *train_run: str) -> list[str]:
    return [
        "train", "-c", str(MATS_CONFIGS / "micro_t5.yaml"),
        "-td", "train_dataset=gsm_language_id", "-ed", "evaluation_dataset=gsm_language_id",
        "-tr", "micro_train_batch_size=4", "num_batches=6", *train_run, "-er", "eval_batch_size=8",
        "--register", str(root / "registry.yaml"),
        "-o", f"experiment.exp_out={root / 'exp_out'}", "experiment.run_name=seed0",
    ]  # fmt: skip


def _files(run: Path) -> dict[str, bytes]:
    """The run's outputs that a repeated run must reproduce byte for byte (results.json has wall times)."""
    names = [
        "checkpoints.json",
        *sorted(str(p.relative_to(run)) for p in run.glob("checkpoint_*/*") if p.is_file()),
    ]
    return {n: (run / n).read_bytes() for n in names}


@pytest.fixture(scope="module")
def mats_run(tmp_path_factory):
    """One micro MaTS expert trained through `main train` (6 steps, a validation every 2)."""
    from projects.mats.main import main

    root = tmp_path_factory.mktemp("mats")
    main(_mats_args(root))
    (run,) = (root / "exp_out").rglob("seed0")
    return run, _mats_args(root)


def test_mats_train_rerun_keeps_the_best_checkpoint(mats_run):
    from projects.mats.main import main

    run, args = mats_run
    first = _files(run)
    history = json.loads(first["checkpoints.json"])
    assert len(history) == 3  # validations at steps 2, 4, 6
    best = json.loads((run / "results.json").read_text())
    registry = (Path(args[args.index("--register") + 1])).read_text()
    main(args)  # the same command again: the run is finished, nothing may change
    assert _files(run) == first
    again = json.loads((run / "results.json").read_text())
    assert again["metrics"] == best["metrics"] and again["checkpoint"] == best["checkpoint"]
    assert Path(again["checkpoint"]).name == f"checkpoint_{best['metrics']['best_checkpoint_idx']}"
    assert (Path(args[args.index("--register") + 1])).read_text() == registry


MBC_MICRO = ["-c", str(REPO / "projects" / "mbc_arrow" / "configs" / "micro_notebook.yaml")]


def _mbc_train_expert(root: Path, task: str, *extra: str) -> dict:
    from projects.mbc_arrow.main import main

    main(["train-expert", *MBC_MICRO, "-k", f"finetune_task_name={task}", f"library_id=local://{root / 'lib'}",
          f"output_dir={root / 'run'}", "eval_every=1", *extra])  # fmt: skip
    return json.loads((root / "run" / "results.json").read_text())["metrics"]


@pytest.fixture(scope="module")
def mbc_expert(tmp_path_factory):
    """One micro mbc_arrow expert (3 steps, a validation after each) in a fresh library."""
    root = tmp_path_factory.mktemp("mbc")
    return root, _mbc_train_expert(root, "gsm_language_id")


def test_mbc_train_expert_rerun_keeps_the_best_validation_weights(mbc_expert):
    root, first = mbc_expert
    expert = root / "lib" / "experts" / "gsm_language_id"
    weights = {p.name: p.read_bytes() for p in expert.iterdir() if p.suffix == ".safetensors"}
    assert math.isfinite(first["val_loss_best"]) and first["val_loss_best"] <= first["val_loss_base"]
    again = _mbc_train_expert(root, "gsm_language_id", "force=True")  # finished run, re-run
    assert again["val_loss_best"] == first["val_loss_best"]
    assert {p.name: p.read_bytes() for p in expert.iterdir() if p.suffix == ".safetensors"} == weights


# --- 5. a run folder made for another task is refused, never resumed or shipped ---------------------


def test_mbc_train_expert_refuses_another_tasks_run_folder(mbc_expert):
    root, _ = mbc_expert
    with pytest.raises(ValueError, match=r"trained for another run.*'tasks': \(\['gsm_language_id'\]"):
        _mbc_train_expert(root, "champ_category", "expert_name=champ_category")
    assert not (root / "lib" / "experts" / "champ_category").exists()


def test_phatgoose_expert_refuses_another_tasks_run_folder(tmp_path):
    from datasets import Dataset

    from projects.phatgoose.experts import CHECKPOINT, TrainSettings, train_lora_expert

    settings = TrainSettings(num_steps=2, batch_size=2, gradient_accumulation_factor=1, max_length=16)
    rows = {
        "a": Dataset.from_dict({"source": ["one two", "three four"] * 2, "target": ["yes", "no"] * 2}),
        "b": Dataset.from_dict({"source": ["five six", "seven"] * 2, "target": ["no", "yes"] * 2}),
    }
    train_lora_expert("micro:t5", rows["a"], tmp_path, settings, rank=2, name="a")
    shipped = (tmp_path / CHECKPOINT / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"trained for another run.*'data'"):
        train_lora_expert("micro:t5", rows["b"], tmp_path, settings, rank=2, name="a")
    assert (tmp_path / CHECKPOINT / "adapter_model.safetensors").read_bytes() == shipped
    train_lora_expert("micro:t5", rows["a"], tmp_path, settings, rank=2, name="a")  # the same run: reused


def test_compatible_specialization_refuses_another_domains_run_folder(tmp_path):
    from projects.compatible_specialization.main import main

    args = ["--scale", "micro", "--arch", "gpt2", "--pretrained", "--train_mlp", "--batch_size", "4",
            "--train_tokens", "8", "--name", "specialist", "--out_dir", str(tmp_path)]  # fmt: skip
    main([*args, "--datasets", "tinycodes"])
    with pytest.raises(ValueError, match=r"trained for another run.*'domain': \('code', 'math'\)"):
        main([*args, "--datasets", "orca-math-problems"])


# --- 6. NaN/inf refused at load, naming the file and the tensor -------------------------------------


def test_phatgoose_nan_router_key_is_refused_at_load(tmp_path):
    from peft import LoraConfig
    from safetensors.torch import save_file

    from common.adapters import AdapterError
    from projects.phatgoose.library import read_expert, write_expert
    from projects.phatgoose.moe import Expert

    m = "encoder.block.0.layer.0.SelfAttention.q"
    expert = Expert("e", A={m: torch.randn(2, 4)}, B={m: torch.zeros(4, 2)}, scaling=1.0,
                    router={m: torch.randn(4)})  # fmt: skip
    write_expert(tmp_path / "e", LoraConfig(r=2, lora_alpha=2, target_modules=["q"]), expert)
    assert torch.equal(read_expert(tmp_path / "e").router[m], expert.router[m])
    save_file(
        {f"router.{m}": torch.tensor([1.0, float("nan"), 0.0, 0.0])},
        str(tmp_path / "e" / "extras.safetensors"),
    )
    with pytest.raises(
        AdapterError, match=rf"extras\.safetensors holds NaN/inf weights in \['router\.{m}'\]"
    ):
        read_expert(tmp_path / "e")


def test_arrow_nan_prototypes_are_refused_at_load(mbc_expert):
    from safetensors.torch import save_file

    from common.io import NonFiniteError
    from projects.mbc_arrow.library import get_expert_library

    root, _ = mbc_expert
    lib = get_expert_library(f"local://{root / 'lib'}")
    lib.add_auxiliary("gsm_language_id", "arrow-test", {"q": torch.ones(3)}, {"top_k": 1})
    aux = root / "lib" / "experts" / "gsm_language_id" / "aux" / "arrow-test.safetensors"
    save_file({"q": torch.tensor([1.0, float("inf"), 0.0])}, str(aux))  # written by someone else
    with pytest.raises(NonFiniteError, match=r"arrow-test\.safetensors holds NaN/inf weights in \['q'\]"):
        lib.get_auxiliary("gsm_language_id", "arrow-test")


def test_smile_simple_average_refuses_a_nan_model(clip_experts, tmp_path):
    from common.io import NonFiniteError
    from common.models import load_model

    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "mnist").symlink_to(clip_experts / "mnist")
    model = load_model(clip_experts / "digits", "clip_vision")
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    model.save_pretrained(pool / "digits")
    for method in ("simple_average", "task_arithmetic"):
        with pytest.raises(NonFiniteError, match=r"modelpool model 'digits' \(.*digits\) holds NaN/inf"):
            _smile_main(f"modelpool.expert_root={pool}", f"method={method}")


# --- 7. a crash while an expert is written leaves nothing a later run would reuse -------------------


def test_smile_expert_half_written_by_a_crash_is_not_reused(tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    from projects.smile.finetune import main

    def crash(self, folder, *args, **kwargs):  # the config lands, then the disk fills up
        self.config.save_pretrained(folder)
        raise OSError("No space left on device")

    args = ["--config", "projects/smile/configs/micro_finetune.yaml", f"out={tmp_path}", "tasks=[mnist]"]
    monkeypatch.chdir(REPO)
    with monkeypatch.context() as m:
        m.setattr(PreTrainedModel, "save_pretrained", crash)
        with pytest.raises(OSError, match="No space left"):
            main(args)
    assert not (tmp_path / "mnist").exists()
    main(args)  # the next run trains (resumes) and saves the expert instead of "reusing" a config.json
    assert (tmp_path / "mnist" / "model.safetensors").is_file()


# --- 8. commands that need no hub run offline; hub calls have timeouts ------------------------------


def test_hub_defaults_follow_the_scale_and_keep_user_values():
    from common.hub_env import OFFLINE, TIMEOUTS, apply_hub_defaults, hub_defaults

    micro = str(MATS_CONFIGS / "micro_t5.yaml")
    for argv in (["x", "--scale", "micro"], ["x", "scale=tiny"], ["x", "-c", micro], ["x", "--dry_run"],
                 ["x", "--scale=real"], ["x", "modelpool.scale=micro"]):  # fmt: skip
        assert all(hub_defaults(argv)[k] == "1" for k in OFFLINE), argv
    for argv in (
        ["x"],
        ["x", "--scale", "paper"],
        ["x", "--scale", "tiny", "-c", str(MATS_CONFIGS / "paper_t5_large.yaml")],
    ):
        assert hub_defaults(argv) == TIMEOUTS, argv  # may need the hub: only the timeouts
    env = {"HF_HUB_OFFLINE": "0", "HF_HUB_ETAG_TIMEOUT": "99"}
    added = apply_hub_defaults(["x", "--scale", "micro"], env)
    assert env["HF_HUB_OFFLINE"] == "0" and env["HF_HUB_ETAG_TIMEOUT"] == "99"  # the user's values stay
    assert env["HF_DATASETS_OFFLINE"] == "1" and "HF_HUB_OFFLINE" not in added


def test_dry_run_entry_point_does_not_hang_on_a_silent_network(tmp_path):
    """The issue's case: a network that accepts connections and never answers; HF_HUB_OFFLINE unset."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # connections are accepted by the kernel; nothing is ever sent back
        port = silent.getsockname()[1]
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))
        }
        env |= {
            "HF_ENDPOINT": f"http://127.0.0.1:{port}",
            "PYTHONPATH": str(REPO),
            "HF_HOME": str(tmp_path / "hf"),
        }
        argv = [
            "-m",
            "projects.mats.main",
            "train",
            "--dry_run",
            "-c",
            str(MATS_CONFIGS / "paper_t5_large.yaml"),
        ]
        out = subprocess.run(
            [sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
    assert out.returncode == 0 and "parameters" in out.stdout, out.stderr[-2000:]


def test_entry_point_sets_offline_before_transformers_reads_it():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE"))}
    code = (  # as `python -m projects.<p>.main --scale micro` starts: sys.argv[0] is "-m" while packages import
        "import sys; sys.argv = ['-m', '--scale', 'micro']; import projects; "
        "from huggingface_hub import constants; import os; "
        "print(constants.HF_HUB_OFFLINE, os.environ['HF_DATASETS_OFFLINE'], constants.HF_HUB_ETAG_TIMEOUT)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.stdout.split() == ["True", "1", "10"], out.stderr
