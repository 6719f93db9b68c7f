"""Model pools and task pools, as fusion_bench has them: a pretrained model plus named fine-tuned models,
and tasks with their data and heads, each described by a config group (configs/modelpool, configs/taskpool).

A model path is a local `save_pretrained` folder, a hub id (paper scale), or `tiny:<base>` / `micro:<base>`
for a cached tiny-world base; `{expert_root}` in a path is replaced by the pool's `expert_root`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from common.io import check_finite
from common.models import load_model
from common.registry import lookup
from common.tiny_world import resolve_base
from projects.smile.routing import has_smile_layers, image_routing, routing_report

PRETRAINED = "_pretrained_"  # the reserved name of the base model in a pool, as in fusion_bench
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# pool type -> the common.models family its models are loaded as
POOL_FAMILIES = {
    "CLIPVisionModelPool": "clip_vision",
    "AutoModelForCausalLMPool": None,  # mistral or llama, read from the config
    "Seq2SeqLMPool": "t5",
}


def resolve_path(path: str, expert_root: str | None = None) -> str:
    """`tiny:clip` / `real:smollm2-135m` -> the cached base folder; `{expert_root}/x` -> under expert_root."""
    if "{expert_root}" in path:
        if not expert_root:
            raise ValueError(f"model path {path!r} needs modelpool.expert_root to be set")
        path = path.replace("{expert_root}", str(expert_root))
    return resolve_base(path)


def pool_models(cfg: Mapping[str, Any]) -> dict[str, str]:
    """name -> resolved path, in the pool's order; `_pretrained_` must be present."""
    entries = cfg["models"]
    if isinstance(entries, Mapping):  # fusion_bench's dict form {name: path}
        entries = [{"name": k, "path": v} for k, v in entries.items()]
    paths = {}
    for entry in entries:
        if entry.get("path") is None:
            raise ValueError(f"model {entry.get('name')!r} in the model pool has no path")
        paths[entry["name"]] = resolve_path(str(entry["path"]), cfg.get("expert_root"))
    return paths


def load_modelpool(cfg: Mapping[str, Any]) -> tuple[nn.Module | None, dict[str, nn.Module]]:
    """(pretrained or None, {name: fine-tuned model}) as the pool's family, in `cfg.dtype`.

    With `adapters: true` every model but `_pretrained_` is a PEFT LoRA adapter (a local folder or a hub
    id), merged into a copy of the pretrained model (`merge_lora`), as fusion_bench's LoRA pools do."""
    family = lookup(POOL_FAMILIES, cfg["type"], "model pool type")
    dtype = lookup(DTYPES, cfg.get("dtype") or "float32", "modelpool.dtype")
    paths = pool_models(cfg)
    if cfg.get("adapters") and PRETRAINED not in paths:
        raise ValueError(
            "a pool of adapters (adapters: true) needs a '_pretrained_' model to merge them into"
        )
    models = {}
    order = sorted(paths, key=lambda name: name != PRETRAINED)  # the base first: adapters merge into it
    for name in tqdm(order, desc="load models", disable=None):
        path = paths[name]
        if cfg.get("adapters") and name != PRETRAINED:
            models[name] = merge_lora(models[PRETRAINED], _local(path))
        else:
            models[name] = load_model(path, family, dtype=dtype)
        # Once, at load, for every method (simple_average and task_arithmetic would pass NaN on silently).
        check_finite(models[name].state_dict(), f"modelpool model {name!r} ({path})")
    return models.pop(PRETRAINED, None), models


def _local(path: str) -> str:
    """A local folder as is; a hub id downloaded (paper scale)."""
    if Path(path).exists():
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(path)


@torch.no_grad()
def merge_lora(base: nn.Module, adapter: str | Path) -> nn.Module:
    """A copy of `base` with a saved LoRA adapter merged into full weights: W <- W + (alpha/r)·B A per
    adapted Linear (Hu et al. 2021, eq. 3), what peft's `merge_and_unload` computes; `base` is unchanged."""
    from common.adapters import load_adapter, lora_factors_from_state

    saved = load_adapter(adapter)
    model = copy.deepcopy(base)
    for key, factors in lora_factors_from_state(saved.state, saved.config).items():
        layer = model.get_submodule(key.removeprefix("base_model.model."))
        if not isinstance(layer, nn.Linear) or layer.weight.shape != (factors.B.shape[0], factors.A.shape[1]):
            raise ValueError(f"adapter {adapter}: {key} does not match a Linear of the base model")
        layer.weight += factors.delta().to(layer.weight)
    return model


