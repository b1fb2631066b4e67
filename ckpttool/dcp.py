"""torch.distributed.checkpoint (DCP) folders read as one checkpoint (PRODUCT.md section 4).

A DCP folder is a ``.metadata`` pickle plus ``*.distcp`` shards, one or more per rank. Each entry
of the flattened state dict is a complete ``torch.save`` zip at ``(relative_path, offset, length)``
inside a shard: a *bytes* entry holds one non-tensor leaf (a group's ``lr``, a scheduler's
``last_epoch``), a *tensor* entry one chunk of a tensor.

What is read, and when:

- ``.metadata``, with the safe unpickler (nothing is imported or run; its dataclasses arrive as
  :class:`Opaque` records whose state is read as data, and every field is checked: types, sizes,
  chunk bounds, that each entry lies inside its shard, that each shard is a plain file name of
  this folder). A damaged or hostile ``.metadata`` is one :class:`InputError`.
- every bytes entry (small: param groups, scheduler fields), with the safe zip reader over its
  byte range (:func:`ckpttool.serialization.read_checkpoint_range`);
- tensor chunks never at load time. A tensor becomes a :class:`TensorRef` of its full dtype and
  shape, from the metadata. Its bytes are found lazily: asked for them (a scalar such as Adam's
  0-d ``step``, which ``show`` prints, or a diff), the folder reads that one chunk's zip
  directory and pickle and answers with the absolute offset of its data record in the shard.

The tree is rebuilt from ``planner_data`` (flat key -> the original path), never by splitting
keys on dots (FQNs contain dots): ``{"model": {...}, "optim": {"state": ..., "param_groups":
[...]}, "scheduler": {...}}``, list items (int path components) as lists in index order. DCP
writes every dict key as ``str(key)``; where torch's own structures have int keys this is
undone: a scheduler's ``milestones`` (a Counter) and a raw ``optimizer.state_dict()``'s
``state`` keyed by param ids (when the groups' ``params`` are ints). FQN-keyed states stay
strings. DCP drops empty dicts altogether: a list item with no entries comes back as ``{}``, and
an optimizer state without ``state`` (never stepped) gets its empty ``state`` back.

Sharded tensors (several chunks, e.g. FSDP): the tree holds ONE TensorRef of the full shape, so
``show`` and every path stay what the original state dict had (``model/0.weight``,
``optim/state/0.weight/exp_avg``). That ref's storage cannot be located as one byte run;
:meth:`DCPDir.tensor_chunks` gives its chunks instead, each ``(offsets, TensorRef of the
chunk)`` with a locatable storage of its own, and the diff compares two tensors over the
overlaps of their chunk grids (chunk by chunk when both sides were saved the same way).
A tensor of a single chunk covering it whole is located directly, like a tensor of a file.

Example:
    >>> ckpt = read_dcp("fixtures/dirs/dcp/two_ranks")                   # doctest: +SKIP
    >>> ckpt.root["optim"]["param_groups"][1]["lr"]                      # doctest: +SKIP
    0.00025
    >>> ckpt.root["scheduler"]["milestones"]                             # doctest: +SKIP
    Counter({6: 2, 3: 1})
"""

from __future__ import annotations

import io
import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckpttool.directories import DCP_METADATA, CheckpointDir
from ckpttool.errors import InputError, UnsafeCheckpointError
from ckpttool.schedulers import looks_like_scheduler
from ckpttool.serialization import (
    DTYPE_ITEMSIZE,
    DType,
    Opaque,
    SafeUnpickler,
    StorageRef,
    TensorRef,
    TorchFile,
    _unpickled,
    contiguous_stride,
    is_dangerous_global,
    join_location,
    opaque_class,
    read_checkpoint_range,
    trusted_calls,
    walk,
)

SHARD_SUFFIX = ".distcp"
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_META = _METADATA_MODULE + "."
_STORAGE_INFO = "torch.distributed.checkpoint.filesystem._StorageInfo"

