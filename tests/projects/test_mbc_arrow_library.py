"""Expert library (atomic writes, ids, errors), PEFT round trip, mttl import, MBC and the saved model."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model

from common.adapters import lora_config
from projects.mbc_arrow.arrow import arrow_transform
from projects.mbc_arrow.clustering import mbc_cluster, mbc_transform, sparsify
from projects.mbc_arrow.expert_model import MultiExpertModel, load_base
from projects.mbc_arrow.library import ExpertInfo, ExpertLibrary, LibraryError, get_expert_library
from projects.mbc_arrow.mttl_import import import_mttl_library
from tests.cli import REPO

BASE = "micro:gpt_neo"


def peft_adapter(path, seed, r=2):
    """A random (non-zero B) peft LoRA on the micro GPT-Neo, saved with peft's own save_pretrained."""
    model, _ = load_base(BASE)
    torch.manual_seed(seed)
    pm = get_peft_model(model, lora_config("gpt_neo", r=r, alpha=2 * r, init_lora_weights=False))
    pm.save_pretrained(str(path))
    return path


def info(name, task=None):
    return ExpertInfo(expert_name=name, expert_task_name=task or name, base_model=BASE)


def make_library(tmp_path, n=3):
    lib = get_expert_library(f"local://{tmp_path / 'lib'}", create=True)
    for i in range(n):
        lib.add_adapter_dir(peft_adapter(tmp_path / f"a{i}", seed=i), info(f"e{i}", f"task{i}"))
    return lib


def test_add_list_remove_clone_and_errors(tmp_path):
    lib = make_library(tmp_path, 2)
    assert lib.keys() == ["e0", "e1"] and lib.info("e1").task_names == ["task1"]
    with pytest.raises(LibraryError, match="already in"):
        lib.add_adapter_dir(tmp_path / "a0", info("e0"))
    with pytest.raises(LibraryError, match="no dots"):
        lib.add_adapter_dir(tmp_path / "a0", info("bad.name"))
    with pytest.raises(LibraryError, match="base model"):
        lib.add_adapter_dir(tmp_path / "a0", ExpertInfo("e9", "t", "EleutherAI/gpt-neo-125m"))
    with pytest.raises(LibraryError, match="Did you mean 'e1'"):
        lib.get_expert("e11")
    clone = lib.clone(f"local://{tmp_path / 'copy'}")
    lib.remove_expert("e0")
    assert lib.keys() == ["e1"] and clone.keys() == ["e0", "e1"]
    with pytest.raises(LibraryError, match="expected local://"):
        get_expert_library("s3://bucket/lib")
    with pytest.raises(LibraryError, match="no expert library"):
        get_expert_library(f"local://{tmp_path / 'nowhere'}")


def test_hf_library_fails_clearly_offline():
    with pytest.raises(LibraryError, match="offline"):
        get_expert_library("hf://sordonia/trained_gpt125m_experts_colab")


def test_nan_adapter_is_refused(tmp_path):
    from safetensors.torch import save_file

    from common.io import load_tensors

    path = peft_adapter(tmp_path / "a", seed=0)
    state = load_tensors(path / "adapter_model.safetensors")
    key = next(iter(state))
    state[key][0, 0] = float("nan")
    save_file(state, str(path / "adapter_model.safetensors"))
    lib = get_expert_library(f"local://{tmp_path / 'lib'}", create=True)
    with pytest.raises(ValueError, match="NaN"):
        lib.add_adapter_dir(path, info("e0"))


_KILLED_WRITER = """
import shutil, sys, time
from projects.mbc_arrow.library import ExpertInfo, get_expert_library
real = shutil.copy2
def slow_copy(src, dst, **kw):
    real(src, dst, **kw)
    print("copied", flush=True)
    time.sleep(60)  # killed here, half-way through the expert
shutil.copy2 = slow_copy
lib = get_expert_library("local://" + sys.argv[1])
lib.add_adapter_dir(sys.argv[2], ExpertInfo("half", "t", "micro:gpt_neo"))
"""


