import string

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from common.evaluation import (
    classification_accuracy,
    encode_pair,
    eval_mode,
    exact_match,
    generate,
    lm_loss,
    normalize_answer,
    rank_classification,
    rouge_l,
    sequence_logprobs,
)

SPECIAL = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2, as in T5
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, so decode(encode(s)) == s and any id sequence re-encodes to itself."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def micro_gpt2(dtype=torch.float32) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    # A large init spread makes the next-token distributions peaked, so argmax decisions are not near-ties.
    cfg = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=len(SPECIAL) + len(CHARS),
        n_positions=64,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=1,
    )
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def micro_t5(dtype=torch.float32) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=len(SPECIAL) + len(CHARS),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        initializer_factor=4.0,
    )
    return T5ForConditionalGeneration(cfg).to(dtype).eval()


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():  # the slow references below need no graph
        yield


def manual_logprob(model, tok, context, continuation):
    """Slow reference: one unbatched forward, log_softmax, gather (contexts here have no trailing space)."""
    ctx = tok.encode(context) if context else [tok.eos_token_id]
    cont = tok.encode(continuation)
    if model.config.is_encoder_decoder:
        logits = model(input_ids=torch.tensor([ctx]), labels=torch.tensor([cont])).logits[0]
    else:
        logits = model(input_ids=torch.tensor([ctx + cont])).logits[0, len(ctx) - 1 : -1]
    logprobs = logits.double().log_softmax(-1)
    target = torch.tensor(cont)
    return float(logprobs[torch.arange(len(cont)), target].sum()), bool((logprobs.argmax(-1) == target).all())


def manual_greedy(model, tok, prompt, max_new_tokens):
    """Slow reference: argmax one token at a time, no cache, no padding; stop at EOS."""
    ids = tok.encode(prompt)
    out = []
    for _ in range(max_new_tokens):
        if model.config.is_encoder_decoder:
            dec = torch.tensor([[model.config.decoder_start_token_id, *out]])
            logits = model(input_ids=torch.tensor([ids]), decoder_input_ids=dec).logits
        else:
            logits = model(input_ids=torch.tensor([ids + out])).logits
        nxt = int(logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
    return tok.decode(out, skip_special_tokens=True).strip()


# ---- lm_loss -------------------------------------------------------------------------------------


def test_lm_loss_equals_hand_computed_cross_entropy(tok):
    model = micro_gpt2(torch.float64)
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    logits = model(input_ids=ids).logits  # (2, 12, V)
    nll = -logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (2, 11)
    out = lm_loss(model, [ids], disable=True)
    assert out["tokens"] == 22
    assert out["loss"] == pytest.approx(float(nll.mean()), rel=1e-12)
    assert out["perplexity"] == pytest.approx(float(nll.mean().exp()), rel=1e-12)


def test_lm_loss_is_token_weighted_and_skips_ignored_labels(tok):
    model = micro_gpt2(torch.float64)
    a, b = torch.randint(3, 90, (1, 20)), torch.randint(3, 90, (3, 5))
    labels = a.clone()
    labels[:, :8] = -100  # a prompt that is not scored: tokens 8..19 are, i.e. 12 predictions
    out = lm_loss(model, [{"input_ids": a, "labels": labels}, b], disable=True)
    la = -model(input_ids=a).logits[0, 7:-1].log_softmax(-1).gather(-1, a[0, 8:, None]).sum()
    lb = -model(input_ids=b).logits[:, :-1].log_softmax(-1).gather(-1, b[:, 1:, None]).sum()
    assert out["tokens"] == 12 + 3 * 4
    assert out["loss"] == pytest.approx(float((la + lb) / 24), rel=1e-12)


@pytest.mark.parametrize("side", ["left", "right"])
def test_lm_loss_batched_with_padding_equals_unbatched(tok, side):
    model = micro_gpt2(torch.float64)
    seqs = [tok.encode(s) for s in ["hello world", "a", "the cat sat on the mat"]]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        where = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, where], mask[i, where] = torch.tensor(s), 1
    batched = lm_loss(model, [{"input_ids": ids, "attention_mask": mask}], disable=True)
    unbatched = lm_loss(model, [torch.tensor(s) for s in seqs], disable=True)
    assert batched["tokens"] == unbatched["tokens"] == sum(len(s) - 1 for s in seqs)
    assert batched["loss"] == pytest.approx(unbatched["loss"], rel=1e-10)


