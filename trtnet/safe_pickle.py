"""Read PyTorch checkpoints (.pt/.pth) with numpy alone, never running what their pickle asks for.

`torch.save` writes a zip: `<prefix>/data.pkl` (the object graph) beside `<prefix>/data/<key>` (raw
tensor storages); torch < 1.6 wrote the same pickle followed by the storages in one stream. The pickle
names the functions and classes that rebuild each object. `_RestrictedUnpickler.find_class` answers
from an allow-list: tensor rebuild functions become numpy stand-ins, model classes become inert
`ModuleRecord`s that keep only their attribute dict, and any other name is refused before it is even
imported — so a checkpoint that asks for `os.system` fails to load and nothing runs.

A hostile file can still ask for time and memory. What the reader bounds, before it spends either
(`Limits`): every zip entry's size and inflation ratio, and the entries must fit in the file; a legacy
storage's byte count must fit in what is left of the file; the pickle is scanned before it runs (a
bounded number of opcodes, memo indices below the opcode count since CPython sizes the memo by the
largest index, no dict key or set member of deeply shared tuples, whose hashing never ends); tensor
views stay inside their storage, have no zero stride over more than one element, and together hold
at most twice the bytes of the storages present; numpy arrays only come from their pickled bytes;
persistent ids are checked field by field (never printed); and the unpickled object graph is walked
once, counting every visit of a shared object, so that a cycle, a deep chain or a "billion laughs"
tree is refused before anything else walks it.
"""

from __future__ import annotations

import io
import mmap
import pickle
import pickletools
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from trtnet.errors import TrtnetError


@dataclass(frozen=True)
class Limits:
    """What one checkpoint may ask of the reader: ten times what real YOLOv5/ResNet checkpoints need, and
    small enough that the reader refuses a file within a second."""

    max_pickle_bytes: int = 64 << 20
    max_opcodes: int = 200_000  # yolov5n's pickle has 34k, yolo11s's 53k
    max_hash_work: int = 10_000  # tuples walked to hash one dict key or set member
    max_visits: int = 100_000  # yolov5s: 8k
    max_depth: int = 100
    max_inflation: int = 100  # uncompressed / compressed size of a zip entry above 1 MiB
    tensor_bytes_per_storage_byte: int = 2
    # modules whose classes become inert records (model code, never imported): torch.nn's, and by default
    # (load_pickle) those the families in networks/ declare
    model_modules: tuple[str, ...] = ("torch.nn.modules.",)


LIMITS = Limits()
_MAX_NDIM = 32
_MAX_KEY = 256


class _Refused(Exception):
    """A rule of the reader broken; load_pickle names the file and the rule."""