# Limits that only a damaged or hostile folder reaches. A bytes entry is one pickled leaf (a
# float is 1261 bytes); the metadata of a large FSDP run is tens of MB.
MAX_METADATA_BYTES = 1 << 30
MAX_ENTRIES = 5_000_000  # state_dict_metadata entries
MAX_CHUNKS = 20_000_000  # tensor chunks, all tensors together
MAX_BYTES_ENTRY = 64 << 20  # one bytes entry
MAX_BYTES_ENTRIES = 1_000_000
MAX_BYTES_TOTAL = 1 << 30  # all bytes entries together
MAX_LIST_LENGTH = 1 << 20  # a list rebuilt from int path components
# Items of such a list with no entry (DCP writes none for an empty dict) beyond one per item
# that has entries: a single entry at index 1,000,000 would otherwise make a million of them.
MAX_LIST_GAPS = 1024
MAX_PATH_PARTS = 100  # keys and indices in one entry's path (a state dict is a few deep)
# Chunks per tensor up to which they are checked pairwise for overlaps (DCP's own save-time
# check is pairwise too); beyond, only their volumes are summed.
_PAIRWISE_CHUNKS = 1024


@dataclass
class DCPDir(CheckpointDir):
    """A DCP folder read safely (see the module docstring): ``root`` is the original state
    dict's tree, ``members`` the bytes entries read, by location (``optim/param_groups/0/lr``),
    and :meth:`tensor_chunks` the chunks of each sharded tensor.
    """

    chunks: dict[int, tuple[tuple[tuple[int, ...], TensorRef], ...]] = field(
        default_factory=dict, repr=False)
    version: str | None = None  # the .metadata's format version ("1.0.0")
    # flat key -> (its path, where it is stored: a StoredEntry for a bytes entry, a
    # StoredTensor for a tensor), in stored order: what a writer re-emits (ckpttool.dcp_write)
    entries: dict[str, tuple[tuple, Any]] = field(default_factory=dict, repr=False)

    def tensor_chunks(self, ref: TensorRef) -> tuple[tuple[tuple[int, ...], TensorRef], ...] | None:
        """``((offsets, chunk), ...)`` for a tensor saved in several chunks, None for one
        whose bytes :meth:`locate` finds directly. ``chunk`` is a contiguous TensorRef of the
        chunk's shape whose storage this folder locates."""
        if ref.storage is None:
            return None
        return self.chunks.get(id(ref.storage))


def read_dcp(path: str | os.PathLike) -> DCPDir:
    """Read a torch.distributed.checkpoint folder safely: ``.metadata`` and the bytes entries,
    no tensor data.

    Raises:
        InputError: the folder, its ``.metadata`` or an entry it names is missing, damaged or
            not what torch.distributed.checkpoint writes.
    """
    path = os.fspath(path)
    meta_path = os.path.join(path, DCP_METADATA)
    meta, meta_globals = _read_metadata(meta_path)
    reader = _Reader(path, meta_path)
    tree, members = reader.build(meta)
    names = sorted(os.listdir(path))
    used = {DCP_METADATA, *reader.sizes}
    size = os.path.getsize(meta_path) + sum(reader.sizes.values())  # (each shard's, once)
    globals_seen = list(dict.fromkeys(meta_globals + [g for m in members.values()
                                                      for g in m.globals_seen]))
    version = meta.get("version")
    return DCPDir(path, "dcp", tree, members, globals_seen, size,
                  tuple(n for n in names if n not in used), "little", reader.owners,
                  reader.chunks, version if isinstance(version, str) else None,
                  reader.entries)


# --- .metadata ---------------------------------------------------------------------------------


