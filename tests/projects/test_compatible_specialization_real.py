"""The real arm (SmolLM2-135M, issue 18) is the same code path on a Llama-family model: gated gate/up/down
MLPs as the experts, `model.layers` as the blocks, the zoo's tasks as the domains. Checked on micro
Llama/Mistral models and the micro_real config (a random 4-layer micro Mistral) in seconds."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from projects.compatible_specialization.checkpoints import (
    configure,
    load_routed,
    save_routed,
    specialist_mlps,
)
from projects.compatible_specialization.cka import block_features
from projects.compatible_specialization.config import resolve
from projects.compatible_specialization.data import domain_texts
from projects.compatible_specialization.mixture import (
    RoutedMLP,
    decoder_blocks,
    interpolated_model,
    routed_model,
    set_alpha,
)
from tests.cli import REPO
from tests.projects.test_compatible_specialization_mixture import _specialist

MICRO_REAL = REPO / "projects" / "compatible_specialization" / "configs" / "micro_real.yaml"
IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))


def _llama(seed: int = 0, layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                         tie_word_embeddings=True, attn_implementation="eager")  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def trio():
    base = _llama()
    return base, _specialist(base, 1), _specialist(base, 2)


def test_the_gated_block_is_the_expert(trio):
    _, code, _ = trio
    mlps = specialist_mlps(code)
    assert len(mlps) == 4 and all(m is b.mlp for m, b in zip(mlps, code.model.layers, strict=True))
    assert {n.split(".")[0] for n, _ in mlps[0].named_parameters()} == {"gate_proj", "up_proj", "down_proj"}


def test_llama_interpolation_endpoints_are_the_models_and_the_middle_mixes_outputs(trio):
    base, code, math = trio
    model = interpolated_model(base, specialist_mlps(code), specialist_mlps(math))
    set_alpha(model, 1.0)
    assert torch.equal(model(IDS).logits, code(IDS).logits)
    set_alpha(model, 0.0)
    assert torch.equal(model(IDS).logits, math(IDS).logits)
    # α = 0.5 at one layer: the block's MLP output is the mean of the two gated MLPs' outputs.
    x = torch.randn(2, 7, 8)
    set_alpha(model, 0.5)
    mixed = decoder_blocks(model)[1].mlp(x)
    expected = 0.5 * code.model.layers[1].mlp(x) + 0.5 * math.model.layers[1].mlp(x)
    assert torch.allclose(mixed, expected, atol=1e-6)


def test_llama_top1_routing_gives_each_token_its_chosen_experts_output(trio):
    base, code, math = trio
    model = routed_model(base, [specialist_mlps(code), specialist_mlps(math)], top_k=1, renormalize=True)
    block = decoder_blocks(model)[0].mlp
    assert isinstance(block, RoutedMLP) and block.router.weight.shape == (2, 8)
    x = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(7))
    _, indices = block.routing(x)
    out = block(x)
    assert set(indices.unique().tolist()) == {0, 1}  # both experts are chosen somewhere
    for e, mlp in enumerate([code.model.layers[0].mlp, math.model.layers[0].mlp]):
        rows = indices[..., 0] == e
        assert torch.allclose(out[rows], mlp(x)[rows], atol=1e-6)


def test_llama_multi_layer_routing_and_checkpoint_round_trip(trio, tmp_path):
    base, code, math = trio
    mlps = [specialist_mlps(code), specialist_mlps(math)]
    model = routed_model(base, mlps, top_k=8, num_multi_layer_experts=4).to(torch.bfloat16)
    assert len(decoder_blocks(model)[3].mlp.experts) == 8
    # Layer 3 of 4 with L = 4 routes over layers 3, 2, 1, 0; expert j + c·N is model j's MLP of the c-th.
    experts = decoder_blocks(model)[3].mlp.experts
    assert experts[2] is code.model.layers[2].mlp and experts[7] is math.model.layers[0].mlp
    save_routed(tmp_path / "r.safetensors", model, mlps, {"num_multi_layer_experts": 4})
    again = load_routed(tmp_path / "r.safetensors", base)
    assert next(again.parameters()).dtype == torch.bfloat16
    assert torch.equal(again(IDS).logits, model(IDS).logits)


def test_llama_cka_features_are_the_block_output(trio):
    _, code, _ = trio
    feats = block_features(code, IDS, 1)
    hidden = code(IDS, output_hidden_states=True).hidden_states[2]  # after block 1 (entry 0: embeddings)
    assert torch.allclose(feats, hidden.mean(dim=1), atol=1e-6)


def test_gpt2_options_are_refused_on_a_llama_base():
    with pytest.raises(ValueError, match=r"apply to GPT-2, not 'llama'"):
        configure(_llama(), "gelu", False)


def test_zoo_domains_pool_the_tasks_and_the_target_never_shares_a_template_with_math_training():
    from common.zoo_tasks import task_splits

    data = resolve(None, str(MICRO_REAL), [], {})["data"]
    code, code_record = domain_texts(data, "code")
    package, name = (task_splits(t, {}) for t in ("code_package", "code_name"))
    assert code["train"][0] == f"{package['train'][0]['source']} {package['train'][0]['target']}"
    assert len(code["test"]) == len(package["test"]) + len(name["test"])
    assert code_record["tasks"] == ["code_package", "code_name"]
    math, _ = domain_texts(data, "math")
    target, target_record = domain_texts(data, "target")
    solutions = task_splits("gsm_solution", {})
    assert len(math["train"]) == len(solutions["train"]) and all(target.values())
    # The target's held-out problems come from templates whose GSM solution is held out as well.
    from common.data import gsm_hard
    from common.zoo_tasks import split_of

    train_templates = {r["group"] for r in solutions["train"]}
    rows = gsm_hard(n_per_template=1, seed=0)
    by_text = {f"{r['input']} {r['code']}": f"gsm{r['template_id']}" for r in rows}
    for split in ("validation", "test"):
        for text in target[split]:
            assert by_text[text] not in train_templates
            assert split_of(by_text[text]) == split
    assert target_record["sizes"]["train"] == len(target["train"])


def test_real_config_is_smollm2_mlp_only_with_the_original_router_choices():
    cfg = resolve("real", None, [], {})
    assert cfg["model"]["base"] == "real:smollm2-135m" and cfg["cka"]["layer"] == 15  # mid-depth of 30
    assert (cfg["data"]["code"], cfg["data"]["math"], cfg["data"]["target"]) == (
        "zoo_code",
        "zoo_math",
        "zoo_gsm_hard",
    )
    ft = cfg["finetune"]
    assert 0 < ft["early_step"] < ft["later_step"] <= ft["train_tokens"] // ft["batch_size"]
    assert cfg["routing"]["dtype"] == "bfloat16" and cfg["routing"]["keep"] == "best"


@pytest.mark.smoke
def test_real_path_finetune_command_then_eval_of_its_snapshot(tmp_path):
    # The real arm's fine-tuning command (`main.py --scale real --datasets zoo_code --train_mlp`) on the
    # micro_real config, then `--eval --chkpt` of its last snapshot: the same loss as the run printed.
    import re

    from tests.cli import run_cli

    main = ["-m", "projects.compatible_specialization.main", "--config", str(MICRO_REAL)]
    trained = run_cli([*main, "--datasets", "zoo_code", "--train_mlp", "--name", "code", "--out_dir", str(tmp_path)],
                      timeout=300)  # fmt: skip
    snap = tmp_path / "code" / "snapshots" / "step_6.safetensors"
    evaluated = run_cli([*main, "--datasets", "zoo_code", "--eval", "--chkpt", str(snap)], timeout=300)
    losses = [float(re.findall(r"Test loss:\s+([0-9.]+)", p.stdout)[-1]) for p in (trained, evaluated)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and losses[0] > 0


def test_dry_run_names_the_real_base_instead_of_failing_on_the_hub():
    from projects.compatible_specialization.main import main

    with pytest.raises(ValueError, match=r"'real:smollm2-135m' \(scale real\) is a local base"):
        main(["--scale", "real", "--dry_run"])


@pytest.mark.slow  # ~40 s each: SCALE=real table.sh on the micro_real config, two seeds, then the table
@pytest.mark.parametrize("split", ["0", "1"])  # SPLIT=1: each seed in two processes
def test_real_table_script_runs_every_experiment_and_writes_the_table(tmp_path, split):
    env = {**os.environ, "SCALE": "real", "SEEDS": "0 1", "CONFIG": str(MICRO_REAL), "OUT": str(tmp_path),
           "PY": sys.executable, "PYTHONPATH": str(REPO), "SPLIT": split}  # fmt: skip
    proc = subprocess.run(["bash", "projects/compatible_specialization/table.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "multi-layer routing L=4 (k=8)" in proc.stdout and "over 2 seeds" in proc.stdout
    for seed in (0, 1):
        for exp in ("specialists", "interpolation", "routing", "multi_layer", "cka"):
            assert (Path(tmp_path) / f"seed_{seed}" / exp / "results.json").exists()
        selection = Path(tmp_path) / f"seed_{seed}" / "routing_later" / "router_selection.json"
        assert selection.exists()  # the original's best-router selection ran on the real path
    for name in ("table.md", "activation.png", "multi_layer.png", "cka.png"):
        assert (tmp_path / name).exists()


def test_router_probe_trains_longer_routers_on_the_seeds_own_specialists(tmp_path):
    """The probe reuses the finished seed's specialists (no fine-tuning step runs), trains the k = 2 routers
    on `factor` times the tokens, and writes their test loss beside the seed's interpolation and 1x routers."""
    from common.io import read_json
    from projects.compatible_specialization import pipeline, router_probe

    cfg = resolve(None, str(MICRO_REAL), [], {"seed": 0})
    with pytest.raises(
        router_probe.UserError, match=r"lacks .*interpolation/results\.json.*pipeline --seed 0"
    ):
        router_probe.run_probe(cfg, 0, tmp_path, 3)
    pipeline.run_seed(cfg, 0, tmp_path)
    seed = tmp_path / "seed_0"
    trained = {p: p.stat().st_mtime_ns for p in seed.glob("finetune_*/**/*.safetensors")}
    metrics = router_probe.run_probe(cfg, 0, tmp_path, 3)
    assert trained and {p: p.stat().st_mtime_ns for p in seed.glob("finetune_*/**/*.safetensors")} == trained
    routing = read_json(seed / "routing" / "results.json")["metrics"]
    interp = read_json(seed / "interpolation" / "results.json")["metrics"]
    for stage in ("early", "later"):
        assert metrics[f"routed_{stage}_1x"] == routing[f"routed_{stage}"]
        assert metrics[f"interp_best_{stage}"] == interp[f"{stage}_best"]
        assert metrics[f"routed_{stage}"] > 0
        steps = [
            e[0] for e in read_json(seed / f"router_probe_x3_{stage}" / "router_selection.json")["evals"]
        ]
        one_x = [e[0] for e in read_json(seed / f"routing_{stage}" / "router_selection.json")["evals"]]
        assert (
            max(steps) > max(one_x) and metrics[f"best_step_{stage}"] in steps
        )  # 3x the steps, chosen alike
    written = read_json(seed / "router_probe_x3" / "results.json")
    assert written["experiment"] == "router_probe" and written["metrics"] == metrics
    assert written["config"]["routing"]["train_tokens"] == 3 * cfg["routing"]["train_tokens"]
    with pytest.raises(router_probe.UserError, match="--factor"):
        router_probe.probe_config(cfg, 0)


