"""The steps of the original's README as functions of an experiment folder, configured by the parsed gin.

Layout (the original's `exp_out/<exp_name>/best.pt` becomes a folder):
    <exp_out>/<exp_name>/checkpoint/   a PEFT expert (+ extras) or a library (library.json + experts/)
    <exp_out>/<exp_name>/training/     the training loop's log and checkpoints
    <exp_out>/<exp_name>/results.json  provenance of the step that wrote the experiment (RunDir)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gin
from tqdm.auto import tqdm

from common.io import load_tensors, read_json, save_tensors, write_json
from common.rundir import RunDir
from common.training import eval_dtype
from projects.phatgoose import configurables as C
from projects.phatgoose import library as L
from projects.phatgoose.baselines import Retriever, average_hiddens, retrieval_text
from projects.phatgoose.evaluate import (
    evaluate_rows,
    plot_routing,
    routing_distribution,
    start_routing_record,
    write_output_text,
)
from projects.phatgoose.experts import CHECKPOINT, load_base, multitask_data, train_lora_expert
from projects.phatgoose.gates import train_gate
from projects.phatgoose.moe import attach_experts
from projects.phatgoose.paper_tasks import PAPER_SETTINGS
from projects.phatgoose.tasks import SETTINGS, dataset_name, load_task, subsample

RETRIEVER_FILE = "retriever.safetensors"


def exp_dir(exp_name: str) -> Path:
    return Path(C.main_settings()["exp_out"]) / exp_name


def checkpoint(exp_name: str) -> Path:
    """exp_out/<exp_name>/checkpoint, which must exist."""
    path = exp_dir(exp_name) / CHECKPOINT
    if not path.is_dir():
        raise FileNotFoundError(f"missing expert or library {exp_name!r}: no checkpoint at {path}")
    return path


def _run_dir(path: Path, experiment: str, seed: int | None, **config: Any) -> RunDir:
    scale = _scale()
    return RunDir(
        path,
        project="phatgoose",
        experiment=experiment,
        scale=scale,
        seed=seed,
        config={"gin": gin.config_str(), **config},
    )


def _scale() -> str:
    base = C.scoped("M/MODEL", C.model_name)
    return base.partition(":")[0] if base.startswith(("tiny:", "micro:")) else "paper"


def _base() -> str:
    return C.scoped("M/MODEL", C.model_name)


def _placement() -> dict[str, Any]:
    """{"device", "mixed_precision"} of `M/MODEL/Model`: where the model runs and its training autocast."""
    opts = C.scoped("M/MODEL", C.model_settings)
    return {"device": opts["device"], "mixed_precision": opts["mixed_precision"]}


def _load_for_eval() -> tuple[Any, Any]:
    """The base on `Model.device`, in the dtype `Model.mix_precision` trains in (bf16 at paper scale)."""
    opts = _placement()
    return load_base(_base(), opts["device"], eval_dtype(opts["mixed_precision"]))


def _train_rows(dataset: str):
    return load_task(dataset)["train"]


def train_single_task_loralinear(exp_name: str, dataset: str, seed: int | None = None) -> Path:
    """Train a LoRA expert on `dataset` (train_single_task_loralinear.sh)."""
    settings = C.scoped("P/TRAIN", C.trainer_settings)
    moe = C.scoped("M/MODEL", C.moe_settings)
    out = exp_dir(exp_name)
    run = _run_dir(out, "train_expert", seed if seed is not None else settings.seed, dataset=dataset)
    train_lora_expert(
        _base(),
        _train_rows(dataset),
        out,
        settings,
        rank=moe.d_bottleneck,
        init_scale=moe.init_scale,
        target_modules=moe.target_modules,
        name=dataset_name(dataset),
        seed=seed,
        validate=_validator(dataset) if settings.validation_step_interval else None,
        **_placement(),
        log_backend=C.main_settings()["logging_backend"],
    )
    run.write_results({"steps": settings.num_steps}, dataset=dataset)
    return out / CHECKPOINT


def _validator(dataset: str):
    """The original's `validate_procedure="P/EVALUATE"` on the dataset's own validation split: accuracy
    (rank classification; generation for generative datasets), with P/EVALUATE's Evaluator settings."""
    splits = load_task(dataset)
    if "validation" not in splits:
        return None
    ev = C.scoped("P/EVALUATE", C.eval_settings)
    rows = list(subsample(splits["validation"], ev.num_examples))

    def validate(model: Any, tokenizer: Any) -> float:
        generative = not rows[0]["choices"]
        res = evaluate_rows(
            model,
            tokenizer,
            rows,
            generation=generative,
            max_new_tokens=ev.max_new_tokens,
            batch_size=ev.batch_size,
        )
        return res["accuracy"]

    return validate


