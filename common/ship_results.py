"""Copy a run folder's published outputs into the tracked `results/` tree.

`runs/` is ignored by git: it holds checkpoints, snapshots and caches (hundreds of MB a run). What a reader
needs (tables, result JSONs with their provenance, plots with the data behind them, the configs that made
them) is small, and for the real arm, which takes hours to remake, it has to ship with the code. This keeps
those files and nothing else:

    python -m common.ship_results runs/phatgoose/real results/phatgoose/real

Kept: files ending in SUFFIXES, at most `max_bytes` each, outside any hidden folder (`.partial/`, locks)
and outside KEEP_OUT folders (training state). Each copy is atomic; files already in `dest` that `src` no
longer has are left alone (a run folder may hold one seed of several) and listed.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from common.io import atomic_path

SUFFIXES = (".json", ".md", ".png", ".yaml", ".csv")
KEEP_OUT = frozenset({"checkpoints", "snapshots", "adapters", "experts", "models", "stats"})
MAX_BYTES = 2_000_000


def shippable(src: Path, max_bytes: int = MAX_BYTES) -> tuple[list[Path], list[Path]]:
    """(files to ship, files too large), both relative to `src`, sorted."""
    keep, large = [], []
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src)
        if path.suffix not in SUFFIXES or any(part.startswith(".") or part in KEEP_OUT for part in rel.parts):
            continue
        (large if path.stat().st_size > max_bytes else keep).append(rel)
    return keep, large


def ship(src: Path, dest: Path, max_bytes: int = MAX_BYTES) -> dict[str, list[Path]]:
    """Copy `shippable(src)` to the same relative paths under `dest`; returns what was copied, what was
    too large to ship, and what `dest` holds that `src` does not."""
    src, dest = Path(src), Path(dest)
    if not src.is_dir():
        raise SystemExit(f"ship_results: {src} is not a folder (run the experiment first)")
    keep, large = shippable(src, max_bytes)
    if not keep:
        raise SystemExit(f"ship_results: {src} holds no {'/'.join(SUFFIXES)} outputs to ship")
    for rel in keep:
        with atomic_path(dest / rel) as tmp:
            tmp.write_bytes((src / rel).read_bytes())
    shipped = set(keep)
    others = [p.relative_to(dest) for p in sorted(dest.rglob("*")) if p.is_file()]
    return {"copied": keep, "too_large": large, "only_in_dest": [p for p in others if p not in shipped]}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m common.ship_results", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("src", type=Path, help="a run folder, e.g. runs/phatgoose/real")
    parser.add_argument("dest", type=Path, help="where it ships, e.g. results/phatgoose/real")
    parser.add_argument("--max-bytes", type=int, default=MAX_BYTES, help="larger files are not shipped")
    args = parser.parse_args(argv)
    report = ship(args.src, args.dest, args.max_bytes)
    print(f"shipped {len(report['copied'])} files from {args.src} to {args.dest}")
    for what in ("too_large", "only_in_dest"):
        if report[what]:
            print(f"{what.replace('_', ' ')}: " + ", ".join(map(str, report[what])))


if __name__ == "__main__":
    main()
