"""Gather every `results.json` under a runs folder into RESULTS.md: per paper, our figures
(mean ± std over seeds) beside the paper's, and for each of the paper's claims whether our runs show it.

The file is updated per project and experiment: a project with no results under the runs folder keeps its
section of the existing RESULTS.md, an experiment with none keeps its table and its claims' grades, and
with no results at all the file is left alone (an error says so).

Each project states its paper's numbers and claims as data in `projects/<name>/paper.yaml`:

    paper: <title>
    experiments:
      <experiment>:                 # matches "experiment" in results.json
        title: <table caption>
        paper: {<metric>: <paper value>, ...}
      <name>:                       # a table of one scale's runs of an experiment (optional)
        experiment: <experiment>    # the runs' "experiment"
        scale: <scale>              # their "scale": such runs go to this table only, not to <experiment>'s
    claims:
      - text: <the claim, in the paper's words>
        experiment: <experiment>
        lhs: <metric>               # compared on the mean over seeds
        op: "<"                     # one of < <= > >=
        rhs: <metric or number>
"""

from __future__ import annotations

import argparse
import math
import operator
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from common.io import read_json, write_text
from common.registry import lookup
from common.rundir import SCHEMA, markdown_table
from common.seed_stats import seed_summary

OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
PROJECTS_DIR = Path(__file__).resolve().parents[1] / "projects"


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested metric dicts -> {"a.b": number}; non-numbers are dropped."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def load_results(runs: str | Path, scale: str | None = None) -> list[dict[str, Any]]:
    """Every results.json under `runs` with our schema (and the given scale, if any)."""
    found = []
    for path in sorted(Path(runs).rglob("results.json")):
        record = read_json(path)
        if record.get("schema") != SCHEMA or (scale and record.get("scale") != scale):
            continue
        record["_path"] = str(path)
        found.append(record)
    return found


def aggregate(
    records: Iterable[Mapping[str, Any]],
) -> dict[tuple[str, str], dict[str, tuple[float, float, int]]]:
    """(project, experiment) -> metric -> (mean, std, n) over seeds (std is the sample std; 0 for n=1)."""
    values: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        for name, v in flatten(r["metrics"]).items():
            values[(r["project"], r["experiment"])][name].append(v)
    return {key: {m: seed_summary(vs) for m, vs in metrics.items()} for key, metrics in values.items()}


def check_claim(claim: Mapping[str, Any], stats: Mapping[str, tuple[float, float, int]]) -> str:
    """'yes' / 'no' / 'not run' for one claim, compared on means; qualified with ", within the seed
    spread" when the two means differ by less than the larger of their standard deviations over seeds, and
    with ", one seed" when a side has a single seed (no spread to compare with yet)."""
    op = lookup(OPS, claim["op"], "comparison")
    lhs = stats.get(claim["lhs"])
    rhs = claim["rhs"]
    if isinstance(rhs, (int, float)):
        rhs_value, rhs_std = float(rhs), 0.0
    else:
        rhs_value, rhs_std = (stats.get(rhs) or (None, 0.0))[:2]
    if lhs is None or rhs_value is None or math.isnan(lhs[0]):
        return "not run"
    verdict = "yes" if op(lhs[0], rhs_value) else "no"
    if abs(lhs[0] - rhs_value) < max(lhs[1], rhs_std):
        verdict += ", within the seed spread"
    seeds = [lhs[2]] + ([] if isinstance(rhs, (int, float)) else [stats[rhs][2]])
    if min(seeds) == 1:
        verdict += ", one seed"
    return verdict


