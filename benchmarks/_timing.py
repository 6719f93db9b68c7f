"""Shared by the benchmark scripts: interleaved wall-clock timing, peak RSS, the run's environment.

Not a benchmark itself (running it does nothing). Each script runs with one thread; the cases of one
table take turns, so load from other processes on a shared machine falls on all of them alike and the
ratios measured in one run stay fair even when the absolute times do not.
"""

from __future__ import annotations

import argparse
import platform
import random
import resource
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def time_cases(
    cases: Mapping[str, Callable[[], object]],
    repeats: int | Mapping[str, int],
    warmup: int | Mapping[str, int] = 1,
) -> dict[str, dict[str, float]]:
    """Per case: median, min, max, p25, p75 wall time in ms and the repeat count. `repeats` and `warmup`
    may differ per case (slow references get fewer); cases with runs left take turns round by round."""
    rep = {n: repeats[n] if isinstance(repeats, Mapping) else repeats for n in cases}
    warm = {n: warmup[n] if isinstance(warmup, Mapping) else warmup for n in cases}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for step in range(max(warm[n] + rep[n] for n in cases)):
        for name, fn in cases.items():
            if step >= warm[name] + rep[name]:
                continue
            start = time.perf_counter()
            fn()
            if step >= warm[name]:
                times[name].append(time.perf_counter() - start)
    out = {}
    for name, ts in times.items():
        ms = sorted(1e3 * t for t in ts)
        q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
        out[name] = {
            "median_ms": statistics.median(ms),
            "min_ms": ms[0],
            "max_ms": ms[-1],
            "p25_ms": q[0],
            "p75_ms": q[2],
            "repeats": len(ms),
        }
    return out


def ratios(times: Mapping[str, Mapping[str, float]], baseline: str) -> dict[str, float]:
    """Median of each case over the baseline's median."""
    base = times[baseline]["median_ms"]
    return {name: t["median_ms"] / base for name, t in times.items()}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports ru_maxrss in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def environment() -> dict[str, object]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "note": "shared 2-core machine (other jobs training); ratios are within one run",
    }


def print_table(title: str, times: Mapping[str, Mapping[str, float]], baseline: str, extra=None) -> None:
    """name, median, [p25, p75], ratio to the baseline, and optional extra columns {col: {name: str}}."""
    extra = extra or {}
    print(title)
    head = f"{'case':<40}{'median ms':>12}{'p25–p75 ms':>20}{'x ' + baseline[:14]:>18}"
    print(head + "".join(f"{col:>16}" for col in extra))
    base = times[baseline]["median_ms"]
    for name, t in times.items():
        spread = f"{t['p25_ms']:.3g}–{t['p75_ms']:.3g}"
        row = f"{name:<40}{t['median_ms']:>12.4g}{spread:>20}{t['median_ms'] / base:>18.4g}"
        print(row + "".join(f"{col_vals.get(name, '')!s:>16}" for col_vals in extra.values()))


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: write 5 to /proc/self/clear_refs); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_peak_rss_mb() -> float:
    """VmHWM (peak RSS since the last reset) in MB, or ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def _allocations_return_to_the_os() -> None:
    # glibc serves allocations above a dynamic threshold (up to 32 MB) from its heap and keeps freed
    # ones, so a case would reuse pages touched by the one before and show no peak; fix it at 64 kB.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_rss_of(fn: Callable[[], object]) -> float:
    """Peak RSS while running fn, in MB above the RSS before it (one run; the result is dropped)."""
    import gc

    _allocations_return_to_the_os()
    gc.collect()
    reset_peak_rss()
    before = current_peak_rss_mb()
    out = fn()
    peak = current_peak_rss_mb()
    del out
    gc.collect()
    return peak - before


# --- the scripts on SmolLM2-135M (issue 21) --------------------------------------------------------


def add_run_args(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """--threads, --repeats, --quick (a smoke run: `quick_help` says what it cuts) and --out."""
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument(
        "--out", type=Path, default=None, help="default: results/<name>_<threads>t[_quick].json"
    )


def result_path(name: str, args: argparse.Namespace) -> Path:
    """`--out`, or results/<name>_<threads>t[_quick].json."""
    return args.out or RESULTS / f"{name}_{args.threads}t{'_quick' if args.quick else ''}.json"


def smollm2(threads: int, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(SmolLM2-135M-Instruct in eval mode, its tokenizer), with torch set to `threads` intra-op threads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.tiny_world import real_base

    torch.set_num_threads(threads)
    path = real_base("smollm2-135m")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), AutoTokenizer.from_pretrained(path)


def sample_rows(data: Any, items: int, seed: int = 0) -> Any:
    """`items` rows of a `datasets.Dataset` drawn without replacement (seeded; all rows if it has fewer)."""
    picked = random.Random(seed).sample(range(len(data)), min(items, len(data)))
    return data.select(picked)
