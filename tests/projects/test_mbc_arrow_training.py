"""Expert training and evaluation as mttl's: LoRA A initialisation (hand-computed bounds), the collator's
prompt format, generation stopping."""

import contextlib
import math

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model

from common.adapters import lora_config
from common.evaluation import IGNORE_INDEX
from projects.mbc_arrow import evaluators
from projects.mbc_arrow.expert_model import load_base
from projects.mbc_arrow.main import parse
from projects.mbc_arrow.tasks import prompt_and_answer
from projects.mbc_arrow.train_expert import encode_example, mttl_lora_init


def _lora_as(init: str):
    model, _ = load_base("micro:gpt_neo")
    torch.manual_seed(0)
    pm = get_peft_model(model, lora_config("gpt_neo", r=4))
    if init == "mttl":
        assert mttl_lora_init(pm) == 6  # q, k, v of the 2 micro layers
    return [p for n, p in pm.named_parameters() if "lora_A" in n], [
        p for n, p in pm.named_parameters() if "lora_B" in n
    ]


def test_mttl_lora_a_is_uniform_within_one_over_sqrt_three_d_in():
    a_mttl, b_mttl = _lora_as("mttl")
    a_peft, _ = _lora_as("peft")
    d_in = a_mttl[0].shape[1]
    mttl_bound, peft_bound = 1 / math.sqrt(3 * d_in), 1 / math.sqrt(d_in)  # mttl lora.py; peft kaiming a=√5
    for a in a_mttl:
        assert a.abs().max() <= mttl_bound
        assert a.abs().max() > 0.9 * mttl_bound  # fills its range (4·d_in draws)
        # U(-b, b) has std b/√3
        assert abs(a.std().item() - mttl_bound / math.sqrt(3)) < 0.15 * mttl_bound / math.sqrt(3)
    assert all(
        float(b.detach().abs().max()) == 0 for b in b_mttl
    )  # B still zero: the expert starts as the base
    assert max(float(a.detach().abs().max()) for a in a_peft) > 1.5 * mttl_bound  # peft's is √3 wider
    assert max(float(a.detach().abs().max()) for a in a_peft) <= peft_bound


@pytest.mark.parametrize(
    "source, target, fmt, expected",
    [
        ("Q: 2+2?", "4", "mttl", ("Q: 2+2?", " 4")),  # one space between, as `source + " " + target`
        ("Q: 2+2? ", "4", "mttl", ("Q: 2+2?", " 4")),  # a trailing space moves to the target
        ("Q: 2+2?\n", "4", "mttl", ("Q: 2+2?\n", "4")),  # no space after a newline
        ("Q: 2+2?", " 4", "mttl", ("Q: 2+2?", " 4")),
        ("Q: 2+2?", "4", "answer", ("Q: 2+2?\nAnswer:", " 4")),  # ours before
    ],
)
def test_prompt_and_answer_as_mttl_collator(source, target, fmt, expected):
    assert prompt_and_answer(source, target, fmt) == expected


def test_encoded_example_is_source_space_target_eos_with_loss_on_target():
    _, tok = load_base("micro:gpt_neo")
    ex = encode_example(tok, "the cat", "sat", 64, 8)
    prompt, answer = tok.encode("the cat"), tok.encode(" sat")
    assert ex["input_ids"] == [*prompt, *answer, tok.eos_token_id]
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + [*answer, tok.eos_token_id]
    with pytest.raises(ValueError, match="prompt_format"):
        encode_example(tok, "the cat", "sat", 64, 8, "chat")


def test_rouge_generation_prompts_are_the_sources_and_stop_at_eos_only(monkeypatch):
    seen = {}

    def fake_generate(model, tokenizer, prompts, max_new_tokens, *, batch_size, stop):
        seen.update(prompts=list(prompts), stop=list(stop), max_new_tokens=max_new_tokens)
        return ["sat down"] * len(prompts)

    class Model:
        model = tokenizer = None

        @contextlib.contextmanager
        def routing(self, task_names):
            yield

    monkeypatch.setattr(evaluators, "generate", fake_generate)
    data = Dataset.from_dict({"task": ["t", "t"], "source": ["the cat", "a dog "], "target": ["sat", "ran"]})
    out = evaluators.rouge_evaluate(Model(), data, max_output_length=5)
    assert seen == {"prompts": ["the cat", "a dog"], "stop": [], "max_new_tokens": 5}
    # Rouge-L F of "sat down" vs "sat": P 1/2, R 1 -> 2/3; vs "ran": 0; mean ×100
    assert out["rougeL"] == pytest.approx(100 * (2 / 3) / 2)
    evaluators.rouge_evaluate(
        Model(), data, max_output_length=5, prompt_format="answer", stop_at_newline=True
    )
    assert seen["prompts"] == ["the cat\nAnswer:", "a dog \nAnswer:"] and seen["stop"] == ["\n"]


def test_bad_prompt_format_fails_clearly():
    with pytest.raises(SystemExit):
        parse(["evaluate", "-k", "prompt_format=chat"])
