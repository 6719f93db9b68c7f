"""PHATGOOSE's routing, gates, MoE and checkpoint manipulations on micro T5 models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from common.adapters import add_adapter, load_adapter, lora_config, lora_factors, lora_factors_from_state
from common.models import micro_model
from common.routing import top_k_route
from projects.phatgoose import library as L
from projects.phatgoose.experts import T5_TARGETS, init_lora
from projects.phatgoose.moe import (
    Expert,
    MoELoRALinear,
    attach_experts,
    captured_inputs,
    routing_scores,
    set_mode,
)


def _expert(model, name: str, seed: int, rank: int = 2) -> tuple[Expert, object]:
    """A LoRA with random (non-zero) A and B on a copy of `model`, as an Expert and the peft model."""
    peft_model = add_adapter(
        copy.deepcopy(model), lora_config("t5", rank, 1.0, target_modules=list(T5_TARGETS))
    )
    torch.manual_seed(seed)
    init_lora(peft_model, 0.3)
    for m in peft_model.modules():
        if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {}):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.3)
    f = lora_factors(peft_model)
    ex = Expert(
        name=name,
        A={k.removeprefix("base_model.model."): v.A for k, v in f.items()},
        B={k.removeprefix("base_model.model."): v.B for k, v in f.items()},
        scaling=next(iter(f.values())).scaling,
    )
    return ex, peft_model


def _inputs():
    torch.manual_seed(1)
    return {"input_ids": torch.randint(2, 256, (2, 7)), "decoder_input_ids": torch.randint(2, 256, (2, 5))}


def test_routing_scores_invariant_to_shift_and_scale_of_a_gate():
    u, v = torch.randn(5, 16), torch.randn(3, 16)
    moved = v.clone()
    moved[1] = 7.5 * moved[1] + 3.0  # a positive scale and a shift of one gate vector
    torch.testing.assert_close(routing_scores(u, v), routing_scores(u, moved), atol=1e-5, rtol=1e-4)


def test_routing_scores_formula():
    u, v = torch.randn(4, 8), torch.randn(3, 8)
    mean, var = (lambda x: x.mean(-1, keepdim=True)), (lambda x: x.var(-1, unbiased=False, keepdim=True))
    u_std, v_std = ((x - mean(x)) / torch.sqrt(var(x) + 1e-5) for x in (u, v))
    torch.testing.assert_close(routing_scores(u, v), u_std @ v_std.T / math.sqrt(8))


def test_top2_renormalised_softmax_is_softmax_over_top2_scores():
    s = torch.randn(10, 6)
    w, idx = top_k_route(s, 2, renormalize=True, softmax_first=True)
    expected = F.softmax(s.gather(-1, idx), dim=-1)
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(w.sum(-1), torch.ones(10))


def test_one_expert_moe_equals_that_expert():
    base = micro_model("t5")
    ex, peft_model = _expert(base, "a", 0)
    moe_model = copy.deepcopy(base)
    attach_experts(moe_model, [ex])
    with torch.no_grad():
        torch.testing.assert_close(moe_model(**_inputs()).logits, peft_model(**_inputs()).logits)


def test_fixed_routing_to_one_expert_equals_that_expert_alone():
    base = micro_model("t5")
    (a, _), (b, peft_b) = _expert(base, "a", 0), _expert(base, "b", 1)
    moe_model = copy.deepcopy(base)
    attach_experts(moe_model, [a, b])
    set_mode(moe_model, "fixed", 1)
    with torch.no_grad():
        torch.testing.assert_close(moe_model(**_inputs()).logits, peft_b(**_inputs()).logits)


def test_routed_module_matches_a_per_token_reference():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6)
    A, B, keys = torch.randn(4, 2, 8), torch.randn(4, 6, 2), torch.randn(4, 8)
    m = MoELoRALinear(base, A, B, torch.full((4,), 0.5), keys)
    u = torch.randn(3, 5, 8)
    out = m(u)
    for t in u.reshape(-1, 8):
        s = routing_scores(t, keys)
        top = s.topk(2).indices
        w = F.softmax(s[top], dim=-1)
        ref = base(t) + sum(w[j] * 0.5 * B[e] @ (A[e] @ t) for j, e in enumerate(top))
        row = out.reshape(-1, 6)[(u.reshape(-1, 8) == t).all(-1).nonzero()[0, 0]]
        torch.testing.assert_close(row, ref, atol=1e-5, rtol=1e-4)


def test_zero_gate_halves_the_lora_output():
    base = micro_model("t5")
    ex, peft_model = _expert(base, "a", 0)
    gated = copy.deepcopy(base)
    for m in attach_experts(gated, [ex]).values():
        m.add_gate()
    with torch.no_grad():
        b, p, g = (mdl(**_inputs()).logits for mdl in (base, peft_model, gated))
    # Only the first module sees an exactly halved update (later ones see changed inputs): test a module.
    lin = gated.get_submodule("encoder.block.0.layer.1.DenseReluDense.wo")
    u = torch.randn(3, lin.base.in_features)
    delta = (u @ lin.A[0].T) @ lin.B[0].T * lin.scaling[0]
    torch.testing.assert_close(lin(u) - lin.base(u), 0.5 * delta)
    assert not torch.allclose(g, p) and not torch.allclose(g, b)


def test_gate_training_only_gates_get_gradients():
    base = micro_model("t5")
    ex, _ = _expert(base, "a", 0)
    modules = attach_experts(base, [ex])
    gates = [m.add_gate() for m in modules.values()]
    base.train()
    batch = _inputs()
    loss = base(input_ids=batch["input_ids"], labels=batch["decoder_input_ids"]).loss
    loss.backward()
    trainable = [n for n, p in base.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".gate") for n in trainable)
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)
    assert all(p.grad is None for n, p in base.named_parameters() if not n.endswith(".gate"))


def test_gate_needs_exactly_one_expert():
    base = micro_model("t5")
    a, _ = _expert(base, "a", 0)
    modules = attach_experts(base, [a, a])
    with pytest.raises(ValueError, match="exactly one expert"):
        next(iter(modules.values())).add_gate()


def test_expert_from_another_base_is_refused():
    small = micro_model("t5")
    ex, _ = _expert(small, "a", 0)
    wide = micro_model("t5", d_model=24)
    with pytest.raises(ValueError, match="another base model"):
        attach_experts(wide, [ex])


def _saved(tmp_path, base, name, seed):
    ex, _ = _expert(base, name, seed)
    return L.write_expert(tmp_path / name, lora_config("t5", 2, 1.0, target_modules=list(T5_TARGETS)), ex)


def test_manipulations_round_trip(tmp_path):
    base = micro_model("t5")
    p = L.put_index_to_lora(_saved(tmp_path, base, "a", 0), tmp_path / "moe_a")
    ex = L.read_expert(p)
    assert ex.router and all(v.abs().sum() == 0 for v in ex.router.values())
    ex.gate = {m: torch.randn(v.shape[0]) for m, v in ex.router.items()}
    cfg = load_adapter(p).config
    L.write_expert(tmp_path / "gated_a", cfg, ex)
    L.use_input_gate_as_router(tmp_path / "gated_a")
    routed = L.read_expert(tmp_path / "gated_a")
    for m in ex.gate:
        torch.testing.assert_close(routed.router[m], ex.gate[m])
    b = L.put_index_to_lora(_saved(tmp_path, base, "b", 1), tmp_path / "moe_b")
    lib = L.run_concatenate([tmp_path / "gated_a", b], tmp_path / "lib", ["a", "b"])
    experts = L.read_library(lib)
    assert [e.name for e in experts] == ["a", "b"] and not experts[0].gate


def test_missing_expert_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="missing expert 'x'"):
        L.run_concatenate([tmp_path / "nowhere"], tmp_path / "lib", ["x"])


def test_merged_experts_equals_mean_of_BA(tmp_path):
    base = micro_model("t5")
    paths = [_saved(tmp_path, base, n, s) for n, s in (("a", 0), ("b", 1), ("c", 2))]
    lib = L.run_concatenate(paths, tmp_path / "lib", ["a", "b", "c"])
    out = L.average_outer_product_lora_weights(lib, tmp_path / "merged")
    saved = load_adapter(out)
    merged = lora_factors_from_state(saved.state, saved.config)
    experts = L.read_library(lib)
    for m, f in merged.items():
        key = m.removeprefix("base_model.model.")
        mean = sum(e.scaling * e.B[key] @ e.A[key] for e in experts) / 3
        torch.testing.assert_close(f.delta(), mean, atol=1e-6, rtol=1e-5)


def test_import_rthree_splits_experts_in_order(tmp_path):
    from safetensors.torch import save_file

    d_in, d_out, r = 16, 16, 4
    state = {}
    for i in range(2):
        for mod in ("encoder.block.0.layer.0.SelfAttention.q", "decoder.block.0.layer.1.EncDecAttention.k"):
            state[f"{mod}._addons.expert_lora.layer1__{i}"] = torch.randn(d_in, r)
            state[f"{mod}._addons.expert_lora.layer2__{i}"] = torch.randn(r, d_out)
            state[f"{mod}._addons.router.expert_embeddings__{i}"] = torch.randn(d_in)
    save_file(state, str(tmp_path / "ckpt.safetensors"))
    lib = L.import_rthree(tmp_path / "ckpt.safetensors", tmp_path / "lib", ["p3rte", "p3copa"])
    experts = L.read_library(lib)
    assert [e.name for e in experts] == ["p3rte", "p3copa"]
    q = "encoder.block.0.layer.0.SelfAttention.q"
    torch.testing.assert_close(experts[1].A[q], state[f"{q}._addons.expert_lora.layer1__1"].T)
    torch.testing.assert_close(experts[1].B[q], state[f"{q}._addons.expert_lora.layer2__1"].T)
    torch.testing.assert_close(experts[1].router[q], state[f"{q}._addons.router.expert_embeddings__1"])
    assert experts[0].scaling == pytest.approx(1 / r)
    with pytest.raises(ValueError, match="names were given"):
        L.import_rthree(tmp_path / "ckpt.safetensors", tmp_path / "lib2", ["only_one"])


class _CharTok:
    """A character-level stand-in tokenizer with `encode` (EOS = 1 appended with special tokens)."""

    bos_token_id = None
    eos_token_id = 1

    def encode(self, text, add_special_tokens=True):
        return [2 + (ord(c) % 200) for c in text] + ([1] if add_special_tokens else [])


def test_encoder_once_rank_classification_matches_the_common_one():
    from common.evaluation import rank_classification
    from projects.phatgoose.evaluate import rank_classify

    base = micro_model("t5")
    experts = [_expert(base, n, s)[0] for s, n in enumerate("abc")]
    model = copy.deepcopy(base)
    torch.manual_seed(3)
    for e in experts:
        e.router = {m: torch.randn(a.shape[-1]) for m, a in e.A.items()}
    attach_experts(model, experts)
    sources = ["hello there", "a", "the quick brown fox", "xyz", "some longer text here!", "ok"]
    choices = [["yes", "no", "maybe"], ["p", "qq", "rrr"], ["x", "y", "zz"]] * 2
    ref = rank_classification(
        model, _CharTok(), sources, choices, [0] * 6, length_normalize=True, batch_size=4, disable=True
    )
    assert rank_classify(model, _CharTok(), sources, choices, batch_size=4) == ref["predictions"]
    assert rank_classify(model, _CharTok(), sources, choices, batch_size=1) == ref["predictions"]


def test_balanced_accuracy_scores_a_constant_predictor_one_over_the_classes():
    from projects.phatgoose.evaluate import balanced_accuracy

    labels = [0] * 8 + [1, 2]
    assert balanced_accuracy([0] * 10, labels) == pytest.approx(1 / 3)
    assert balanced_accuracy(labels, labels) == 1.0
    assert balanced_accuracy([0] * 8 + [1, 1], labels) == pytest.approx(2 / 3)


def test_routing_probe_pools_route_probabilities_over_encoder_modules_and_real_tokens_only():
    from projects.phatgoose.experts import load_base
    from projects.phatgoose.routing_probe import encoder_route_probs

    model, tok = load_base("micro:t5")
    experts = [_expert(model, n, s)[0] for s, n in enumerate("abc")]
    torch.manual_seed(5)
    for e in experts:
        e.router = {m: torch.randn(a.shape[-1]) for m, a in e.A.items()}
    modules = attach_experts(model, experts)
    sources = ["a short one", "a much longer input text that needs padding in a batch with the short one"]
    pooled, top1 = encoder_route_probs(model, tok, sources, batch_size=2)
    alone, top1_alone = encoder_route_probs(model, tok, sources[:1], batch_size=1)
    torch.testing.assert_close(pooled[0], alone[0])  # padding tokens do not count
    assert torch.equal(top1[0], top1_alone[0])
    # by hand for the short input: mean over encoder modules and its tokens of softmax(LN(u)·LN(v)/√d)
    enc = {n: m for n, m in modules.items() if n.startswith("encoder.")}
    with torch.no_grad(), captured_inputs(enc) as inputs:
        model.get_encoder()(**tok(sources[:1], return_tensors="pt"))
    probs = torch.stack(
        [routing_scores(inputs[n][0][0], m.keys).softmax(-1) for n, m in enc.items()]
    )  # (M, T, E)
    assert all(not m.capture and m.inputs == [] for m in enc.values())  # the modules stop keeping inputs
    torch.testing.assert_close(pooled[0], probs.mean((0, 1)))
    assert top1[0].shape == probs.shape[:2] and torch.equal(top1[0], probs.argmax(-1))
    assert torch.allclose(pooled.sum(-1), torch.ones(2))


def test_experts_of_different_rank_are_zero_padded():
    # issue 20: experts of rank 2 and 4 ended in a raw torch.stack size error
    base = micro_model("t5", seed=0)
    ex2, peft2 = _expert(base, "r2", seed=3, rank=2)
    ex4, peft4 = _expert(base, "r4", seed=4, rank=4)
    model = copy.deepcopy(base)
    modules = attach_experts(model, [ex2, ex4])
    assert all(m.A.shape[1] == 4 and m.B.shape[2] == 4 for m in modules.values())
    with torch.no_grad():
        for i, peft_model in enumerate((peft2, peft4)):  # each expert alone is its own LoRA model
            set_mode(model, "fixed", i)
            torch.testing.assert_close(model(**_inputs()).logits, peft_model(**_inputs()).logits)


def test_experts_of_different_modules_are_refused_by_name_and_rank():
    base = micro_model("t5", seed=0)
    ex2, _ = _expert(base, "all_modules", seed=3, rank=2)
    ex4, _ = _expert(base, "fewer_modules", seed=4, rank=4)
    dropped = sorted(ex4.A)[0]
    del ex4.A[dropped], ex4.B[dropped]
    with pytest.raises(ValueError) as err:
        attach_experts(copy.deepcopy(base), [ex2, ex4])
    msg = str(err.value)
    n = len(ex2.A)
    assert f"'all_modules' adapts {n} modules, rank 2" in msg
    assert f"'fewer_modules' adapts {n - 1} modules, rank 4, not ['{dropped}']" in msg
