"""Which process this is under a launcher (torchrun, `accelerate launch`), and output from the main one only.

Launchers set RANK / WORLD_SIZE in each process they start. Training (`common.training.train`) uses every
process; evaluation, result files and printed reports belong to rank 0 alone, so a two-process run prints
its report once. `accelerate launch --cpu --num_processes 2` starts a single process and says nothing
(accelerate wants `--multi_cpu` for that): `prepare_process` notices the ignored request and says so.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def process_rank() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) in a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return process_rank()[0] == 0


def requested_processes(pid: int | None = None) -> int | None:
    """`--num_processes N` of the `accelerate launch` that started this process (its parent's command line,
    read from /proc on Linux), else None."""
    pid = os.getppid() if pid is None else pid
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    head = args[:4]
    by_accelerate = "accelerate.commands.launch" in head or (
        "launch" in head and any(Path(a).name == "accelerate" for a in head)
    )
    if not by_accelerate:
        return None
    for i, a in enumerate(args):
        if a.startswith("--num_processes="):
            return int(a.partition("=")[2])
        if a == "--num_processes" and i + 1 < len(args):
            return int(args[i + 1])
    return None


def launch_warning() -> str | None:
    """A sentence when the launcher started fewer processes than it was asked for, else None."""
    requested, (_, world) = requested_processes(), process_rank()
    if requested is None or requested <= world:
        return None
    return (
        f"warning: accelerate launch was asked for {requested} processes but started {world} "
        "(with --cpu it runs one process unless given --multi_cpu); this run uses "
        f"{world} process(es). On CPU, start them with `torchrun --nproc_per_node {requested} -m ...`"
    )


def prepare_process() -> None:
    """At the start of a CLI: say when a launcher ignored a request; silence stdout on ranks other than 0
    (their reports would repeat rank 0's)."""
    if is_main_process() and (warning := launch_warning()):
        print(warning, file=sys.stderr, flush=True)
    if not is_main_process():
        sys.stdout = open(os.devnull, "w")  # for the rest of this process
