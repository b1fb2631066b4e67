"""The only module that reads or writes checkpoint bytes: a safe, lazy reader for ``torch.save``
files, and a writer that re-emits an edited tree with every tensor record copied byte for byte.

Safety: the pickle inside a checkpoint is run by an unpickler whose ``find_class`` never imports
anything. A short allowlist maps the globals torch itself writes (tensor rebuilders, storage
types, dtypes, OrderedDict, Counter ...) to inert stand-ins, handed out fresh and sealed for each
use, so that a pickle's BUILD changes nothing beyond its own values; every other global becomes
an :class:`Opaque` class named after it, so calling it (REDUCE, NEWOBJ, INST, OBJ) only records
the call. Checkpoints holding ``argparse.Namespace``, numpy scalars or custom classes stay
inspectable, and a pickle that names ``os.system`` runs nothing. What only a hostile file holds
is refused with one line: a "billion laughs" of shared references (by count of values, checked
once, so every recursive reader of the tree is safe), calls that copy one object again and
again, methods hidden by instance attributes, zips with two pickles or compressed records.

Laziness: tensors are never materialised. The unpickler turns each one into a :class:`TensorRef`
(dtype, shape, stride, storage record) and only :meth:`TorchFile.read_storage` reads bytes, on
request, for the few scalar tensors a report needs (a tensor learning rate, Adam's ``step``).

Writing: :func:`write_checkpoint` pickles the (edited) tree the way ``torch.save`` would have,
without importing anything the checkpoint names (opaque values are re-emitted by name, with the
opcodes they were read with), and copies the storage records the new tree still references in
big blocks written straight to disk (O_DIRECT; kernel-side copies where a filesystem has no direct
I/O): tensor bytes never become Python objects nor pass through torch. Tensors a rewrite
creates arrive as :class:`NewTensor` values. The output appears atomically (:func:`atomic_output`).

Example:
    >>> ckpt = read_checkpoint("fixtures/adamw_cosine.pt")       # doctest: +SKIP
    >>> ckpt.kind, sorted(ckpt.root)                            # doctest: +SKIP
    ('torch-zip', ['epoch', 'model', 'optimizer', 'scheduler'])
    >>> ckpt.root["optimizer"]["param_groups"][0]["lr"] = 1e-4   # doctest: +SKIP
    >>> write_checkpoint(ckpt, ckpt.root, "out.pt")              # doctest: +SKIP
"""

from __future__ import annotations

import copyreg
import errno
import hashlib
import io
import itertools
import math
import os
import pickle
import secrets
import stat
import struct
import sys
import threading
import zipfile
import zlib
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from ckpttool.errors import CkptToolError, InputError, UnsafeCheckpointError

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
# Packages that hold nothing a checkpoint needs: every global in them or their submodules.
DANGEROUS_PACKAGES = frozenset({
    "os", "posix", "nt", "subprocess", "_posixsubprocess", "pty", "ctypes", "_ctypes",
    "importlib", "runpy", "shutil", "socket", "_socket", "multiprocessing", "webbrowser",
    "marshal", "pickle", "_pickle", "dill", "pydoc", "asyncio", "pip", "setuptools", "joblib",
    "requests", "urllib.request", "http.client", "http.server", "numpy.testing", "torch.hub",
    "torch.utils.cpp_extension", "pkgutil",
    # numpy's file readers and writers (np.load unpickles), memory maps, C libraries
    "numpy.lib.npyio", "numpy.lib._npyio_impl", "numpy.lib.format", "numpy.lib._format_impl",
    "numpy.core.memmap", "numpy._core.memmap", "numpy.ctypeslib", "numpy.f2py",
    "numpy.distutils",
    # torch's code packages and remote calls
    "torch.package", "torch.distributed.rpc", "pandas.io.pickle",
})
# Modules whose names a user package may well take (`code`, `trace`, `profile`, `signal` ...):
# matched only as the module itself (code.interact) or a class in it (code.InteractiveConsole.
# push), so that code.config.TrainConfig from a user's package `code` stays an ordinary class.
DANGEROUS_MODULES = frozenset({
    "sys", "code", "codeop", "commands", "popen2", "platform", "signal", "tempfile", "urllib",
    "urllib2", "ftplib", "smtplib", "telnetlib", "pdb", "bdb", "timeit", "cProfile", "profile",
    "trace",
})
DANGEROUS_BUILTINS = frozenset({
    "eval", "exec", "compile", "open", "getattr", "setattr", "delattr", "__import__",
    "globals", "locals", "vars", "input", "breakpoint", "exit", "quit", "help", "memoryview",
    "__build_class__",
})
# Single globals: code objects and functions made from them, attribute and method getters (a
# call chain reaches anything through them), file openers, and torch functions with side
# effects (a nested torch.load, loading code, files or libraries).
DANGEROUS_GLOBALS = frozenset({
    "types.FunctionType", "types.LambdaType", "types.CodeType",
    "operator.methodcaller", "operator.attrgetter", "operator.itemgetter",
    "_operator.methodcaller", "_operator.attrgetter", "_operator.itemgetter",
    "io.open", "_io.open", "io.FileIO", "_io.FileIO", "codecs.open",
    "torch.load", "torch.save", "torch.jit.load", "torch.jit._serialization.load",
    "torch.ops.load_library", "torch.classes.load_library", "torch._C._jit_script_compile",
    "torch.storage._load_from_bytes", "torch.serialization.save", "torch.serialization._save",
    "torch.serialization._legacy_save", "torch.jit.save", "torch.export.load",
    "torch.export.save", "torch.from_file", "torch.UntypedStorage.from_file",
    "torch.TypedStorage.from_file", "torch.storage.UntypedStorage.from_file",
    "torch.storage.TypedStorage.from_file", "torch.onnx.export",
    # numpy's file functions, as numpy names them (np.save.__module__ is "numpy")
    "numpy.save", "numpy.savez", "numpy.savez_compressed", "numpy.savetxt", "numpy.load",
    "numpy.loadtxt", "numpy.genfromtxt", "numpy.fromfile", "numpy.fromregex", "numpy.memmap",
    # loaders that build arbitrary objects, and getters that reach any attribute
    "pandas.read_pickle", "yaml.load", "yaml.load_all", "yaml.unsafe_load",
    "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all",
    "inspect.getattr_static", "typing.get_type_hints", "typing._eval_type",
})


def is_dangerous_global(dotted: str) -> bool:
    """True for a global that a hostile pickle would call to run code (os.system, eval, ...).

    Example:
        >>> is_dangerous_global("code.interact"), is_dangerous_global("code.config.TrainConfig")
        (True, False)
    """
    module, _, name = dotted.rpartition(".")
    if module in ("builtins", "__builtin__"):
        return name in DANGEROUS_BUILTINS
    if dotted in DANGEROUS_GLOBALS or (
            (module == "torch.serialization" or module.startswith("torch._C")) and "load" in name):
        return True
    root, _, rest = dotted.partition(".")
    if root in DANGEROUS_MODULES and (module == root or rest[:1].isupper()):
        return True
    return any(module == p or module.startswith(p + ".") for p in DANGEROUS_PACKAGES)


# --- inert stand-ins for what a checkpoint contains ----------------------------------------


class _Sealed:
    """A value the unpickler makes and hands out: a pickle cannot give it state.

    BUILD would otherwise write straight into the instance (past ``frozen=True``): a TensorRef
    whose shape is no longer what its rebuilder checked. The values are immutable, so a copy is
    the value itself.
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise _Refused(f"the pickle sets attributes on {self!r}, which torch.save never does: "
                       "the file is damaged or hostile")

    def __copy__(self) -> Any:
        return self

    def __deepcopy__(self, memo: Any) -> Any:
        return self


@dataclass(frozen=True)
class StorageRef(_Sealed):
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
class TensorRef(_Sealed):
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
        return math.prod(self.shape)

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
        return hash((self.dtype, self.shape, self.stride, self.storage_offset, self.storage))


class Marker(_Sealed):
    """A torch object that is only a name: a dtype, a storage class, a device."""

    __slots__ = ("kind", "name")

    def __init__(self, kind: str, name: str):
        self.kind = kind
        self.name = name

    def __repr__(self) -> str:
        return f"{self.kind}({self.name})" if self.kind == "device" else f"torch.{self.name}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Marker) and (self.kind, self.name) == (other.kind, other.name)

    def __hash__(self) -> int:
        return hash((self.kind, self.name))


class DType(Marker):
    """A ``torch.<dtype>`` global."""

    __slots__ = ()

    def __init__(self, name: str):
        super().__init__("dtype", name)


class StorageType(Marker):
    """A ``torch.<X>Storage`` class global, as used in storage persistent ids."""

    __slots__ = ()

    def __init__(self, name: str):
        super().__init__("storage", name)

    @property
    def dtype(self) -> str:
        return STORAGE_DTYPES.get(self.name, "uint8")


class Device(Marker):
    """A ``torch.device(...)`` value."""

    __slots__ = ("args",)

    def __init__(self, type_: str, index: int | None = None):
        super().__init__("device", type_ if index is None else f"{type_}:{index}")
        self.args = (type_,) if index is None else (type_, index)


class _OpaqueMeta(type):
    """Opaque classes are shared by every file the process reads: nothing may change them."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise TypeError(f"the stand-in class for {cls.dotted} cannot be changed")

    def __delattr__(cls, name: str) -> None:
        raise TypeError(f"the stand-in class for {cls.dotted} cannot be changed")


# Values whose hash is cheap and that equal no value of another kind but these (1 == 1.0 ==
# True, and their hashes agree); bytes are left out, since bytes == bytearray.
_HASHABLE_SCALARS = (int, float, complex, str, type(None))


class Opaque(metaclass=_OpaqueMeta):
    """An instance of a global ckpttool does not import: a record of how it was built.

    Subclasses are made per dotted name by :func:`opaque_class`; the unpickler hands the class
    to REDUCE / NEWOBJ / BUILD / APPENDS / SETITEMS, which only record their arguments.
    """

    dotted: str = "?"
    __slots__ = ("how", "args", "kwargs", "state", "items", "dictitems")

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        _copies.charge(len(args) + len(kwargs))
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
        # Opaque values are dict keys in real checkpoints (enum members, Namespace-like keys):
        # the hash must tell typical keys apart (one hash per class made inserting n keys cost
        # n**2 comparisons) without recursing, and agree with __eq__. Parts that are not
        # scalars only count by position, since equal values of other kinds may differ in
        # type (a dict equals an OrderedDict).
        state = self.state
        return hash((self.dotted, self.how,
                     tuple(a if isinstance(a, _HASHABLE_SCALARS) else None for a in self.args),
                     frozenset(self.kwargs),
                     frozenset(k for k in state if isinstance(k, _HASHABLE_SCALARS))
                     if isinstance(state, dict) else
                     state if isinstance(state, _HASHABLE_SCALARS) else None))

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
        # global_module / global_name keep the split the pickle used, so a writer can name the
        # global again exactly (a protocol-4 name may itself contain dots).
        cls = _OpaqueMeta(name.rsplit(".", 1)[-1] or "opaque", (Opaque,),
                          {"dotted": dotted, "global_module": module, "global_name": name,
                           "__slots__": (), "__module__": "ckpttool.opaque"})
        _OPAQUE_CLASSES[dotted] = cls
    return cls


def dotted_name(value: Any) -> str | None:
    """The global a value stands for: an Opaque instance or class, an allowlisted global left
    uncalled, or None."""
    if isinstance(value, Opaque):
        return value.dotted
    if isinstance(value, type) and issubclass(value, Opaque):
        return value.dotted
    if isinstance(value, _Global):
        return f"{value.module}.{value.name}"
    return None


# numpy scalars as numpy pickles them (an lr from np.logspace, say): multiarray.scalar(dtype, raw
# bytes), the dtype being numpy.dtype(code, False, True) with BUILD state (3, byteorder, None,
# None, None, -1, -1, 0). Only these plain number dtypes are decoded; anything else stays opaque.
_NUMPY_SCALAR = frozenset({"numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"})
_NUMPY_DTYPE = frozenset({"numpy.dtype"})
_NUMPY_FORMATS = {"f8": "d", "f4": "f", "f2": "e", "i8": "q", "i4": "i", "i2": "h", "i1": "b",
                  "u8": "Q", "u4": "I", "u2": "H", "u1": "B", "b1": "?"}
_NUMPY_BYTEORDERS = {"<": "<", ">": ">", "|": "<"}  # "|": one byte, no order


def _is_plain_call(value: Any, names: frozenset[str], nargs: int) -> bool:
    """An opaque value that is only a call of one of ``names`` with ``nargs`` arguments."""
    return (isinstance(value, Opaque) and value.dotted in names and value.how == "call"
            and len(value.args) == nargs and not value.kwargs and not value.items
            and not value.dictitems)


def scalar_value(value: Any) -> Any:
    """The Python number a pickled numpy scalar stands for; any other value as it is.

    The value itself stays opaque in the tree, so a rewrite writes it back as it was read; this
    decodes its bytes with struct, without importing numpy.

    Example:
        >>> ckpt = read_checkpoint("sweep.pt")                                  # doctest: +SKIP
        >>> scalar_value(ckpt.root["optimizer"]["param_groups"][0]["lr"])     # doctest: +SKIP
        0.01
    """
    if not _is_plain_call(value, _NUMPY_SCALAR, 2) or value.state is not None:
        return value
    dtype, raw = value.args
    if not _is_plain_call(dtype, _NUMPY_DTYPE, 3) or dtype.args[1:] != (False, True):
        return value
    code, state = dtype.args[0], dtype.state
    if not (isinstance(code, str) and code in _NUMPY_FORMATS and isinstance(state, tuple)
            and len(state) == 8 and state[0] == 3 and state[1] in _NUMPY_BYTEORDERS
            and state[2:] == (None, None, None, -1, -1, 0)):
        return value
    fmt = _NUMPY_BYTEORDERS[state[1]] + _NUMPY_FORMATS[code]
    if not isinstance(raw, bytes) or len(raw) != struct.calcsize(fmt):
        return value
    return struct.unpack(fmt, raw)[0]


