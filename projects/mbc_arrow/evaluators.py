"""In-distribution Rouge-L on greedy generations; held-out tasks through lm-eval (ours offline, or the
paper's zero-shot table by lm-eval task name).

Rouge-L (mttl `RougeEvaluator`): greedy decoding up to `max_output_length` tokens, stopped at EOS only as
mttl (`stop_at_newline=True` also stops at a newline, as ours before), ROUGE-L F
with stemming per example, mean over examples, ×100. Generation runs task by task so the oracle
(task_name) selector knows each example's task; the score is the mean over all examples.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from datasets import Dataset

from common.evaluation import generate, rouge_l
from common.evaluation import pad_id as pad_token
from common.lm_eval_bridge import evaluate_in_memory
from projects.mbc_arrow.expert_model import MultiExpertModel
from projects.mbc_arrow.tasks import (
    HELDOUT_TASK,
    downstream_task,
    downstream_tasks,
    prompt_and_answer,
    write_heldout_task,
)


def rouge_evaluate(
    model: MultiExpertModel,
    data: Dataset,
    *,
    max_output_length: int,
    batch_size: int = 16,
    prompt_format: str = "mttl",
    stop_at_newline: bool = False,
) -> dict[str, Any]:
    """{"rougeL": mean ×100, "per_task": {task: rougeL}} over `data` (task, source, target)."""
    per_task, total, count = {}, 0.0, 0
    for task in sorted(set(data["task"])):
        part = data.filter(lambda t, task=task: t == task, input_columns="task")
        prompts = [prompt_and_answer(s, "", prompt_format)[0] for s in part["source"]]
        with model.routing(task_names=[task]):
            preds = generate(
                model.model,
                model.tokenizer,
                prompts,
                max_output_length,
                batch_size=batch_size,
                stop=["\n"] if stop_at_newline else [],
            )
        score = 100 * rouge_l(preds, part["target"])
        per_task[task] = score
        total, count = total + score * len(part), count + len(part)
    return {"rougeL": total / count, "per_task": per_task}


def target_loss(
    model: MultiExpertModel,
    data: Dataset,
    *,
    max_input_length: int,
    max_output_length: int,
    prompt_format: str = "mttl",
) -> dict[str, Any]:
    """Mean per-token loss of the reference targets (teacher forcing), overall and per task: a graded
    in-distribution measure beside Rouge-L, which gives no credit for a misspelt one-word label."""
    from projects.mbc_arrow.train_expert import encode_example, mean_loss

    tok = model.tokenizer
    pad_id = pad_token(tok)
    per_task, total, count = {}, 0.0, 0
    for task in sorted(set(data["task"])):
        part = data.filter(lambda t, task=task: t == task, input_columns="task")
        examples = [
            encode_example(tok, s, t, max_input_length, max_output_length, prompt_format)
            for s, t in zip(part["source"], part["target"])
        ]
        with model.routing(task_names=[task]):
            per_task[task] = mean_loss(model.model, examples, pad_id)
        total, count = total + per_task[task] * len(part), count + len(part)
    return {"loss": total / count, "per_task": per_task}


def downstream_evaluate(
    model: Any, tokenizer: Any, heldout: Dataset, *, batch_size: int = 16
) -> Mapping[str, float]:
    """Accuracy of an in-memory model on the held-out multiple-choice task (lm-eval, local task file)."""
    with tempfile.TemporaryDirectory() as tmp:
        task = write_heldout_task(tmp, heldout)
        metrics = evaluate_in_memory(model, tokenizer, [task], batch_size=batch_size)
    return metrics[task["task"]]


# The score reported per lm-eval task: accuracy for multiple choice, pass@1 for code, exact match for BBH.
HEADLINE_METRICS = ("acc", "pass@1", "pass_at_1", "exact_match")


def headline(metrics: Mapping[str, Any]) -> float:
    """The first of `HEADLINE_METRICS` that an lm-eval result has (a group's is its aggregate)."""
    for key in HEADLINE_METRICS:
        if isinstance(metrics.get(key), (int, float)):
            return float(metrics[key])
    raise KeyError(f"none of {HEADLINE_METRICS} in lm-eval's metrics {sorted(metrics)}")


def zero_shot_evaluate(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    batch_size: int = 16,
    limit: int | float | None = None,
    allow_code_execution: bool = False,
) -> dict[str, float]:
    """{task: score, "average": mean} on lm-eval's built-in tasks (the paper's zero-shot table), in memory."""
    if allow_code_execution:
        os.environ.setdefault("HF_ALLOW_CODE_EVAL", "1")  # lm-eval's code_eval metric asks for it
    metrics = evaluate_in_memory(
        model,
        tokenizer,
        list(tasks),
        batch_size=batch_size,
        limit=limit,
        builtin_tasks=True,
        confirm_run_unsafe_code=allow_code_execution,
    )
    scores = {task: headline(metrics[task]) for task in tasks}
    return scores | {"average": sum(scores.values()) / len(scores)}


def downstream_scores(
    model: Any, tokenizer: Any, cfg: Mapping[str, Any], heldout: Dataset | None = None
) -> dict[str, float]:
    """{task: score}: our offline held-out task's accuracy (`heldout`), or the lm-eval tasks the config names."""
    names = downstream_tasks(cfg)
    if names == [HELDOUT_TASK]:
        data = heldout if heldout is not None else downstream_task(HELDOUT_TASK, cfg["heldout_examples"])
        return {HELDOUT_TASK: downstream_evaluate(model, tokenizer, data)["acc"]}
    return zero_shot_evaluate(
        model,
        tokenizer,
        names,
        batch_size=cfg["predict_batch_size"],
        limit=cfg.get("downstream_limit"),
        allow_code_execution=bool(cfg.get("allow_code_execution")),
    )
