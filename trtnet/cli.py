"""What every `python -m trtnet.<command>` shares: argument parsing and error reporting."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Callable

from trtnet.errors import TrtnetError


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=f"python -m trtnet.{prog}",
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )


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
