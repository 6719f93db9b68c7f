"""Smoke tests: each command of the original README, through our CLI, on the micro config.

A module fixture builds the micro experts, gates and libraries in process (as `pipeline.build_library`
does); each test then runs one command as a user would, in a subprocess under a hard timeout.
"""

from __future__ import annotations

import json

import gin
import pytest

from projects.phatgoose import configurables as C
from projects.phatgoose import procedures as P
from projects.phatgoose.pipeline import build_library
from tests.cli import run_cli

pytestmark = pytest.mark.smoke
MICRO = str(C.CONFIGS / "micro.gin")
EXPERTS = ["TWEET_SENTIMENT_AIRLINE", "CHAMP_CATEGORY"]
HELDOUT = '["D/TWEET_SENTIMENT_COACHELLA/EVAL", "D/TWEET_TOPIC_UNSEEN/EVAL"]'
TIMEOUT = 180


@pytest.fixture(scope="module")
def exp_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("phatgoose") / "exp_out"
    C.parse([MICRO], [f'main.exp_out="{out}"'])
    build_library(0, EXPERTS)
    gin.clear_config()
    return out


def cli(exp_out, command, *args):
    return run_cli(
        [
            "-m",
            "projects.phatgoose.main",
            command,
            "--gin_files",
            MICRO,
            "--gin_bindings",
            f'main.exp_out="{exp_out}"',
            *args,
        ],
        timeout=TIMEOUT,
    )


def test_train_single_task_loralinear(exp_out):
    cli(
        exp_out,
        "train_single_task_loralinear",
        "-exp_name",
        "P3Socialiqa_t5xl_lora",
        "-dataset",
        "TWEET_SENTIMENT_APPLE",
        "-extra_bindings",
        "MOMA/save_weights.should_save_to_gcp=False P/TRAIN/Trainer.gradient_accumulation_factor=2 "
        "P/TRAIN/Trainer.validation_step_interval=1",
    )
    assert (exp_out / "P3Socialiqa_t5xl_lora/checkpoint/adapter_model.safetensors").is_file()
    assert json.loads((exp_out / "P3Socialiqa_t5xl_lora/results.json").read_text())["provenance"]["git_sha"]
    # validated at every step on its own validation split (rank classification), best step kept
    log = [
        json.loads(x)
        for x in (exp_out / "P3Socialiqa_t5xl_lora/training/train_log.jsonl").read_text().splitlines()
    ]
    evals = {e["step"]: e["eval"]["accuracy"] for e in log if "eval" in e}
    assert sorted(evals) == [1, 2] and all(0 <= a <= 1 for a in evals.values())
    meta = json.loads((exp_out / "P3Socialiqa_t5xl_lora/checkpoint/extras.json").read_text())
    assert int(meta["best_step"]) == max(evals, key=lambda s: (evals[s], -s))


def test_put_index_to_lora(exp_out):
    cli(
        exp_out,
        "manipulations",
        'put_index_to_lora.path="TWEET_SENTIMENT_AIRLINE_t5_lora"',
        'put_index_to_lora.out_path="datasets_concatenated/smoke_put_index"',
        "func_caller.func=@put_index_to_lora",
    )
    assert (exp_out / "datasets_concatenated/smoke_put_index/checkpoint/extras.safetensors").is_file()


def test_train_gate_and_use_as_router(exp_out):
    cli(
        exp_out,
        "train_gate",
        "-exp_name",
        "datasets_concatenated/smoke_gate",
        "-dataset",
        "TWEET_SENTIMENT_AIRLINE",
        "-old_exp_name",
        "datasets_concatenated/TWEET_SENTIMENT_AIRLINE_t5_lora",
        "-extra_bindings",
        "main.logging_backend=None P/TRAIN/Trainer.gradient_accumulation_factor=2",
    )
    cli(
        exp_out,
        "manipulations",
        'use_input_gate_as_router.path="datasets_concatenated/smoke_gate"',
        "func_caller.func=@use_input_gate_as_router",
    )
    meta = json.loads((exp_out / "datasets_concatenated/smoke_gate/checkpoint/extras.json").read_text())
    assert meta["stage"] == "router"


def test_concatenate(exp_out):
    cli(
        exp_out,
        "concatenate",
        "run_concatenate.print_commands=False",
        'run_concatenate.out_path="FullCompleteA2inpgatetrainnogumbel_smoke"',
        "func_caller.func=@run_concatenate",
        'run_concatenate.suffix="t5_lora_inpgatetrainnogumbel"',
        'run_concatenate.datasets="Full"',
    )
    index = json.loads(
        (exp_out / "FullCompleteA2inpgatetrainnogumbel_smoke/checkpoint/library.json").read_text()
    )
    assert [e["name"] for e in index["experts"]] == EXPERTS


def test_eval_phatgoose(exp_out, tmp_path):
    cli(
        exp_out,
        "eval_multitask",
        "-exp_name",
        "FullCompleteA2inpgatetrainnogumbel_t5_lora_concatenated",
        "-extra_bindings",
        f"P/EVALUATE/Evaluator.datasets={HELDOUT} M/MODEL/FFNExperts.topk_value=2 "
        "M/MODEL/FFNExperts.normalize_topk=True M/MODEL/ENCODER/ExposeHidden.reduction_method=None "
        "M/MODEL/DECODER/ExposeHidden.reduction_method=None "
        "P/EVALUATE/Evaluator.analysis_processors=[@WriteOutputText(), @RoutingDistribution()] "
        f'WriteOutputText.save_dir="{tmp_path}/output_text" RoutingDistribution.save_dir="{tmp_path}/routing"',
    )
    assert (tmp_path / "routing/TWEET_SENTIMENT_COACHELLA.png").is_file()
    assert (tmp_path / "output_text/TWEET_TOPIC_UNSEEN.jsonl").is_file()
    res = json.loads(
        (exp_out / "FullCompleteA2inpgatetrainnogumbel_t5_lora_concatenated/eval/results.json").read_text()
    )
    assert 0 <= res["metrics"]["mean_accuracy"] <= 1