def train_multitask(exp_name: str, datasets: Sequence[str], seed: int | None = None) -> Path:
    """The multitask baseline: one LoRA on the union of the experts' datasets (train_multitask.gin)."""
    settings = C.scoped("P/TRAIN/MULTITASK", C.trainer_settings)
    moe = C.scoped("M/MODEL", C.moe_settings)
    out = exp_dir(exp_name)
    run = _run_dir(
        out, "train_multitask", seed if seed is not None else settings.seed, datasets=list(datasets)
    )
    data = multitask_data([_train_rows(d) for d in datasets], settings.max_train_examples).shuffle(seed=0)
    train_lora_expert(
        _base(),
        data,
        out,
        settings,
        rank=moe.d_bottleneck,
        init_scale=moe.init_scale,
        target_modules=moe.target_modules,
        name="multitask",
        seed=seed,
        **_placement(),
        log_backend=C.main_settings()["logging_backend"],
    )
    run.write_results({"steps": settings.num_steps})
    return out / CHECKPOINT


def train_gate_step(exp_name: str, dataset: str, old_exp_name: str, seed: int | None = None) -> Path:
    """Train the gates of expert `old_exp_name` (train_gate.sh)."""
    settings = C.scoped("P/TRAIN/GATE", C.trainer_settings)
    out = exp_dir(exp_name)
    run = _run_dir(
        out,
        "train_gate",
        seed if seed is not None else settings.seed,
        dataset=dataset,
        old_exp_name=old_exp_name,
    )
    log_backend = C.main_settings()["logging_backend"]
    train_gate(
        _base(),
        checkpoint(old_exp_name),
        _train_rows(dataset),
        out,
        settings,
        seed=seed,
        log_backend=log_backend,
        **_placement(),
    )
    run.write_results({"steps": settings.num_steps}, dataset=dataset)
    return out / CHECKPOINT


def expert_names(datasets: str | Sequence[str]) -> list[str]:
    """run_concatenate.datasets: a setting name ("Full") or a list of dataset names.

    A setting is the tiny library at tiny/micro scale and the original's `scripts/concatenate.py`
    lists at paper scale ("P3": 36, "Full": 166, ...); `DatasetSetting.experts` overrides both.
    """
    if isinstance(datasets, str):
        settings = SETTINGS if _scale() in ("tiny", "micro") else PAPER_SETTINGS
        if datasets not in settings:
            raise KeyError(
                f"unknown dataset setting {datasets!r}; choose one of {sorted(settings)} or a list"
            )
        return list(C.dataset_setting() or settings[datasets])
    return [dataset_name(d) for d in datasets]


def manipulate() -> Path:
    """`func_caller.func=@...` of scripts/manipulations.py and scripts/concatenate.py."""
    args = C.func_caller()
    func = args.pop("func")
    if func == "put_index_to_lora":
        return L.put_index_to_lora(checkpoint(args["path"]), exp_dir(args["out_path"]) / CHECKPOINT)
    if func == "use_input_gate_as_router":
        out = exp_dir(args["out_path"]) / CHECKPOINT if args["out_path"] else None
        return L.use_input_gate_as_router(checkpoint(args["path"]), out)
    if func == "average_outer_product_lora_weights":
        return L.average_outer_product_lora_weights(
            checkpoint(args["path"]), exp_dir(args["out_path"]) / CHECKPOINT
        )
    if func == "import_rthree":
        # datasets: the 166 names in order, or a setting name of the original's concatenate.py ("Full")
        names = expert_names(args["datasets"]) if isinstance(args["datasets"], str) else args["datasets"]
        return L.import_rthree(args["checkpoint"], exp_dir(args["out_path"]) / CHECKPOINT, names)
    return concatenate(**args)


