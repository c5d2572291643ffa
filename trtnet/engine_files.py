"""Engine files and whether they run here: find an engine, read its sidecar, check TensorRT and GPU.

- Before deserializing, the sidecar metadata is checked against this TensorRT (flavour and version) and
  this GPU (compute capability, memory): a mismatch is a TrtnetError that says how to rebuild.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from trtnet import compat, cuda_rt
from trtnet.engine_meta import EngineMeta
from trtnet.errors import TrtnetError
from trtnet.sidecar import PARTNER_KEY, check_partner, find_engine_sidecar

# What trtnet.build appends to a model name: .PRECISION, then .SIZE or .LO-HI, then .bBATCH or .bLO-HI (engines
# built before sizes were in the name have only .PRECISION).
_QUALIFIERS = r"(\.(?:fp16|fp32|int8))?(\.\d+(?:-\d+)?)?(\.b\d+(?:-\d+)?)?\.engine"


def resolve_engine(engine: str | Path, weights_dir: str | Path = "weights") -> Path:
    """An engine path, or a name in `weights_dir`: the model (`yolov5n`) or the model with some of the qualifiers
    trtnet.build names engines with (`yolov5n.fp16`, `yolov5n.fp16.640`). A name that fits several engines is
    refused with the list, rather than one picked silently (a 320 engine where 640 was meant)."""
    path = Path(engine)
    if path.suffix == ".engine" or path.parent != Path("."):
        if not path.is_file():
            raise TrtnetError(f"{path}: no such engine file (build one with python -m trtnet.build)")
        return path
    found = engines_named(str(engine), Path(weights_dir))
    if len(found) == 1:
        return found[0]
    if not found:
        raise TrtnetError(f"no engine named {engine!r} in {weights_dir}/ (looked for {engine}.*.engine): build one "
                          f"with python -m trtnet.build {engine} --fp16, or pass the engine's path")
    raise TrtnetError(f"{engine!r} names {len(found)} engines in {weights_dir}/: "
                      f"{', '.join(p.name for p in found)}; pass one of them (its path, or its name without "
                      f"'.engine', e.g. {found[0].name[:-len('.engine')]})")


def engines_named(name: str, weights_dir: Path) -> list[Path]:
    """Engines in `weights_dir` whose file name is `name` plus build qualifiers, in name order."""
    pattern = re.compile(re.escape(name) + _QUALIFIERS)
    if not weights_dir.is_dir():
        return []
    return sorted(p for p in weights_dir.iterdir() if pattern.fullmatch(p.name) and p.is_file())


def load_metadata(engine_path: Path) -> EngineMeta:
    """The metadata trtnet.build wrote beside the engine (`<name>.engine.json`; older builds: `<name>.json`),
    refused when it describes another engine file than this one."""
    path = find_engine_sidecar(engine_path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrtnetError(
            f"{path} is missing: trtnet needs the metadata that python -m trtnet.build writes beside the "
            "engine (family, input size, class names, TensorRT version); rebuild the engine with trtnet"
        ) from None
    except (OSError, ValueError) as exc:
        raise TrtnetError(f"cannot read {path}: {exc}; rebuild the engine with python -m trtnet.build") from exc
    partner = meta.pop(PARTNER_KEY, None) if isinstance(meta, dict) else None  # about the pair, not the engine
    engine_meta = EngineMeta.from_dict(meta, path)
    check_partner(path, {PARTNER_KEY: partner, "trtnet_version": engine_meta.trtnet_version}, Path(engine_path),
                  remedy=f"rebuild the engine: {rebuild_hint(engine_meta)}")
    return engine_meta


def engine_task(engine: str | Path, weights_dir: str | Path = "weights") -> str:
    """What an engine's family does ("detect" or "classify"), read from its metadata before loading it."""
    from trtnet import networks

    return networks.family(load_metadata(resolve_engine(engine, weights_dir)).family).TASK


def rebuild_hint(meta: EngineMeta) -> str:
    return f"python -m trtnet.build {Path(meta.weights or 'MODEL').stem} --{meta.precision}"


def _release(version: str) -> tuple[int, ...]:
    """major.minor.patch: TensorRT engines run only on the release they were built with."""
    return tuple(int(p) for p in re.findall(r"\d+", str(version))[:3])


def check_tensorrt(meta: EngineMeta, flavour: compat.Flavour) -> None:
    """Raise a TrtnetError saying how to rebuild when the engine was built by another TensorRT."""
    built = meta.tensorrt
    if built.flavour != flavour.name or _release(built.version) != _release(flavour.version):
        raise TrtnetError(
            f"the engine was built with {built.flavour} {built.version}; this is {flavour}: "
            f"engines run only on the TensorRT they were built with. Rebuild it here: {rebuild_hint(meta)}"
        )


def check_device(meta: EngineMeta, flavour: compat.Flavour, device: Mapping) -> None:
    """Raise a TrtnetError saying what to do when the engine does not fit this GPU."""
    cc = device.get("compute_capability")
    if flavour.engines_name_their_gpus:
        targets = list(meta.target_cc)
        if targets and cc not in targets:
            raise TrtnetError(
                f"the engine was built for compute capabilities {', '.join(targets)}; this GPU "
                f"({device.get('name')}) is {cc}. Rebuild with --target-cc {cc} (or without --target-cc)"
            )
    else:
        built_on = meta.device or {}
        if built_on.get("compute_capability") and built_on["compute_capability"] != cc:
            raise TrtnetError(
                f"the engine was built on {built_on.get('name')} (compute capability "
                f"{built_on['compute_capability']}); this GPU is {device.get('name')} ({cc}). "
                f"Rebuild it on this GPU: {rebuild_hint(meta)}"
            )
    needed = meta.engine_bytes
    free = device.get("free_bytes")
    if free is not None and needed > free:
        raise TrtnetError(
            f"the engine needs {needed / 1e6:.0f} MB of GPU memory for its weights alone; {device.get('name')} "
            f"has {free / 1e6:.0f} MB free. Free GPU memory or build a smaller model"
        )


def read_plan(path: Path, meta: EngineMeta) -> bytes:
    """The serialized engine, refused before TensorRT reads it when its size is not the one built."""
    plan = path.read_bytes()
    built = meta.engine_bytes
    if built and len(plan) != built:
        raise TrtnetError(f"{path} has {len(plan)} bytes, its metadata says {built}: the file is truncated or "
                          f"was replaced; rebuild it: {rebuild_hint(meta)}")
    return plan


def require_gpu(what: str) -> None:
    reason = cuda_rt.gpu_unavailable_reason()
    if reason:
        raise TrtnetError(f"cannot run {what}: {reason}. Engines run on an NVIDIA GPU (building does not need one)")
