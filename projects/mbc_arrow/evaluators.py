"""In-distribution Rouge-L on greedy generations and held-out multiple choice through lm-eval.

Rouge-L (mttl `RougeEvaluator`): greedy decoding up to `max_output_length` tokens, stopped at EOS only as
mttl (`stop_at_newline=True` also stops at a newline, as ours before), ROUGE-L F
with stemming per example, mean over examples, ×100. Generation runs task by task so the oracle
(task_name) selector knows each example's task; the score is the mean over all examples.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from typing import Any

from datasets import Dataset

from common.evaluation import generate, rouge_l
from common.lm_eval_bridge import evaluate_in_memory
from projects.mbc_arrow.expert_model import MultiExpertModel
from projects.mbc_arrow.tasks import prompt_and_answer, write_heldout_task


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
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
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