def test_library_survives_a_process_killed_mid_write(tmp_path):
    lib = make_library(tmp_path, 1)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(lib.root), str(tmp_path / "a0")],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "copied"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    again = ExpertLibrary(lib.root)
    assert again.keys() == ["e0"] and not (lib.root / "experts" / "half").exists()
    again.add_adapter_dir(tmp_path / "a0", info("half"))  # the name is free and the library still works
    assert again.keys() == ["e0", "half"]


def test_peft_adapter_round_trips_library_and_peft(tmp_path):
    lib = make_library(tmp_path, 1)
    ids = torch.randint(0, 200, (2, 9))
    model, _ = load_base(BASE)
    ref = PeftModel.from_pretrained(model, str(tmp_path / "a0")).eval()(ids).logits
    # library -> peft: the expert folder loads in peft as it is
    model2, _ = load_base(BASE)
    via_peft = PeftModel.from_pretrained(model2, str(lib.root / "experts" / "e0")).eval()(ids).logits
    # library -> our multi-expert model with the oracle and with Arrow over one expert
    mem = MultiExpertModel.from_pretrained_library(lib, "task_name")
    with torch.no_grad(), mem.routing(["task0"]):
        ours = mem.model(ids).logits
    mem.set_selector({"name": "arrow", "top_k": 1})
    with torch.no_grad():
        arrow = mem.model(ids).logits
    base, _ = load_base(BASE)
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, ref, atol=1e-4)  # the adapter does something
    for out in (via_peft, ours, arrow):
        assert torch.allclose(out, ref, atol=1e-5)


def test_saved_model_reloads_with_its_selector(tmp_path):
    lib = make_library(tmp_path, 3)
    mem = MultiExpertModel.from_pretrained_library(lib, {"name": "arrow", "top_k": 2})
    assert (
        lib.get_auxiliary("e0", next(p.stem for p in (lib.root / "experts/e0/aux").glob("*.json")))
        is not None
    )
    ids = torch.randint(0, 200, (2, 7))
    with torch.no_grad():
        before = mem.model(ids).logits
    mem.save_pretrained(tmp_path / "saved")
    again = MultiExpertModel.from_pretrained(tmp_path / "saved")
    assert again.selector == mem.selector
    with torch.no_grad():
        assert torch.allclose(again.model(ids).logits, before, atol=1e-6)
    again.set_selector(
        "lora", "uniform"
    )  # the notebook's call; recomputing prototypes without the library gives the same routing
    again.set_selector({"name": "arrow", "top_k": 2})
    with torch.no_grad():
        assert torch.allclose(again.model(ids).logits, before, atol=1e-5)
    with pytest.raises(KeyError, match="no expert for task"):
        with mem.routing(["unknown_task"]):
            pass


def _mttl_files(folder, name, *, tie=False, extra=None, dim=32):
    g = torch.Generator().manual_seed(len(name))
    weights = {}
    for layer in range(2):
        for proj in ("q_proj", "k_proj", "v_proj"):
            prefix = f"transformer.h.{layer}.attn.attention.{proj}"
            if not tie or proj == "q_proj":
                weights[f"{prefix}.lora_a"] = torch.randn(dim, 2, generator=g)
            weights[f"{prefix}.lora_b"] = torch.randn(2, dim, generator=g)
    meta = {
        "expert_name": name,
        "expert_task_name": name,
        "expert_config": {
            "lora_rank": 2,
            "lora_alpha": 1.0,
            "modify_layers": "q_proj|k_proj|v_proj",
            "tie_params": "q_proj.lora_a|k_proj.lora_a|v_proj.lora_a" if tie else None,
        },
        "training_config": {"model": "EleutherAI/gpt-neo-125m", "learning_rate": 1e-4},
        "expert_model": "EleutherAI/gpt-neo-125m",
        **(extra or {}),
    }
    torch.save(weights, folder / f"{name}.ckpt")
    torch.save(meta, folder / f"{name}.meta")
    return weights