def test_a_rerun_seed_reuses_its_finished_experiments_and_redoes_only_the_rest(tmp_path, monkeypatch):
    """After a kill, `run_seed` again must not recompute a finished experiment (on the real arm each costs
    20-60 minutes): it returns the saved metrics; an experiment without results, or with results made under
    another config, is recomputed."""
    from common.io import read_json, write_json
    from projects.compatible_specialization import experiments, pipeline

    cfg = resolve(None, str(MICRO_REAL), [], {"seed": 0})
    first = pipeline.run_seed(cfg, 0, tmp_path)
    seed = tmp_path / "seed_0"
    written = {p: p.stat().st_mtime_ns for p in seed.glob("*/results.json")}

    def refuse(*args, **kwargs):
        raise AssertionError("a finished experiment was recomputed")

    for name in ("evaluate", "interpolation_sweep", "cka_curve"):
        monkeypatch.setattr(experiments, name, refuse)
    assert pipeline.run_seed(cfg, 0, tmp_path) == first
    assert {p: p.stat().st_mtime_ns for p in seed.glob("*/results.json")} == written
    # A finished seed whose training folders are gone (results shipped without their snapshots) is read,
    # not retrained: no model is loaded at all.
    shipped = tmp_path / "shipped"
    for done in seed.glob("*/results.json"):
        (shipped / "seed_0" / done.parent.name).mkdir(parents=True)
        shutil.copy(done, shipped / "seed_0" / done.parent.name / "results.json")
    monkeypatch.setattr(pipeline, "load_base", refuse)
    assert pipeline.run_seed(cfg, 0, shipped) == first
    monkeypatch.undo()

    (seed / "multi_layer" / "results.json").unlink()  # killed during multi-layer routing
    stale = read_json(seed / "cka" / "results.json")
    write_json(seed / "cka" / "results.json", {**stale, "config": {**stale["config"], "seed": 99}})
    calls = []
    real_sweep, real_cka = experiments.interpolation_sweep, experiments.cka_curve
    monkeypatch.setattr(
        experiments, "interpolation_sweep", lambda *a, **k: calls.append("interp") or real_sweep(*a, **k)
    )
    monkeypatch.setattr(experiments, "cka_curve", lambda *a, **k: calls.append("cka") or real_cka(*a, **k))
    again = pipeline.run_seed(cfg, 0, tmp_path)
    assert calls == ["cka"]  # interpolation reused; multi-layer has no sweep; CKA recomputed (other config)
    assert again["multi_layer"] == first["multi_layer"]  # routers resumed from their finished checkpoints
    assert again["cka"] == first["cka"] and read_json(seed / "cka" / "results.json")["config"]["seed"] == 0


