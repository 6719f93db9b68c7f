"""Merging N checkpoints stored as safetensors: peak RSS and time of the streaming merge and two baselines.

Row 7 of issue 9. The base and N models (each `--tensors` fp32 tensors of rows × cols) are written to a
temporary folder; every case runs in its own python process (one per repeat, the cases taking turns) that
reports its wall time and its own peak RSS (`ru_maxrss`) above the RSS after its imports. The files live
on tmpfs (`/dev/shm`) where there is one, so that disk writeback, shared with other jobs, is not timed.
Cases:
- streamed: `projects.mats.streaming.merge_safetensors` (one tensor name at a time, views of private
  mappings whose pages are dropped after each name, header written first, atomic);
- naive: every checkpoint loaded whole (`safetensors.torch.load_file`), the in-memory merge, one save;
- mergekit's access pattern (mergekit is not installed in the main venv; emulated): one `safe_open`
  handle per file, `get_tensor` per name as its `LazyTensorLoader`, the same merge per tensor, the merged
  tensors kept until the output shard is written (`--shard-mb`, mergekit's default 5 GB: one shard here);
- mergekit (peer), when `make bench-peers` has made `.venv-peers`: `mergekit-pytorch` (its merge of raw
  safetensors files) on the same files, task arithmetic or TIES, in that venv (its import excluded);
- read only: the streamed reads alone (a sum over each view), no merge or write (the floor; the files
  sit in the page cache).
Usage: python benchmarks/merge_safetensors.py [--models 8 --tensors 16 --rows 1024 --cols 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import _allocations_return_to_the_os, environment

from common.io import write_json

RESULTS = Path(__file__).parent / "results" / "merge_safetensors.json"
ROOT = Path(__file__).resolve().parents[1]
CASES = ("streamed", "naive", "mergekit access pattern (emulated)", "read only")
PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
PEER = "mergekit (peer, mergekit-pytorch)"
# Run in .venv-peers: mergekit-pytorch's click command, timed after its imports, with its own peak RSS.
PEER_SCRIPT = """
import json, resource, sys, time
from mergekit.scripts.merge_raw_pytorch import main
start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
main.main(sys.argv[1:], standalone_mode=False)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_rss_mb_above_start": peak - start_rss, "start_rss_mb": start_rss}))
"""


def peer_command(folder: Path, models: int, method: str, hparams: dict) -> list[str]:
    """mergekit-pytorch on the files: task arithmetic θ0 + Σ λ τi (weight λ per model, no normalisation), or
    TIES (density = top_k/100, weight 1, its default normalisation: the disjoint mean = our variant="mergekit")."""
    import yaml

    if method == "task_arithmetic":
        weight, parameters = hparams["model_lambda"], {"normalize": False}
    else:
        weight, parameters = 1.0, {"density": hparams["top_k"] / 100}
    config = {
        "merge_method": method,
        "base_model": str(folder / "base.safetensors"),
        "models": [
            {"model": str(folder / f"model{j}.safetensors"), "parameters": {"weight": weight}}
            for j in range(models)
        ],
        "parameters": parameters,
        "dtype": "float32",
    }
    (folder / "mergekit.yaml").write_text(yaml.safe_dump(config))
    out = folder / "out-mergekit"
    return [
        str(PEER_PYTHON),
        "-c",
        PEER_SCRIPT,
        str(folder / "mergekit.yaml"),
        str(out),
        "--no-copy-tokenizer",
        "--no-write-model-card",
        "-j",
        "1",
    ]


def write_checkpoints(folder: Path, models: int, tensors: int, rows: int, cols: int) -> list[Path]:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(rows, cols, generator=g) for i in range(tensors)}
    save_file(base, str(folder / "base.safetensors"))
    paths = []
    for j in range(models):
        paths.append(folder / f"model{j}.safetensors")
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(paths[-1]))
    return paths


def run_case(case: str, folder: Path, models: int, method: str, hparams: dict, shard_mb: float) -> dict:
    """In this (fresh) process: run one case, return seconds and peak RSS above the RSS after imports."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from common.io import save_tensors
    from projects.mats.methods import METHODS
    from projects.mats.streaming import SafetensorsReader, merge_safetensors

    _allocations_return_to_the_os()  # freed tensors leave the RSS, in every case alike
    torch.set_num_threads(1)
    base_path, paths = folder / "base.safetensors", [folder / f"model{j}.safetensors" for j in range(models)]
    out = folder / f"out-{case.split()[0]}.safetensors"
    merge = METHODS[method]
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if case == "streamed":
        merge_safetensors(base_path, paths, out, method, **hparams)
    elif case == "naive":
        base = load_file(str(base_path))
        merged = merge(base, [load_file(str(p)) for p in paths], **hparams)
        save_tensors(out, merged)
    elif case.startswith("mergekit"):
        handles = [safe_open(str(p), framework="pt", device="cpu") for p in (base_path, *paths)]
        shard, size = {}, 0
        for name in handles[0].keys():
            b, *ms = (h.get_tensor(name) for h in handles)
            shard[name] = merge({name: b}, [{name: m} for m in ms], **hparams)[name]
            size += shard[name].numel() * shard[name].element_size()
            if size > shard_mb * 2**20:  # not reached at the default shard size
                save_file(shard, str(out.with_suffix(f".{len(shard)}.safetensors")))
                shard, size = {}, 0
        if shard:
            save_file(shard, str(out))
    elif case == "read only":
        readers = [SafetensorsReader(p) for p in (base_path, *paths)]
        for name in readers[0].tensors:
            for r in readers:
                r.view(name).sum()  # touch every page
                r.release(name)
    else:
        raise ValueError(f"unknown case {case!r}; choose one of {CASES}")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.unlink(missing_ok=True)
    return {"seconds": seconds, "peak_rss_mb_above_start": peak - start_rss, "start_rss_mb": start_rss}


