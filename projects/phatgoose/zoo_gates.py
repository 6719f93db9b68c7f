"""PHATGOOSE gates for the expert zoo's decoder-only experts (SmolLM2), as mttl's `PhatgooseTransform`
re-implemented the paper for Phi-2: per zoo expert and per adapted module, a sigmoid gate vector g
trained with the base and the LoRA frozen, on the expert's own training data (§3, eq. 1):

    y = W u + σ(gᵀu) · s B A u,   g initialised to 0 (σ(0) = ½ halves the expert at first)

(`moe.MoELoRALinear` in mode "gate"). The loss is the zoo's (target tokens, `common.lm_finetune`), the
loop `common.training.train` (checkpoints under `$MOERGING_CACHE/phatgoose_gate_runs/<hash>/`, so a killed
run resumes), and the result is cached by `common.cache.cached_dir` under
`$MOERGING_CACHE/phatgoose_gates/<hash>/` (`gates.safetensors`: `gate.<module>` (d_in,) fp32, and
`gates.json`), the hash taken over the expert's own cache key, the seed and `GateSettings`. Trained gates
ship with the zoo (`ship`, `real gates --ship`): `zoo/lora/seed_<s>/phatgoose_gates/<task>/` (`shipped_path`),
copied into the cache when their key is the one asked for.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from common import zoo
from common.cache import cache_root, cached_dir, content_hash, entry_path, present
from common.cache import ship as ship_entry
from common.cli import UserError
from common.evaluation import pad_id
from common.io import load_tensors, read_json, save_tensors, write_json
from common.lm_finetune import collate, encode_example, target_only_loss
from projects.phatgoose.library import read_expert
from projects.phatgoose.moe import attach_experts

VERSION = 1  # bump when the gate training code changes what a cached gate holds
GATES_FILE, INFO_FILE = "gates.safetensors", "gates.json"


@dataclass(frozen=True)
class GateSettings:
    """Gate training on the zoo: the paper's 100 steps; the original trains the gates with the expert's own
    optimizer settings, so lr and batch are the zoo experts' (1e-3, 8: the paper's batch 1024 scaled to the
    zoo's budget), with the original's constant schedule after 6% warmup and no weight decay (mttl's too)."""

    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 8
    warmup_steps: int = 6
    schedule: str = "constant"

    def key(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT = GateSettings()


def gate_key(
    task: str, seed: int, settings: zoo.ZooSettings = zoo.DEFAULT, gate: GateSettings = DEFAULT
) -> dict[str, Any]:
    """What decides a gate: the expert (its zoo cache key's hash), the seed, the gate settings, the code."""
    return {
        "expert": content_hash(zoo.expert_key(task, seed, settings)),
        "task": task,
        "seed": seed,
        "gate": gate.key(),
        "version": VERSION,
    }


def shipped_path(
    task: str,
    seed: int,
    settings: zoo.ZooSettings = zoo.DEFAULT,
    gate: GateSettings = DEFAULT,
    root: Path | None = None,
) -> Path:
    """Where the gates of `task`'s expert ship: beside the experts of the seed, in `phatgoose_gates/<task>`
    (`phatgoose_gates-<hash>/` for other `GateSettings`); `root` as `zoo.shipped_path`'s."""
    folder = "phatgoose_gates" if gate == DEFAULT else f"phatgoose_gates-{content_hash(gate.key(), 8)}"
    return zoo.shipped_path(task, seed, settings, root).parent / folder / task


def is_cached(
    task: str, seed: int, settings: zoo.ZooSettings = zoo.DEFAULT, gate: GateSettings = DEFAULT
) -> bool:
    """Whether `gates` would train nothing: the gates are in the cache or shipped."""
    return present(
        "phatgoose_gates", gate_key(task, seed, settings, gate), shipped_path(task, seed, settings, gate)
    )


def gates(
    task: str, seed: int, settings: zoo.ZooSettings = zoo.DEFAULT, gate: GateSettings = DEFAULT
) -> Path:
    """The cached gate folder of `task`'s zoo expert (trained now if absent; the expert must be in the zoo)."""
    if settings.adapter != "lora":
        raise UserError(
            f"PHATGOOSE gates sit in front of LoRA experts; this zoo's adapter is {settings.adapter!r}"
        )
    if not zoo.is_cached(task, seed, settings):
        raise SystemExit(
            f"the zoo lacks seed {seed}'s {task} expert: run `python -m common.zoo --seeds {seed}` first"
        )
    key = gate_key(task, seed, settings, gate)
    return cached_dir(
        "phatgoose_gates",
        key,
        lambda out: _train(task, seed, settings, gate, key, out),
        shipped=shipped_path(task, seed, settings, gate),
    )


def ship(
    seeds: Sequence[int],
    tasks: Sequence[str] = zoo.LIBRARY,
    settings: zoo.ZooSettings = zoo.DEFAULT,
    gate: GateSettings = DEFAULT,
) -> list[Path]:
    """Copy the cached gates of `seeds` x `tasks` to their `shipped_path`; returns the folders written."""
    written = []
    for seed in seeds:
        for task in tasks:
            key, dest = gate_key(task, seed, settings, gate), shipped_path(task, seed, settings, gate)
            if present("phatgoose_gates", key) and ship_entry(entry_path("phatgoose_gates", key), dest):
                written.append(dest)
    return written


def load_gates(path: str | Path) -> dict[str, torch.Tensor]:
    """Module -> gate g (d_in,), fp32, from a gate folder."""
    state = load_tensors(Path(path) / GATES_FILE)
    return {k.removeprefix("gate."): v for k, v in state.items()}


def zoo_gates(
    tasks: Sequence[str], seed: int, settings: zoo.ZooSettings = zoo.DEFAULT, gate: GateSettings = DEFAULT
) -> dict[str, dict[str, torch.Tensor]]:
    """Task -> module -> trained gate, for cached gates only (the leaderboard never trains)."""
    missing = [t for t in tasks if not is_cached(t, seed, settings, gate)]
    if missing:
        raise SystemExit(
            f"no PHATGOOSE gates for seed {seed}'s experts {missing}: run "
            f"`python -m projects.phatgoose.real gates --seeds {seed}` first"
        )
    return {t: load_gates(gates(t, seed, settings, gate)) for t in tasks}


def _train(
    task: str,
    seed: int,
    settings: zoo.ZooSettings,
    gate: GateSettings,
    key: Mapping[str, Any],
    out: Path,
) -> None:
    from common.rundir import provenance
    from common.training import TrainConfig, train

    started = time.time()
    print(f"phatgoose: training the gates of the {task} expert (seed {seed}, {gate.steps} steps)", flush=True)
    model, tok = zoo.load_base(settings)  # the zoo's dtype and eager attention, as the expert was trained
    modules = attach_experts(model, [read_expert(zoo.expert(task, seed, settings))])  # freezes everything
    trained = {name: m.add_gate() for name, m in modules.items()}
    model.train()
    records = zoo.training_records(task, seed, settings)
    examples = zoo.Examples(
        [encode_example(tok, r["source"], r["target"], settings.max_length) for r in records]
    )
    cfg = TrainConfig(
        lr=gate.lr,
        max_steps=gate.steps,
        warmup_steps=gate.warmup_steps,
        schedule=gate.schedule,
        batch_size=gate.batch_size,
        weight_decay=0.0,
        seed=seed,
        log_every=5,
        save_every=25,
        keep_last=1,
    )
    run_dir = cache_root() / "phatgoose_gate_runs" / content_hash(key)
    pad = pad_id(tok)
    result = train(
        model,
        target_only_loss,
        examples,
        cfg,
        run_dir,
        collate_fn=lambda batch: collate(batch, pad),
        params=list(trained.values()),
        label=f"phatgoose gates {task}",
        run_key=dict(key),
    )
    save_tensors(out / GATES_FILE, {f"gate.{m}": g.detach().float() for m, g in trained.items()})
    (out / "train_log.jsonl").write_text((run_dir / "train_log.jsonl").read_text())
    write_json(
        out / INFO_FILE,
        {
            **dict(key),
            "steps": result.step,
            "final_loss": result.losses[-1][1] if result.losses else None,
            "train_s": round(time.time() - started, 1),
            "provenance": provenance(seed, started),
        },
    )


def train_missing(
    seeds: Sequence[int],
    tasks: Sequence[str] = zoo.LIBRARY,
    settings: zoo.ZooSettings = zoo.DEFAULT,
    gate: GateSettings = DEFAULT,
) -> list[Path]:
    """Every library expert's gates for `seeds`, trained where missing (resumes an interrupted one)."""
    paths = []
    for seed in seeds:
        for task in tasks:
            paths.append(gates(task, seed, settings, gate))
            info = read_json(paths[-1] / INFO_FILE)
            print(f"phatgoose: seed {seed} {task}: gates ready ({info['train_s']} s)", flush=True)
    return paths
