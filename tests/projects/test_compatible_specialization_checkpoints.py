"""Our specialist and routed checkpoints round-trip, and bad input fails with a clear error."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from common.config import ConfigError
from projects.compatible_specialization.checkpoints import (
    checkpoint_kind,
    configure,
    load_routed,
    load_specialist,
    save_routed,
    save_specialist,
    specialist_mlps,
)
from projects.compatible_specialization.config import resolve
from projects.compatible_specialization.data import RandomWindows, domain_of, eval_windows
from projects.compatible_specialization.mixture import routed_model

IDS = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(0))


def _base(n_embd: int = 8, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=30, n_positions=8, n_embd=n_embd, n_layer=3, n_head=2)
    return configure(GPT2LMHeadModel(config), "gelu", untie_head=True).eval()


def _tuned(base: GPT2LMHeadModel, seed: int) -> GPT2LMHeadModel:
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return model


def test_configure_unties_head_and_sets_exact_gelu():
    model = _base()
    assert model.lm_head.weight is not model.transformer.wte.weight
    torch.testing.assert_close(model.lm_head.weight, model.transformer.wte.weight)
    x = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(model.transformer.h[0].mlp.act(x), torch.nn.functional.gelu(x))
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_specialist_round_trip_stores_only_mlps(tmp_path):
    base = _base()
    tuned = _tuned(base, 1)
    path = tmp_path / "s.safetensors"
    save_specialist(path, tuned, {"n_layer": 3, "n_embd": 8})
    assert checkpoint_kind(path) == "specialist"
    loaded = load_specialist(path, base)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, tuned(IDS).logits)
    with pytest.raises(ValueError, match="mismatched base model"):
        load_specialist(path, _base(n_embd=16))


def test_routed_round_trip_and_flag_mismatch(tmp_path):
    base = _base()
    mlps = [specialist_mlps(_tuned(base, s)) for s in (1, 2)]
    model = routed_model(base, mlps, top_k=4, num_multi_layer_experts=2)
    path = tmp_path / "r.safetensors"
    save_routed(path, model, mlps, {"num_multi_layer_experts": 2})
    assert checkpoint_kind(path) == "routed"
    loaded = load_routed(path, base)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    with pytest.raises(ValueError, match="--topk 2 does not match the checkpoint's 4"):
        load_routed(path, base, top_k=2)
    with pytest.raises(ValueError, match="not a specialist checkpoint"):
        load_specialist(path, base)


def test_nan_weights_and_foreign_files_are_refused(tmp_path):
    base = _base()
    state = {k: v.clone() for k, v in base.state_dict().items() if ".mlp." in k}
    state["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path), metadata={"meta": json.dumps({"kind": "specialist"})})
    with pytest.raises(ValueError, match="NaN/inf weights"):
        load_specialist(path, base)
    foreign = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    with pytest.raises(ValueError, match="not a specialist or routed checkpoint"):
        checkpoint_kind(foreign)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        checkpoint_kind(tmp_path / "missing.safetensors")


def test_config_and_dataset_errors_name_the_problem():
    with pytest.raises(ConfigError, match=r"routing\.topk"):
        resolve("micro", None, ["routing.top_k=3"], {})
    cfg = resolve("tiny", None, ["routing.topk=3"], {"finetune.lr": 0.5})
    assert (cfg["routing"]["topk"], cfg["finetune"]["lr"], cfg["scale"]) == (3, 0.5, "tiny")
    with pytest.raises(KeyError, match="tinycodes"):
        domain_of("tinycode")
    assert domain_of("orca-math-problems") == "math" and domain_of("gsm-hard") == "target"


def test_windows():
    stream = torch.arange(50)
    windows = RandomWindows(stream, context=8, n=20, seed=0)
    assert len(windows) == 20 and all(len(w) == 8 and w[-1] - w[0] == 7 for w in windows)
    assert torch.equal(RandomWindows(stream, 8, 20, 0).starts, windows.starts)
    assert eval_windows(stream, 8, None).shape == (6, 8)
    assert eval_windows(stream, 8, 2).tolist()[1] == list(range(8, 16))
    with pytest.raises(ValueError, match="too short"):
        RandomWindows(stream[:5], 8, 1, 0)
