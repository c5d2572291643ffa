"""Sanity checks, shared by the families, for the numbers a checkpoint's metadata hands the model builders (class
count, strides, BatchNorm eps), run before anything is allocated from them (a family checks its own head, e.g.
YOLOv5's anchors in networks/yolov5.py): a checkpoint that says
`Detect.nc = 2e8` must be refused with one line, not fill the memory with 2e8 class names.

Each check returns the value in the type the caller wants, or raises TrtnetError naming the file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from trtnet.errors import TrtnetError

MAX_CLASSES = 100_000  # LVIS has 1203, Open Images 601
MAX_LEVELS = 8  # YOLOv5 P5 models have 3 detection levels, P6 models 4
MAX_STRIDE = 4096


def check_count(value: Any, what: str, path: Path | str, limit: int) -> int:
    """A whole number from 1 to `limit` (an int, or a whole float / numpy scalar as pickles hold them)."""
    number = _number(value)
    if number is None or not number.is_integer() or not 1 <= number <= limit:
        raise TrtnetError(f"{path}: {what} = {_show(value)} is not a count from 1 to {limit}: a corrupt or "
                          "tampered checkpoint")
    return int(number)


def check_strides(value: Any, path: Path | str) -> list[int]:
    """The model's detection strides: 1 to MAX_LEVELS whole numbers, increasing, at most MAX_STRIDE."""
    try:
        strides = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        strides = np.zeros(0)
    if not (1 <= strides.size <= MAX_LEVELS and np.isfinite(strides).all() and (strides == np.round(strides)).all()
            and (strides >= 1).all() and (strides <= MAX_STRIDE).all() and (np.diff(strides) > 0).all()):
        raise TrtnetError(f"{path}: the model's strides {_show(value)} are not 1 to {MAX_LEVELS} increasing whole "
                          f"numbers up to {MAX_STRIDE}")
    return [int(s) for s in strides]


def check_eps(value: Any, path: Path | str) -> float:
    """A BatchNorm eps: finite, positive and below 1."""
    number = _number(value)
    if number is None or not 0 < number < 1:
        raise TrtnetError(f"{path}: a BatchNorm eps of {_show(value)} is not a number between 0 and 1")
    return number


def _number(value: Any) -> float | None:
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(-1)[0].item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value) if abs(value) < 1e300 else math.inf
    return number if math.isfinite(number) else None


def _show(value: Any) -> str:
    if isinstance(value, int) and value.bit_length() > 64:
        return f"<a {value.bit_length()}-bit integer>"
    text = repr(value.tolist() if isinstance(value, np.ndarray) and value.size <= 8 else value)
    return text if len(text) <= 60 else f"{text[:57]}..."
