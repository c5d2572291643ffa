"""Hostile and broken checkpoints, generated at test time with plain pickle / zipfile / struct.

Torch's two layouts are mimicked from how trtnet.safe_pickle reads them: the zip (`archive/data.pkl` +
`archive/data/<key>`) and the legacy stream (magic, protocol, sys_info, object pickle, storage keys,
then per storage an int64 element count and the raw bytes). Objects are described with the small
classes below and written by a pickler that emits torch's global names, so no torch is needed.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_NAMES = {"f4": "FloatStorage", "f2": "HalfStorage", "f8": "DoubleStorage", "i8": "LongStorage",
                 "u1": "ByteStorage"}


@dataclass(frozen=True)
class Global:
    """`module.name` as the pickle's GLOBAL opcode names it."""

    module: str
    name: str

    def __call__(self, *args):  # the pickler wants a callable; this one is only ever named
        raise TypeError(f"{self.module}.{self.name} is a name for the pickle, not a function")


@dataclass(eq=False)
class Record:
    """An object of class `qualname` rebuilt as torch pickles nn.Modules: NEWOBJ, then BUILD with `state`."""

    qualname: str
    state: dict = field(default_factory=dict)


@dataclass(eq=False)
class Storage:
    data: np.ndarray  # 1-D, its dtype decides the storage type
    key: str = ""
    numel: int | None = None  # what the persistent id claims (default: the real count)


@dataclass(eq=False)
class Tensor:
    storage: Storage
    offset: int
    size: tuple
    stride: tuple


@dataclass(eq=False)
class Call:
    """`func(*args)`: REDUCE with an allowed (or not) global."""

    func: Global
    args: tuple