# --- the safe unpickler --------------------------------------------------------------------

# torch writes sizes, strides and offsets as int64.
_INT64_LIMIT = 1 << 63


def _layout(storage_offset: Any, size: Any, stride: Any) -> tuple[int, tuple, tuple]:
    """(offset, shape, stride) of a tensor as a rebuilder receives them, checked: torch pickles
    a tuple of non-negative ints for each, and an int offset."""
    dims = []
    for what, value in (("size", size), ("stride", stride)):
        # (set/min/max rather than a generator: a model has tens of thousands of tensors)
        if not (type(value) in (tuple, list) and (not value or (
                set(map(type, value)) == {int} and min(value) >= 0
                and max(value) < _INT64_LIMIT))):
            raise pickle.UnpicklingError(f"a tensor {what} that is not a tuple of non-negative "
                                         f"ints (a {type(value).__name__})")
        dims.append(tuple(value))
    if len(dims[0]) != len(dims[1]):
        raise pickle.UnpicklingError(f"a tensor with {len(dims[0])} sizes but {len(dims[1])} "
                                     "strides")
    if not (type(storage_offset) is int and 0 <= storage_offset < _INT64_LIMIT):
        raise pickle.UnpicklingError(f"a tensor storage offset that is not a non-negative int "
                                     f"(a {type(storage_offset).__name__})")
    return storage_offset, dims[0], dims[1]


def _storage(storage: Any) -> StorageRef:
    if not isinstance(storage, StorageRef):
        raise pickle.UnpicklingError(f"a tensor whose storage is a {type(storage).__name__}, not "
                                     "a storage record")
    return storage


def _fits(storage: StorageRef, offset: int, shape: tuple, strides: tuple) -> None:
    """A tensor must lie inside its storage (torch.load checks it too): a rewrite copies the
    record as it is, and a reader of the tensor's bytes would read past it."""
    n = extent(shape, strides)
    if n and offset + n > storage.numel:
        raise pickle.UnpicklingError(f"a tensor larger than its storage (it reaches element "
                                     f"{offset + n - 1:,} of {storage.numel:,})")


def _dtype_name(dtype: Any) -> str:
    if not isinstance(dtype, DType):
        raise pickle.UnpicklingError(f"a tensor whose dtype is a {type(dtype).__name__}, not a "
                                     "torch dtype")
    return dtype.name


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    offset, shape, strides = _layout(storage_offset, size, stride)
    _fits(_storage(storage), offset, shape, strides)
    return TensorRef(storage.dtype, shape, strides, offset, storage, bool(requires_grad),
                     rebuild=("torch._utils._rebuild_tensor_v2",
                              (storage, storage_offset, size, stride, requires_grad,
                               backward_hooks) + (() if metadata is None else (metadata,))))


def _rebuild_tensor(storage, storage_offset, size, stride):
    offset, shape, strides = _layout(storage_offset, size, stride)
    _fits(_storage(storage), offset, shape, strides)
    return TensorRef(storage.dtype, shape, strides, offset, storage,
                     rebuild=("torch._utils._rebuild_tensor",
                              (storage, storage_offset, size, stride)))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    offset, shape, strides = _layout(storage_offset, size, stride)
    name, storage = _dtype_name(dtype), _storage(storage)
    typed = StorageRef(storage.key, name, storage.location,
                       storage.numel // max(DTYPE_ITEMSIZE.get(name, 1), 1)
                       if storage.storage_type == "UntypedStorage" else storage.numel,
                       storage.storage_type)
    _fits(typed, offset, shape, strides)
    return TensorRef(name, shape, strides, offset, typed, bool(requires_grad),
                     rebuild=("torch._utils._rebuild_tensor_v3",
                              (typed, storage_offset, size, stride, requires_grad,
                               backward_hooks, dtype) + (() if metadata is None else (metadata,))))


def _parameter(dotted: str, args: tuple) -> Any:
    data, requires_grad = args[0], args[1]
    if isinstance(data, Opaque):  # a tensor kind ckpttool does not model (quantized, ...)
        return NotImplemented
    if not isinstance(data, TensorRef):
        raise pickle.UnpicklingError(f"a Parameter of a {type(data).__name__}, not a tensor")
    return TensorRef(data.dtype, data.shape, data.stride, data.storage_offset, data.storage,
                     bool(requires_grad), True, data.subclass, rebuild=(dotted, args))


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return _parameter("torch._utils._rebuild_parameter", (data, requires_grad, backward_hooks))


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return _parameter("torch._utils._rebuild_parameter_with_state",
                      (data, requires_grad, backward_hooks, state))


def _rebuild_from_type_v2(func, new_type, args, state):
    inner = func(*args) if callable(func) else None
    if isinstance(inner, TensorRef):
        return TensorRef(inner.dtype, inner.shape, inner.stride, inner.storage_offset,
                         inner.storage, inner.requires_grad, inner.parameter,
                         dotted_name(new_type) or "torch.Tensor",
                         rebuild=("torch._tensor._rebuild_from_type_v2",
                                  (func, new_type, args, state)))
    return NotImplemented


def _rebuild_meta(dtype, size, stride, requires_grad):
    _, shape, strides = _layout(0, size, stride)
    return TensorRef(_dtype_name(dtype), shape, strides, 0, None, bool(requires_grad),
                     rebuild=("torch._utils._rebuild_meta_tensor_no_storage",
                              (dtype, size, stride, requires_grad)))


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles spell bytes as _codecs.encode(str, "latin1"), and nothing else is
    # needed: another codec would import its module, and some (punycode) take quadratic time.
    if isinstance(text, str) and encoding in ("latin1", "latin-1") and errors == "strict":
        return text.encode("latin-1")
    return NotImplemented


def _bytearray(*args):
    # As pickled: (bytes,), or (str, "latin-1") at protocol 2. Never a size: bytearray(10**9)
    # is a gigabyte from a few bytes of pickle.
    if not args or (len(args) == 1 and isinstance(args[0], bytes)):
        return bytearray(*args)
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        return bytearray(args[0], "latin-1")
    return NotImplemented


def _reconstructor(cls, base, state=None):
    # copyreg._reconstructor is how protocol 0/1 pickles build instances; for an opaque class
    # this is just "a new instance", which records nothing dangerous.
    if isinstance(cls, type) and issubclass(cls, Opaque):
        obj = cls.__new__(cls)
        obj.how = "reconstructor"
        obj.args = (base, state) if state is not None else ()
        return obj
    return NotImplemented


def _make_device(type_, index=None):
    if isinstance(type_, str) and (index is None or type(index) is int):
        if index is None and ":" in type_:
            t, _, i = type_.partition(":")
            return Device(t, int(i)) if i.isdigit() else Device(type_)
        return Device(type_, index)
    return NotImplemented


_BUILTINS = {"set": set, "frozenset": frozenset, "bytearray": _bytearray, "complex": complex,
             "slice": slice}
# What the allowlisted globals become: each call goes to one of these (see _Global), which
# returns NotImplemented for arguments it does not model; the call is then recorded opaque.
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    # protocol 2 (torch.save's) spells the builtins module __builtin__
    **{(module, name): target for module in ("builtins", "__builtin__")
       for name, target in _BUILTINS.items()},
    ("collections", "OrderedDict"): OrderedDict,
    ("collections", "Counter"): Counter,
    ("_codecs", "encode"): _codecs_encode,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): _rebuild_meta,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "device"): _make_device,
    ("torch", "Size"): tuple,
}

_DTYPE_NAMES = frozenset(DTYPE_ITEMSIZE) | {"float", "double", "half", "long", "int", "short",
                                            "cfloat", "cdouble", "chalf"}

# A tree may hold at most this many values counted with every shared reference expanded (or
# one per byte of its pickle, if that is more): recursive readers of the tree (repr, render,
# JSON) do that much work, and a few hundred bytes of pickle can share their way to 2**60.
EXPANDED_VALUES_LIMIT = 2_000_000
# Elements the calls of one pickle may copy (see _CopyBudget), beyond one per byte left in it.
_COPY_ALLOWANCE = 1_000_000
_SIZED = (str, bytes, bytearray, list, tuple, dict, set, frozenset)


class _Refused(pickle.UnpicklingError):
    """A pickle only a damaged or hostile file holds; the message says why, in one line."""


class _CopyBudget(threading.local):
    """How many more elements the pickle being read in this thread may have calls copy.

    Calls copy their arguments (``*args``; set(x), Counter(x), bytearray(x) copy x), and BUILD
    copies its state into an OrderedDict's attributes, so a few bytes of pickle that call or
    BUILD again and again with one large memoized argument would allocate without bound during
    unpickling, before any check of the tree could run.
    """

    left: int | None = None  # None: no pickle is being read
    built: list | None = None  # the dicts made in this pickle that take BUILD (see _Build)

    def charge(self, n: int) -> None:
        if self.left is not None:
            self.left -= n
            if self.left < 0:
                raise _Refused("the pickle copies shared objects again and again: a 'billion "
                               "laughs' file, damaged or hostile; ckpttool does not read it")


_copies = _CopyBudget()


class _Build:
    """BUILD on an OrderedDict or a Counter the pickle made (torch gives a state dict its
    ``_metadata`` so): set as the instance's own ``__setstate__`` while the pickle is read,
    which BUILD calls instead of copying the state into the instance's attributes itself, so
    that the copy is charged to the budget. Removed when the pickle is read."""

    __slots__ = ("target",)

    def __init__(self, target: dict):
        self.target = target

    def __call__(self, state: Any) -> None:
        slots = None
        if isinstance(state, tuple) and len(state) == 2:  # (state, slot state), as BUILD allows
            state, slots = state
        parts = [p for p in (state, slots) if p is not None]
        if not all(isinstance(p, dict) for p in parts):
            raise pickle.UnpicklingError("BUILD state of an OrderedDict that is not a dict")
        _copies.charge(sum(len(p) for p in parts))
        for part in parts:
            if "__setstate__" in part or "__dict__" in part:
                raise _Refused(f"the pickle gives an {type(self.target).__name__} an attribute "
                               "that hides its class's own: the file is damaged or hostile")
            vars(self.target).update(part)


class _Global:
    """An allowlisted global as the pickle named it: a fresh, sealed forwarder to its stand-in.

    BUILD applies to whatever ``find_class`` returns, so handing out a shared object (the
    Counter class, a rebuilder function) would let a pickle set attributes on it for the whole
    process. This object refuses state. The writer uses it too, uncallable, to name a global.
    """

    __slots__ = ("_target", "module", "name")

    def __init__(self, module: str, name: str, target: Any = None):
        self.module = module
        self.name = name
        self._target = target

    @classmethod
    def dotted(cls, dotted: str) -> _Global:
        module, _, name = dotted.rpartition(".")
        return cls(module, name)

    @classmethod
    def storage(cls, name: str) -> _Global:
        """A storage class by the name the reader keeps: torch.FloatStorage, ...; the untyped
        and TypedStorage classes live in torch.storage, a dotted name is already whole."""
        if "." in name:
            return cls.dotted(name)
        return cls("torch.storage" if name in ("UntypedStorage", "TypedStorage") else "torch",
                   name)

    def __call__(self, *args: Any) -> Any:
        if self._target is None:
            raise TypeError(f"{self.module}.{self.name} is only a name in a pickle")
        copied = len(args)
        for arg in args:
            if isinstance(arg, _SIZED):
                copied += len(arg)
        _copies.charge(copied)
        value = self._target(*args)
        if value is NotImplemented:  # arguments the stand-in does not model: record the call
            value = opaque_class(self.module, self.name)(*args)
        elif type(value) in (OrderedDict, Counter) and _copies.built is not None:
            vars(value)["__setstate__"] = _Build(value)
            _copies.built.append(value)
        return value

    def __setstate__(self, state: Any) -> None:
        raise _Refused(f"the pickle sets attributes on the global {self.module}.{self.name}: "
                       "the file is damaged or hostile")

    def __repr__(self) -> str:
        return f"{self.module}.{self.name}"

    def __copy__(self) -> _Global:
        return self

    def __deepcopy__(self, memo: Any) -> _Global:
        return self


_CONTAINERS = (dict, list, tuple, set, frozenset, Opaque, TensorRef)


def _check_tree(root: Any, limit: int) -> None:
    """Refuse what only a hostile pickle builds: more than ``limit`` values once shared
    references are expanded, or an OrderedDict / Counter whose instance attributes (set by
    BUILD, as torch does for a state dict's ``_metadata``) hide a method of its class.

    Each container is looked at once, its expanded size memoised by id (one, while it is still
    being counted: a cycle adds a single value); the work stops at ``limit`` values.
    """
    sizes: dict[int, int] = {}
    seen = 0  # values met, each container's parts once: never more than the expanded count
    stack: list[tuple[Any, Any, int]] = [(root, None, 0)]
    while stack:
        value, kids, leaves = stack.pop()
        if kids is None:
            if id(value) in sizes or not isinstance(value, _CONTAINERS):
                continue
            if isinstance(value, dict):
                parts = [*value, *value.values()]
                if type(value) is not dict:  # an OrderedDict or a Counter
                    _check_attributes(value)
            elif isinstance(value, Opaque):
                parts = [value.state, *value.args, *value.kwargs.values(), *value.items,
                         *value.dictitems, *value.dictitems.values()]
            elif isinstance(value, TensorRef):  # its rebuilder's arguments: hooks, metadata
                parts = value.rebuild[1]
            else:
                parts = value
            seen += len(parts)
            kids = [p for p in parts if isinstance(p, _CONTAINERS)]
            sizes[id(value)] = 1
            stack.append((value, kids, len(parts) - len(kids)))
            stack.extend((k, None, 0) for k in kids)
            size = seen
        else:
            size = sizes[id(value)] = 1 + leaves + sum(sizes[id(k)] for k in kids)
        if size > limit:
            raise _Refused(f"the pickle repeats shared objects into more than {limit:,} "
                           "values: a 'billion laughs' file, damaged or hostile; ckpttool "
                           "does not read it")