def _product(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


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
        if not (isinstance(shape, tuple) and len(shape) <= _MAX_NDIM and all(isinstance(n, int) for n in shape)):
            raise _Refused("a numpy array with an invalid shape")
        if any(n < 0 for n in shape) or _product(shape) * dtype.itemsize != len(raw):
            raise _Refused(f"a numpy array whose shape {shape} does not match its {len(raw)} bytes")
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


class _TensorBudget:
    """Rebuilds tensor views and keeps their bytes within a multiple of the storage bytes loaded."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.storage_bytes = 0
        self.tensor_bytes = 0

    def add_storage(self, storage: np.ndarray) -> None:
        self.storage_bytes += storage.nbytes

    def rebuild_tensor(self, storage, storage_offset, size, stride, *_ignored) -> np.ndarray | None:
        """torch._utils._rebuild_tensor(_v2): a strided view of a storage, bounds-checked, copied."""
        if storage is _PENDING:
            return None
        if not isinstance(storage, np.ndarray) or storage.ndim != 1:
            raise pickle.UnpicklingError("tensor without a storage")
        offset, size, stride = _tensor_geometry(storage_offset, size, stride)
        if 0 in size:
            return np.zeros(size, storage.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise _Refused(f"a tensor {size} at offset {offset} overruns its storage ({storage.size} values)")
        nbytes = _product(size) * storage.itemsize
        allowed = self.limits.tensor_bytes_per_storage_byte * self.storage_bytes
        if self.tensor_bytes + nbytes > allowed:
            factor = self.limits.tensor_bytes_per_storage_byte
            raise _Refused(f"its tensors would hold more tensor bytes than {factor}x the {self.storage_bytes} "
                           "bytes of storage in the file (overlapping views)")
        self.tensor_bytes += nbytes
        view = np.lib.stride_tricks.as_strided(storage[offset:], size, [s * storage.itemsize for s in stride])
        return np.array(view)


def _tensor_geometry(storage_offset: Any, size: Any, stride: Any) -> tuple[int, tuple, tuple]:
    if not all(isinstance(v, tuple) and len(v) <= _MAX_NDIM for v in (size, stride)) or len(size) != len(stride):
        raise _Refused(f"a tensor whose size and stride are not two tuples of at most {_MAX_NDIM} equal lengths")
    if not all(isinstance(v, int) for v in (storage_offset, *size, *stride)):
        raise _Refused("a tensor whose offset, size or stride is not an integer")
    if storage_offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
        raise _Refused(f"a tensor with a negative offset, size or stride (size {size}, stride {stride})")
    if any(s == 0 and n > 1 for n, s in zip(size, stride)):
        raise _Refused(f"a tensor {size} with a zero stride {stride}: one value repeated over many elements, "
                       "which weights never are (a zero stride is allowed only where the size is 1)")
    return storage_offset, size, stride


_REBUILD_TENSOR = {"torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2"}


def _rebuild_parameter(data, *_ignored) -> np.ndarray:
    return data


def _rebuild_from_type(func, _new_type, args, _state) -> np.ndarray:
    if getattr(func, "__func__", None) is not _TensorBudget.rebuild_tensor and func is not _rebuild_parameter:
        raise pickle.UnpicklingError("tensor subclass rebuilt by a function that is not allowed")
    return func(*args)


def _reconstructor(cls, base, state):
    """copyreg._reconstructor (pickle protocols 0/1): `object.__new__(cls)` for an allowed class."""
    if base is not object or not (isinstance(cls, type) and issubclass(cls, InertRecord)):
        raise pickle.UnpicklingError("copyreg._reconstructor for a class that is not allowed")
    return cls.__new__(cls)


def _np_dtype(spec, *_flags) -> np.dtype:
    if not isinstance(spec, str) or len(spec) > 16:
        raise pickle.UnpicklingError("numpy dtype from a non-string")
    dtype = np.dtype(spec)
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.itemsize > 64:
        raise _Refused(f"a numpy dtype {spec!r} that is not a plain number or string type")
    return dtype


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar of a Python object")
    return np.frombuffer(data, dtype)[0].item()


def _numpy_ndarray(*_args):
    """numpy.ndarray as a constructor: an allocation of the pickle's choosing. Only a name for _reconstruct."""
    raise _Refused("its pickle calls numpy.ndarray(shape) to allocate an array; arrays are only rebuilt from "
                   "the bytes they pickled")


def _np_reconstruct(subtype, _shape, _dtype) -> _ArrayRecord:
    if subtype is not _numpy_ndarray:
        raise _Refused("numpy's _reconstruct for a type other than numpy.ndarray")
    return _ArrayRecord()


def _latin1_bytes(text, encoding="latin1") -> bytes:
    """_codecs.encode as pickle protocol 2 uses it for `bytes` (e.g. a numpy array's data): latin-1 only."""
    if not isinstance(text, str) or not isinstance(encoding, str) or encoding.replace("-", "") != "latin1":
        raise pickle.UnpicklingError("_codecs.encode other than str → latin-1 bytes")
    return text.encode("latin-1")


def _torch_device(*args) -> str:
    if not all(isinstance(a, (str, int)) for a in args) or len(args) > 2:
        raise _Refused("a torch.device that is not (type[, index])")
    return ":".join(str(a) for a in args)


_CALLABLES: dict[str, Any] = {
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
    "numpy.ndarray": _numpy_ndarray,
    "numpy.core.multiarray.scalar": _np_scalar,
    "numpy._core.multiarray.scalar": _np_scalar,
    "numpy.core.multiarray._reconstruct": _np_reconstruct,
    "numpy._core.multiarray._reconstruct": _np_reconstruct,
}
# Classes whose objects become inert records besides model code (Limits.model_modules): harmless training extras.
_INERT = {"argparse.Namespace"} | {f"{module}.{cls}" for module in ("pathlib", "pathlib._local")
                                   for cls in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")}
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, source: Path, load_storage: Callable[[tuple], np.ndarray],
                 budget: _TensorBudget) -> None:
        super().__init__(file)
        self.source = source
        self.load_storage = load_storage
        self.budget = budget

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        qualname = f"{module}.{name}"
        if qualname in _REBUILD_TENSOR:
            return self.budget.rebuild_tensor
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
        if f"{module}.".startswith(self.budget.limits.model_modules) and name.isidentifier():
            return _record_class(module, name, ModuleRecord)
        raise TrtnetError(
            f"refusing to load {self.source}: its pickle calls {qualname}, which is not allowed — trtnet "
            "rebuilds tensors and records model attributes but never runs code from a checkpoint. A "
            "genuine checkpoint of a model trtnet reads should not need it: check where this file came from."
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        _check_persistent_id(pid)
        return self.load_storage(pid)


def _check_persistent_id(pid: Any) -> None:
    """("storage", storage type, key, location, numel[, (view key, offset, size)]), checked field by field:
    printing or hashing a hostile id could take forever."""
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and isinstance(pid[0], str) and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
        raise _Refused("a persistent id that is not a torch storage reference")
    if not (isinstance(pid[2], str) and len(pid[2]) <= _MAX_KEY):
        raise _Refused("a storage key that is not a short string")
    view = pid[5] if len(pid) == 6 else None
    if view is not None and not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)
                                 and all(isinstance(v, int) and v >= 0 for v in view[1:])):
        raise _Refused("a storage view that is not (key, offset, size)")


