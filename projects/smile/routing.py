"""Where a SMILE model's routers send each domain's tokens (the routing analysis of SMILE, Tang et al. 2024).

Every `SmileMoELinear` routes each token to its top expert by ‖V_iᵀx‖ (`SmileGate`); `routing_by_domain`
counts, per domain of text, the fraction of (layer, token) decisions that go to each expert, over all
upscaled layers and per projection kind (q_proj, ..., down_proj for Mistral / Llama). A router that knows
its experts sends a domain's tokens to that domain's expert well above 1/E. `routing_by_layer` gives the
same shares per decoder block (its projections pooled), for the per-task, per-depth heat map.

An encoder-decoder (Flan-T5) reads each text with the encoder and takes the first decoding step (the
decoder start token), the step that picks the answer's first word; its shares are also given per stack
(`by_stack`: "encoder"; "cross_kv", the decoder's cross-attention k and v, which route each encoder
state; "decoder", the decoder's other layers at the first step; an upscaled lm_head counts in `all` only).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from projects.smile.upscale import SmileMoELinear


def _smile_layers(model: nn.Module) -> dict[str, SmileMoELinear]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SmileMoELinear)}
    if not layers:
        raise ValueError("routing needs a model with SMILE layers (SmileMoELinear)")
    return layers


@torch.no_grad()
def _read_texts(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    on_layer: Callable[[str, SmileMoELinear, torch.Tensor], None],
) -> Iterator[int]:
    """Feed `texts` to `model` one at a time (no padding tokens), each cut to `max_length` tokens, calling
    `on_layer(name, layer, x)` with every SMILE layer's input x (N, d_in); yields each text's token count once
    its forward is done. An encoder-decoder reads the text with the encoder and takes the first decoding step.
    Raises if the model has no SMILE layer."""
    layers = _smile_layers(model)

    def hook(name: str):
        def fn(layer: SmileMoELinear, args: tuple, _out: Any) -> None:
            on_layer(name, layer, args[0].reshape(-1, layer.in_features))

        return fn

    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            if encoder_decoder:
                start = torch.tensor([[model.config.decoder_start_token_id]])
                model(input_ids=ids, decoder_input_ids=start)
            else:
                model(input_ids=ids)
            yield ids.shape[1]
    finally:
        for h in handles:
            h.remove()


def route_counts(
    model: nn.Module, tokenizer: Any, texts: Mapping[str, Sequence[str]], max_length: int = 256
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int]]:
    """({domain: {SMILE layer name: top-1 choices per expert (float64, (T,))}}, {domain: tokens read}),
    texts one at a time (no padding tokens), each cut to `max_length` tokens; an encoder-decoder reads
    each text with the encoder and takes the first decoding step. Raises if the model has no SMILE layer."""
    layers = _smile_layers(model)
    n_exp = next(iter(layers.values())).num_experts
    by_domain: dict[str, dict[str, torch.Tensor]] = {}
    tokens: dict[str, int] = {}
    for domain, domain_texts in texts.items():
        counts = {n: torch.zeros(n_exp, dtype=torch.float64) for n in layers}

        def count(name: str, layer: SmileMoELinear, x: torch.Tensor, counts=counts) -> None:
            top1 = layer.route(x)[1][:, 0]  # the layer's own choice
            counts[name] += torch.bincount(top1, minlength=n_exp).double()

        tokens[domain] = sum(_read_texts(model, tokenizer, domain_texts, max_length, count))
        by_domain[domain] = counts
    return by_domain, tokens


def smile_votes(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int = 256) -> list[int]:
    """One expert per text: the SMILE routers' probabilities softmax_i ‖V_i[:, :gate_k]ᵀ x‖ averaged over the
    text's tokens in each SMILE layer, then over the layers; the argmax. (A probe of SMILE's zero-shot
    routers, not the paper's method, which routes each token in each layer.)"""
    pooled: list[torch.Tensor] = []

    def pool(_name: str, layer: SmileMoELinear, x: torch.Tensor) -> None:
        pooled.append(torch.softmax(layer.gate(x).float(), dim=-1).mean(0))

    votes = []
    for _ in _read_texts(model, tokenizer, texts, max_length, pool):
        votes.append(int(torch.stack(pooled).mean(0).argmax()))
        pooled.clear()
    return votes


