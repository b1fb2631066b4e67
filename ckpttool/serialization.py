"""The only module that reads checkpoint bytes: a safe, lazy reader for ``torch.save`` files.

Safety: the pickle inside a checkpoint is run by an unpickler whose ``find_class`` never imports
anything. A short allowlist maps the globals torch itself writes (tensor rebuilders, storage
types, dtypes, OrderedDict, Counter ...) to inert stand-ins; every other global becomes an
:class:`Opaque` class named after it, so calling it (REDUCE, NEWOBJ, INST, OBJ) only records the
call. Checkpoints holding ``argparse.Namespace``, numpy scalars or custom classes stay
inspectable, and a pickle that names ``os.system`` runs nothing.

Laziness: tensors are never materialised. The unpickler turns each one into a :class:`TensorRef`
(dtype, shape, stride, storage record) and only :meth:`TorchFile.read_storage` reads bytes, on
request, for the few scalar tensors a report needs (a tensor learning rate, Adam's ``step``).

Example:
    >>> ckpt = read_checkpoint("fixtures/adamw_cosine.pt")       # doctest: +SKIP
    >>> ckpt.kind, sorted(ckpt.root)                            # doctest: +SKIP
    ('torch-zip', ['epoch', 'model', 'optimizer', 'scheduler'])
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from ckpttool.errors import InputError

# --- torch's on-disk vocabulary -------------------------------------------------------------

# Legacy (non-zip) torch.save files start with this integer, pickled (torch/serialization.py).
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
ZIP_MAGIC = b"PK\x03\x04"
# Size of a zip local file header before its variable-length name and extra fields.
_ZIP_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")

# Typed storage class name -> dtype name, as torch writes them (torch.storage).
STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64", "QInt8Storage": "qint8", "QInt32Storage": "qint32",
    "QUInt8Storage": "quint8", "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
    # UntypedStorage holds bytes; _rebuild_tensor_v3 names the real dtype separately.
    "UntypedStorage": "uint8",
}

# Bytes per element of every dtype torch can save.
DTYPE_ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
    "int16": 2, "int8": 1, "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8, "bool": 1,
    "complex128": 16, "complex64": 8, "complex32": 4, "qint8": 1, "qint32": 4, "quint8": 1,
    "quint4x2": 1, "quint2x4": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
    "bits8": 1, "bits16": 2, "bits1x8": 1, "bits2x4": 1, "bits4x2": 1,
    "int1": 1, "int2": 1, "int3": 1, "int4": 1, "int5": 1, "int6": 1, "int7": 1,
    "uint1": 1, "uint2": 1, "uint3": 1, "uint4": 1, "uint5": 1, "uint6": 1, "uint7": 1,
}

# struct formats for decoding scalar tensors without torch.
_SCALAR_FORMATS = {
    "float64": "d", "float32": "f", "float16": "e", "int64": "q", "int32": "i",
    "int16": "h", "int8": "b", "uint8": "B", "uint16": "H", "uint32": "I", "uint64": "Q",
    "bool": "?",
}

# Globals whose *call* would run code or touch the system on a normal torch.load. ckpttool never
# calls them; naming them lets a report say "this file is hostile" instead of "unknown class".
DANGEROUS_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "pty", "importlib",
    "runpy", "code", "codeop", "ctypes", "webbrowser", "marshal", "pickle", "_pickle",
    "multiprocessing", "asyncio", "commands", "popen2", "platform", "signal", "tempfile",
    "urllib", "http", "ftplib", "smtplib", "telnetlib", "requests", "pip", "setuptools",
    "pdb", "bdb", "timeit", "cProfile", "profile", "trace", "dill", "joblib", "numpy.testing",
})
DANGEROUS_BUILTINS = frozenset({
    "eval", "exec", "compile", "open", "getattr", "setattr", "delattr", "__import__",
    "globals", "locals", "vars", "input", "breakpoint", "exit", "quit", "help", "memoryview",
})
# torch functions with side effects (loading code, files, or libraries).
DANGEROUS_TORCH = frozenset({
    "torch.load", "torch.save", "torch.hub.load", "torch.hub.download_url_to_file",
    "torch.jit.load", "torch.ops.load_library", "torch.classes.load_library",
    "torch.utils.cpp_extension.load", "torch.utils.cpp_extension.load_inline",
    "torch.serialization.load", "torch._C._jit_script_compile",
})


def is_dangerous_global(dotted: str) -> bool:
    """True for a global that a hostile pickle would call to run code (os.system, eval, ...)."""
    module, _, name = dotted.rpartition(".")
    root = dotted.split(".", 1)[0]
    if module == "builtins" or module == "__builtin__":
        return name in DANGEROUS_BUILTINS
    if dotted in DANGEROUS_TORCH or module.startswith("torch._C") and "load" in name:
        return True
    return root in DANGEROUS_MODULES or module in DANGEROUS_MODULES


# --- inert stand-ins for what a checkpoint contains ----------------------------------------


@dataclass(frozen=True)
class StorageRef:
    """One tensor storage record: where its bytes live in the file, never the bytes."""

    key: str  # zip: the record data/<key>; legacy: the storage key
    dtype: str  # element dtype of the storage
    location: str  # device it was saved from: "cpu", "cuda:0", ...
    numel: int  # elements in the storage
    storage_type: str  # class name torch wrote, e.g. "FloatStorage" or "UntypedStorage"

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_ITEMSIZE.get(self.dtype, 1)


@dataclass(frozen=True, eq=False)
class TensorRef:
    """A tensor described by its metadata; its data stays in the file.

    ``rebuild`` keeps the rebuilder's dotted name and raw arguments so a writer can emit the very
    same pickle for it again.
    """

    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int  # in elements
    storage: StorageRef | None  # None for meta tensors (no data at all)
    requires_grad: bool = False
    parameter: bool = False
    subclass: str | None = None  # dotted name of a Tensor subclass, if any
    rebuild: tuple[str, tuple] = field(default=("", ()), repr=False)

    @property
    def device(self) -> str:
        return self.storage.location if self.storage is not None else "meta"

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE.get(self.dtype, 1)

    @property
    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def __repr__(self) -> str:
        dims = ", ".join(str(s) for s in self.shape)
        return f"tensor({self.dtype}[{dims}] @{self.device})"

    def __eq__(self, other: object) -> bool:
        # Identity of a tensor in a tree: same metadata and same storage record. Content equality
        # is a question for the diff, which reads bytes.
        if not isinstance(other, TensorRef):
            return NotImplemented
        return (self.dtype, self.shape, self.stride, self.storage_offset, self.storage) == (
            other.dtype, other.shape, other.stride, other.storage_offset, other.storage)

    def __hash__(self) -> int:
        return hash((self.dtype, self.shape, self.storage_offset, self.storage))


class _Marker:
    """A torch object that is only a name: a dtype, a storage class, a device."""

    __slots__ = ("kind", "name")

    def __init__(self, kind: str, name: str):
        self.kind = kind
        self.name = name

    def __repr__(self) -> str:
        return f"{self.kind}({self.name})" if self.kind == "device" else f"torch.{self.name}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Marker) and (self.kind, self.name) == (other.kind, other.name)

    def __hash__(self) -> int:
        return hash((self.kind, self.name))


class DType(_Marker):
    """A ``torch.<dtype>`` global."""

    def __init__(self, name: str):
        super().__init__("dtype", name)


class StorageType(_Marker):
    """A ``torch.<X>Storage`` class global, as used in storage persistent ids."""

    def __init__(self, name: str):
        super().__init__("storage", name)

    @property
    def dtype(self) -> str:
        return STORAGE_DTYPES.get(self.name, "uint8")


class Device(_Marker):
    """A ``torch.device(...)`` value."""

    def __init__(self, type_: str, index: int | None = None):
        super().__init__("device", type_ if index is None else f"{type_}:{index}")
        self.args = (type_,) if index is None else (type_, index)


class Opaque:
    """An instance of a global ckpttool does not import: a record of how it was built.

    Subclasses are made per dotted name by :func:`opaque_class`; the unpickler hands the class
    to REDUCE / NEWOBJ / BUILD / APPENDS / SETITEMS, which only record their arguments.
    """

    dotted: str = "?"
    __slots__ = ("how", "args", "kwargs", "state", "items", "dictitems")

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        self = object.__new__(cls)
        self.how = "new"  # NEWOBJ: cls.__new__(cls, *args); REDUCE also runs __init__
        self.args = args
        self.kwargs = kwargs
        self.state = None
        self.items: list[Any] = []
        self.dictitems: dict[Any, Any] = {}
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.how = "call"

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Any) -> None:
        self.items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.dictitems[key] = value

    def __getattr__(self, name: str) -> Any:
        # Unpickling code probes attributes (e.g. `__setstate__` lookups are fine above); any
        # other attribute of an opaque value simply does not exist.
        raise AttributeError(name)

    def _content(self) -> tuple:
        return (self.dotted, self.how, self.args, tuple(sorted(self.kwargs.items(), key=repr)),
                self.state, self.items, list(self.dictitems.items()))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Opaque):
            return NotImplemented
        return self._content() == other._content()

    def __hash__(self) -> int:
        return hash(self.dotted)

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        text = f"{self.dotted}({', '.join(parts)})"
        if self.state is not None:
            text += f" state={self.state!r}"
        return text

    @property
    def dangerous(self) -> bool:
        return is_dangerous_global(self.dotted)


_OPAQUE_CLASSES: dict[str, type] = {}


def opaque_class(module: str, name: str) -> type:
    """The stand-in class for the global ``module.name`` (one class per dotted name)."""
    dotted = f"{module}.{name}"
    cls = _OPAQUE_CLASSES.get(dotted)
    if cls is None:
        cls = type(name.rsplit(".", 1)[-1] or "opaque", (Opaque,),
                   {"dotted": dotted, "__slots__": (), "__module__": "ckpttool.opaque"})
        _OPAQUE_CLASSES[dotted] = cls
    return cls


def dotted_name(value: Any) -> str | None:
    """The global a value stands for: an Opaque instance or class, or None."""
    if isinstance(value, Opaque):
        return value.dotted
    if isinstance(value, type) and issubclass(value, Opaque):
        return value.dotted
    return None


# --- the safe unpickler --------------------------------------------------------------------


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return TensorRef(storage.dtype if isinstance(storage, StorageRef) else "?", _as_tuple(size),
                     _as_tuple(stride), int(storage_offset), storage, bool(requires_grad),
                     rebuild=("torch._utils._rebuild_tensor_v2",
                              (storage, storage_offset, size, stride, requires_grad,
                               backward_hooks) + (() if metadata is None else (metadata,))))


def _rebuild_tensor(storage, storage_offset, size, stride):
    return TensorRef(storage.dtype if isinstance(storage, StorageRef) else "?", _as_tuple(size),
                     _as_tuple(stride), int(storage_offset), storage,
                     rebuild=("torch._utils._rebuild_tensor",
                              (storage, storage_offset, size, stride)))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    name = dtype.name if isinstance(dtype, DType) else str(dtype)
    if isinstance(storage, StorageRef):
        storage = StorageRef(storage.key, name, storage.location,
                             storage.numel // max(DTYPE_ITEMSIZE.get(name, 1), 1)
                             if storage.storage_type == "UntypedStorage" else storage.numel,
                             storage.storage_type)
    return TensorRef(name, _as_tuple(size), _as_tuple(stride), int(storage_offset), storage,
                     bool(requires_grad),
                     rebuild=("torch._utils._rebuild_tensor_v3",
                              (storage, storage_offset, size, stride, requires_grad,
                               backward_hooks, dtype) + (() if metadata is None else (metadata,))))


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, TensorRef):
        return opaque_class("torch._utils", "_rebuild_parameter")(data, requires_grad)
    args = (data, requires_grad, backward_hooks) + (() if state is None else (state,))
    fn = "_rebuild_parameter" if state is None else "_rebuild_parameter_with_state"
    return TensorRef(data.dtype, data.shape, data.stride, data.storage_offset, data.storage,
                     bool(requires_grad), True, data.subclass,
                     rebuild=(f"torch._utils.{fn}", args))


def _rebuild_from_type_v2(func, new_type, args, state):
    inner = func(*args) if callable(func) else None
    if isinstance(inner, TensorRef):
        return TensorRef(inner.dtype, inner.shape, inner.stride, inner.storage_offset,
                         inner.storage, inner.requires_grad, inner.parameter,
                         dotted_name(new_type) or "torch.Tensor",
                         rebuild=("torch._tensor._rebuild_from_type_v2",
                                  (func, new_type, args, state)))
    return opaque_class("torch._tensor", "_rebuild_from_type_v2")(func, new_type, args, state)


def _rebuild_meta(dtype, size, stride, requires_grad):
    return TensorRef(dtype.name if isinstance(dtype, DType) else str(dtype), _as_tuple(size),
                     _as_tuple(stride), 0, None, bool(requires_grad),
                     rebuild=("torch._utils._rebuild_meta_tensor_no_storage",
                              (dtype, size, stride, requires_grad)))


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles spell bytes as _codecs.encode(str, "latin1"); nothing else is needed.
    if isinstance(text, str) and isinstance(encoding, str) and isinstance(errors, str):
        return text.encode(encoding, errors)
    return opaque_class("_codecs", "encode")(text, encoding, errors)


def _reconstructor(cls, base, state=None):
    # copyreg._reconstructor is how protocol 0/1 pickles build instances; for an opaque class
    # this is just "a new instance", which records nothing dangerous.
    if isinstance(cls, type) and issubclass(cls, Opaque):
        obj = cls.__new__(cls)
        obj.how = "reconstructor"
        obj.args = (base, state) if state is not None else ()
        return obj
    return opaque_class("copyreg", "_reconstructor")(cls, base, state)


def _make_device(type_, index=None):
    if isinstance(type_, str) and (index is None or isinstance(index, int)):
        if index is None and ":" in type_:
            t, _, i = type_.partition(":")
            return Device(t, int(i)) if i.isdigit() else Device(type_)
        return Device(type_, index)
    return opaque_class("torch", "device")(type_, index)


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("collections", "Counter"): Counter,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("__builtin__", "set"): set,
    ("_codecs", "encode"): _codecs_encode,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): _rebuild_meta,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "device"): _make_device,
    ("torch", "Size"): tuple,
}

_DTYPE_NAMES = frozenset(DTYPE_ITEMSIZE) | {"float", "double", "half", "long", "int", "short",
                                            "cfloat", "cdouble", "chalf"}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that imports nothing: see the module docstring.

    ``persistent_load`` turns storage ids into :class:`StorageRef`; ``globals_seen`` records
    every global the pickle names, in order, so reports can list them.
    """

    def __init__(self, file: BinaryIO, *, legacy: bool = False):
        super().__init__(file, encoding="utf-8")
        self.legacy = legacy
        self.globals_seen: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        dotted = f"{module}.{name}"
        self.globals_seen.append(dotted)
        safe = _SAFE_GLOBALS.get((module, name))
        if safe is not None:
            return safe
        if module in ("torch", "torch.storage"):
            if name.endswith("Storage") and (name in STORAGE_DTYPES or name == "TypedStorage"):
                return StorageType(name)
            if name in _DTYPE_NAMES:
                return DType(name)
        return opaque_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        tag = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if tag == "storage" and len(pid) >= 5:
            storage_type, key, location, numel = pid[1], pid[2], pid[3], pid[4]
            if isinstance(location, bytes):
                location = location.decode("ascii", "replace")
            type_name = storage_type.name if isinstance(storage_type, StorageType) else str(
                dotted_name(storage_type) or storage_type)
            dtype = storage_type.dtype if isinstance(storage_type, StorageType) else "uint8"
            if not isinstance(numel, int) or numel < 0:
                raise pickle.UnpicklingError(f"bad storage size {numel!r}")
            return StorageRef(str(key), dtype, str(location), numel, type_name)
        if tag == "module":  # legacy files may pickle whole nn.Module source; never run it
            return opaque_class("torch.serialization", "module_source")(*pid[1:2])
        raise pickle.UnpicklingError(f"unknown persistent id type {tag!r}")