@pytest.mark.slow
def test_average_activation_concatenate(exp_out):
    cli(
        exp_out,
        "concatenate",
        "run_concatenate.print_commands=True",
        'run_concatenate.out_path="FullCompleteA2_smoke"',
        "func_caller.func=@run_concatenate",
        'run_concatenate.suffix="t5_lora"',
        "run_concatenate.compute_hiddens=True",
        'run_concatenate.extra_bindings="M/MODEL/ENCODER/ExposeHidden.reduction_method=\\"masked_mean\\" '
        'M/MODEL/DECODER/ExposeHidden.reduction_method=\\"mean\\""',
        'run_concatenate.datasets="Full"',
    )
    assert P  # the keys are checked numerically in test_phatgoose_baselines
    assert (exp_out / "FullCompleteA2_smoke/checkpoint/library.json").is_file()


@pytest.mark.slow
def test_retriever_commands(exp_out):
    cli(exp_out, "retriever", "-make_expert_library", "True", "-dataset_setting", "Full")
    cli(exp_out, "retriever", "-create_checkpoint", "True", "-dataset_setting", "All")
    cli(
        exp_out,
        "retriever",
        "-dataset_setting",
        "All",
        "-extra_bindings",
        f'main.procedure_exec_order=["P/EVALUATE/BBH"] P/EVALUATE/BBH/Evaluator.datasets={HELDOUT}',
    )
    res = json.loads((exp_out / "AllCompleteansretrieval_t5_lora_concatenated/eval/results.json").read_text())
    assert "retrieved" in res["metrics"]["TWEET_SENTIMENT_COACHELLA"]


@pytest.mark.slow
def test_merged_experts(exp_out):
    cli(
        exp_out,
        "manipulations",
        'average_outer_product_lora_weights.path="FullCompleteA2_t5_lora_concatenated"',
        'average_outer_product_lora_weights.out_path="FullParameteravg_smoke"',
        "func_caller.func=@average_outer_product_lora_weights",
    )
    cli(
        exp_out,
        "eval_multitask",
        "-exp_name",
        "FullParameteravg_smoke",
        "-extra_bindings",
        f"P/EVALUATE/Evaluator.datasets={HELDOUT}",
    )


@pytest.mark.slow
def test_multitask_train_and_plain_model_eval(exp_out):
    cli(exp_out, "train_multitask", "-exp_name", "multitask_smoke")
    cli(exp_out, "eval_multitask", "-exp_name", "multitask_smoke")
    cli(
        exp_out,
        "eval_multitask",
        "-exp_name",
        "flan_t5_xl",
        "-extra_bindings",
        "M/MODEL/Model.init_moma_calls=[]",
    )


@pytest.mark.slow
def test_single_expert_eval(exp_out):
    cli(
        exp_out,
        "eval_multitask",
        "-exp_name",
        "datasets_concatenated/CHAMP_CATEGORY_t5_lora",
        "-extra_bindings",
        'M/MODEL/ENCODER/ExposeHidden.reduction_method="masked_mean" M/MODEL/DECODER/ExposeHidden.reduction_method="mean"',
    )


@pytest.mark.slow
def test_table_pipeline(tmp_path):
    run_cli(
        [
            "-m",
            "projects.phatgoose.main",
            "table",
            "--gin_files",
            MICRO,
            "--gin_bindings",
            f'main.exp_out="{tmp_path}/exp_out"',
            "-seed",
            "1",
        ],
        timeout=600,
    )
    res = json.loads((tmp_path / "seed_1/results.json").read_text())
    assert set(res["metrics"]) >= {
        "phatgoose",
        "retrieval",
        "average_activation",
        "merged_experts",
        "multitask",
        "best_single_expert",
    }
    # the best individual: per task and metric the expert best on VALIDATION, read on test; only the
    # picked experts are evaluated on test, each on the tasks it was picked for
    single = json.loads((tmp_path / "seed_1/single_experts.json").read_text())
    choice, best = res["best_single_expert_choice"], res["metrics"]["best_single_expert"]
    picked: dict[str, set[str]] = {}
    for metric, key in (("accuracy", "{h}"), ("balanced_accuracy", "{h}/balanced")):
        for h, d in choice[metric].items():
            assert single["validation"][d][h][metric] == max(
                v[h][metric] for v in single["validation"].values()
            )
            assert best[key.format(h=h)] == single["test"][d][h][metric]
            picked.setdefault(d, set()).add(h)
    assert {d: set(v) - {"mean_accuracy"} for d, v in single["test"].items()} == picked


def test_unsupported_binding_is_a_clear_cli_error(exp_out):
    with pytest.raises(AssertionError, match="unsupported gin binding"):
        cli(exp_out, "eval_multitask", "-exp_name", "x", "-extra_bindings", "M/MODEL/make_moe.foo=1")


def test_routing_probe_needs_the_language_id_experts_and_a_library(exp_out, tmp_path):
    from projects.phatgoose import routing_probe

    with pytest.raises(ValueError, match="lacks"):
        routing_probe.probe(exp_out, "micro:t5", "FullCompleteA2inpgatetrainnogumbel_t5_lora_concatenated")
    with pytest.raises(FileNotFoundError, match="no PHATGOOSE or Average Activation library"):
        routing_probe.main([str(tmp_path)])