def test_lm_loss_encoder_decoder_pads_and_weights_by_token(tok):
    model = micro_t5(torch.float64)
    pairs = [("translate: cat", "chat"), ("hi", "bonjour tout le monde")]
    enc = [tok.encode(x) for x, _ in pairs]
    dec = [tok.encode(y) for _, y in pairs]
    input_ids = torch.tensor([enc[0], enc[1] + [0] * (len(enc[0]) - len(enc[1]))])
    mask = (torch.arange(input_ids.shape[1]) < torch.tensor([len(e) for e in enc])[:, None]).long()
    labels = torch.full((2, max(map(len, dec))), -100)
    for i, d in enumerate(dec):
        labels[i, : len(d)] = torch.tensor(d)
    batched = lm_loss(
        model, [{"input_ids": input_ids, "attention_mask": mask, "labels": labels}], disable=True
    )
    total = 0.0
    for e, d in zip(enc, dec):
        logits = model(input_ids=torch.tensor([e]), labels=torch.tensor([d])).logits[0]
        total += float(F.cross_entropy(logits, torch.tensor(d), reduction="sum"))
    assert batched["tokens"] == sum(map(len, dec))
    assert batched["loss"] == pytest.approx(total / batched["tokens"], rel=1e-10)
    with pytest.raises(ValueError, match="needs 'labels'"):
        lm_loss(model, [input_ids], disable=True)


def test_lm_loss_rejects_batches_with_nothing_to_predict(tok):
    with pytest.raises(ValueError, match="no token to predict"):
        lm_loss(micro_gpt2(), [torch.tensor([[5]])], disable=True)


# ---- sequence_logprobs ---------------------------------------------------------------------------

PAIRS = [
    ("Q: 2+2?\nA:", " 4"),
    ("x", "yz"),
    ("Question: the sky is\nAnswer:", " blue"),
    ("", "abc"),
    ("ab", "c"),
]


@pytest.mark.parametrize("make", [micro_gpt2, micro_t5])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_sequence_logprobs_equal_manual_log_softmax_gather(tok, make, batch_size):
    model = make(torch.float64)
    contexts, conts = zip(*PAIRS)
    scores = sequence_logprobs(model, tok, contexts, conts, batch_size=batch_size, disable=True)
    for (ctx, cont), score in zip(PAIRS, scores):
        # " 4" after "A:" is two character tokens; the trailing-space rule does not apply here
        logprob, greedy = manual_logprob(model, tok, ctx, cont)
        assert score.logprob == pytest.approx(logprob, rel=1e-10)
        assert score.n_tokens == len(tok.encode(cont))
        assert score.is_greedy == greedy


@pytest.mark.parametrize("make", [micro_gpt2, micro_t5])
def test_is_greedy_true_exactly_for_the_argmax_continuation(tok, make):
    model = make()
    prompt = "abc"
    greedy = manual_greedy(model, tok, prompt, 4)
    assert greedy  # the construction needs a non-empty greedy continuation
    other = chr(ord("a") + (ord(greedy[0]) - ord("a") + 1) % 26) + greedy[1:]
    scores = sequence_logprobs(model, tok, [prompt, prompt], [greedy, other], disable=True)
    assert [s.is_greedy for s in scores] == [True, False]
    assert scores[0].logprob > scores[1].logprob


def test_append_eos_adds_the_eos_log_probability(tok):
    model = micro_t5(torch.float64)
    plain, with_eos = (
        sequence_logprobs(model, tok, ["hi"], ["yo"], append_eos=flag, disable=True)[0]
        for flag in (False, True)
    )
    logits = model(
        input_ids=torch.tensor([tok.encode("hi")]), labels=torch.tensor([[*tok.encode("yo"), 1]])
    ).logits
    assert with_eos.n_tokens == plain.n_tokens + 1
    assert with_eos.logprob - plain.logprob == pytest.approx(
        float(logits[0, 2].log_softmax(-1)[1]), rel=1e-10
    )


