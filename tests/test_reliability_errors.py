"""Unclear errors under bad input (issue 22): each case fails with a message that names the value, the file
and what to do, without a traceback for the user's mistakes. Micro models and in-process calls, seconds each;
two subprocess runs check what a user sees on the terminal."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from peft import LoraConfig
from torch import nn
from torch.utils.data import TensorDataset

from common.cli import UnknownNameError, UserError, run_main
from common.config import ConfigError, read_config_file
from common.io import CorruptFileError, read_json, save_tensors
from common.io import load_tensors as read_tensors
from common.registry import lookup
from common.rundir import RunDir, RunDirBusyError, seed_everything
from common.training import TrainConfig, train
from tests.cli import REPO

NOT_UTF8 = "key: caf\xe9\n".encode("latin-1")  # 'é' in Latin-1: byte 0xe9 is no UTF-8 start byte


def cs_config(argv):
    """compatible_specialization's resolved config for a command line (no model is loaded)."""
    from projects.compatible_specialization.main import _split_overrides, config_from, parser

    args = parser().parse_args(argv)
    _split_overrides(args)
    return config_from(args)


# ---- wrong value types and ranges, validated up front ------------------------------------------------


def test_override_of_wrong_type_names_key_value_and_expected_type():
    # An int stands for a float and null for anything: right types still resolve, without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = cs_config(
            ["--scale", "micro", "finetune.lr=1", "finetune.early_step=3", "model.random_layers=null"]
        )
    assert cfg["finetune"]["lr"] == 1 and cfg["finetune"]["early_step"] == 3
    with pytest.raises(
        ConfigError, match=r"'finetune\.early_step' = 'two' \(from command line\) must be an integer"
    ):
        cs_config(["--scale", "micro", "finetune.early_step=two"])


def test_config_file_value_of_wrong_type_names_the_file(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("scale: micro\neval_batch_size: eight\n")
    with pytest.raises(ConfigError, match=rf"'eval_batch_size' = 'eight' \(from {bad}\) must be an integer"):
        cs_config(["--config", str(bad)])


def test_smile_method_k_of_wrong_type():
    from projects.smile.main import resolve

    with pytest.raises(
        ConfigError, match=r"'method\.k' = 'four' .* must be an integer, like its default 128"
    ):
        resolve(["method=smile_upscaling", "method.k=four"])


def test_gin_binding_of_wrong_type_names_the_gin_file_and_line(tmp_path):
    from projects.phatgoose import configurables as C

    gin_file = tmp_path / "mine.gin"
    gin_file.write_text('Trainer.lr = 0.01\nTrainer.batch_size = "two"\n')
    C.parse([gin_file])
    with pytest.raises(
        ConfigError, match=rf"Trainer\.batch_size' = 'two' \(from {gin_file} line 2\) must be an integer"
    ):
        C.scoped("P/TRAIN", C.trainer_settings)
    C.parse([], ['P/EVALUATE/Evaluator.batch_size="8"'])
    with pytest.raises(ConfigError, match=r"Evaluator\.batch_size' = '8' \(from binding"):
        C.scoped("P/EVALUATE", C.eval_settings)


@pytest.mark.parametrize(
    "flag, value, key",
    [("--batch_size", "0", "finetune.batch_size"), ("--context", "0", "context"), ("--seed", "-1", "seed")],
)
def test_out_of_range_flags_are_refused_before_the_run(flag, value, key):
    with pytest.raises(
        ConfigError, match=rf"'{key}' = {value} \(from .*micro_gpt2\.yaml.*\) must be an integer >="
    ):
        cs_config(["--scale", "micro", flag, value])


def test_eval_batch_size_zero_in_eval_mode():
    with pytest.raises(ConfigError, match=r"'eval_batch_size' = 0 .* must be an integer >= 1"):
        cs_config(["--scale", "micro", "--eval", "--batch_size", "0"])


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5])
def test_seed_outside_numpys_range_is_a_user_error(seed):
    with pytest.raises(UserError, match=rf"seed {seed!r} must be an integer in \[0, 2\*\*32\)"):
        seed_everything(seed)


