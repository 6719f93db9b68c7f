"""Base-model specs are compared without building a base, and a build says what it builds first (issue 20)."""

import pytest

from common import tiny_world
from projects.mbc_arrow.library import same_base
from projects.mbc_arrow.main import main as mbc_main


@pytest.fixture
def no_builds(monkeypatch, tmp_path):
    """An empty cache, and every build function replaced by one that records its call and fails."""
    monkeypatch.setenv("MOERGING_CACHE", str(tmp_path / "cache"))
    calls = []

    def forbidden(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a base was built")

    monkeypatch.setattr(tiny_world, "_pretrain", forbidden)
    monkeypatch.setitem(tiny_world.REAL_BASES, "smollm2-135m", forbidden)
    return calls


def test_comparing_specs_builds_nothing(no_builds, tmp_path):
    ident = tiny_world.base_identity("tiny:gpt_neo")
    assert same_base("tiny:gpt_neo", "tiny:gpt_neo")
    assert same_base("tiny:gpt_neo", str(tmp_path / "cache" / "tiny_bases" / ident))  # its resolved folder
    assert not same_base("tiny:gpt_neo", "micro:gpt_neo")
    assert not same_base("tiny:gpt_neo", "real:smollm2-135m")
    assert same_base("EleutherAI/gpt-neo-125m", "/somewhere/gpt-neo-125m/")
    assert no_builds == [] and not (tmp_path / "cache").exists()


def test_library_add_without_base_fails_at_once_without_building(no_builds, tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"`library add` needs base_model=\.\.\."):
        mbc_main(["library", "add", "-k", f"library_id=local://{tmp_path / 'lib'}",
                  f"adapter_path={tmp_path / 'adapter'}", "expert_name=e"])  # fmt: skip
    assert no_builds == [] and not (tmp_path / "cache").exists() and not (tmp_path / "lib").exists()


def test_a_build_is_announced_before_it_starts(monkeypatch, tmp_path, capsys):
    seen = []

    def fake_pretrain(name, s, out):
        seen.append(capsys.readouterr().err)  # what was printed before the build began
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(tiny_world, "_pretrain", fake_pretrain)
    path = tiny_world.tiny_base("gpt_neo", "micro", root=tmp_path)
    assert path.name == tiny_world.base_identity("micro:gpt_neo")
    assert "building the micro base 'gpt_neo': pretraining 4 steps (a few seconds" in seen[0]
    tiny_world.tiny_base("gpt_neo", "micro", root=tmp_path)  # cached: built once, announced once
    assert len(seen) == 1 and "building" not in capsys.readouterr().err
