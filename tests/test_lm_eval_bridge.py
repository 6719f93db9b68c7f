import copy
import json

import pytest
import torch
from lm_eval.models.huggingface import HFLM
from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

from common.evaluation import encode_pair, generate, rank_classification
from common.lm_eval_bridge import evaluate_in_memory, run_lm_eval, task_config, task_metrics, write_task_yaml
from common.tokenizers import gpt2_tokenizer

MC_DOCS = [
    {
        "question": "What is the capital of France?",
        "choices": ["Paris", "London", "a small town"],
        "label": 0,
    },
    {"question": "2 + 2 =", "choices": ["4", "22", "five"], "label": 0},
    {"question": "Which animal barks?", "choices": ["cat", "dog", "a blue whale", "cow"], "label": 1},
    {"question": "Opposite of hot?", "choices": ["cold", "warm"], "label": 0},
    {"question": "Colour of the sky?", "choices": ["green", "blue", "red"], "label": 1},
    {"question": "Is water wet?", "choices": ["yes", "no"], "label": 0},
    {"question": "First letter of the alphabet?", "choices": ["z", "b", "a"], "label": 2},
    {
        "question": "How many legs does a spider have?",
        "choices": ["six", "eight", "ten thousand"],
        "label": 1,
    },
]
PROMPT = "Question: {{question}}\nAnswer:"


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # A large init spread makes log-likelihoods differ clearly between choices (no near-ties).
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, initializer_range=0.2)
    return GPT2LMHeadModel(cfg).eval()


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def test_multiple_choice_acc_agrees_with_rank_classification(tmp_path, monkeypatch, model, tok):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_jsonl(data_dir / "mc.jsonl", MC_DOCS)
    monkeypatch.chdir(data_dir)  # the YAML gets a relative path here...
    write_task_yaml(
        tmp_path / "tasks",
        "toy_mc",
        "mc.jsonl",
        "multiple_choice",
        doc_to_text=PROMPT,
        doc_to_choice="{{choices}}",
        doc_to_target="label",
    )
    monkeypatch.chdir("/")  # ...and lm-eval runs elsewhere: the absolute path must still find the data
    raw = run_lm_eval(model, tok, ["toy_mc"], include_path=tmp_path / "tasks", log_samples=True)

    ours = rank_classification(
        model,
        tok,
        [f"Question: {d['question']}\nAnswer:" for d in MC_DOCS],
        [[" " + c for c in d["choices"]] for d in MC_DOCS],  # lm-eval's target_delimiter is " "
        [d["label"] for d in MC_DOCS],
        length_normalize=False,
        disable=True,
    )
    samples = sorted(raw["samples"]["toy_mc"], key=lambda s: s["doc_id"])
    theirs = [[ll for ll, _ in s["filtered_resps"]] for s in samples]
    their_predictions = [max(range(len(row)), key=row.__getitem__) for row in theirs]
    assert len(set(ours["predictions"])) > 1  # a model that always answers 0 would prove little
    assert ours["predictions"] == their_predictions
    assert [s["acc"] for s in samples] == [
        float(p == d["label"]) for p, d in zip(ours["predictions"], MC_DOCS)
    ]
    for mine, their in zip(ours["scores"], theirs):
        assert mine == pytest.approx(their, rel=1e-5)
    assert task_metrics(raw)["toy_mc"]["acc"] == ours["accuracy"]


def test_generate_until_exact_match_agrees_with_generate(tmp_path, model, tok):
    questions = [f"What is {i} plus {i + 1}?" for i in range(6)]
    prompts = [f"Question: {q}\nAnswer:" for q in questions]
    greedy = generate(model, tok, prompts, 6, stop=["\n"], disable=True)
    assert all(greedy)  # the construction needs non-empty generations
    # The first half of the targets are the model's own greedy answers, so exact match must be 1/2.
    answers = greedy[:3] + ["nope"] * 3
    data = write_jsonl(
        tmp_path / "gen.jsonl", [{"question": q, "answer": a} for q, a in zip(questions, answers)]
    )
    cfg = task_config(
        "toy_gen",
        data,
        "generate_until",
        doc_to_text=PROMPT,
        doc_to_target="{{answer}}",
        generation_kwargs={"max_gen_toks": 6},
    )
    raw = run_lm_eval(model, tok, [cfg], log_samples=True)
    samples = sorted(raw["samples"]["toy_gen"], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0].strip() for s in samples] == greedy
    assert task_metrics(raw)["toy_gen"]["exact_match"] == 0.5


