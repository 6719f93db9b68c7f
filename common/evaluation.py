"""Evaluation loops shared by the projects: language-model loss, continuation log-likelihoods, rank
classification, greedy generation, ROUGE-L / exact match, and classifier accuracy.

The model loops work for decoder-only (`AutoModelForCausalLM`) and encoder-decoder
(`T5ForConditionalGeneration`) transformers models, bare or wrapped by peft. They run under
`torch.no_grad()` in eval mode and restore each module's training flag afterwards.
Every score here is a fraction in [0, 1], never a percentage.

A (context, continuation) pair is tokenized as lm-eval 0.4 does (`encode_pair`), so
`rank_classification(length_normalize=False)` predicts what lm-eval's `acc` scores on the same prompts.
"""

from __future__ import annotations

import contextlib
import math
import re
import string
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from rouge_score import rouge_scorer
from torch import nn
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from common.shared_prefix import shared_prefix_logprobs, supports_shared_prefix

IGNORE_INDEX = -100  # label value that no loss counts (the transformers convention)


class ContinuationScore(NamedTuple):
    """Log-likelihood of one continuation given its context."""

    logprob: float  # Σ_t log p(y_t | context, y_<t)
    n_tokens: int  # number of continuation tokens scored
    is_greedy: bool  # every continuation token is the model's argmax


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` in eval mode under `torch.no_grad()`; give every submodule back its training flag on exit."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in flags.items():
            module.training = training


def lm_loss(
    model: nn.Module,
    batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    *,
    disable: bool = False,
) -> dict[str, float]:
    """Token-weighted mean NLL over all predicted tokens, loss = −Σ_t log p(y_t | y_<t) / #tokens, and e^loss.

    A batch is a LongTensor of token ids (B, T) or a dict with `input_ids`, optional `attention_mask` and
    `labels` (aligned with `input_ids` for decoder-only models, the decoder targets for encoder-decoder
    ones, where they are required). Labels equal to -100 and padding (left or right) are not counted.
    """
    encoder_decoder = _is_encoder_decoder(model)
    device = _device(model)
    total_nll = 0.0  # a Python float (float64), whatever the model's device and dtype
    total_tokens = 0
    with eval_mode(model):
        for batch in tqdm(batches, desc="lm loss", disable=disable):
            batch = {"input_ids": batch} if isinstance(batch, torch.Tensor) else dict(batch)
            batch = send_to_device({k: v if v.dim() > 1 else v[None] for k, v in batch.items()}, device)
            input_ids = batch["input_ids"]
            mask = batch.get("attention_mask", torch.ones_like(input_ids))
            if encoder_decoder:
                if "labels" not in batch:
                    raise ValueError("an encoder-decoder batch needs 'labels' (the decoder targets)")
                targets = batch["labels"]
                # (B, T_dec, V): the model shifts the labels right to make the decoder inputs
                logits = model(input_ids=input_ids, attention_mask=mask, labels=targets).logits
            else:
                labels = batch.get("labels", input_ids.masked_fill(mask == 0, IGNORE_INDEX))
                logits = _causal_forward(model, input_ids, mask)[:, :-1]  # (B, T-1, V)
                # Position t predicts token t+1; a prediction made from a left-pad position does not count.
                targets = labels[:, 1:].masked_fill(mask[:, :-1] == 0, IGNORE_INDEX)
            total_nll += float(
                F.cross_entropy(
                    _upcast(logits).flatten(0, 1),
                    targets.flatten(),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
            )
            total_tokens += int((targets != IGNORE_INDEX).sum())
    if total_tokens == 0:
        raise ValueError("lm_loss: no token to predict (every label is -100 or padding)")
    loss = total_nll / total_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": total_tokens}


def encode_pair(
    tokenizer: Any, context: str, continuation: str, *, encoder_decoder: bool
) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), split as lm-eval 0.4's `_encode_pair` does.

    Trailing whitespace of the context moves to the continuation, so " Paris" stays one BPE token.
    Decoder-only: encode context + continuation whole and split after the context's own tokens, so the
    continuation ids are those the model sees in the joined text. Encoder-decoder: the context is the
    encoder input and the continuation, encoded alone without special tokens, the decoder target.
    An empty context becomes the BOS (else EOS) token, as the first token needs something to condition on.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise ValueError("an empty context needs a tokenizer with a BOS or EOS token to condition on")
        context_ids, continuation_ids = [prefix], tokenizer.encode(continuation, add_special_tokens=False)
    elif encoder_decoder:
        context_ids = tokenizer.encode(context)
        continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
    else:
        context_ids = tokenizer.encode(context)
        continuation_ids = tokenizer.encode(context + continuation)[len(context_ids) :]
    if not continuation_ids:
        raise ValueError(f"continuation {continuation!r} (after context {context!r}) encodes to no token")
    return context_ids, continuation_ids


def sequence_logprobs(
    model: nn.Module,
    tokenizer: Any,
    contexts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 8,
    append_eos: bool = False,
    max_length: int | None = None,
    disable: bool = False,
) -> list[ContinuationScore]:
    """Σ_t log p(continuation_t | context, continuation_<t) for each pair, with its token count and greediness.

    `append_eos` also scores the EOS token after the continuation (T-Few-style rank classification of T5).
    Inputs longer than `max_length` (default: the model's position limit; for relative-position models
    such as T5, the tokenizer's `model_max_length`) lose tokens on the left, as in lm-eval, with a warning:
    an unbounded T5 input would otherwise fail in the allocator.
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    encoder_decoder = _is_encoder_decoder(model)
    pairs = [
        encode_pair(tokenizer, c, y, encoder_decoder=encoder_decoder) for c, y in zip(contexts, continuations)
    ]
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("append_eos=True needs a tokenizer with an EOS token")
        pairs = [(c, [*y, tokenizer.eos_token_id]) for c, y in pairs]
    limit = max_length or _max_positions(model) or _tokenizer_limit(tokenizer)
    cut = sum(len(c) + (len(y) if not encoder_decoder else 0) > (limit or math.inf) for c, y in pairs)
    if cut:
        warnings.warn(
            f"{cut} of {len(pairs)} inputs are longer than {limit} tokens; their contexts lose tokens on the left",
            stacklevel=2,
        )
    if limit is not None and (longest := max((len(y) for _, y in pairs), default=0)) > limit:
        raise ValueError(f"a continuation has {longest} tokens, more than the model's limit of {limit}")
    if supports_shared_prefix(model):  # decoder-only: each distinct context forwarded once
        with eval_mode(model):
            scores = shared_prefix_logprobs(model, pairs, limit, batch_size=batch_size, disable=disable)
        return [ContinuationScore(*s) for s in scores]
    return _pairwise_logprobs(model, pairs, limit, batch_size=batch_size, disable=disable)


def _pairwise_logprobs(
    model: nn.Module,
    pairs: Sequence[tuple[list[int], list[int]]],
    limit: int | None,
    *,
    batch_size: int,
    disable: bool = True,
) -> list[ContinuationScore]:
    # One row per pair, logits at every position: the encoder-decoder path, and the reference that
    # `shared_prefix_logprobs` is tested against (tests/test_evaluation.py).
    score_batch = _score_encoder_decoder if _is_encoder_decoder(model) else _score_causal
    # Longest first, so that each batch pads little; the scores are put back in input order.
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    scores: dict[int, ContinuationScore] = {}
    with eval_mode(model):
        for start in tqdm(range(0, len(order), batch_size), desc="log-likelihoods", disable=disable):
            chunk = order[start : start + batch_size]
            scores.update(zip(chunk, score_batch(model, [pairs[i] for i in chunk], limit)))
    return [scores[i] for i in range(len(pairs))]


def rank_classification(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    choices_per_prompt: Sequence[Sequence[str]],
    labels: Sequence[int],
    *,
    length_normalize: bool,
    batch_size: int = 8,
    append_eos: bool = False,
    disable: bool = False,
) -> dict[str, Any]:
    """Predict argmax_c log p(c | prompt), divided by the number of tokens of c when `length_normalize`.

    PHATGOOSE normalises by length, MaTS sums. A choice is scored as written: include the delimiter
    (lm-eval prepends " " to each choice). Ties go to the first choice, as with `np.argmax`.
    Returns accuracy (fraction), predictions (choice indices) and scores (one list per prompt).
    """
    if not len(prompts) == len(choices_per_prompt) == len(labels):
        raise ValueError(
            f"{len(prompts)} prompts, {len(choices_per_prompt)} choice lists and {len(labels)} labels: "
            "they must be as many"
        )
    if not prompts:
        raise ValueError("rank_classification: no prompt")
    if any(len(choices) == 0 for choices in choices_per_prompt):
        raise ValueError("every prompt needs at least one choice")
    flat = sequence_logprobs(
        model,
        tokenizer,
        [prompt for prompt, choices in zip(prompts, choices_per_prompt) for _ in choices],
        [choice for choices in choices_per_prompt for choice in choices],
        batch_size=batch_size,
        append_eos=append_eos,
        disable=disable,
    )
    flat_iter = iter(flat)
    scores, predictions = [], []
    for choices in choices_per_prompt:
        row = [next(flat_iter) for _ in choices]
        row_scores = [s.logprob / s.n_tokens if length_normalize else s.logprob for s in row]
        scores.append(row_scores)
        predictions.append(max(range(len(row_scores)), key=row_scores.__getitem__))
    accuracy = sum(p == y for p, y in zip(predictions, labels)) / len(labels)
    return {"accuracy": accuracy, "predictions": predictions, "scores": scores}


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    batch_size: int = 8,
    stop: Sequence[str] = (),
    disable: bool = False,
) -> list[str]:
    """Greedy decoding; each output is cut at its first EOS token and first stop string, then stripped.

    A decoder-only prompt that leaves no room for `max_new_tokens` loses tokens on the left, as in lm-eval.
    Prompts are batched by length (little padding) and a row stops at its first EOS or stop string, so the
    batch ends when its last row does; the text is what `model.generate` greedy gives each prompt alone
    (tests/test_fast_generation.py, benchmarks/greedy_generation.py).
    """
    encoder_decoder = _is_encoder_decoder(model)
    limit = None if encoder_decoder else _max_positions(model)
    if limit is not None and limit <= max_new_tokens:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {limit} positions")
    device = _device(model)
    eos_ids = _eos_ids(model, tokenizer)
    # Padding is masked out, so any id in the vocabulary will do.
    pad_id = next(i for i in (tokenizer.pad_token_id, *sorted(eos_ids), 0) if i is not None)
    encoded = [tokenizer.encode(p) for p in prompts]
    if limit is not None:
        encoded = [e[-(limit - max_new_tokens) :] for e in encoded]
    if not all(encoded):
        raise ValueError("generate: a prompt encodes to no token")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # longest first; put back below
    outputs: dict[int, str] = {}
    with eval_mode(model):
        for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=disable):
            chunk = order[start : start + batch_size]
            # A decoder-only model continues the prompt, so its batch is padded on the left.
            input_ids, mask = pad_sequences(
                [encoded[i] for i in chunk], pad_id, "right" if encoder_decoder else "left"
            )
            # Encoder-decoder output starts with the decoder start token; decoder-only output with the prompt.
            first_new = 1 if encoder_decoder else input_ids.shape[1]
            sequences = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id,
                eos_token_id=sorted(eos_ids) or None,
                stopping_criteria=StoppingCriteriaList([_StopStrings(tokenizer, stop, first_new)])
                if stop
                else None,
            )
            new_tokens = sequences[:, first_new:].tolist()
            outputs.update((i, _finish(tokenizer, row, eos_ids, stop)) for i, row in zip(chunk, new_tokens))
    return [outputs[i] for i in range(len(prompts))]


class _StopStrings(StoppingCriteria):
    """Per row: done once its generated text contains a stop string (the text before it no longer changes).

    transformers' `StopStringCriteria` matches the stop string against the end of the whole sequence, so a
    stop string straddling the prompt's end would stop a row that `_finish` (which reads only the new text)
    would not cut; this one reads the new tokens only.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str], first_new: int) -> None:
        self.tokenizer, self.stop, self.first_new = tokenizer, tuple(stop), first_new

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.first_new :], skip_special_tokens=True)
        done = [any(s in text for s in self.stop) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD v1.1 evaluation)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]], *, normalize: bool = True
) -> float:
    """Fraction of predictions equal to one of their references (after `normalize_answer` if `normalize`)."""
    _check_pairs(predictions, references)
    norm = normalize_answer if normalize else (lambda s: s)
    hits = [any(norm(p) == norm(r) for r in _as_list(refs)) for p, refs in zip(predictions, references)]
    return sum(hits) / len(hits)


def rouge_l(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]], *, use_stemmer: bool = True
) -> float:
    """Mean ROUGE-L F-measure (Lin 2004, LCS-based) as a fraction, best over each prediction's references.

    The rouge-score package with stemming, as in Super-NaturalInstructions' evaluation (which reports ×100).
    """
    _check_pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    best = [
        max(scorer.score(r, p)["rougeL"].fmeasure for r in _as_list(refs))
        for p, refs in zip(predictions, references)
    ]
    return sum(best) / len(best)


def classification_accuracy(
    model_fn: Callable[..., Any],
    batches: Iterable[tuple[Any, torch.Tensor] | Mapping[str, Any]],
    *,
    disable: bool = False,
) -> float:
    """Fraction of examples whose argmax logit is the label.

    A batch is (inputs, labels), called as `model_fn(inputs)`, or a dict with `labels`, called as
    `model_fn(**rest)`. `model_fn` returns logits (B, C) or an output with `.logits`; an `nn.Module` runs in
    eval mode with the inputs moved to its device.
    """
    module = model_fn if isinstance(model_fn, nn.Module) else None
    device = _device(module) if module is not None else None
    correct = total = 0
    with eval_mode(module) if module is not None else torch.no_grad():
        for batch in tqdm(batches, desc="accuracy", disable=disable):
            if isinstance(batch, Mapping):
                labels = batch["labels"]
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                out = model_fn(**(send_to_device(inputs, device) if device is not None else inputs))
            else:
                inputs, labels = batch
                out = model_fn(send_to_device(inputs, device) if device is not None else inputs)
            logits = out.logits if hasattr(out, "logits") else out  # (B, C)
            correct += int((logits.argmax(-1).cpu() == labels.cpu()).sum())
            total += labels.numel()
    if total == 0:
        raise ValueError("classification_accuracy: no example")
    return correct / total


def _score_causal(
    model: nn.Module, pairs: Sequence[tuple[list[int], list[int]]], limit: int | None
) -> list[ContinuationScore]:
    # The input is context + continuation without its last token, cut on the left to fit the model;
    # the logits at the last len(continuation) real positions predict the continuation.
    full = [(c + y)[-(limit + 1) :] if limit else c + y for c, y in pairs]
    input_ids, mask = pad_sequences(
        [f[:-1] for f in full], 0, "right"
    )  # (B, T); right padding keeps positions
    device = _device(model)
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
    logprobs = F.log_softmax(_upcast(logits), dim=-1)  # (B, V_tokens + T, V)
    virtual = logprobs.shape[1] - input_ids.shape[1]  # prompt tuning's virtual tokens come first
    out = []
    for row, f, (_, y) in zip(logprobs, full, pairs):
        end = virtual + len(f) - 1
        out.append(_continuation_score(row[end - len(y) : end], y))
    return out


def _score_encoder_decoder(
    model: nn.Module, pairs: Sequence[tuple[list[int], list[int]]], limit: int | None
) -> list[ContinuationScore]:
    # Encoder reads the context; the decoder is teacher-forced on the continuation (the model shifts the
    # labels right itself, and -100 padding becomes the pad token there).
    input_ids, mask = pad_sequences([c[-limit:] if limit else c for c, _ in pairs], 0, "right")
    labels, _ = pad_sequences([y for _, y in pairs], IGNORE_INDEX, "right")
    device = _device(model)
    logits = model(
        input_ids=input_ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)
    ).logits
    logprobs = F.log_softmax(_upcast(logits), dim=-1)  # (B, T_dec, V)
    return [_continuation_score(row[: len(y)], y) for row, (_, y) in zip(logprobs, pairs)]


def _continuation_score(logprobs: torch.Tensor, continuation: list[int]) -> ContinuationScore:
    # logprobs (C, V): the log-distributions that predict each of the C continuation tokens.
    target = torch.tensor(continuation, device=logprobs.device)
    token_logprobs = logprobs.gather(-1, target[:, None]).squeeze(-1)  # (C,)
    is_greedy = bool((logprobs.argmax(-1) == target).all())
    return ContinuationScore(float(token_logprobs.sum()), len(continuation), is_greedy)


def _causal_forward(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # transformers numbers positions 0..T-1 whatever the mask, so a left-padded row needs explicit
    # position ids to match its unpadded self.
    if bool((mask == 0).any()):
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).logits
    return model(input_ids=input_ids, attention_mask=mask).logits


def _finish(tokenizer: Any, tokens: list[int], eos_ids: set[int], stop: Sequence[str]) -> str:
    end = next((i for i, t in enumerate(tokens) if t in eos_ids), len(tokens))
    text = tokenizer.decode(tokens[:end], skip_special_tokens=True)
    for s in stop:  # cutting at each in turn leaves the text before the earliest one
        text = text.split(s, 1)[0]
    return text.strip()


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    # The tokenizer's EOS and the model's generation EOS (one id or a list) can differ; stop at either.
    ids = {tokenizer.eos_token_id}
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(generation_eos) if isinstance(generation_eos, list) else {generation_eos}
    return {i for i in ids if i is not None}


def pad_id(tokenizer: Any) -> int:
    """The id that pads a batch: the tokenizer's pad token, or its EOS where it has none (GPT-2, Llama)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad_sequences(
    sequences: Sequence[Sequence[int]], value: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids padded with `value` on `side` to the longest row, and the (B, T) attention mask (1 = real
    token). The one padding helper of scoring, generation and fine-tuning (`common.lm_finetune.collate`)."""
    if side not in ("left", "right"):
        raise ValueError(f"pad_sequences: side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        where = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, where] = torch.tensor(s, dtype=torch.long)
        mask[i, where] = 1
    return ids, mask


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    # log-softmax of fp16/bf16 logits loses the small differences between choices.
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def _tokenizer_limit(tokenizer: Any) -> int | None:
    """The tokenizer's `model_max_length` (512 for T5), unless it is transformers' 'no limit' placeholder."""
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and value < 10**8 else None


def _max_positions(model: nn.Module) -> int | None:
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(model.config, name, None)
        if isinstance(value, int):
            return value
    return None  # relative positions (T5): no limit


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _as_list(references: str | Sequence[str]) -> Sequence[str]:
    return [references] if isinstance(references, str) else references


def _check_pairs(predictions: Sequence[str], references: Sequence[Any]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no prediction to score")
