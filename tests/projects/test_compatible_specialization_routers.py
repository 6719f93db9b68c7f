"""Router training as the original's main.py: the routed model cast to bf16 and trained so, the routers of
the best held-out loss kept (evaluated at step 0 and every `eval_every` updates short of the last), resumable;
float32 with the last routers as the option. And evaluation that never rounds the evaluated model."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from projects.compatible_specialization.checkpoints import load_routed, save_routed, specialist_mlps
from projects.compatible_specialization.config import resolve
from projects.compatible_specialization.finetune import test_loss as loss_of
from projects.compatible_specialization.finetune import train_routers
from projects.compatible_specialization.mixture import routed_model, router_parameters
from tests.projects.test_compatible_specialization_mixture import _specialist

OPT = {"train_tokens": 24, "batch_size": 4, "grad_accum": 1, "lr": 0.5, "wd": 0.1, "schedule": "cosine",
       "min_lr_ratio": 0.1, "clip": 1.0, "keep": "best", "eval_every": 2}  # fmt: skip
STREAM = torch.randint(0, 50, (400,), generator=torch.Generator().manual_seed(5))
SELECT = torch.randint(0, 50, (6, 8), generator=torch.Generator().manual_seed(6))


def _gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def _routed(dtype=torch.bfloat16, seed=0):
    base = _gpt2(0)
    mlps = [specialist_mlps(_specialist(base, s)) for s in (1, 2)]
    torch.manual_seed(seed)
    return base, mlps, routed_model(base, mlps, top_k=2).to(dtype)


def _routers(model):
    return {k: v.detach().clone() for k, v in router_parameters(model).items()}


def test_bf16_routers_keep_the_best_evaluation_as_the_original(tmp_path):
    _, _, model = _routed()
    out = train_routers(model, STREAM, OPT, 8, tmp_path, 0, select_windows=SELECT, eval_batch_size=3)
    # 6 updates, evaluated before the first and after every 2nd; the original never evaluates after the last.
    assert [s for s, _ in out["evals"]] == [0, 2, 4]
    best_step, best_loss = min(out["evals"], key=lambda e: e[1])
    assert out["best_step"] == best_step
    assert loss_of(model, SELECT, 3, dtype=None) == best_loss  # the kept routers are the evaluated ones
    assert all(p.dtype == torch.bfloat16 for p in router_parameters(model).values())
    assert len({round(v, 6) for _, v in out["evals"]}) > 1  # the routers moved (the choice is not trivial)


@pytest.mark.parametrize("scripted", [[1.0, 2.0, 3.0], [3.0, 1.0, 1.0], [3.0, 2.0, 1.5]])
def test_the_kept_routers_are_those_of_the_lowest_evaluation(tmp_path, monkeypatch, scripted):
    # Scripted evaluation losses at steps 0, 2, 4: the routers kept are the ones evaluated at the first
    # minimum (step 0 = the initial routers when training only hurts), whatever training did after.
    from projects.compatible_specialization import finetune

    _, _, model = _routed()
    seen = []

    def scripted_loss(m, windows, batch_size, dtype="float32"):
        seen.append(_routers(m))
        return scripted[len(seen) - 1]

    monkeypatch.setattr(finetune, "test_loss", scripted_loss)
    out = train_routers(model, STREAM, OPT, 8, tmp_path, 0, select_windows=SELECT, eval_batch_size=3)
    first_min = scripted.index(min(scripted))
    assert out["evals"] == list(zip([0, 2, 4], scripted, strict=True))
    assert out["best_step"] == 2 * first_min
    assert all(torch.equal(v, seen[first_min][k]) for k, v in _routers(model).items())
    assert not all(torch.equal(v, seen[-1][k]) for k, v in seen[0].items())  # the routers did move


def test_a_finished_run_rerun_restores_the_same_best_routers(tmp_path):
    _, _, first = _routed()
    out = train_routers(first, STREAM, OPT, 8, tmp_path, 0, select_windows=SELECT, eval_batch_size=3)
    _, _, again = _routed(seed=99)  # other initial routers: only the saved selection can restore the best
    out2 = train_routers(again, STREAM, OPT, 8, tmp_path, 0, select_windows=SELECT, eval_batch_size=3)
    assert out2["best_step"] == out["best_step"] and out2["evals"] == out["evals"]
    assert all(torch.equal(v, _routers(first)[k]) for k, v in _routers(again).items())


def test_keep_last_in_float32_is_the_former_behaviour(tmp_path):
    _, _, model = _routed(torch.float32)
    opt = {**OPT, "keep": "last"}
    out = train_routers(model, STREAM, opt, 8, tmp_path, 0)
    assert out["evals"] == [] and out["best_step"] == 6
    assert all(p.dtype == torch.float32 for p in router_parameters(model).values())
    from common.io import load_tensors

    saved = load_tensors(tmp_path / "checkpoints" / "step_6" / "weights.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in _routers(model).items())  # the final routers


def test_bf16_routed_checkpoint_reloads_in_bf16_with_the_same_loss(tmp_path):
    base, mlps, model = _routed()
    save_routed(tmp_path / "r.safetensors", model, mlps, {"num_multi_layer_experts": 1})
    again = load_routed(tmp_path / "r.safetensors", base)
    assert next(again.parameters()).dtype == torch.bfloat16
    assert loss_of(again, SELECT, 3, dtype=None) == loss_of(model, SELECT, 3, dtype=None)
    assert loss_of(again, SELECT, 3) == loss_of(model, SELECT, 3)  # and upcast alike to float32


def test_evaluating_in_bf16_leaves_a_float32_model_unrounded():
    # The former test_loss cast the model to bf16 and back in place, rounding its float32 weights for good.
    model = _gpt2(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_bf16 = loss_of(model, SELECT, 3, dtype="bfloat16")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert next(model.parameters()).dtype == torch.float32
    assert loss_bf16 == pytest.approx(loss_of(model, SELECT, 3), rel=2e-2)  # bf16 close, not equal


def test_config_refuses_an_unknown_router_dtype_or_selection():
    with pytest.raises(ValueError, match=r"routing\.dtype is 'float16'.*bfloat16"):
        resolve("micro", None, ["routing.dtype=float16"], {})
    with pytest.raises(ValueError, match=r"routing\.keep is 'first'"):
        resolve("micro", None, ["routing.keep=first"], {})
