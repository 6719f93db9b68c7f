"""Average Activation keys, Retrieval, the held-out split, and the gin layer."""

from __future__ import annotations

import copy

import gin
import pytest
import torch

from common.models import micro_model
from projects.phatgoose import configurables as C
from projects.phatgoose.baselines import Retriever, average_hiddens, retrieval_text
from projects.phatgoose.moe import Expert, attach_experts

CONFIGS = C.CONFIGS


class _Tok:
    """A character-level stand-in tokenizer: enough for `seq2seq_collate`."""

    def __call__(self, texts, max_length, truncation, padding, return_tensors):
        ids = [[2 + (ord(c) % 200) for c in t[:max_length]] for t in texts]
        n = max(map(len, ids))
        return {
            "input_ids": torch.tensor([x + [0] * (n - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids]),
        }


def _zero_expert(model) -> Expert:
    mods = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ("q", "wo")}
    return Expert(
        "z",
        {n: torch.zeros(2, m.in_features) for n, m in mods.items()},
        {n: torch.zeros(m.out_features, 2) for n, m in mods.items()},
        0.5,
    )


def test_average_hiddens_is_the_mean_of_per_example_masked_means():
    model = micro_model("t5")
    ref = copy.deepcopy(model)
    attach_experts(model, [_zero_expert(model)])
    rows = [{"source": "ab", "target": "x"}, {"source": "abcdef", "target": "yz"}]
    keys = average_hiddens(model, _Tok(), rows, 0, batch_size=2, decoder_keys="teacher_forced")
    # reference: the encoder's first q input is the layer-normed embeddings of real tokens
    q = "encoder.block.0.layer.0.SelfAttention.q"
    seen = []
    ref.get_submodule(q).register_forward_hook(lambda m, i, o: seen.append(i[0]))
    per_example = []
    for r in rows:
        ids = torch.tensor([[2 + (ord(c) % 200) for c in r["source"]]])
        labels = torch.tensor([[2 + (ord(c) % 200) for c in r["target"]]])
        seen.clear()
        with torch.no_grad():
            ref(input_ids=ids, labels=labels)
        per_example.append(seen[0][0].mean(0))
    torch.testing.assert_close(keys[q], torch.stack(per_example).mean(0), atol=1e-5, rtol=1e-4)


def test_average_hiddens_decoder_keys_are_the_last_generation_step_inputs():
    # The original computes the keys with greedy generation and overwrites a module's stored input on
    # every call: a decoder module's key is its input at the batch's last step, averaged over examples.
    model = micro_model("t5")
    ref = copy.deepcopy(model)
    attach_experts(model, [_zero_expert(model)])  # zero LoRA: the reference is the plain model
    rows = [{"source": "ab", "target": "x"}, {"source": "abcdef", "target": "yz"}]
    keys = average_hiddens(model, _Tok(), rows, 0, batch_size=2, max_new_tokens=3)
    seen = {}
    for name in ("decoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.0.SelfAttention.q"):
        seen[name] = []
        ref.get_submodule(name).register_forward_hook(lambda m, i, o, n=name: seen[n].append(i[0]))
    enc = _Tok()([r["source"] for r in rows], 512, True, True, "pt")
    with torch.no_grad():
        ref.generate(**enc, max_new_tokens=3, do_sample=False, num_beams=1)
    dec = "decoder.block.0.layer.0.SelfAttention.q"
    assert len(seen[dec]) > 1 and seen[dec][-1].shape[:2] == (2, 1)  # one call per generation step
    torch.testing.assert_close(keys[dec], seen[dec][-1][:, 0].mean(0), atol=1e-5, rtol=1e-4)
    # encoder keys are unchanged: the masked mean over each example's real tokens
    u, mask = seen["encoder.block.0.layer.0.SelfAttention.q"][0], enc["attention_mask"].float()
    per_example = (u * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(
        keys["encoder.block.0.layer.0.SelfAttention.q"], per_example.mean(0), atol=1e-5, rtol=1e-4
    )
    forced = average_hiddens(model, _Tok(), rows, 0, batch_size=2, decoder_keys="teacher_forced")
    assert not torch.allclose(forced[dec], keys[dec], atol=1e-4)
    with pytest.raises(ValueError, match="decoder_keys"):
        average_hiddens(model, _Tok(), rows, 0, decoder_keys="mean")


def test_average_hiddens_rejects_unknown_reduction():
    model = micro_model("t5")
    attach_experts(model, [_zero_expert(model)])
    with pytest.raises(ValueError, match="reduction_method"):
        average_hiddens(model, _Tok(), [{"source": "a", "target": "b"}], 0, encoder_reduction="max")


def test_retrieval_picks_the_expert_of_the_query_dataset():
    r = Retriever()
    r.add_expert(
        "sentiment",
        [
            retrieval_text({"source": f"Tweet: I {w} this phone", "choices": ["neg", "pos"]})
            for w in ("love", "hate", "adore", "dislike")
        ],
    )
    r.add_expert(
        "math",
        [
            retrieval_text({"source": f"Problem: what is {a} plus {b}?", "choices": ["1", "2"]})
            for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))
        ],
    )
    queries = [
        {"source": "Tweet: I really like this camera", "choices": ["neg", "pos"]},
        {"source": "Problem: what is 10 plus 12?", "choices": ["1", "2"]},
    ]
    assert r.retrieve([retrieval_text(q) for q in queries]).tolist() == [0, 1]


