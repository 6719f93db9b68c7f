"""Where a SMILE model's routers send each domain's tokens (the routing analysis of SMILE, Tang et al. 2024).

Every `SmileMoELinear` routes each token to its top expert by ‖V_iᵀx‖ (`SmileGate`); `routing_by_domain`
counts, per domain of text, the fraction of (layer, token) decisions that go to each expert, over all
upscaled layers and per projection kind (q_proj, ..., down_proj for Mistral / Llama). A router that knows
its experts sends a domain's tokens to that domain's expert well above 1/E.

An encoder-decoder (Flan-T5) reads each text with the encoder and takes the first decoding step (the
decoder start token), the step that picks the answer's first word; its shares are also given per stack
(`by_stack`: "encoder"; "cross_kv", the decoder's cross-attention k and v, which route each encoder
state; "decoder", the decoder's other layers at the first step; an upscaled lm_head counts in `all` only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from projects.smile.upscale import SmileMoELinear


@torch.no_grad()
def routing_by_domain(
    model: nn.Module, tokenizer: Any, texts: Mapping[str, Sequence[str]], max_length: int = 256
) -> dict[str, Any]:
    """{domain: {"all": [fraction per expert], "by_kind": {kind: [...]}, "tokens": n}}, texts one at a time
    (no padding tokens), each cut to `max_length` tokens. Raises if the model has no SMILE layer."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SmileMoELinear)}
    if not layers:
        raise ValueError("routing_by_domain needs a model with SMILE layers (SmileMoELinear)")
    n_exp = next(iter(layers.values())).num_experts
    kinds = sorted({name.rsplit(".", 1)[-1] for name in layers})
    counts: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(layer: SmileMoELinear, args: tuple, _out: Any) -> None:
            top1 = layer.route(args[0].reshape(-1, layer.in_features))[1][:, 0]  # the layer's own choice
            counts[name] += torch.bincount(top1, minlength=n_exp).double()

        return fn

    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    out: dict[str, Any] = {}
    try:
        for domain, domain_texts in texts.items():
            counts.update({n: torch.zeros(n_exp, dtype=torch.float64) for n in layers})
            n_tokens = 0
            for text in domain_texts:
                ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)[
                    "input_ids"
                ]
                if encoder_decoder:
                    start = torch.tensor([[model.config.decoder_start_token_id]])
                    model(input_ids=ids, decoder_input_ids=start)
                else:
                    model(input_ids=ids)
                n_tokens += ids.shape[1]
            out[domain] = {
                "all": _shares(list(counts.values())),
                "by_kind": {
                    k: _shares([c for n, c in counts.items() if n.rsplit(".", 1)[-1] == k]) for k in kinds
                },
                "tokens": n_tokens,
                "decisions": int(torch.stack(list(counts.values())).sum()),  # tokens x upscaled layers
            }
            if encoder_decoder:
                out[domain]["by_stack"] = {
                    s: _shares([c for n, c in counts.items() if _stack(n) == s])
                    for s in ("encoder", "cross_kv", "decoder")
                }
    finally:
        for h in handles:
            h.remove()
    return out


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
