"""The leaderboard's published form: table, plot and RESULTS.md section from the per-seed result JSONs.

Reads `<out>/seed_<s>/<entry>.json` (written by `leaderboard.run`), and writes `<out>/table.md`,
`<out>/leaderboard.png` with its data `<out>/leaderboard_plot.json` (test score against parameters
stored relative to the base, mean ± std over seeds, in-distribution and held-out panels), and the
`## leaderboard` section of RESULTS.md (the other sections are left as they are), which also shows MaTS's
merges on the (IA)^3 and full fine-tuning zoos found in `<out>/ia3/` and `<out>/full/`.

    python -m leaderboard.report [--out results/leaderboard] [--results-md RESULTS.md]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.io import read_json, write_json, write_text
from common.rundir import markdown_table
from common.seed_stats import format_pm, seed_summary

SECTION = "leaderboard"
TITLE = "leaderboard: every routing and merging method on the SmolLM2-135M expert zoo"


def fingerprint(result: Mapping[str, Any]) -> str | None:
    """The expert-weights fingerprint a result was computed on (None: written before they were recorded)."""
    return (result.get("models") or {}).get("fingerprint")


def _adapter(result: Mapping[str, Any]) -> str:
    """The zoo adapter a result was computed on (results from before adapters were recorded: LoRA)."""
    return (result.get("zoo_settings") or {}).get("adapter", "lora")


def load(out: Path) -> list[dict[str, Any]]:
    """Every (seed, entry) result under `out`, by seed then entry name. The entries of one seed must have
    been computed on the same expert weights (`leaderboard.run.models_record`): a table mixing them would
    compare methods on different zoos, so it is refused with the command that recomputes the stale ones.
    Likewise a table whose seeds are some recorded and some older (no record of their weights): the older
    ones may come from a zoo since retrained, and a mean over seeds would mix the two zoos."""
    paths = sorted(out.glob("seed_*/*.json"))
    results = [read_json(p) for p in paths]
    by_folder: dict[str, list[dict[str, Any]]] = {}
    for p, r in zip(paths, results):
        by_folder.setdefault(p.parent.name, []).append(r)
    fingerprints: dict[str, set[str | None]] = {}
    for folder in sorted(by_folder):
        groups: dict[str | None, list[str]] = {}
        for r in by_folder[folder]:
            groups.setdefault(fingerprint(r), []).append(r["entry"])
        fingerprints[folder] = set(groups)
        if len(groups) > 1:
            said = "; ".join(
                f"{', '.join(names)} on {fp or 'unrecorded weights (older results)'}"
                for fp, names in groups.items()
            )
            names = " ".join(n for ns in groups.values() for n in ns)
            seed, adapter = folder.removeprefix("seed_"), _adapter(by_folder[folder][0])
            raise SystemExit(
                f"{out}: seed {seed}'s entries were computed on different expert weights ({said}); "
                f"`python -m leaderboard.run --adapter {adapter} --seeds {seed} --entries {names} --out {out}` "
                "recomputes those not made on the cached experts"
            )
    older = [folder for folder, fps in fingerprints.items() if fps == {None}]  # sorted, as inserted
    if older and len(older) < len(fingerprints):
        seeds, adapter = " ".join(f.removeprefix("seed_") for f in older), _adapter(results[0])
        raise SystemExit(
            f"{out}: {', '.join(older)} hold results with no record of their expert weights (older results) "
            f"beside seeds that record them; a mean over seeds could mix two zoos. "
            f"`python -m leaderboard.run --adapter {adapter} --seeds {seeds} --out {out}` recomputes them"
        )
    return results


def _ranked(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """Entry names by mean in-distribution test score, best first (entries without one last)."""
    names = list(dict.fromkeys(r["entry"] for r in results))
    stats = {n: seed_summary([r["in_distribution"] for r in results if r["entry"] == n]) for n in names}
    return sorted(names, key=lambda n: -stats[n][0] if stats[n] else float("inf"))


def rows(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per entry: test scores x100 (mean ± std over seeds), parameters / base, tokens/s, choices."""
    out = []
    for name in _ranked(results):
        rs = [r for r in results if r["entry"] == name]
        tps = [r["tokens_per_s"] for r in rs if r.get("tokens_per_s")]
        out.append(
            {
                "method": name,
                "seeds": len(rs),
                "in-distribution": format_pm([r["in_distribution"] for r in rs], 100),
                "held-out": format_pm([r["held_out"] for r in rs], 100),
                "params / base": f"{statistics.fmean(r['params_vs_base'] for r in rs):.3f}",
                "tokens/s": f"{statistics.fmean(tps):.0f}" if tps else "—",
                "chosen on validation": "; ".join(str(r["hparams"]) for r in rs if r["hparams"]) or "—",
            }
        )
    return out


