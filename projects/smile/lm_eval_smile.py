"""lm-eval with the SMILE model classes registered: a fresh `lm_eval` process does not know
`smile_mistral` / `smile_llama`, so this entrypoint imports them, then runs lm-eval's own CLI.

    python -m projects.smile.lm_eval_smile --model hf \
        --model_args pretrained=outputs/mistral/gate_k-8_k-8/version_4,dtype=float16 \
        --tasks gsm8k --batch_size 8

The Python API, `evaluate(path, tasks, ...)`, loads the model and runs `common.lm_eval_bridge`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import projects.smile.mistral  # noqa: F401  (registers the SMILE classes with the Auto* factories)
from common.cli import run_main


def evaluate(
    path: str | os.PathLike,
    tasks: Sequence[str | Mapping[str, Any]],
    *,
    include_path: str | os.PathLike | None = None,
    batch_size: int = 8,
    limit: int | float | None = None,
    device: str = "auto",
) -> dict[str, dict[str, Any]]:
    """Per-task lm-eval metrics of a saved (SMILE or plain) causal LM, on `device` ("auto": cuda if any)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.lm_eval_bridge import evaluate_in_memory

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return evaluate_in_memory(
        model, tokenizer, tasks, include_path=include_path, batch_size=batch_size, limit=limit, device=device
    )


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    sys.exit(run_main(main))
