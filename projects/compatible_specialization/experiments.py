"""The paper's experiments as functions of a resolved config: fine-tuning, test losses, activation
interpolation, MoE / multi-layer routing and CKA. `main.py`, `analyze.py` and `pipeline.py` call these."""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from common.rundir import training_lock
from projects.compatible_specialization.checkpoints import load_specialist, save_routed, specialist_mlps
from projects.compatible_specialization.cka import block_features, linear_cka
from projects.compatible_specialization.data import domain_texts, eval_windows, token_stream
from projects.compatible_specialization.finetune import finetune_mlps, test_loss, train_routers
from projects.compatible_specialization.mixture import (
    decoder_blocks,
    interpolated_model,
    routed_model,
    set_alpha,
)


class Corpus:
    """The domains' token streams and held-out windows for one config and tokenizer, built once each."""

    def __init__(self, cfg: Mapping[str, Any], tokenizer: Any) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self._texts: dict[str, tuple[dict[str, list[str]], dict]] = {}
        self._streams: dict[tuple[str, str], torch.Tensor] = {}

    def texts(self, domain: str) -> tuple[dict[str, list[str]], dict]:
        if domain not in self._texts:
            self._texts[domain] = domain_texts(self.cfg["data"], domain)
        return self._texts[domain]

    def record(self, domain: str) -> dict:
        """The split record of a domain's dataset (for results.json)."""
        return self.texts(domain)[1]

    def stream(self, domain: str, split: str) -> torch.Tensor:
        if (domain, split) not in self._streams:
            texts = self.texts(domain)[0]
            if split not in texts:
                raise ValueError(f"the {domain} data has no {split!r} split (it has {sorted(texts)})")
            data = self.cfg["data"]
            cap = (
                data["max_train_tokens"]
                if split == "train"
                else data["max_eval_windows"] * self.cfg["context"]
            )
            self._streams[domain, split] = token_stream(texts[split], self.tokenizer, cap, data["split_seed"])
        return self._streams[domain, split]

    def windows(self, domain: str, split: str) -> torch.Tensor:
        """Held-out windows (N, context)."""
        return eval_windows(
            self.stream(domain, split), self.cfg["context"], self.cfg["data"]["max_eval_windows"]
        )


def check_context(cfg: Mapping[str, Any], model: nn.Module) -> None:
    """Fail early when the windows are longer than the model's positions (e.g. --context 1024 on the tiny base)."""
    positions = model.config.max_position_embeddings  # GPT-2's n_positions through its attribute map
    if cfg["context"] > positions:
        raise ValueError(
            f"--context {cfg['context']} exceeds the model's {positions} positions "
            f"(the {cfg['scale']} config uses --context {min(cfg['context'], positions)} or less)"
        )


def evaluate(
    cfg: Mapping[str, Any], model: nn.Module, windows: torch.Tensor, dtype: str | None = None
) -> float:
    """Test loss with the config's batch size and evaluation dtype."""
    return test_loss(model, windows, cfg["eval_batch_size"], dtype or cfg["eval_dtype"])


def snapshot_steps(ft: Mapping[str, Any]) -> list[int]:
    """The early and later checkpoints plus one every `snapshot_every` steps (for CKA)."""
    steps = ft["train_tokens"] // ft["batch_size"]
    every = ft["snapshot_every"] or steps
    return sorted({ft["early_step"], ft["later_step"], *range(every, steps + 1, every)})


def finetune_specialist(
    cfg: Mapping[str, Any],
    base: nn.Module,
    corpus: Corpus,
    domain: str,
    run_dir: str | os.PathLike,
    seed: int,
) -> tuple[nn.Module, dict[int, Path]]:
    """A copy of `base` with its MLPs fine-tuned on a domain's train split, and its snapshots by step."""
    model = copy.deepcopy(base)
    meta = {"domain": domain, "dataset": cfg["data"][domain], "seed": seed}
    # What the weights are trained for (the optimiser settings are checked by `train` itself): a run folder
    # holding another domain's or base's specialist is refused, never resumed or reused.
    data = {k: cfg["data"][k] for k in ("split_seed", "build_kwargs", "max_train_tokens") if k in cfg["data"]}
    run_key = {**meta, "data": data, **{k: cfg[k] for k in ("scale", "arch", "context", "model")}}
    with training_lock(run_dir):  # another process fine-tuning this specialist is waited for
        paths = finetune_mlps(
            model, corpus.stream(domain, "train"), cfg["finetune"], cfg["context"], run_dir, seed,
            snapshot_steps(cfg["finetune"]), meta, cfg["device"], run_key=run_key,
        )  # fmt: skip
    return model, paths


