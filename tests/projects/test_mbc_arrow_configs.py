"""Configs resolve, paper configs fit the paper model (on meta), and tied-A training shares one lora_A."""

import pytest
import torch
from peft import get_peft_model

from common.adapters import lora_config, lora_factors
from common.config import ConfigError, load_config
from common.models import build_meta
from projects.mbc_arrow.main import DEFAULTS
from projects.mbc_arrow.train_expert import peft_targets, tie_lora_a

CONFIGS = ["paper_gptneo_125m", "paper_phi2", "tiny_notebook", "real_notebook", "micro_notebook"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_resolves(name):
    cfg = load_config(DEFAULTS, [f"projects/mbc_arrow/configs/{name}.yaml"], ["top_k=3"])
    assert cfg["top_k"] == 3 and cfg["lora_rank"] >= 1


def test_unknown_key_names_close_match():
    with pytest.raises(ConfigError, match="top_k"):
        load_config(DEFAULTS, [], ["topk=4"])


def test_paper_gptneo_config_adapts_qkv_of_every_layer_on_meta():
    cfg = load_config(DEFAULTS, ["projects/mbc_arrow/configs/paper_gptneo_125m.yaml"])
    model = build_meta(cfg["base_model"])
    lcfg = lora_config("gpt_neo", r=cfg["lora_rank"], alpha=cfg["lora_alpha"])
    lcfg.target_modules = peft_targets(cfg["modify_layers"])
    pm = get_peft_model(model, lcfg)
    names = [
        n for n, _ in pm.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj")) and "lora" not in n
    ]
    assert len(names) == 12 * 3
    assert peft_targets(".*dense|.*q_proj") == ".*dense|.*q_proj"  # Phi-2's regex goes to peft as a regex


def test_tied_lora_a_is_one_parameter_per_layer():
    from projects.mbc_arrow.expert_model import load_base

    model, _ = load_base("micro:gpt_neo")
    pm = get_peft_model(model, lora_config("gpt_neo", r=2, init_lora_weights=False))
    n_untied = sum(p.numel() for n, p in pm.named_parameters() if "lora_A" in n)
    assert tie_lora_a(pm, "q_proj.lora_a|k_proj.lora_a|v_proj.lora_a") == 2  # 2 micro layers
    f = lora_factors(pm)
    attn = "base_model.model.transformer.h.0.attn.attention"
    assert torch.equal(f[f"{attn}.q_proj"].A, f[f"{attn}.v_proj"].A)
    n_a = sum(p.numel() for n, p in pm.named_parameters() if "lora_A" in n)
    assert 3 * n_a == n_untied  # parameters() deduplicates: one A per layer instead of three
