"""Weights files: tensorrtx's text `.wts` (with trtnet's `.json` beside it) and `.safetensors`.

A `.wts` file is the number of tensors on line 1, then one line per tensor: `name count v1 v2 …`, each
value a float32's big-endian bytes as 8 lowercase hex digits — what tensorrtx's C++ loaders read
(`>>` on whitespace, so its own writers' two-space and one-space variants read alike). The sidecar
`.json` adds what `.wts` cannot hold: tensor shapes and the model metadata the network builders need.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trtnet import __version__
from trtnet.errors import TrtnetError
from trtnet.fileio import atomic_write, sha256_of
from trtnet.progress import bar
from trtnet.sidecar import PARTNER_KEY, check_partner, validate_weights_meta, with_partner

FORMATS = ("wts", "safetensors")
SUFFIXES = {"wts": ".wts", "safetensors": ".safetensors"}
PROGRESS_MIN_VALUES = 2_000_000  # below this a .wts writes in well under a second
_HEX_VALUE = re.compile(rb"[0-9a-fA-F]{8}")


@dataclass
class Weights:
    tensors: OrderedDict[str, np.ndarray]  # float32; real shapes when the metadata has them, else 1-D
    meta: dict  # empty for a .wts without its .json (e.g. one tensorrtx's gen_wts.py wrote)
    path: Path


# -- writing ---------------------------------------------------------------------------------------


def write_wts(path: str | Path, tensors: Mapping[str, np.ndarray], progress: bool = True) -> Path:
    """Write tensors (any float dtype; stored as float32) in tensorrtx's .wts format, atomically."""
    path = Path(path)
    total = sum(np.size(v) for v in tensors.values())
    with atomic_write(path, "wb", expected_bytes=wts_bytes(tensors)) as f, bar(total, f"writing {path.name}", "float",
                                             min_total=PROGRESS_MIN_VALUES if progress else math.inf) as shown:
        f.write(b"%d\n" % len(tensors))
        for name, value in tensors.items():
            f.write(wts_line(name, value))
            shown.update(np.size(value))
    return path


def wts_bytes(tensors: Mapping[str, np.ndarray]) -> int:
    """The size of the .wts file `write_wts` writes for `tensors`."""
    header = len(b"%d\n" % len(tensors))
    return header + sum(len(name) + len(str(np.size(v))) + 2 + 9 * np.size(v) for name, v in tensors.items())


def check_finite(tensors: Mapping[str, np.ndarray], source: str | Path) -> None:
    """Refuse NaN or infinite weights, naming the first tensor that has any: they build an engine that outputs NaN."""
    for name, value in tensors.items():
        value = np.asarray(value)
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            bad = value[~np.isfinite(value)]
            raise TrtnetError(f"{source}: tensor {name} has {bad.size} NaN or infinite value(s) (e.g. {bad.flat[0]}); "
                              "the checkpoint is corrupt or diverged in training")


def wts_line(name: str, value: np.ndarray) -> bytes:
    """`name count hex hex …\\n` with each float32 as 8 hex digits of its big-endian bytes."""
    if not name or any(c.isspace() for c in name):
        raise TrtnetError(f"tensor name {name!r} cannot be written to a .wts file (empty or contains whitespace)")
    flat = np.asarray(value, dtype=">f4").reshape(-1)
    values = flat.tobytes().hex(" ", 4)  # a space between every 4 bytes: one float per token
    return f"{name} {flat.size}{' ' if flat.size else ''}{values}\n".encode("ascii")


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray], meta: Mapping) -> Path:
    """Write float32 tensors with `meta` as JSON under the header's `trtnet` key, atomically."""
    from safetensors.numpy import save

    arrays = {k: np.asarray(v, dtype=np.float32, order="C") for k, v in tensors.items()}
    data = save(arrays, metadata={"trtnet": json.dumps(dict(meta))})
    path = Path(path)
    with atomic_write(path, "wb") as f:
        f.write(data)
    return path


