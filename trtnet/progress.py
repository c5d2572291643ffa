"""Progress bars for long steps: drawn on an interactive terminal, silent in logs, pipes and tests."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def interactive(stream: IO | None = None) -> bool:
    """True when `stream` (stderr by default) is a terminal a person is watching."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def bar(total: float, desc: str, unit: str = "it", *, min_total: float = 0, **kwargs) -> tqdm:
    """A tqdm bar over `total` units on stderr; disabled off a terminal or when `total < min_total`.

    Use as a context manager and call `.update(n)`; `unit_scale` shows 7.2M rather than 7235389.
    """
    kwargs.setdefault("unit_scale", True)
    kwargs.setdefault("leave", False)
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=total < min_total or not interactive(), **kwargs)


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it", *,
          min_total: float = 0) -> Iterator[T]:
    """Iterate `items` with a bar (see `bar`); `total` defaults to `len(items)` when it has one."""
    total = len(items) if total is None and hasattr(items, "__len__") else total  # type: ignore[arg-type]
    with bar(total or 0, desc, unit, min_total=min_total, unit_scale=False) as progress:
        for item in items:
            yield item
            progress.update(1)
