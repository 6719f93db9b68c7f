"""The shared training loop: learning, determinism, exact resume, accumulation, clipping, freezing, errors."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import TensorDataset

from common.io import load_tensors
from common.training import TrainConfig, latest_checkpoint, load_weights, train


def mlp(seed: int = 0, dropout: float = 0.1) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 1))


def regression(n: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=g)
    return TensorDataset(x, y)


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x).squeeze(-1), y)


def config(**overrides) -> TrainConfig:
    base = dict(lr=1e-2, max_steps=10, schedule="constant", batch_size=4, log_every=1, max_grad_norm=None)
    return TrainConfig(**{**base, **overrides})


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_loss_decreases_and_run_dir_is_written(tmp_path):
    cfg = config(lr=3e-2, max_steps=60, schedule="cosine", warmup_steps=5, max_grad_norm=1.0, save_every=20)
    result = train(mlp(dropout=0.0), mse, regression(32), cfg, tmp_path)
    first, last = result.losses[0][1], sum(loss for _, loss in result.losses[-5:]) / 5
    assert last < 0.1 * first
    assert [s for s, _ in result.losses] == list(range(1, 61))
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 61)) and log[0]["lr"] == 0.0  # warmup starts at 0
    # keep_last=2 leaves the last two of steps 20, 40, 60; `latest.json` points at the final one.
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_40", "step_60"]
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["step"] == 60
    assert result.checkpoint == latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_60"


def test_seeded_runs_are_bitwise_identical(tmp_path):
    runs = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        runs[name] = mlp()  # same init; dropout and data order depend on cfg.seed only
        train(runs[name], mse, regression(), config(seed=seed), tmp_path / name)
    assert params_equal(runs["a"], runs["b"])
    assert not params_equal(runs["a"], runs["c"])


def shuffled_batches(epoch: int) -> list:
    """A callable data source: a different, deterministic order every epoch."""
    x, y = regression().tensors
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
    return [(x[i], y[i]) for i in order[:15].split(3)]


class Kill(Exception):
    pass


def kill_at(step_to_kill: int):
    def callback(step, logs):
        if step == step_to_kill:
            raise Kill(f"killed at step {step}")

    return callback


@pytest.mark.parametrize("data", [regression(), shuffled_batches], ids=["dataset", "callable"])
def test_killed_run_resumes_to_the_same_weights(tmp_path, data):
    # 16 examples in micro-batches of 3 and grad_accum=2: steps straddle epoch boundaries and step 6
    # ends inside an epoch, so resuming must skip exactly the consumed micro-batches. Dropout is on.
    cfg = config(max_steps=10, save_every=3, batch_size=3, grad_accum=2, max_grad_norm=0.5, schedule="linear")
    reference = mlp()
    expected = train(reference, mse, data, cfg, tmp_path / "reference")

    with pytest.raises(Kill, match="step 7"):
        train(mlp(), mse, data, cfg, tmp_path / "killed", callbacks=[kill_at(7)])
    assert latest_checkpoint(tmp_path / "killed").name == "step_6"

    resumed = mlp()  # a fresh process rebuilds the model from scratch
    result = train(resumed, mse, data, cfg, tmp_path / "killed")
    assert params_equal(resumed, reference)
    assert result.step == 10 and result.losses == expected.losses  # step 7 logged once, by the resumed run

    # Resuming a finished run changes nothing; changing a setting that shaped the run is refused.
    again = mlp()
    assert train(again, mse, data, cfg, tmp_path / "killed").losses == expected.losses
    assert params_equal(again, reference)
    with pytest.raises(ValueError, match="'lr'"):
        train(mlp(), mse, data, config(**{**vars(cfg), "lr": 0.5}), tmp_path / "killed")
    with pytest.raises(FileExistsError, match="resume=True"):
        train(mlp(), mse, data, cfg, tmp_path / "killed", resume=False)


def test_grad_accum_equals_larger_batch(tmp_path):
    # Mean losses over equal micro-batches: the mean of two means of b equals the mean over 2b.
    small, large = mlp(dropout=0.0), mlp(dropout=0.0)
    a = train(small, mse, regression(32), config(batch_size=4, grad_accum=2), tmp_path / "a")
    b = train(large, mse, regression(32), config(batch_size=8, grad_accum=1), tmp_path / "b")
    for p, q in zip(small.parameters(), large.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    torch.testing.assert_close([x for _, x in a.losses], [x for _, x in b.losses], rtol=1e-6, atol=1e-6)


def test_clipping_caps_the_gradient_norm(tmp_path):
    seen = []

    def before_step(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    logged = []

    def log_norm(step, logs):
        logged.append(logs["grad_norm"])

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        train(mlp(), mse, regression(), config(max_grad_norm=0.05), tmp_path, callbacks=[log_norm])
    finally:
        handle.remove()
    assert min(logged) > 0.05  # every step was clipped: the unclipped norm is logged
    torch.testing.assert_close(seen, [0.05] * 10, rtol=1e-5, atol=0)


def test_only_the_given_params_change(tmp_path):
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    head = model[3]
    result = train(model, mse, regression(), config(), tmp_path, params=head.parameters())
    first, last = list(model.parameters())[:2], list(model.parameters())[2:]
    assert all(torch.equal(p, b) for p, b in zip(first, before[:2]))
    assert not any(torch.equal(p, b) for p, b in zip(last, before[2:]))
    assert all(p.requires_grad for p in model.parameters())  # the caller's flags are restored
    assert sorted(load_tensors(result.checkpoint / "weights.safetensors")) == ["3.bias", "3.weight"]

    with pytest.raises(ValueError, match="not parameters of `model`"):
        train(mlp(), mse, regression(), config(), tmp_path / "other", params=[nn.Parameter(torch.zeros(1))])


def test_lora_run_saves_only_the_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    def lora_gpt2():
        torch.manual_seed(0)
        gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
        return get_peft_model(
            gpt2, LoraConfig(r=4, target_modules=["c_attn"], lora_dropout=0.1, fan_in_fan_out=True)
        )

    tokens = torch.arange(64).remainder(7).view(8, 8)  # a periodic sequence the LM can learn

    def lm_loss(model, batch):
        return model(input_ids=batch, labels=batch).loss

    model = lora_gpt2()
    result = train(model, lm_loss, tokens, config(lr=3e-2, max_steps=30, batch_size=2), tmp_path)
    assert result.losses[-1][1] < result.losses[0][1] - 0.1  # ln(32) = 3.47 at the start
    saved = load_tensors(result.checkpoint / "weights.safetensors")
    assert saved and all("lora_" in name for name in saved)

    fresh = lora_gpt2()
    load_weights(fresh, result.checkpoint)
    assert params_equal(fresh, model)


def test_half_written_checkpoints_are_ignored(tmp_path):
    train(mlp(), mse, regression(), config(max_steps=4, save_every=2), tmp_path)
    root = tmp_path / "checkpoints"
    (root / ".step_6.abc123.tmp").mkdir()  # what an `atomic_dir` killed mid-write leaves
    (root / ".step_6.abc123.tmp" / "weights.safetensors").write_bytes(b"garbage")
    (root / "step_8").mkdir()  # a checkpoint missing its optimizer and trainer state
    (root / "step_8" / "weights.safetensors").write_bytes(b"garbage")
    assert latest_checkpoint(tmp_path) == root / "step_4"

    extended = mlp()
    assert train(extended, mse, regression(), config(max_steps=6, save_every=2), tmp_path).step == 6
    straight = mlp()
    train(straight, mse, regression(), config(max_steps=6, save_every=2), tmp_path / "straight")
    assert params_equal(extended, straight)


def test_nan_loss_raises_with_the_step_and_saves_nothing_bad(tmp_path):
    calls = []

    def diverging(model, batch):
        calls.append(1)
        loss = mse(model, batch)
        return loss * float("nan") if len(calls) == 3 else loss

    with pytest.raises(FloatingPointError, match="at step 3"):
        train(mlp(), diverging, regression(), config(save_every=1), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_1", "step_2"]


def test_cosine_floor_follows_the_formula(tmp_path):
    # lr_t = lr * (r + (1 - r) * (1 + cos(pi * (t - w) / (T - w))) / 2) after w warmup steps, r = min_lr_ratio.
    lr, steps, warmup, ratio = 1e-2, 20, 4, 0.1
    cfg = config(lr=lr, max_steps=steps, schedule="cosine", warmup_steps=warmup, min_lr_ratio=ratio)
    train(mlp(), mse, regression(), cfg, tmp_path)
    logged = [json.loads(line)["lr"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    expected = [
        lr * t / warmup
        if t < warmup
        else lr * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (steps - warmup))))
        for t in range(steps)
    ]
    assert logged == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert min(logged[warmup:]) > ratio * lr * 0.999  # never below the floor


def test_bad_config_names_fail_with_close_matches():
    with pytest.raises(KeyError, match="Did you mean 'cosine'"):
        TrainConfig(schedule="cosin")
    with pytest.raises(KeyError, match="Did you mean 'bf16'"):
        TrainConfig(mixed_precision="bf61")
    with pytest.raises(ValueError, match="grad_accum must be >= 1"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="applies to the cosine schedule"):
        TrainConfig(schedule="linear", min_lr_ratio=0.1)


# Runs in a fresh process: accelerate fixes mixed precision and the process group once per process.
SCRIPT = """
import json, sys
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from common.training import TrainConfig, train