def weights_meta(meta: Mapping, tensors: Mapping[str, np.ndarray], source: str | Path, fmt: str) -> dict:
    """The metadata stored beside the tensors: the checkpoint's meta plus shapes and provenance."""
    source = Path(source)
    return {
        **meta,
        "shapes": {name: list(np.shape(v)) for name, v in tensors.items()},
        "source": source.name,
        "source_sha256": sha256_of(source),
        "trtnet_version": __version__,
        "format": fmt,
    }


def sidecar_path(wts_path: str | Path) -> Path:
    return Path(wts_path).with_suffix(".json")


def write_sidecar(wts_path: str | Path, meta: Mapping) -> Path:
    """Write the metadata of an already written `wts_path`, with its size and sha256 (see trtnet.sidecar)."""
    path = sidecar_path(wts_path)
    meta = with_partner(meta, wts_path)
    with atomic_write(path, "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    return path


# -- reading ---------------------------------------------------------------------------------------


def load_weights(path: str | Path) -> Weights:
    """Read a .wts (with its .json when present) or a .safetensors file, validating as it goes."""
    path = Path(path)
    if not path.is_file():
        raise TrtnetError(f"weights file not found: {path}")
    if path.suffix in (".pt", ".pth"):
        raise TrtnetError(f"{path} is a PyTorch checkpoint: convert it first with `python -m trtnet.gen_wts {path}`")
    if path.suffix == ".safetensors":
        tensors, meta = _read_safetensors(path)
    else:
        meta = _read_sidecar(path)  # first: a stale sidecar is refused before a long read of the wrong file
        tensors = read_wts(path)
    return Weights(_apply_shapes(tensors, meta.get("shapes"), path), meta, path)


def read_wts(path: str | Path) -> OrderedDict[str, np.ndarray]:
    """The tensors of a .wts file as flat float32 arrays, in file order."""
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise TrtnetError(f"{path} is empty: a .wts file starts with its number of tensors (rewrite it with gen_wts)")
    expected = _header_count(path, lines[0])
    body = lines[1:]
    tensors: OrderedDict[str, np.ndarray] = OrderedDict()
    for lineno, line in enumerate(body, start=2):
        name, values = _parse_line(path, lineno, line, is_last=lineno == len(body) + 1)
        if name in tensors:
            raise TrtnetError(f"{path}:{lineno}: tensor {name} appears twice")
        tensors[name] = values
    if len(tensors) != expected:
        hint = " — the file is truncated" if len(tensors) < expected else ""
        raise TrtnetError(f"{path}: line 1 says {expected} tensors but the file has {len(tensors)}{hint}")
    return tensors


def _header_count(path: Path, line: bytes) -> int:
    try:
        count = int(line)
    except ValueError:
        count = -1
    if count < 0:
        raise TrtnetError(f"{path}:1: expected the number of tensors, found {line[:40].decode('latin-1')!r}; "
                          "is this a .wts file?")
    return count


def _parse_line(path: Path, lineno: int, line: bytes, is_last: bool) -> tuple[str, np.ndarray]:
    parts = line.split(None, 2)
    where = f"{path}:{lineno}"
    if len(parts) < 2 or not parts[1].isdigit():
        raise TrtnetError(f"{where}: expected `name count value…`, found {line[:60].decode('latin-1')!r}")
    name, count = parts[0].decode("latin-1"), int(parts[1])
    hexes = parts[2] if len(parts) == 3 else b""
    try:
        raw = bytes.fromhex(hexes.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raw = None
    if raw is None or len(raw) % 4:
        index, token, cut_off = _bad_token(hexes)
        if is_last and cut_off:
            raise TrtnetError(f"{where}: tensor {name} ends inside value {index} of {count} — the file is truncated")
        raise TrtnetError(f"{where}: tensor {name} value {index} is {token!r}, not 8 hex digits (a big-endian float32)")
    values = np.frombuffer(raw, ">f4")
    if values.size != count:
        hint = " — the file is truncated" if is_last and values.size < count else ""
        raise TrtnetError(f"{where}: tensor {name} declares {count} values but has {values.size}{hint}")
    return name, values.astype(np.float32)


def _bad_token(hexes: bytes) -> tuple[int, str, bool]:
    """The first token that is not 8 hex digits, and whether it is a last value cut short."""
    tokens = hexes.split()
    for index, token in enumerate(tokens):
        if not _HEX_VALUE.fullmatch(token):
            cut_off = index == len(tokens) - 1 and len(token) < 8 and _HEX_VALUE.fullmatch(token.ljust(8, b"0"))
            return index, token[:20].decode("latin-1"), bool(cut_off)
    return -1, "?", False


def _read_sidecar(wts_path: Path) -> dict:
    path = sidecar_path(wts_path)
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TrtnetError(f"{path}: cannot read the weights metadata ({exc})") from None
    except ValueError as exc:  # UnicodeDecodeError is one
        raise TrtnetError(f"{path}: not valid JSON ({exc}); delete it or rewrite both files with gen_wts") from exc
    validate_weights_meta(meta, path)
    check_partner(path, meta, wts_path, remedy=f"convert the checkpoint again with gen_wts ({meta.get('source')})")
    meta.pop(PARTNER_KEY, None)  # a fact about this pair of files, not about the model
    return meta


def _read_safetensors(path: Path) -> tuple[OrderedDict[str, np.ndarray], dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            header = f.metadata() or {}
            tensors = OrderedDict((k, np.asarray(f.get_tensor(k), dtype=np.float32)) for k in f.keys())  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise TrtnetError(f"cannot read {path}: {exc}") from exc
    try:
        meta = json.loads(header["trtnet"]) if "trtnet" in header else {}
    except ValueError as exc:
        raise TrtnetError(f"{path}: its trtnet metadata is not valid JSON ({exc})") from exc
    validate_weights_meta(meta, f"{path} (its trtnet metadata)")
    order = meta.get("shapes") or {}
    if set(order) == set(tensors):  # safetensors stores tensors sorted; restore state-dict order
        tensors = OrderedDict((k, tensors[k]) for k in order)
    return tensors, meta


def _apply_shapes(tensors: OrderedDict[str, np.ndarray], shapes: Mapping | None, path: Path) -> OrderedDict:
    if not shapes:
        return tensors
    missing, extra = [k for k in shapes if k not in tensors], [k for k in tensors if k not in shapes]
    if missing or extra:
        raise TrtnetError(
            f"{path} and its metadata disagree: metadata lists {len(shapes)} tensors, the file has {len(tensors)}"
            f" (missing from the file: {', '.join(missing[:5]) or 'none'}; not in the metadata: "
            f"{', '.join(extra[:5]) or 'none'}). Rewrite both with gen_wts."
        )
    out = OrderedDict()
    for name, values in tensors.items():
        shape = tuple(int(d) for d in shapes[name])
        if math.prod(shape) != values.size:
            raise TrtnetError(f"{path}: tensor {name} has {values.size} values but its metadata shape is "
                              f"{list(shape)}; rewrite both files with gen_wts")
        out[name] = values.reshape(shape)
    return out


# -- finding ---------------------------------------------------------------------------------------


def resolve_weights(name_or_path: str | Path, weights_dir: str | Path = "weights") -> Path:
    """An existing path as is; a bare name (e.g. `yolov5s`) as weights/yolov5s.wts or .safetensors."""
    given = Path(name_or_path)
    if given.is_file():
        return given
    candidates = [Path(weights_dir) / f"{given.name}{suffix}" for suffix in SUFFIXES.values()]
    if given.suffix:
        candidates.insert(0, Path(weights_dir) / given.name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(p) for p in [given, *candidates])
    raise TrtnetError(
        f"no weights found for {name_or_path!s} (looked for {looked}); convert a checkpoint first, e.g. "
        f"`python -m trtnet.gen_wts {given.stem}.pt`"
    )
