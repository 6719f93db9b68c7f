"""`make gpu-check`: the checks only a GPU can run, in one command of a few minutes.

    python benchmarks/gpu_check.py [--device cuda] [--only mbc_arrow phatgoose ...] [--out PATH]

1. Every project's paper-shaped pipeline on micro models: the micro config with the paper's precision
   (bf16 where the original trains and evaluates in bf16) and the device given. Every forward pass runs
   under `device_guard`, which fails at the first module whose inputs are not on its parameters' device
   or whose parameters are not on the requested device, and records the device each `load_model` got.
2. The Triton routing kernel (`common.routing_triton`) against the reference, in float32 and bfloat16.
3. The bf16 paths: the routed mixture and the SMILE forward in bfloat16 against float32.
4. A timing table on the device: routed mixture, SMILE forward and merges, each as a ratio to the dense
   op (or the floor) measured in the same run, with `torch.cuda.synchronize` around every call.
Writes `benchmarks/results/gpu_check.json`. Without CUDA it refuses (exit 2) unless `--device cpu`: the
CPU run is what the tests exercise (`tests/test_gpu_check.py`), with `--shapes small`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _timing import environment, print_table, ratios, time_cases

from common.device import device_guard, resolve_device, same_device
from common.io import read_json, write_json
from common.routing import routed_lowrank, top_k_route

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "gpu_check.json"
# Shapes of the timing table: "paper" on the GPU (the benchmark rows' shapes), "small" for the CPU tests.
SHAPES = {
    "paper": {"batch": 8, "seq": 128, "d": 1024, "experts": 8, "rank": 4, "k": 2, "gate_k": 16,
              "smile_k": 32, "merge_models": 8, "merge_rows": 2048, "repeats": 21},
    "small": {"batch": 2, "seq": 8, "d": 32, "experts": 4, "rank": 2, "k": 2, "gate_k": 2,
              "smile_k": 4, "merge_models": 2, "merge_rows": 16, "repeats": 2},
}  # fmt: skip


# -- the paper-shaped pipelines on micro models ---------------------------------------------------------
def run_compatible_specialization(device: str, out: Path) -> dict[str, Any]:
    """One micro seed of the table (specialists, interpolation, routing, multi-layer, CKA); routers in bf16."""
    from projects.compatible_specialization.config import resolve
    from projects.compatible_specialization.pipeline import run_seed

    overrides = [f"device={device}", "routing.mixed_precision=bf16", "eval_dtype=bfloat16"]
    cfg = resolve("micro", None, overrides, {})
    metrics = run_seed(cfg, 0, out)
    return {"routing": metrics["routing"], "multi_layer": metrics["multi_layer"]}


def run_mbc_arrow(device: str, out: Path) -> dict[str, Any]:
    """The notebook on the micro config with mttl's precision=bf16 (phi-2_hf.json)."""
    from common.config import load_config
    from projects.mbc_arrow.main import DEFAULTS, run_dir
    from projects.mbc_arrow.notebook import run_notebook

    overrides = [f"device={device}", "precision=bf16", f"output_dir={out}", "heldout_examples=6"]
    cfg = load_config(DEFAULTS, [REPO / "projects/mbc_arrow/configs/micro_notebook.yaml"], overrides)
    return run_notebook(cfg, run_dir(cfg, "notebook"))


def run_phatgoose(device: str, out: Path) -> dict[str, Any]:
    """Experts, gates, the libraries, then PHATGOOSE on the held-out tasks; `Model.mix_precision="bf16"`."""
    import gin

    from projects.phatgoose import configurables as C
    from projects.phatgoose import procedures as P
    from projects.phatgoose.pipeline import build_library

    bindings = [
        f'main.exp_out="{out / "exp_out"}"',
        f'M/MODEL/Model.device="{device}"',
        'M/MODEL/Model.mix_precision="bf16"',
    ]
    C.parse([C.CONFIGS / "micro.gin"], bindings)
    try:
        build_library(0, P.expert_names("Full"))
        name = "FullCompleteA2inpgatetrainnogumbel_t5_lora_concatenated"
        return P.evaluate(name, procedures=["P/EVALUATE"])
    finally:
        gin.clear_config()


