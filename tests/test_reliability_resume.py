"""Kill and resume (issue 22): a training entrypoint killed at a step and run again ends with the same files,
byte for byte, as a run that was never interrupted. Micro models, in-process, seconds each.

The kill is simulated deterministically inside `common.training`, the loop every project trains with:
either during a step's forward pass (the work since the last checkpoint is lost and redone), or right after
a checkpoint is written (the most awkward moment for anything written beside it). The step is drawn from a
seeded RNG, so every run of the suite kills at the same places."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import gin
import pytest

import common.training as T

IGNORED = {".lock"}  # holds the pid of the process that wrote the folder


class Killed(BaseException):  # not an Exception: nothing on the way up may catch and survive it
    pass


def kill_at(monkeypatch, step: int, when: str) -> None:
    """Make the next training run die at `step`: 'forward' (inside the step) or 'checkpoint' (just after
    the step's checkpoint is saved). The patch is removed once it fired, so the re-run trains normally."""
    real_loss, real_save = T._loss_value, T._save_checkpoint

    def loss_value(loss, at):
        if when == "forward" and at == step:
            monkeypatch.undo()
            raise Killed(f"killed in step {at}")
        return real_loss(loss, at)

    def save_checkpoint(run_dir, at, *args, **kwargs):
        real_save(run_dir, at, *args, **kwargs)
        if when == "checkpoint" and at == step:
            monkeypatch.undo()
            raise Killed(f"killed after saving step {at}")

    monkeypatch.setattr(T, "_loss_value", loss_value)
    monkeypatch.setattr(T, "_save_checkpoint", save_checkpoint)


def files(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path; results.json without its provenance (wall time, date)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name in IGNORED:
            continue
        data = path.read_bytes()
        if path.name == "results.json":
            record = json.loads(data)
            record.pop("provenance", None)
            data = json.dumps(record, sort_keys=True).encode()
        out[str(path.relative_to(root))] = data
    return out


def assert_same_files(reference: Path, resumed: Path) -> None:
    a, b = files(reference), files(resumed)
    assert sorted(a) == sorted(b), f"different file lists: {sorted(set(a) ^ set(b))}"
    differ = [name for name in a if a[name] != b[name]]
    assert not differ, f"files that differ after kill and resume: {differ}"


def kill_then_resume(monkeypatch, tmp_path: Path, run, folder: str, step: int, when: str) -> None:
    """Run uninterrupted into `folder`, move it aside; run again killed at `step`, re-run; compare."""
    run()
    shutil.move(tmp_path / folder, tmp_path / "reference")
    kill_at(monkeypatch, step, when)
    with pytest.raises(Killed):
        run()
    run()
    assert_same_files(tmp_path / "reference", tmp_path / folder)


def draw(seed: int, low: int, high: int) -> int:
    return random.Random(seed).randint(low, high)


# compatible_specialization: 6 MLP fine-tuning steps, a checkpoint every 2, snapshots at 0, 2, 4, 5 and 6.
@pytest.mark.parametrize("when, step", [("forward", draw(1, 1, 6)), ("checkpoint", 2 * draw(2, 1, 2))])
def test_compatible_specialization_finetune(monkeypatch, tmp_path, when, step):
    from projects.compatible_specialization.main import main

    argv = ["--scale", "micro", "--datasets", "tinycodes", "--train_mlp", "--batch_size", "4", "--grad_accum",
            "2", "--train_tokens", "24", "--name", "code", "--out_dir", str(tmp_path), "finetune.save_every=2"]  # fmt: skip
    kill_then_resume(monkeypatch, tmp_path, lambda: main(argv), "code", step, when)


# PHATGOOSE expert training: 4 LoRA steps, validated and checkpointed every step, the best step kept.
@pytest.mark.parametrize("when, step", [("forward", draw(3, 1, 4)), ("checkpoint", draw(4, 1, 3))])
def test_phatgoose_expert(monkeypatch, tmp_path, when, step):
    from projects.phatgoose import configurables as C
    from projects.phatgoose.main import run

    argv = ["train_single_task_loralinear", "--gin_files", str(C.CONFIGS / "micro.gin"), "--gin_bindings",
            f'main.exp_out="{tmp_path}"', "P/TRAIN/Trainer.num_steps=4", "P/TRAIN/Trainer.gradient_accumulation_factor=2",
            "P/TRAIN/Trainer.validation_step_interval=1", "-exp_name", "expert", "-dataset", "TWEET_SENTIMENT_APPLE"]  # fmt: skip
    try:
        kill_then_resume(monkeypatch, tmp_path, lambda: run(argv), "expert", step, when)
    finally:
        gin.clear_config()


# SMILE CLIP fine-tuning: two experts of 3 steps each; the kill lands in the second, after the first is saved.
@pytest.mark.parametrize("step", [draw(5, 1, 3)])
def test_smile_finetune(monkeypatch, tmp_path, step):
    import projects.smile.finetune as smile_finetune

    configs = Path(smile_finetune.__file__).parent / "configs"
    argv = [
        "--config", str(configs / "micro_finetune.yaml"), f"out={tmp_path / 'experts'}",
        "max_train_examples=16", "max_eval_examples=8", "train.batch_size=4",
    ]  # fmt: skip
    smile_finetune.main(argv)
    shutil.move(tmp_path / "experts", tmp_path / "reference")
    real_train, calls = T.train, []

    def train(*args, **kwargs):  # the killed run trains both experts; the second one dies at `step`
        calls.append(1)
        if len(calls) == 2:
            kill_at(monkeypatch, step, "forward")  # its undo() also removes this wrapper
        return real_train(*args, **kwargs)

    monkeypatch.setattr(smile_finetune, "train", train)
    with pytest.raises(Killed):
        smile_finetune.main(argv)
    smile_finetune.main(argv)  # reuses the first expert, trains the second again
    assert_same_files(tmp_path / "reference", tmp_path / "experts")