def assign_tables(
    records: Iterable[Mapping[str, Any]], specs: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """`records` with "experiment" set to the table that shows them: a paper.yaml entry naming the record's
    experiment and scale (the real arm of an experiment the tiny arm also runs gets tables of its own),
    else the experiment itself. `specs`: project -> its paper.yaml."""
    tables = {
        (project, info["experiment"], info["scale"]): name
        for project, spec in specs.items()
        for name, info in (spec.get("experiments") or {}).items()
        if "scale" in info
    }
    return [
        {**r, "experiment": tables.get((r["project"], r["experiment"], r.get("scale")), r["experiment"])}
        for r in records
    ]


def _pm(stat: tuple[float, float, int] | None) -> str:
    if stat is None:
        return "—"
    mean, std, n = stat
    return f"{mean:.4g} ± {std:.2g} (n={n})" if n > 1 else f"{mean:.4g} (n=1)"  # one seed: no spread


def _headed_blocks(text: str, marker: str, key: Callable[[str], str] = str.strip) -> dict[str, list[str]]:
    """The lines of `text` from each line starting with `marker` up to the next such line, by `key(heading)`
    (lines before the first heading are dropped; blocks with the same key are joined)."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith(marker):
            current = found.setdefault(key(line[len(marker) :]), [])
        if current is not None:
            current.append(line)
    return found


def _previous_parts(section: str) -> tuple[dict[str, str], dict[str, str]]:
    """A project section of an earlier RESULTS.md: its experiment tables by `### ` title, and its claims'
    grades by claim text."""
    tables = _headed_blocks(section, "### ")
    grades = {}
    for line in tables.pop("Claims", []):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] not in ("claim", "---"):
            grades[cells[0]] = cells[1]
    return {title: "\n".join(lines).rstrip("\n") for title, lines in tables.items()}, grades


def render_project(
    project: str,
    spec: Mapping[str, Any],
    stats: Mapping[tuple[str, str], Any],
    previous: str | None = None,
) -> str:
    """One project's section: a table per experiment (ours beside the paper's) and its claims. An experiment
    with no results in `stats` keeps its table and its claims' grades from `previous` (the project's section
    of the file as committed), so runs of one arm of a project do not wipe the others'."""
    old_tables, old_grades = _previous_parts(previous or "")
    parts = [f"## {project}: {spec.get('paper', '')}", ""]
    for exp, info in (spec.get("experiments") or {}).items():
        title = info.get("title", exp)
        ours = stats.get((project, exp), {})
        if not ours and title in old_tables:
            parts += [old_tables[title], ""]
            continue
        paper = info.get("paper") or {}
        rows = [
            {"metric": m, "ours": _pm(ours.get(m)), "paper": paper.get(m, "—")}
            for m in dict.fromkeys([*paper, *ours])
        ]
        parts += [f"### {title}", "", markdown_table(rows), ""]
    claims = spec.get("claims") or []
    if claims:
        rows = []
        for c in claims:
            ours = stats.get((project, c["experiment"]), {})
            grade = check_claim(c, ours)
            if not ours and c["text"] in old_grades:
                grade = old_grades[c["text"]]
            rows.append({"claim": c["text"], "shown by our runs": grade})
        parts += ["### Claims", "", markdown_table(rows), ""]
    return "\n".join(parts)


def sections(text: str) -> dict[str, str]:
    """An existing RESULTS.md's sections by project (`## <project>: <paper>` up to the next `## `)."""
    found = _headed_blocks(text, "## ", lambda heading: heading.partition(":")[0].strip())
    return {project: "\n".join(lines).rstrip("\n") + "\n" for project, lines in found.items()}


def render(
    records: list[dict[str, Any]], projects_dir: Path = PROJECTS_DIR, previous: str | None = None
) -> str:
    """RESULTS.md from `records`; a project with no record keeps its section of `previous` (the file as
    committed), so a checkout holding one project's runs does not wipe the others' tables."""
    papers = sorted(projects_dir.glob("*/paper.yaml"))
    specs = {p.parent.name: yaml.safe_load(p.read_text()) or {} for p in papers}
    stats = aggregate(assign_tables(records, specs))
    ran = {r["project"] for r in records}
    kept = sections(previous or "")
    parts = [
        "# Results",
        "",
        "Generated by `python -m common.results_md` from the runs' `results.json` files.",
        "",
    ]
    # sections that no project owns (the leaderboard's, written by `leaderboard.report`) stay, first
    parts += [text for name, text in kept.items() if name not in {p.parent.name for p in papers}]
    for paper_file in papers:
        project = paper_file.parent.name
        if project not in ran and project in kept:
            parts.append(kept[project])
            continue
        parts.append(render_project(project, specs[project], stats, kept.get(project)))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs", help="folder searched for results.json files")
    parser.add_argument("--scale", default="tiny", help="only results of this scale ('' for all)")
    parser.add_argument("--out", default="RESULTS.md")
    args = parser.parse_args(argv)
    records = load_results(args.runs, args.scale or None)
    out = Path(args.out)
    previous = out.read_text() if out.is_file() else None
    if not records and previous is not None and sections(previous):
        raise SystemExit(
            f"error: no results.json of scale {args.scale or 'any'!r} under {args.runs}: refusing to replace "
            f"{out}'s tables with empty ones; run the experiments first or pass --runs <folder with runs>"
        )
    write_text(out, render(records, previous=previous))
    print(f"wrote {out} from {len(records)} results ({', '.join(sorted({r['project'] for r in records}))})")


if __name__ == "__main__":
    main()
