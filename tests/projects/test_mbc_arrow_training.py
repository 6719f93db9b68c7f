"""Expert training as mttl's: LoRA A initialisation (hand-computed bounds)."""

import math

import torch
from peft import get_peft_model

from common.adapters import lora_config
from projects.mbc_arrow.expert_model import load_base
from projects.mbc_arrow.train_expert import mttl_lora_init


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