def test_evaluate_in_memory_returns_clean_metrics_and_leaves_model_and_tokenizer_as_they_were(
    tmp_path, model, tok
):
    data = write_jsonl(tmp_path / "mc.jsonl", MC_DOCS)
    cfg = task_config(
        "toy", data, "multiple_choice", doc_to_text=PROMPT, doc_to_choice="{{choices}}", doc_to_target="label"
    )
    tokenizer = copy.deepcopy(tok)
    model.train()
    try:
        metrics = evaluate_in_memory(model, tokenizer, [cfg], limit=3, batch_size=2)
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()
    assert tokenizer.pad_token is None  # HFLM set a pad token on its own copy only
    assert set(metrics) == {"toy"}
    assert set(metrics["toy"]) == {"acc", "acc_stderr", "sample_len"}
    assert metrics["toy"]["sample_len"] == 3
    assert isinstance(metrics["toy"]["acc"], float) and 0.0 <= metrics["toy"]["acc"] <= 1.0


@pytest.mark.parametrize("backend", ["causal", "seq2seq"])
def test_encode_pair_matches_lm_eval(model, tok, backend):
    if backend == "seq2seq":
        t5 = T5ForConditionalGeneration(
            T5Config(vocab_size=64, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2)
        )
        lm = HFLM(pretrained=t5, tokenizer=copy.deepcopy(tok))
    else:
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tok))
    # "The quick bro" + "wn fox": the whole text has the token "brown", so the causal continuation is [" fox"]
    pairs = [
        ("Answer: ", "Paris"),
        ("Answer:", " Paris"),
        ("x  ", "y"),
        ("The quick bro", "wn fox"),
        ("a\n", " b"),
    ]
    for context, continuation in pairs:
        expected = lm._encode_pair(context, continuation)
        assert encode_pair(tok, context, continuation, encoder_decoder=backend == "seq2seq") == expected


def test_task_config_writes_absolute_paths_and_rejects_bad_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "d.jsonl", MC_DOCS)
    common = dict(doc_to_text=PROMPT, doc_to_target="label")
    cfg = task_config("t", "d.jsonl", "multiple_choice", doc_to_choice="{{choices}}", **common)
    assert cfg["dataset_kwargs"]["data_files"] == {"test": str(tmp_path / "d.jsonl")}
    assert cfg["dataset_path"] == "json" and cfg["metric_list"][0]["metric"] == "acc"
    gen = task_config("g", "d.jsonl", "generate_until", generation_kwargs={"max_gen_toks": 3}, **common)
    assert gen["generation_kwargs"] == {"until": ["\n"], "max_gen_toks": 3, "do_sample": False}
    with pytest.raises(FileNotFoundError, match="no data file"):
        task_config("t", "missing.jsonl", "multiple_choice", doc_to_choice="{{choices}}", **common)
    with pytest.raises(ValueError, match="unknown output_type"):
        task_config("t", "d.jsonl", "multiple-choice", doc_to_choice="{{choices}}", **common)
    with pytest.raises(ValueError, match="doc_to_choice is needed by"):
        task_config("t", "d.jsonl", "multiple_choice", **common)
    with pytest.raises(ValueError, match="only apply to generate_until"):
        task_config("t", "d.jsonl", "multiple_choice", doc_to_choice="x", generation_kwargs={}, **common)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match=r"cannot read d\.txt"):
        task_config("t", "d.txt", "generate_until", **common)
