"""Where ``blockctl`` results go, and its exit statuses.

Exit status: 0 success, 1 the daemon refused a command or the job failed or was cancelled,
2 bad usage, 3 the daemon could not be reached, 130 interrupted.
"""

from __future__ import annotations

import json
import os
from typing import IO, Any, Final

from rich.console import Console
from rich.text import Text

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "PROG",
    "Output",
    "console",
]

PROG: Final = "blockctl"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class Output:
    """Where results go: rich consoles for people, or JSON on stdout."""

    def __init__(self, as_json: bool, out: Console, err: Console) -> None:
        self.json = as_json
        self.out = out
        self.err = err

    def emit_json(self, value: Any) -> None:
        self.out.file.write(json.dumps(value, indent=2, sort_keys=True) + "\n")

    def fail(self, message: str) -> None:
        self.err.print(Text(f"{PROG}: {message}", style="bold red"), soft_wrap=True)


def console(stream: IO[str]) -> Console:
    """A rich console on ``stream``; piped output is not wrapped at 80 columns, so that
    scripts can grep whole lines."""
    width = None if stream.isatty() else int(os.environ.get("COLUMNS") or 200)
    return Console(file=stream, width=width)
