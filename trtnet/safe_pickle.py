"""Read PyTorch checkpoints (.pt/.pth) with numpy alone, never running what their pickle asks for.

`torch.save` writes a zip: `<prefix>/data.pkl` (the object graph) beside `<prefix>/data/<key>` (raw
tensor storages); torch < 1.6 wrote the same pickle followed by the storages in one stream. The pickle
names the functions and classes that rebuild each object. `_RestrictedUnpickler.find_class` answers
from an allow-list: tensor rebuild functions become numpy stand-ins, model classes become inert
`ModuleRecord`s that keep only their attribute dict, and any other name is refused before it is even
imported — so a checkpoint that asks for `os.system` fails to load and nothing runs.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from trtnet.errors import TrtnetError

# ------------------------------------------------------------------------------------------------
# Inert records and numpy stand-ins for what the pickle may construct


class InertRecord:
    """Stands in for an allowed class: keeps constructor args and pickled state, runs nothing."""

    qualname = "?"
    args: tuple = ()
    state: dict = {}  # shared default, never mutated: __setstate__ replaces it

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = dict(state) if isinstance(state, dict) else {"state": state}

    def get(self, name: str, default: Any = None) -> Any:
        return self.state.get(name, default)

    @property
    def class_name(self) -> str:
        return self.qualname.rsplit(".", 1)[-1]

    def __repr__(self) -> str:
        return f"<{self.qualname} record>"


class ModuleRecord(InertRecord):
    """A pickled nn.Module (torch, torchvision or YOLOv5 class): `_parameters`, `_buffers`, `_modules`…"""

    def children(self) -> dict[str, ModuleRecord]:
        return {k: v for k, v in (self.get("_modules") or {}).items() if isinstance(v, ModuleRecord)}

    def walk(self):
        yield self
        for child in self.children().values():
            yield from child.walk()


class _ArrayRecord(InertRecord):
    """numpy's ndarray pickle (`_reconstruct` then `__setstate__`), rebuilt from raw bytes only."""

    qualname = "numpy.ndarray"
    array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        _version, shape, dtype, fortran, raw = state
        if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(raw, bytes):
            raise pickle.UnpicklingError("numpy array of Python objects")
        self.array = np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C").copy()


_RECORD_CLASSES: dict[str, type] = {}


def _record_class(module: str, name: str, base: type) -> type:
    qualname = f"{module}.{name}"
    if qualname not in _RECORD_CLASSES:
        _RECORD_CLASSES[qualname] = type(name, (base,), {"qualname": qualname, "__module__": __name__})
    return _RECORD_CLASSES[qualname]


@dataclass(frozen=True)
class _StorageType:
    """What `torch.FloatStorage` & co. resolve to: the numpy dtype of that storage's bytes."""

    name: str
    dtype: str


_STORAGE_DTYPES = {
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "BFloat16Storage": "bf16",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?", "UntypedStorage": "u1",
}
_TORCH_DTYPES = {"float16", "half", "float32", "float", "float64", "double", "bfloat16", "int64", "long",
                 "int32", "int", "int16", "int8", "uint8", "bool"}
_TENSOR_TYPES = {"torch._tensor.Tensor", "torch.Tensor", "torch.nn.parameter.Parameter"}


_PENDING = object()  # a storage not read yet (the legacy reader's first pass)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> np.ndarray | None:
    """torch._utils._rebuild_tensor(_v2): a strided view of a storage, bounds-checked, copied."""
    if storage is _PENDING:
        return None
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise pickle.UnpicklingError("tensor without a storage")
    offset, size, stride = int(storage_offset), tuple(map(int, size)), tuple(map(int, stride))
    if len(size) != len(stride) or offset < 0 or min(size, default=1) < 0 or min(stride, default=0) < 0:
        raise pickle.UnpicklingError(f"invalid tensor geometry {size} / {stride} at {offset}")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise pickle.UnpicklingError(f"tensor {size} at offset {offset} overruns its storage ({storage.size})")
    view = np.lib.stride_tricks.as_strided(storage[offset:], size, [s * storage.itemsize for s in stride])
    return np.array(view)


def _rebuild_parameter(data, *_ignored) -> np.ndarray:
    return data


