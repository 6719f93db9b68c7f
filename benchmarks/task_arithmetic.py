"""Task arithmetic of M models of one (rows × cols) fp32 tensor against the memory-bandwidth floor.

Row 6 of issue 9. Floor: a `torch.sum` over the M models' bytes. Cases: `projects.mats.merging.task_arithmetic`
(chunked: each model read once, the running sum in cache; bit-identical to the reference), the previous
code (`_task_arithmetic_reference`: a full-size temporary per model), and peft's `task_arithmetic` on the
same deltas (stack + weighted sum; the deltas are formed first, as its callers do). Peak RSS above the
inputs per case. Default 2048×2048 on a shared machine; the issue's shape: --rows 4096 --cols 4096.
Usage: python benchmarks/task_arithmetic.py [--models 8 --rows 4096 --cols 4096]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import environment, peak_rss_of, print_table, ratios, time_cases
from ties_merge import inputs

from common.io import write_json
from projects.mats.merging import _task_arithmetic_reference, task_arithmetic

RESULTS = Path(__file__).parent / "results" / "task_arithmetic.json"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from peft.utils.merge_utils import task_arithmetic as peft_task_arithmetic

    torch.set_num_threads(1)
    base, models = inputs(args.models, args.rows, args.cols)
    w = torch.ones(args.models)
    floor = "floor: torch.sum over the models"
    cases = {
        floor: lambda: [m["w"].sum() for m in models],
        "task_arithmetic (fast, chunked)": lambda: task_arithmetic(base, models, model_lambda=0.3),
        "reference (previous code)": lambda: _task_arithmetic_reference(base, models, model_lambda=0.3),
        "peft task_arithmetic (peer)": lambda: (
            base["w"] + 0.3 * peft_task_arithmetic([m["w"] - base["w"] for m in models], w)
        ),
    }
    times = time_cases(cases, args.repeats, warmup=1)
    memory = {name: peak_rss_of(fn) for name, fn in cases.items()}
    fast, ref = (
        task_arithmetic(base, models, model_lambda=0.3),
        _task_arithmetic_reference(base, models, model_lambda=0.3),
    )
    identical = all(torch.equal(fast[k], ref[k]) for k in base)
    vs_floor = ratios(times, floor)
    print_table(
        f"task arithmetic, {args.models} x ({args.rows}x{args.cols}) fp32, torch {torch.__version__}, 1 thread; "
        f"fast == reference bitwise: {identical}",
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
        "met": vs_floor["task_arithmetic (fast, chunked)"] <= 2.0,
        "bit_identical_to_reference": identical,
        "peak_rss_mb_above_inputs": memory,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
