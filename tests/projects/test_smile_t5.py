"""SMILE's Flan-T5 arm on the micro T5: upscaling T5's bias-free Linears, LoRA experts merged into full
deltas, and the text-generation task pool's scores on hand-made cases."""

import copy

import pytest
import torch
from datasets import Dataset

from common.adapters import add_adapter, lora_config, save_adapter
from common.models import load_model
from common.tiny_world import tiny_base
from projects.smile import text_generation
from projects.smile.pools import merge_lora
from projects.smile.text_generation import TextGenerationTaskPool, spearman_of_text
from projects.smile.upscale import SmileMoELinear, smile_upscale


def _micro_t5():
    torch.manual_seed(0)
    return load_model(tiny_base("t5", "micro"), "t5").eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(2, 300, (2, 7), generator=g),
        "decoder_input_ids": torch.randint(2, 300, (2, 5), generator=g),
    }


def test_one_dense_expert_on_t5_equals_the_finetuned_model():
    pretrained = _micro_t5()
    finetuned = copy.deepcopy(pretrained)
    with torch.no_grad():  # a fine-tune of every Linear (lm_head included), as finetune_t5 trainable=linear
        for m in finetuned.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight += 0.05 * torch.randn_like(m.weight)
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    model, info = smile_upscale(pretrained, {"a": finetuned}, gate_k=1, k=-1, top_k=1)
    # T5's Linears have no bias; its lm_head is its own Linear (T5 v1.1 / Flan-T5 do not tie it to the
    # embedding), so it is upscaled while the shared embedding stays pretrained
    assert pretrained.lm_head.weight.data_ptr() != pretrained.shared.weight.data_ptr()
    assert isinstance(model.lm_head, SmileMoELinear) and model.lm_head.expert_bias is None
    assert "lm_head" in info.upscaled and all(not bias for _, _, bias in info.upscaled.values())
    torch.testing.assert_close(model.shared.weight, pretrained.shared.weight)
    with torch.no_grad():
        torch.testing.assert_close(
            model(**_inputs()).logits, finetuned(**_inputs()).logits, rtol=1e-4, atol=1e-4
        )
    for key, value in pretrained.state_dict().items():  # the caller's model is untouched
        assert torch.equal(value, before[key])


def test_lora_merged_into_full_weights_equals_peft_merge_and_unload(tmp_path):
    base = _micro_t5()
    peft_model = add_adapter(copy.deepcopy(base), lora_config("t5", 2, 4, target_modules=["q", "v"]))
    with torch.no_grad():  # B starts at zero: give the adapter a non-zero update
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    save_adapter(peft_model, tmp_path / "adapter")
    ours = merge_lora(base, tmp_path / "adapter")
    reference = peft_model.merge_and_unload()
    changed = 0
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-6, atol=1e-6)
        changed += not torch.equal(value, base.state_dict()[key])
    # q and v of each encoder self-attention, decoder self-attention and decoder cross-attention
    assert changed == 2 * base.config.num_layers + 4 * base.config.num_decoder_layers
    assert all(torch.equal(v, _micro_t5().state_dict()[k]) for k, v in base.state_dict().items())


def test_spearman_of_decoded_numbers_hand_computed():
    # preds 1.0, 2.5, unparsable -> 0.0; ranks (2, 3, 1) against (1, 2, 3): d = (1, 1, -2), rho = 1 - 6*6/24
    assert spearman_of_text(["1.0", "2.5", "n/a"], ["1.0", "2.0", "3.0"]) == pytest.approx(-0.5)
    assert spearman_of_text(["2.0", "2.0", "2.0"], ["1.0", "2.0", "3.0"]) == 0.0  # constant: no correlation