def _check_attributes(value: dict) -> None:
    cls = type(value)
    for key in vars(value):
        if not isinstance(key, str) or hasattr(cls, key):
            name = repr(key[:40]) if isinstance(key, str) else f"(a {type(key).__name__})"
            raise _Refused(f"the pickle gives an {cls.__name__} an attribute {name} that hides "
                           "its class's own: the file is damaged or hostile")


# Nesting a pickle may build, counted as it builds it: deeper than any tree walk() accepts
# (MAX_DEPTH: a value nested deeper is refused there anyway), and far below what recursion in C
# survives: hashing a tuple key nested a million deep overflows the C stack, a crash.
MAX_PICKLE_DEPTH = 1000
# Bytes of a pickle read ahead at a time by the pre-scan, from a file (a legacy checkpoint).
_SCAN_CHUNK = 1 << 20

# What each opcode does to the stack, for the pre-scan (pickletools' stack effects, by kind).
(_LEAF, _EMPTY, _MARK, _STOP, _COLLECT, _EXTEND, _POP_MARK, _MAKE1, _MAKE2, _MAKE3, _ADD1,
 _ADD2, _PUT, _MEMOIZE, _GET, _POP, _DUP, _NAME, _KEEP, _NONE, _FRAME, _EXT) = range(22)


def _scan_table() -> dict[int, tuple[int, int, int]]:
    """opcode byte -> (argument length code, lines, stack effect) for :func:`_prescan`.

    Length codes as pickletools': >= 0 fixed, -1 up to a newline (``lines`` of them: two for
    GLOBAL and INST), -2 / -3 / -4 / -5 counted by a 1-byte, signed 4-byte, unsigned 4-byte,
    8-byte length.
    """
    import pickletools

    effects = {
        "EMPTY_TUPLE": _EMPTY, "EMPTY_LIST": _EMPTY, "EMPTY_DICT": _EMPTY, "EMPTY_SET": _EMPTY,
        "MARK": _MARK, "STOP": _STOP, "POP": _POP, "POP_MARK": _POP_MARK, "DUP": _DUP,
        "TUPLE": _COLLECT, "LIST": _COLLECT, "DICT": _COLLECT, "FROZENSET": _COLLECT,
        "INST": _COLLECT, "OBJ": _COLLECT,
        "APPENDS": _EXTEND, "SETITEMS": _EXTEND, "ADDITEMS": _EXTEND,
        "TUPLE1": _MAKE1, "TUPLE2": _MAKE2, "TUPLE3": _MAKE3, "REDUCE": _MAKE2,
        "NEWOBJ": _MAKE2, "NEWOBJ_EX": _MAKE3, "STACK_GLOBAL": _NAME,
        "APPEND": _ADD1, "BUILD": _ADD1, "SETITEM": _ADD2,
        "PUT": _PUT, "BINPUT": _PUT, "LONG_BINPUT": _PUT, "MEMOIZE": _MEMOIZE,
        "GET": _GET, "BINGET": _GET, "LONG_BINGET": _GET,
        "BINPERSID": _KEEP, "READONLY_BUFFER": _KEEP, "PROTO": _NONE, "FRAME": _FRAME,
        "EXT1": _EXT, "EXT2": _EXT, "EXT4": _EXT,
    }
    table = {}
    for op in pickletools.opcodes:
        n = op.arg.n if op.arg is not None else 0
        lines = 2 if op.arg is not None and op.arg.name == "stringnl_noescape_pair" else 1
        table[op.code.encode("latin-1")[0]] = (n, lines, effects.get(op.name, _LEAF))
    return table


_SCAN = _scan_table()
# Per opcode byte: the bytes to skip for an opcode that only pushes a plain value and has a
# fixed-size argument (the pre-scan's fast path), else 0.
_SCAN_SKIP = [1 + _SCAN[c][0] if c in _SCAN and _SCAN[c][2] == _LEAF and _SCAN[c][0] >= 0
              else 0 for c in range(256)]
_COUNT_WIDTH = {-2: 1, -3: 4, -4: 4, -5: 8}


def _prescan(f: BinaryIO, start: int, end: int) -> None:
    """Read the pickle at ``f[start:end]`` opcode by opcode, up to its STOP, and refuse what the
    C unpickler would turn into unbounded memory or a crash before any check of the tree
    can run: a memo index far past the pickle's own size (the memo array grows to twice the
    largest index, zeroed: 12 bytes of pickle, gigabytes of memory), a value declared longer
    than the bytes left, nesting deeper than MAX_PICKLE_DEPTH (each stack value's depth is
    simulated), and, with extension codes registered in this process, EXT opcodes (they would
    fetch a global without find_class). Anything else is left to the unpickler, which raises.

    Raises:
        _Refused: the pickle is damaged or hostile (one line).
        pickle.UnpicklingError: it is truncated.
    """
    total = end - start
    if isinstance(f, io.BytesIO):  # the whole pickle is in memory (getvalue does not copy)
        buf: Any = f.getvalue()
        pos, origin, more = start, start, None
    else:  # a legacy file: read ahead in chunks, up to the STOP
        buf, pos, origin = bytearray(), 0, 0

        def more(upto: int) -> None:
            while len(buf) < min(upto, total):
                f.seek(start + len(buf))
                chunk = f.read(min(max(_SCAN_CHUNK, upto - len(buf)), total - len(buf)))
                if not chunk:
                    return
                buf.extend(chunk)

        more(_SCAN_CHUNK)
    table, skips, limit, find = _SCAN, _SCAN_SKIP, MAX_PICKLE_DEPTH, buf.find
    extensions = bool(copyreg._inverted_registry  # type: ignore[attr-defined]
                      or copyreg._extension_cache)  # type: ignore[attr-defined]
    stack: list[int] = []  # the depth of each value on the unpickler's stack
    push, pop = stack.append, stack.pop
    marks: list[int] = []
    memo: dict[int, int] = {}
    have = len(buf)
    while True:
        if pos + 9 > have:
            if more is not None:
                more(pos + 9)
                have = len(buf)
            if pos >= have:
                return  # truncated: the unpickler says so
        code = buf[pos]
        skip = skips[code]
        if skip:
            pos += skip
            push(0)
            continue
        entry = table.get(code)
        if entry is None:
            return  # not an opcode: the unpickler says so
        n, lines, effect = entry
        at = pos + 1
        if n >= 0:
            pos = at + n
            arg = int.from_bytes(buf[at:pos], "little") if n else 0
        elif n == -1:  # up to a newline, or two
            pos = at
            for _ in range(lines):
                nl = find(b"\n", pos)
                while nl < 0 and more is not None and have < total:
                    more(have + _SCAN_CHUNK)
                    have = len(buf)
                    nl = find(b"\n", pos)
                if nl < 0:
                    return
                line, pos = buf[at:nl], nl + 1
            arg = 0
            if effect == _PUT or effect == _GET:
                try:
                    arg = int(line)
                except ValueError:
                    return
        else:  # counted: the count must fit in what is left
            width = _COUNT_WIDTH[n]
            if more is not None:
                more(at + width + 9)
                have = len(buf)
            size = int.from_bytes(buf[at:at + width], "little", signed=n == -3)
            left = total - (at + width - origin)
            if size > left:  # (the unpickler would allocate it first)
                raise pickle.UnpicklingError(f"pickle data was truncated: a {size:,}-byte "
                                             f"value where {max(left, 0):,} bytes are left")
            pos = at + width + max(size, 0)
            arg = 0
        if effect == _LEAF:
            push(0)
            continue
        if effect == _PUT:
            if arg > pos - origin:
                raise _Refused(f"the pickle stores a value at memo index {arg:,}, which a "
                               f"{total:,}-byte pickle never reaches: the file is damaged or "
                               "hostile")
            memo[arg] = stack[-1] if stack else 0
            continue
        if effect == _GET:
            push(memo.get(arg, 0))
            continue
        if effect == _MEMOIZE:
            memo[len(memo)] = stack[-1] if stack else 0
            continue
        if effect == _MARK:
            marks.append(len(stack))
            continue
        if effect == _EMPTY:
            push(1)
            continue
        if effect == _STOP:
            return
        if effect == _COLLECT or effect == _EXTEND or effect == _POP_MARK:
            base = marks.pop() if marks else 0
            items = stack[base:]
            del stack[base:]
            depth = 1 + max(items) if items else 1
            if effect == _COLLECT:
                push(depth)
            elif effect == _EXTEND and stack and depth > stack[-1]:
                stack[-1] = depth
        elif _MAKE1 <= effect <= _MAKE3 or effect == _ADD1 or effect == _ADD2:
            k = effect - _MAKE1 + 1 if effect <= _MAKE3 else 1 if effect == _ADD1 else 2
            depth = 1 + max(stack[-k:], default=0)
            del stack[-k:]
            if effect <= _MAKE3:
                push(depth)
            elif stack and depth > stack[-1]:
                stack[-1] = depth
        elif effect == _POP:
            if marks and marks[-1] == len(stack):
                marks.pop()
            elif stack:
                pop()
        elif effect == _DUP:
            push(stack[-1] if stack else 0)
        elif effect == _NAME:
            del stack[-2:]
            push(0)
        elif effect == _FRAME:
            if arg > total - (pos - origin):
                raise pickle.UnpicklingError(f"pickle data was truncated: a {arg:,}-byte "
                                             f"frame where {total - (pos - origin):,} bytes "
                                             "are left")
        elif effect == _EXT:
            if extensions:
                raise _Refused("the pickle uses extension codes (EXT1/2/4), which torch.save "
                               "never writes: the file is damaged or hostile")
            push(0)
        if stack and stack[-1] > limit:
            raise _Refused(f"the pickle nests values more than {limit} levels deep: the file "
                           "is damaged or hostile")


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that imports nothing: see the module docstring.

    ``persistent_load`` turns storage ids into :class:`StorageRef`; ``globals_seen`` records
    every global the pickle names, in order, so reports can list them. ``load`` checks the
    tree it returns (:func:`_check_tree`).
    """

    def __init__(self, file: BinaryIO, *, legacy: bool = False):
        super().__init__(file, encoding="utf-8")
        self.legacy = legacy
        self.globals_seen: list[str] = []
        # storage keys in the order the pickle first names them (torch.load lays records so)
        self.storage_seen: dict[str, None] = {}
        self._file = file

    def load(self) -> Any:
        f = self._file
        start = f.tell()
        end = f.seek(0, io.SEEK_END)
        _prescan(f, start, end)
        f.seek(start)
        _copies.left = _COPY_ALLOWANCE + end - start
        _copies.built = []
        try:
            value = super().load()
        finally:
            for built in _copies.built:
                vars(built).pop("__setstate__", None)
            _copies.left = _copies.built = None
        _check_tree(value, max(EXPANDED_VALUES_LIMIT, f.tell() - start))
        return value

    def find_class(self, module: str, name: str) -> Any:
        dotted = f"{module}.{name}"
        self.globals_seen.append(dotted)
        target = _SAFE_GLOBALS.get((module, name))
        if target is not None:
            return _Global(module, name, target)
        if module in ("torch", "torch.storage"):
            if name.endswith("Storage") and (name in STORAGE_DTYPES or name == "TypedStorage"):
                return StorageType(name)
            if name in _DTYPE_NAMES:
                return DType(name)
        return opaque_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError(f"unexpected persistent id (a {type(pid).__name__})")
        tag = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if tag == "storage" and len(pid) >= 5:
            storage_type, key, location, numel = pid[1], pid[2], pid[3], pid[4]
            if isinstance(location, bytes):
                location = location.decode("ascii", "replace")
            if not (isinstance(key, (str, int)) and isinstance(location, str)):
                raise pickle.UnpicklingError("a storage id whose key or location is not a string")
            type_name = storage_type.name if isinstance(storage_type, StorageType) else str(
                dotted_name(storage_type) or type(storage_type).__name__)
            dtype = storage_type.dtype if isinstance(storage_type, StorageType) else "uint8"
            if type(numel) is not int or numel < 0:
                raise pickle.UnpicklingError(f"a storage size that is not a non-negative int "
                                             f"(a {type(numel).__name__})")
            ref = StorageRef(str(key), dtype, location, numel, type_name)
            if ref.key not in self.storage_seen:
                self.storage_seen[ref.key] = None
            return ref
        if tag == "module":  # legacy files may pickle whole nn.Module source; never run it
            return opaque_class("torch.serialization", "module_source")(*pid[1:2])
        raise pickle.UnpicklingError("unknown persistent id type "
                                     + (repr(tag[:40]) if isinstance(tag, str) else "(not a str)"))


# --trust: the checkpoints read in this context whose pickles call code-running globals, with
# those calls; None outside it (such a checkpoint is then refused).
_trusted: ContextVar[list[tuple[str, list[str]]] | None] = ContextVar("ckpttool_trusted",
                                                                      default=None)


@contextmanager
def trusting() -> Iterator[list[tuple[str, list[str]]]]:
    """Within this block, a checkpoint whose pickle calls code-running globals (os.system,
    eval, ...) is read and inspected instead of refused (``--trust``); each such checkpoint is
    appended, as (path, calls), to the list it yields, so that the caller can say so. Nothing
    from the file runs, even then: ckpttool never unpickles for real.

    Example:
        >>> with trusting() as trusted:                              # doctest: +SKIP
        ...     ckpt = ckpttool.load("mine.pt")
        >>> trusted                                                  # doctest: +SKIP
        [('mine.pt', ["operator.attrgetter('lr')"])]
    """
    token = _trusted.set([])
    try:
        yield _trusted.get()  # type: ignore[misc]
    finally:
        _trusted.reset(token)


def trusted_calls() -> list[tuple[str, list[str]]] | None:
    """Where a trusted checkpoint's calls are recorded (see :func:`trusting`); None when
    checkpoints calling code are refused."""
    return _trusted.get()


def safe_loads(data: bytes, *, legacy: bool = False) -> tuple[Any, list[str]]:
    """Unpickle ``data`` without importing or running anything; returns (value, globals seen).

    Raises:
        pickle.UnpicklingError: (or another exception of the unpickler) damaged or hostile data.
    """
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
    # zip: storage keys in the order the pickle first names them
    storage_order: tuple[str, ...] = ()

    def locate(self, storage: StorageRef, start: int = 0,
               length: int | None = None) -> tuple[str, int, int]:
        """(file path, absolute offset, length) of a storage record's bytes, or of the slice
        ``[start, start + length)`` of them; checked against the record's size.

        A checkpoint made of several files (a directory) answers with the file that holds the
        storage; readers go through this, never through ``storage_spans`` directly.
        """
        span = self.storage_spans.get(storage.key)
        if span is None:
            raise InputError(f"{self.path}: tensor storage {storage.key!r} is missing from the file")
        offset, size = span
        length = size - start if length is None else length
        if start < 0 or length < 0 or start + length > size:
            raise InputError(f"{self.path}: tensor storage {storage.key!r} is shorter than its "
                             "tensor says; the file is damaged")
        return self.path, offset + start, length

    def read_storage(self, storage: StorageRef, start: int = 0, length: int | None = None) -> bytes:
        """Bytes of one storage record (or a slice of it), read on demand."""
        path, offset, length = self.locate(storage, start, length)
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise InputError(f"{path}: the file ends inside tensor data; it is truncated")
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


def name_calls(calls: list[str], most: int = 3) -> str:
    """``a``, ``a and b``, ``a, b and c``, ``a, b, c and 2 more``."""
    shown = calls[:most] + ([f"{len(calls) - most} more"] if len(calls) > most else [])
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} and {shown[-1]}"


def _unpickled(path: str, unpickler: SafeUnpickler, what: str = "checkpoint's pickle") -> Any:
    """``unpickler.load()``, with its failures as one-line InputErrors. A pickle that fails
    after naming code-running globals is reported as what it is: hostile (it may fail only
    because it calls what such a call returned, which ckpttool never makes)."""
    try:
        return unpickler.load()
    except Exception as e:  # the unpickler raises many types on damaged data
        error = e
    dangerous = list(dict.fromkeys(g for g in unpickler.globals_seen if is_dangerous_global(g)))
    if dangerous:
        raise UnsafeCheckpointError(
            f"{path}: the pickle names {name_calls(dangerous)}, code that would run on "
            "torch.load(weights_only=False); nothing was executed. Do not load this file "
            "(--trust inspects it anyway, still running nothing)")
    if isinstance(error, _Refused):
        raise InputError(f"{path}: {error}")
    if isinstance(error, RecursionError):
        raise InputError(f"{path}: the {what} nests too deeply to read safely")
    if isinstance(error, MemoryError):
        raise InputError(f"{path}: the {what} asks for more memory than it could hold; the "
                         "file is damaged or hostile")
    detail = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
    raise InputError(f"{path}: the {what} is corrupted ({detail})")


def _read_zip(path: str, size: int) -> TorchFile:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error,
            NotImplementedError) as e:
        raise InputError(f"{path}: damaged zip archive: the file is truncated or corrupted "
                         f"({e}); re-copy or re-save it") from None
    with zf:
        infos = zf.infolist()
        names: set[str] = set()
        for info in infos:
            # miniz (torch.load) finds records by name ignoring case, and of two alike it may
            # take another than zipfile does: a benign pickle shown, a hostile one loaded.
            name = info.filename.lower()
            if name in names:
                raise InputError(f"{path}: the zip holds two records named "
                                 f"{info.filename[:80]!r}, which torch.save never writes; "
                                 "torch.load may read another one than ckpttool shows: the "
                                 "file is damaged or hostile")
            names.add(name)
        pkl = [i for i in infos if i.filename.endswith("data.pkl")
               and i.filename.count("/") == 1]
        if not pkl:
            if any(i.filename.endswith(".metadata") or i.filename.endswith(".distcp")
                   for i in infos):
                raise InputError(f"{path}: a zip of a distributed checkpoint; unpack it and "
                                 "pass the directory")
            raise InputError(f"{path}: a zip archive without data.pkl: not a torch checkpoint")
        if len(pkl) > 1:
            raise InputError(f"{path}: the zip holds {len(pkl)} pickles ("
                             f"{', '.join(i.filename[:60] for i in pkl[:3])}), which torch.save "
                             "never writes: the file is damaged or hostile")
        prefix = pkl[0].filename[: -len("data.pkl")]
        data_prefix = prefix + "data/"
        for info in infos:
            _refuse_packed(path, info)
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
        unpickler = SafeUnpickler(io.BytesIO(data))
        root = _unpickled(path, unpickler)
        spans: dict[str, tuple[int, int]] = {}
        with open(path, "rb") as f:
            for info in infos:
                if info.filename.startswith(data_prefix):
                    key = info.filename[len(data_prefix):]
                    spans[key] = (_zip_data_offset(f, info), info.file_size)
    return TorchFile(path, "torch-zip", root, unpickler.globals_seen, size, byteorder, prefix,
                     spans, tuple(unpickler.storage_seen))


def _refuse_packed(path: str, info: zipfile.ZipInfo) -> None:
    """Every record must be stored as torch.save stores it, its bytes as they are: tensor data is
    read in place, and a small compressed record may inflate to gigabytes (a zip bomb)."""
    if info.flag_bits & 0x41:  # bit 0: encrypted, bit 6: strong encryption
        raise InputError(f"{path}: the zip record {info.filename[:80]!r} is encrypted; torch.save "
                         "never encrypts; decrypt the archive, or re-save it with torch.save")
    if info.flag_bits & 0x20:  # bit 5: patch data, which neither zipfile nor torch's miniz reads
        raise InputError(f"{path}: the zip record {info.filename[:80]!r} is flagged as patch "
                         "data, which torch.save never writes; the file is damaged")
    if info.compress_type != zipfile.ZIP_STORED:
        method = zipfile.compressor_names.get(info.compress_type, f"method {info.compress_type}")
        raise InputError(f"{path}: the zip record {info.filename[:80]!r} is compressed "
                         f"({method}); torch.save never compresses, and tensor data is read in "
                         "place: re-save the checkpoint with torch.save, or unzip it and re-zip "
                         "it stored (`zip -0 -r`)")


def _zip_data_offset(f: BinaryIO, info: zipfile.ZipInfo) -> int:
    """Absolute offset of a stored record's payload (after its local header)."""
    f.seek(info.header_offset)
    header = f.read(_ZIP_LOCAL_HEADER.size)
    if len(header) < _ZIP_LOCAL_HEADER.size or header[:4] != ZIP_MAGIC:
        return -1  # reported when (if ever) the record is read
    fields = _ZIP_LOCAL_HEADER.unpack(header)
    name_len, extra_len = fields[9], fields[10]
    return info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len