def plot_data(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per entry: parameters / base and the (mean, std, n) of each test score: the plot's data."""
    data = {}
    for name in dict.fromkeys(r["entry"] for r in results):
        rs = [r for r in results if r["entry"] == name]
        data[name] = {
            "params_vs_base": statistics.fmean(r["params_vs_base"] for r in rs),
            "in_distribution": seed_summary([r["in_distribution"] for r in rs]),
            "held_out": seed_summary([r["held_out"] for r in rs]),
        }
    return data


def plot(data: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    colours = {name: f"C{i % 10}" for i, name in enumerate(data)}  # one colour per method in both panels
    for ax, key, title in zip(axes, ("in_distribution", "held_out"), ("library tasks", "held-out tasks")):
        for name, d in data.items():
            if d[key] is None:
                continue
            mean, std, _ = d[key]
            ax.errorbar(
                d["params_vs_base"], 100 * mean, yerr=100 * std, fmt="o", capsize=3, color=colours[name]
            )
            ax.annotate(
                name, (d["params_vs_base"], 100 * mean), fontsize=7, xytext=(4, 2), textcoords="offset points"
            )
        ax.set(
            xlabel="parameters stored / base", ylabel="test score x100 (mean ± std over seeds)", title=title
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replace_section(text: str, name: str, body: str) -> str:
    """`text` (a RESULTS.md) with its `## <name>...` section replaced by `body`, or `body` inserted
    before the first `## ` section when there is none."""
    lines = text.splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("## ")]
    mine = [i for i in heads if lines[i][3:].partition(":")[0].strip() == name]
    block = [*body.rstrip("\n").splitlines(), ""]
    if mine:
        start = mine[0]
        end = next((i for i in heads if i > start), len(lines))
        lines[start:end] = block
    else:
        at = heads[0] if heads else len(lines)
        lines[at:at] = block
    return "\n".join(lines).rstrip("\n") + "\n"


# The zoos MaTS merges, kept in <out>/<adapter>/ (`leaderboard.run --adapter ia3|full`): each gets its own table
# under the LoRA zoo's in RESULTS.md, in distribution only (their tasks are zoo.MERGE_TASKS).
MERGE_ZOOS = {"ia3": "(IA)^3", "full": "full fine-tuning"}


def section(
    results: Sequence[Mapping[str, Any]],
    out: Path,
    zoos: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> str:
    """RESULTS.md's leaderboard section: the LoRA zoo's table, then one table per merge zoo with results."""
    seeds = sorted({r["seed"] for r in results})
    lines = [
        f"## {TITLE}",
        "",
        f'`make leaderboard` (README "The real scale"); seeds {seeds}; test scores x100: accuracy for '
        "classification, Rouge-L for generation, averaged over the 13 library tasks (in-distribution) "
        "and the 4 held-out tasks; hyperparameters chosen on validation, test read once. Data: "
        f"`{out}/`, plot `{out}/leaderboard.png`. tokens/s: one forward pass over 16 validation prompts "
        "on one core of a shared machine; models of the base's shape (merges, multitask) differ from the "
        "base only by that measurement's noise.",
        "",
        markdown_table(rows(results)),
        "",
    ]
    for adapter, zoo_results in (zoos or {}).items():
        tasks = sorted({t for r in zoo_results for t in r["test"]})
        lines += [
            f"### MaTS's merges on the {MERGE_ZOOS[adapter]} zoo",
            "",
            f"`python -m leaderboard.run --adapter {adapter}`; seeds {sorted({r['seed'] for r in zoo_results})}; "
            f"test accuracy x100 averaged over its {len(tasks)} tasks ({', '.join(tasks)}), in distribution "
            f"only, as MaTS's table. Data: `{out / adapter}/`; the paper's comparison: projects/mats/README.md.",
            "",
            markdown_table([{k: v for k, v in row.items() if k != "held-out"} for row in rows(zoo_results)]),
            "",
        ]
    return "\n".join(lines)


def publish(out: Path, results_md: Path | None) -> str:
    """Write `out`'s table, plot and plot data; with `results_md`, its leaderboard section (the merge zoos'
    tables from `out/<adapter>/` included where they hold results). Returns the table."""
    results = load(out)
    if not results:
        raise SystemExit(f"no leaderboard results under {out}/seed_*/: run `make leaderboard` first")
    table = markdown_table(rows(results))
    write_text(out / "table.md", table + "\n")
    data = plot_data(results)
    write_json(out / "leaderboard_plot.json", data)
    plot(data, out / "leaderboard.png")
    if results_md is not None:
        zoos = {a: found for a in MERGE_ZOOS if (found := load(out / a))}
        previous = results_md.read_text() if results_md.is_file() else "# Results\n"
        write_text(results_md, replace_section(previous, SECTION, section(results, out, zoos)))
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m leaderboard.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("results/leaderboard"))
    parser.add_argument("--results-md", default="RESULTS.md", help="'' to leave it alone")
    args = parser.parse_args(argv)
    print(publish(args.out, Path(args.results_md) if args.results_md else None))


if __name__ == "__main__":
    main()