def interpolation_sweep(
    cfg: Mapping[str, Any],
    base: nn.Module,
    model_a: nn.Module,
    model_b: nn.Module,
    windows: Mapping[str, torch.Tensor],
) -> dict[str, dict[float, float]]:
    """{split: {α: loss}} of α·MLP_a + (1−α)·MLP_b at every layer (a = code, b = math in the paper)."""
    model = interpolated_model(base, specialist_mlps(model_a), specialist_mlps(model_b))
    curves: dict[str, dict[float, float]] = {split: {} for split in windows}
    for alpha in tqdm(cfg["interpolation"]["alphas"], desc="alpha", leave=False):
        set_alpha(model, alpha)
        for split, w in windows.items():
            curves[split][alpha] = evaluate(cfg, model, w)
    return curves


def best_alpha(curves: Mapping[str, Mapping[float, float]], select: str, test: str) -> dict[str, float]:
    """α chosen on the selection split, and the test loss there (plus the test curve's own minimum)."""
    alpha = min(curves[select], key=curves[select].get)
    return {"alpha": alpha, "test_loss": curves[test][alpha], "test_min": min(curves[test].values())}


def weights_digest(model_mlps: Sequence[Sequence[nn.Module]]) -> str:
    """A hash of every expert's weights (bytes): a router run folder is resumed only over the same experts."""
    h = hashlib.sha256()
    for mlps in model_mlps:
        for mlp in mlps:
            for name, t in sorted(mlp.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def train_routed(
    cfg: Mapping[str, Any],
    base: nn.Module,
    specialists: Sequence[nn.Module],
    corpus: Corpus,
    run_dir: str | os.PathLike,
    seed: int,
    num_multi_layer_experts: int = 1,
    top_k: int | None = None,
) -> tuple[nn.Module, Path]:
    """Routers trained on the target's train split over the specialists' MLPs; the model and its checkpoint.

    As the original, the routed model (routers and experts) is cast to `routing.dtype` (bf16) and trained so,
    and the routers of the best selection-split loss are kept (`routing.keep: best`, every `eval_every`
    steps); `dtype: float32` with `keep: last` is our former behaviour."""
    routing = cfg["routing"]
    dtype = getattr(torch, routing["dtype"])
    # Copies when the dtype changes: casting the routed model must not cast the specialists themselves.
    model_mlps = [
        [copy.deepcopy(mlp) if next(mlp.parameters()).dtype != dtype else mlp for mlp in specialist_mlps(m)]
        for m in specialists
    ]
    torch.manual_seed(seed)  # the routers' kaiming init
    model = routed_model(
        base,
        model_mlps,
        top_k=top_k or routing["topk"],
        num_multi_layer_experts=num_multi_layer_experts,
        renormalize=routing["renormalize"],
    ).to(dtype)
    select = None
    if routing["keep"] == "best":  # the original's eval_iter: (log_freq // 10) micro-batches per grad_accum
        n = max(1, routing["eval_every"] // 10) * routing["batch_size"]
        select = corpus.windows("target", cfg["data"]["select_split"])[:n]
    run_key = {
        "experts": weights_digest(model_mlps),
        "num_multi_layer_experts": num_multi_layer_experts,
        "top_k": top_k or routing["topk"],
        "renormalize": routing["renormalize"],
        "dtype": routing["dtype"],
        "keep": routing["keep"],
        "target": cfg["data"]["target"],
        **{k: cfg[k] for k in ("scale", "context", "model")},
    }
    with training_lock(run_dir):  # another process training these routers is waited for
        trained = train_routers(
            model, corpus.stream("target", "train"), routing, cfg["context"], run_dir, seed, cfg["device"],
            select_windows=select, eval_batch_size=cfg["eval_batch_size"], run_key=run_key,
        )  # fmt: skip
        path = Path(run_dir) / "routed.safetensors"
        meta = {
            "num_multi_layer_experts": num_multi_layer_experts,
            "seed": seed,
            "dataset": cfg["data"]["target"],
            "keep": routing["keep"],
            "best_step": trained["best_step"],
            "selection": trained["evals"],
        }
        save_routed(path, model, model_mlps, meta)
    return model.eval(), path


def cka_curve(
    cfg: Mapping[str, Any],
    base: nn.Module,
    snaps_a: Mapping[int, Path],
    snaps_b: Mapping[int, Path],
    windows: torch.Tensor,
) -> dict[int, float]:
    """{step: CKA of block `cka.layer`'s sequence-mean outputs} between the two models at each shared step."""
    layer, n = cfg["cka"]["layer"], cfg["cka"]["windows"]
    depth = len(decoder_blocks(base))
    if not 0 <= layer < depth:
        raise ValueError(f"cka.layer {layer} is outside the model's 0..{depth - 1}")
    out = {}
    for step in tqdm(sorted(set(snaps_a) & set(snaps_b)), desc="cka", leave=False):
        feats = [
            block_features(load_specialist(p[step], base), windows[:n], layer) for p in (snaps_a, snaps_b)
        ]
        out[step] = linear_cka(*feats)
    return out