def _rebuild_from_type(func, _new_type, args, _state) -> np.ndarray:
    if func not in (_rebuild_tensor, _rebuild_parameter):
        raise pickle.UnpicklingError("tensor subclass rebuilt by a function that is not allowed")
    return func(*args)


def _reconstructor(cls, base, state):
    """copyreg._reconstructor (pickle protocols 0/1): `object.__new__(cls)` for an allowed class."""
    if base is not object or not (isinstance(cls, type) and issubclass(cls, InertRecord)):
        raise pickle.UnpicklingError("copyreg._reconstructor for a class that is not allowed")
    return cls.__new__(cls)


def _np_dtype(spec, *_flags) -> np.dtype:
    if not isinstance(spec, str):
        raise pickle.UnpicklingError("numpy dtype from a non-string")
    return np.dtype(spec)


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar of a Python object")
    return np.frombuffer(data, dtype)[0].item()


def _np_reconstruct(_subtype, _shape, _dtype) -> _ArrayRecord:
    return _ArrayRecord()


def _latin1_bytes(text, encoding="latin1") -> bytes:
    """_codecs.encode as pickle protocol 2 uses it for `bytes` (e.g. a numpy array's data): latin-1 only."""
    if not isinstance(text, str) or encoding.replace("-", "") != "latin1":
        raise pickle.UnpicklingError("_codecs.encode other than str → latin-1 bytes")
    return text.encode("latin-1")


def _torch_device(*args) -> str:
    return ":".join(str(a) for a in args)


_CALLABLES: dict[str, Any] = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "torch.Size": tuple,
    "torch.device": _torch_device,
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "copyreg._reconstructor": _reconstructor,
    "_codecs.encode": _latin1_bytes,
    "numpy.dtype": _np_dtype,
    "numpy.ndarray": np.ndarray,  # only ever an argument of _reconstruct, which ignores it
    "numpy.core.multiarray.scalar": _np_scalar,
    "numpy._core.multiarray.scalar": _np_scalar,
    "numpy.core.multiarray._reconstruct": _np_reconstruct,
    "numpy._core.multiarray._reconstruct": _np_reconstruct,
}
# Classes whose objects become inert records: model code (YOLOv5's models.*/utils.*, torch.nn and
# torchvision modules, ultralytics' so that the error can name them) and harmless training extras.
_MODULE_PREFIXES = ("models.", "utils.", "torch.nn.modules.", "torchvision.models.", "ultralytics.")
_INERT = {"argparse.Namespace"} | {f"{module}.{cls}" for module in ("pathlib", "pathlib._local")
                                   for cls in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")}
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, source: Path, load_storage: Callable[[tuple], np.ndarray]) -> None:
        super().__init__(file)
        self.source = source
        self.load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        qualname = f"{module}.{name}"
        if qualname in _CALLABLES:
            return _CALLABLES[qualname]
        if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return name
        if qualname in _TENSOR_TYPES:
            return qualname
        if qualname in _INERT:
            return _record_class(module, name, InertRecord)
        if f"{module}.".startswith(_MODULE_PREFIXES) and name.isidentifier():
            return _record_class(module, name, ModuleRecord)
        raise TrtnetError(
            f"refusing to load {self.source}: its pickle calls {qualname}, which is not allowed — trtnet "
            "rebuilds tensors and records model attributes but never runs code from a checkpoint. A "
            "genuine YOLOv5/ResNet checkpoint should not need it: check where this file came from."
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:80]}")
        return self.load_storage(pid)


# ------------------------------------------------------------------------------------------------
# Archives: torch's zip format and the legacy (torch < 1.6) stream

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _storage_array(raw: bytes, dtype: str, big_endian: bool, what: str) -> np.ndarray:
    if dtype == "bf16":  # numpy has no bfloat16: its bits are the high half of a float32
        return (np.frombuffer(raw, ">u2" if big_endian else "<u2").astype(np.uint32) << 16).view(np.float32)
    dt = np.dtype(dtype).newbyteorder(">" if big_endian else "<")
    if len(raw) % dt.itemsize:
        raise TrtnetError(f"{what}: {len(raw)} bytes is not a whole number of {dt.name} values")
    return np.frombuffer(raw, dt).astype(dt.newbyteorder("="))


def _unpickle(data: BinaryIO, source: Path, load_storage: Callable[[tuple], np.ndarray]) -> Any:
    return _RestrictedUnpickler(data, source, load_storage).load()