# ---- files that exist but cannot be read --------------------------------------------------------------


def test_non_utf8_config_file_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(NOT_UTF8)
    with pytest.raises(ConfigError, match=rf"config file {path} is not UTF-8 text"):
        read_config_file(path)


def test_non_utf8_json_file_is_named(tmp_path):
    path = tmp_path / "results.json"
    path.write_bytes(b'{"a": "caf\xe9"}')
    with pytest.raises(CorruptFileError, match=rf"{path} is not UTF-8"):
        read_json(path)


def test_non_utf8_gin_file_is_named(tmp_path):
    from projects.phatgoose import configurables as C

    path = tmp_path / "latin1.gin"
    path.write_bytes(b"main.exp_name = 'caf\xe9'\n")
    with pytest.raises(ConfigError, match=rf"gin file {path} is not UTF-8"):
        C.parse([path])


def test_truncated_results_json_is_named(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"metrics": {"acc": 0.5}, "config": {"a": 1}})[:20])
    with pytest.raises(CorruptFileError, match=rf"{path} is not valid JSON .*cut short"):
        read_json(path)


@pytest.mark.parametrize("keep", [5, 0.5])
def test_truncated_safetensors_is_named(tmp_path, keep):
    path = tmp_path / "w.safetensors"
    save_tensors(path, {"w": torch.ones(64)})
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(CorruptFileError, match=rf"{path} is not a readable safetensors file"):
        read_tensors(path)


# ---- training: a corrupt newest checkpoint, an epoch with no batch ---------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def _data(n: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x.sum(-1, keepdim=True))


def _mse(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 1e-2, "max_steps": 8, "batch_size": 4, "save_every": 2, "keep_last": 3, **kw})


class _Stop(Exception):
    pass