run_dir, kill_step, precision = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1))
g = torch.Generator().manual_seed(1)
x = torch.randn(32, 4, generator=g)
data = TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]))

def kill(step, logs):
    if step == kill_step:
        raise SystemExit(3)

cfg = TrainConfig(lr=3e-2, max_steps=30, schedule="constant", batch_size=3, grad_accum=2, log_every=1,
                  save_every=3, mixed_precision=precision)
result = train(model, lambda m, b: F.mse_loss(m(b[0]).squeeze(-1), b[1]), data, cfg, run_dir, callbacks=[kill])
print(json.dumps({"losses": result.losses, "plain_forward": model.forward.__func__ is nn.Sequential.forward}))
"""


def run_script(tmp_path, *args: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "ACCELERATE_USE_CPU": "1"}
    return subprocess.run(
        [sys.executable, *launcher, str(script), *args], env=env, capture_output=True, text=True, timeout=600
    )


def test_bf16_mixed_precision_trains_and_restores_forward(tmp_path):
    done = run_script(tmp_path, str(tmp_path / "run"), "0", "bf16")
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["losses"][-1][1] < 0.2 * out["losses"][0][1]
    assert out["plain_forward"]  # the autocast wrapper accelerate puts on forward is removed
    weights = load_tensors(tmp_path / "run" / "checkpoints" / "step_30" / "weights.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())  # master weights stay fp32


@pytest.mark.slow
def test_two_process_ddp_resumes_bitwise(tmp_path):
    torchrun = ("-m", "torch.distributed.run", "--nproc_per_node", "2")
    assert run_script(tmp_path, str(tmp_path / "a"), "0", "no", launcher=torchrun).returncode == 0
    killed = run_script(tmp_path, str(tmp_path / "b"), "7", "no", launcher=torchrun)
    assert killed.returncode != 0 and latest_checkpoint(tmp_path / "b").name == "step_6"
    assert run_script(tmp_path, str(tmp_path / "b"), "0", "no", launcher=torchrun).returncode == 0
    final = [load_tensors(tmp_path / run / "checkpoints" / "step_30" / "weights.safetensors") for run in "ab"]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    assert (tmp_path / "a" / "train_log.jsonl").read_text() == (
        tmp_path / "b" / "train_log.jsonl"
    ).read_text()


def test_runs_in_other_precisions_follow_each_other_in_one_process(tmp_path):
    """fp32 then bf16 then fp32 in one process (fp32 specialists, then a bf16 routed model): accelerate's
    process-wide state refused the second run; each run must get its own autocast (seen inside the
    model: accelerate casts the outputs back to fp32)."""
    seen = []

    class Record(nn.Module):
        def forward(self, x):
            seen.append(x.dtype)
            return x

    for i, precision in enumerate(("no", "bf16", "no")):
        model = mlp()
        model.insert(1, Record())  # after the first Linear
        train(model, mse, regression(), config(max_steps=1, mixed_precision=precision), tmp_path / str(i))
        assert seen[-1] == (torch.bfloat16 if precision == "bf16" else torch.float32)


def test_tensorboard_backend_holds_the_logged_losses_and_a_resume_replaces_redone_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(run_dir):
        acc = EventAccumulator(str(run_dir / "tensorboard"))
        acc.Reload()
        return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    evals = iter(range(100))
    cfg = config(max_steps=6, log_every=2, eval_every=3, save_every=3, log_backend="tensorboard")
    result = train(mlp(), mse, regression(), cfg, tmp_path, eval_fn=lambda m: {"acc": float(next(evals))})
    tb = scalars(tmp_path)
    assert {"train/loss", "train/lr", "eval/acc"} <= set(tb)
    assert [s for s, _ in tb["train/loss"]] == [2, 4, 6]
    for (step, value), (rstep, loss) in zip(tb["train/loss"], result.losses, strict=True):
        assert step == rstep and value == pytest.approx(loss, rel=1e-6)  # float32 in the event file
    assert tb["eval/acc"] == [(3, 0.0), (6, 1.0)]
    # resume from step 3 with more steps: the event files hold each step once, from the resumed run
    (tmp_path / "checkpoints" / "step_6").rename(tmp_path / "step_6_gone")
    (tmp_path / "checkpoints" / "latest.json").write_text(json.dumps({"step": 3, "path": "step_3"}))
    again = train(mlp(), mse, regression(), config(**{**cfg.__dict__, "max_steps": 8}), tmp_path)
    steps = [s for s, _ in scalars(tmp_path)["train/loss"]]
    assert steps == [2, 4, 6, 8] and [s for s, _ in again.losses] == [2, 4, 6, 8]


def test_tensorboard_backend_without_the_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    with pytest.raises(ImportError, match=r"pip install 'moerging\[tensorboard\]'"):
        train(mlp(), mse, regression(), config(max_steps=1, log_backend="tensorboard"), tmp_path)
    with pytest.raises(KeyError, match="tensorboard"):  # a typo names the choices
        config(log_backend="tensorbord")


def test_progress_bar_carries_the_label(tmp_path, capsys):
    train(mlp(), mse, regression(), config(max_steps=2), tmp_path, label="expert mnist")
    err = capsys.readouterr().err
    assert "expert mnist:" in err and "train:" not in err