class _MetadataIndex(opaque_class(_METADATA_MODULE, "MetadataIndex")):
    """The opaque record of a ``MetadataIndex`` (the keys of ``storage_data``), hashed by its
    fqn and offset.

    Every MetadataIndex has the same state keys, and an opaque value's hash only looks at
    those: a dict of n of them would cost n**2 comparisons to build (minutes for a large FSDP
    run). Equal records have equal fqn and offset, so this hash agrees with equality.
    """

    __slots__ = ()

    def __hash__(self) -> int:
        state = self.state
        if not isinstance(state, dict):
            return super().__hash__()
        fqn = state.get("fqn")
        offset = state.get("offset")
        key = (fqn if isinstance(fqn, str) else None, offset if isinstance(offset, tuple) else None)
        try:
            return hash(key)
        except TypeError:  # an offset tuple holding unhashable values: damaged, refused later
            return hash(key[0])


class _MetadataUnpickler(SafeUnpickler):
    """The safe unpickler, with ``MetadataIndex`` records hashed by content."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == (_METADATA_MODULE, "MetadataIndex"):
            self.globals_seen.append(f"{module}.{name}")
            return _MetadataIndex
        return super().find_class(module, name)


def _read_metadata(meta_path: str) -> tuple[dict, list[str]]:
    """The state of the ``Metadata`` record in ``.metadata`` and the globals its pickle names."""
    try:
        size = os.path.getsize(meta_path)
        if size > MAX_METADATA_BYTES:
            raise InputError(f"{meta_path}: a {size >> 20} MB .metadata is more than ckpttool "
                             "reads; it is damaged or not a DCP checkpoint")
        with open(meta_path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"{meta_path}: cannot read: {e.strerror or e}") from None
    if not data:
        raise InputError(f"{meta_path}: the .metadata is empty (0 bytes); was the save "
                         "interrupted?")
    unpickler = _MetadataUnpickler(io.BytesIO(data))
    root = _unpickled(meta_path, unpickler, ".metadata pickle")
    named = next((g for g in unpickler.globals_seen if is_dangerous_global(g)), None)
    if named is not None and trusted_calls() is None:  # (trusted: inspection reports it)
        # torch.distributed.checkpoint reads .metadata with a plain pickle.load.
        raise UnsafeCheckpointError(
            f"{meta_path}: the pickle calls {named}, which would run code when "
            "torch.distributed.checkpoint loads this folder; nothing was executed. Do not load "
            "it")
    state = _record(root, "Metadata", "the .metadata", meta_path)
    return state, unpickler.globals_seen


def _bad(meta_path: str, detail: str) -> InputError:
    return InputError(f"{meta_path}: {detail}; the .metadata is damaged or was not written by "
                      "torch.distributed.checkpoint")


def _record(value: Any, name: str, what: str, meta_path: str) -> dict:
    """The state of an opaque ``torch.distributed.checkpoint`` dataclass record, as a dict."""
    dotted = name if "." in name else _META + name
    if not isinstance(value, Opaque) or value.dotted != dotted:
        raise _bad(meta_path, f"{what} is {_brief(value)}, not a {dotted.rsplit('.', 1)[-1]}")
    if value.args or value.kwargs or value.items or value.dictitems:
        raise _bad(meta_path, f"{what} is built with arguments, which DCP never writes")
    state = value.state
    if state is None:
        return {}
    if isinstance(state, tuple) and len(state) == 2 and state[0] is None \
            and isinstance(state[1], dict):  # (None, slots) as __reduce_ex__ writes for slots
        state = state[1]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise _bad(meta_path, f"{what} holds {_brief(state)} as its fields")
    return state


def _brief(value: Any) -> str:
    """``a dict``, ``an int``, ``a torch.distributed.checkpoint.metadata.Metadata``."""
    name = value.dotted if isinstance(value, Opaque) else type(value).__name__
    return f"{'an' if name[:1] in 'aeiouAEIOU' else 'a'} {name}"


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ints(value: Any, n: int | None = None) -> tuple[int, ...] | None:
    """A tuple of non-negative ints (a torch.Size as the safe reader gives it), or None."""
    if isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, tuple) or not all(_int(v) and v >= 0 for v in value):
        return None
    if n is not None and len(value) != n:
        return None
    return value


# --- the folder --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """Where one stored entry lies: a shard of the folder, and its byte range there."""

    shard: str  # the file name
    offset: int
    length: int


StoredEntry = _Entry  # its public name (DCPDir.entries)


@dataclass(frozen=True)
class StoredTensor:
    """A tensor entry of ``.metadata`` as read and checked: its dtype and size, its
    TensorProperties state as stored (read as data), and each chunk ``(offsets, sizes, where)``
    in stored order, empty chunks included."""

    dtype: str
    size: tuple[int, ...]
    properties: Any
    chunks: tuple[tuple[tuple[int, ...], tuple[int, ...], StoredEntry], ...]


_PENDING = object()


class _Reader:
    """Checks the metadata against the folder and builds the tree."""

    def __init__(self, folder: str, meta_path: str):
        self.folder = folder
        self.meta_path = meta_path
        self.sizes: dict[str, int] = {}  # shard name -> size, for each shard the metadata names
        self.owners: dict[int, Any] = {}  # id(storage) -> what locates its bytes
        self.chunks: dict[int, tuple] = {}
        self.entries: dict[str, tuple[tuple, Any]] = {}  # DCPDir.entries

    def bad(self, detail: str) -> InputError:
        return _bad(self.meta_path, detail)

    def build(self, meta: dict) -> tuple[dict, dict[str, TorchFile]]:
        entries = meta.get("state_dict_metadata")
        if not isinstance(entries, dict) or not all(isinstance(k, str) for k in entries):
            raise self.bad(f"its state_dict_metadata is {_brief(entries)}, not a dict of keys")
        if len(entries) > MAX_ENTRIES:
            raise self.bad(f"it lists {len(entries):,} entries, more than ckpttool reads")
        paths = self.paths(meta.get("planner_data"), entries)
        storage = self.storage(meta.get("storage_data"))
        items: list[tuple[tuple, Any]] = []  # (path, leaf); _PENDING: a bytes entry
        members: dict[str, TorchFile] = {}
        bytes_entries: list[tuple[tuple, _Entry]] = []
        n_chunks = 0
        for key, path in paths.items():
            record = entries[key]
            what = f"the entry {key[:80]!r}"
            if isinstance(record, Opaque) and record.dotted == _META + "BytesStorageMetadata":
                if _record(record, "BytesStorageMetadata", what, self.meta_path):
                    raise self.bad(f"{what} is a BytesStorageMetadata with fields")
                entry = storage.get((key, None))
                if entry is None:
                    raise self.bad(f"{what} has no stored bytes in storage_data")
                bytes_entries.append((path, entry))
                items.append((path, _PENDING))  # its value once read, below
                self.entries[key] = (path, entry)
            else:
                ref, n = self.tensor(key, _record(record, "TensorStorageMetadata", what,
                                                  self.meta_path), storage, path)
                n_chunks += n
                if n_chunks > MAX_CHUNKS:
                    raise self.bad(f"it lists more than {MAX_CHUNKS:,} tensor chunks")
                items.append((path, ref))
        blobs = self.read_bytes(bytes_entries)
        filled = iter(blobs)
        items = [(p, next(filled).root if v is _PENDING else v) for p, v in items]
        for (path, _), blob in zip(bytes_entries, blobs):
            members[join_location(path)] = blob
            for _, value in walk(blob.root):
                if isinstance(value, TensorRef) and value.storage is not None:
                    self.owners[id(value.storage)] = blob
        return _tree(items, self.bad), members

    # --- metadata fields ---

    def paths(self, planner: Any, entries: dict) -> dict[str, tuple]:
        """Each entry's path in the original state dict, in the order the state dict had.

        ``planner_data`` maps flat keys to path tuples (str dict keys, int list indices);
        a key it lacks (a checkpoint saved without flattening) is a top-level key.
        """
        if planner is None:
            planner = {}
        if not isinstance(planner, dict):
            raise self.bad(f"its planner_data is {_brief(planner)}, not a dict of paths")
        out: dict[str, tuple] = {}
        for key in [*[k for k in planner if k in entries], *entries]:
            if key in out:
                continue
            path = planner.get(key, (key,))
            if isinstance(path, list):
                path = tuple(path)
            if (not isinstance(path, tuple) or not path or len(path) > MAX_PATH_PARTS
                    or not all(isinstance(p, str) or (_int(p) and p >= 0) for p in path)
                    or not isinstance(path[0], str)):
                raise self.bad(f"planner_data gives the entry {key[:80]!r} a path that is not a "
                               "tuple of dict keys and list indices")
            out[key] = path
        return out

    def storage(self, data: Any) -> dict[tuple[str, tuple | None], _Entry]:
        """storage_data as ``{(fqn, chunk offsets or None): entry}``, each entry checked
        against its shard."""
        if not isinstance(data, dict):
            raise self.bad(f"its storage_data is {_brief(data)}, not a dict")
        out: dict[tuple[str, tuple | None], _Entry] = {}
        for index, info in data.items():
            where = "a storage_data key"
            key = _record(index, "MetadataIndex", where, self.meta_path)
            fqn, offset = key.get("fqn"), key.get("offset")
            if not isinstance(fqn, str):
                raise self.bad(f"{where} names {_brief(fqn)}, not an entry")
            where = f"the storage of {fqn[:80]!r}"
            if offset is not None:
                offset = _ints(offset)
                if offset is None:
                    raise self.bad(f"{where} has a chunk offset that is not a tuple of ints")
            if not (key.get("index") is None or _int(key.get("index"))):
                raise self.bad(f"{where} has a chunk index that is not an int")
            fields = _record(info, _STORAGE_INFO, where, self.meta_path)
            out_key = (fqn, offset)
            if out_key in out:
                raise self.bad(f"{where} is listed twice")
            out[out_key] = self.entry(fields, where)
        return out

    def entry(self, fields: dict, where: str) -> _Entry:
        name, offset, length = (fields.get(k) for k in ("relative_path", "offset", "length"))
        unknown = set(fields) - {"relative_path", "offset", "length", "transform_descriptors"}
        if unknown:
            raise self.bad(f"{where} has fields DCP does not write ({', '.join(sorted(unknown))})")
        if fields.get("transform_descriptors"):
            raise InputError(f"{self.meta_path}: {where} is stored through DCP extensions "
                             f"({_brief(fields['transform_descriptors'])}, e.g. compression), "
                             "which ckpttool does not read")
        if not isinstance(name, str) or not _plain_name(name):
            shown = repr(name[:80]) if isinstance(name, str) else _brief(name)
            raise self.bad(f"{where} lies in {shown}, which is not a file name inside the "
                           "checkpoint folder")
        if name == DCP_METADATA:  # (a rewrite makes a new .metadata: the entry would be lost)
            raise self.bad(f"{where} lies in {DCP_METADATA} itself, where "
                           "torch.distributed.checkpoint stores no entry")
        if not (_int(offset) and _int(length) and offset >= 0 and length >= 0):
            raise self.bad(f"{where} has an offset or length that is not a non-negative int")
        size = self.sizes.get(name)
        if size is None:
            full = os.path.join(self.folder, name)
            if not os.path.isfile(full):
                raise InputError(f"{full}: missing; {DCP_METADATA} stores entries in it (an "
                                 "incomplete copy of the checkpoint?)")
            size = self.sizes[name] = os.path.getsize(full)
        if offset + length > size:
            raise InputError(f"{os.path.join(self.folder, name)}: {DCP_METADATA} puts "
                             f"{where} at bytes {offset}-{offset + length}, past the end of "
                             f"the {size}-byte file: it is truncated, or the metadata is "
                             "damaged")
        return _Entry(name, offset, length)

    def tensor(self, key: str, fields: dict,
               storage: dict[tuple[str, tuple | None], _Entry],
               path: tuple = ()) -> tuple[TensorRef, int]:
        """The tree's TensorRef for a tensor entry (its chunks registered, the entry recorded
        in ``entries`` under ``path``), and its chunk count."""
        what = f"the tensor {key[:80]!r}"
        size = _ints(fields.get("size"))
        chunks = fields.get("chunks")
        if size is None or len(size) > 64:
            raise self.bad(f"{what} has a size that is not a tuple of ints")
        if not isinstance(chunks, list):
            raise self.bad(f"{what} has {_brief(chunks)} as its chunks, not a list")
        dtype = self.dtype(fields.get("properties"), what)
        itemsize = DTYPE_ITEMSIZE[dtype]
        numel = math.prod(size)
        if numel * itemsize > 1 << 62:
            raise self.bad(f"{what} is larger than any file")
        boxes: list[tuple[tuple[int, ...], tuple[int, ...], _Entry]] = []
        stored: list[tuple[tuple[int, ...], tuple[int, ...], _Entry]] = []
        volume = 0
        for i, chunk in enumerate(chunks):
            c = _record(chunk, "ChunkStorageMetadata", f"chunk {i} of {what}", self.meta_path)
            offsets, sizes = _ints(c.get("offsets"), len(size)), _ints(c.get("sizes"), len(size))
            if offsets is None or sizes is None or any(
                    o + s > n for o, s, n in zip(offsets, sizes, size)):
                raise self.bad(f"chunk {i} of {what} does not lie inside its size "
                               f"{list(size)}")
            entry = storage.get((key, offsets))
            if entry is None:
                raise self.bad(f"chunk {i} of {what} has no stored bytes in storage_data")
            n = math.prod(sizes)
            if n * itemsize > entry.length:
                raise self.bad(f"chunk {i} of {what} holds {n * itemsize} bytes of data in a "
                               f"{entry.length}-byte entry")
            volume += n
            stored.append((offsets, sizes, entry))
            if n:
                boxes.append((offsets, sizes, entry))
        if volume != numel or (len(boxes) <= _PAIRWISE_CHUNKS and _overlap(boxes)):
            raise self.bad(f"the chunks of {what} do not cover it exactly once")
        self.entries[key] = (path, StoredTensor(dtype, size, fields["properties"].state,
                                                tuple(stored)))
        ref = TensorRef(dtype, size, contiguous_stride(size), 0,
                        StorageRef("tensor:" + key, dtype, "cpu", numel, "dcp"))
        if len(boxes) == 1 or numel == 0:
            # One chunk holds it all (or there is nothing to hold): located directly.
            entry = boxes[0][2] if boxes else None
            self.owners[id(ref.storage)] = _Chunk(self.folder, entry, dtype, size, what)
            return ref, len(chunks)
        self.owners[id(ref.storage)] = _Sharded(what, len(boxes))
        pieces = []
        for i, (offsets, sizes, entry) in enumerate(boxes):
            piece = TensorRef(dtype, sizes, contiguous_stride(sizes), 0,
                              StorageRef(f"chunk:{i}:{key}", dtype, "cpu", math.prod(sizes),
                                         "dcp"))
            self.owners[id(piece.storage)] = _Chunk(self.folder, entry, dtype, sizes,
                                                    f"chunk {i} of {what}")
            pieces.append((offsets, piece))
        self.chunks[id(ref.storage)] = tuple(pieces)
        return ref, len(chunks)

    def dtype(self, properties: Any, what: str) -> str:
        """The dtype name from TensorProperties (its state is a tuple led by the dtype; older
        torch pickled a dict of fields)."""
        state = properties.state if isinstance(properties, Opaque) and \
            properties.dotted == _META + "TensorProperties" else None
        dtype = state[0] if isinstance(state, tuple) and state else (
            state.get("dtype") if isinstance(state, dict) else None)
        if not isinstance(dtype, DType) or dtype.name not in DTYPE_ITEMSIZE:
            raise self.bad(f"{what} has no dtype ckpttool knows in its properties "
                           f"({_brief(dtype)})")
        return dtype.name

    # --- bytes entries ---

    def read_bytes(self, entries: list[tuple[tuple, _Entry]]) -> list[TorchFile]:
        """Each bytes entry read with the safe zip reader over its byte range (its value is
        the root)."""
        if len(entries) > MAX_BYTES_ENTRIES:
            raise self.bad(f"it lists {len(entries):,} non-tensor entries, more than ckpttool "
                           "reads")
        total = 0
        blobs: list[TorchFile] = []
        for path, entry in entries:
            if entry.length > MAX_BYTES_ENTRY:
                raise InputError(f"{self.meta_path}: the entry {join_location(path)[:80]!r} "
                                 f"is {entry.length >> 20} MB, more than ckpttool reads for "
                                 "one non-tensor value")
            total += entry.length
            if total > MAX_BYTES_TOTAL:
                raise InputError(f"{self.meta_path}: its non-tensor entries hold more than "
                                 f"{MAX_BYTES_TOTAL >> 20} MB, more than ckpttool reads")
            blobs.append(read_checkpoint_range(os.path.join(self.folder, entry.shard),
                                               entry.offset, entry.length))
        return blobs


def _plain_name(name: str) -> bool:
    """A file name that stays inside the folder: no separator, no parent, not absolute."""
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    return (bool(name) and name not in (".", "..") and "\0" not in name
            and not any(s in name for s in seps) and not os.path.isabs(name)
            and ":" not in name[1:2])


def _overlap(boxes: list[tuple[tuple, tuple, Any]]) -> bool:
    for i, (oa, sa, _) in enumerate(boxes):
        for ob, sb, _ in boxes[i + 1:]:
            if all(a < b + m and b < a + n for a, n, b, m in zip(oa, sa, ob, sb)):
                return True
    return False


# --- locating tensor bytes ---------------------------------------------------------------------


class _Chunk:
    """One tensor chunk entry: a torch.save zip in a shard, read only when its bytes are asked
    for (its zip directory and pickle, once), answering like a :class:`TorchFile`."""

    byteorder = "little"

    def __init__(self, folder: str, entry: _Entry | None, dtype: str, shape: tuple[int, ...],
                 what: str):
        self.path = os.path.join(folder, entry.shard) if entry else folder
        self.entry = entry
        self.dtype = dtype
        self.shape = shape
        self.what = what
        self._blob: tuple[TorchFile, TensorRef] | None = None

    def _load(self) -> tuple[TorchFile, TensorRef]:
        if self._blob is None:
            entry = self.entry
            blob = read_checkpoint_range(self.path, entry.offset, entry.length)
            t = blob.root
            if not isinstance(t, TensorRef) or t.storage is None:
                raise InputError(f"{self.path}: the entry of {self.what} at byte {entry.offset} "
                                 f"holds {_brief(t)}, not a tensor")
            if t.dtype != self.dtype or t.shape != self.shape:
                raise InputError(f"{self.path}: the entry of {self.what} at byte {entry.offset} "
                                 f"holds a {t.dtype} tensor of shape {list(t.shape)}; the "
                                 f".metadata says {self.dtype} {list(self.shape)}")
            if not t.is_contiguous or blob.byteorder != "little":
                raise InputError(f"{self.path}: the entry of {self.what} is stored "
                                 f"{'as a strided view' if not t.is_contiguous else 'big-endian'}"
                                 ", which torch.distributed.checkpoint never writes")
            self._blob = (blob, t)
        return self._blob

    def locate(self, storage: StorageRef, start: int = 0,
               length: int | None = None) -> tuple[str, int, int]:
        """(shard path, absolute offset, length) of the chunk's bytes ``[start, start+length)``."""
        nbytes = storage.nbytes
        length = nbytes - start if length is None else length
        if start < 0 or length < 0 or start + length > nbytes:
            raise InputError(f"{self.path}: a read past the end of {self.what}")
        if self.entry is None or nbytes == 0:
            return self.path, 0, 0
        blob, t = self._load()
        return blob.locate(t.storage, t.storage_offset * t.itemsize + start, length)

    # The readers of a TorchFile, over this locate.
    read_storage = TorchFile.read_storage
    tensor_bytes = TorchFile.tensor_bytes
    scalar = TorchFile.scalar