def test_experiments_split_across_processes_give_the_one_process_numbers(tmp_path, monkeypatch):
    """`--experiments`: the evaluations in one command and the router training in another (on the real arm,
    two cores) write the results one `run_seed` writes, byte for byte in the metrics; routing alone, with no
    interpolation finished or being computed, is refused with what to run."""
    from common.io import read_json
    from projects.compatible_specialization import pipeline

    cfg = resolve(None, str(MICRO_REAL), [], {"seed": 0})
    whole = pipeline.run_seed(cfg, 0, tmp_path / "one")

    split = tmp_path / "two"
    monkeypatch.setattr(pipeline, "WAIT_POLL_S", 0.01)  # no process works on the seed: refused, not waited
    with pytest.raises(pipeline.UserError, match=r"run interpolation first.*--experiments interpolation"):
        pipeline.run_seed(cfg, 0, split, ("routing",))
    assert not (split / "seed_0" / "routing" / "results.json").exists()
    evals = pipeline.run_seed(cfg, 0, split, pipeline.parse_experiments("cka,interpolation"))
    assert list(evals) == ["interpolation", "cka"]  # the pipeline's order, whatever the flag's
    assert not (split / "seed_0" / "specialists" / "results.json").exists()
    routed = pipeline.run_seed(cfg, 0, split, pipeline.parse_experiments("routing,multi_layer"))
    pipeline.run_seed(cfg, 0, split, ("specialists",))
    assert {**evals, **routed} == {k: whole[k] for k in ("interpolation", "cka", "routing", "multi_layer")}
    for name in pipeline.EXPERIMENTS:
        saved = [
            read_json(d / "seed_0" / name / "results.json")["metrics"] for d in (tmp_path / "one", split)
        ]
        assert saved[0] == saved[1] and list(saved[0]) == list(saved[1]), name  # same keys, same order
    with pytest.raises(pipeline.UserError, match="unknown"):
        pipeline.parse_experiments("routing,interp")


def test_training_lock_makes_a_second_process_wait_and_run_dir_busy_sees_it(tmp_path):
    """A process training into a folder holds its lock: another process asking for the same folder waits
    until it is released (then resumes what was written), and `run_dir_busy` reports the holder."""
    from common.rundir import run_dir_busy, training_lock

    run = tmp_path / "routers"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from common.rundir import training_lock\n"
         f"with training_lock({str(run)!r}):\n    print('held', flush=True); time.sleep(3)\n"
         "    open(sys.argv[1], 'w').write('trained')",
         str(tmp_path / "done")],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    assert run_dir_busy(run)
    with training_lock(run):
        assert (tmp_path / "done").read_text() == "trained"  # entered only after the holder finished
        assert not run_dir_busy(run)  # this process's own lock is not "another process"
    holder.wait(timeout=30)
    assert not run_dir_busy(run) and not run_dir_busy(tmp_path / "never_made")
    with training_lock(run), training_lock(run):  # re-entered in one process: no wait (a deadlock hangs)
        assert run.joinpath(".lock").read_text() == str(os.getpid())
