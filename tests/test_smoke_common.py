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
