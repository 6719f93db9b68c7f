"""`common.evaluation.generate` (length-sorted batches, rows stopped at EOS or a stop string) against
`model.generate` greedy with one prompt at a time (the peer of issue 21, row 4), on micro models."""

import pytest
import torch

from common.evaluation import _eos_ids, _finish, generate
from tests.test_evaluation import char_tokenizer, micro_gpt2, micro_t5
from tests.test_shared_prefix import micro_llama, with_lora

MODELS = {
    "gpt2": micro_gpt2,
    "llama": micro_llama,
    "llama-lora": lambda: with_lora(micro_llama()),
    "t5": micro_t5,
}
# Different lengths (so batches pad), one prompt twice.
PROMPTS = ["Q: hi\nA:", "x", "The cat sat on the", "ab", "Tell me a story about", "x", "0123456789 "]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def one_at_a_time(model, tok, prompt, max_new_tokens, stop=()):
    """The peer: `model.generate` greedy on the prompt alone, then the same cut as `generate`."""
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    first_new = 1 if model.config.is_encoder_decoder else ids.shape[1]
    return _finish(tok, out[0, first_new:].tolist(), _eos_ids(model, tok), stop)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_generation_equals_generate_one_prompt_at_a_time(tok, name, batch_size):
    model = MODELS[name]()
    expected = [one_at_a_time(model, tok, p, 12) for p in PROMPTS]
    assert generate(model, tok, PROMPTS, 12, batch_size=batch_size, disable=True) == expected


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5"])
def test_stop_strings_give_the_text_before_them(tok, name):
    model = MODELS[name]()
    full = [one_at_a_time(model, tok, p, 16) for p in PROMPTS]
    # Stop at a character of the first output's middle, and at a string that never appears.
    stop = [full[0][len(full[0]) // 2], "never"]
    expected = [one_at_a_time(model, tok, p, 16, stop) for p in PROMPTS]
    assert expected != full  # the stop string cuts at least one output
    assert generate(model, tok, PROMPTS, 16, batch_size=3, stop=stop, disable=True) == expected


def test_a_batch_stops_once_every_row_has_met_a_stop_string(tok):
    model = micro_gpt2()
    prompts = ["abc", "Q: hi\nA:"]
    first_chars = [one_at_a_time(model, tok, p, 1) for p in prompts]
    assert all(first_chars)  # the construction: each prompt's first new token is a visible character
    calls = []
    model.transformer.register_forward_hook(lambda *a: calls.append(1))
    out = generate(model, tok, prompts, 24, batch_size=2, stop=first_chars, disable=True)
    assert out == ["", ""]  # the text before each row's first stop string
    assert len(calls) == 1  # one step (the prompt's forward) instead of 24: both rows met their stop string