class _Sharded:
    """The full tensor of several chunks: its bytes are no one run; readers take its chunks
    (:meth:`DCPDir.tensor_chunks`)."""

    byteorder = "little"

    def __init__(self, what: str, n: int):
        self.what, self.n = what, n

    def locate(self, storage: StorageRef, start: int = 0,
               length: int | None = None) -> tuple[str, int, int]:
        raise InputError(f"{self.what} is saved in {self.n} chunks (a sharded tensor); its "
                         "bytes are read chunk by chunk")

    read_storage = TorchFile.read_storage
    tensor_bytes = TorchFile.tensor_bytes
    scalar = TorchFile.scalar


# --- the tree ----------------------------------------------------------------------------------


class _Node(dict):
    """A container the tree builder made (as opposed to a leaf value that is a dict)."""


def _tree(items: list[tuple[tuple, Any]], bad: Any) -> dict:
    """The nested state dict from (path, leaf) pairs: str components are dict keys, int ones
    list indices."""
    root = _Node()
    for path, leaf in items:
        node = root
        for comp in path[:-1]:
            child = node.get(comp)
            if child is None and comp not in node:
                child = node[comp] = _Node()
            elif not isinstance(child, _Node):
                raise bad(f"two entries share the path {join_location(path)[:80]!r} (one "
                          "inside the other)")
            node = child
        if path[-1] in node:
            raise bad(f"two entries share the path {join_location(path)[:80]!r}")
        node[path[-1]] = leaf
    return _finish(root, bad, top=True)