def test_encode_pair_moves_trailing_space_into_the_continuation():
    from common.tokenizers import gpt2_tokenizer

    gpt2 = gpt2_tokenizer()
    # GPT-2 BPE: " fox" is one token (21831); "fox" after a separately tokenized space would be two.
    assert encode_pair(gpt2, "The quick brown ", "fox", encoder_decoder=False) == ([464, 2068, 7586], [21831])
    assert encode_pair(gpt2, "The quick brown", " fox", encoder_decoder=False) == ([464, 2068, 7586], [21831])
    assert encode_pair(gpt2, "The quick brown ", "fox", encoder_decoder=True)[1] == [21831]
    # Empty context: conditioned on <|endoftext|> (GPT-2's BOS)
    assert encode_pair(gpt2, "", "Hello", encoder_decoder=False) == ([50256], [15496])
    with pytest.raises(ValueError, match="encodes to no token"):
        encode_pair(gpt2, "The quick brown", "", encoder_decoder=False)


def test_sequence_logprobs_left_truncates_long_inputs(tok):
    model = micro_gpt2(torch.float64)
    long_context = "ab" * 40  # 80 tokens > n_positions = 64
    score = sequence_logprobs(model, tok, [long_context], ["cd"], disable=True)[0]
    kept = (tok.encode(long_context) + tok.encode("cd"))[-65:-1]  # the last 64 input tokens
    logits = model(input_ids=torch.tensor([kept])).logits[0, -2:]
    expected = logits.log_softmax(-1)[torch.arange(2), torch.tensor(tok.encode("cd"))].sum()
    assert score.logprob == pytest.approx(float(expected), rel=1e-10)
    with pytest.raises(ValueError, match="more than the model's limit of 64"):
        sequence_logprobs(model, tok, ["a"], ["b" * 65], disable=True)


# ---- rank_classification -------------------------------------------------------------------------


def test_rank_classification_picks_the_highest_hand_computed_score(tok):
    model = micro_gpt2(torch.float64)
    prompts = ["Q: color?\nA:", "Q: animal?\nA:"]
    choices = [[" red", " blue", " green"], [" cat", " dog"]]
    out = rank_classification(model, tok, prompts, choices, [1, 0], length_normalize=False, disable=True)
    expected_scores = [[manual_logprob(model, tok, p, c)[0] for c in cs] for p, cs in zip(prompts, choices)]
    expected_pred = [max(range(len(s)), key=s.__getitem__) for s in expected_scores]
    assert out["predictions"] == expected_pred
    for row, expected in zip(out["scores"], expected_scores):
        assert row == pytest.approx(expected, rel=1e-10)
    assert out["accuracy"] == pytest.approx(sum(p == y for p, y in zip(expected_pred, [1, 0])) / 2)


def test_length_normalisation_changes_the_decision_in_a_constructed_case(tok):
    model = micro_gpt2(torch.float64)
    prompt = "Q: word?\nA:"
    candidates = [c for c in CHARS if c not in " \n"]
    # Short choice: the least likely single character. Long choice: 4 greedy characters (none special).
    first = model(input_ids=torch.tensor([tok.encode(prompt)])).logits[0, -1].log_softmax(-1)
    worst = min(candidates, key=lambda c: float(first[tok.encode(c)[0]]))
    long_ids = []
    for _ in range(4):
        logits = model(input_ids=torch.tensor([tok.encode(prompt) + long_ids])).logits[0, -1]
        logits[:3] = -float("inf")
        long_ids.append(int(logits.argmax()))
    long = tok.decode(long_ids)
    short_lp = manual_logprob(model, tok, prompt, worst)[0]
    long_lp = manual_logprob(model, tok, prompt, long)[0]
    assert long_lp < short_lp and long_lp / 4 > short_lp  # the construction: sum and mean disagree

    def predict(normalize):
        out = rank_classification(
            model, tok, [prompt], [[worst, long]], [0], length_normalize=normalize, disable=True
        )
        return out["predictions"][0]

    assert predict(False) == 0
    assert predict(True) == 1


def test_rank_classification_checks_its_inputs(tok):
    model = micro_gpt2()
    with pytest.raises(ValueError, match="must be as many"):
        rank_classification(model, tok, ["a", "b"], [["x"]], [0], length_normalize=False)
    with pytest.raises(ValueError, match="at least one choice"):
        rank_classification(model, tok, ["a"], [[]], [0], length_normalize=False)