# The largest pickle record read from a zip inside a larger file: DCP's records are a few
# hundred bytes; a hostile entry could name gigabytes of its shard as its pickle.
MAX_RANGE_PICKLE = 256 << 20


class _FileWindow(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of an open file, seen as a whole file (by zipfile)."""

    def __init__(self, f: BinaryIO, offset: int, length: int):
        super().__init__()
        self._f, self._base, self._len, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = (0, self._pos, self._len)[whence]
        if base + pos < 0:
            raise OSError(errno.EINVAL, "seek before the start of the entry")
        self._pos = base + pos
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self._len - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._base + self._pos)
        got = self._f.readinto(memoryview(buffer).cast("B")[:n]) or 0
        self._pos += got
        return got


def read_checkpoint_range(path: str | os.PathLike, offset: int, length: int) -> TorchFile:
    """Read the ``torch.save`` zip that fills bytes ``[offset, offset + length)`` of a larger
    file, safely and without tensor data: a torch.distributed.checkpoint shard (``.distcp``)
    is such zips one after another, one per entry.

    Only the zip's directory and its pickle are read. The result's ``path`` is the containing
    file and its storage spans are absolute offsets in it (so ``locate`` / ``read_storage``
    work as for a file of its own); ``size`` is ``length``. Every record must lie inside the
    range.

    Raises:
        InputError: the range is outside the file, or holds no intact torch zip.
    """
    path = os.fspath(path)
    where = f"{path} (bytes {offset}-{offset + length})"
    try:
        # Unbuffered: a buffer would read ahead into the neighbouring entries (tensor data).
        f = open(path, "rb", buffering=0)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if offset < 0 or length < 0 or offset + length > size:
            raise InputError(f"{where}: the range lies past the end of the {size}-byte file; "
                             "it is truncated or the range is wrong")
        window = _FileWindow(f, offset, length)
        try:
            zf = zipfile.ZipFile(window)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error,
                NotImplementedError) as e:
            raise InputError(f"{where}: not an intact torch zip ({e})") from None
        with zf:
            infos = zf.infolist()
            names = [i.filename.lower() for i in infos]
            if len(set(names)) != len(names):
                raise InputError(f"{where}: the zip holds two records of one name, which "
                                 "torch.save never writes: damaged or hostile")
            pkl = [i for i in infos if i.filename.endswith("data.pkl")
                   and i.filename.count("/") == 1]
            if len(pkl) != 1:
                raise InputError(f"{where}: a zip with {len(pkl)} data.pkl records, not a torch "
                                 "checkpoint")
            for info in infos:
                _refuse_packed(where, info)
            if pkl[0].file_size > MAX_RANGE_PICKLE:
                raise InputError(f"{where}: a {pkl[0].file_size}-byte pickle is more than "
                                 "ckpttool reads here; damaged or hostile")
            prefix = pkl[0].filename[: -len("data.pkl")]
            try:
                data = zf.read(pkl[0])
                order_info = zf.NameToInfo.get(prefix + "byteorder")
                byteorder = (zf.read(order_info).decode("ascii", "replace").strip() or "little"
                             if order_info is not None and order_info.file_size < 16
                             else "little")
            except (zipfile.BadZipFile, OSError, EOFError, ValueError,
                    NotImplementedError, RuntimeError, struct.error) as e:
                raise InputError(f"{where}: cannot read the pickle ({e}); damaged") from None
            unpickler = SafeUnpickler(io.BytesIO(data))
            root = _unpickled(where, unpickler)
            spans: dict[str, tuple[int, int]] = {}
            data_prefix = prefix + "data/"
            for info in infos:
                if info.filename.startswith(data_prefix):
                    start = _zip_data_offset(window, info)
                    if start < 0 or start + info.file_size > length:
                        raise InputError(f"{where}: the record {info.filename[:80]!r} lies "
                                         "outside its entry; damaged")
                    spans[info.filename[len(data_prefix):]] = (offset + start, info.file_size)
    return TorchFile(path, "torch-zip", root, unpickler.globals_seen, length, byteorder, prefix,
                     spans, tuple(unpickler.storage_seen))


def _read_legacy(path: str, size: int) -> TorchFile:
    """Legacy format: magic, protocol, sys_info, the object, the storage keys, then storages."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        seen: list[str] = []  # the globals of all five pickles

        def load_one(what: str) -> Any:
            unpickler = SafeUnpickler(f, legacy=True)
            value = _unpickled(path, unpickler, f"legacy checkpoint's {what}")
            seen.extend(unpickler.globals_seen)
            return value

        magic = load_one("header")
        if magic != LEGACY_MAGIC_NUMBER:
            root = magic
            if any(is_dangerous_global(g) for g in seen):
                # A bare pickle that calls code: report it as what it is.
                return TorchFile(path, "pickle", root, seen, size)
            raise InputError(f"{path}: a pickle file, but not a torch checkpoint (no torch "
                             "magic number)")
        load_one("protocol version")
        sys_info = load_one("system info")
        little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
        root = load_one("object")
        keys = load_one("storage list")
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
                if offset > size:  # damaged: reading this storage says so, the rest are lost
                    break
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


# --- comparing tensor bytes ----------------------------------------------------------------

# Bytes per read when the tensor data of two files is compared: large enough that a read costs
# what copying its bytes costs, small enough that the two reused buffers stay far below the
# memory budget.
COMPARE_CHUNK = 16 << 20


def storage_extent(ref: TensorRef) -> tuple[int, int]:
    """(start, length) in bytes of the part of its storage that a tensor's elements cover.

    A view (a transpose, a slice with a stride) covers everything from its first to its last
    element; two tensors of one layout whose extents hold equal bytes are equal.
    """
    return ref.storage_offset * ref.itemsize, extent(ref.shape, ref.stride) * ref.itemsize


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a contiguous (row-major) tensor of ``shape``.

    Example:
        >>> contiguous_stride((2, 3, 4))
        (12, 4, 1)
    """
    return tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))


def extent(shape: tuple, stride: tuple) -> int:
    """Storage elements a view covers from its first element to its last (0 when empty).

    Example:
        >>> extent((2, 3), (1, 2))  # a transposed 3x2
        6
    """
    if any(n == 0 for n in shape):
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(shape, stride))


@dataclass(frozen=True)
class ByteRun:
    """A run of bytes inside one storage record of a file."""

    storage: StorageRef
    start: int
    length: int


class _Handles:
    """Open files by path, for reading many runs (a checkpoint directory has several files)."""

    def __init__(self, stack: ExitStack):
        self.stack = stack
        self.open: dict[str, BinaryIO] = {}

    def read_into(self, path: str, offset: int, buffer: bytearray) -> None:
        handle = self.open.get(path)
        if handle is None:
            handle = self.open[path] = self.stack.enter_context(open(path, "rb", buffering=0))
        handle.seek(offset)
        if handle.readinto(buffer) != len(buffer):
            raise InputError(f"{path}: the file ends inside tensor data; it is truncated")


def same_bytes(a: TorchFile, b: TorchFile, pairs: list[tuple[ByteRun, ByteRun]], *,
               progress: Any = None, on_difference: Any = None) -> list[bool]:
    """For each pair of equally long byte runs (one in ``a``, one in ``b``): are they equal?

    The runs are read in the order they lie in ``a``, in chunks of :data:`COMPARE_CHUNK` into
    two reused buffers (memory stays at two chunks whatever the file size); a pair stops being
    read at its first differing chunk. Nothing is unpickled and torch is not imported.
    ``progress(done, total)`` is told the bytes compared, ``on_difference(i)`` each pair found
    to differ, as soon as it is.

    Raises:
        InputError: a run lies outside its record, or a file is truncated.
    """
    for run_a, run_b in pairs:
        if run_a.length != run_b.length:
            raise ValueError("byte runs of different lengths never hold equal bytes")
    total = sum(run_a.length for run_a, _ in pairs)
    result = [True] * len(pairs)
    done = 0
    full: tuple[bytearray, bytearray] | None = None
    located = sorted((a.locate(ra.storage, ra.start, ra.length),
                      b.locate(rb.storage, rb.start, rb.length), i)
                     for i, (ra, rb) in enumerate(pairs))
    with ExitStack() as stack:
        handles = _Handles(stack)
        for (path_a, off_a, length), (path_b, off_b, _), i in located:
            pos = 0
            while pos < length:
                n = min(COMPARE_CHUNK, length - pos)
                # Exact-size bytearrays: they compare with memcmp, where a memoryview slice
                # compares element by element, twenty times slower.
                if n == COMPARE_CHUNK:
                    full = full or (bytearray(n), bytearray(n))
                    buf_a, buf_b = full
                else:
                    buf_a, buf_b = bytearray(n), bytearray(n)
                handles.read_into(path_a, off_a + pos, buf_a)
                handles.read_into(path_b, off_b + pos, buf_b)
                pos += n
                if buf_a != buf_b:
                    result[i] = False
                    if on_difference is not None:
                        on_difference(i)
                    break
            done += length
            if progress is not None:
                progress(done, total)
    return result


# --- writing checkpoints -------------------------------------------------------------------
#
# A rewrite pickles the edited tree the way torch.save would have pickled it, and copies every
# storage record the new tree still references byte for byte, inside the kernel. A storage the
# new tree no longer references (the old scheduler's tensor lrs, say) is not written: torch.save
# never writes a storage nothing points to, and keeping it would only leave dead bytes behind.

# torch.save's pickle protocol (torch.serialization.DEFAULT_PROTOCOL); see _protocol_for.
PICKLE_PROTOCOL = 2
# Every zip payload starts at a multiple of this (torch's config.save.storage_alignment).
STORAGE_ALIGNMENT = 64
# `.format_version` "1": storage records lie in the order the pickle first names them, the
# property torch.load(map_location="meta") and config.load.calculate_storage_offsets rely on.
ZIP_FORMAT_VERSION = b"1"
# The `version` record of a torch.save file, for an input that has none to keep.
ZIP_DEFAULT_VERSION = b"3\n"
# What a torch.save zip holds besides data/<key>; an input with anything else is refused.
_ZIP_KNOWN_RECORDS = frozenset({"data.pkl", ".format_version", ".storage_alignment",
                                "byteorder", "version", ".data/version",
                                ".data/serialization_id"})
# miniz (torch's zip writer) moves a size or offset into a zip64 field at or above this value
# and leaves 0xFFFFFFFF in the 32-bit field; a test lowers the threshold to write zip64 small.
_ZIP64_LIMIT = 0xFFFFFFFF
_U32_MAX = 0xFFFFFFFF
_ZIP_UTF8_NAME = 0x0800  # general purpose flag bit 11
_ZIP_HAS_DESCRIPTOR = 0x0008  # bit 3: CRC and sizes follow the data (miniz's streaming layout)
# Bytes per copy call: the unit of progress reports; the bytes themselves never enter Python.
_COPY_CHUNK = 64 << 20
# copy_file_range copies page onto page markedly faster (35-60%) than onto a shifted page phase.
_PAGE_SIZE = 4096
# Below this many copied bytes the page phase saves nothing worth up to 4 KB of padding.
_PHASE_MIN_BYTES = 64 << 20

# dtype -> typed storage class torch.save names for it (torch.storage._dtype_to_storage_type_map).
# Quantized dtypes are left out: their tensors pickle through another rebuilder.
_TYPED_STORAGES = {dtype: name for name, dtype in STORAGE_DTYPES.items()
                   if name != "UntypedStorage" and not name.startswith("Q")}
# dtypes torch.save writes as an UntypedStorage + _rebuild_tensor_v3 (torch.storage._new_dtypes).
_UNTYPED_DTYPES = frozenset({
    "float8_e5m2", "float8_e4m3fn", "float8_e5m2fnuz", "float8_e4m3fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2", "complex32",
    "uint16", "uint32", "uint64",
})


@dataclass(frozen=True)
class NewTensor:
    """A tensor a rewrite creates (a re-stepped tensor lr): dtype, shape and raw bytes.

    ``data`` is the contiguous little-endian bytes of all elements; ``location`` the device tag
    torch saves it under ("cpu", "cuda:0"), which is where torch.load puts it back. It is written
    as torch.save writes a fresh tensor: a storage record of its own, ``requires_grad=False``,
    no hooks. Build one from a torch tensor with :func:`new_tensor_from_torch`.

    Example:
        >>> NewTensor("float32", (), struct.pack("<f", 0.5))
        tensor(float32[] @cpu, new)
    """

    dtype: str
    shape: tuple[int, ...]
    data: bytes = field(repr=False)
    location: str = "cpu"

    def __post_init__(self) -> None:
        if self.dtype not in _TYPED_STORAGES and self.dtype not in _UNTYPED_DTYPES:
            raise ValueError(f"torch.save cannot write a plain {self.dtype} tensor")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "data", bytes(self.data))
        if len(self.data) != self.numel * self.itemsize:
            raise ValueError(f"{len(self.data)} bytes for {self.numel} {self.dtype} elements")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE[self.dtype]

    @property
    def stride(self) -> tuple[int, ...]:
        strides, step = [], 1
        for size in reversed(self.shape):
            strides.append(step)
            step *= max(size, 1)
        return tuple(reversed(strides))

    def __repr__(self) -> str:
        dims = ", ".join(str(s) for s in self.shape)
        return f"tensor({self.dtype}[{dims}] @{self.location}, new)"


def new_tensor_from_torch(tensor: Any, location: str | None = None) -> NewTensor:
    """A :class:`NewTensor` holding a copy of a torch tensor's values (imports torch).

    ``location`` is the device tag to save it under; by default the tensor's own, as torch.save
    would tag it (``torch.serialization.location_tag``), so a cuda lr loads back on cuda.

    Example:
        >>> new_tensor_from_torch(torch.tensor(0.1))           # doctest: +SKIP
        tensor(float32[] @cpu, new)
    """
    import ctypes

    import torch
    from torch.serialization import location_tag

    t = tensor.detach()
    if t.layout != torch.strided or t.device.type == "meta" or t.is_quantized:
        raise ValueError(f"only dense tensors with data can be written, not {t.layout} "
                         f"{t.dtype} on {t.device}")
    tag = location or location_tag(t.untyped_storage())
    flat = t.resolve_conj().resolve_neg().to("cpu").contiguous()
    nbytes = flat.numel() * flat.element_size()
    raw = ctypes.string_at(flat.data_ptr(), nbytes) if nbytes else b""
    dtype = str(t.dtype).removeprefix("torch.")
    if sys.byteorder == "big":
        raw = _swap_bytes(raw, dtype)
    return NewTensor(dtype, tuple(t.shape), raw, tag)


def _swap_bytes(raw: bytes, dtype: str) -> bytes:
    """Little- <-> big-endian for the elements of a dtype (complex: each half on its own)."""
    unit = DTYPE_ITEMSIZE[dtype] // (2 if dtype.startswith("complex") else 1)
    if unit == 1:
        return raw
    return b"".join(raw[i:i + unit][::-1] for i in range(0, len(raw), unit))


def _global_name(value: Any) -> tuple[str, str] | None:
    """(module, name) of a value the tree holds only as a global's name; None for real objects."""
    if isinstance(value, _Global):
        return value.module, value.name
    if isinstance(value, type) and issubclass(value, Opaque) and value is not Opaque:
        return value.global_module, value.global_name
    if isinstance(value, DType):
        return "torch", value.name
    if isinstance(value, StorageType):
        g = _Global.storage(value.name)
        return g.module, g.name
    return None


class _PersistentId:
    """A storage reference the pickler writes as a persistent id (a NewTensor's storage)."""

    __slots__ = ("pid",)

    def __init__(self, pid: tuple):
        self.pid = pid


class _StorageKey(str):
    """A storage key in a persistent id: one object per storage, as torch's id_map keeps it."""

    __slots__ = ()


class _Storages:
    """The output's storage records, keyed as the pickler first meets each storage.

    Existing storages keep their keys (so an unchanged tensor is the same record in both
    files); a NewTensor gets a key above every key of the input. With ``renumber`` every
    storage is keyed "0", "1", ... in the order met, which is what torch.save itself does.
    """

    def __init__(self, input_keys: Any, *, legacy: bool, renumber: bool = False):
        self.legacy = legacy
        self.renumber = renumber
        # (output key, input key or NewTensor), in the order the pickle names them
        self.order: list[tuple[str, str | NewTensor]] = []
        self._keys: dict[Any, str] = {}
        self._tags: dict[str, str] = {}
        self.needed: dict[str, int] = {}  # input key -> bytes its tensors need
        numbers = [int(k) for k in input_keys if k.isdigit()]
        self._next_fresh = max(numbers, default=-1) + 1

    def _key(self, ident: Any, source: str | NewTensor) -> _StorageKey:
        key = self._keys.get(ident)
        if key is None:
            if self.renumber:
                key = _StorageKey(len(self.order))
            elif isinstance(source, str):
                key = _StorageKey(source)
            else:
                key = _StorageKey(self._next_fresh)
                self._next_fresh += 1
            self._keys[ident] = key
            self.order.append((str(key), source))
        return key

    def _pid(self, storage_type: str, key: str, location: str, numel: int) -> tuple:
        if ":" not in location:
            # torch's location_tag returns one literal "cpu" (or "mps", "meta") for every
            # storage, memoized once in the pickle; a "cuda:0" it builds anew each time.
            location = self._tags.setdefault(location, location)
        pid = ("storage", _Global.storage(storage_type), key, location, numel)
        # Legacy ids end with the view metadata torch stopped using: always None.
        return pid + (None,) if self.legacy else pid

    def existing(self, ref: StorageRef) -> tuple:
        """The persistent id of a storage record copied from the input."""
        key = self._key(("in", ref.key), ref.key)
        self.needed[ref.key] = max(self.needed.get(ref.key, 0), ref.nbytes)
        # An UntypedStorage's id counts bytes; the reader counts its tensor's elements.
        numel = ref.nbytes if ref.storage_type == "UntypedStorage" else ref.numel
        return self._pid(ref.storage_type, key, ref.location, numel)

    def new_tensor(self, tensor: NewTensor) -> tuple:
        """The (rebuilder, args) reduce of a NewTensor, exactly as torch.save writes a tensor."""
        typed = _TYPED_STORAGES.get(tensor.dtype)
        if self.legacy and not typed:
            raise CkptToolError(f"a legacy (non-zip) checkpoint cannot hold a {tensor.dtype} "
                                "tensor: torch's legacy format has no storage type for it")
        key = self._key(("new", id(tensor)), tensor)
        storage = _PersistentId(self._pid(typed or "UntypedStorage", key, tensor.location,
                                          tensor.numel if typed else len(tensor.data)))
        args = (storage, 0, tensor.shape, tensor.stride, False, OrderedDict())
        if typed:
            return _Global("torch._utils", "_rebuild_tensor_v2"), args
        return _Global("torch._utils", "_rebuild_tensor_v3"), args + (DType(tensor.dtype),)


def _opaque_reduce(value: Opaque) -> tuple:
    """The reduce tuple that re-creates an opaque value with the opcodes it was read with."""
    cls = type(value)
    tail = (value.state, iter(value.items) if value.items else None,
            iter(value.dictitems.items()) if value.dictitems else None)
    if value.how == "new":  # NEWOBJ (NEWOBJ_EX with keywords)
        if value.kwargs:
            return (copyreg.__newobj_ex__, (cls, value.args, value.kwargs)) + tail
        return (copyreg.__newobj__, (cls,) + value.args) + tail
    if value.how == "reconstructor":
        # The reader keeps (base, state) only when state is not None, and then base is not
        # object: copyreg._reduce_ex pairs state None with base object.
        base, state = value.args or (_Global("__builtin__", "object"), None)
        return (_Global("copy_reg", "_reconstructor"), (cls, base, state)) + tail
    return (cls, value.args) + tail  # REDUCE


def _is_torch_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, (torch.Tensor, torch.UntypedStorage,
                                                    torch.storage.TypedStorage))


