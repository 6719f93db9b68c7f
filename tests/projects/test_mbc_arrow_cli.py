"""Smoke tests: every notebook step as the documented CLI command, on the micro config."""

import json

import pytest
import torch

from common.config import ConfigError
from projects.mbc_arrow.library import LibraryError
from tests.cli import run_cli

pytestmark = pytest.mark.smoke

MAIN = ["-m", "projects.mbc_arrow.main"]
MICRO = ["-c", "projects/mbc_arrow/configs/micro_notebook.yaml"]
TASKS = "tasks=[champ_category,gsm_language_id]"


def cli(*args, timeout=120):
    out = run_cli([*MAIN, *args], timeout=timeout).stdout
    return json.loads(out[out.index("\n{") + 1 :] if not out.startswith(("{", "[")) else out)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("mbc_cli")
    lib = f"local://{root / 'private'}"
    cli("train-library", *MICRO, "-k", TASKS, f"library_id={lib}", f"output_dir={root / 'train'}")
    return root, lib


def test_train_library_and_list(library):
    _root, lib = library
    listed = cli("library", "list", "-k", f"library_id={lib}")
    assert sorted(listed) == ["champ_category", "gsm_language_id"]
    assert listed["champ_category"]["base_model"] == "micro:gpt_neo"


def test_mbc_then_train_cluster_expert(library):
    root, lib = library
    clusters_file = root / "mbc_clusters.json"
    clusters = cli(
        "mbc", "-k", f"library_id={lib}", "k=2", "sparsity_threshold=0.2", f"output_file={clusters_file}"
    )
    assert sorted(t for c in clusters.values() for t in c) == sorted(
        json.loads(clusters_file.read_text()).pop("cluster_0")
        + json.loads(clusters_file.read_text())["cluster_1"]
    )
    # the notebook's `train_experts.py -k finetune_task_name=cluster_0 finetune_task_path=mbc_clusters.json`
    out = cli(
        "train-expert",
        *MICRO,
        "-k",
        "finetune_task_name=cluster_0",
        "expert_name=cluster_0",
        f"finetune_task_path={clusters_file}",
        f"library_id=local://{root / 'mbc'}",
        f"output_dir={root / 'c0'}",
        "micro_batch_size=2",
    )
    assert out["tasks"] == clusters["cluster_0"]
    assert (root / "c0" / "results.json").is_file()


def test_arrow_transform_persists_prototypes(library):
    root, lib = library
    counts = cli("arrow", "-k", f"library_id={lib}")
    assert set(counts.values()) == {6}  # 2 micro layers x q/k/v
    assert list((root / "private" / "experts" / "champ_category" / "aux").glob("arrow-*.safetensors"))


def test_evaluate_arrow_save_and_downstream(library):
    # oracle and uniform go through the same command in the notebook test
    root, lib = library
    saved = root / "model_arrow"
    out = cli(
        "evaluate",
        *MICRO,
        "-k",
        TASKS,
        f"library_id={lib}",
        "merge_or_route=arrow",
        "top_k=2",
        f"output_dir={root / 'eval'}",
        "downstream=True",
        f"save_model={saved}",
    )
    assert 0 <= out["rougeL"] <= 100 and set(out["per_task"]) == {"champ_category", "gsm_language_id"}
    assert 0 <= out["downstream_acc"] <= 1 and (saved / "multi_expert_model.json").is_file()
    down = cli("downstream", *MICRO, "-k", f"model_path={saved}", f"output_dir={root / 'down'}")
    assert down["acc"] == pytest.approx(out["downstream_acc"])


def test_downstream_base_model(library):
    root, _ = library
    out = cli("downstream", *MICRO, "-k", f"output_dir={root / 'down_base'}")
    assert 0 <= out["acc"] <= 1


