"""The expert zoo: tasks, splits and leak check on the real offline data; training, caching and the
fast loss on micro models (no SmolLM2 in the default suite)."""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path

import pytest
import torch

from common import zoo, zoo_tasks
from common.evaluation import IGNORE_INDEX
from common.lm_finetune import collate, encode_example, target_only_loss

MICRO = zoo.ZooSettings(
    base="micro:mistral",
    rank=2,
    alpha=4.0,
    steps=2,
    multitask_steps=2,
    batch_size=2,
    warmup_steps=0,
    max_length=48,
    dtype="float32",
    sizes={"validation": 3, "test": 3},
    max_new_tokens=4,
)


def micro_context(library, settings=MICRO, seed=0):
    """A leaderboard Context over a micro zoo of `library` (its experts trained first, seconds each)."""
    from leaderboard import run

    for task in library:
        zoo.expert(task, seed, settings)
    return run.context(seed, settings, library)


def test_split_of_is_per_group_and_proportional():
    groups = [f"g{i}" for i in range(20_000)]
    first = [zoo_tasks.split_of(g) for g in groups]
    assert first == [zoo_tasks.split_of(g) for g in groups]  # deterministic
    for name, fraction in zoo_tasks.FRACTIONS.items():
        assert abs(first.count(name) / len(groups) - fraction) < 0.02
    # another seed moves groups
    assert sum(a != zoo_tasks.split_of(g, seed=1) for a, g in zip(first, groups)) > 5_000


def test_zoo_tasks_never_share_text_across_splits():
    all_splits = {name: zoo_tasks.task_splits(name, {}) for name in zoo_tasks.TASKS}
    report = zoo_tasks.leak_report(all_splits)
    assert report == {"text_leaks": [], "groups_in_two_splits": []}
    assert len(zoo_tasks.LIBRARY) >= 12 and set(zoo_tasks.HELD_OUT).isdisjoint(zoo_tasks.LIBRARY)
    kinds = {all_splits[t]["train"][0]["kind"] for t in zoo_tasks.LIBRARY}
    assert kinds == {"classification", "generation"}
    for name, s in all_splits.items():
        for split, rows in s.items():
            assert rows, f"{name} has an empty {split} split"
            for r in rows[:50]:
                assert r["task"] == name
                if r["kind"] == "classification":
                    assert r["choices"][r["label"]] == r["target"]
                else:
                    assert r["label"] == -1 and r["target"]


def test_leak_report_finds_a_planted_leak():
    row = {"task": "a", "input": "Same  text", "group": "g1"}
    splits = {
        "sentiment_airline": {"train": [row], "validation": [], "test": []},
        "tweet_topic": {
            "train": [],
            "validation": [],
            "test": [{**row, "input": "same text", "group": "g2"}],
        },
    }
    report = zoo_tasks.leak_report(splits)
    assert [(x["task"], x["split"], x["train_task"]) for x in report["text_leaks"]] == [
        ("tweet_topic", "test", "sentiment_airline")
    ]
    splits["tweet_topic"]["test"][0]["group"] = "g1"
    assert zoo_tasks.leak_report(splits)["groups_in_two_splits"] == ["g1"]


def test_stratified_take_keeps_every_class_and_the_order():
    items = [{"label": 0, "i": i} for i in range(90)] + [{"label": 1, "i": 90 + i} for i in range(10)]
    taken = zoo_tasks._stratified_take(items, 20)
    assert len(taken) == 20
    assert sum(r["label"] == 1 for r in taken) == 2  # 10% of 20
    assert [r["i"] for r in taken] == sorted(r["i"] for r in taken)


class _Tok:
    """A whitespace tokenizer: one id per character position, enough to check the layout by hand."""

    eos_token_id = 99

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 90 for c in text]


def test_encode_example_labels_target_and_eos_and_cuts_source_left():
    e = encode_example(_Tok(), "abcdef", "xy", max_length=64)
    src, tgt = [ord(c) % 90 for c in "abcdef"], [ord(c) % 90 for c in " xy"]
    assert e["input_ids"] == src + tgt + [99]
    assert e["labels"] == [IGNORE_INDEX] * 6 + tgt + [99]
    short = encode_example(_Tok(), "abcdef", "xy", max_length=6)
    assert short["input_ids"] == src[-2:] + tgt + [99]  # the source loses its left part
    with pytest.raises(ValueError, match="no room for the source"):
        encode_example(_Tok(), "abcdef", "xyz" * 5, max_length=6)