def concatenate(
    out_path: str,
    suffix: str,
    datasets: Any = "Full",
    print_commands: bool = False,
    compute_hiddens: bool = False,
    extra_bindings: str = "",
) -> Path:
    """Concatenate `datasets_concatenated/<NAME>_<suffix>` experts into one library at `out_path`.

    With compute_hiddens, first set each expert's router keys to its average module inputs on 1000 of
    its training examples (the Average Activation baseline; ExposeHidden.reduction_method per side).
    """
    names = expert_names(datasets)
    paths = [checkpoint(f"datasets_concatenated/{n}_{suffix}") for n in names]
    if print_commands:
        for n in names:
            print(f"expert {n}: {exp_dir(f'datasets_concatenated/{n}_{suffix}')}")
    out = exp_dir(out_path) / CHECKPOINT
    L.run_concatenate(paths, out, names)
    if compute_hiddens:
        if extra_bindings:
            gin.parse_config(C.split_bindings(extra_bindings))
        enc = C.scoped("M/MODEL/ENCODER", C.expose_hidden) or "masked_mean"
        dec = C.scoped("M/MODEL/DECODER", C.expose_hidden) or "mean"
        n_ex, decoder_keys = C.average_hiddens_settings()
        settings = C.scoped("P/TRAIN", C.trainer_settings)
        max_new_tokens = C.scoped("P/EVALUATE", C.eval_settings).max_new_tokens
        model, tok = _load_for_eval()
        attach_experts(model, L.read_library(out))
        keys = {}
        for i, n in enumerate(names):
            rows = list(subsample(_train_rows(n), n_ex))
            keys[n] = average_hiddens(
                model,
                tok,
                rows,
                i,
                encoder_reduction=enc,
                decoder_reduction=dec,
                max_length=settings.max_length,
                decoder_keys=decoder_keys,
                max_new_tokens=max_new_tokens,
            )
        L.set_library_keys(out, keys)
    return out


def retriever_library(setting: str) -> Path:
    """retriever.sh -make_expert_library True: embed 1000 training examples of each expert dataset."""
    opts = C.retriever_settings()
    names = expert_names(setting)
    r = Retriever()
    for n in names:
        rows = subsample(_train_rows(n), opts["num_examples"])
        r.add_expert(n, [retrieval_text(x, opts["include_answer_choices"]) for x in rows])
    out = exp_dir(f"retriever_library_{setting}")
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / RETRIEVER_FILE, r.state())
    write_json(out / "retriever.json", {"experts": names, **opts})
    return out


def retrieval_exp(setting: str) -> str:
    return f"{setting}Completeansretrieval_{C.retriever_settings()['suffix']}_concatenated"


def retriever_checkpoint(setting: str) -> Path:
    """retriever.sh -create_checkpoint True: the experts' library plus the stored example embeddings."""
    opts = C.retriever_settings()
    lib = exp_dir("retriever_library_Full")
    if not (lib / RETRIEVER_FILE).is_file():
        raise FileNotFoundError(
            f"no retriever library at {lib}: run retriever -make_expert_library True first"
        )
    names = read_json(lib / "retriever.json")["experts"]
    out = concatenate(retrieval_exp(setting), opts["suffix"], names)
    save_tensors(out / RETRIEVER_FILE, load_tensors(lib / RETRIEVER_FILE))
    write_json(out / "retriever.json", read_json(lib / "retriever.json"))
    return out