def routing_by_domain(
    model: nn.Module, tokenizer: Any, texts: Mapping[str, Sequence[str]], max_length: int = 256
) -> dict[str, Any]:
    """{domain: {"all": [fraction per expert], "by_kind": {kind: [...]}, "tokens": n}} (`route_counts`)."""
    by_domain, tokens = route_counts(model, tokenizer, texts, max_length)
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    out: dict[str, Any] = {}
    for domain, counts in by_domain.items():
        kinds = sorted({name.rsplit(".", 1)[-1] for name in counts})
        out[domain] = {
            "all": _shares(list(counts.values())),
            "by_kind": {
                k: _shares([c for n, c in counts.items() if n.rsplit(".", 1)[-1] == k]) for k in kinds
            },
            "tokens": tokens[domain],
            "decisions": int(torch.stack(list(counts.values())).sum()),  # tokens x upscaled layers
        }
        if encoder_decoder:
            out[domain]["by_stack"] = {
                s: _shares([c for n, c in counts.items() if _stack(n) == s])
                for s in ("encoder", "cross_kv", "decoder")
            }
    return out


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def routing_by_layer(
    model: nn.Module, tokenizer: Any, texts: Mapping[str, Sequence[str]], max_length: int = 256
) -> dict[str, Any]:
    """{domain: {"by_layer": {layer index: [fraction per expert]}, "all": [...], "tokens": n}}: the top-1
    choices of the SMILE layers of each decoder block (`...layers.<i>....`: its 7 projections pooled), as
    shares that sum to 1 per layer. Raises if no SMILE layer sits in a numbered block."""
    by_domain, tokens = route_counts(model, tokenizer, texts, max_length)
    out: dict[str, Any] = {}
    for domain, counts in by_domain.items():
        per_layer: dict[int, list[torch.Tensor]] = {}
        for name, c in counts.items():
            if m := _LAYER.search(name):
                per_layer.setdefault(int(m.group(1)), []).append(c)
        if not per_layer:
            raise ValueError(f"no SMILE layer inside a numbered block (`layers.<i>.`): {sorted(counts)[:3]}")
        out[domain] = {
            "by_layer": {str(i): _shares(per_layer[i]) for i in sorted(per_layer)},
            "all": _shares(list(counts.values())),
            "tokens": tokens[domain],
        }
    return out


def own_expert_by_layer(routing: Mapping[str, Any], experts: Sequence[str]) -> dict[str, list[float]]:
    """For each domain that is also an expert's name: its own expert's share at each layer, in layer order."""
    experts = list(experts)
    return {
        d: [
            shares[experts.index(d)] for _, shares in sorted(r["by_layer"].items(), key=lambda kv: int(kv[0]))
        ]
        for d, r in routing.items()
        if d in experts
    }


def routing_report(
    model: nn.Module, tokenizer: Any, texts: Mapping[str, Sequence[str]], n: int | None, max_length: int = 256
) -> dict[str, Any] | None:
    """The task pools' `routing: N` option: `routing_by_domain` over the first `n` texts of each domain,
    or None when `n` is unset or the model has no SMILE layer (the base model, a single expert)."""
    if not n or not any(isinstance(m, SmileMoELinear) for m in model.modules()):
        return None
    return routing_by_domain(model, tokenizer, {d: list(t[:n]) for d, t in texts.items()}, max_length)


def _stack(name: str) -> str | None:
    if name.startswith("encoder."):
        return "encoder"
    if name.startswith("decoder."):
        return (
            "cross_kv" if "EncDecAttention" in name and name.rsplit(".", 1)[-1] in ("k", "v") else "decoder"
        )
    return None


def _shares(counts: Sequence[torch.Tensor]) -> list[float]:
    total = torch.stack(list(counts)).sum(0)
    return (total / total.sum()).tolist()


def own_expert_share(routing: Mapping[str, Any], experts: Sequence[str]) -> dict[str, float]:
    """For each domain that is also an expert's name, the fraction of its tokens routed to that expert."""
    return {d: r["all"][list(experts).index(d)] for d, r in routing.items() if d in experts}
