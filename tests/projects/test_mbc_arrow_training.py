"""Expert training and evaluation as mttl's: LoRA A initialisation (hand-computed bounds), the collator's
prompt format, generation stopping."""

import contextlib
import json
import math

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model

from common.adapters import lora_config
from common.config import load_config
from common.evaluation import IGNORE_INDEX
from projects.mbc_arrow import evaluators
from projects.mbc_arrow.expert_model import load_base
from projects.mbc_arrow.library import get_expert_library
from projects.mbc_arrow.main import DEFAULTS, parse
from projects.mbc_arrow.tasks import prompt_and_answer
from projects.mbc_arrow.train_expert import encode_example, mttl_lora_init, train_expert, validation_interval

MICRO = "projects/mbc_arrow/configs/micro_notebook.yaml"


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


@pytest.mark.parametrize(
    "eval_every, per_epoch, total, expected",
    [
        (None, 4, 10, 4),  # unset: every epoch (mttl's Lightning default)
        (-1, 4, 10, 4),
        (2, 4, 10, 2),
        (20, 4, 10, 4),  # at most an epoch, as mttl caps val_check_interval
        (None, 4, 3, 3),  # total_steps inside the first epoch: validated at its end
    ],
)
def test_validation_interval_as_mttl(eval_every, per_epoch, total, expected):
    assert validation_interval(eval_every, per_epoch, total) == expected


def test_expert_validates_every_epoch_and_keeps_the_best(tmp_path):
    # 16 examples / batch 4 = 4 steps an epoch; 2.5 epochs = 10 steps: validations at 4, 8 and the end (10).
    cfg = load_config(
        DEFAULTS, [MICRO], ["total_steps=null", "num_train_epochs=2.5", "finetune_task_name=champ_category"]
    )
    lib = get_expert_library(f"local://{tmp_path / 'lib'}", create=True)
    out = train_expert(cfg, lib, str(tmp_path / "run"))
    assert out["steps"] == 10
    evals = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    evals = [e for e in evals if "eval" in e]
    assert [e["step"] for e in evals] == [4, 8]  # the last (10) is validated after `train` returns
    best = min([e["eval"]["val_loss"] for e in evals] + [out["val_loss_best"]])
    assert out["val_loss_best"] == pytest.approx(best)