def test_retriever_embeddings_are_cached_by_texts_and_equal_to_fresh_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("MOERGING_CACHE", str(tmp_path))
    r = Retriever()
    texts = ["Tweet: I love this phone", "Problem: what is 1 plus 2?", "a third, longer text " * 5]
    fresh = Retriever(cache=False).embed(texts)
    first = r.embed(texts)
    assert torch.equal(first, fresh) and first.shape == (3, 384)
    assert torch.allclose(first.norm(dim=-1), torch.ones(3))
    assert len(list((tmp_path / "retriever_embeddings").iterdir())) == 1

    def no_model(texts):
        raise AssertionError("the cached embeddings should have been read")

    monkeypatch.setattr(r, "_embed", no_model)
    assert torch.equal(r.embed(texts), fresh)  # read back, not recomputed
    with pytest.raises(AssertionError, match="should have been read"):
        r.embed(texts[:2])  # other texts: a new entry


def test_retrieval_text_format():
    row = {"source": "x y", "choices": ["a", "b"]}
    assert retrieval_text(row) == "Answer Choices: a, b, Instance: x y"
    assert retrieval_text(row, include_answer_choices=False) == "x y"


@pytest.mark.parametrize("name", ["tiny.gin", "micro.gin", "paper_p3.gin", "paper_flan.gin"])
def test_gin_configs_parse(name):
    C.parse([CONFIGS / name])
    assert C.scoped("P/TRAIN", C.trainer_settings).num_steps >= 1
    assert C.scoped("P/EVALUATE", C.eval_settings).datasets
    gin.clear_config()


def test_scoped_bindings_and_clear_config_keep_runs_independent():
    C.parse(
        [CONFIGS / "tiny.gin"],
        [
            "P/TRAIN/Trainer.gradient_accumulation_factor=32",
            'M/MODEL/ENCODER/ExposeHidden.reduction_method="masked_mean"',
        ],
    )
    assert C.scoped("P/TRAIN", C.trainer_settings).gradient_accumulation_factor == 32
    assert C.scoped("P/TRAIN/GATE", C.trainer_settings).gradient_accumulation_factor == 32  # inherited
    assert C.scoped("P/TRAIN/GATE", C.trainer_settings).num_steps == 40  # its own
    assert C.scoped("M/MODEL/ENCODER", C.expose_hidden) == "masked_mean"
    assert C.scoped("M/MODEL/DECODER", C.expose_hidden) is None
    C.parse([CONFIGS / "tiny.gin"])
    assert C.scoped("P/TRAIN", C.trainer_settings).gradient_accumulation_factor == 1
    gin.clear_config()


