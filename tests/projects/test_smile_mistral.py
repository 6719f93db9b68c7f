"""SmileMistral / SmileLlama: built by swapping layers, registered with the Auto classes, round-tripped
through save_pretrained / from_pretrained, and evaluated with lm-eval offline."""

import copy
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from common.lm_eval_bridge import write_task_yaml
from common.models import build_meta, count_parameters, load_model, micro_model
from common.tiny_world import tiny_base
from projects.smile.mistral import TARGETS, SmileMistralConfig, smile_layers, upscale_causal_lm
from projects.smile.upscale import added_parameters
from tests.cli import run_cli


def _experts(base, n=2, scale=0.05, only=None):
    out = []
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "layers" in name and "norm" not in name and (only is None or only in name):
                    p.add_(scale * torch.randn(p.shape, generator=g))
        out.append(m)
    return out


@pytest.mark.parametrize("family", ["mistral", "llama"])
def test_round_trip_through_auto_classes(family, tmp_path):
    base = micro_model(family, seed=0)
    fts = _experts(base)
    model, info = upscale_causal_lm(base, {"a": fts[0], "b": fts[1]}, rank_of_router=2, rank_of_expert=4)
    assert type(model).__name__ == f"Smile{family.capitalize()}ForCausalLM"
    assert len(smile_layers(model)) == 7 * base.config.num_hidden_layers and not info["skipped"]
    layers = [(m.in_features, m.out_features, m.pretrained.bias is not None) for m in smile_layers(model)]
    assert count_parameters(model) - count_parameters(base) == added_parameters(layers, 2, 2, 4)
    x = torch.randint(0, base.config.vocab_size, (2, 9))
    logits = model(x).logits
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == f"smile_{family}"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded) is type(model)
    torch.testing.assert_close(reloaded(x).logits, logits, rtol=0, atol=0)


def test_single_dense_expert_equals_the_finetuned_model_and_inputs_unchanged():
    base = micro_model("mistral", seed=0)
    (ft,) = _experts(base, 1)
    state = copy.deepcopy(ft.state_dict())
    model, _ = upscale_causal_lm(base, {"a": ft}, rank_of_router=2, rank_of_expert=-1)
    x = torch.randint(0, base.config.vocab_size, (2, 9))
    torch.testing.assert_close(model(x).logits, ft(x).logits, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(v, state[k]) for k, v in ft.state_dict().items())


def test_layers_without_deltas_become_zero_experts_with_pretrained_output():
    base = micro_model("mistral", seed=0)
    fts = _experts(base, 2, only="q_proj")  # every other projection is unchanged
    model, info = upscale_causal_lm(base, {"a": fts[0], "b": fts[1]}, rank_of_router=2, rank_of_expert=2)
    assert all(name.endswith("q_proj") for name in info["upscaled"]) and info["skipped"]
    x = torch.randint(0, base.config.vocab_size, (1, 5))
    h = model.model.embed_tokens(x)
    layer = model.model.layers[0].mlp.up_proj
    torch.testing.assert_close(layer(h), base.model.layers[0].mlp.up_proj(h))


def test_paper_mistral_parameter_count_on_meta():
    base = build_meta("mistralai/Mistral-7B-v0.1")
    layers = [
        (m.in_features, m.out_features, False)
        for n, m in base.named_modules()
        if n.rpartition(".")[2] in TARGETS
    ]
    total = count_parameters(base) + added_parameters(layers, 3, 8, 8)
    assert round(total / 1e9, 2) == 7.33  # the paper's M0;123 at k=8
    config = SmileMistralConfig(
        **{
            **base.config.to_dict(),
            "num_local_experts": 3,
            "rank_of_router": 8,
            "rank_of_expert": 8,
            "model_type": "smile_mistral",
        }
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert count_parameters(model) == total


@pytest.fixture(scope="module")
def mistral_pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("smile_mistral")
    base_dir = tiny_base("mistral", "micro")
    base = load_model(base_dir)
    for i, ft in enumerate(_experts(base, 2), 1):
        ft.save_pretrained(root / f"expert_{i}")
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(root / f"expert_{i}")
    return root


def _task(tmp_path):
    rows = [{"q": f"{a} plus {a} is", "choices": [f" {2 * a}", f" {a}"], "label": 0} for a in range(6)]
    data = tmp_path / "arith.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    write_task_yaml(
        tmp_path / "tasks",
        "arith_mc",
        data,
        "multiple_choice",
        doc_to_text="{{q}}",
        doc_to_target="label",
        doc_to_choice="{{choices}}",
    )
    return tmp_path / "tasks"


