"""Metadata sidecars and the files they describe: names, pairing checks and the weights-metadata schema.

- A weights file `NAME.wts` has its metadata in `NAME.json`; an engine `NAME.engine` in `NAME.engine.json`, so an
  engine built beside its weights (`-o w/NAME.engine`) never overwrites the weights' metadata. Engines built
  before this change have theirs in `NAME.json`; it still loads when it holds engine metadata.
- Each sidecar records its partner's size and sha256 (`"partner"`), and is written after its partner: a crash
  between the two writes leaves the previous sidecar, whose hash no longer matches, so the mismatch is seen on
  load instead of a pair from two different builds running silently.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from trtnet.errors import TrtnetError
from trtnet.fileio import sha256_of

PARTNER_KEY = "partner"
ENGINE_KEYS = ("tensorrt", "engine_bytes")  # in an engine's metadata, never in a weights file's
WEIGHTS_KEYS = ("shapes", "yaml", "source_sha256")  # in a weights file's metadata, never in an engine's


# -- names ---------------------------------------------------------------------------------------------


def engine_sidecar_path(engine: str | Path) -> Path:
    """`x.engine` → `x.engine.json`."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def legacy_engine_sidecar_path(engine: str | Path) -> Path:
    """Where older trtnet builds wrote an engine's metadata: `x.engine` → `x.json` (the weights' name for `x.wts`)."""
    return Path(engine).with_suffix(".json")


def find_engine_sidecar(engine: str | Path) -> Path:
    """The engine's metadata file: `x.engine.json`, else an older build's `x.json` holding engine metadata."""
    current, legacy = engine_sidecar_path(engine), legacy_engine_sidecar_path(engine)
    if current.exists() or not legacy.is_file():
        return current
    try:
        meta = json.loads(legacy.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return legacy  # unreadable: let the reader report it under this name
    if isinstance(meta, dict) and any(k in meta for k in WEIGHTS_KEYS) and not any(k in meta for k in ENGINE_KEYS):
        return current  # the weights' metadata, not the engine's: report the engine's as missing
    return legacy


# -- pairing -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Partner:
    """What a sidecar records about the file it describes."""

    file: str  # its name (not path: the pair may be moved together)
    bytes: int
    sha256: str


_hash_cache: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, computed once per process for a given (inode, size, mtime): sha256 runs at ~1.3 GB/s
    here (0.08 s for 100 MB), cheap next to deserializing an engine, but not worth paying twice."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        _hash_cache[key] = sha256_of(path)
    return _hash_cache[key]


def partner_of(path: str | Path) -> dict:
    """The `partner` record for a file just written."""
    path = Path(path)
    return asdict(Partner(path.name, path.stat().st_size, file_sha256(path)))


def with_partner(meta: Mapping, partner: str | Path) -> dict:
    return {**meta, PARTNER_KEY: partner_of(partner)}


def check_partner(sidecar: Path, meta: Mapping, partner: Path, remedy: str = "rewrite both") -> None:
    """Refuse a sidecar that vouches for another file than `partner` (a stale or mismatched pair).

    Sidecars written by older trtnet versions have no `partner` record: they load unchecked, as they always
    did, since refusing them would break every existing weights folder and engine for no new safety."""
    record = meta.get(PARTNER_KEY)
    if record is None:
        return
    expected = _partner_record(sidecar, record)
    size = partner.stat().st_size
    if size != expected.bytes or file_sha256(partner) != expected.sha256:
        writer = meta.get("trtnet_version", "an unknown version")
        raise TrtnetError(
            f"stale or mismatched sidecar: {sidecar} does not match {partner} (written by trtnet {writer} for a "
            f"{expected.file} of {expected.bytes} bytes, sha256 {expected.sha256[:12]}…; this one has {size} bytes)"
            f"; one of the two was replaced without the other: {remedy}"
        )


def _partner_record(sidecar: Path, record: Any) -> Partner:
    ok = (isinstance(record, dict) and isinstance(record.get("file"), str) and _is_int(record.get("bytes"))
          and isinstance(record.get("sha256"), str) and len(record["sha256"]) == 64)
    if not ok:
        raise TrtnetError(f"{sidecar}: its \"{PARTNER_KEY}\" entry is not {{file, bytes, sha256}}: rewrite it")
    return Partner(record["file"], record["bytes"], record["sha256"])


# -- the weights metadata schema -------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _positive_int(v: Any) -> bool:
    return _is_int(v) and v > 0


def _whole_positive(v: Any) -> bool:
    return _is_number(v) and v > 0 and v == int(v)


def _shape(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(d) and d >= 0 for d in v)


def _shapes(v: Any) -> bool:
    return isinstance(v, dict) and all(_shape(s) for s in v.values())


def _anchors(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(a, list) and all(_is_number(x) for x in a) for a in v)


def _names(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(n, str) for n in v)


WEIGHTS_SCHEMA: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "family": ("a string", lambda v: isinstance(v, str)),
    "arch": ("a string", lambda v: isinstance(v, str)),
    "shapes": ("an object {tensor: [non-negative ints]}", _shapes),
    "yaml": ("an object (the model's yaml)", lambda v: isinstance(v, dict)),
    "nc": ("a positive integer", _positive_int),
    "num_classes": ("a positive integer", _positive_int),
    "names": ("a list of class names", _names),
    "strides": ("a list of positive integers", lambda v: isinstance(v, list) and all(_whole_positive(s) for s in v)),
    "anchors": ("a list of lists of numbers", _anchors),
    "bn_eps": ("a positive number", lambda v: _is_number(v) and v > 0),
    "imgsz": ("a positive integer (the square input size)", _positive_int),
}


def validate_weights_meta(meta: Any, where: str | Path) -> dict:
    """`meta` itself when every key the network builders read has the right type; else one clear error.
    Keys not listed (provenance, dates, keys of newer versions) pass through unchecked."""
    if not isinstance(meta, dict):
        raise TrtnetError(f"{where}: expected a JSON object of weights metadata, found {type(meta).__name__}")
    for key, (expected, valid) in WEIGHTS_SCHEMA.items():
        if key in meta and not valid(meta[key]):
            raise TrtnetError(f"{where}: \"{key}\" must be {expected}, found {_short(meta[key])}; "
                              "rewrite the metadata with gen_wts")
    yaml_nc = meta.get("yaml", {}).get("nc")
    if yaml_nc is not None and not _positive_int(yaml_nc):
        raise TrtnetError(f"{where}: \"yaml\".\"nc\" must be a positive integer, found {_short(yaml_nc)}")
    return meta


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