def test_pasted_readme_bindings_parse():
    C.parse(
        [CONFIGS / "tiny.gin"],
        [
            "MOMA/save_weights.should_save_to_gcp=False",
            "main.logging_backend=None",
            "M/MODEL/FFNExperts.topk_value=2",
            "M/MODEL/FFNExperts.normalize_topk=True",
            "P/EVALUATE/Evaluator.analysis_processors=[@WriteOutputText(), @RoutingDistribution()]",
            'WriteOutputText.save_dir="exp_out/x/output_text"',
            'main.procedure_exec_order=["P/EVALUATE/BBH"]',
            "func_caller.func=@put_index_to_lora",
            'put_index_to_lora.path="a"',
            'put_index_to_lora.out_path="b"',
        ],
    )
    procs = C.scoped("P/EVALUATE", C.eval_settings).analysis_processors
    assert procs[0] == C.WriteOutputText("exp_out/x/output_text")
    assert C.func_caller() == {"func": "put_index_to_lora", "path": "a", "out_path": "b"}
    gin.clear_config()


@pytest.mark.parametrize("binding", ["M/MODEL/FFNExperts.not_a_knob=1", "M/MODEL/ENCODER/make_moe.x=1"])
def test_unsupported_binding_fails_clearly(binding):
    with pytest.raises(ValueError, match=r"unsupported gin binding.*supports the configurables"):
        C.parse([CONFIGS / "tiny.gin"], [binding])
    gin.clear_config()


def test_bad_binding_values_fail_clearly():
    C.parse([], ['M/MODEL/ENCODER/ExposeHidden.reduction_method="max"', "M/MODEL/Model.init_moma_calls=[1]"])
    with pytest.raises(ValueError, match="reduction_method"):
        C.scoped("M/MODEL/ENCODER", C.expose_hidden)
    with pytest.raises(ValueError, match="init_moma_calls"):
        C.scoped("M/MODEL", C.model_settings)
    gin.clear_config()


@pytest.mark.slow
def test_heldout_tasks_share_no_text_with_experts():
    from projects.phatgoose.tasks import TINY_EXPERTS, TINY_HELDOUT, check_heldout_disjoint

    check_heldout_disjoint(list(TINY_EXPERTS), list(TINY_HELDOUT))


def test_dataset_names_and_unknown_dataset_error():
    from projects.phatgoose.tasks import dataset_name, load_task

    assert dataset_name("D/TWEET_TOPIC_UNSEEN/EVAL") == "TWEET_TOPIC_UNSEEN"
    with pytest.raises(KeyError, match="Did you mean"):
        load_task("TWEET_SENTIMENT_AIRLNE")


def test_split_bindings_like_the_bash_wrappers():
    text = (
        'P/EVALUATE/Evaluator.datasets=["D/A/EVAL", "D/B/EVAL"]  M/MODEL/FFNExperts.topk_value=2 '
        "P/EVALUATE/Evaluator.analysis_processors=[@WriteOutputText(), @RoutingDistribution()] "
        'run_concatenate.extra_bindings="M/X.r=\\"masked_mean\\" M/Y.r=\\"mean\\""'
    )
    assert C.split_bindings(text) == [
        'P/EVALUATE/Evaluator.datasets=["D/A/EVAL", "D/B/EVAL"]',
        "M/MODEL/FFNExperts.topk_value=2",
        "P/EVALUATE/Evaluator.analysis_processors=[@WriteOutputText(), @RoutingDistribution()]",
        'run_concatenate.extra_bindings="M/X.r=\\"masked_mean\\" M/Y.r=\\"mean\\""',
    ]
    with pytest.raises(ValueError, match="unbalanced"):
        C.split_bindings('a=["x"')