def test_target_only_loss_equals_the_full_head_loss_and_gradients():
    from peft import LoraConfig, get_peft_model

    from common.models import micro_model

    torch.manual_seed(0)
    model = get_peft_model(micro_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    vocab = model.config.vocab_size
    examples = [
        {"input_ids": list(range(1, 9)), "labels": [IGNORE_INDEX] * 6 + [7, 8]},
        {"input_ids": [3, 4, 5, 6], "labels": [IGNORE_INDEX, IGNORE_INDEX, 5, 6]},
    ]
    batch = collate(examples, pad_id=vocab - 1)
    assert batch["attention_mask"].tolist()[1] == [1, 1, 1, 1, 0, 0, 0, 0]

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fast = target_only_loss(model, batch)
    fast_grads = grads(fast)
    ref = model(**batch).loss
    ref_grads = grads(ref)
    assert torch.allclose(fast, ref, atol=1e-6)
    for n in ref_grads:
        assert torch.allclose(fast_grads[n], ref_grads[n], atol=1e-6), n


def test_expert_key_changes_with_every_setting():
    base = zoo.expert_key("breast_cancer", 0, MICRO)
    assert zoo.expert_key("breast_cancer", 0, MICRO) == base
    assert zoo.expert_key("breast_cancer", 1, MICRO) != base
    assert zoo.expert_key("champ_category", 0, MICRO) != base
    changed = {
        "base": "micro:llama",
        "rank": 3,
        "alpha": 2.0,
        "modules": ("q_proj",),
        "lr": 0.5,
        "steps": 3,
        "batch_size": 3,
        "warmup_steps": 1,
        "max_length": 40,
        "dtype": "bfloat16",
        "multitask_steps": 5,
        "sizes": {"validation": 4, "test": 3},
        "max_new_tokens": 5,
        "adapter": "ia3",
        "init": "task",
    }
    assert set(changed) == {f.name for f in dataclasses.fields(zoo.ZooSettings)}
    for name, value in changed.items():
        assert zoo.expert_key("breast_cancer", 0, dataclasses.replace(MICRO, **{name: value})) != base, name
    with pytest.raises(ValueError, match="not a library task"):
        zoo.expert_key("language_id_union", 0, MICRO)  # held out: never trained
    with pytest.raises(ValueError, match="library tasks only"):
        zoo.group_name(["breast_cancer", "language_id_union"])
    with pytest.raises(ValueError, match="adapter must be one of"):
        dataclasses.replace(MICRO, adapter="prefix")
    with pytest.raises(ValueError, match="init must be one of"):
        dataclasses.replace(MICRO, init="module")
    with pytest.raises(ValueError, match="seeds LoRA's A"):
        dataclasses.replace(MICRO, adapter="ia3", init="task")


def test_lora_settings_key_as_before_adapter_kinds_existed():
    # The zoo's cached LoRA experts were keyed without an `adapter` field: their keys must not move.
    assert "adapter" not in zoo.DEFAULT.key() and "adapter" not in MICRO.key()
    assert zoo.IA3.key()["adapter"] == "ia3" and zoo.FULL.key()["adapter"] == "full"


def test_settings_come_back_from_their_saved_key():
    # a cache_key.json's settings (through JSON: modules a list, default adapter and init left out)
    for settings in (zoo.DEFAULT, MICRO, zoo.IA3, dataclasses.replace(MICRO, init="task", rank=2)):
        saved = json.loads(json.dumps(settings.key()))
        assert zoo.ZooSettings.from_key(saved) == settings


def test_cached_experts_keep_their_keys_whatever_init_adds():
    # Written out by hand: the keys of the zoo's cached LoRA and (IA)^3 experts before `init` existed.
    lora = {
        "base": "real:smollm2-135m",
        "rank": 8,
        "alpha": 16.0,
        "modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "lr": 0.001,
        "steps": 100,
        "batch_size": 8,
        "warmup_steps": 10,
        "max_length": 256,
        "dtype": "bfloat16",
        "multitask_steps": 400,
        "sizes": {"validation": 60, "test": 100},
        "max_new_tokens": 48,
    }
    assert zoo.DEFAULT.key() == lora
    assert zoo.IA3.key() == {**lora, "lr": 0.003, "adapter": "ia3"}
    assert dataclasses.replace(zoo.DEFAULT, init="task").key() == {**lora, "init": "task"}


def test_expert_is_a_peft_folder_trained_once(monkeypatch):
    from peft import PeftModel

    path = zoo.expert("breast_cancer", 0, MICRO)
    info = json.loads((path / "expert.json").read_text())
    assert info["steps"] == MICRO.steps and info["task"] == "breast_cancer"
    assert set(info["validation"]) == set(info["base_validation"]) == {"breast_cancer"}
    assert info["provenance"]["seed"] == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "loss_curve.png", "train_log.jsonl"):
        assert (path / name).is_file(), name
    assert (
        "# moerging expert zoo: breast_cancer, seed 0" in (path / "README.md").read_text()
    )  # not PEFT's blank

    # A second call trains nothing.
    monkeypatch.setattr(zoo, "_train", lambda *a, **k: pytest.fail("trained again"))
    assert zoo.expert("breast_cancer", 0, MICRO) == path
    assert zoo.is_cached("breast_cancer", 0, MICRO)

    # It loads with plain peft, and the adapter changed the model.
    base, tok = zoo.load_base(MICRO)
    ids = torch.tensor([tok.encode("Tumour measurements: mean radius 12.")])
    before = base(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(base, str(path))
    assert not torch.allclose(loaded(input_ids=ids).logits, before)


def test_a_shipped_expert_fills_a_fresh_cache_and_a_stale_one_is_not_used(monkeypatch, tmp_path):
    from common.cache import weights_digest

    path = zoo.expert("tweet_topic", 0, MICRO)
    monkeypatch.setenv("MOERGING_SHIPPED", str(tmp_path / "shipped"))
    dest = zoo.shipped_path("tweet_topic", 0, MICRO)
    assert dest == tmp_path / "shipped" / zoo.settings_label(MICRO) / "seed_0" / "tweet_topic"
    assert zoo.settings_label(MICRO).startswith("lora-") and zoo.settings_label(zoo.DEFAULT) == "lora"
    assert dest in zoo.ship([0], MICRO)
    assert zoo.ship([0], MICRO) == []  # already shipped: nothing written
    card = (dest / "README.md").read_text()  # the model card names the task, its scores and how it loads
    info = json.loads((path / "expert.json").read_text())
    assert "# moerging expert zoo: tweet_topic, seed 0 (lora)" in card
    assert f"tweet_topic {info['validation']['tweet_topic']:.3f}" in card
    assert f'PeftModel.from_pretrained(base, "zoo/{zoo.settings_label(MICRO)}/seed_0/tweet_topic")' in card
    assert zoo.shipped_path(zoo.group_name(["tweet_topic", "breast_cancer"]), 0, MICRO).name == (
        "group-breast_cancer+tweet_topic"
    )

    # A fresh machine: an empty cache is filled from the shipped copy, bit for bit, and nothing is trained.
    monkeypatch.setenv("MOERGING_CACHE", str(tmp_path / "fresh"))
    monkeypatch.setattr(zoo, "_train", lambda *a, **k: pytest.fail("trained"))
    assert zoo.is_cached("tweet_topic", 0, MICRO)
    copied = zoo.expert("tweet_topic", 0, MICRO)
    assert copied.parent.parent == tmp_path / "fresh" and copied.name == path.name
    assert weights_digest(copied) == weights_digest(path)
    assert (copied / "expert.json").read_text() == (path / "expert.json").read_text()
    assert (copied / "README.md").read_text() == card
    assert not zoo.is_cached("tweet_topic", 1, MICRO)  # another seed is not served by it

    # A shipped expert made for another key (older code, other data) is not used: the expert trains anew.
    key_file = dest / "cache_key.json"
    key_file.write_text(json.dumps({**json.loads(key_file.read_text()), "version": zoo.VERSION - 1}))
    monkeypatch.setenv("MOERGING_CACHE", str(tmp_path / "fresh2"))
    assert not zoo.is_cached("tweet_topic", 0, MICRO)
    with pytest.raises(pytest.fail.Exception, match="trained"):
        zoo.expert("tweet_topic", 0, MICRO)


def test_the_repositorys_shipped_zoo_is_the_current_code_s():
    """Every expert shipped in zoo/ carries the key the current code asks for (else it would be retrained)."""
    from common.cache import KEY_FILE, holds, shipped_root

    root = Path(__file__).resolve().parents[1] / "zoo"
    entries = sorted(p.parent for p in root.glob("*/seed_*/*/" + KEY_FILE))
    if not entries:
        pytest.skip("no shipped zoo in this checkout")
    assert shipped_root() != root  # the suite reads it by path only (conftest: MOERGING_SHIPPED)
    for entry in entries:
        key = json.loads((entry / KEY_FILE).read_text())
        settings = zoo.ZooSettings.from_key(key["settings"])  # a preset or a probe's
        assert entry.parent.parent.name == zoo.settings_label(settings)
        assert holds(entry, zoo.expert_key(key["task"], key["seed"], settings)), entry
        assert entry == zoo.shipped_path(key["task"], key["seed"], settings, root)
        assert (entry / "adapter_model.safetensors").is_file() and (entry / "expert.json").is_file()


def test_multitask_draws_every_library_task():
    records = zoo.training_records(zoo.MULTITASK, 0, dataclasses.replace(MICRO, multitask_steps=200))
    assert len(records) == 200 * MICRO.batch_size
    assert {r["task"] for r in records} == set(zoo_tasks.LIBRARY)
    assert records == zoo.training_records(zoo.MULTITASK, 0, dataclasses.replace(MICRO, multitask_steps=200))


def test_group_expert_trains_on_its_members_only_with_steps_per_member():
    tasks = ("champ_category", "breast_cancer")
    name = zoo.group_name(tasks)
    assert name == zoo.group_name(tasks[::-1]) and zoo.group_members(name) == tuple(sorted(tasks))
    records = zoo.training_records(name, 0, MICRO)
    assert len(records) == zoo.steps_of(name, MICRO) * MICRO.batch_size == 2 * MICRO.steps * MICRO.batch_size
    assert {r["task"] for r in records} == set(tasks)
    path = zoo.group_expert(tasks, 0, MICRO)
    info = json.loads((path / "expert.json").read_text())
    assert info["steps"] == 2 * MICRO.steps and set(info["validation"]) == set(tasks)


def test_experts_of_a_seed_start_from_the_same_lora_a_whatever_ran_before():
    from common.adapters import load_adapter

    # lr 0: the saved adapter is its initialisation
    settings = dataclasses.replace(MICRO, lr=0.0)
    first = load_adapter(zoo.expert("breast_cancer", 0, settings)).state
    torch.rand(1000)  # other work in the process moves the global RNG
    second = load_adapter(zoo.expert("champ_category", 0, settings)).state
    other_seed = load_adapter(zoo.expert("breast_cancer", 1, settings)).state
    a_keys = [k for k in first if "lora_A" in k]
    assert a_keys and all(torch.equal(first[k], second[k]) for k in a_keys)
    assert not all(torch.equal(first[k], other_seed[k]) for k in a_keys)


def test_init_task_gives_each_task_its_own_lora_a_and_the_same_one_every_run(monkeypatch, tmp_path):
    from common.adapters import load_adapter

    # lr 0: the saved adapter is its initialisation
    settings = dataclasses.replace(MICRO, lr=0.0, init="task")

    def a_of(task, seed=0):
        state = load_adapter(zoo.expert(task, seed, settings)).state
        return {k: v for k, v in state.items() if "lora_A" in k}

    first, other_task = a_of("breast_cancer"), a_of("champ_category")
    shared = load_adapter(zoo.expert("breast_cancer", 0, dataclasses.replace(MICRO, lr=0.0))).state
    assert first and first.keys() == other_task.keys()
    assert not any(torch.equal(first[k], other_task[k]) for k in first)
    assert not any(torch.equal(first[k], shared[k]) for k in first)  # not the seed's shared A either
    assert not any(torch.equal(first[k], a_of("breast_cancer", 1)[k]) for k in first)
    # a second run, in a fresh cache and after other work moved the global RNG, starts from the same A
    monkeypatch.setenv("MOERGING_CACHE", str(tmp_path / "cache"))
    torch.rand(1000)
    again = a_of("breast_cancer")
    assert zoo.expert("breast_cancer", 0, settings).is_relative_to(tmp_path)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert zoo.init_seed("breast_cancer", 0, settings) == zlib.crc32(b"0:breast_cancer")
    assert zoo.init_seed("breast_cancer", 3, MICRO) == 3


def _logits(model, tok):
    ids = torch.tensor([tok.encode("Tumour measurements: mean radius 12.")])
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_ia3_expert_keeps_fp32_master_vectors_under_bf16_and_loads_merged():
    from common.adapters import load_adapter

    settings = dataclasses.replace(MICRO, adapter="ia3", lr=0.05, dtype="bfloat16")
    path = zoo.expert("breast_cancer", 0, settings)
    saved = load_adapter(path)
    assert saved.config.peft_type.value == "IA3"
    vectors = torch.cat([t.flatten().float() for t in saved.state.values()])
    # trained (moved from 1.0) with steps finer than bf16's spacing near 1.0 (2**-7): fp32 master weights
    assert (vectors - 1).abs().max() > 0
    assert ((vectors * 128) - (vectors * 128).round()).abs().max() > 1e-3
    base, tok = zoo.load_base(settings)
    merged = zoo.load_expert(path, settings)
    assert merged.dtype == torch.bfloat16 and not torch.allclose(_logits(merged, tok), _logits(base, tok))


def test_full_expert_is_a_from_pretrained_folder():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = dataclasses.replace(MICRO, adapter="full", lr=0.01)
    path = zoo.expert("breast_cancer", 0, settings)
    model = AutoModelForCausalLM.from_pretrained(str(path))  # the ecosystem's loader, no zoo code
    tok = AutoTokenizer.from_pretrained(str(path))
    base, _ = zoo.load_base(settings)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert any("embed" in n for n in changed) and any("mlp" in n for n in changed)  # every weight trains
    assert torch.allclose(_logits(zoo.load_expert(path, settings), tok), _logits(model, tok), atol=1e-4)


def test_every_zoo_task_has_a_data_card():
    cards = (Path(__file__).parents[1] / "docs" / "data_cards.md").read_text()
    for name in zoo_tasks.TASKS:
        assert f"`{name}`" in cards, name