def test_mttl_import_reads_ckpt_and_meta(tmp_path):
    src = tmp_path / "mttl"
    src.mkdir()
    w = _mttl_files(src, "wiki_qa_Is_This_True_")
    tied = _mttl_files(src, "sciq_Multiple_Choice", tie=True)
    _mttl_files(src, "deleted_one", extra={"expert_deleted": True})
    lib = import_mttl_library(src, f"local://{tmp_path / 'lib'}")
    assert lib.keys() == ["sciq_Multiple_Choice", "wiki_qa_Is_This_True_"]
    f = lib["wiki_qa_Is_This_True_"].factors()["transformer.h.1.attn.attention.k_proj"]
    assert torch.equal(f.A, w["transformer.h.1.attn.attention.k_proj.lora_a"].T)
    assert torch.equal(f.B, w["transformer.h.1.attn.attention.k_proj.lora_b"].T)
    assert f.scaling == pytest.approx(1.0 / 2)  # mttl: alpha / rank
    ft = lib["sciq_Multiple_Choice"].factors()
    q, v = ft["transformer.h.0.attn.attention.q_proj"], ft["transformer.h.0.attn.attention.v_proj"]
    assert torch.equal(q.A, v.A) and torch.equal(q.A, tied["transformer.h.0.attn.attention.q_proj.lora_a"].T)
    assert lib.info("sciq_Multiple_Choice").base_model == "EleutherAI/gpt-neo-125m"


def test_arrow_ties_what_each_expert_was_trained_with_by_default(tmp_path):
    # mttl's ArrowTransformConfig(tie_params="default"): the tied expert's q/k/v get one prototype, from A
    # and [B_q; B_k; B_v]; the untied expert's are per projection. A pattern or None overrides every expert.
    src = tmp_path / "mttl"
    src.mkdir()
    tied = _mttl_files(src, "sciq_Multiple_Choice", tie=True, extra={"expert_model": BASE}, dim=16)
    untied = _mttl_files(src, "wiki_qa_Is_This_True_", extra={"expert_model": BASE}, dim=16)
    lib = import_mttl_library(src, f"local://{tmp_path / 'lib'}")
    assert lib.info("sciq_Multiple_Choice").training_config["tie_params"].startswith("q_proj.lora_a")
    attn = "transformer.h.0.attn.attention"
    protos = arrow_transform(lib, persist=False)  # the default
    a = tied[f"{attn}.q_proj.lora_a"].T  # (r, d_in)
    b = torch.cat([tied[f"{attn}.{p}.lora_b"].T for p in ("q_proj", "k_proj", "v_proj")])  # (3·d_out, r)
    v = torch.linalg.svd(b @ a)[2][0]
    t = protos["sciq_Multiple_Choice"]
    assert torch.equal(t[f"{attn}.q_proj"], t[f"{attn}.v_proj"])
    assert abs(torch.dot(t[f"{attn}.q_proj"], v)) == pytest.approx(1.0, abs=1e-5)
    u = protos["wiki_qa_Is_This_True_"]
    vq = torch.linalg.svd(untied[f"{attn}.q_proj.lora_b"].T @ untied[f"{attn}.q_proj.lora_a"].T)[2][0]
    assert abs(torch.dot(u[f"{attn}.q_proj"], vq)) == pytest.approx(1.0, abs=1e-5)
    assert not torch.equal(u[f"{attn}.q_proj"], u[f"{attn}.v_proj"])
    untied_all = arrow_transform(lib, {"tie_params": None}, persist=False)["sciq_Multiple_Choice"]
    assert not torch.equal(untied_all[f"{attn}.q_proj"], untied_all[f"{attn}.v_proj"])
    # the model's selector: unset tie_params means the experts' own, also when reloaded from a saved model
    model = MultiExpertModel.from_pretrained_library(lib, {"name": "arrow"})
    layer = model.layers()[f"{attn}.q_proj"]
    i = model.expert_names.index("sciq_Multiple_Choice")
    assert abs(torch.dot(layer.protos[i], v)) == pytest.approx(1.0, abs=1e-5)
    model.save_pretrained(tmp_path / "saved")
    again = MultiExpertModel.from_pretrained(tmp_path / "saved")
    again.set_selector({"name": "arrow"})
    torch.testing.assert_close(again.layers()[f"{attn}.q_proj"].protos.abs(), layer.protos.abs())


