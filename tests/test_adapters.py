import pytest
import torch
from peft import PeftModel
from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

from common.adapters import (
    AdapterError,
    add_adapter,
    check_compatible,
    ia3_config,
    load_adapter,
    lora_config,
    lora_factors,
    lora_factors_from_state,
    save_adapter,
)
from common.io import save_tensors


def micro_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=16)
    return GPT2LMHeadModel(cfg).eval()


def micro_t5(seed=0):
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=64,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(cfg).eval()


IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def test_zero_init_lora_leaves_output_unchanged():
    base = micro_gpt2()
    ref = base(IDS).logits
    model = add_adapter(base, lora_config("gpt2", r=4, alpha=8))
    assert torch.equal(model(IDS).logits, ref)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_factors_match_merged_weight_delta_on_conv1d():
    base = micro_gpt2()
    w0 = base.transformer.h[0].attn.c_attn.weight.detach().clone()  # Conv1D: (d_in, d_out)
    model = add_adapter(base, lora_config("gpt2", r=4, alpha=8, init_lora_weights=False))
    f = lora_factors(model)["base_model.model.transformer.h.0.attn.c_attn"]
    assert f.A.shape == (4, 16) and f.B.shape == (48, 4) and f.scaling == 2.0
    merged = model.merge_and_unload()
    delta = merged.transformer.h[0].attn.c_attn.weight.detach() - w0
    torch.testing.assert_close(delta.T, f.delta(), rtol=1e-5, atol=1e-6)


def test_save_load_roundtrip_with_extras_and_peft_reload(tmp_path):
    model = add_adapter(micro_gpt2(), lora_config("gpt2", r=2, init_lora_weights=False))
    out = model(IDS).logits
    gate = torch.randn(16)
    save_adapter(
        model, tmp_path / "exp", extras={"gate": gate}, extras_meta={"gate": "PHATGOOSE gate vector"}
    )
    saved = load_adapter(tmp_path / "exp")
    assert torch.equal(saved.extras["gate"], gate) and saved.extras_meta["gate"].startswith("PHATGOOSE")
    from_state = lora_factors_from_state(saved.state, saved.config)
    from_model = lora_factors(model)
    assert len(from_state) == len(from_model) == 8  # c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj x 2 layers
    for name, f in from_model.items():
        g = from_state[name.replace(".default", "")]
        assert torch.equal(f.A, g.A) and torch.equal(f.B, g.B) and f.scaling == g.scaling
    reloaded = PeftModel.from_pretrained(micro_gpt2(), str(tmp_path / "exp")).eval()
    assert torch.equal(reloaded(IDS).logits, out)


def test_named_adapter_saves_flat(tmp_path):
    model = add_adapter(micro_gpt2(), lora_config("gpt2", r=2), adapter_name="code")
    save_adapter(model, tmp_path / "code", adapter_name="code")
    assert (tmp_path / "code" / "adapter_config.json").is_file()
    assert load_adapter(tmp_path / "code").config.r == 2


def test_bad_adapters_fail_clearly(tmp_path):
    with pytest.raises(AdapterError, match="not a PEFT adapter folder"):
        load_adapter(tmp_path)
    with pytest.raises(AdapterError, match="rank must be positive"):
        lora_config("gpt2", r=0)
    with pytest.raises(AdapterError, match="no default target modules for model_type 'bert'"):
        lora_config("bert", r=2)
    model = add_adapter(micro_gpt2(), lora_config("gpt2", r=2, init_lora_weights=False))
    save_adapter(model, tmp_path / "a")
    saved = load_adapter(tmp_path / "a")
    state = dict(saved.state)
    key = next(k for k in state if k.endswith("lora_A.weight"))
    state[key] = torch.randn(3, state[key].shape[1])
    with pytest.raises(AdapterError, match="rank of lora_A"):
        lora_factors_from_state(state, saved.config)
    nan_state = dict(saved.state)
    nan_state[key] = torch.full_like(nan_state[key], float("nan"))
    # a NaN adapter written by someone else is refused on load
    import safetensors.torch as st

    st.save_file(nan_state, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="NaN/inf"):
        load_adapter(tmp_path / "a")
    saved.config.base_model_name_or_path = "gpt2"
    with pytest.raises(AdapterError, match="trained on base model 'gpt2'"):
        check_compatible(saved.config, "EleutherAI/gpt-neo-125m")
    check_compatible(saved.config, "/models/gpt2")
    save_tensors(tmp_path / "ok.safetensors", {"x": torch.ones(1)})


def test_ia3_on_t5_starts_at_identity_and_scales_ff_input():
    base = micro_t5()
    dec = torch.zeros(2, 3, dtype=torch.long)
    ref = base(input_ids=IDS, decoder_input_ids=dec).logits
    model = add_adapter(base, ia3_config("t5"))
    torch.testing.assert_close(model(input_ids=IDS, decoder_input_ids=dec).logits, ref, rtol=1e-6, atol=1e-6)
    wo = model.base_model.model.encoder.block[0].layer[1].DenseReluDense.wo
    k = model.base_model.model.encoder.block[0].layer[0].SelfAttention.k
    assert wo.ia3_l["default"].shape == (1, 32)  # feed-forward: scales the input (d_ff)
    assert k.ia3_l["default"].shape == (16, 1)  # attention keys: scales the output
    x = torch.randn(5, 32)
    with torch.no_grad():
        wo.ia3_l["default"].copy_(torch.linspace(0.5, 2.0, 32)[None])
    torch.testing.assert_close(wo(x), wo.base_layer(x * torch.linspace(0.5, 2.0, 32)))
