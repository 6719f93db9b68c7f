"""Task arithmetic of M models of one (rows × cols) fp32 tensor against the memory-bandwidth floor.

Row 6 of issue 9. Floor: a `torch.sum` over the M models' bytes. Cases: `common.merging.task_arithmetic`
(λ Σ θi + (1 − Mλ) θ0, chunked in the output buffer: each model read once by one in-place add; within
~M ulp of the reference), the reference (`task_arithmetic_reference`: a full-size temporary per model),
and peft's `task_arithmetic` on the same deltas (stack + weighted sum; the deltas are formed first, as its
callers do). Peak RSS above the inputs per case. `--profile` prints torch.profiler's table for the fast
path. `make bench` sets THP_MEM_ALLOC_ENABLE=1 (torch's allocator asks for huge pages: the fresh output
costs ~4x fewer page faults); the JSON records it. Default 2048×2048 on a shared machine; the issue's
shape: --rows 4096 --cols 4096.
Usage: python benchmarks/task_arithmetic.py [--models 8 --rows 4096 --cols 4096 --profile]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import environment, peak_rss_of, print_table, ratios, time_cases
from ties_merge import inputs

from common.io import write_json
from common.merging import task_arithmetic, task_arithmetic_reference

RESULTS = Path(__file__).parent / "results" / "task_arithmetic.json"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of the fast path")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from peft.utils.merge_utils import task_arithmetic as peft_task_arithmetic

    torch.set_num_threads(1)
    base, models = inputs(args.models, args.rows, args.cols)
    w = torch.ones(args.models)
    floor = "floor: torch.sum over the models"
    cases = {
        floor: lambda: [m["w"].sum() for m in models],
        "task_arithmetic (fast)": lambda: task_arithmetic(base, models, scaling=0.3),
        "reference": lambda: task_arithmetic_reference(base, models, scaling=0.3),
        "peft task_arithmetic (peer)": lambda: (
            base["w"] + 0.3 * peft_task_arithmetic([m["w"] - base["w"] for m in models], w)
        ),
    }
    times = time_cases(cases, args.repeats, warmup=1)
    memory = {name: peak_rss_of(fn) for name, fn in cases.items()}
    fast, ref = (
        task_arithmetic(base, models, scaling=0.3),
        task_arithmetic_reference(base, models, scaling=0.3),
    )
    max_diff = max((fast[k] - ref[k]).abs().max().item() for k in base)
    ulp = torch.finfo(torch.float32).eps * max(m["w"].abs().max().item() for m in (base, *models))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            task_arithmetic(base, models, scaling=0.3)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    vs_floor = ratios(times, floor)
    print_table(
        f"task arithmetic, {args.models} x ({args.rows}x{args.cols}) fp32, torch {torch.__version__}, 1 thread; "
        f"fast vs reference: max |diff| {max_diff / ulp:.1f} ulp of max|θ|",
        times,
        floor,
        {"peak MB": {n: f"{m:.0f}" for n, m in memory.items()}},
    )
    result = {
        **environment(),
        "shapes": {"models": args.models, "rows": args.rows, "cols": args.cols},
        "input_mb": 4 * args.rows * args.cols * (args.models + 1) / 2**20,
        "times": times,
        "ratio_vs_floor": vs_floor,
        "target_vs_floor": 2.0,
        "met": vs_floor["task_arithmetic (fast)"] <= 2.0,
        "max_abs_diff_to_reference_in_ulp_of_max_theta": max_diff / ulp,
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
        "peak_rss_mb_above_inputs": memory,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