def test_task_pool_scores_a_hand_made_case(monkeypatch):
    from transformers import AutoTokenizer

    pool = TextGenerationTaskPool.__new__(TextGenerationTaskPool)  # hand-made data instead of a config's
    pool.cfg = {"max_new_tokens": 4, "batch_size": 2}
    pool.tokenizer = AutoTokenizer.from_pretrained(tiny_base("t5", "micro"))
    pool.data = {
        "lang": Dataset.from_dict({"source": ["l one", "l two", "l three"], "target": ["eng", "fra", "eng"]}),
        "stsb": Dataset.from_dict({"source": ["s one", "s two", "s three"], "target": ["1.0", "2.0", "3.0"]}),
    }
    answers = {
        "l one": "eng",
        "l two": "eng",
        "l three": "eng",
        "s one": "1.0",
        "s two": "2.5",
        "s three": "n/a",
    }
    monkeypatch.setattr(
        text_generation, "generate_answers", lambda model, tok, prompts, **kw: [answers[p] for p in prompts]
    )
    model = _micro_t5()
    report = pool.evaluate(model)
    assert report["lang"]["accuracy"] == report["lang"]["exact_match"] == pytest.approx(2 / 3)
    assert report["stsb"]["accuracy"] == pytest.approx(-0.5)  # Spearman's rho, as fusion_bench scores STS-B
    assert report["stsb"]["exact_match"] == pytest.approx(1 / 3)
    assert report["average"]["accuracy"] == pytest.approx((2 / 3 - 0.5) / 2)
    # the loss: mean per-token cross-entropy of target + EOS (two batches here), = the model's loss on one batch
    rows = pool.data["lang"]
    batch = text_generation.encode_pairs(pool.tokenizer, list(rows["source"]), list(rows["target"]))
    with torch.no_grad():
        expected = model(**batch).loss
    assert report["lang"]["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_batched_answers_come_back_in_the_input_order():
    from transformers import AutoTokenizer

    model, tokenizer = _micro_t5(), AutoTokenizer.from_pretrained(tiny_base("t5", "micro"))
    prompts = ["a much longer prompt than the others here", "short", "a middle prompt"]
    batched = text_generation.generate_answers(model, tokenizer, prompts, max_new_tokens=3, batch_size=3)
    alone = [
        text_generation.generate_answers(model, tokenizer, [p], max_new_tokens=3, batch_size=1)[0]
        for p in prompts
    ]
    assert batched == alone and len(set(batched)) > 1


def test_paper_flan_t5_task_pool_config_resolves_from_the_seed_command():
    from common.data.hub import GLUE_PROMPTS
    from projects.smile.main import resolve

    cfg = resolve(
        [
            "method=smile_upscaling/smile_upscaling",
            "modelpool=Seq2SeqLMPool/flan-t5-base_glue_lora16",
            "taskpool=flan-t5_glue_text_generation",  # the seed's bare name, found in its subfolder
        ]
    )
    assert cfg["taskpool"]["type"] == "FlanT5GLUETextGenerationTaskPool" and cfg["taskpool"]["data"] == "hub"
    assert cfg["taskpool"]["tasks"] == list(GLUE_PROMPTS)  # cola mnli mrpc qnli qqp rte sst2 stsb
    assert cfg["modelpool"]["adapters"] is True
    with pytest.raises(ValueError, match="hidden"):
        text_generation.task_split("cola", None, "hub", "test")
    with pytest.raises(ValueError, match="needs a spec"):
        text_generation.task_split("topic", None, "tiny", "test")


def test_t5_routing_counts_encoder_tokens_and_the_first_decoding_step_and_follows_the_gates(monkeypatch):
    from transformers import AutoTokenizer

    from projects.smile.routing import routing_by_domain

    pretrained = _micro_t5()
    experts = {}
    for i, name in enumerate(("a", "b")):
        ft = copy.deepcopy(pretrained)
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for m in ft.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight += 0.05 * torch.randn_like(m.weight)
        experts[name] = ft
    model, _ = smile_upscale(pretrained, experts, gate_k=2, k=2, top_k=1)
    tok = AutoTokenizer.from_pretrained(tiny_base("t5", "micro"))
    texts = {"a": ["translate this", "one more text here"], "b": ["short"]}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SmileMoELinear)}
    n_enc = sum(n.startswith("encoder.") for n in layers)
    # cross-attention k/v read the encoder's states: one decision per source token, like the encoder
    n_cross = sum("EncDecAttention" in n and n.rsplit(".", 1)[-1] in ("k", "v") for n in layers)
    n_other = len(layers) - n_enc - n_cross  # the other decoder layers and lm_head: the first step only
    r = routing_by_domain(model, tok, texts)
    for domain, found in r.items():
        n_tok = sum(len(tok(t)["input_ids"]) for t in texts[domain])
        assert found["tokens"] == n_tok
        assert n_cross > 0 and found["decisions"] == n_tok * (n_enc + n_cross) + len(texts[domain]) * n_other
        assert set(found["by_stack"]) == {"encoder", "cross_kv", "decoder"}
        assert all(sum(v) == pytest.approx(1.0) for v in (found["all"], *found["by_stack"].values()))
    # expert a's singular vectors zeroed in every router: every decision goes to b, encoder and decoder alike
    for layer in layers.values():
        layer.gate.weight.data[: layer.gate_k] = 0
    r = routing_by_domain(model, tok, texts)
    assert all(
        found["all"] == [0.0, 1.0] and found["by_stack"]["decoder"] == [0.0, 1.0] for found in r.values()
    )

    # the task pool reports it with `routing: N` (the first N sources of each task)
    pool = TextGenerationTaskPool.__new__(TextGenerationTaskPool)
    pool.cfg = {"max_new_tokens": 2, "batch_size": 2, "routing": 1}
    pool.tokenizer = tok
    pool.data = {"a": Dataset.from_dict({"source": texts["a"], "target": ["x", "y"]})}
    monkeypatch.setattr(
        text_generation, "generate_answers", lambda model, tok, prompts, **kw: ["x"] * len(prompts)
    )
    report = pool.evaluate(model)
    assert report["routing"]["a"]["tokens"] == len(tok(texts["a"][0])["input_ids"])
    from projects.smile.routing import routing_report

    # no routing without `routing: N`, nor for a model without SMILE layers (the base, a single expert)
    assert (
        routing_report(model, tok, texts, None) is None and routing_report(pretrained, tok, texts, 1) is None
    )