def test_library_clone_add_remove_import(library, tmp_path):
    from peft import get_peft_model

    from common.adapters import lora_config
    from projects.mbc_arrow.expert_model import load_base

    _root, lib = library
    copy = f"local://{tmp_path / 'copy'}"
    assert len(cli("library", "clone", "-k", f"library_id={lib}", f"destination_id={copy}")) == 2
    model, _ = load_base("micro:gpt_neo")
    get_peft_model(model, lora_config("gpt_neo", r=2)).save_pretrained(str(tmp_path / "peft"))
    keys = cli(
        "library",
        "add",
        "-k",
        f"library_id={copy}",
        f"adapter_path={tmp_path / 'peft'}",
        "expert_name=outside",
        "task_name=some_task",
        "base_model=micro:gpt_neo",
    )
    assert "outside" in keys
    assert "outside" not in cli("library", "remove", "-k", f"library_id={copy}", "expert_name=outside")
    src = tmp_path / "mttl"
    src.mkdir()
    w = {
        "transformer.h.0.attn.attention.q_proj.lora_a": torch.randn(32, 2),
        "transformer.h.0.attn.attention.q_proj.lora_b": torch.randn(2, 32),
    }
    torch.save(w, src / "e.ckpt")
    torch.save(
        {
            "expert_name": "e",
            "expert_task_name": "t",
            "expert_model": "micro:gpt_neo",
            "expert_config": {"lora_rank": 2, "lora_alpha": 1.0},
        },
        src / "e.meta",
    )
    assert cli(
        "library", "import-mttl", "-k", f"adapter_path={src}", f"destination_id=local://{tmp_path / 'imp'}"
    ) == ["e"]


def test_bad_key_and_missing_expert_fail_clearly(library):
    from projects.mbc_arrow.main import main

    _, lib = library
    with pytest.raises(ConfigError, match="library_id"):
        main(["mbc", "-k", "libary_id=x"])
    with pytest.raises(LibraryError, match="no expert 'nope'"):  # run_main prints it as one `error:` line
        main(["library", "remove", "-k", f"library_id={lib}", "expert_name=nope"])
    with pytest.raises(SystemExit, match="set output_file"):
        main(["mbc", "-k", f"library_id={lib}"])


@pytest.mark.slow
def test_notebook_and_analyze(tmp_path):
    out = cli(
        "notebook",
        *MICRO,
        "-k",
        "tasks=[champ_category,gsm_language_id]",
        "seed=1",
        f"output_dir={tmp_path / 'seed1'}",
        timeout=240,
    )
    assert set(out["rouge"]) == {"oracle", "uniform", "arrow", "oracle_mbc", "uniform_mbc", "arrow_mbc"}
    assert (tmp_path / "seed1" / "rouge_in_distribution.png").is_file()
    proc = run_cli(
        [
            "-m",
            "projects.mbc_arrow.analyze",
            "--runs",
            str(tmp_path),
            "--out",
            str(tmp_path / "t"),
            "--routing",
        ]
    )
    assert "Rouge-L" in proc.stdout and (tmp_path / "t" / "table.md").is_file()
    routing = json.loads((tmp_path / "t" / "routing.json").read_text())
    for lib in ("private", "mbc"):
        (found,) = routing[lib]
        assert [sum(row) for row in found["matrix"]] == pytest.approx([1.0] * len(found["tasks"]))
        assert found["chance"] == pytest.approx(1 / len(found["experts"]))
    assert (tmp_path / "t" / "routing_private.png").is_file()


def test_library_expert_loads_with_auto_peft_model(library):
    # issue 20: the adapter recorded `micro:gpt_neo` as its base, which AutoPeftModelForCausalLM cannot load
    from peft import AutoPeftModelForCausalLM, PeftModel

    from common.models import load_model
    from common.tiny_world import resolve_base

    root, _lib = library
    folder = root / "private" / "experts" / "champ_category"
    assert json.loads((folder / "extras.json").read_text())["base_model"] == "micro:gpt_neo"  # the spec kept
    theirs = AutoPeftModelForCausalLM.from_pretrained(folder).eval()
    ours = PeftModel.from_pretrained(load_model(resolve_base("micro:gpt_neo")), folder).eval()
    base = load_model(resolve_base("micro:gpt_neo"))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(theirs(input_ids=ids).logits, ours(input_ids=ids).logits)
        # the LoRA is applied
        assert not torch.equal(theirs(input_ids=ids).logits, base(input_ids=ids).logits)
