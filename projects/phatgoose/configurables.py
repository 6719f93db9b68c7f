"""The gin configurables, under the original's names, so that its bindings paste unchanged.

Scopes follow the original (`src/utils/gin.py`): `P/` procedures (`P/TRAIN/Trainer...`,
`P/EVALUATE/Evaluator...`), `M/MODEL` the model (`M/MODEL/FFNExperts.topk_value=2`,
`M/MODEL/ENCODER/ExposeHidden.reduction_method="masked_mean"`), `MOMA/` checkpoint manipulations.
Each configurable only returns the values bound to it; the code that uses them lives elsewhere.
A binding to anything not listed here fails in `parse` with the supported names.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gin

from projects.phatgoose.experts import T5_TARGETS, TrainSettings

CONFIGS = Path(__file__).resolve().parent / "configs"
# The shapes of values below follow the original's gin files; defaults are the paper's (P3 setting).


@gin.configurable(
    "main", allowlist=["procedure_exec_order", "exp_name", "logging_backend", "exp_out", "seed"]
)
def main_settings(
    procedure_exec_order: Sequence[str] = ("P/TRAIN",),
    exp_name: str = "",
    logging_backend: str | None = None,  # accepted; runs log to train_log.jsonl (no wandb here)
    exp_out: str = "exp_out",
    seed: int = 42,
) -> dict[str, Any]:
    return {
        "procedure_exec_order": list(procedure_exec_order),
        "exp_name": os.path.expandvars(exp_name),
        "logging_backend": logging_backend,
        "exp_out": os.path.expandvars(exp_out),
        "seed": seed,
    }


@gin.configurable("Trainer", allowlist=[f for f in TrainSettings.__dataclass_fields__])
def trainer_settings(**kwargs: Any) -> TrainSettings:
    return TrainSettings(**kwargs)


@gin.configurable("hf_torch_model", allowlist=["model_name_or_path"])
def model_name(model_name_or_path: str = "google/t5-xl-lm-adapt") -> str:
    return model_name_or_path


@gin.configurable("Model", allowlist=["init_moma_calls"])
def model_settings(init_moma_calls: Sequence[Any] | None = None) -> dict[str, Any]:
    """`init_moma_calls=[]` (the README's multitask evaluation) means: the plain model, no expert loaded."""
    if init_moma_calls not in (None, []) and list(init_moma_calls) != []:
        raise ValueError(
            "Model.init_moma_calls: only [] (evaluate the plain model) is supported; experts are loaded "
            "from exp_out/<exp_name>/checkpoint"
        )
    return {"load_experts": init_moma_calls is None}


@dataclass
class MoESettings:
    d_bottleneck: int = 16  # LoRA rank
    init_scale: float = 0.01
    topk_value: int = 2
    normalize_topk: bool = True
    target_modules: tuple[str, ...] = T5_TARGETS


@gin.configurable("FFNExperts", allowlist=list(MoESettings.__dataclass_fields__))
def moe_settings(**kwargs: Any) -> MoESettings:
    s = MoESettings(**kwargs)
    if s.d_bottleneck < 1 or s.topk_value < 1:
        raise ValueError(f"FFNExperts: d_bottleneck and topk_value must be >= 1, got {s}")
    return s


@gin.configurable("ExposeHidden", allowlist=["reduction_method"])
def expose_hidden(reduction_method: str | None = None) -> str | None:
    """None: route per token (PHATGOOSE); "masked_mean"/"mean": the Average Activation reductions."""
    if reduction_method not in (None, "masked_mean", "mean"):
        raise ValueError(
            f"ExposeHidden.reduction_method must be None, 'masked_mean' or 'mean', got {reduction_method!r}"
        )
    return reduction_method


@gin.configurable("WriteOutputText", allowlist=["save_dir"])
@dataclass
class WriteOutputText:
    save_dir: str = "output_text"


@gin.configurable("RoutingDistribution", allowlist=["save_dir"])
@dataclass
class RoutingDistribution:
    save_dir: str = "routing_distribution"


@dataclass
class EvalSettings:
    datasets: Sequence[str] = ()
    analysis_processors: Sequence[Any] = ()
    num_examples: int | None = None  # cap per dataset (None: the whole split)
    split: str = "test"
    generation: bool = True
    max_new_tokens: int = 8
    batch_size: int = 16


@gin.configurable("Evaluator", allowlist=list(EvalSettings.__dataclass_fields__))
def eval_settings(**kwargs: Any) -> EvalSettings:
    return EvalSettings(**kwargs)


@gin.configurable("save_weights", allowlist=["should_save_to_gcp", "weight_path"])
def save_weights(should_save_to_gcp: bool = False, weight_path: str | None = None) -> dict[str, Any]:
    """Accepted for pasted commands; checkpoints are always written locally, never uploaded."""
    return {"should_save_to_gcp": should_save_to_gcp, "weight_path": weight_path}


@gin.configurable("retriever", allowlist=["num_examples", "include_answer_choices", "suffix"])
def retriever_settings(
    num_examples: int = 1000, include_answer_choices: bool = True, suffix: str = "t5xl_lora"
) -> dict[str, Any]:
    return {"num_examples": num_examples, "include_answer_choices": include_answer_choices, "suffix": suffix}


@gin.configurable("average_hiddens", allowlist=["num_examples", "decoder_keys"])
def average_hiddens_settings(
    num_examples: int = 1000, decoder_keys: str = "last_generation_step"
) -> tuple[int, str]:
    """Examples per expert, and the decoder keys: "last_generation_step" (the original) or "teacher_forced"."""
    return num_examples, decoder_keys


@gin.configurable("DatasetSetting", allowlist=["experts"])
def dataset_setting(experts: Sequence[str] | None = None) -> list[str] | None:
    """The expert datasets of the "Full"/"All" settings (None: `tasks.SETTINGS`, all tiny experts)."""
    return None if experts is None else list(experts)


# scripts/manipulations.py and scripts/concatenate.py: `func_caller.func=@fn` plus `fn.arg=...`
MANIPULATIONS = (
    "put_index_to_lora",
    "use_input_gate_as_router",
    "average_outer_product_lora_weights",
    "run_concatenate",
    "import_rthree",
)


@gin.configurable("put_index_to_lora", allowlist=["path", "out_path"])
def put_index_to_lora_args(path: str = gin.REQUIRED, out_path: str = gin.REQUIRED) -> dict[str, Any]:
    return {"func": "put_index_to_lora", "path": path, "out_path": out_path}


@gin.configurable("use_input_gate_as_router", allowlist=["path", "out_path"])
def use_input_gate_as_router_args(path: str = gin.REQUIRED, out_path: str | None = None) -> dict[str, Any]:
    return {"func": "use_input_gate_as_router", "path": path, "out_path": out_path}


@gin.configurable("average_outer_product_lora_weights", allowlist=["path", "out_path"])
def average_outer_product_args(path: str = gin.REQUIRED, out_path: str = gin.REQUIRED) -> dict[str, Any]:
    return {"func": "average_outer_product_lora_weights", "path": path, "out_path": out_path}


@gin.configurable(
    "run_concatenate",
    allowlist=["out_path", "suffix", "datasets", "print_commands", "compute_hiddens", "extra_bindings"],
)
def run_concatenate_args(
    out_path: str = gin.REQUIRED,
    suffix: str = gin.REQUIRED,
    datasets: str | Sequence[str] = "Full",
    print_commands: bool = False,
    compute_hiddens: bool = False,
    extra_bindings: str = "",
) -> dict[str, Any]:
    return {
        "func": "run_concatenate",
        "out_path": out_path,
        "suffix": suffix,
        "datasets": datasets,
        "print_commands": print_commands,
        "compute_hiddens": compute_hiddens,
        "extra_bindings": extra_bindings,
    }


@gin.configurable("import_rthree", allowlist=["checkpoint", "out_path", "datasets"])
def import_rthree_args(
    checkpoint: str = gin.REQUIRED, out_path: str = gin.REQUIRED, datasets: str | Sequence[str] = gin.REQUIRED
) -> dict[str, Any]:
    """`datasets`: the experts' names in checkpoint order, or a setting name ("Full": all 166)."""
    return {
        "func": "import_rthree",
        "checkpoint": checkpoint,
        "out_path": out_path,
        "datasets": datasets if isinstance(datasets, str) else list(datasets),
    }


@gin.configurable("func_caller", allowlist=["func"])
def func_caller(func: Any = gin.REQUIRED) -> dict[str, Any]:
    """`func_caller.func=@put_index_to_lora`: call the bound manipulation, returning its arguments."""
    return func()


SUPPORTED = (
    "main",
    "Trainer",
    "hf_torch_model",
    "Model",
    "FFNExperts",
    "ExposeHidden",
    "WriteOutputText",
    "RoutingDistribution",
    "Evaluator",
    "save_weights",
    "retriever",
    "average_hiddens",
    "DatasetSetting",
    "func_caller",
    *MANIPULATIONS,
)


def parse(files: Sequence[str | os.PathLike] = (), bindings: Sequence[str] = ()) -> None:
    """Clear gin, then read files then bindings (later beat earlier); unsupported names fail clearly."""
    gin.clear_config()
    # `include 'tiny.gin'` resolves here from any working directory (gin first logs "Path not found:
    # tiny.gin" from its Python-package lookup; harmless).
    gin.add_config_file_search_path(str(CONFIGS))
    try:
        gin.parse_config_files_and_bindings([str(f) for f in files], list(bindings), finalize_config=False)
    except ValueError as e:
        raise ValueError(
            f"unsupported gin binding: {str(e).splitlines()[0]} This reproduction supports the "
            f"configurables {', '.join(SUPPORTED)}; see the README's command map."
        ) from e


def split_bindings(text: str) -> list[str]:
    """A bash wrapper's `-extra_bindings 'a=[1, 2] b="x y"'` -> ['a=[1, 2]', 'b="x y"'].

    Bindings are separated by whitespace outside quotes and brackets (a backslash escapes inside quotes).
    """
    out, cur, depth, quote, escaped = [], [], 0, "", False
    for ch in text:
        if quote:
            cur.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        if ch.isspace() and depth == 0:
            if cur:
                out.append("".join(cur))
                cur = []
            continue
        cur.append(ch)
    if quote or depth:
        raise ValueError(f"unbalanced quotes or brackets in bindings {text!r}")
    if cur:
        out.append("".join(cur))
    return out


def scoped(scope: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn()` with the bindings of gin scope `scope` (e.g. 'P/TRAIN', 'M/MODEL/ENCODER')."""
    if not scope:
        return fn(*args, **kwargs)
    with gin.config_scope(scope):
        return fn(*args, **kwargs)
