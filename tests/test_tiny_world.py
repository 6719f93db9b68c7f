import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import common.tiny_world as tw
from common.data import assert_disjoint_text, load
from common.io import read_json
from common.models import load_model


@pytest.fixture(scope="module")
def micro_root(tmp_path_factory):
    return tmp_path_factory.mktemp("bases")


@pytest.mark.parametrize("name", list(tw.MICRO_BASES))
def test_micro_base_builds_loads_and_is_cached(name, micro_root, monkeypatch):
    path = tw.tiny_base(name, "micro", root=micro_root)
    info = read_json(path / "pretraining.json")
    assert info["name"] == name and len(info["losses"]) == tw.MICRO_BASES[name].steps
    assert (path / "loss_curve.png").stat().st_size > 0
    model = load_model(path)  # the same loader as a hub model
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == {"gpt_neo": "gpt_neo"}.get(name, name)
    text_model = model.text_model if name == "clip" else model
    assert len(tok) <= text_model.get_input_embeddings().num_embeddings
    # a second call reuses the cache: pretraining must not run again
    monkeypatch.setattr(tw, "_pretrain", lambda *a: pytest.fail("pretrained twice"))
    assert tw.tiny_base(name, "micro", root=micro_root) == path


def test_pretraining_is_deterministic(tmp_path):
    a = tw.tiny_base("gpt2", "micro", root=tmp_path / "a")
    b = tw.tiny_base("gpt2", "micro", root=tmp_path / "b")
    sa, sb = load_model(a).state_dict(), load_model(b).state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert read_json(a / "pretraining.json")["losses"] == read_json(b / "pretraining.json")["losses"]


def test_pretraining_reduces_loss(tmp_path, monkeypatch):
    s = tw.MICRO_BASES["gpt2"]
    monkeypatch.setitem(tw.MICRO_BASES, "gpt2", tw.BaseSpec(**{**s.__dict__, "steps": 40, "lr": 3e-3}))
    info = read_json(tw.tiny_base("gpt2", "micro", root=tmp_path) / "pretraining.json")
    assert info["losses"][-1][1] < info["losses"][0][1] - 0.3


def test_general_text_shares_nothing_with_held_out_splits():
    text = tw.general_text(max_chars=400_000)
    genre = load("shakespeare_genre", seed=tw.PRETRAIN_SPLIT_SEED)[0]
    for split in ("validation", "test"):
        assert_disjoint_text(text, genre[split], column="input")
    tweets = load("tweet_topic")[0]
    for split in ("train", "validation", "test"):
        assert_disjoint_text(text, tweets[split], column="input")


def test_unknown_base_names_close_match():
    with pytest.raises(KeyError, match="Did you mean 'gpt_neo'"):
        tw.spec("gpt-neo", "micro")
    with pytest.raises(KeyError, match="unknown scale"):
        tw.spec("gpt2", "huge")


def test_real_minilm_base_embeds_sensibly(tmp_path):
    path = tw.real_base("all-minilm-l6-v2", root=tmp_path)
    model = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(["food", "bread", "stock market crash"], padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None]
    emb = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3


@pytest.mark.slow
def test_real_smollm2_base_converts_and_reloads(tmp_path):
    path = tw.real_base("smollm2-135m", root=tmp_path)
    model = load_model(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert model.config.model_type == "llama" and loss < 6


def test_resolve_base_maps_each_spec_to_its_folder(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(tw, "tiny_base", lambda name, scale: calls.append((scale, name)) or tmp_path / name)
    monkeypatch.setattr(tw, "real_base", lambda name: calls.append(("real", name)) or tmp_path / name)
    assert tw.resolve_base("tiny:gpt_neo") == str(tmp_path / "gpt_neo")
    assert tw.resolve_base("micro:t5") == str(tmp_path / "t5")
    assert tw.resolve_base("real:smollm2-135m") == str(tmp_path / "smollm2-135m")
    assert calls == [("tiny", "gpt_neo"), ("micro", "t5"), ("real", "smollm2-135m")]
    # hub ids and paths (even with a ':' elsewhere) are left alone
    assert tw.resolve_base("EleutherAI/gpt-neo-125m") == "EleutherAI/gpt-neo-125m"
    assert tw.resolve_base("/models/x:y") == "/models/x:y"
    assert len(calls) == 3