def safe_loads(data: bytes, *, legacy: bool = False) -> tuple[Any, list[str]]:
    """Unpickle ``data`` without importing or running anything; returns (value, globals seen)."""
    unpickler = SafeUnpickler(io.BytesIO(data), legacy=legacy)
    return unpickler.load(), unpickler.globals_seen


# --- checkpoint files ----------------------------------------------------------------------


@dataclass
class TorchFile:
    """One ``torch.save`` file read safely: its object tree and where its storages live.

    ``root`` is the unpickled tree: dicts, lists, tuples, numbers, strings, plus TensorRef,
    Opaque and marker objects. ``kind`` is "torch-zip" or "torch-legacy" (the layout module may
    refine it, e.g. to "lightning").
    """

    path: str
    kind: str
    root: Any
    globals_seen: list[str]
    size: int
    byteorder: str = "little"
    zip_prefix: str | None = None  # "archive/" part of the zip record names
    # storage key -> (absolute file offset of its first byte, byte length)
    storage_spans: dict[str, tuple[int, int]] = field(default_factory=dict)

    def read_storage(self, storage: StorageRef, start: int = 0, length: int | None = None) -> bytes:
        """Bytes of one storage record (or a slice of it), read on demand."""
        span = self.storage_spans.get(storage.key)
        if span is None:
            raise InputError(f"{self.path}: tensor storage {storage.key!r} is missing from the file")
        offset, size = span
        length = size - start if length is None else length
        if start < 0 or start + length > size:
            raise InputError(f"{self.path}: tensor storage {storage.key!r} is shorter than its "
                             "tensor says; the file is damaged")
        with open(self.path, "rb") as f:
            f.seek(offset + start)
            data = f.read(length)
        if len(data) != length:
            raise InputError(f"{self.path}: the file ends inside tensor data; it is truncated")
        return data

    def tensor_bytes(self, ref: TensorRef) -> bytes:
        """The raw bytes of a contiguous tensor (for small tensors: lrs, steps)."""
        if ref.storage is None:
            raise InputError(f"{self.path}: a meta tensor has no data")
        if not ref.is_contiguous:
            raise InputError(f"{self.path}: non-contiguous tensor {ref!r} cannot be read raw")
        return self.read_storage(ref.storage, ref.storage_offset * ref.itemsize,
                                 ref.numel * ref.itemsize)

    def scalar(self, ref: TensorRef) -> float | int | bool:
        """The Python value of a one-element tensor, decoded without torch."""
        if ref.numel != 1:
            raise ValueError(f"{ref!r} is not a scalar")
        raw = self.tensor_bytes(ref)
        order = "<" if self.byteorder == "little" else ">"
        if ref.dtype == "bfloat16":
            (value,) = struct.unpack(order + "f", raw + b"\0\0" if order == ">" else b"\0\0" + raw)
            return value
        fmt = _SCALAR_FORMATS.get(ref.dtype)
        if fmt is None:
            raise ValueError(f"cannot decode a {ref.dtype} scalar without torch")
        (value,) = struct.unpack(order + fmt, raw)
        return value


