"""The shared-prefix scorer (`common.shared_prefix`, the default decoder-only path of
`common.evaluation.sequence_logprobs` / `rank_classification`) against the previous one-row-per-pair path
(`common.evaluation._pairwise_logprobs`), on micro GPT-2 and Llama models, bare and peft-wrapped.

Tolerance: fp32, |Δ log p| ≤ 1e-4 per answer (the two paths run different matmul shapes and a masked
attention; the differences measured here are ~1e-6), and identical predictions.
"""

import pytest
import torch
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from common.evaluation import _pairwise_logprobs, encode_pair, rank_classification, sequence_logprobs
from common.shared_prefix import supports_shared_prefix
from tests.test_evaluation import CHARS, SPECIAL, char_tokenizer, micro_gpt2

ATOL = 1e-4


def micro_llama(attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(SPECIAL) + len(CHARS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as SmolLM2
        max_position_embeddings=64,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
        attn_implementation=attn_implementation,
    )
    return LlamaForCausalLM(cfg).eval()


def with_lora(model):
    targets = ["c_attn", "c_proj"] if model.config.model_type == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    # init_lora_weights=False: B is random too, so the adapter changes the scores.
    return get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False)).eval()


MODELS = {
    "gpt2": micro_gpt2,
    "llama": micro_llama,
    "llama-eager": lambda: micro_llama("eager"),
    "gpt2-lora": lambda: with_lora(micro_gpt2()),
    "llama-lora": lambda: with_lora(micro_llama()),
}
# Prompts with 1 to 5 answers of 1 to 6 tokens, answers sharing prefixes, a repeated answer, a trailing
# space moved into the answers, a one-token prompt.
PROMPTS = ["Q: color?\nA:", "x", "The cat sat on the ", "Is it 4 or 5?", "ab"]
CHOICES = [
    [" red", " blue", " green"],
    ["y"],
    ["mat", "map", "mat rug", "hat"],
    [" 4", " 5", " 4", " four", " five", " 45"],
    ["c", "cdefgh"],
]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def reference(model, tok, contexts, continuations, batch_size=3):
    pairs = [encode_pair(tok, c, y, encoder_decoder=False) for c, y in zip(contexts, continuations)]
    return _pairwise_logprobs(model, pairs, model.config.max_position_embeddings, batch_size=batch_size)


def assert_same_scores(fast, slow):
    assert [s.n_tokens for s in fast] == [s.n_tokens for s in slow]
    assert [s.is_greedy for s in fast] == [s.is_greedy for s in slow]
    for f, s in zip(fast, slow):
        assert f.logprob == pytest.approx(s.logprob, abs=ATOL)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_shared_prefix_scores_equal_the_pairwise_reference(tok, name, batch_size):
    model = MODELS[name]()
    assert supports_shared_prefix(model)
    contexts = [p for p, cs in zip(PROMPTS, CHOICES) for _ in cs]
    continuations = [c for cs in CHOICES for c in cs]
    with torch.no_grad():
        fast = sequence_logprobs(model, tok, contexts, continuations, batch_size=batch_size, disable=True)
        slow = reference(model, tok, contexts, continuations)
    assert_same_scores(fast, slow)
    assert fast[8].logprob == pytest.approx(fast[10].logprob, abs=1e-5)  # the repeated answer " 4"


@pytest.mark.parametrize("name", ["gpt2", "llama", "llama-lora"])
def test_rank_classification_predicts_what_the_reference_predicts(tok, name):
    model = MODELS[name]()
    labels = [0] * len(PROMPTS)
    out = rank_classification(model, tok, PROMPTS, CHOICES, labels, length_normalize=True, disable=True)
    with torch.no_grad():
        slow = reference(
            model, tok, [p for p, cs in zip(PROMPTS, CHOICES) for _ in cs], [c for cs in CHOICES for c in cs]
        )
    it = iter(slow)
    expected_scores = [[(s := next(it)).logprob / s.n_tokens for _ in cs] for cs in CHOICES]
    expected = [max(range(len(row)), key=row.__getitem__) for row in expected_scores]
    assert out["predictions"] == expected
    for row, exp in zip(out["scores"], expected_scores):
        assert row == pytest.approx(exp, abs=ATOL)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_left_truncation_gives_each_answer_length_its_own_context(tok, name):
    # 80-token prompts > 64 positions: an answer of m tokens keeps the last 65 - m tokens of its prompt,
    # so one prompt's answers of different lengths are scored on different contexts.
    model = MODELS[name]()
    prompts = ["ab" * 40, "xyz" * 27]
    choices = [["c", "cde", "cdefghi", "d"], ["q" * 64, "r"]]  # 64 tokens: one context token left
    contexts = [p for p, cs in zip(prompts, choices) for _ in cs]
    continuations = [c for cs in choices for c in cs]
    with torch.no_grad():
        fast = sequence_logprobs(model, tok, contexts, continuations, batch_size=4, disable=True)
        slow = reference(model, tok, contexts, continuations)
    assert_same_scores(fast, slow)


def test_the_head_sees_only_the_positions_that_predict_answer_tokens(tok):
    model = micro_llama()
    seen = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:-1]))
    continuations = [c for cs in CHOICES for c in cs]
    contexts = [p for p, cs in zip(PROMPTS, CHOICES) for _ in cs]
    sequence_logprobs(model, tok, contexts, continuations, batch_size=8, disable=True)
    n_answer_tokens = sum(
        len(encode_pair(tok, c, y, encoder_decoder=False)[1]) for c, y in zip(contexts, continuations)
    )
    assert seen == [torch.Size([1, n_answer_tokens])]  # one forward for the 5 prompts, one head row per token


def test_prompt_tuning_keeps_the_pairwise_path(tok):
    # Virtual tokens shift every position, so a prompt-learning adapter is scored one row per pair, whose
    # logits start with one per virtual token (the pairwise path read them 3 positions too early before).
    model = get_peft_model(
        micro_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    ).eval()
    assert not supports_shared_prefix(model)
    assert supports_shared_prefix(micro_llama())
    scores = sequence_logprobs(model, tok, ["Q: color?\nA:"] * 2, [" red", " blue"], disable=True)
    with torch.no_grad():
        manual = []
        for y in (" red", " blue"):
            ctx, cont = encode_pair(tok, "Q: color?\nA:", y, encoder_decoder=False)
            logits = model(input_ids=torch.tensor([ctx + cont[:-1]])).logits[0, -len(cont) :]
            manual.append(float(logits.log_softmax(-1)[torch.arange(len(cont)), torch.tensor(cont)].sum()))
    assert [s.logprob for s in scores] == pytest.approx(manual, abs=ATOL)