_PLAIN_TYPES = frozenset({int, float, str, bool, type(None), tuple, list, dict, bytes})


class _TreePickler(pickle._Pickler):
    """Pickles a tree from the safe reader byte for byte the way torch.save's pickler wrote it.

    It extends the pure-Python pickler because the C one imports every global it writes to check
    it; here an opaque class or a torch rebuilder is written by its name, and nothing the
    checkpoint names is imported or called. ``fix_imports`` stays on, as in torch.save: protocol
    2 spells builtins ``__builtin__``.
    """

    def __init__(self, out: BinaryIO, storages: _Storages, protocol: int):
        super().__init__(out, protocol=protocol)
        self.storages = storages
        self._global_memo: dict[tuple[str, str], int] = {}  # one memo entry per global name

    dispatch = pickle._Pickler.dispatch.copy()

    def save_storage_key(self, obj: _StorageKey) -> None:
        # Its own object, memoized: a storage named twice reuses it, as torch.save's id_map
        # does, and it is never merged with an equal string of the tree (unpickling makes all
        # one-character strings one cached object; torch.save's keys were not).
        super().save_str(obj)

    dispatch[_StorageKey] = save_storage_key

    # torch.save runs the C pickler, whose batching of exact lists and dicts differs from the
    # pure-Python one at the edges: a last batch of one item still gets MARK ... APPENDS /
    # SETITEMS, and a dict whose size is a multiple of the batch ends with an empty MARK SETITEMS.
    def save_list(self, obj: list) -> None:
        self.write(pickle.EMPTY_LIST)
        self.memoize(obj)
        if len(obj) == 1:
            self.save(obj[0])
            self.write(pickle.APPEND)
            return
        for start in range(0, len(obj), self._BATCHSIZE):
            self.write(pickle.MARK)
            for item in obj[start:start + self._BATCHSIZE]:
                self.save(item)
            self.write(pickle.APPENDS)

    def save_dict(self, obj: dict) -> None:
        self.write(pickle.EMPTY_DICT)
        self.memoize(obj)
        if len(obj) == 1:
            for key, value in obj.items():
                self.save(key)
                self.save(value)
            self.write(pickle.SETITEM)
            return
        items = iter(obj.items())
        batch = [None] * self._BATCHSIZE
        while obj and len(batch) == self._BATCHSIZE:
            batch = list(itertools.islice(items, self._BATCHSIZE))
            self.write(pickle.MARK)
            for key, value in batch:
                self.save(key)
                self.save(value)
            self.write(pickle.SETITEMS)

    dispatch[list] = save_list
    dispatch[dict] = save_dict

    def persistent_id(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is StorageRef:
            return self.storages.existing(obj)
        if kind is _PersistentId:
            return obj.pid
        return None

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind in _PLAIN_TYPES:  # most of a tree: let the pickler's own dispatch have them
            return NotImplemented
        if kind is TensorRef:
            name, args = obj.rebuild
            if not name:
                raise TypeError(f"{obj!r} has no rebuild recipe to write it with")
            return _Global.dotted(name), args
        if kind is NewTensor:
            return self.storages.new_tensor(obj)
        if isinstance(obj, Opaque):
            return _opaque_reduce(obj)
        if kind is Device:
            return _Global("torch", "device"), obj.args
        if _global_name(obj) is not None:
            return "global"  # any string: save() hands the object to save_global
        if _is_torch_tensor(obj):
            raise TypeError("a torch tensor in the tree to write; convert it with "
                            "new_tensor_from_torch")
        return NotImplemented

    def save_global(self, obj: Any, name: str | None = None) -> None:
        where = _global_name(obj)
        if where is None:  # a real object the caller put in the tree (OrderedDict, set, ...)
            super().save_global(obj, name)
            return
        index = self._global_memo.get(where)
        if index is not None:
            self.write(self.get(index))
            return
        module, qualname = where
        self.write(pickle.GLOBAL + module.encode("utf-8") + b"\n" + qualname.encode("utf-8")
                   + b"\n")
        self.memoize(obj)
        self._global_memo[where] = self.memo[id(obj)][0]


def _protocol_for(root: Any) -> int:
    """2, as torch.save writes, unless the tree holds what only protocol 4 can say: a keyword
    ``__new__`` call or a nested class name (both read from a protocol-4 pickle)."""
    for _, value in walk(root):
        if isinstance(value, Opaque) and value.kwargs:
            return 4
        cls = value if isinstance(value, type) else type(value)
        if issubclass(cls, Opaque) and "." in getattr(cls, "global_name", ""):
            return 4
    return PICKLE_PROTOCOL


def _pickle_tree(root: Any, storages: _Storages) -> bytes:
    buf = io.BytesIO()
    try:
        _TreePickler(buf, storages, _protocol_for(root)).dump(root)
    except RecursionError:
        raise CkptToolError("the tree nests too deeply to pickle; nothing was written") from None
    return buf.getvalue()


# --- copying bytes ---------------------------------------------------------------------------

# A copy's progress is reported at most once per this many bytes (and when it completes): the
# writer's block (_DIRECT_BLOCK), so a 4 GB copy reports about 128 times.
PROGRESS_BYTES = 32 << 20
# How often StagedWrite.finish looks at the staged copy it waits for, to report its progress.
_PROGRESS_POLL_S = 0.1


class CopyProgress:
    """Bytes copied of a known total, over one file or many (a folder's files, DCP shards),
    reported as ``progress(done, total)`` at most once per :data:`PROGRESS_BYTES` and when
    ``done`` reaches ``total``.

    Its :meth:`add` is the ``report(n)`` hook of :func:`copy_file` (and of the writer's copies),
    so one object follows many copies. Feed it from one thread at a time; ``progress`` runs in
    that thread. ``total`` may be corrected on the way (an estimate made exact); keep it above
    ``done`` until the work is complete.

    Example:
        >>> seen = []
        >>> shards = CopyProgress(100 << 20, lambda done, total: seen.append(done >> 20))
        >>> for _ in range(10):          # e.g. copy_file(src, dst, report=shards.add)
        ...     shards.add(10 << 20)
        >>> seen
        [40, 80, 100]
    """

    def __init__(self, total: int, progress: Any = None, *, every: int | None = None):
        self.total, self.done = total, 0
        self._progress, self._reported = progress, 0
        self._every = PROGRESS_BYTES if every is None else every

    def add(self, n: int) -> None:
        """``n`` more bytes were copied."""
        self.done += n
        if self._progress is not None and (self.done - self._reported >= self._every
                                           or self.done >= self.total):
            self._reported = self.done
            self._progress(self.done, self.total)


class _Copier:
    """Copies byte ranges between files in the kernel: copy_file_range, else sendfile, else a
    chunked read/write through one reusable buffer. ``report(n)`` follows each chunk."""

    _FALLBACK_ERRNOS = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP,
                                  errno.ENOTSUP, errno.EPERM, errno.EBADF, errno.ENODEV})

    def __init__(self, report: Any):
        self.report = report
        self.methods = [m for m in ("copy_file_range", "sendfile") if hasattr(os, m)]
        self.methods.append("readwrite")
        self._buffer: bytearray | None = None
        self._sources: dict[int, io.FileIO] = {}

    def copy(self, src: int, dst: int, offset: int, length: int) -> None:
        """Append ``length`` bytes of ``src`` at ``offset`` to ``dst`` (at its position)."""
        done = 0
        while done < length:
            start = os.lseek(dst, 0, os.SEEK_CUR)
            n = self._copy_some(src, dst, offset + done, min(_COPY_CHUNK, length - done))
            if n == 0:
                raise InputError("the input ends inside tensor data; it is truncated")
            if hasattr(os, "posix_fadvise"):
                # Start writing these pages to disk now (Linux starts writeback of dirty pages
                # on DONTNEED), so the fsync that makes the output durable waits only for the
                # last of them instead of the whole file.
                os.posix_fadvise(dst, start, n, os.POSIX_FADV_DONTNEED)
            done += n
            self.report(n)

    def _copy_some(self, src: int, dst: int, offset: int, count: int) -> int:
        while True:
            method = self.methods[0]
            try:
                if method == "copy_file_range":
                    return os.copy_file_range(src, dst, count, offset)
                if method == "sendfile":
                    return os.sendfile(dst, src, offset, count)
                return self._read_write(src, dst, offset, count)
            except OSError as e:
                # Not supported between these files (another filesystem, a pipe, an old
                # kernel): fall back for good, unless this was the last resort.
                if e.errno not in self._FALLBACK_ERRNOS or len(self.methods) == 1:
                    raise
                self.methods.pop(0)

    def _read_write(self, src: int, dst: int, offset: int, count: int) -> int:
        if self._buffer is None:
            self._buffer = bytearray(8 << 20)
        source = self._sources.setdefault(src, io.FileIO(src, "rb", closefd=False))
        source.seek(offset)
        view = memoryview(self._buffer)[:min(count, len(self._buffer))]
        n = source.readinto(view) or 0
        _write_all(dst, view[:n])
        return n


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# Direct writes go out in blocks of this many bytes (a multiple of every direct-I/O alignment),
# from _DIRECT_BUFFERS reused buffers: one filling, one queued, one being written; RSS grows by
# the buffers. Big blocks, because the two threads wait for the GIL at every hand-over while
# the caller imports torch: on a 4 GB copy, 32 MB blocks took 2.4 s where 8 MB took 2.9 s.
_DIRECT_BLOCK = 32 << 20
_DIRECT_BUFFERS = 3
# Offsets and lengths of direct writes are multiples of this (Linux: the logical block size of
# the device, 512 or 4096).
_DIRECT_ALIGNMENT = 4096