def _kind_of_bytes(head: bytes) -> str:
    """What the first bytes of a file say it is: "zip", "legacy", or a reason it is neither."""
    if not head:
        return "empty"
    if head.startswith(ZIP_MAGIC) or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in (2, 3, 4, 5):
        return "legacy"
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        return "json"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 1 << 32:
        return "safetensors"  # an 8-byte header length, then the JSON header
    if head.startswith(b"\x93NUMPY"):
        return "numpy"
    return "unknown"


_NOT_A_CHECKPOINT = {
    "empty": "the file is empty (0 bytes); was the save interrupted?",
    "json": "this is a JSON file, not a torch checkpoint",
    "safetensors": ("this is a safetensors file (model weights only, no optimizer or scheduler "
                    "state); point ckpttool at the torch.save file that holds the optimizer"),
    "numpy": "this is a NumPy .npy file, not a torch checkpoint",
    "unknown": "not a torch checkpoint (neither a torch zip archive nor a legacy torch file)",
}


def read_checkpoint(path: str | os.PathLike) -> TorchFile:
    """Read a ``torch.save`` file (zip or legacy) safely, without reading tensor data.

    Raises:
        InputError: the path is missing, unreadable, damaged or not a torch checkpoint.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, and not a checkpoint directory ckpttool knows")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    kind = _kind_of_bytes(head)
    if kind == "zip":
        return _read_zip(path, size)
    if kind == "legacy":
        return _read_legacy(path, size)
    raise InputError(f"{path}: {_NOT_A_CHECKPOINT[kind]}")


def _unpickle(path: str, data: bytes, *, legacy: bool = False) -> tuple[Any, list[str]]:
    try:
        return safe_loads(data, legacy=legacy)
    except RecursionError:
        raise InputError(f"{path}: the checkpoint's pickle nests too deeply to read safely") from None
    except MemoryError:
        raise InputError(f"{path}: the checkpoint's pickle asks for more memory than it "
                         "could hold; the file is damaged or hostile") from None
    except Exception as e:  # the unpickler raises many types on damaged data
        detail = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise InputError(f"{path}: the checkpoint's pickle is corrupted ({detail})") from None


def _read_zip(path: str, size: int) -> TorchFile:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise InputError(f"{path}: damaged zip archive: the file is truncated or corrupted "
                         f"({e}); re-copy or re-save it") from None
    with zf:
        infos = zf.infolist()
        pkl = [i for i in infos if i.filename.endswith("data.pkl")
               and i.filename.count("/") == 1]
        if not pkl:
            if any(i.filename.endswith(".metadata") or i.filename.endswith(".distcp")
                   for i in infos):
                raise InputError(f"{path}: a zip of a distributed checkpoint; unpack it and "
                                 "pass the directory")
            raise InputError(f"{path}: a zip archive without data.pkl: not a torch checkpoint")
        prefix = pkl[0].filename[: -len("data.pkl")]
        try:
            data = zf.read(pkl[0])
        except (zipfile.BadZipFile, OSError, EOFError, ValueError,
                NotImplementedError, RuntimeError) as e:
            raise InputError(f"{path}: cannot read the checkpoint's pickle ({e}); the file "
                             "is damaged") from None
        byteorder = "little"
        order_info = zf.NameToInfo.get(prefix + "byteorder")
        if order_info is not None:
            try:
                byteorder = zf.read(order_info).decode("ascii", "replace").strip() or "little"
            except Exception:  # a damaged byteorder record only matters for scalar reads
                byteorder = "little"
        root, seen = _unpickle(path, data)
        spans: dict[str, tuple[int, int]] = {}
        data_prefix = prefix + "data/"
        with open(path, "rb") as f:
            for info in infos:
                if info.filename.startswith(data_prefix):
                    key = info.filename[len(data_prefix):]
                    spans[key] = (_zip_data_offset(f, info), info.file_size)
    return TorchFile(path, "torch-zip", root, seen, size, byteorder, prefix, spans)


def _zip_data_offset(f: BinaryIO, info: zipfile.ZipInfo) -> int:
    """Absolute offset of a stored record's payload (after its local header)."""
    f.seek(info.header_offset)
    header = f.read(_ZIP_LOCAL_HEADER.size)
    if len(header) < _ZIP_LOCAL_HEADER.size or header[:4] != ZIP_MAGIC:
        return -1  # reported when (if ever) the record is read
    fields = _ZIP_LOCAL_HEADER.unpack(header)
    name_len, extra_len = fields[9], fields[10]
    return info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len


