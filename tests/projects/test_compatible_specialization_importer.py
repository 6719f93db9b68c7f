"""The authors' `.pt` checkpoints (their GPT's names) load onto GPT2LMHeadModel and compute their forward."""

import argparse

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from projects.compatible_specialization import importer
from projects.compatible_specialization.checkpoints import checkpoint_kind, load_routed, load_specialist

HEADS = 2
IDS = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(0))


def _their_state(n_layer: int = 2, width: int = 8, vocab: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict in the original GPT's naming (nn.Linear weights (out, in), untied lm_head)."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen) * 0.3

    state = {"transformer.wte.weight": r(vocab, width), "transformer.wpe.weight": r(16, width)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        state |= {p + "ln_1.weight": 1 + r(width), p + "ln_1.bias": r(width)}
        state |= {p + "attn.in_proj.weight": r(3 * width, width), p + "attn.in_proj.bias": r(3 * width)}
        state |= {p + "attn.out_proj.weight": r(width, width), p + "attn.out_proj.bias": r(width)}
        state |= {p + "ln_2.weight": 1 + r(width), p + "ln_2.bias": r(width)}
        state |= {p + "mlp.in_proj.weight": r(4 * width, width), p + "mlp.in_proj.bias": r(4 * width)}
        state |= {p + "mlp.out_proj.weight": r(width, 4 * width), p + "mlp.out_proj.bias": r(width)}
    state |= {
        "transformer.ln_f.weight": 1 + r(width),
        "transformer.ln_f.bias": r(width),
        "lm_head.weight": r(vocab, width),
    }
    return state


def _mlp(s, p, x):
    return F.linear(
        F.gelu(F.linear(x, s[p + "in_proj.weight"], s[p + "in_proj.bias"])),
        s[p + "out_proj.weight"],
        s[p + "out_proj.bias"],
    )


def _their_forward(s: dict[str, torch.Tensor], ids: torch.Tensor, mlp=None) -> torch.Tensor:
    """The original GPT's forward written out: pre-LN blocks, causal SDPA, exact GELU, untied head."""
    d = s["transformer.wte.weight"].shape[1]
    x = s["transformer.wte.weight"][ids] + s["transformer.wpe.weight"][: ids.shape[1]]
    n_layer = 1 + max(int(k.split(".")[2]) for k in s if k.startswith("transformer.h."))
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        h = F.layer_norm(x, (d,), s[p + "ln_1.weight"], s[p + "ln_1.bias"], 1e-5)
        q, k, v = F.linear(h, s[p + "attn.in_proj.weight"], s[p + "attn.in_proj.bias"]).chunk(3, -1)
        q, k, v = (t.unflatten(-1, (HEADS, -1)).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(-2)
        x = x + F.linear(a, s[p + "attn.out_proj.weight"], s[p + "attn.out_proj.bias"])
        h = F.layer_norm(x, (d,), s[p + "ln_2.weight"], s[p + "ln_2.bias"], 1e-5)
        x = x + (mlp(i, h) if mlp else _mlp(s, p + "mlp.", h))
    x = F.layer_norm(x, (d,), s["transformer.ln_f.weight"], s["transformer.ln_f.bias"], 1e-5)
    return x @ s["lm_head.weight"].T


@pytest.fixture(autouse=True)
def _heads(monkeypatch):
    monkeypatch.setitem(importer.ARCH_HEADS, "micro", HEADS)


def test_imported_specialist_computes_their_forward(tmp_path):
    state = _their_state()
    path = tmp_path / "gpt2-tinycodes_finetuned.pt"
    torch.save({"model": state, "step": 3}, path)
    assert checkpoint_kind(path) == "specialist"
    model = load_specialist(path, base=None, arch="micro")
    assert model.config.activation_function == "gelu" and not model.config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, _their_forward(state, IDS), rtol=1e-5, atol=1e-5)


def test_imported_routed_checkpoint_computes_their_mixture(tmp_path):
    dense = _their_state(seed=0)
    experts = [_their_state(seed=s) for s in (1, 2)]
    state = {k: v for k, v in dense.items() if ".mlp." not in k}
    gen = torch.Generator().manual_seed(5)
    for i in range(2):
        for e, ex in enumerate(experts):
            for proj in ("in_proj", "out_proj"):
                for kind in ("weight", "bias"):
                    state[f"transformer.h.{i}.mlp.experts.mlp_{e}.{proj}.{kind}"] = ex[
                        f"transformer.h.{i}.mlp.{proj}.{kind}"
                    ]
        state[f"transformer.h.{i}.mlp.router_policy.0.weight"] = torch.randn(2, 8, generator=gen)
    path = tmp_path / "gpt_routed-gpt2-0.005-2-False-gsm-hard_routed.pt"
    torch.save({"model": state}, path)
    assert checkpoint_kind(path) == "routed"

    def mixture(i, h):
        p = torch.softmax(h @ state[f"transformer.h.{i}.mlp.router_policy.0.weight"].T, -1)
        return sum(p[..., e : e + 1] * _mlp(ex, f"transformer.h.{i}.mlp.", h) for e, ex in enumerate(experts))

    model = load_routed(path, base=None, arch="micro", top_k=2, num_multi_layer_experts=1)
    with torch.no_grad():
        torch.testing.assert_close(
            model(IDS).logits, _their_forward(state, IDS, mixture), rtol=1e-5, atol=1e-5
        )
    with pytest.raises(ValueError, match="needs --topk"):
        load_routed(path, base=None, arch="micro")


def test_bad_original_checkpoints_fail_clearly(tmp_path):
    pickled = tmp_path / "args.pt"
    torch.save({"model": _their_state(), "args": argparse.Namespace(lr=1.0)}, pickled)
    with pytest.raises(ValueError, match=r"weights_only=True"):
        importer.read_original(pickled)
    empty = tmp_path / "empty.pt"
    torch.save({"model": {"x": 1}}, empty)
    with pytest.raises(ValueError, match="no state dict of tensors"):
        importer.read_original(empty)
    with pytest.raises(ValueError, match=r"unknown --arch 'gpt3'"):
        importer.original_config(_their_state(), "gpt3")
    partial = {k: v for k, v in _their_state().items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match=r"missing \['lm_head\.weight'\]"):
        importer.convert_dense(partial)


def test_conversion_round_trips_through_gpt2_names():
    state = _their_state()
    config = importer.original_config(state, "micro")
    assert (config.n_layer, config.n_embd, config.vocab_size, config.n_positions) == (2, 8, 40, 16)
    model = GPT2LMHeadModel(config)
    model.load_state_dict(importer.convert_dense(state))  # strict: every GPT-2 weight is filled
    torch.testing.assert_close(
        model.transformer.h[1].mlp.c_fc.weight, state["transformer.h.1.mlp.in_proj.weight"].T
    )
    assert isinstance(config, GPT2Config)