def test_paper_config_model_builds_on_meta_with_the_adapted_linears():
    from common.models import build_meta
    from projects.phatgoose.experts import T5_TARGETS

    C.parse([CONFIGS / "paper_p3.gin"])
    hub_id = C.scoped("M/MODEL", C.model_name)
    rank = C.scoped("M/MODEL", C.moe_settings).d_bottleneck
    gin.clear_config()
    model = build_meta(hub_id)
    linears = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in T5_TARGETS}
    # 24 blocks x (encoder 4 attention + 3 feed-forward; decoder 4 self + 4 cross + 3 feed-forward);
    # rank 16: attention 16·(2048+2048) each, feed-forward 16·(2048+5120) each -> 24·1,474,560 LoRA weights
    assert len(linears) == 24 * (7 + 11) and all(isinstance(m, torch.nn.Linear) for m in linears.values())
    lora_params = sum(rank * (m.in_features + m.out_features) for m in linears.values())
    assert hub_id == "google/t5-xl-lm-adapt" and rank == 16 and lora_params == 35_389_440


def test_training_cap_takes_a_random_subset_not_the_label_sorted_head():
    from datasets import Dataset

    from projects.phatgoose.experts import cap_examples, multitask_data

    # The offline train splits are stored sorted by label: the first `cap` rows would be one class.
    rows = Dataset.from_dict(
        {"source": [f"s{i}" for i in range(300)], "target": ["a"] * 200 + ["b"] * 100, "label": [0] * 300}
    )
    capped = cap_examples(rows, 100)
    assert len(capped) == 100 and capped.column_names == ["source", "target"]
    assert set(capped["target"]) == {"a", "b"}
    assert capped["source"] == cap_examples(rows, 100)["source"]  # fixed: seeds vary training only
    assert len(cap_examples(rows, 1000)) == 300
    assert set(multitask_data([rows, rows], 50)["target"]) == {"a", "b"}


def test_analyze_tables_show_accuracy_balanced_accuracy_and_timings():
    from projects.phatgoose.analyze import table, timing

    def record(seed, acc, bal):
        m = {"H": acc, "mean_accuracy": acc, "H/balanced": bal, "mean_balanced_accuracy": bal}
        return {
            "seed": seed,
            "config": {"heldout": ["H"]},
            "metrics": {"phatgoose": m, "retrieval": {**m, "mean_exact_match": 0.5}},
            "provenance": {"wall_time_s": 600.0},
            "cpu_time_s": 480.0,
            "seconds_by_phase": {"train experts": 300.0},
            "cpu_seconds_by_phase": {"train experts": 240.0},
        }

    records = [record(0, 0.8, 1 / 3), record(1, 0.6, 1 / 3)]
    acc, bal = table(records), table(records, balanced=True)
    assert "| PHATGOOSE | 70.0 ± 14.1 | 70.0 ± 14.1 | — |" in acc
    assert "| Retrieval | 70.0 ± 14.1 | 70.0 ± 14.1 | 50.0 ± 0.0 |" in acc
    assert "| PHATGOOSE | 33.3 ± 0.0 | 33.3 ± 0.0 |" in bal
    assert "| 0 | 10.0 | 8.0 | 5.0 (4.0) |" in timing(records)


