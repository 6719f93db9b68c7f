import pytest

from common.rundir import RunDir
from tests.cli import run_cli

pytestmark = pytest.mark.smoke


def test_results_md_cli(tmp_path):
    RunDir(
        tmp_path / "runs" / "a", project="p", experiment="e", scale="tiny", seed=0, config={}
    ).write_results({"x": 1.0})
    out = tmp_path / "RESULTS.md"
    proc = run_cli(
        ["-m", "common.results_md", "--runs", str(tmp_path / "runs"), "--out", str(out)], timeout=60
    )
    assert "from 1 results" in proc.stdout
    assert out.read_text().startswith("# Results")


def test_tiny_world_cli_micro(tmp_path):
    proc = run_cli(
        ["-m", "common.tiny_world", "gpt2", "t5", "--scale", "micro", "--root", str(tmp_path)], timeout=120
    )
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["base", "params"]
    assert [line.split()[0] for line in lines[1:]] == ["gpt2", "t5"]