def _finish(node: _Node, bad: Any, top: bool = False) -> Any:
    """A builder node as a dict, or a list when its keys are list indices; torch's int keys
    restored (see :func:`_torch_keys`)."""
    kinds = {type(k) for k in node}
    if len(kinds) > 1:
        raise bad("a container has both dict keys and list indices in planner_data")
    values = {k: _finish(v, bad) if isinstance(v, _Node) else v for k, v in node.items()}
    if kinds == {int} and not top:
        n = max(values) + 1
        if n > MAX_LIST_LENGTH:
            raise bad(f"planner_data gives a list index of {n - 1:,}")
        if n - len(values) > max(MAX_LIST_GAPS, len(values)):
            raise bad(f"planner_data gives a list index of {n - 1:,} with entries for only "
                      f"{len(values):,} of its items")
        # DCP writes nothing for an empty dict: a list item without entries was one.
        return [values.get(i, {}) for i in range(n)]
    return _torch_keys(values)


def _torch_keys(d: dict) -> dict:
    """Undo DCP's ``str(key)`` where torch's own structures have int keys: a raw optimizer
    state keyed by param ids (the groups' ``params`` are ints) and MultiStepLR's ``milestones``
    Counter. An optimizer state that lost its empty ``state`` gets it back."""
    groups = d.get("param_groups")
    if isinstance(groups, list) and groups and all(
            isinstance(g, Mapping) and "params" in g for g in groups):
        if "state" not in d:
            d = {"state": {}, **d}
        state = d["state"]
        lists = [g["params"] for g in groups]
        if (isinstance(state, dict) and state
                and all(isinstance(p, (list, tuple)) for p in lists)
                and all(_int(p) for params in lists for p in params)
                and all(isinstance(k, str) and _int_text(k) for k in state)):
            d["state"] = {int(k): v for k, v in state.items()}
    milestones = d.get("milestones")
    if (looks_like_scheduler(d) and isinstance(milestones, dict) and milestones
            and all(isinstance(k, str) and _int_text(k) for k in milestones)):
        d["milestones"] = Counter({int(k): v for k, v in milestones.items()})
    return d


def _int_text(text: str) -> bool:
    """The decimal text of an int as ``str(int)`` writes it (no sign but '-', no leading 0)."""
    digits = text.removeprefix("-")
    return (0 < len(digits) <= 30 and digits.isascii() and digits.isdigit()
            and (digits == "0" or digits[0] != "0") and text != "-0")
