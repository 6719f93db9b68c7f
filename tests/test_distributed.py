"""Multi-process runs: reports and evaluation from rank 0 only; a launcher that ignores a request is named."""

import json
import os
import subprocess
import sys

import pytest

from common import distributed
from projects.mbc_arrow.library import ExpertLibrary
from tests.cli import REPO

EVAL_BASE = ["--scale", "micro", "--arch", "gpt2", "--dataset", "tinycodes", "--batch_size", "16",
             "--context", "16", "--eval"]  # fmt: skip


def _run(args, **env):
    full = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=full, capture_output=True, text=True, timeout=180
    )


def test_report_of_a_two_process_run_is_printed_once(tmp_path):
    # each rank of `torchrun --nproc_per_node 2` runs the same command with RANK / WORLD_SIZE set
    ExpertLibrary(tmp_path / "lib", create=True)
    cmd = ["-m", "projects.mbc_arrow.main", "library", "list", "-k", f"library_id=local://{tmp_path / 'lib'}"]
    outs = [_run(cmd, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)) for rank in (0, 1)]
    assert all(p.returncode == 0 for p in outs), [p.stderr for p in outs]
    assert json.loads(outs[0].stdout) == {} and outs[1].stdout == ""
    printed = "".join(p.stdout for p in outs)
    assert printed.count("{") == 1  # once over both processes


def test_evaluation_after_training_runs_on_rank_0_only(monkeypatch):
    from projects.compatible_specialization import experiments
    from projects.compatible_specialization.main import main

    monkeypatch.setattr(sys, "stdout", sys.stdout)  # prepare_process replaces it on rank 1: restore after
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    called = []
    monkeypatch.setattr(experiments, "evaluate", lambda *a, **k: called.append(a) or 0.0)
    assert main(EVAL_BASE) == {} and called == []
    monkeypatch.setenv("RANK", "0")
    assert main(EVAL_BASE) == {"test_loss": 0.0} and len(called) == 1


def test_accelerate_launch_ignoring_num_processes_is_named(tmp_path):
    ExpertLibrary(tmp_path / "lib", create=True)
    proc = _run(["-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "projects.mbc_arrow.main", "library",
                 "list", "-k", f"library_id=local://{tmp_path / 'lib'}"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "accelerate launch was asked for 2 processes but started 1" in proc.stderr
    assert json.loads(proc.stdout) == {}


@pytest.mark.parametrize(("env", "expected"), [({}, (0, 1)), ({"RANK": "3", "WORLD_SIZE": "4"}, (3, 4))])
def test_process_rank_reads_the_launcher_environment(monkeypatch, env, expected):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert distributed.process_rank() == expected
    assert distributed.is_main_process() == (expected[0] == 0)
    assert distributed.launch_warning() is None  # pytest was not started by accelerate launch