def test_mttl_import_refuses_pickled_objects(tmp_path):
    src = tmp_path / "mttl"
    src.mkdir()
    _mttl_files(src, "x")
    torch.save({"expert_name": "x", "expert_config": ExpertInfo("x", "x", "b")}, src / "x.meta")
    with pytest.raises(ValueError, match="weights_only"):
        import_mttl_library(src, f"local://{tmp_path / 'lib'}")


def test_sparsify_zeroes_the_smallest_fraction():
    v = torch.tensor([0.1, -0.5, 0.2, 0.05, -1.0, 0.3, 0.0, 0.7])
    out = sparsify(v, 0.5)
    assert (out == 0).sum() == 4 and torch.equal(out[[1, 4, 5, 7]], v[[1, 4, 5, 7]])


def test_mbc_is_deterministic_and_groups_experts_trained_on_identical_data():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(2, 500, generator=g)
    # identical data -> near-identical LoRAs around one centre; two centres, interleaved names
    vectors = torch.stack([centers[i % 2] + 0.05 * torch.randn(500, generator=g) for i in range(6)])
    names = [f"e{i}" for i in range(6)]
    cfg = {"k": 2, "sparsity_threshold": 0.2, "seed": 42}
    clusters = mbc_cluster(names, vectors, cfg)
    assert sorted(map(sorted, clusters.values())) == [["e0", "e2", "e4"], ["e1", "e3", "e5"]]
    assert mbc_cluster(names, vectors, cfg) == clusters
    with pytest.raises(ValueError, match="between 1 and the number of experts"):
        mbc_cluster(names, vectors, {"k": 7})


def test_mbc_transform_on_trained_experts_and_cache(tmp_path):
    from projects.mbc_arrow.main import DEFAULTS
    from projects.mbc_arrow.train_expert import train_expert

    lib = get_expert_library(f"local://{tmp_path / 'lib'}", create=True)
    cfg = {
        **DEFAULTS,
        "base_model": BASE,
        "max_train_examples": 16,
        "max_eval_examples": 4,
        "total_steps": 3,
        "max_input_length": 40,
        "max_output_length": 4,
        "lora_rank": 2,
        "learning_rate": 1e-2,
        "train_batch_size": 4,
        "micro_batch_size": 4,
        "seed": 0,
    }
    # the same task twice under two names = identical data and seed -> one cluster
    for name, task in (
        ("a1", "champ_category"),
        ("a2", "champ_category"),
        ("b1", "gsm_language_id"),
        ("b2", "gsm_language_id"),
    ):
        train_expert({**cfg, "expert_name": name, "finetune_task_name": task}, lib, str(tmp_path / name))

    clusters = mbc_transform(lib, {"k": 2, "sparsity_threshold": 0.2})
    by_expert = lib.get_data("mbc-k2-s0p2-d64-seed42")["by_expert"]
    assert sorted(map(sorted, by_expert.values())) == [["a1", "a2"], ["b1", "b2"]]
    assert sorted(map(sorted, clusters.values())) == [["champ_category"] * 2, ["gsm_language_id"] * 2]
    assert mbc_transform(lib, {"k": 2, "sparsity_threshold": 0.2}) == clusters


def test_mttl_notebook_names_are_aliases(tmp_path):
    """The notebook's mttl spellings open the same library and pick the same selector as ours."""
    make_library(tmp_path, 2)
    lib_id = f"local://{tmp_path / 'lib'}"
    lib = ExpertLibrary.get_expert_library(lib_id)
    assert isinstance(lib, ExpertLibrary) and lib.keys() == get_expert_library(lib_id).keys() == ["e0", "e1"]
    ids = torch.randint(0, 200, (2, 7))
    ours = MultiExpertModel.from_pretrained_library(lib_id, {"name": "arrow", "top_k": 1})
    mttl = MultiExpertModel.from_pretrained_library(
        lib_id, selector_config={"name": "arrow", "top_k": 1}, device_map="cpu"
    )
    assert mttl.selector == ours.selector and mttl.selector["top_k"] == 1
    with torch.no_grad():
        assert torch.allclose(mttl.model(ids).logits, ours.model(ids).logits, atol=1e-6)
    with pytest.raises(KeyError, match="selector"):  # the alias reaches the same checks
        MultiExpertModel.from_pretrained_library(lib_id, selector_config={"name": "aroww"})