@pytest.mark.smoke
def test_mistral_upscaling_cli_then_lm_eval_offline(mistral_pool, tmp_path):
    out = tmp_path / "gate_k-2_k-4"
    run_cli(
        [
            "-m",
            "projects.smile.main",
            "method=smile_upscaling/smile_mistral_upscaling",
            "method.rank_of_router=2",
            "method.rank_of_expert=4",
            f"method.model_path={out}",
            "modelpool=AutoModelForCausalLMPool/micro_mistral",
            f"modelpool.expert_root={mistral_pool}",
            "modelpool.dtype=float32",
            "taskpool=dummy",
            f"report_save_path={out}/model_info.json",
        ],
        timeout=180,
    )
    assert json.loads((out / "model_info.json").read_text())["model_info"]["added_params"] > 0
    tasks = _task(tmp_path)
    from projects.smile.lm_eval_smile import evaluate

    metrics = evaluate(out, ["arith_mc"], include_path=tasks, batch_size=2)
    assert 0.0 <= metrics["arith_mc"]["acc"] <= 1.0
    # a fresh process: the entrypoint registers the classes, then runs lm-eval's own CLI
    proc = run_cli(
        [
            "-m",
            "projects.smile.lm_eval_smile",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={out}",
            "--tasks",
            "arith_mc",
            "--include_path",
            str(tasks),
            "--batch_size",
            "2",
            "--output_path",
            str(tmp_path / "lm_eval"),
        ],
        timeout=180,
    )
    assert "arith_mc" in proc.stdout


@pytest.mark.smoke
def test_lm_experts_and_lm_eval_task_pool(tmp_path):
    experts = tmp_path / "lm_experts"
    run_cli(
        [
            "-m",
            "projects.smile.finetune_lm",
            "--config",
            "projects/smile/configs/micro_finetune_lm.yaml",
            f"out={experts}",
        ],
        timeout=240,
    )
    report = tmp_path / "smile_both_k4" / "report.json"
    run_cli(
        [
            "-m",
            "projects.smile.main",
            "method=smile_upscaling/smile_mistral_upscaling",
            "method.rank_of_router=2",
            "method.rank_of_expert=4",
            "modelpool=tiny_mistral",
            "modelpool.models.0.path=micro:mistral",
            f"modelpool.expert_root={experts}",
            "taskpool=LMEvalTaskPool/micro_lm_domains",
            f"report_save_path={report}",
        ],
        timeout=240,
    )
    metrics = json.loads(report.read_text())
    assert set(metrics) == {"model_info", "math", "code", "average"} and metrics["math"]["bits_per_byte"] > 0
    assert metrics["model_info"]["smile"]["experts"] == ["math", "code"]


def test_line_chunks_cut_at_line_breaks_and_rejoin():
    from projects.smile.pools import line_chunks

    text = "a = 1\nbb = 22\n\n" + "x" * 25 + "\nlast\n"
    pieces = line_chunks(text, 10)
    assert all(len(p) <= 10 for p in pieces)
    assert "".join(pieces) == text
    assert pieces[:2] == ["a = 1\n", "bb = 22\n\n"]  # "a = 1\nbb = 22\n" is 14 > 10 characters
    assert pieces[2:5] == ["x" * 10, "x" * 10, "x" * 5 + "\n"]  # a long line is cut inside
    assert line_chunks("x\n" + " " * 20, 10) == ["x\n"]  # whitespace-only pieces are dropped


def test_evenly_spread_takes_spaced_items():
    from projects.smile.pools import evenly_spread

    assert evenly_spread(list(range(10)), 4) == [0, 2, 5, 7]
    assert evenly_spread(list(range(3)), 4) == [0, 1, 2] and evenly_spread(list(range(3)), None) == [0, 1, 2]