# --- CLIP image classification with frozen zero-shot text heads ------------------------------------------


def clip_logits(
    vision: nn.Module,
    projection: nn.Module,
    logit_scale: float,
    text: torch.Tensor,
    pixel_values: torch.Tensor,
) -> torch.Tensor:
    """logit_scale · ⟨text_c, normalised visual_projection(pooler_output)⟩ -> (N, classes); text (classes, dim)."""
    image = projection(vision(pixel_values=pixel_values).pooler_output)  # (N, dim)
    image = image / image.norm(dim=-1, keepdim=True)
    return logit_scale * image @ text.T


@torch.no_grad()
def class_embeddings(
    clip: nn.Module, tokenizer: Any, classes: list[str], templates: list[str]
) -> torch.Tensor:
    """Per class: every template embedded and normalised, averaged, normalised again -> (classes, dim)."""
    out = []
    for c in classes:
        tokens = tokenizer([t.format(c) for t in templates], padding=True, return_tensors="pt")
        feats = clip.get_text_features(**tokens)
        feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
        feats = feats / feats.norm(dim=-1, keepdim=True)
        mean = feats.mean(0)
        out.append(mean / mean.norm())
    return torch.stack(out)


def _spread(n: int, cap: int | None) -> list[int]:
    """All n row indices, or `cap` evenly spaced ones."""
    if not cap or cap >= n:
        return list(range(n))
    return [round(i * (n - 1) / (cap - 1)) for i in range(cap)] if cap > 1 else [0]


def task_data(task: str, source: str, split: str, image_size: int, max_examples: int | None = None):
    """(pixel_values (N, 3, H, W), labels (N,), class names) of one task's split."""
    if source == "tiny":
        from common.data import load_image_task, to_pixel_values
        from common.tiny_world import PRETRAIN_SPLIT_SEED

        ds = load_image_task(task, seed=PRETRAIN_SPLIT_SEED)[0][split]
        classes = ds.features["label"].names
        # rows come sorted by class: a capped split takes evenly spaced rows, so every class is in it
        rows = ds[_spread(len(ds), max_examples)]
        return to_pixel_values(rows["image"], image_size), torch.as_tensor(rows["label"]), classes
    if source == "hub":
        from transformers import CLIPImageProcessor

        from common.data.hub import clip_task

        ds = clip_task(task)[0][split]
        ds = ds.select(_spread(len(ds), max_examples))
        image_key = "image" if "image" in ds.column_names else "img"
        processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=image_size)
        pixels = processor([im.convert("RGB") for im in ds[image_key]], return_tensors="pt")["pixel_values"]
        return pixels, torch.as_tensor(ds["label"]), ds.features["label"].names
    raise ValueError(f"unknown task data source {source!r}; use 'tiny' or 'hub'")