def _opcode_table() -> list:
    """Per opcode byte, None if no such opcode, else (argument layout, items popped before the mark or
    -1 if it pops no mark, items popped, items pushed), from pickletools' descriptors."""
    table: list = [None] * 256
    for op in pickletools.opcodes:
        n = 0 if op.arg is None else op.arg.n
        lines = 2 if op.arg is not None and op.arg.name == "stringnl_noescape_pair" else 1
        before = [item.name for item in op.stack_before]
        below_mark = before.index("mark") if "mark" in before else -1
        layout = ("lines", lines) if n == pickletools.UP_TO_NEWLINE else n
        table[ord(op.code)] = (layout, below_mark, len(before), len(op.stack_after))
    return table


_OPCODES = _opcode_table()
_LENGTH_BYTES = {pickletools.TAKEN_FROM_ARGUMENT1: 1, pickletools.TAKEN_FROM_ARGUMENT4: 4,
                 pickletools.TAKEN_FROM_ARGUMENT4U: 4, pickletools.TAKEN_FROM_ARGUMENT8U: 8}
_CODE = {name: ord(getattr(pickle, name)) for name in (
    "LONG_BINPUT", "BINPUT", "PUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET", "STOP", "MARK", "POP", "DUP",
    "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "SETITEM", "SETITEMS", "DICT", "ADDITEMS", "FROZENSET")}
_MEMO_PUTS = {_CODE["PUT"], _CODE["BINPUT"], _CODE["LONG_BINPUT"], _CODE["MEMOIZE"]}
_MEMO_GETS = {_CODE["GET"], _CODE["BINGET"], _CODE["LONG_BINGET"]}
_TUPLES = {_CODE["TUPLE1"], _CODE["TUPLE2"], _CODE["TUPLE3"]}
_HASHES_KEYS = {_CODE["SETITEMS"]: 2, _CODE["DICT"]: 2, _CODE["ADDITEMS"]: 1, _CODE["FROZENSET"]: 1}
_MEMOIZE, _MARK, _STOP, _POP, _DUP, _TUPLE, _SETITEM = (
    _CODE[name] for name in ("MEMOIZE", "MARK", "STOP", "POP", "DUP", "TUPLE", "SETITEM"))


def _check_opcodes(data: bytes | mmap.mmap, pos: int, limits: Limits) -> None:
    """One lean pass over the pickle's opcodes from `pos` to STOP, before it runs. It refuses more than
    `max_opcodes` (every opcode makes at most one object); a memo index above the opcode count (CPython
    sizes its memo by the largest index; a pickler numbers them from 0); and a dict key or set member
    whose hashing would walk more than `max_hash_work` tuples (a tuple's hash is not cached: one holding
    the same tuple twice, 60 levels deep, would hash for ever inside the unpickler). For that it tracks
    each stack item's hashing cost: 1, or for a tuple 1 + its items' costs. Written flat for speed."""
    end, stack, marks, memo = len(data), [], [], {}
    table, lengths, memo_puts, memo_gets, tuples = _OPCODES, _LENGTH_BYTES, _MEMO_PUTS, _MEMO_GETS, _TUPLES
    for count in range(limits.max_opcodes):
        if pos >= end:
            raise _Corrupt("its pickle ends before its STOP opcode")
        op = data[pos]
        entry = table[op]
        if entry is None:
            raise _Corrupt(f"unknown pickle opcode {op:#04x} at byte {pos}")
        layout, below_mark, pops, pushes = entry
        pos += 1
        arg_start = pos
        if type(layout) is int:
            if layout >= 0:
                pos += layout
            else:
                width = lengths[layout]
                pos += width + int.from_bytes(data[arg_start:arg_start + width], "little")
        else:
            for _ in range(layout[1]):
                pos = data.find(b"\n", pos) + 1
                if pos == 0:
                    raise _Corrupt("its pickle ends inside an opcode's argument")
        if pops > len(stack):
            raise _Corrupt(f"its pickle pops an empty stack at byte {arg_start - 1}")
        if op in memo_puts:
            index = len(memo) if op == _MEMOIZE else _memo_index(op, bytes(data[arg_start:pos]))
            if index is None or index > count or not stack:
                raise _Refused(f"its pickle uses memo index {index if index is not None else '?'} after only "
                               f"{count} opcodes")
            memo[index] = stack[-1]
        elif op in memo_gets:
            stack.append(memo.get(_memo_index(op, bytes(data[arg_start:pos])), 1))
        elif below_mark >= 0:
            if not marks:
                raise _Corrupt(f"its pickle has no MARK for the opcode at byte {arg_start - 1}")
            start = marks.pop()
            items = stack[start:]
            del stack[max(0, start - below_mark):]
            if op in _HASHES_KEYS:
                _check_hash_work(items[::_HASHES_KEYS[op]], limits)
            stack.extend([1 + sum(items) if op == _TUPLE else 1] * pushes)
        elif op == _MARK:
            marks.append(len(stack))
        elif op == _STOP:
            return
        elif pops == 0:
            stack.extend([1] * pushes)
        else:
            if op == _POP and marks and marks[-1] == len(stack):
                marks.pop()
                continue
            items = stack[-pops:]
            del stack[-pops:]
            if op == _SETITEM:
                _check_hash_work(items[1:2], limits)
            stack.extend([1 + sum(items) if op in tuples else (items[-1] if op == _DUP else 1)] * pushes)
    raise _Refused(f"its pickle has more than {limits.max_opcodes} opcodes (objects)")


def _memo_index(op: int, arg: bytes) -> int | None:
    if op in (_CODE["PUT"], _CODE["GET"]):
        text = arg.strip()
        return int(text) if text.isdigit() and len(text) < 12 else None
    return int.from_bytes(arg, "little")


def _check_hash_work(costs: list, limits: Limits) -> None:
    if costs and max(costs) > limits.max_hash_work:
        raise _Refused(f"a dict key or set member made of more than {limits.max_hash_work} nested tuples (hashing "
                       "it would take for ever)")


def _unpickle(data: bytes | mmap.mmap, pos: int, source: Path, load_storage: Callable[[tuple], np.ndarray],
              budget: _TensorBudget) -> tuple[Any, int]:
    """The object pickled at `pos` in `data` and where its pickle ends. An mmap's reads, unlike a file's,
    never ask for more memory than the file holds."""
    _check_opcodes(data, pos, budget.limits)
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    stream.seek(pos)
    return _RestrictedUnpickler(stream, source, load_storage, budget).load(), stream.tell()


def check_object_graph(root: Any, limits: Limits = LIMITS) -> None:
    """Walk the unpickled objects once, counting every visit (a shared object each time it is reached):
    a cycle, nesting deeper than `max_depth` or more than `max_visits` visits is refused, so that any
    later walk of the same objects (modules, state dicts, error messages) is bounded too."""
    visits, on_path = 0, set()
    stack: list[tuple[Any, int, bool]] = [(root, 0, False)]
    while stack:
        obj, depth, leaving = stack.pop()
        if leaving:
            on_path.discard(id(obj))
            continue
        visits += 1
        if visits > limits.max_visits:
            raise _Refused(f"its objects number more than {limits.max_visits} when walked (a shared object "
                           "counts each time it is reached)")
        children = _children(obj)
        if not children:
            continue
        if id(obj) in on_path:
            raise _Refused(f"a {getattr(obj, 'qualname', type(obj).__name__)} contains itself (a reference cycle)")
        if depth >= limits.max_depth:
            raise _Refused(f"its objects are nested more than {limits.max_depth} deep")
        on_path.add(id(obj))
        stack.append((obj, depth, True))
        stack.extend((child, depth + 1, False) for child in children)


def _children(obj: Any) -> list:
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, InertRecord):
        return [*obj.args, *obj.state.keys(), *obj.state.values()]
    return []


# ------------------------------------------------------------------------------------------------
# Archives: torch's zip format and the legacy (torch < 1.6) stream

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_ZIP_MAGIC = b"PK\x03\x04"


def _storage_array(raw: bytes, dtype: str, big_endian: bool, what: str) -> np.ndarray:
    if dtype == "bf16":  # numpy has no bfloat16: its bits are the high half of a float32
        return (np.frombuffer(raw, ">u2" if big_endian else "<u2").astype(np.uint32) << 16).view(np.float32)
    dt = np.dtype(dtype).newbyteorder(">" if big_endian else "<")
    if len(raw) % dt.itemsize:
        raise TrtnetError(f"{what}: {len(raw)} bytes is not a whole number of {dt.name} values")
    return np.frombuffer(raw, dt).astype(dt.newbyteorder("="))


def _check_zip_entries(path: Path, archive: zipfile.ZipFile, limits: Limits) -> None:
    """Declared sizes, checked before anything is inflated: the entries must fit in the file and none may
    inflate more than `max_inflation` times (a zip bomb)."""
    file_size = path.stat().st_size
    if sum(info.compress_size for info in archive.infolist()) > file_size:
        raise _Refused("its zip entries claim more bytes than the file holds (overlapping or corrupt entries)")
    for info in archive.infolist():
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise _Corrupt(f"zip entry {info.filename} is stored with two different sizes")
        if info.file_size > max(1 << 20, limits.max_inflation * info.compress_size):
            raise _Refused(f"zip entry {info.filename} inflates {info.compress_size} bytes to {info.file_size} "
                           f"(more than {limits.max_inflation}x: a zip bomb)")
    total = sum(info.file_size for info in archive.infolist())
    if total > max(1 << 20, limits.max_inflation * file_size):
        raise _Refused(f"its zip entries inflate to {total} bytes from a {file_size}-byte file (more than "
                       f"{limits.max_inflation}x: a zip bomb)")


def _read_member(archive: zipfile.ZipFile, name: str) -> bytes:
    """At most the entry's declared (and checked) size, however much its data would inflate to."""
    info = archive.getinfo(name)
    with archive.open(info) as f:
        data = f.read(info.file_size)
    if len(data) != info.file_size:
        raise _Corrupt(f"zip entry {name} holds {len(data)} of its {info.file_size} bytes")
    return data


def _load_zip(path: Path, archive: zipfile.ZipFile, limits: Limits) -> Any:
    _check_zip_entries(path, archive, limits)
    names = set(archive.namelist())
    if any(n.endswith("/constants.pkl") for n in names):
        raise TrtnetError(f"{path} is a TorchScript archive (torch.jit.save): trtnet reads torch.save checkpoints")
    pickles = sorted(n for n in names if n.endswith("/data.pkl") and n.count("/") == 1)
    if not pickles:
        raise TrtnetError(f"{path} is a zip file but not a PyTorch checkpoint (no <name>/data.pkl inside)")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = f"{prefix}byteorder"
    big_endian = byteorder in names and _read_member(archive, byteorder).strip() == b"big"
    storages: dict[str, np.ndarray] = {}
    budget = _TensorBudget(limits)

    def load_storage(pid: tuple) -> np.ndarray:
        kind, key = pid[1], pid[2]
        if key not in storages:
            member = f"{prefix}data/{key}"
            if member not in names:
                raise TrtnetError(f"{path} is incomplete: storage {member} is missing (truncated download?)")
            storages[key] = _storage_array(_read_member(archive, member), kind.dtype, big_endian, f"{path}:{member}")
            budget.add_storage(storages[key])
        return storages[key]

    if archive.getinfo(pickles[0]).file_size > limits.max_pickle_bytes:
        raise _Refused(f"its object pickle {pickles[0]} is larger than {limits.max_pickle_bytes} bytes")
    return _unpickle(_read_member(archive, pickles[0]), 0, path, load_storage, budget)[0]


def _load_legacy(path: Path, limits: Limits) -> Any:
    """torch < 1.6: magic, protocol, sys_info, the object pickle, its storage keys, then each storage
    as an int64 element count and the raw values. A first pass over the object pickle, with tensors
    left out, learns each storage's dtype (hence item size) so the data section can be indexed."""
    if path.stat().st_size == 0:
        raise _Corrupt("the file is empty")
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as f:
        budget = _TensorBudget(limits)

        def no_storage(pid: tuple) -> np.ndarray:
            raise pickle.UnpicklingError("storage reference in a header")

        try:
            magic, pos = _unpickle(f, 0, path, no_storage, budget)
        except (_Corrupt, pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError):
            magic = None
        if magic != _LEGACY_MAGIC:
            raise TrtnetError(f"cannot read {path}: not a valid PyTorch checkpoint (neither a zip archive nor a "
                              "legacy torch file)")
        _protocol, pos = _unpickle(f, pos, path, no_storage, budget)
        sys_info, object_start = _unpickle(f, pos, path, no_storage, budget)
        order = "big" if isinstance(sys_info, dict) and sys_info.get("little_endian") is False else "little"
        dtypes: dict[str, str] = {}

        def note_dtype(pid: tuple) -> Any:
            dtypes[pid[2]] = pid[1].dtype
            return _PENDING

        skeleton, object_end = _unpickle(f, object_start, path, note_dtype, budget)
        check_object_graph(skeleton, limits)
        keys, pos = _unpickle(f, object_end, path, no_storage, budget)
        if not (isinstance(keys, list) and len(keys) <= len(dtypes) and all(isinstance(k, str) for k in keys)):
            raise _Corrupt("its storage key list is not a list of the storages the pickle uses")
        located = {}
        for key in keys:
            if key not in dtypes:
                raise TrtnetError(f"{path} is corrupt: storage {key} is listed but never used")
            count = int.from_bytes(f[pos:pos + 8], order, signed=True)
            itemsize = 2 if dtypes[key] == "bf16" else np.dtype(dtypes[key]).itemsize
            pos += 8
            if not 0 <= count * itemsize <= len(f) - pos:
                raise _Corrupt(f"storage {key} declares {count} values ({count * itemsize} bytes) but the file has "
                               f"{max(0, len(f) - pos)} bytes left")
            located[key] = (pos, count * itemsize)
            pos += count * itemsize
        storages: dict[str, np.ndarray] = {}

        def load_storage(pid: tuple) -> np.ndarray:
            key = pid[2]
            if key not in storages:
                if key not in located:
                    raise TrtnetError(f"{path} is incomplete: storage {key} is missing")
                start, size = located[key]
                storages[key] = _storage_array(f[start:start + size], pid[1].dtype, order == "big", f"{path}:{key}")
                budget.add_storage(storages[key])
            view = pid[5] if len(pid) > 5 else None
            if view is not None:  # (view key, offset, size) into the root storage
                return storages[key][view[1]: view[1] + view[2]]
            return storages[key]

        return _unpickle(f[object_start:object_end], 0, path, load_storage, budget)[0]


class _Corrupt(Exception):
    """The file does not hold what its own structure says: cut short or damaged."""


def load_pickle(path: str | Path, limits: Limits | None = None) -> Any:
    """The object a torch checkpoint holds, with tensors as numpy arrays and modules as records (by default
    those of torch.nn and of the modules each family in networks/ names in PICKLED_MODULES)."""
    if limits is None:
        from trtnet import networks

        limits = replace(LIMITS, model_modules=(*LIMITS.model_modules, *networks.pickled_modules()))
    path = Path(path)
    if path.is_dir():
        raise TrtnetError(f"checkpoint {path} is a directory, not a file: give the .pt/.pth file inside it")
    if not path.is_file():
        raise TrtnetError(f"checkpoint not found: {path}")
    try:
        obj = _load(path, limits)
        check_object_graph(obj, limits)
        return obj
    except TrtnetError:
        raise
    except _Refused as exc:
        raise TrtnetError(f"refusing to load {path}: {exc}") from None
    except _Corrupt as exc:
        raise TrtnetError(f"cannot read {path}: truncated or corrupt checkpoint ({exc})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            zipfile.BadZipFile, OSError) as exc:
        raise TrtnetError(f"cannot read {path}: not a valid PyTorch checkpoint (a truncated or corrupt checkpoint? "
                          f"{type(exc).__name__}: {_first_line(exc)})") from None


def _load(path: Path, limits: Limits) -> Any:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return _load_zip(path, archive, limits)
    with open(path, "rb") as f:
        if f.read(4) == _ZIP_MAGIC:
            raise _Corrupt("a zip archive without its end (central directory): an interrupted download or copy?")
    return _load_legacy(path, limits)


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else ""