def _stop_at(n):
    def cb(step, _):
        if step == n:
            raise _Stop

    return cb


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    whole = _mlp()
    train(whole, _mse, _data(), _cfg(), tmp_path / "whole")
    with pytest.raises(_Stop):
        train(
            _mlp(), _mse, _data(), _cfg(), tmp_path / "killed", callbacks=[_stop_at(7)]
        )  # after step 6 is saved
    newest = tmp_path / "killed" / "checkpoints" / "step_6" / "weights.safetensors"
    newest.write_bytes(newest.read_bytes()[:40])  # the disk filled up, or the copy was cut short
    resumed = _mlp()
    with pytest.warns(
        UserWarning, match=r"step_6 is corrupt .*resuming from the previous complete checkpoint"
    ):
        train(resumed, _mse, _data(), _cfg(), tmp_path / "killed")
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters()))
    assert (tmp_path / "killed" / "checkpoints" / ".step_6.corrupt").is_dir()  # kept aside for a look
    a, b = (
        read_tensors(tmp_path / d / "checkpoints" / "step_8" / "weights.safetensors")
        for d in ("whole", "killed")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_batches_says_fewer_examples_than_the_batch_size(tmp_path):
    with pytest.raises(ValueError, match=r"3 examples, fewer than the batch size 4"):
        train(_mlp(), _mse, _data(3), _cfg(), tmp_path)


# ---- PHATGOOSE libraries -------------------------------------------------------------------------------


def _expert(name: str, r: int, d_in: int = 8, d_out: int = 8):
    from projects.phatgoose.moe import Expert

    g = torch.Generator().manual_seed(r)
    return Expert(
        name, {"lin": torch.randn(r, d_in, generator=g)}, {"lin": torch.randn(d_out, r, generator=g)}, 1.0
    )


def _model() -> nn.Module:
    model = nn.Module()
    model.lin = nn.Linear(8, 8)
    return model


def test_phatgoose_experts_with_different_ranks_are_padded_not_refused():
    """Mixed ranks are zero-padded to the largest (tests/projects/test_phatgoose_moe.py checks the values)."""
    from projects.phatgoose.moe import attach_experts

    (layer,) = attach_experts(_model(), [_expert("a", 2), _expert("b", 4)]).values()
    assert layer.A.shape[:2] == (2, 4)


def test_phatgoose_expert_of_another_base_model():
    from common.adapters import AdapterError
    from projects.phatgoose.moe import attach_experts

    with pytest.raises(
        AdapterError, match=r"expert 'b' adapts lin as a 16->8 .*trained on another base model"
    ):
        attach_experts(_model(), [_expert("a", 2), _expert("b", 2, d_in=16)])


def test_phatgoose_library_of_experts_from_two_bases(tmp_path):
    from common.adapters import AdapterError
    from projects.phatgoose.library import run_concatenate, write_expert

    paths = []
    for name, base in [("a", "tiny_t5"), ("b", "other_t5")]:
        config = LoraConfig(r=2, lora_alpha=2, target_modules=["lin"], base_model_name_or_path=base)
        paths.append(write_expert(tmp_path / name, config, _expert(name, 2)))
    with pytest.raises(AdapterError, match=r"different base models: .*tiny_t5.*other_t5"):
        run_concatenate(paths, tmp_path / "library")
    assert not (tmp_path / "library").exists()


def test_gin_syntax_error_is_reported_at_its_own_line(tmp_path):
    from projects.phatgoose import configurables as C

    gin_file = tmp_path / "bad.gin"
    gin_file.write_text("Trainer.lr = 0.001\nTrainer.batch_size = (4\n\n# note\nTrainer.num_steps = 3\n")
    with pytest.raises(
        ConfigError, match=rf"gin syntax error in {gin_file} line 2: .*'Trainer.batch_size = \(4'"
    ):
        C.parse([gin_file])


# ---- mbc_arrow libraries -------------------------------------------------------------------------------


def test_mbc_on_an_empty_library(tmp_path):
    from projects.mbc_arrow.clustering import mbc_transform
    from projects.mbc_arrow.library import LibraryError, get_expert_library

    lib = get_expert_library(f"local://{tmp_path / 'lib'}", create=True)
    with pytest.raises(
        LibraryError, match=r"holds no experts, so there is nothing for MBC clustering.*train-expert"
    ):
        mbc_transform(lib, {"k": 2})


def test_library_id_without_local_scheme_says_so(tmp_path):
    from projects.mbc_arrow.library import LibraryError, get_expert_library

    get_expert_library(f"local://{tmp_path / 'lib'}", create=True)
    with pytest.raises(LibraryError, match=rf"has no scheme.*write local://{tmp_path / 'lib'}") as info:
        get_expert_library(str(tmp_path / "lib"))
    assert "offline" not in str(info.value)


# ---- MaTS ------------------------------------------------------------------------------------------------


def test_mats_merged_model_without_its_config(tmp_path):
    from projects.mats.main import main

    weights = tmp_path / "merged" / "model_lambda_1.0" / "merged_model.safetensors"
    save_tensors(weights, {"w": torch.zeros(2)})
    with pytest.raises(ConfigError, match=r"no config\.yaml beside it .*pass the merge's config with -c"):
        main(["inference", "--merged_model", str(weights)])


def test_mats_top_k_is_checked_before_loading_models(monkeypatch):
    import projects.mats.main as mats_main
    from projects.mats.merging import MergeError

    def loads_models(*args, **kwargs):
        raise AssertionError("models were loaded before --top_k was checked")

    monkeypatch.setattr(mats_main, "run_merge", loads_models)
    with pytest.raises(MergeError, match=r"--top_k 150: the percentage .* in \(0, 100\]"):
        mats_main.main(["ties", "-d", "p3", "--checkpoint_descriptor", "full_model", "--top_k", "150"])


# ---- T5 input length, output folders, run folders -------------------------------------------------------


def test_t5_inputs_are_cut_to_the_tokenizers_limit():
    from common.evaluation import sequence_logprobs
    from tests.test_evaluation import char_tokenizer, micro_t5

    model, tok = micro_t5(torch.float64), char_tokenizer()
    tok.model_max_length = 12
    long = "the quick brown fox jumps over the lazy dog"
    with pytest.warns(UserWarning, match=r"1 of 1 inputs are longer than 12 tokens"):
        (got,) = sequence_logprobs(model, tok, [long], ["ok"])
    with pytest.warns(UserWarning):
        (cut,) = sequence_logprobs(model, tok, [long], ["ok"], max_length=12)
    assert got == cut


def test_smile_output_folder_is_checked_before_the_run(tmp_path, monkeypatch):
    import projects.smile.main as smile_main

    blocker = tmp_path / "a_file"
    blocker.write_text("")

    def the_run(cfg):
        raise AssertionError("the run started before its output folder was checked")

    monkeypatch.setattr(smile_main, "run", the_run)
    with pytest.raises(
        UserError, match=rf"report_save_path {blocker}/r\.json: {blocker} is a file, not a folder"
    ):
        smile_main.main(["method=dummy", f"report_save_path={blocker / 'r.json'}"])


def test_failed_run_leaves_no_folder_with_only_its_config(tmp_path, capsys):
    out = tmp_path / "runs" / "r1"

    def failing(argv):
        RunDir(out, project="p", experiment="e", scale="micro", seed=0, config={"a": 1})
        raise ConfigError("bad value")

    assert run_main(failing, []) == 2
    assert not out.exists()
    assert "error: bad value" in capsys.readouterr().err
    # A folder that holds more than its config (a checkpoint) is kept for resuming.
    kept = tmp_path / "runs" / "r2"

    def fails_later(argv):
        RunDir(kept, project="p", experiment="e", scale="micro", seed=0, config={"a": 1})
        (kept / "checkpoint.safetensors").write_text("x")
        raise ConfigError("later")

    assert run_main(fails_later, []) == 2
    assert (kept / "config.yaml").is_file()


def test_second_process_on_the_same_run_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(run / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('held', flush=True)\n"
         "time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            RunDirBusyError, match=rf"{run} is in use by another process \(pid {holder.pid}\)"
        ):
            RunDir(run, project="p", experiment="e", scale="micro", seed=0, config={})
        assert not (run / "config.yaml").exists()  # the busy folder was not written to
    finally:
        holder.kill()
        holder.wait()
    rd = RunDir(run, project="p", experiment="e", scale="micro", seed=0, config={})  # free again
    fd = os.open(run / ".lock", os.O_RDWR)
    with pytest.raises(BlockingIOError):  # and this process now holds the lock ...
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    rd.write_results({"acc": 1.0})  # ... until the run's results are written
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)


def test_unknown_registry_name_is_a_user_error_and_a_key_error():
    with pytest.raises(UnknownNameError, match=r"unknown method 'tiess'\. Did you mean 'ties'\?") as info:
        lookup({"ties": 1, "average": 2}, "tiess", "method")
    assert isinstance(info.value, KeyError) and isinstance(info.value, UserError)


# ---- what the user sees: one line, no traceback (unless --debug) ----------------------------------------


def _cli(*args, env=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "projects.compatible_specialization.main", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_user_error_prints_one_line_without_traceback():
    proc = _cli("--scale", "micro", "--batch_size", "0", "--dry_run")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "error: config key 'finetune.batch_size' = 0" in proc.stderr and "--debug" in proc.stderr


def test_debug_shows_the_traceback():
    proc = _cli("--scale", "micro", "--batch_size", "0", "--dry_run", env={"MOERGING_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