def _load_zip(path: Path, archive: zipfile.ZipFile) -> Any:
    names = set(archive.namelist())
    if any(n.endswith("/constants.pkl") for n in names):
        raise TrtnetError(f"{path} is a TorchScript archive (torch.jit.save): trtnet reads torch.save checkpoints")
    pickles = sorted(n for n in names if n.endswith("/data.pkl") and n.count("/") == 1)
    if not pickles:
        raise TrtnetError(f"{path} is a zip file but not a PyTorch checkpoint (no <name>/data.pkl inside)")
    prefix = pickles[0][: -len("data.pkl")]
    big_endian = archive.read(f"{prefix}byteorder").strip() == b"big" if f"{prefix}byteorder" in names else False
    storages: dict[str, np.ndarray] = {}

    def load_storage(pid: tuple) -> np.ndarray:
        kind, key = pid[1], str(pid[2])
        if key not in storages:
            member = f"{prefix}data/{key}"
            if member not in names:
                raise TrtnetError(f"{path} is incomplete: storage {member} is missing (truncated download?)")
            storages[key] = _storage_array(archive.read(member), kind.dtype, big_endian, f"{path}:{member}")
        return storages[key]

    with archive.open(pickles[0]) as f:
        return _unpickle(io.BytesIO(f.read()), path, load_storage)


def _load_legacy(path: Path) -> Any:
    """torch < 1.6: magic, protocol, sys_info, the object pickle, its storage keys, then each storage
    as an int64 element count and the raw values. A first pass over the object pickle, with tensors
    left out, learns each storage's dtype (hence item size) so the data section can be indexed."""
    with open(path, "rb") as f:
        def no_storage(pid: tuple) -> np.ndarray:
            raise pickle.UnpicklingError("storage reference in a header")

        if _unpickle(f, path, no_storage) != _LEGACY_MAGIC:
            raise TrtnetError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a legacy torch file)")
        _unpickle(f, path, no_storage)
        sys_info = _unpickle(f, path, no_storage)
        order = "big" if isinstance(sys_info, dict) and sys_info.get("little_endian") is False else "little"
        object_start = f.tell()
        dtypes: dict[str, str] = {}

        def note_dtype(pid: tuple) -> Any:
            dtypes[str(pid[2])] = pid[1].dtype
            return _PENDING

        _unpickle(f, path, note_dtype)
        object_end = f.tell()
        located = {}
        for key in map(str, _unpickle(f, path, no_storage)):
            if key not in dtypes:
                raise TrtnetError(f"{path} is corrupt: storage {key} is listed but never used")
            count = int.from_bytes(f.read(8), order)
            located[key] = (f.tell(), count * (2 if dtypes[key] == "bf16" else np.dtype(dtypes[key]).itemsize))
            f.seek(sum(located[key]))
        storages: dict[str, np.ndarray] = {}

        def load_storage(pid: tuple) -> np.ndarray:
            key = str(pid[2])
            if key not in storages:
                if key not in located:
                    raise TrtnetError(f"{path} is incomplete: storage {key} is missing")
                start, size = located[key]
                f.seek(start)
                data = f.read(size)
                if len(data) != size:
                    raise TrtnetError(f"{path} is truncated: storage {key} has {len(data)} of {size} bytes")
                storages[key] = _storage_array(data, pid[1].dtype, order == "big", f"{path}:{key}")
            view = pid[5] if len(pid) > 5 else None
            if view is not None:  # (view key, offset, size) into the root storage
                return storages[key][int(view[1]): int(view[1]) + int(view[2])]
            return storages[key]

        f.seek(object_start)
        object_pickle = io.BytesIO(f.read(object_end - object_start))  # load_storage moves f meanwhile
        return _unpickle(object_pickle, path, load_storage)


def load_pickle(path: str | Path) -> Any:
    """The object a torch checkpoint holds, with tensors as numpy arrays and modules as records."""
    path = Path(path)
    if not path.is_file():
        raise TrtnetError(f"checkpoint not found: {path}")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return _load_zip(path, archive)
        return _load_legacy(path)
    except TrtnetError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            zipfile.BadZipFile, OSError) as exc:
        raise TrtnetError(f"cannot read {path}: not a valid PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