def tensor(array: np.ndarray) -> Tensor:
    array = np.ascontiguousarray(array)
    strides = tuple(s // array.itemsize for s in array.strides)
    return Tensor(Storage(array.reshape(-1)), 0, array.shape, strides)


class _Writer(pickle._Pickler):  # the Python pickler: its save() can be taught torch's names
    def __init__(self, file, storages: list[Storage]):
        super().__init__(file, protocol=2)
        self.storages = storages

    def persistent_id(self, obj: Any):
        if not isinstance(obj, Storage):
            return None
        if not obj.key:
            obj.key = str(len(self.storages))
        if all(s is not obj for s in self.storages):
            self.storages.append(obj)
        kind = Global("torch", STORAGE_NAMES[obj.data.dtype.str[1:]])
        return ("storage", kind, obj.key, "cpu", obj.data.size if obj.numel is None else obj.numel)

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if isinstance(obj, Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        elif isinstance(obj, Record) and id(obj) not in self.memo:
            module, name = obj.qualname.rsplit(".", 1)
            self.save(Global(module, name))
            self.save(())
            self.write(pickle.NEWOBJ)
            self.memoize(obj)
            self.save(obj.state)
            self.write(pickle.BUILD)
        elif isinstance(obj, Tensor):
            args = (obj.storage, obj.offset, tuple(obj.size), tuple(obj.stride), False, OrderedDict())
            self.save_reduce(Global("torch._utils", "_rebuild_tensor_v2"), args)
        elif isinstance(obj, Call):
            self.save_reduce(obj.func, obj.args)
        else:
            super().save(obj, save_persistent_id)


def object_pickle(obj: Any) -> tuple[bytes, list[Storage]]:
    buffer, storages = io.BytesIO(), []
    _Writer(buffer, storages).dump(obj)
    return buffer.getvalue(), storages


def write_zip(path: Path, obj: Any = None, pickled: bytes | None = None, extra: dict | None = None,
              compression: int = zipfile.ZIP_STORED) -> Path:
    """torch.save's zip layout; `pickled` replaces the object pickle, `extra` adds entries (name → bytes)."""
    storages: list[Storage] = []
    if pickled is None:
        pickled, storages = object_pickle(obj)
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", "little")
        for storage in storages:
            archive.writestr(f"archive/data/{storage.key}", storage.data.astype(storage.data.dtype.newbyteorder("<"))
                             .tobytes())
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
        archive.writestr("archive/version", "3\n")
    return path


def write_legacy(path: Path, obj: Any = None, pickled: bytes | None = None, storages: list[Storage] | None = None,
                 counts: dict[str, int] | None = None) -> Path:
    """torch < 1.6's stream; `counts` overrides the element count written before a storage's bytes."""
    if pickled is None:
        pickled, storages = object_pickle(obj)
    storages = storages or []
    with open(path, "wb") as f:
        for header in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
            f.write(pickle.dumps(header, protocol=2))
        f.write(pickled)
        f.write(pickle.dumps([s.key for s in storages], protocol=2))
        for s in storages:
            count = (counts or {}).get(s.key, s.data.size)
            f.write(struct.pack("<q", count) + s.data.astype(s.data.dtype.newbyteorder("<")).tobytes())
    return path


# -- raw pickle opcodes, for structures too deep or too shared for any pickler ---------------------------


def _text(value: str) -> bytes:
    data = value.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _global(qualname: str) -> bytes:
    module, name = qualname.rsplit(".", 1)
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _record_open(qualname: str) -> bytes:
    """A module record whose state dict is left open at `_modules: {` for its children."""
    return (_global(qualname) + pickle.EMPTY_TUPLE + pickle.NEWOBJ + pickle.EMPTY_DICT + _text("_modules")
            + pickle.EMPTY_DICT)


def _record_close() -> bytes:
    return pickle.SETITEM + pickle.BUILD  # state["_modules"] = children; record.__setstate__(state)


def _binput(index: int) -> bytes:
    return pickle.LONG_BINPUT + struct.pack("<I", index)


def _binget(index: int) -> bytes:
    return pickle.LONG_BINGET + struct.pack("<I", index)


def _model(inner: bytes) -> bytes:
    """{"model": <inner>} as a whole protocol-2 pickle."""
    return pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + _text("model") + inner + pickle.SETITEM + pickle.STOP


def _resnet_around(inner: bytes) -> bytes:
    """A torchvision ResNet record whose `layer1` is `inner`: a family whose reader walks every module."""
    return _record_open("torchvision.models.resnet.ResNet") + _text("layer1") + inner + pickle.SETITEM + _record_close()


def module_chain(depth: int) -> bytes:
    """nn.Sequential nested `depth` deep: each module's only child is the next."""
    opened = (_record_open("torch.nn.modules.container.Sequential") + _text("0")) * depth
    leaf = _record_open("torch.nn.modules.activation.SiLU") + _record_close()
    return _model(_resnet_around(opened + leaf + (pickle.SETITEM + _record_close()) * depth))


def module_cycle() -> bytes:
    """A module that is its own child."""
    inner = (_global("torchvision.models.resnet.ResNet") + pickle.EMPTY_TUPLE + pickle.NEWOBJ + _binput(0)
             + pickle.EMPTY_DICT + _text("_modules") + pickle.EMPTY_DICT + _text("layer1") + _binget(0)
             + pickle.SETITEM + pickle.SETITEM + pickle.BUILD)
    return _model(inner)


def shared_module_tree(levels: int) -> bytes:
    """2**levels leaves from `levels` modules: each one's two children are the same module."""
    body = _record_open("torch.nn.modules.activation.SiLU") + _record_close() + _binput(0) + pickle.POP
    for level in range(1, levels + 1):
        body += (_record_open("torch.nn.modules.container.Sequential") + _text("0") + _binget(level - 1)
                 + pickle.SETITEM + _text("1") + _binget(level - 1) + pickle.SETITEM + _record_close()
                 + _binput(level) + pickle.POP)
    return _model(_resnet_around(body + _binget(levels)))


def laughing_persistent_id(levels: int) -> bytes:
    """A storage persistent id whose key is a list that holds the same list twice, `levels` deep."""
    nested = pickle.EMPTY_LIST + _binput(0) + pickle.POP
    for level in range(1, levels + 1):
        nested += (pickle.MARK + _binget(level - 1) + _binget(level - 1) + pickle.LIST + _binput(level)
                   + pickle.POP)
    pid = (nested + pickle.MARK + _text("storage") + _global("torch.FloatStorage") + _binget(levels) + _text("cpu")
           + pickle.BININT1 + b"\x01" + pickle.TUPLE)
    return _model(pid + pickle.BINPERSID)


def laughing_dict_key(levels: int) -> bytes:
    """A dict whose key is a tuple that holds the same tuple twice, `levels` deep: hashing it never ends."""
    body = pickle.EMPTY_TUPLE + _binput(0) + pickle.POP
    for level in range(1, levels + 1):
        body += _binget(level - 1) + _binget(level - 1) + pickle.TUPLE2 + _binput(level) + pickle.POP
    return _model(body + pickle.EMPTY_DICT + _binget(levels) + pickle.NONE + pickle.SETITEM)


def memo_put(index: int) -> bytes:
    return _model(pickle.NONE + _binput(index))


def ndarray_call(shape: tuple) -> Call:
    """numpy.ndarray(shape, 'u1'): an allocation of the pickle's choosing."""
    return Call(Global("numpy", "ndarray"), (shape, Call(Global("numpy", "dtype"), ("u1", False, True))))


# -- a genuine checkpoint, re-pickled with a change ------------------------------------------------------


def as_writable(obj: Any, memo: dict | None = None) -> Any:
    """trtnet's reading of a checkpoint (records, numpy arrays) as objects _Writer pickles like torch."""
    from trtnet.safe_pickle import InertRecord

    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, InertRecord):
        out = memo[id(obj)] = Record(obj.qualname)
        out.state = as_writable(obj.state, memo)
    elif isinstance(obj, np.ndarray):
        out = tensor(obj)
    elif isinstance(obj, dict):
        out = type(obj)((k, as_writable(v, memo)) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        out = type(obj)(as_writable(v, memo) for v in obj)
    else:
        out = obj
    memo[id(obj)] = out
    return out


def module_path(record: Record, *names: str) -> Record:
    for name in names:
        record = record.state["_modules"][name]
    return record


# -- a zip bomb, written by hand so that making it costs a few MB, not gigabytes -------------------------


def _deflated_zeros(size: int, chunk: int = 1 << 20) -> bytes:
    """Raw deflate of `size` zero bytes: after the first chunk every full-flushed chunk encodes alike."""
    assert size % chunk == 0 and size >= 3 * chunk
    zeros = bytes(chunk)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    middle = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    assert deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH) == middle
    last = deflate.compress(zeros) + deflate.flush(zlib.Z_FINISH)
    return first + middle * (size // chunk - 2) + last


def write_raw_zip(path: Path, entries: list[tuple]) -> Path:
    """A zip of (name, stored bytes, method, uncompressed size[, crc]) entries; a compressed entry's CRC is
    0 unless given (a reader that gets as far as checking it has already inflated everything)."""
    local, central = b"", b""
    for name, data, method, size, *given_crc in entries:
        encoded, crc = name.encode(), zlib.crc32(data) if method == zipfile.ZIP_STORED else sum(given_crc)
        fields = struct.pack("<HHHHHIIIHH", 20, 0, method, 0, 0, crc, len(data), size, len(encoded), 0)
        central += (b"PK\x01\x02" + struct.pack("<H", 20) + fields + struct.pack("<HHHII", 0, 0, 0, 0, len(local))
                    + encoded)
        local += b"PK\x03\x04" + fields + encoded + data
    end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, len(entries), len(entries), len(central), len(local), 0)
    path.write_bytes(local + central + end)
    return path


def zip_bomb(path: Path, size: int = 2 << 30) -> Path:
    """A checkpoint whose one tensor's storage inflates to `size` zero bytes from a few MB."""
    pickled, _ = object_pickle({"w": Tensor(Storage(np.zeros(1, np.uint8), "0", size), 0, (size,), (1,))})
    return write_raw_zip(path, [("archive/data.pkl", pickled, zipfile.ZIP_STORED, len(pickled)),
                                ("archive/data/0", _deflated_zeros(size), zipfile.ZIP_DEFLATED, size),
                                ("archive/version", b"3\n", zipfile.ZIP_STORED, 2)])


def many_small_bombs(path: Path, entries: int = 2000, size: int = 1 << 20) -> Path:
    """Many storages of `size` zero bytes each, every one within the per-entry ratio only because it is small."""
    pickled, _ = object_pickle({f"w{i}": Tensor(Storage(np.zeros(1, np.uint8), str(i), size), 0, (size,), (1,))
                                for i in range(entries)})
    zeros, crc = zlib.compress(bytes(size), 9)[2:-4], zlib.crc32(bytes(size))  # raw deflate, as zip holds it
    return write_raw_zip(path, [("archive/data.pkl", pickled, zipfile.ZIP_STORED, len(pickled))]
                         + [(f"archive/data/{i}", zeros, zipfile.ZIP_DEFLATED, size, crc) for i in range(entries)]
                         + [("archive/version", b"3\n", zipfile.ZIP_STORED, 2)])
