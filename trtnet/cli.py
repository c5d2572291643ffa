"""What every `trtnet <command>` shares: argument parsing and error reporting.

Each command module has `parser()` (its options) and `main(argv)`; `trtnet/__main__.py` builds the top-level
`trtnet` parser with one sub-command per module from those parsers. Usage lines read `trtnet COMMAND …` whichever
way the command was started (`trtnet build`, `python -m trtnet build`, `python -m trtnet.build` run the same code).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Callable

from trtnet.errors import TrtnetError

PROG = "trtnet"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends `(default: X)` only where it says something: not for None, nor for flags, nor when the help already
    names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        flag = action.nargs == 0  # --fp16 (store_const into `precision`): the default is not this flag's
        if flag or default in (None, argparse.SUPPRESS) or "default" in text.lower() or not action.option_strings:
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def weights_dir_default() -> str:
    """Where weights and engines live unless a command is told otherwise: $TRTNET_WEIGHTS, else weights/."""
    return os.environ.get("TRTNET_WEIGHTS", "weights")


def add_weights_dir(p: argparse.ArgumentParser, what: str) -> None:
    """Every command's --weights-dir, with one default."""
    p.add_argument("--weights-dir", default=weights_dir_default(), help=f"{what} ($TRTNET_WEIGHTS)")


def command_parser(command: str, description: str, add_help: bool = True) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"{PROG} {command}", description=description,
                                   formatter_class=HelpFormatter, add_help=add_help)


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command's main; a TrtnetError becomes `error: …` on stderr and exit status 2."""
    try:
        return main(argv) or 0
    except TrtnetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