def run_mats(device: str, out: Path) -> dict[str, Any]:
    """Two micro T5 experts trained under bf16 autocast (the paper configs'), their Grams, RegMean."""
    from projects.mats.main import main
    from projects.mats.tasks import tasks_of

    config, mixture, registry = (
        str(REPO / "projects/mats/configs/micro_t5.yaml"),
        "micro_two",
        out / "ckpts.yaml",
    )
    common = ["-o", f"experiment.exp_out={out / 'exp_out'}", f"experiment.checkpoint_registry={registry}",
              "experiment.run_name=gpu_check", f"model.device={device}", "train_run.mixed_precision=bf16"]  # fmt: skip
    for task in tasks_of(mixture):
        main(["train", "-c", config, "-td", f"train_dataset={task}", "-ed", f"evaluation_dataset={task}",
              "--register", str(registry), *common])  # fmt: skip
    args = ["-c", config, "-d", mixture, "--checkpoint_descriptor", "full_model", "--split", "validation"]
    main(["save_gram_matrix", *args, *common])
    main(["regmean", *args, *common])
    found = sorted((out / "exp_out").rglob("regmean/results.json"))
    return read_json(found[-1]).get("metrics", {}) if found else {}


def run_smile(device: str, out: Path) -> dict[str, Any]:
    """Two micro CLIP experts (fine-tuned here), SMILE-upscaled and evaluated with `method.device`."""
    from projects.smile.finetune import main as finetune
    from projects.smile.main import main as smile

    experts = out / "experts"
    finetune(["--config", str(REPO / "projects/smile/configs/micro_finetune.yaml"), f"out={experts}"])
    report = out / "report.json"
    smile([
        "method=smile_upscaling/smile_upscaling", "method.gate_k=2", "method.k=4", f"method.device={device}",
        "modelpool=CLIPVisionModelPool/micro_clip", f"modelpool.expert_root={experts}",
        "taskpool=CLIPVisionModelTaskPool/micro_clip", f"report_save_path={report}",
    ])  # fmt: skip
    return {"average": read_json(report)["average"]}


PIPELINES: dict[str, Callable[[str, Path], dict[str, Any]]] = {
    "compatible_specialization": run_compatible_specialization,
    "mbc_arrow": run_mbc_arrow,
    "phatgoose": run_phatgoose,
    "mats": run_mats,
    "smile": run_smile,
}


def check_pipeline(name: str, device: str, out: Path) -> dict[str, Any]:
    """Run one pipeline under `device_guard`; fails if a model or a batch left the device."""
    fn = PIPELINES[name]
    start = time.perf_counter()
    with device_guard(device) as report:
        metrics = fn(device, out)
    if report.forwards == 0:
        raise AssertionError(f"{name}: no forward pass was checked (did the pipeline run?)")
    wrong = [d for d in report.loads if not same_device(resolve_device(d), report.expected)]
    if wrong:
        raise AssertionError(f"{name}: load_model was given {wrong}, not {device}")
    return {**report.as_dict(), "seconds": time.perf_counter() - start, "metrics": metrics}