# ---- generate ------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [micro_gpt2, micro_t5])
def test_batched_greedy_generation_equals_a_manual_argmax_loop(tok, make):
    model = make()
    prompts = ["Q: hi\nA:", "x", "The cat sat on the", "ab"]  # different lengths: padded batches
    expected = [manual_greedy(model, tok, p, 10) for p in prompts]
    assert generate(model, tok, prompts, 10, batch_size=3, disable=True) == expected
    assert generate(model, tok, prompts, 10, batch_size=1, disable=True) == expected


def test_generate_left_truncates_a_prompt_that_leaves_no_room(tok):
    model = micro_gpt2()
    prompt = "abcdefgh" * 10  # 80 tokens, n_positions = 64
    kept = prompt[-(64 - 5) :]  # one character per token
    assert generate(model, tok, [prompt], 5, disable=True) == [manual_greedy(model, tok, kept, 5)]
    with pytest.raises(ValueError, match="leaves no room"):
        generate(model, tok, ["a"], 64, disable=True)


def test_generate_cuts_at_the_first_stop_string(tok):
    model = micro_gpt2()
    full = manual_greedy(model, tok, "abc", 12)
    assert len(set(full)) > 1  # the construction needs two distinct characters
    stop = full[len(full) // 2]
    assert generate(model, tok, ["abc"], 12, stop=[stop, "never"], disable=True) == [
        full.split(stop)[0].strip()
    ]


def test_generate_restores_the_training_flag(tok):
    model = micro_gpt2().train()
    generate(model, tok, ["a"], 2, disable=True)
    assert model.training and all(m.training for m in model.modules())


# ---- text metrics --------------------------------------------------------------------------------


def test_rouge_l_matches_the_lcs_f_measure_by_hand():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": P = R = 5/6.
    # LCS("a b c d", "a c e") = "a c": P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7.
    preds = ["the cat sat on the mat", "a b c d"]
    refs = ["the cat is on the mat", "a c e"]
    assert rouge_l(preds, refs) == pytest.approx((5 / 6 + 4 / 7) / 2)
    assert rouge_l(["a b c d"], [["x y", "a c e"]]) == pytest.approx(4 / 7)  # best reference
    assert rouge_l(["cats"], ["cat"]) == 1.0  # Porter stemming
    assert rouge_l(["cats"], ["cat"], use_stemmer=False) == 0.0


def test_exact_match_normalisation():
    assert normalize_answer("  The  Answer, is: 42! ") == "answer is 42"
    assert exact_match(["The Answer!", "no"], ["answer", "yes"]) == 0.5
    assert exact_match(["The Answer!"], ["answer"], normalize=False) == 0.0
    assert exact_match(["Paris"], [["London", "paris"]]) == 1.0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])


# ---- classification_accuracy ---------------------------------------------------------------------


def test_classification_accuracy_counts_argmax_hits():
    model = nn.Linear(4, 3)
    x = torch.randn(10, 4)
    y = torch.randint(0, 3, (10,))
    expected = float((model(x).argmax(-1) == y).float().mean())
    tuples = [(x[:6], y[:6]), (x[6:], y[6:])]
    assert classification_accuracy(model, tuples, disable=True) == pytest.approx(expected)

    class Wrapped(nn.Module):  # the HF calling convention: keyword inputs, output with .logits
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, pixel_values):
            return type("Out", (), {"logits": self.inner(pixel_values)})()

    dicts = [{"pixel_values": x[:3], "labels": y[:3]}, {"pixel_values": x[3:], "labels": y[3:]}]
    assert classification_accuracy(Wrapped(), dicts, disable=True) == pytest.approx(expected)
    assert classification_accuracy(lambda inp: model(inp), tuples, disable=True) == pytest.approx(expected)


def test_eval_mode_restores_mixed_training_flags():
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(2, 2)).train()
    model[0].eval()
    with torch.enable_grad(), eval_mode(model):
        assert not any(m.training for m in model.modules())
        assert not torch.is_grad_enabled()
    assert [m.training for m in model.modules()] == [True, False, True]


def test_pad_sequences_and_collate_by_hand():
    from common.evaluation import pad_sequences
    from common.lm_finetune import collate

    ids, mask = pad_sequences([[5, 6, 7], [8]], 0, "left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="side must be 'left' or 'right', got 'middle'"):
        pad_sequences([[1]], 0, "middle")
    # fine-tuning's batch: right padding, the pad id in input_ids, -100 in labels, 0 in the mask
    batch = collate(
        [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}], pad_id=9
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
