"""The post-hoc baselines' routing keys: Average Activation and Retrieval (§4.2).

Average Activation: with expert e alone loaded, each module's key is the mean, over training examples of
dataset e, of the example's module input reduced over positions; routing then is PHATGOOSE's top-2
(`SaveAveragedHiddens`, `insert_averaged_hiddens.py`). Encoder modules and cross-attention k/v: the
masked mean over real encoder tokens. Decoder modules, as the original (`decoder_keys="last_generation_step"`):
the keys are computed with greedy generation and each call overwrites the stored input, so the key is the
module input at the batch's last generation step; `decoder_keys="teacher_forced"` averages the
teacher-forced target positions instead (the paper's description, our earlier default).
Retrieval: all-MiniLM-L6-v2 embeddings of training examples "Answer Choices: {choices}, Instance: {input}";
a query goes, whole, to the expert holding its most cosine-similar example (`retriever.py`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from common.cache import cached_dir
from common.evaluation import eval_mode
from common.io import load_tensors, save_tensors
from common.tiny_world import real_base
from projects.phatgoose.experts import seq2seq_collate
from projects.phatgoose.moe import captured_inputs, moe_modules, set_mode

REDUCTIONS = ("masked_mean", "mean")
DECODER_KEYS = ("last_generation_step", "teacher_forced")


def average_hiddens(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[dict],
    expert: int,
    *,
    encoder_reduction: str = "masked_mean",
    decoder_reduction: str = "mean",
    batch_size: int = 16,
    max_length: int = 512,
    decoder_keys: str = "last_generation_step",
    max_new_tokens: int = 8,
) -> dict[str, torch.Tensor]:
    """Module -> mean over `rows` of each example's reduced module input, with only `expert` active;
    decoder inputs from the last step of greedy generation of at most `max_new_tokens` (the original)."""
    for r in (encoder_reduction, decoder_reduction):
        if r not in REDUCTIONS:
            raise ValueError(f"unknown ExposeHidden.reduction_method {r!r}; choose one of {REDUCTIONS}")
    if decoder_keys not in DECODER_KEYS:
        raise ValueError(
            f"unknown average_hiddens decoder_keys {decoder_keys!r}; choose one of {DECODER_KEYS}"
        )
    generated = decoder_keys == "last_generation_step"
    modules = moe_modules(model)
    set_mode(model, "fixed", expert)
    collate = seq2seq_collate(tokenizer, max_length)
    sums = {n: torch.zeros(m.A.shape[-1]) for n, m in modules.items()}
    count = 0
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size])
            with captured_inputs(modules) as inputs:
                if generated:
                    model.generate(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        num_beams=1,
                    )
                else:
                    model(**batch)
            enc_mask = batch["attention_mask"].float()  # (B, T_enc)
            dec_mask = (batch["labels"] != -100).float()  # (B, T_dec)
            for name in modules:
                # Encoder modules and cross-attention k/v read encoder positions, the rest decoder positions.
                # Under generation a decoder module is called once per step: the last call stays, (B, 1, d),
                # as the original's overwritten key (sequences already at EOS see padding there).
                u = inputs[name][-1]  # (B, T, d)
                if _reads_encoder(name):
                    mask = enc_mask
                else:
                    mask = torch.ones(u.shape[:2]) if generated else dec_mask
                reduction = encoder_reduction if name.startswith("encoder.") else decoder_reduction
                if reduction == "mean":
                    mask = torch.ones_like(mask)
                per_example = (u * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
                sums[name] += per_example.sum(0)
            count += batch["input_ids"].shape[0]
    set_mode(model, "route")
    return {n: s / count for n, s in sums.items()}


def _reads_encoder(name: str) -> bool:
    return name.startswith("encoder.") or (
        "EncDecAttention" in name and name.rsplit(".", 1)[-1] in ("k", "v")
    )


def retrieval_text(row: dict, include_answer_choices: bool = True) -> str:
    """The text embedded for retrieval (the original's `include_answer_choices=True` format)."""
    if include_answer_choices:
        return f"Answer Choices: {', '.join(row['choices'])}, Instance: {row['source']}"
    return row["source"]


class Retriever:
    """all-MiniLM-L6-v2 (mean pooling, L2-normalised) over stored example embeddings per expert."""

    def __init__(
        self,
        model_path: str | None = None,
        max_length: int = 256,
        batch_size: int = 64,
        cache: bool = True,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = model_path or str(real_base("all-minilm-l6-v2"))
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).eval()
        self.max_length, self.batch_size, self.cache = max_length, batch_size, cache
        self.library: list[torch.Tensor] = []  # per expert (n_e, 384)
        self.names: list[str] = []

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, 384) sentence embeddings: masked mean of the last hidden states, then unit norm.

        With `cache`, kept under `$MOERGING_CACHE/retriever_embeddings/` by (model files, max_length,
        batch_size, texts): the stored examples and the queries do not depend on a run's seed, so the
        tiny table's second and third seeds reuse the first's (MiniLM is most of the library's cost).
        """
        if not self.cache:
            return self._embed(texts)
        key = {
            "model": _fingerprint(self.path),
            "max_length": self.max_length,
            "batch_size": self.batch_size,
            "n": len(texts),
            "texts": hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest(),
        }
        path = cached_dir(
            "retriever_embeddings",
            key,
            lambda tmp: save_tensors(tmp / "embeddings.safetensors", {"embeddings": self._embed(texts)}),
        )
        return load_tensors(path / "embeddings.safetensors")["embeddings"]

    @torch.no_grad()
    def _embed(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for start in tqdm(range(0, len(texts), self.batch_size), desc="embed", mininterval=5):
            enc = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            h = self.model(**enc).last_hidden_state  # (B, T, 384)
            m = enc["attention_mask"][..., None].float()
            out.append(F.normalize((h * m).sum(1) / m.sum(1), dim=-1))
        return torch.cat(out)

    def add_expert(self, name: str, texts: Sequence[str]) -> None:
        self.names.append(name)
        self.library.append(self.embed(texts))

    def retrieve(self, texts: Sequence[str]) -> torch.Tensor:
        """(N,) expert index per query: argmax_e max_j cos(q, x_ej)."""
        if not self.library:
            raise ValueError("the retriever's expert library is empty (run -make_expert_library first)")
        q = self.embed(texts)  # (N, 384)
        best = torch.stack([(q @ lib.T).max(dim=1).values for lib in self.library], dim=1)  # (N, E)
        return best.argmax(dim=1)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"library.{i:03d}": lib for i, lib in enumerate(self.library)}

    def load_state(self, names: Sequence[str], state: dict[str, torch.Tensor]) -> None:
        self.names = list(names)
        self.library = [state[f"library.{i:03d}"] for i in range(len(names))]


def _fingerprint(path: str) -> Any:
    """A model folder's files by (name, size, mtime), so a model saved again at the same path is not
    taken for the old one; a hub id stands for itself."""
    folder = Path(path)
    if not folder.is_dir():
        return path
    return [
        path,
        sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file()),
    ]
