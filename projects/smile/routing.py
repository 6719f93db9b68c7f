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

A CLIP vision tower (`image_routing`) reads each domain's images in batches; every patch token and the class
token of every image counts, per encoder layer (`by_layer`) and overall. Texts and images share one hook loop
(`_read_inputs`), fed by `_text_inputs` or `_image_inputs`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from projects.smile.upscale import SmileMoELinear


def has_smile_layers(model: nn.Module) -> bool:
    """Whether `model` holds a SMILE layer (not the base model, nor a single expert)."""
    return any(isinstance(m, SmileMoELinear) for m in model.modules())


def _smile_layers(model: nn.Module) -> dict[str, SmileMoELinear]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SmileMoELinear)}
    if not layers:
        raise ValueError("routing needs a model with SMILE layers (SmileMoELinear)")
    return layers


Inputs = Iterable[tuple[dict[str, Any], int]]  # (the model's keyword arguments, tokens they hold)
OnLayer = Callable[[str, SmileMoELinear, torch.Tensor], None]


@torch.no_grad()
def _read_inputs(model: nn.Module, inputs: Inputs, on_layer: OnLayer) -> Iterator[int]:
    """Run `model(**kwargs)` for each (kwargs, tokens) of `inputs`, calling `on_layer(name, layer, x)` with
    every SMILE layer's input x (N, d_in); yields `tokens` once that forward is done. The one hook loop of
    every feeder (`_text_inputs`, `_image_inputs`). Raises if the model has no SMILE layer."""
    layers = _smile_layers(model)

    def hook(name: str) -> Callable[[SmileMoELinear, tuple, Any], None]:
        def fn(layer: SmileMoELinear, args: tuple, _out: Any) -> None:
            on_layer(name, layer, args[0].reshape(-1, layer.in_features))

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        for kwargs, tokens in inputs:
            model(**kwargs)
            yield tokens
    finally:
        for h in handles:
            h.remove()


def _text_inputs(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int) -> Inputs:
    """Each text alone (no padding tokens), cut to `max_length` tokens; an encoder-decoder reads it with the
    encoder and takes the first decoding step (the decoder start token). Tokens: the text's."""
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
        kwargs: dict[str, Any] = {"input_ids": ids}
        if encoder_decoder:
            kwargs["decoder_input_ids"] = torch.tensor([[model.config.decoder_start_token_id]])
        yield kwargs, ids.shape[1]


def _image_inputs(model: nn.Module, pixels: torch.Tensor, batch_size: int) -> Inputs:
    """A CLIP vision tower's input, `batch_size` images at a time, on the model's device and dtype. Tokens:
    per image, its (H / patch)·(W / patch) patches and the class token."""
    config = model.config
    per_image = (pixels.shape[-2] // config.patch_size) * (pixels.shape[-1] // config.patch_size) + 1
    param = next(model.parameters())
    for i in range(0, len(pixels), batch_size):
        batch = pixels[i : i + batch_size].to(param.device, param.dtype)
        yield {"pixel_values": batch}, batch.shape[0] * per_image


def _count_routes(
    model: nn.Module, inputs: Mapping[str, Inputs]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int]]:
    """({domain: {SMILE layer name: top-1 choices per expert (float64, (T,))}}, {domain: tokens read})."""
    layers = _smile_layers(model)
    n_exp = next(iter(layers.values())).num_experts
    by_domain: dict[str, dict[str, torch.Tensor]] = {}
    tokens: dict[str, int] = {}
    for domain, domain_inputs in inputs.items():
        counts = {n: torch.zeros(n_exp, dtype=torch.float64) for n in layers}

        def count(name: str, layer: SmileMoELinear, x: torch.Tensor, counts=counts) -> None:
            top1 = layer.route(x)[1][:, 0]  # the layer's own choice
            counts[name] += torch.bincount(top1, minlength=n_exp).double().cpu()

        tokens[domain] = sum(_read_inputs(model, domain_inputs, count))
        by_domain[domain] = counts
    return by_domain, tokens