def _write_directly(fd: int) -> bool:
    """Switch ``fd`` to O_DIRECT writes, where the OS and the filesystem take them."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag or not hasattr(os, "preadv"):
        return False
    import fcntl

    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | flag)
    except OSError:  # EINVAL: this filesystem has no direct I/O (tmpfs before Linux 6.6, ...)
        return False
    return True


def _stop_writing_directly(fd: int) -> None:
    import fcntl

    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)


class _Appender:
    """Appends the output's pieces to ``dst``: bytes, and byte ranges of ``src`` (:class:`_Span`).

    The output must be on disk before it takes its name. Written through the page cache, every
    byte is copied once more in memory, then written back by the kernel, and the final fsync
    waits for that. So where the filesystem takes O_DIRECT, the file is written in whole aligned
    blocks straight from a few reused buffers to the disk, a second thread writing one block
    while the next fills (the input is read into them with preadv); the last block is padded
    and the file cut to its length. (A 4 GB copy, measured: durable in 1.1x the time ``cp``
    takes to leave its copy in the page cache, with half of cp's CPU.) Elsewhere bytes go
    through the page cache and ranges are copied in the kernel (:class:`_Copier`). The fsync
    itself stays with :func:`atomic_output`. ``report(n)`` follows each piece or chunk.

    Use it as a context manager: leaving the block normally writes what is left; leaving it by
    an exception only stops the writing thread.
    """

    def __init__(self, src: int, dst: int, report: Any):
        self.src, self.dst, self.report = src, dst, report
        self.length = 0  # bytes appended so far
        self._copier = _Copier(report)
        if hasattr(os, "posix_fadvise"):  # a bigger read-ahead on the input, as cp asks too
            os.posix_fadvise(src, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self._direct = _write_directly(dst)
        if self._direct:
            import mmap  # page-aligned memory, as direct I/O needs
            import queue

            self._free: Any = queue.SimpleQueue()
            self._full: Any = queue.SimpleQueue()
            for _ in range(_DIRECT_BUFFERS - 1):
                self._free.put(memoryview(mmap.mmap(-1, _DIRECT_BLOCK)))
            self._buffer = memoryview(mmap.mmap(-1, _DIRECT_BLOCK))
            self._fill = 0  # bytes in self._buffer
            self._error: BaseException | None = None
            self._through_cache = False  # the writer's fallback, see _write_block
            self._writer = threading.Thread(target=self._write_blocks, daemon=True,
                                            name="ckpttool-writer")
            self._writer.start()

    def __enter__(self) -> _Appender:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if not self._direct:
            return
        if kind is None:
            pad = -self._fill % _DIRECT_ALIGNMENT
            self._buffer[self._fill:self._fill + pad] = bytes(pad)
            self._fill += pad
            if self._fill:
                self._full.put((self._buffer, self.length + pad - self._fill, self._fill))
        self._full.put(None)
        self._writer.join()
        if kind is None:
            if self._error is not None:
                raise self._error
            os.ftruncate(self.dst, self.length)

    def add(self, piece: bytes | _Span) -> None:
        """Append ``piece``."""
        if isinstance(piece, bytes):
            self.write(piece)
        else:
            self.copy(piece.offset, piece.size)

    def write(self, data: bytes) -> None:
        """Append ``data``."""
        if not self._direct:
            _write_all(self.dst, data)
            self.length += len(data)
        else:
            view = memoryview(data)
            while view:
                n = min(self._room(), len(view))
                self._buffer[self._fill:self._fill + n] = view[:n]
                self._fill += n
                self.length += n  # (a block handed on starts at self.length - self._fill)
                view = view[n:]
        self.report(len(data))

    def copy(self, offset: int, size: int) -> None:
        """Append ``size`` bytes of the input from ``offset`` on."""
        if not self._direct:
            self._copier.copy(self.src, self.dst, offset, size)
            self.length += size
            return
        done = 0
        while done < size:
            n = min(self._room(), size - done)
            n = os.preadv(self.src, [self._buffer[self._fill:self._fill + n]], offset + done)
            if n == 0:
                raise InputError("the input ends inside tensor data; it is truncated")
            self._fill += n
            self.length += n
            done += n
            self.report(n)

    def _room(self) -> int:
        """Free bytes in the current buffer, handing it to the writer first when it is full."""
        if self._fill == _DIRECT_BLOCK:
            self._full.put((self._buffer, self.length - self._fill, self._fill))
            self._buffer, self._fill = self._free.get(), 0
            if self._error is not None:
                raise self._error
        return _DIRECT_BLOCK - self._fill

    def _write_blocks(self) -> None:
        """The writing thread: each block at its offset, in order. After a failure it only
        hands the buffers back (the producer raises the error)."""
        while (job := self._full.get()) is not None:
            buffer, offset, length = job
            try:
                if self._error is None:
                    self._write_block(buffer[:length], offset)
            except BaseException as e:
                self._error = e
            self._free.put(buffer)

    def _write_block(self, view: memoryview, offset: int) -> None:
        while view:
            try:
                n = os.pwrite(self.dst, view, offset)
            except OSError as e:
                if e.errno != errno.EINVAL or self._through_cache:
                    raise
                # The device wants coarser alignment than _DIRECT_ALIGNMENT: the same blocks
                # go through the page cache from here on.
                _stop_writing_directly(self.dst)
                self._through_cache = True
                continue
            view, offset = view[n:], offset + n


# --- the atomic output -----------------------------------------------------------------------


def _host_tag() -> str:
    """This host, as temporary names carry it (with the pid): a hash of its name."""
    import socket

    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


_HOST_TAG = _host_tag()


def _remove_stale_temporaries(folder: str, stem: str) -> None:
    """Remove the temporary files of this target that a process of this host left when it was
    killed (kill -9, a power cut: it had no chance to remove them), found by its pid no longer
    running; a live writer's are left alone."""
    prefix, host = f".{stem}.", _HOST_TAG
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        parts = name[len(prefix):-len(".tmp")].split("-")
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            with suppress(OSError):
                os.unlink(os.path.join(folder, name))
        except OSError:  # alive (another user's), or unknowable: keep it
            pass


@contextmanager
def atomic_output(out_path: str | os.PathLike) -> Iterator[io.FileIO]:
    """An unbuffered file that becomes ``out_path`` only when the block completes.

    The bytes go to a hidden temporary file beside the target (same folder, so the rename is
    atomic); on success it is fsynced, renamed over ``out_path`` and the folder is fsynced. On
    any exception, KeyboardInterrupt included, the temporary file is removed and ``out_path``
    is untouched. A new file gets the usual permissions (0666 less the umask); a replaced file
    keeps its mode.

    Example:
        >>> with atomic_output("out.pt") as f:                  # doctest: +SKIP
        ...     f.write(b"...")
    """
    out_path = os.fspath(out_path)
    folder = os.path.dirname(os.path.abspath(out_path))
    # NAME_MAX is 255 bytes; a long target name is shortened, the random part kept.
    stem = os.path.basename(out_path)[:180]
    _remove_stale_temporaries(folder, stem)
    while True:
        tmp = os.path.join(folder,
                           f".{stem}.{_HOST_TAG}-{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                         0o666)
            break
        except FileExistsError:
            continue
    try:
        with io.FileIO(fd, "wb", closefd=True) as f:
            try:
                os.chmod(fd, stat.S_IMODE(os.stat(out_path).st_mode))
            except FileNotFoundError:
                pass
            yield f
            os.fsync(fd)
        os.replace(tmp, out_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_folder(folder)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike, *,
              report: Any = None) -> int:
    """Copy the file ``src`` to the new file ``dst``, byte for byte, and fsync it (the caller
    fsyncs the folder). Never a link: the copy shares nothing with ``src``. The bytes go the
    writer's way (:class:`_Appender`: direct I/O where the filesystem takes it, else kernel
    copies); ``report(n)`` follows each chunk: a :class:`CopyProgress`'s ``add`` follows many
    copies as one, at most once per 32 MB. Returns the bytes copied.

    Raises:
        FileExistsError: ``dst`` exists (nothing is overwritten).
        OSError: reading or writing failed; a partial ``dst`` is removed.

    Example:
        >>> copy_file("run/rng_state.pth", "new/.pending/rng_state.pth")    # doctest: +SKIP
        14709
    """
    src_fd = os.open(src, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        size = os.fstat(src_fd).st_size
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                         stat.S_IMODE(os.fstat(src_fd).st_mode) | stat.S_IWUSR)
        try:
            with _Appender(src_fd, dst_fd, report or (lambda n: None)) as out:
                out.copy(0, size)
            os.fsync(dst_fd)
        except BaseException:
            os.close(dst_fd)
            with suppress(FileNotFoundError):
                os.unlink(dst)
            raise
        os.close(dst_fd)
    finally:
        os.close(src_fd)
    return size


def fsync_folder(folder: str) -> None:
    """Make a rename durable (POSIX); folders cannot be opened this way on Windows."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- write_checkpoint ------------------------------------------------------------------------


@dataclass(frozen=True)
class WrittenCheckpoint:
    """What :func:`write_checkpoint` wrote: the file, and what became of each storage record."""

    path: str
    kind: str  # "torch-zip" or "torch-legacy", the input's kind
    size: int  # bytes
    copied: dict[str, str]  # input storage key -> its key in the output (bytes as they were)
    created: tuple[str, ...]  # output keys of the NewTensor records
    dropped: tuple[str, ...]  # input storage keys the new tree no longer references


def write_checkpoint(file: TorchFile, root: Any, out_path: str | os.PathLike, *,
                     progress: Any = None) -> WrittenCheckpoint:
    """Write ``root`` (``file.root``, edited) as a checkpoint of the same kind as ``file``.

    Tensors that come from ``file`` (TensorRef) keep their storage records, copied byte for
    byte (:class:`_Appender`); :class:`NewTensor` values get records of their own; storages no
    longer referenced are dropped. Opaque values are written back exactly as they were read. A zip
    is laid out as torch.save lays it out (record order, 64-byte alignment, zip64 where
    needed), under the input's folder name; a legacy file stays legacy. The output appears
    atomically (:func:`atomic_output`); ``file.path`` is only read.
    ``progress(done_bytes, total_bytes)`` follows the writing, at most once per
    :data:`PROGRESS_BYTES` (:class:`CopyProgress`).

    Raises:
        InputError: ``file`` is damaged where bytes must be copied from it.
        CkptToolError: the tree or the output cannot be written (then nothing is left behind).

    Example:
        >>> ckpt = read_checkpoint("fixtures/adamw_cosine.pt")   # doctest: +SKIP
        >>> ckpt.root["optimizer"]["param_groups"][0]["lr"] = 1e-4  # doctest: +SKIP
        >>> write_checkpoint(ckpt, ckpt.root, "out.pt").dropped  # doctest: +SKIP
        ()
    """
    out_path = os.fspath(out_path)
    if file.kind not in ("torch-zip", "torch-legacy"):
        raise CkptToolError(f"{file.path}: only torch.save files can be rewritten, not a "
                            f"{file.kind!r} file")
    legacy = file.kind == "torch-legacy"
    storages = _Storages(file.storage_spans, legacy=legacy)
    data_pkl = _pickle_tree(root, storages)
    if not legacy and storages.order and storages.order[0][0] != "0":
        # torch.load(map_location="meta") asserts that the first storage the pickle names is
        # data/0 (it computes offsets from there), so key them all as torch.save would.
        storages = _Storages(file.storage_spans, legacy=legacy, renumber=True)
        data_pkl = _pickle_tree(root, storages)
    for key, needed in storages.needed.items():
        if key not in file.storage_spans or file.storage_spans[key][1] < needed:
            # a damaged file, or a tensor of another file's tree: bytes would be wrong
            raise InputError(f"{file.path}: tensor storage {key!r} is missing from the file "
                             "or shorter than its tensors")
    pieces = (_legacy_pieces(file, storages, data_pkl) if legacy
              else _zip_pieces(file, storages, data_pkl))
    total = sum(_piece_size(p) for p in pieces)
    report = CopyProgress(total, progress).add
    try:
        with open(file.path, "rb") as src, atomic_output(out_path) as out, \
                _Appender(src.fileno(), out.fileno(), report) as appender:
            for piece in pieces:
                appender.add(piece)
    except OSError as e:
        if e.filename == file.path:
            raise InputError(f"{file.path}: cannot read: {e.strerror or e}") from None
        raise CkptToolError(f"{out_path}: cannot write the checkpoint ({e.strerror or e}); "
                            "nothing was written") from None
    copied = {s: k for k, s in storages.order if isinstance(s, str)}
    return WrittenCheckpoint(out_path, file.kind, total, copied,
                             tuple(k for k, s in storages.order if not isinstance(s, str)),
                             tuple(k for k in file.storage_spans if k not in copied))


@dataclass(frozen=True)
class _Span:
    """Bytes of the input to copy as they are."""

    offset: int
    size: int


def _piece_size(piece: bytes | _Span) -> int:
    return len(piece) if isinstance(piece, bytes) else piece.size


def _new_bytes(tensor: NewTensor, byteorder: str) -> bytes:
    return tensor.data if byteorder == "little" else _swap_bytes(tensor.data, tensor.dtype)


# --- the zip layout --------------------------------------------------------------------------


def _zip64_field(*values: int) -> bytes:
    return struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values) if values else b""


def _zip_entry(name: bytes, size: int, crc: int, offset: int,
               phase: int | None = None) -> tuple[bytes, bytes, bytes]:
    """(local header, data descriptor, central directory entry) of a stored record whose local
    header starts at ``offset``, byte for byte as torch's miniz writer makes them.

    The payload starts 64-byte aligned: an "FB" extra field pads the local header; with
    ``phase`` (a multiple of 64) it pads further, to a payload offset equal to it modulo 4096. Sizes and CRC
    follow the data in a descriptor (16 bytes, or 24 with 64-bit sizes when the record needs
    zip64); an empty record has none. A size or offset at or above 0xFFFFFFFF moves to a zip64
    extra field; in the local one miniz writes the compressed size as 0 (not known yet then).
    """
    big_size, big_offset = size >= _ZIP64_LIMIT, offset >= _ZIP64_LIMIT
    local64 = b""
    if big_size or big_offset:
        local64 = _zip64_field(*((size, 0) if big_size else ()), *((offset,) if big_offset else ()))
    start = offset + _ZIP_LOCAL_HEADER.size + len(name) + len(local64) + 4
    padding = -start % STORAGE_ALIGNMENT if phase is None else (phase - start) % _PAGE_SIZE
    extra = local64 + b"FB" + struct.pack("<H", padding) + b"Z" * padding
    flags = _ZIP_UTF8_NAME | (_ZIP_HAS_DESCRIPTOR if size else 0)
    local = _ZIP_LOCAL_HEADER.pack(ZIP_MAGIC, 0, flags, 0, 0, 0, 0, 0, 0, len(name),
                                   len(extra)) + name + extra
    descriptor = b""
    if size:
        descriptor = (struct.pack("<4sIQQ", b"PK\x07\x08", crc, size, size) if local64
                      else struct.pack("<4sIII", b"PK\x07\x08", crc, size, size))
    central64 = _zip64_field(*((size, size) if big_size else ()),
                             *((offset,) if big_offset else ()))
    stored_size = _U32_MAX if big_size else size
    central = _ZIP_CENTRAL_HEADER.pack(
        b"PK\x01\x02", 0, 0, flags, 0, 0, 0, crc, stored_size, stored_size, len(name),
        len(central64), 0, 0, 0, 0, _U32_MAX if big_offset else offset) + name + central64
    return local, descriptor, central


_ZIP_CENTRAL_HEADER = struct.Struct("<4sHHHHHHIIIHHHHHII")


def _zip_end(central: list[bytes], offset: int) -> bytes:
    """Central directory, zip64 end record + locator (torch always writes them) and end record."""
    directory = b"".join(central)
    n, end64 = len(central), offset + len(directory)
    return (directory
            + struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 0x031E, 0x002D, 0, 0, n, n,
                          len(directory), offset)
            + struct.pack("<4sIQI", b"PK\x06\x07", 0, end64, 1)
            + struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, min(n, 0xFFFF), min(n, 0xFFFF),
                          min(len(directory), _U32_MAX), min(offset, _U32_MAX), 0))


def _zip_records(file: TorchFile, storages: _Storages, data_pkl: bytes, *,
                 storages_first: bool = False) -> list[tuple[str, int, int, Any]]:
    """The output's records as (name, size, crc, payload piece), in torch.save's order, or with
    the storages first (for a staged write: see :class:`StagedWrite`)."""
    try:
        with zipfile.ZipFile(file.path) as zf:
            infos = {info.filename: info for info in zf.infolist()}
            prefix = file.zip_prefix or ""
            version = next((zf.read(prefix + name) for name in ("version", ".data/version")
                            if prefix + name in infos), ZIP_DEFAULT_VERSION)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise InputError(f"{file.path}: cannot read the zip again ({e})") from None
    unknown = [name for name in infos if not name.endswith("/") and (  # folders hold nothing
        not name.startswith(prefix) or name[len(prefix):] not in _ZIP_KNOWN_RECORDS
        and not name.startswith(prefix + "data/"))]
    if unknown:
        raise CkptToolError(f"{file.path}: the zip holds records torch.save does not write "
                            f"({', '.join(unknown[:3])}); ckpttool does not rewrite it")
    # A copied record keeps the CRC the input recorded for the very same bytes, so 4 GB are not
    # read a second time to checksum them.
    head: list[tuple[str, int, int, Any]] = []
    tensors: list[tuple[str, int, int, Any]] = []

    def small(name: str, data: bytes) -> tuple[str, int, int, Any]:
        return (name, len(data), zlib.crc32(data), data)

    head += [small("data.pkl", data_pkl), small(".format_version", ZIP_FORMAT_VERSION),
             small(".storage_alignment", str(STORAGE_ALIGNMENT).encode()),
             small("byteorder", file.byteorder.encode())]
    for key, source in storages.order:
        if isinstance(source, NewTensor):
            tensors.append(small(f"data/{key}", _new_bytes(source, file.byteorder)))
            continue
        offset, size, info = _stored_record(file, infos, prefix, source)
        tensors.append((f"data/{key}", size, info.CRC, _Span(offset, size)))
    tail = [small("version", version)]
    records = tensors + head + tail if storages_first else head + tensors + tail
    return records + [small(".data/serialization_id", _serialization_id(records))]


def _first_copied_phase(file: TorchFile, storages: _Storages) -> dict[str, int]:
    """{record name: payload offset to keep modulo a page} for the first storage record.

    When the layout before it changes length, every record after it moves. Its local header is
    padded so its payload keeps its input offset modulo a page, and the records copied after it
    follow in step: the kernel copies page onto page, markedly faster than onto a shifted page
    phase. Only the first: torch.load reads its offset from its header, but may compute the
    later ones from miniz's layout rules (64-byte alignment).
    """
    copied = sum(file.storage_spans[s][1] for _, s in storages.order if isinstance(s, str))
    if copied >= _PHASE_MIN_BYTES and storages.order and isinstance(storages.order[0][1], str):
        first_key, source = storages.order[0]
        if file.storage_spans[source][0] % STORAGE_ALIGNMENT == 0:
            return {f"data/{first_key}": file.storage_spans[source][0]}
    return {}


def _lay_out(records: list, folder: bytes, offset: int, phases: dict[str, int],
             central: list[bytes]) -> tuple[list, int]:
    """Pieces (local header, payload, descriptor) of ``records`` from ``offset`` on; appends
    their central directory entries to ``central`` and returns (pieces, end offset)."""
    pieces: list[Any] = []
    for name, size, crc, payload in records:
        local, descriptor, entry = _zip_entry(folder + name.encode(), size, crc, offset,
                                              phases.get(name))
        pieces += [local, payload, descriptor] if descriptor else [local, payload]
        central.append(entry)
        offset += len(local) + size + len(descriptor)
    return [p for p in pieces if not isinstance(p, bytes) or p], offset


def _zip_pieces(file: TorchFile, storages: _Storages, data_pkl: bytes) -> list:
    """The output zip as pieces: records in torch.save's order, then the central directory.

    The records keep the input's folder name. (torch.save would name it after the output file;
    torch.load takes any.) So record names stay as they were, and every copied payload keeps its
    offset modulo a page (its very offset, when the pickle keeps its length).
    """
    records = _zip_records(file, storages, data_pkl)
    central: list[bytes] = []
    pieces, end = _lay_out(records, (file.zip_prefix or "").encode() or b"archive/", 0,
                           _first_copied_phase(file, storages), central)
    return pieces + [_zip_end(central, end)]


def _stored_record(file: TorchFile, infos: dict, prefix: str,
                   key: str) -> tuple[int, int, zipfile.ZipInfo]:
    """(offset, size, zip entry) of the storage record ``key``, whose bytes are copied as they
    are; a record that is missing, compressed (the reader refuses those too) or reaching past
    the file is damage."""
    info = infos.get(f"{prefix}data/{key}")
    offset, size = file.storage_spans.get(key, (-1, -1))  # (no record: damaged)
    if (info is None or info.compress_type != zipfile.ZIP_STORED or offset < 0
            or size != info.file_size or offset + size > file.size):
        raise InputError(f"{file.path}: the record of tensor storage {key!r} is damaged")
    return offset, size, info


class StagedWrite:
    """A zip rewrite that copies the big unchanged tensor records while the new tree is still
    being computed (``ckpttool reschedule`` imports torch and replays the schedule meanwhile).

    ``keep`` are input storage keys, in the order the input's pickle names them, that the new
    tree will name first and in this order (the caller knows which subtrees it replaces). A
    thread copies their records to the head of the output at once. :meth:`finish` then appends
    the other storages, ``data.pkl`` and the small records, and the central directory. The
    storages stay contiguous in the order the new pickle names them, first "0", which is what
    torch.load's offset arithmetic (``map_location="meta"``, ``calculate_storage_offsets``)
    assumes; where the new pickle does not name ``keep`` first, :meth:`finish` returns None and
    the caller writes the plain way. The output appears atomically, as with
    :func:`write_checkpoint`; :meth:`abort` leaves nothing behind.

    Example:
        >>> staged = StagedWrite(ckpt, "out.pt", list(ckpt.storage_order))   # doctest: +SKIP
        >>> written = (staged.finish(new_root, progress=bar)         # doctest: +SKIP
        ...            or write_checkpoint(ckpt, new_root, "out.pt", progress=bar))
    """

    def __init__(self, file: TorchFile, out_path: str | os.PathLike, keep: list[str]):
        if file.kind != "torch-zip":
            raise CkptToolError("only zip checkpoints can be written in stages")
        self.file, self.out_path, self.keep = file, os.fspath(out_path), list(keep)
        self.folder = (file.zip_prefix or "").encode() or b"archive/"
        with ExitStack() as stack:  # (left by an exception, it removes what it made)
            out = stack.enter_context(atomic_output(self.out_path))
            src = stack.enter_context(open(file.path, "rb"))
            self._out = stack.enter_context(_Appender(src.fileno(), out.fileno(),
                                                      self._stop_when_aborted))
            self._stack = stack.pop_all()
        self._central: list[bytes] = []
        self._staged: list[tuple[str, int, int]] = []
        self._error: BaseException | None = None
        self._cancelled = threading.Event()
        self._report: Any = None  # the caller's CopyProgress.add, once finish() writes
        self._thread = threading.Thread(target=self._copy, name="ckpttool-staged-copy",
                                        daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        try:
            with zipfile.ZipFile(self.file.path) as zf:
                infos = {info.filename: info for info in zf.infolist()}
            prefix = self.file.zip_prefix or ""
            # (a key the pickle names without a record: reported below, as damage)
            big = sum(self.file.storage_spans.get(k, (0, 0))[1]
                      for k in self.keep) >= _PHASE_MIN_BYTES
            for i, key in enumerate(self.keep):
                offset, size, info = _stored_record(self.file, infos, prefix, key)
                phase = offset if big and i == 0 and offset % STORAGE_ALIGNMENT == 0 else None
                local, descriptor, entry = _zip_entry(self.folder + f"data/{key}".encode(),
                                                      size, info.CRC, self._out.length, phase)
                self._out.write(local)
                self._out.copy(offset, size)
                self._out.write(descriptor)
                self._central.append(entry)
                self._staged.append((f"data/{key}", size, info.CRC))
        except BaseException as e:  # re-raised in the caller's thread by finish()
            self._error = e

    def _stop_when_aborted(self, n: int) -> None:
        """After each chunk: stop the copy when :meth:`abort` asks; once :meth:`finish` writes
        in the caller's thread, report the chunk to its progress."""
        if self._cancelled.is_set():
            raise _Aborted()
        if self._report is not None:
            self._report(n)

    def finish(self, root: Any, *, progress: Any = None) -> WrittenCheckpoint | None:
        """Complete the file with the new tree ``root``; None when it cannot be completed in
        stages (then the staged copy is already discarded).

        ``progress(done_bytes, total_bytes)`` follows the output from here on, at most once per
        :data:`PROGRESS_BYTES`: the staged copy while it is still running (polled, so the
        callback runs in the caller's thread only; ``total`` is the input's size until the
        output's is known), then the rest.
        """
        copied = CopyProgress(self.file.size, progress)
        try:
            while progress is not None and self._thread.is_alive():
                self._thread.join(_PROGRESS_POLL_S)
                # done stays under total until the last byte: a bar ends with the output
                copied.total = max(copied.total, self._out.length + 1)
                copied.add(self._out.length - copied.done)
        except BaseException:  # Ctrl-C while waiting, or the callback failing
            self.abort()
            raise
        self._thread.join()
        if self._error is not None:
            self.abort()
            if isinstance(self._error, OSError) and not isinstance(self._error, InputError):
                raise CkptToolError(f"{self.out_path}: cannot write the checkpoint "
                                    f"({self._error.strerror or self._error}); nothing was "
                                    "written") from None
            raise self._error
        try:
            storages = _Storages(self.file.storage_spans, legacy=False)
            data_pkl = _pickle_tree(root, storages)
            named = [(k, s) for k, s in storages.order]
            if (not named or named[0][0] != "0"
                    or [(k, s) for k, s in named[:len(self.keep)]] != [(k, k) for k in self.keep]):
                self.abort()
                return None
            for key, needed in storages.needed.items():
                if key not in self.file.storage_spans or self.file.storage_spans[key][1] < needed:
                    raise InputError(f"{self.file.path}: tensor storage {key!r} is missing from "
                                     "the file or shorter than its tensors")
            records = _zip_records(self.file, storages, data_pkl, storages_first=True)
            if [r[:3] for r in records[:len(self._staged)]] != self._staged:
                self.abort()
                return None
            pieces, end = _lay_out(records[len(self._staged):], self.folder, self._out.length,
                                   {}, self._central)
            pieces.append(_zip_end(self._central, end))
            if progress is not None:
                copied.total = self._out.length + sum(_piece_size(p) for p in pieces)
                copied.add(self._out.length - copied.done)
                self._report = copied.add
            for piece in pieces:
                self._out.add(piece)
            size = self._out.length
        except BaseException:
            self.abort()
            raise
        try:
            self._stack.close()  # the last block, fsync, rename into place, fsync the folder
        except OSError as e:
            raise CkptToolError(f"{self.out_path}: cannot write the checkpoint "
                                f"({e.strerror or e}); nothing was written") from None
        copied = {s: k for k, s in storages.order if isinstance(s, str)}
        return WrittenCheckpoint(self.out_path, self.file.kind, size, copied,
                                 tuple(k for k, s in storages.order if not isinstance(s, str)),
                                 tuple(k for k in self.file.storage_spans if k not in copied))

    def abort(self) -> None:
        """Stop and remove the partial output (the target path is untouched)."""
        self._cancelled.set()
        self._thread.join()
        try:
            raise _Aborted()
        except _Aborted:
            self._stack.__exit__(*sys.exc_info())


class _Aborted(Exception):
    """Raised into the atomic output's context to make it discard the temporary file."""


def _serialization_id(records: list[tuple[str, int, int, Any]]) -> bytes:
    """40 digits naming the file's contents, as torch writes one: here a hash of the record
    names, sizes and CRCs (torch.load only logs it)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, size, crc, _ in records:
        digest.update(f"{name}\0{size}\0{crc}\0".encode())
    high, low = struct.unpack("<QQ", digest.digest())
    return f"{high:020d}{low:020d}".encode()


# --- the legacy layout -----------------------------------------------------------------------


def _legacy_pieces(file: TorchFile, storages: _Storages, data_pkl: bytes) -> list:
    """magic, protocol and system-info pickles as the input has them, the object, the sorted
    storage keys, then per storage an int64 element count and its bytes (little-endian, always:
    torch's legacy writer converts on big-endian machines)."""
    spans: dict[str, tuple[int, int]] = {}
    with open(file.path, "rb") as f:

        def load(what: str) -> Any:
            try:
                return SafeUnpickler(f, legacy=True).load()
            except Exception:  # the unpickler raises many types on damaged data
                raise InputError(f"{file.path}: the legacy file's {what} is damaged") from None

        for what in ("magic number", "protocol version", "system info"):
            load(what)
        header_size = f.tell()
        # The records are sized by the storage types the file's own pickle names: the tree
        # passed in may have been edited, and may no longer name a storage it drops.
        types = {key: ref.storage_type for key, ref in _collect_storages(load("object")).items()}
        in_keys = load("storage list")
        offset = f.tell()
        for key in map(str, in_keys if isinstance(in_keys, list) else ()):
            f.seek(offset)
            head = f.read(8)
            storage_type = types.get(key, "UntypedStorage").rpartition(".")[2]
            itemsize = DTYPE_ITEMSIZE.get(STORAGE_DTYPES.get(storage_type, "uint8"), 1)
            size = 8 + max(struct.unpack("<q", head)[0], 0) * itemsize if len(head) == 8 else 0
            spans[key] = (offset, size)
            offset += size
        f.seek(0)
        header = f.read(header_size)
    sources = dict(storages.order)
    keys = sorted(sources)  # torch.save writes them sorted, as strings
    pieces: list[Any] = [header, data_pkl, pickle.dumps(keys, protocol=PICKLE_PROTOCOL)]
    for key in keys:
        source = sources[key]
        if isinstance(source, NewTensor):
            count = source.numel if source.dtype in _TYPED_STORAGES else len(source.data)
            pieces.append(struct.pack("<q", count) + source.data)
        elif spans.get(source, (0, 0))[1] and spans[source][0] + spans[source][1] <= file.size:
            pieces.append(_Span(*spans[source]))
        else:
            raise InputError(f"{file.path}: the file ends inside tensor data; it is truncated")
    return pieces