# -- kernels and precision ------------------------------------------------------------------------------
def _routing_inputs(s: Mapping[str, int], device: torch.device, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(s["batch"], s["seq"], s["d"], generator=gen)
    A = torch.randn(s["experts"], s["rank"], s["d"], generator=gen) / s["d"] ** 0.5
    B = torch.randn(s["experts"], s["d"], s["rank"], generator=gen)
    weights, indices = top_k_route(
        torch.randn(s["batch"], s["seq"], s["experts"], generator=gen), s["k"], renormalize=True
    )
    on = [t.to(device, dtype) for t in (x, A, B, weights)]
    return (*on, indices.to(device))


def max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64."""
    ref = ref.double()
    return float((out.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


# Tolerances (max error relative to the largest output): float32 sums in another order; bfloat16 keeps 8 bits.
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def check_triton(device: torch.device, s: Mapping[str, int]) -> dict[str, Any]:
    """The Triton kernel against `impl="reference"` (float32) per dtype; skipped where it cannot run."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return {"skipped": "Triton runs on CUDA (or under TRITON_INTERPRET=1)"}
    out = {}
    for dtype in TOLERANCES:
        x, A, B, w, idx = _routing_inputs(s, device, dtype)
        with torch.inference_mode():
            got = routed_lowrank(x, A, B, w, idx, scaling=2.0, impl="triton")
            ref = routed_lowrank(*(t.float() for t in (x, A, B, w)), idx, scaling=2.0, impl="reference")
        err = max_rel_error(got, ref)
        out[str(dtype)] = {
            "max_rel_error": err,
            "tolerance": TOLERANCES[dtype],
            "ok": err <= TOLERANCES[dtype],
        }
    return out


def smile_layer(s: Mapping[str, int], seed: int = 0) -> nn.Module:
    """A SMILE layer of random experts (the `smile_forward.py` benchmark's), top-1, in eval mode."""
    from projects.smile.upscale import SmileMoELinear

    torch.manual_seed(seed)
    layer = SmileMoELinear(nn.Linear(s["d"], s["d"]), s["experts"], s["gate_k"], s["smile_k"], top_k=1)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if not name.startswith("pretrained"):
                p.normal_(0, s["d"] ** -0.5)
    return layer.eval()


def check_bf16(device: torch.device, s: Mapping[str, int]) -> dict[str, Any]:
    """The routed mixture and the SMILE forward in bfloat16 against float32 on the same inputs."""
    x, A, B, w, idx = _routing_inputs(s, device, torch.float32)
    layer = smile_layer(s).to(device)
    with torch.inference_mode():
        ref = {"routed_lowrank": routed_lowrank(x, A, B, w, idx, scaling=2.0), "smile_forward": layer(x)}
        low = {
            "routed_lowrank": routed_lowrank(*(t.bfloat16() for t in (x, A, B, w)), idx, scaling=2.0),
            "smile_forward": layer.to(torch.bfloat16)(x.bfloat16()),
        }
    tol = TOLERANCES[torch.bfloat16]
    out = {}
    for k in ref:
        err = max_rel_error(low[k], ref[k])
        out[k] = {"dtype_out": str(low[k].dtype), "max_rel_error": err, "tolerance": tol, "ok": err <= tol}
    return out


# -- the timing table -------------------------------------------------------------------------------------
def _synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    if device.type != "cuda":
        return fn
    return lambda: (fn(), torch.cuda.synchronize(device))


def _routing_cases(
    dense: nn.Linear, x, A, B, w, idx, impls: Sequence[str]
) -> dict[str, Callable[[], object]]:
    def mixture(impl: str) -> Callable[[], torch.Tensor]:
        return lambda: routed_lowrank(x, A, B, w, idx, scaling=2.0, impl=impl)

    cases: dict[str, Callable[[], object]] = {"dense Linear": lambda: dense(x)}
    cases |= {f"routed_lowrank {impl}": mixture(impl) for impl in impls}
    cases["layer (dense + auto)"] = lambda: dense(x) + mixture("auto")()
    return cases


def timing_table(device: torch.device, s: Mapping[str, int]) -> dict[str, Any]:
    """{row: {"times", "ratio", "baseline"}}: each case over its dense op (or floor) in the same run."""
    from projects.mats.merging import task_arithmetic, ties

    rows: dict[str, dict[str, Callable[[], object]]] = {}
    baselines: dict[str, str] = {}
    for dtype in (torch.float32, torch.bfloat16):
        tag = str(dtype).removeprefix("torch.")
        x, A, B, w, idx = _routing_inputs(s, device, dtype)
        dense = nn.Linear(s["d"], s["d"]).to(device, dtype)
        impls = ["vectorized"] + (["triton"] if device.type == "cuda" else [])
        cases = _routing_cases(dense, x, A, B, w, idx, impls)
        rows[f"routed mixture, {tag}"], baselines[f"routed mixture, {tag}"] = cases, "dense Linear"
        layer = smile_layer(s).to(device, dtype)
        rows[f"SMILE forward, {tag}"] = {
            "dense Linear": lambda layer=layer, x=x: layer.pretrained(x),
            "SmileMoELinear": lambda layer=layer, x=x: layer(x),
        }
        baselines[f"SMILE forward, {tag}"] = "dense Linear"
    gen = torch.Generator().manual_seed(0)
    shape = (s["merge_rows"], s["merge_rows"])
    base = {"w": torch.randn(shape, generator=gen).to(device)}
    models = [
        {"w": base["w"] + 0.01 * torch.randn(shape, generator=gen).to(device)}
        for _ in range(s["merge_models"])
    ]
    rows["merges, float32"] = {
        "floor (sum of the models)": lambda: torch.stack([m["w"] for m in models]).sum(0),
        "task_arithmetic": lambda: task_arithmetic(base, models, model_lambda=0.3),
        "ties (mergekit, exact)": lambda: ties(base, models, top_k=20.0, variant="mergekit"),
    }
    baselines["merges, float32"] = "floor (sum of the models)"
    table = {}
    with torch.inference_mode():
        for row, cases in rows.items():
            times = time_cases({n: _synced(f, device) for n, f in cases.items()}, s["repeats"], warmup=2)
            print_table(f"{row} on {device}", times, baselines[row])
            table[row] = {"baseline": baselines[row], "times": times, "ratio": ratios(times, baselines[row])}
    return table


# -- the command ----------------------------------------------------------------------------------------
def refusal(device: str) -> str | None:
    """Why this machine cannot run the check on `device` (None: it can)."""
    try:
        resolve_device(device)
    except (RuntimeError, ValueError) as e:
        return (
            f"gpu-check needs a CUDA GPU for --device {device}: {e}. On a machine without one, "
            "`python benchmarks/gpu_check.py --device cpu --shapes small` runs the same code on the CPU."
        )
    return None


def run_check(
    device: str,
    out: Path,
    *,
    only: Sequence[str] | None = None,
    shapes: str = "paper",
    work: Path | None = None,
) -> dict[str, Any]:
    """Everything above on `device` (`only`: these pipelines; None: all; [] none); written to `out` atomically."""
    dev = resolve_device(device)
    s = SHAPES[shapes]
    result: dict[str, Any] = {"environment": environment(), "device": str(dev), "shapes": dict(s)}
    if dev.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(dev)
    names = list(PIPELINES) if only is None else list(only)
    unknown = sorted(set(names) - set(PIPELINES))
    if unknown:
        raise ValueError(f"unknown pipeline(s) {unknown}; choose from {sorted(PIPELINES)}")
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        root = Path(work or tmp)
        result["pipelines"] = {n: check_pipeline(n, device, root / n) for n in names}
    result["triton"] = check_triton(dev, s)
    result["bf16"] = check_bf16(dev, s)
    result["timings"] = timing_table(dev, s)
    failed = [f"triton {k}" for k, v in result["triton"].items() if isinstance(v, dict) and not v["ok"]]
    failed += [f"bf16 {k}" for k, v in result["bf16"].items() if not v["ok"]]
    result["ok"] = not failed
    result["failed"] = failed
    write_json(out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (the CPU run of the same code)")
    p.add_argument("--only", nargs="*", choices=sorted(PIPELINES), help="pipelines to run (bare: none)")
    p.add_argument("--shapes", choices=sorted(SHAPES), default="paper", help="timing-table shapes")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    why = refusal(args.device)
    if why:
        print(why, file=sys.stderr)
        return 2
    result = run_check(args.device, args.out, only=args.only, shapes=args.shapes)
    for name, r in result["pipelines"].items():
        print(f"{name}: {r['forwards_checked']} forwards on {r['expected']}, {r['seconds']:.1f} s")
    print(
        f"wrote {args.out}; {'all checks passed' if result['ok'] else 'FAILED: ' + ', '.join(result['failed'])}"
    )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
