"""User errors and the one `main` wrapper every entrypoint runs under.

A `UserError` is a mistake in the user's input (a config value, a path, a file's contents): the wrapper
prints its message as one `error: ...` line and exits with status 2, without a traceback. Any other
exception is a bug and keeps its traceback. `--debug` on the command line (removed before `main` sees
it) or `MOERGING_DEBUG=1` in the environment shows the traceback for user errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

DEBUG_ENV = "MOERGING_DEBUG"


class UserError(ValueError):
    """A bad input the user can fix; the message names the value, the file and what to do."""


class UnknownNameError(UserError, KeyError):
    """A name missing from a registry (a KeyError too, for callers that catch that)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _on_failure() -> None:
    """Remove what a failed run left half-made (run folders holding only their config)."""
    from common.rundir import discard_unfinished

    discard_unfinished()


def run_main(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)`; a `UserError` becomes `error: <message>` on stderr and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        main(argv)
    except (UserError, FileNotFoundError) as e:
        _on_failure()
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        print(f"(run with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 2
    except BaseException:
        _on_failure()
        raise
    return 0