def _read_legacy(path: str, size: int) -> TorchFile:
    """Legacy format: magic, protocol, sys_info, the object, the storage keys, then storages."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        def load_one(what: str) -> Any:
            unpickler = SafeUnpickler(f, legacy=True)
            try:
                return unpickler.load(), unpickler.globals_seen
            except RecursionError:
                raise InputError(f"{path}: the checkpoint's pickle nests too deeply to read "
                                 "safely") from None
            except Exception as e:
                raise InputError(f"{path}: the legacy checkpoint's {what} is corrupted "
                                 f"({str(e).splitlines()[0][:100] if str(e) else type(e).__name__})"
                                 ) from None

        magic, seen0 = load_one("header")
        if magic != LEGACY_MAGIC_NUMBER:
            root = magic
            if seen0 and any(is_dangerous_global(g) for g in seen0):
                # A bare pickle that calls code: report it as what it is.
                return TorchFile(path, "pickle", root, seen0, size)
            raise InputError(f"{path}: a pickle file, but not a torch checkpoint (no torch "
                             "magic number)")
        load_one("protocol version")
        sys_info, _ = load_one("system info")
        little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
        root, seen = load_one("object")
        keys, _ = load_one("storage list")
        spans: dict[str, tuple[int, int]] = {}
        refs = _collect_storages(root)
        if isinstance(keys, list):
            offset = f.tell()
            for key in keys:
                ref = refs.get(str(key))
                # Each storage is an int64 element count followed by the raw bytes.
                itemsize = DTYPE_ITEMSIZE.get(ref.dtype, 1) if ref else 1
                header = f.read(8)
                if len(header) < 8:
                    break
                (count,) = struct.unpack("<q" if little else ">q", header)
                nbytes = max(count, 0) * itemsize
                spans[str(key)] = (offset + 8, nbytes)
                offset += 8 + nbytes
                f.seek(offset)
    return TorchFile(path, "torch-legacy", root, seen, size,
                      "little" if little else "big", None, spans)


def _collect_storages(root: Any) -> dict[str, StorageRef]:
    found: dict[str, StorageRef] = {}
    for _, value in walk(root):
        if isinstance(value, TensorRef) and value.storage is not None:
            found.setdefault(value.storage.key, value.storage)
    return found


# --- walking a tree --------------------------------------------------------------------------

MAX_DEPTH = 400


def children(value: Any) -> list[tuple[Any, Any]]:
    """(key, child) pairs of a container value; leaves have none."""
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, (list, tuple)):
        return list(enumerate(value))
    if isinstance(value, Opaque):
        out: list[tuple[Any, Any]] = []
        if value.state is not None:
            out.append(("__state__", value.state))
        out.extend((f"__args__{i}", a) for i, a in enumerate(value.args))
        out.extend((f"__item__{i}", a) for i, a in enumerate(value.items))
        out.extend(value.dictitems.items())
        return out
    return []


def walk(root: Any, *, max_depth: int = MAX_DEPTH):
    """Yield (path, value) for every value in a tree, depth first, each container once.

    Shared references (a memo'd object reachable many ways) are visited once, so a "billion
    laughs" pickle cannot make this explode; nesting deeper than ``max_depth`` raises InputError.
    """
    seen: set[int] = set()
    stack: list[tuple[tuple, Any]] = [((), root)]
    while stack:
        path, value = stack.pop()
        yield path, value
        kids = children(value)
        if not kids:
            continue
        if id(value) in seen:
            continue
        seen.add(id(value))
        if len(path) >= max_depth:
            raise InputError(f"the checkpoint nests deeper than {max_depth} levels")
        for key, child in reversed(kids):
            stack.append((path + (key,), child))


def join_location(path: tuple) -> str:
    """The `/`-joined location string of a tree path (PRODUCT.md section 5)."""
    return "/".join(str(p) for p in path)


def load_tensor(file: TorchFile, ref: TensorRef, device: str | None = None):
    """A small tensor as a real ``torch.Tensor`` (imports torch): for lrs a replay needs.

    The bytes are read raw and reinterpreted in the tensor's own dtype, so the value is the one
    saved, bit for bit; ``device`` defaults to the device it was saved from.
    """
    import torch

    raw = file.tensor_bytes(ref)
    n = ref.itemsize
    if file.byteorder != "little" and n > 1:  # saved on a big-endian machine
        raw = b"".join(raw[i:i + n][::-1] for i in range(0, len(raw), n))
    dtype = getattr(torch, ref.dtype)
    flat = (torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype) if raw
            else torch.empty(0, dtype=dtype))
    return flat.reshape(ref.shape).clone().to(device or ref.device)