def test_validation_every_n_steps_keeps_the_best_step_as_the_original_best_pt(tmp_path):
    from datasets import Dataset

    from common.adapters import load_adapter
    from common.io import load_tensors
    from projects.phatgoose.experts import TrainSettings, train_lora_expert

    data = Dataset.from_dict({"source": [f"text {i}" for i in range(16)], "target": ["yes", "no"] * 8})
    settings = TrainSettings(
        num_steps=3,
        lr=5e-2,
        batch_size=2,
        gradient_accumulation_factor=1,
        max_length=16,
        validation_step_interval=1,
    )
    scripted = iter([0.5, 0.9, 0.9])  # steps 1, 2, 3: the first of the two best is kept
    seen_modes = []

    def validate(model, tokenizer):
        seen_modes.append(model.training)
        return next(scripted)

    ckpt = train_lora_expert("micro:t5", data, tmp_path / "e", settings, rank=2, validate=validate)
    assert seen_modes == [False, False, False]  # validated in eval mode
    saved = load_adapter(ckpt)
    assert saved.extras_meta["best_step"] == "2"
    steps = {
        s: load_tensors(tmp_path / "e" / "training" / "checkpoints" / f"step_{s}" / "weights.safetensors")
        for s in (2, 3)
    }
    for key, value in saved.state.items():
        name = key.replace(".weight", ".default.weight")
        torch.testing.assert_close(value, steps[2][name])
    assert any(not torch.equal(steps[2][k], steps[3][k]) for k in steps[2] if "lora_B" in k)
    kept = sorted(p.name for p in (tmp_path / "e" / "training" / "checkpoints").glob("step_*"))
    assert kept == ["step_2", "step_3"]  # the best and the last; step 1 pruned

    # without the interval: the last step, no validation
    last = train_lora_expert(
        "micro:t5",
        data,
        tmp_path / "f",
        TrainSettings(**{**settings.__dict__, "validation_step_interval": None}),
        rank=2,
        validate=validate,
    )
    assert "best_step" not in load_adapter(last).extras_meta and len(seen_modes) == 3


def test_includes_resolve_without_gin_logging_path_not_found(tmp_path, caplog, monkeypatch):
    """micro.gin's `include 'tiny.gin'` used to log "ERROR Path not found: tiny.gin" from any directory."""
    monkeypatch.chdir(tmp_path)  # not the configs folder
    with caplog.at_level("INFO"):
        C.parse([CONFIGS / "micro.gin"])
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    assert C.scoped("P/TRAIN", C.trainer_settings).num_steps == 2  # micro.gin's, after tiny.gin's
    assert C.scoped("P/EVALUATE", C.eval_settings).datasets  # only tiny.gin binds these
    # a user's file includes a sibling, and nested includes (paper_flan -> paper_p3) expand in order
    (tmp_path / "base.gin").write_text("include 'micro.gin'\nP/TRAIN/Trainer.num_steps = 7\n")
    (tmp_path / "mine.gin").write_text("include 'base.gin'\nP/TRAIN/GATE/Trainer.num_steps = 5\n")
    C.parse([tmp_path / "mine.gin"])
    assert C.scoped("P/TRAIN", C.trainer_settings).num_steps == 7
    assert C.scoped("P/TRAIN/GATE", C.trainer_settings).num_steps == 5
    (tmp_path / "loop.gin").write_text("include 'loop.gin'\n")
    with pytest.raises(ValueError, match="gin include cycle"):
        C.parse([tmp_path / "loop.gin"])
    (tmp_path / "missing.gin").write_text("include 'nowhere.gin'\n")
    with pytest.raises(FileNotFoundError, match=r"'nowhere\.gin' is neither beside it nor in"):
        C.parse([tmp_path / "missing.gin"])
    gin.clear_config()


def test_main_logging_backend_reaches_the_training_loop():
    C.parse([CONFIGS / "micro.gin"], ['main.logging_backend="tensorboard"'])
    settings = C.scoped("P/TRAIN", C.trainer_settings)
    assert settings.train_config(0, C.main_settings()["logging_backend"]).log_backend == "tensorboard"
    assert settings.train_config(0, None).log_backend == "jsonl"  # the seed's main.logging_backend=None
    with pytest.raises(ValueError, match='"wandb" is not wired here: use "tensorboard"'):
        settings.train_config(0, "wandb")
    gin.clear_config()