def compare_with_peer(folder: Path, models: int, method: str, hparams: dict) -> dict[str, float]:
    """Max |difference| between the streamed merge and mergekit's output (left by its last run), and the
    fraction of entries differing by more than 1e-6 (TIES: a sign elected on a sum that is zero up to
    rounding may go either way in another summation order)."""
    from safetensors.torch import load_file

    from projects.mats.streaming import merge_safetensors

    paths = [folder / f"model{j}.safetensors" for j in range(models)]
    merge_safetensors(folder / "base.safetensors", paths, folder / "ours.safetensors", method, **hparams)
    ours, theirs = load_file(str(folder / "ours.safetensors")), {}
    for f in (folder / "out-mergekit").glob("*.safetensors"):
        theirs.update(load_file(str(f)))
    diffs = [(ours[k] - theirs[k]).abs() for k in ours]
    return {
        "max_abs_diff": max(d.max().item() for d in diffs),
        "fraction_above_1e-6": sum(int((d > 1e-6).sum()) for d in diffs) / sum(d.numel() for d in diffs),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--method", default="task_arithmetic", choices=["task_arithmetic", "average", "ties"])
    parser.add_argument("--shard-mb", type=float, default=5000.0, help="the emulated mergekit's shard size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--tmp",
        type=Path,
        default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
        help="where the checkpoints are written (default: tmpfs, so that disk writeback is not timed)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    hparams = {"ties": {"variant": "mergekit", "top_k": 20.0}, "task_arithmetic": {"model_lambda": 0.3}}
    hparams = hparams.get(args.method, {})
    if args.case:
        print(json.dumps(run_case(args.case, args.folder, args.models, args.method, hparams, args.shard_mb)))
        return {}

    tensor_mb = 4 * args.rows * args.cols / 2**20
    with_peer = PEER_PYTHON.exists() and args.method in ("task_arithmetic", "ties")
    runs: dict[str, list[dict]] = {c: [] for c in (*CASES, PEER) if c != PEER or with_peer}
    peer_vs_streamed = None
    with tempfile.TemporaryDirectory(prefix="merge-bench-", dir=args.tmp) as tmp:
        folder = Path(tmp)
        write_checkpoints(folder, args.models, args.tensors, args.rows, args.cols)
        os.sync()  # flush the new files: the kernel would otherwise throttle the first writer (dirty pages)
        for _ in range(args.repeats):
            for case in runs:
                if case == PEER:
                    cmd = peer_command(folder, args.models, args.method, hparams)
                else:
                    cmd = [sys.executable, __file__, "--case", case, "--folder", tmp]
                    cmd += [
                        "--models",
                        str(args.models),
                        "--method",
                        args.method,
                        "--shard-mb",
                        str(args.shard_mb),
                    ]
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if done.returncode:
                    raise RuntimeError(f"case {case!r} failed:\n{done.stderr[-2000:]}")
                runs[case].append(json.loads(done.stdout.strip().splitlines()[-1]))
        if with_peer:  # mergekit's output of the last round against ours
            peer_vs_streamed = compare_with_peer(folder, args.models, args.method, hparams)
    rows = {}
    for case, rs in runs.items():
        rows[case] = {
            "median_s": statistics.median(r["seconds"] for r in rs),
            "min_s": min(r["seconds"] for r in rs),
            "max_s": max(r["seconds"] for r in rs),
            "peak_rss_mb_above_start": statistics.median(r["peak_rss_mb_above_start"] for r in rs),
            "repeats": len(rs),
        }
    t_naive, m_naive = rows["naive"]["median_s"], rows["naive"]["peak_rss_mb_above_start"]
    print(
        f"merging {args.models} safetensors checkpoints ({args.method}) of {args.tensors} x ({args.rows}x{args.cols}) "
        f"fp32 = {args.tensors * tensor_mb:.0f} MB each; one tensor = {tensor_mb:.0f} MB; one process per run"
    )
    print(f"{'case':<38}{'median s':>10}{'x naive':>10}{'peak MB':>10}{'x tensor':>10}")
    for case, r in rows.items():
        peak = r["peak_rss_mb_above_start"]
        print(
            f"{case:<38}{r['median_s']:>10.3f}{r['median_s'] / t_naive:>10.2f}{peak:>10.0f}{peak / tensor_mb:>10.1f}"
        )
    result = {
        **environment(),
        "shapes": {"models": args.models, "tensors": args.tensors, "rows": args.rows, "cols": args.cols},
        "method": args.method,
        "hparams": hparams,
        "tensor_mb": tensor_mb,
        "checkpoint_mb": args.tensors * tensor_mb,
        "cases": rows,
        "time_ratio_vs_naive": {c: r["median_s"] / t_naive for c, r in rows.items()},
        "peak_ratio_vs_naive": {c: r["peak_rss_mb_above_start"] / m_naive for c, r in rows.items()},
        "peak_in_tensors": {c: r["peak_rss_mb_above_start"] / tensor_mb for c, r in rows.items()},
        "target": "peak memory <= mergekit's (about one tensor x N)",
        "met": rows["streamed"]["peak_rss_mb_above_start"]
        <= rows["mergekit access pattern (emulated)"]["peak_rss_mb_above_start"],
        "mergekit": "timed in .venv-peers (mergekit-pytorch)"
        if with_peer
        else "not installed: emulated only",
        "streamed_vs_mergekit": peer_vs_streamed,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