def evaluate(
    exp_name: str,
    *,
    retrieval: bool = False,
    seed: int | None = None,
    procedures: Sequence[str] | None = None,
    plain: bool | None = None,
    analysis_dir: str | Path | None = None,
    datasets: Sequence[str] | None = None,
) -> dict[str, Any]:
    """eval_multitask.sh / retriever.sh evaluation: every `P/EVALUATE*` procedure of main.procedure_exec_order.

    `procedures`, `plain` (no expert: Model.init_moma_calls=[]), `analysis_dir` (output texts and
    routing distributions, instead of the Evaluator's analysis_processors) and `datasets` (instead of
    the Evaluator's) override the gin values.
    """
    main = C.main_settings()
    moe = C.scoped("M/MODEL", C.moe_settings)
    load_experts = C.scoped("M/MODEL", C.model_settings)["load_experts"] if plain is None else not plain
    model, tok = _load_for_eval()
    names: list[str] = []
    retriever = None
    if load_experts:
        ckpt = checkpoint(exp_name)
        experts = L.read_library(ckpt)
        names = [e.name for e in experts]
        if len(experts) > 1 and not retrieval and not all(e.router for e in experts):
            raise ValueError(
                f"{exp_name}: experts without router keys (run use_input_gate_as_router or "
                "run_concatenate.compute_hiddens=True)"
            )
        attach_experts(model, experts, topk_value=moe.topk_value, normalize_topk=moe.normalize_topk)
        if retrieval:
            retriever = Retriever()
            stored = read_json(ckpt / "retriever.json")
            if stored["experts"] != names:
                raise ValueError(f"retriever experts {stored['experts']} differ from the library's {names}")
            retriever.load_state(names, load_tensors(ckpt / RETRIEVER_FILE))
    metrics: dict[str, Any] = {}
    for proc in procedures or main["procedure_exec_order"]:
        if not proc.startswith("P/EVALUATE"):
            continue
        ev = C.scoped(proc, C.eval_settings)
        to_evaluate = ev.datasets if datasets is None else datasets
        if not to_evaluate:
            raise ValueError(f"{proc}/Evaluator.datasets is empty: bind the datasets to evaluate")
        for d in tqdm(to_evaluate, desc=f"{proc} datasets", leave=False):
            name = dataset_name(d)
            rows = list(subsample(load_task(d)[ev.split], ev.num_examples))
            experts_of_rows = None
            if retriever is not None:
                opts = C.retriever_settings()
                experts_of_rows = retriever.retrieve(
                    [retrieval_text(r, opts["include_answer_choices"]) for r in rows]
                ).tolist()
            start_routing_record(model)
            res = evaluate_rows(
                model,
                tok,
                rows,
                experts_of_rows=experts_of_rows,
                generation=ev.generation,
                max_new_tokens=ev.max_new_tokens,
                batch_size=ev.batch_size,
            )
            dist = routing_distribution(model)
            metrics[name] = {k: res[k] for k in ("accuracy", "balanced_accuracy", "exact_match") if k in res}
            if experts_of_rows is not None:
                metrics[name]["retrieved"] = {
                    n: experts_of_rows.count(i) / len(rows) for i, n in enumerate(names)
                }
            processors = ev.analysis_processors
            if analysis_dir is not None:
                processors = [
                    C.WriteOutputText(f"{analysis_dir}/output_text"),
                    C.RoutingDistribution(f"{analysis_dir}/routing_distribution"),
                ]
            for proc_obj in processors:
                if isinstance(proc_obj, C.WriteOutputText):
                    write_output_text(proc_obj.save_dir, name, rows, res)
                elif isinstance(proc_obj, C.RoutingDistribution) and dist:
                    plot_routing(proc_obj.save_dir, name, dist, names)
    accs = [m["accuracy"] for m in metrics.values()]
    metrics["mean_accuracy"] = sum(accs) / len(accs) if accs else float("nan")
    run = _run_dir(
        exp_dir(exp_name or "plain_model") / "eval",
        "evaluate",
        seed if seed is not None else main["seed"],
        exp_name=exp_name,
        retrieval=retrieval,
    )
    run.write_results(metrics)
    return metrics
