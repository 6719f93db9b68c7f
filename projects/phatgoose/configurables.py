"""The gin configurables, under the original's names, so that its bindings paste unchanged.

Scopes follow the original (`src/utils/gin.py`): `P/` procedures (`P/TRAIN/Trainer...`,
`P/EVALUATE/Evaluator...`), `M/MODEL` the model (`M/MODEL/FFNExperts.topk_value=2`,
`M/MODEL/ENCODER/ExposeHidden.reduction_method="masked_mean"`), `MOMA/` checkpoint manipulations.
Each configurable only returns the values bound to it; the code that uses them lives elsewhere.
A binding to anything not listed here fails in `parse` with the supported names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import gin

from common.config import ConfigError, check_type
from projects.phatgoose.experts import T5_TARGETS, TrainSettings

CONFIGS = Path(__file__).resolve().parent / "configs"
_SOURCES: list[tuple[str, str]] = []  # (where, text) of the gin files and bindings last parsed, in order
_STATEMENT = re.compile(r"^\s*(?:[\w./]+\s*=|include\b|import\b)")


def binding_source(configurable: str, param: str) -> str:
    """Where `configurable.param` was last bound: 'file.gin line N' or 'binding ...'."""
    pattern = re.compile(rf"^\s*(?:[\w/]+/)?{re.escape(configurable)}\.{re.escape(param)}\s*=")
    found = "the gin files or bindings"
    for where, text in _SOURCES:
        for i, line in enumerate(text.splitlines(), start=1):
            if pattern.match(line):
                found = f"{where} line {i}" if where != "--gin_bindings" else f"binding {line.strip()!r}"
    return found


def check_settings(settings: Any, configurable: str) -> Any:
    """Refuse a bound value whose type cannot stand in for the default's (`Trainer.batch_size="two"`)."""
    for f in fields(settings):
        value = getattr(settings, f.name)
        try:
            check_type(f"{configurable}.{f.name}", f.default, value, binding_source(configurable, f.name))
        except ConfigError as e:
            raise ConfigError(str(e).replace("config key", "gin binding", 1)) from None
    return settings


def _syntax_error(e: SyntaxError, lines: list[str] | None = None) -> ConfigError:
    """Gin reports an unclosed bracket or quote where the next statement starts; name the statement it
    belongs to (the last one that begins before that line) and its line."""
    line, lineno = e.text or "", e.lineno or 0
    if lines is None:
        try:
            lines = Path(e.filename).read_text(encoding="utf-8").splitlines() if e.filename else []
        except OSError:
            lines = []
    if lines and 1 < lineno <= len(lines) and _STATEMENT.match(lines[lineno - 1]) and (e.offset or 0) <= 1:
        for i in range(lineno - 2, -1, -1):
            if _STATEMENT.match(lines[i]):
                lineno, line = i + 1, lines[i]
                break
    return ConfigError(
        f"gin syntax error in {e.filename or 'a binding'} line {lineno}: {e.msg} in {line.strip()!r}; "
        "close the bracket or quote there"
    )


# The shapes of values below follow the original's gin files; defaults are the paper's (P3 setting).


@gin.configurable(
    "main", allowlist=["procedure_exec_order", "exp_name", "logging_backend", "exp_out", "seed"]
)
def main_settings(
    procedure_exec_order: Sequence[str] = ("P/TRAIN",),
    exp_name: str = "",
    logging_backend: str | None = None,  # None or "jsonl": train_log.jsonl only; "tensorboard": also events
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
    return check_settings(TrainSettings(**kwargs), "Trainer")


@gin.configurable("hf_torch_model", allowlist=["model_name_or_path"])
def model_name(model_name_or_path: str = "google/t5-xl-lm-adapt") -> str:
    return model_name_or_path


# The original's `Model.mix_precision` -> common.training's `mixed_precision` (anything else: float32).
MIX_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no", "32": "no"}


@gin.configurable("Model", allowlist=["init_moma_calls", "mix_precision", "device"])
def model_settings(
    init_moma_calls: Sequence[Any] | None = None, mix_precision: str = "bf16", device: str = "auto"
) -> dict[str, Any]:
    """`init_moma_calls=[]` (the README's multitask evaluation) means: the plain model, no expert loaded.
    `mix_precision` (the original's: bf16) trains under that autocast and evaluates a model in that dtype;
    `device`: auto (cuda if available, else cpu), cpu, cuda or cuda:N."""
    if init_moma_calls not in (None, []) and list(init_moma_calls) != []:
        raise ValueError(
            "Model.init_moma_calls: only [] (evaluate the plain model) is supported; experts are loaded "
            "from exp_out/<exp_name>/checkpoint"
        )
    if str(mix_precision) not in MIX_PRECISION:
        raise ValueError(f"Model.mix_precision must be one of {sorted(MIX_PRECISION)}, got {mix_precision!r}")
    return {
        "load_experts": init_moma_calls is None,
        "mixed_precision": MIX_PRECISION[str(mix_precision)],
        "device": device,
    }


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
    return check_settings(EvalSettings(**kwargs), "Evaluator")


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


_INCLUDE = re.compile(r"""^[ \t]*include[ \t]+(['"])([^'"]+)\1[ \t]*$""", re.M)


def gin_text(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> str:
    """A gin file's text with each `include 'x.gin'` replaced by x.gin's text (recursively), x.gin found
    beside the including file or in configs/. gin's own lookup tries the working directory and then
    Python packages first, and logs "ERROR Path not found: x.gin" for every include it then finds later.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"gin file not found: {path}")
    if path.resolve() in _seen:
        raise ValueError(f"gin include cycle: {' -> '.join(str(p) for p in (*_seen, path.resolve()))}")

    def expand(m: re.Match) -> str:
        name = Path(m.group(2))
        for candidate in (name,) if name.is_absolute() else (path.parent / name, CONFIGS / name):
            if candidate.is_file():
                return gin_text(candidate, (*_seen, path.resolve()))
        raise FileNotFoundError(f"{path}: include {str(name)!r} is neither beside it nor in {CONFIGS}")

    return _INCLUDE.sub(expand, path.read_text())


def parse(files: Sequence[str | os.PathLike] = (), bindings: Sequence[str] = ()) -> None:
    """Clear gin, then read files then bindings (later beat earlier); unsupported names fail clearly."""
    gin.clear_config()
    _SOURCES.clear()
    texts = []
    for f in files:
        path = Path(f) if Path(f).is_file() else CONFIGS / f
        try:
            texts.append(gin_text(path))
        except UnicodeDecodeError as e:
            raise ConfigError(f"gin file {f} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e
        _SOURCES.append((str(f), texts[-1]))
    _SOURCES.append(("--gin_bindings", "\n".join(bindings)))
    sources = [*((str(f), text) for f, text in zip(files, texts)), (None, list(bindings))]
    try:
        for name, text in sources:  # what gin.parse_config_files_and_bindings does, includes expanded here
            syntax = None
            try:
                gin.parse_config(text)
            except SyntaxError as e:  # gin parsed a string: name the file (line numbers after expansion)
                e.filename = e.filename or name
                syntax = e
            if syntax is not None:
                break
    except ValueError as e:
        raise ConfigError(
            f"unsupported gin binding: {str(e).splitlines()[0]} This reproduction supports the "
            f"configurables {', '.join(SUPPORTED)}; see the README's command map."
        ) from e
    if syntax is not None:
        raise _syntax_error(syntax, text.splitlines() if name else None) from syntax


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