def route_counts(
    model: nn.Module, tokenizer: Any, texts: Mapping[str, Sequence[str]], max_length: int = 256
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int]]:
    """({domain: {SMILE layer name: top-1 choices per expert (float64, (T,))}}, {domain: tokens read}),
    texts one at a time (no padding tokens), each cut to `max_length` tokens; an encoder-decoder reads
    each text with the encoder and takes the first decoding step. Raises if the model has no SMILE layer."""
    return _count_routes(model, {d: _text_inputs(model, tokenizer, t, max_length) for d, t in texts.items()})


def route_counts_images(
    model: nn.Module, images: Mapping[str, torch.Tensor], batch_size: int = 256
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int]]:
    """`route_counts` for a CLIP vision tower: {domain: pixel_values (N, 3, H, W)}; every token of every
    image (the patches and the class token) is counted. Raises if the model has no SMILE layer."""
    return _count_routes(model, {d: _image_inputs(model, px, batch_size) for d, px in images.items()})


def smile_votes(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int = 256) -> list[int]:
    """One expert per text: the SMILE routers' probabilities softmax_i ‖V_i[:, :gate_k]ᵀ x‖ averaged over the
    text's tokens in each SMILE layer, then over the layers; the argmax. (A probe of SMILE's zero-shot
    routers, not the paper's method, which routes each token in each layer.)"""
    pooled: list[torch.Tensor] = []

    def pool(_name: str, layer: SmileMoELinear, x: torch.Tensor) -> None:
        pooled.append(torch.softmax(layer.gate(x).float(), dim=-1).mean(0))

    votes = []
    for _ in _read_inputs(model, _text_inputs(model, tokenizer, texts, max_length), pool):
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
        out[domain] = _domain_shares(counts, tokens[domain])
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
    return {
        domain: {
            "by_layer": _by_layer(counts),
            "all": _shares(list(counts.values())),
            "tokens": tokens[domain],
        }
        for domain, counts in by_domain.items()
    }


def image_routing(
    model: nn.Module, images: Mapping[str, torch.Tensor], batch_size: int = 256
) -> dict[str, Any]:
    """Where a SMILE CLIP vision tower routes each domain's image tokens (`route_counts_images`: every patch
    token and the class token): {domain: {"all": [fraction per expert], "by_layer": {encoder layer: [...]}
    (`...layers.<i>....`: its q, k, v, out_proj, fc1, fc2 pooled), "by_kind": {kind: [...]}, "tokens": n,
    "decisions": tokens x SMILE layers}}, each share list summing to 1; `own_expert_share` and
    `own_expert_by_layer` read it as they read `routing_by_layer`'s."""
    by_domain, tokens = route_counts_images(model, images, batch_size)
    return {
        domain: _domain_shares(counts, tokens[domain]) | {"by_layer": _by_layer(counts)}
        for domain, counts in by_domain.items()
    }


def _domain_shares(counts: Mapping[str, torch.Tensor], tokens: int) -> dict[str, Any]:
    """One domain's {"all": shares over every SMILE layer, "by_kind": `_by_kind`, "tokens": tokens read,
    "decisions": tokens x SMILE layers} from its `_count_routes` counts."""
    return {
        "all": _shares(list(counts.values())),
        "by_kind": _by_kind(counts),
        "tokens": tokens,
        "decisions": int(torch.stack(list(counts.values())).sum()),
    }


def _by_kind(counts: Mapping[str, torch.Tensor]) -> dict[str, list[float]]:
    """Shares per kind of SMILE layer (the last part of its name: q_proj, fc1, ...), its layers pooled."""
    kinds = sorted({name.rsplit(".", 1)[-1] for name in counts})
    return {k: _shares([c for n, c in counts.items() if n.rsplit(".", 1)[-1] == k]) for k in kinds}


def _by_layer(counts: Mapping[str, torch.Tensor]) -> dict[str, list[float]]:
    """Shares per numbered block (`layers.<i>.`), its SMILE layers pooled, in block order. Raises if no SMILE
    layer sits in a numbered block; layers outside one count only in the overall shares."""
    per_layer: dict[int, list[torch.Tensor]] = {}
    for name, c in counts.items():
        if m := _LAYER.search(name):
            per_layer.setdefault(int(m.group(1)), []).append(c)
    if not per_layer:
        raise ValueError(f"no SMILE layer inside a numbered block (`layers.<i>.`): {sorted(counts)[:3]}")
    return {str(i): _shares(per_layer[i]) for i in sorted(per_layer)}


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
    if not n or not has_smile_layers(model):
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