class CLIPTaskPool:
    """The CLIP-ViT classification tasks: evaluate(vision tower) -> {task: {accuracy, loss}, average}; with
    `routing: N`, a SMILE tower's routing of N evenly spaced images of each task (`projects.smile.routing.
    image_routing`: every image token, per encoder layer) in the report under "routing"."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        from transformers import AutoTokenizer

        self.cfg = cfg
        path = resolve_path(str(cfg["clip_model"]))
        clip = load_model(path, "clip")
        tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_size = clip.config.vision_config.image_size
        self.data, text = {}, {}
        for task in cfg["tasks"]:
            pixels, labels, classes = task_data(
                task, cfg["data"], cfg["split"], self.image_size, cfg.get("max_examples")
            )
            self.data[task] = (pixels, labels)
            text[task] = class_embeddings(clip, tokenizer, list(classes), list(cfg["templates"]))
        # Frozen heads: the pretrained projection, temperature and class embeddings.
        self.projection = clip.visual_projection.eval().requires_grad_(False)
        self.logit_scale = float(clip.logit_scale.detach().exp())
        self.text = text

    @torch.no_grad()
    def evaluate(self, vision: nn.Module) -> dict[str, Any]:
        vision.eval()
        device = next(vision.parameters()).device
        dtype = next(vision.parameters()).dtype
        projection = self.projection.to(device, dtype)
        report: dict[str, Any] = {}
        batch = int(self.cfg.get("batch_size", 256))
        for task, (pixels, labels) in tqdm(self.data.items(), desc="evaluate", disable=None):
            text = self.text[task].to(device, dtype)
            correct, loss = 0, 0.0
            for i in range(0, len(labels), batch):
                x, y = pixels[i : i + batch].to(device, dtype), labels[i : i + batch].to(device)
                logits = clip_logits(vision, projection, self.logit_scale, text, x)
                correct += int((logits.argmax(-1) == y).sum())
                loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            report[task] = {"accuracy": correct / len(labels), "loss": loss / len(labels)}
        report["average"] = {
            key: sum(report[t][key] for t in self.data) / len(self.data) for key in ("accuracy", "loss")
        }
        n = self.cfg.get("routing")
        if n and has_smile_layers(vision):  # `image_routing` over N evenly spaced images of each task
            images = {t: pixels[_spread(len(pixels), int(n))] for t, (pixels, _) in self.data.items()}
            report["routing"] = image_routing(vision, images, batch)
        return report


def line_chunks(text: str, max_chars: int) -> list[str]:
    """`text` cut at line breaks into consecutive pieces of at most `max_chars` characters (a longer line is
    cut inside); whitespace-only pieces are dropped, the others joined back give the text."""
    pieces, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            if current:
                pieces.append(current)
                current = ""
            pieces.append(line[:max_chars])
            line = line[max_chars:]
        if len(current) + len(line) > max_chars:
            pieces.append(current)
            current = ""
        current += line
    pieces.append(current)
    return [p for p in pieces if p.strip()]


def evenly_spread(items: list[Any], limit: int | None) -> list[Any]:
    """`limit` items at evenly spaced positions (all of them if there are fewer or no limit)."""
    if not limit or len(items) <= limit:
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


class LMEvalTaskPool:
    """Causal-LM domains scored by lm-eval (offline, local files): rolling log-likelihood of each test text.

    cfg: tokenizer (a model path), tasks {name: {dataset, fields, split, limit, max_chars}}, batch_size,
    work_dir, routing (N: a SMILE model's routing distribution over the first N texts of each domain,
    `projects.smile.routing`, in the report under "routing"; null: none). With `max_chars`, texts are cut at line breaks into pieces of at most that many characters
    and `limit` pieces are taken evenly spread over all of them (long source files cost a real LM minutes
    each; spreading keeps every file and every part of a file in reach).
    """

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        import json
        import tempfile
        from pathlib import Path

        from transformers import AutoTokenizer

        from common.lm_eval_bridge import task_config
        from projects.smile.finetune_lm import domain_texts

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_path(str(cfg["tokenizer"])))
        self.batch_size = int(cfg.get("batch_size", 8))
        work = Path(cfg.get("work_dir") or tempfile.mkdtemp(prefix="smile-lm-eval-"))
        work.mkdir(parents=True, exist_ok=True)
        self.tasks, self.texts, self.routing = [], {}, cfg.get("routing")
        for name, spec in cfg["tasks"].items():
            texts = domain_texts(spec, spec.get("split", "test"))
            if spec.get("max_chars"):
                texts = evenly_spread(
                    [p for t in texts for p in line_chunks(t, spec["max_chars"])], spec.get("limit")
                )
            else:
                texts = texts[: spec.get("limit") or None]
            self.texts[name] = texts
            data = work / f"{name}.jsonl"
            data.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
            self.tasks.append(
                task_config(
                    f"smile_{name}", data, "loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}"
                )
            )

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        from common.lm_eval_bridge import evaluate_in_memory

        raw = evaluate_in_memory(model, self.tokenizer, self.tasks, batch_size=self.batch_size)
        report = {name.removeprefix("smile_"): metrics for name, metrics in raw.items()}
        report["average"] = {"bits_per_byte": sum(r["bits_per_byte"] for r in report.values()) / len(report)}
        routing = routing_report(model, self.tokenizer, self.texts, self.routing)
        if routing is not None:
            report["routing"] = routing
        return report


class DummyTaskPool:
    """No evaluation (fusion_bench's `taskpool=dummy`): the report holds only the model info."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.cfg = cfg

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        return {}


def _text_generation(cfg: Mapping[str, Any]) -> Any:
    from projects.smile.text_generation import TextGenerationTaskPool

    return TextGenerationTaskPool(cfg)


TASKPOOLS = {
    "CLIPVisionModelTaskPool": CLIPTaskPool,
    "FlanT5GLUETextGenerationTaskPool": _text_generation,
    "LMEvalTaskPool": LMEvalTaskPool,
    "DummyTaskPool": DummyTaskPool,
}


def build_taskpool(cfg: Mapping[str, Any]) -> Any:
    return lookup(TASKPOOLS, cfg["type"], "task pool type")(cfg)