@pytest.mark.smoke
def test_lora_lm_experts_merge_in_the_pool_and_score(tmp_path):
    """finetune_lm method=lora saves PEFT adapters; a pool with adapters: true merges each into the base
    as peft's merge_and_unload does; the SmolLM2 arm's commands run on the micro Mistral."""
    from peft import PeftModel

    from projects.smile.pools import load_modelpool

    experts = tmp_path / "lora_experts"
    config = "projects/smile/configs/micro_finetune_lm.yaml"
    run_cli(
        ["-m", "projects.smile.finetune_lm", "--config", config, "method=lora", f"out={experts}"], timeout=240
    )
    assert (experts / "math" / "adapter_config.json").is_file() and not (
        experts / "math" / "config.json"
    ).exists()
    # the folder's experts are reused only under the same config
    with pytest.raises(AssertionError, match="another config"):
        run_cli(["-m", "projects.smile.finetune_lm", "--config", config, "method=full", f"out={experts}"])
    pool = {
        "type": "AutoModelForCausalLMPool",
        "models": [
            {"name": "_pretrained_", "path": "micro:mistral"},
            {"name": "math", "path": str(experts / "math")},
        ],
        "adapters": True,
    }
    pretrained, models = load_modelpool(pool)
    reference = PeftModel.from_pretrained(load_model(tiny_base("mistral", "micro")), experts / "math")
    reference = reference.merge_and_unload()
    ids = torch.randint(0, pretrained.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.allclose(models["math"](ids).logits, reference(ids).logits, atol=1e-5)
        assert not torch.allclose(models["math"](ids).logits, pretrained(ids).logits, atol=1e-5)
    report = tmp_path / "M_math" / "report.json"
    run_cli(
        [
            "-m",
            "projects.smile.main",
            "method=task_arithmetic",
            "method.scaling_factor=1.0",
            "modelpool=AutoModelForCausalLMPool/smollm2_lora",
            f"modelpool.models=[{{name: _pretrained_, path: 'micro:mistral'}}, {{name: math, path: '{experts}/math'}}]",
            "taskpool=LMEvalTaskPool/smollm2_domains",
            "taskpool.tokenizer=micro:mistral",
            *(f"taskpool.tasks.{d}.limit=4" for d in ("math", "code", "general")),
            f"report_save_path={report}",
        ],
        timeout=240,
    )
    metrics = json.loads(report.read_text())
    assert all(metrics[d]["bits_per_byte"] > 0 for d in ("math", "code", "general"))


def test_routing_by_domain_counts_every_layer_and_follows_the_gates():
    from projects.smile.routing import own_expert_share, routing_by_domain

    base = load_model(tiny_base("mistral", "micro"))  # with its tokenizer
    fts = _experts(base, 2)
    model, _ = upscale_causal_lm(base, {"a": fts[0], "b": fts[1]}, rank_of_router=2, rank_of_expert=2)
    tok = AutoTokenizer.from_pretrained(tiny_base("mistral", "micro"))
    texts = {"a": ["x = 1\nprint(x)", "def f():\n    return 2"], "b": ["Tom has 3 apples."]}
    n_layers = len(smile_layers(model))
    r = routing_by_domain(model, tok, texts)
    for domain, found in r.items():
        n_tok = sum(len(tok(t)["input_ids"]) for t in texts[domain])
        assert found["tokens"] == n_tok and found["decisions"] == n_tok * n_layers
        assert sum(found["all"]) == pytest.approx(1.0)
        assert all(sum(v) == pytest.approx(1.0) for v in found["by_kind"].values())
        assert set(found["by_kind"]) == set(TARGETS)
    # a router with expert a's singular vectors zeroed scores it 0 < ‖V_bᵀx‖: every token goes to b
    for layer in smile_layers(model):
        layer.gate.weight.data[: layer.gate_k] = 0
    r = routing_by_domain(model, tok, texts)
    assert all(found["all"] == [0.0, 1.0] for found in r.values())
    assert own_expert_share(r, ["a", "b"]) == {"a": 0.0, "b": 1.0}
    with pytest.raises(ValueError, match="SMILE layers"):
        routing_by_domain(base, tok, texts)
