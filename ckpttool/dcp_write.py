"""Write a rewritten torch.distributed.checkpoint (DCP) folder: the output of ``reschedule`` on
a DCP checkpoint (PRODUCT.md section 4, issue #5).

:func:`write_dcp` takes the folder as read (:class:`ckpttool.dcp.DCPDir`) and the new tree (the
same shape, with the optimizer's ``param_groups`` and the scheduler state replaced; every
unchanged value is the *same object* as in the source tree) and fills a new folder:

- **every shard copied byte for byte** (``*.distcp`` and any other file of the folder; never a
  link; fsynced): tensor data is never read, let alone unpickled. Only shards that an earlier
  rewrite made (``__ckpttool_<n>.distcp``) and that no entry refers to any more are left out.
- **one new small shard**, ``__ckpttool_<n>.distcp`` (``n`` the first number no file of the
  folder uses), holding the entries whose value changed: each is what ``dcp.save`` writes for
  it, the ``torch.save`` of the value (a torch zip), one after another, non-tensor entries first;
  a changed tensor (a re-stepped tensor lr) as a CPU tensor of its own, as DCP stores every
  tensor chunk.
- **a new ``.metadata``**, pointing at the new shard for the changed entries and at the copied
  shards for the rest.

The new tree is flattened exactly as ``dcp.save`` flattens a state dict
(``torch.distributed.checkpoint._traverse.traverse_state_dict``): dict keys become ``str(key)``,
lists are indexed only when they hold tensors or non-empty containers, tuples are leaves, empty
dicts vanish. So a MultiStepLR ``milestones`` Counter is stored as ``scheduler.milestones.3`` etc.
(str keys in the flat key and the planner path, the counts as values), as dcp.save stores it,
and reads back as the int-keyed Counter it was (:mod:`ckpttool.dcp`); a loader sees what it
would see for a checkpoint dcp.save wrote. An entry is kept (its stored bytes referred to where
they lie) when its value is the source's object at the same key, or the same plain scalar (same
type and bits); a tensor when it is the source's tensor, wherever it now sits.

How the ``.metadata`` is made: the input's ``.metadata`` is never unpickled by pickle or torch.
:mod:`ckpttool.dcp` read it with the safe unpickler and checked every field
(:attr:`DCPDir.entries` keeps each entry's path, properties, chunks and byte ranges); from these
validated plain values this module builds real ``torch.distributed.checkpoint.metadata``
dataclasses (``Metadata``, ``TensorStorageMetadata``, ``TensorProperties``,
``ChunkStorageMetadata``, ``BytesStorageMetadata``, ``MetadataIndex``, ``StorageMeta``,
``_StorageInfo``) and pickles them as ``FileSystemWriter.finish`` does. Only values built here
reach that pickle. ``storage_meta`` is that of a new save (a new ``save_id``; no
``checkpoint_id``, which DCP sets to the path a save was given and the final name is not known
here); ``version`` is the source's (the copied entries are in its format).

Example:
    >>> from ckpttool.dcp import read_dcp
    >>> src = read_dcp("fixtures/dirs/dcp/single")                          # doctest: +SKIP
    >>> root = {**src.root, "scheduler": new_scheduler_state}               # doctest: +SKIP
    >>> write_dcp(src, root, "out/.single.pending")                          # doctest: +SKIP
"""

from __future__ import annotations

import io
import os
import re
import struct
import sys
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ckpttool.dcp import DCPDir, StoredEntry, StoredTensor
from ckpttool.directories import DCP_METADATA
from ckpttool.errors import CkptToolError, InputError, StateError
from ckpttool.folder_output import (
    check_links,
    copy_tree,
    finish_progress,
    make_pending,
    member_mode,
    new_file,
    remove_tree,
    size_of,
)
from ckpttool.serialization import (
    CopyProgress,
    Device,
    DType,
    NewTensor,
    Opaque,
    TensorRef,
    _is_torch_tensor,
    fsync_folder,
    join_location,
    load_tensor,
)

# The shard a rewrite adds (n: the first number no file of the source folder uses), and how
# such a shard is recognised when a later rewrite no longer needs it.
NEW_SHARD = "__ckpttool_{}.distcp"
_NEW_SHARD = re.compile(r"__ckpttool_\d+\.distcp")
# TensorProperties' memory-format codes (torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING)
_MEMORY_FORMATS = ("contiguous_format", "channels_last", "preserve_format")
_SCALARS = (bool, int, float, complex, str, bytes, type(None))


@dataclass(frozen=True)
class _Kept:
    """An entry whose stored bytes stay where they are: a StoredEntry or StoredTensor."""

    where: StoredEntry | StoredTensor


@dataclass(frozen=True)
class _New:
    """An entry written into the new shard: the value as torch.save gets it."""

    value: Any
    tensor: bool


@dataclass(frozen=True)
class DCPChanges:
    """What :func:`write_dcp` makes of a DCP folder for a new tree, known before writing.

    Attributes:
        written: the flat keys whose entries are stored anew, in the new shard.
        removed: the flat keys of the source that the new tree no longer has.
        shard: the new shard's name (:data:`NEW_SHARD`), None when no entry is stored anew.
        copied: the files and folders of the source copied byte for byte, ``.metadata`` aside.
        left_out: shards an earlier rewrite added that no entry refers to any more.
    """

    written: tuple[str, ...]
    removed: tuple[str, ...]
    shard: str | None
    copied: tuple[str, ...]
    left_out: tuple[str, ...]


def plan_changes(source: DCPDir, root: Mapping) -> DCPChanges:
    """What writing ``root`` (``source.root`` rewritten) as a DCP folder changes, decided by the
    rules :func:`write_dcp` follows (flattened as dcp.save flattens; an entry kept where its
    value is the source's), without writing or importing torch.

    Raises:
        StateError: ``root`` is not a dict, or two of its entries flatten to one key.

    Example:
        >>> src = read_dcp("fixtures/dirs/dcp/single")                      # doctest: +SKIP
        >>> plan_changes(src, {**src.root, "scheduler": new_state}).shard   # doctest: +SKIP
        '__ckpttool_0.distcp'
    """
    return _layout(source, root)[1]


def _layout(source: DCPDir, root: Mapping) -> tuple[dict[str, tuple[tuple, _Kept | _New]],
                                                     DCPChanges]:
    """The entries of the new folder (:func:`_plan`) and its :class:`DCPChanges`."""
    if not isinstance(root, Mapping):
        raise StateError(f"a DCP checkpoint's state is a dict, not a {type(root).__name__}")
    entries = _plan(source, root)
    names = sorted(os.listdir(source.path))
    used = {w.shard for e in entries.values() if isinstance(e[1], _Kept)
            for w in _storages(e[1].where)}
    written = tuple(k for k, (_, e) in entries.items() if isinstance(e, _New))
    ours = [n for n in names if _NEW_SHARD.fullmatch(n) and n not in used]
    return entries, DCPChanges(
        written, tuple(k for k in source.entries if k not in entries),
        _new_shard_name(names) if written else None,
        tuple(n for n in names if n != DCP_METADATA and n not in ours), tuple(ours))


def write_dcp(source: DCPDir, root: Mapping, pending_dir: str | os.PathLike,
              progress: Callable[[int, int], Any] | None = None) -> None:
    """Write ``root`` (``source.root`` rewritten) as a complete DCP checkpoint in the new folder
    ``pending_dir``, durably: every file of ``source`` copied byte for byte, the changed entries
    in one new shard, a new ``.metadata`` (see the module docstring and :func:`plan_changes`).

    ``progress(done, total)`` follows the bytes written, copies and new files together, as one
    :class:`ckpttool.serialization.CopyProgress` (at most once per 32 MB, and at the end).
    ``source`` is only read. On failure the folder this call made is removed; an existing
    ``pending_dir`` is refused and left as it is.

    Raises:
        StateError: ``pending_dir`` exists, or a changed value cannot be stored (an opaque
            value, two entries of one flat key).
        InputError: a file of ``source`` cannot be read, or the folder holds a link out of
            itself (:func:`ckpttool.folder_output.check_links`).
        CkptToolError: the folder cannot be written (disk full, permissions).

    Example:
        >>> write_dcp(read_dcp("run/step-100"), plan.root, "run/.step-100.pending")  # doctest: +SKIP
    """
    pending_dir = os.fspath(pending_dir)
    check_links(source.path)
    entries, changes = _layout(source, root)
    shard_bytes, placed = _shard(entries, source, changes.shard) if changes.shard else (b"", {})
    metadata = _metadata(entries, placed, source.version)
    copied = CopyProgress(sum(size_of(os.path.join(source.path, n)) for n in changes.copied)
                          + len(shard_bytes) + len(metadata), progress)
    # The new files replace the source's .metadata: they get its mode, as its copy would.
    mode = member_mode(os.path.join(source.path, DCP_METADATA))
    make_pending(pending_dir, source.path)
    try:
        for name in changes.copied:
            copy_tree(os.path.join(source.path, name), os.path.join(pending_dir, name),
                      copied.add)
        if changes.shard:
            new_file(os.path.join(pending_dir, changes.shard), mode, shard_bytes)
            copied.add(len(shard_bytes))
        new_file(os.path.join(pending_dir, DCP_METADATA), mode, metadata)
        copied.add(len(metadata))
        fsync_folder(pending_dir)
    except OSError as e:
        remove_tree(pending_dir)
        if e.filename and os.path.abspath(os.fspath(e.filename)).startswith(
                os.path.abspath(source.path) + os.sep):
            raise InputError(f"{e.filename}: cannot read: {e.strerror or e}") from None
        raise CkptToolError(f"{pending_dir}: cannot write the checkpoint folder "
                            f"({e.strerror or e}); nothing was written") from None
    except BaseException:
        remove_tree(pending_dir)
        raise
    finish_progress(copied)


def _plan(source: DCPDir, root: Mapping) -> dict[str, tuple[tuple, _Kept | _New]]:
    """Each flat key of the new tree -> (its path, kept where it lies or written anew), in
    the order dcp.save would list them.

    Raises:
        StateError: the source's entries are not what flattening its own tree gives (a layout
            this writer cannot keep).
    """
    layout = stored_layout(source)
    old_values: dict[str, Any] = {}
    tensors: dict[int, StoredTensor] = {}  # id(TensorRef of the source tree) -> its chunks
    for key, _, value in flatten(source.root, layout):
        old_values[key] = value
        stored = source.entries.get(key)
        if isinstance(value, TensorRef) and stored and isinstance(stored[1], StoredTensor):
            tensors[id(value)] = stored[1]
    if old_values.keys() != source.entries.keys():
        odd = next(iter(sorted(old_values.keys() ^ source.entries.keys())))
        raise StateError(f"{source.path}: its entries are not stored as torch.distributed."
                         f"checkpoint stores a state dict (e.g. {odd[:80]!r}); ckpttool "
                         "rewrites only folders dcp.save wrote")
    out: dict[str, tuple[tuple, _Kept | _New]] = {}
    for key, path, value in flatten(root, layout):
        stored = source.entries.get(key)
        if _is_tensor(value):
            kept = tensors.get(id(value)) if isinstance(value, TensorRef) else None
            out[key] = (path, _Kept(kept) if kept is not None else _New(value, True))
        elif (stored is not None and isinstance(stored[1], StoredEntry)
              and key in old_values and _same(old_values[key], value)):
            out[key] = (path, _Kept(stored[1]))
        else:
            out[key] = (path, _New(value, False))
    return out


@dataclass(frozen=True)
class StoredLayout:
    """How a source folder split its state into entries, where that differs from dcp.save's
    own flattening (:func:`flatten` follows it, so that the planner that saved the folder
    loads the output).

    Attributes:
        whole: the paths of entries holding what dcp.save would split (a folder saved with
            ``DefaultSavePlanner(flatten_state_dict=False)`` stores each top-level value as one
            entry: ``optim``, the whole optimizer state, its tensors included) -> their flat
            keys. Such an entry stays one entry, stored anew as a whole when anything inside it
            changed.
        split: the paths of lists whose items the folder stored one by one where dcp.save
            keeps the list whole (a list of numbers, in an older torch's layout).
    """

    whole: Mapping[tuple, str]
    split: frozenset[tuple]


def stored_layout(source: DCPDir) -> StoredLayout:
    """The :class:`StoredLayout` of ``source`` (both parts empty for a folder that dcp.save
    wrote with its default planner)."""
    whole = {}
    above: set[tuple] = set()
    for key, (path, where) in source.entries.items():
        member = source.members.get(join_location(path))  # the entry as read
        if isinstance(where, StoredEntry) and member is not None and not _terminal(member.root):
            whole[path] = key
        above.update(path[:i] for i in range(1, len(path)) if isinstance(path[i], int))
    return StoredLayout(whole, frozenset(above))


def flatten(root: Mapping, layout: StoredLayout | None = None) -> list[tuple[str, tuple, Any]]:
    """``(flat key, path, leaf)`` for a state dict, as dcp.save flattens it (torch 2.4+'s
    ``traverse_state_dict`` and ``flatten_state_dict``); tensors are TensorRef, NewTensor or
    torch tensors. Where a source folder split its state otherwise (``layout``,
    :func:`stored_layout`), its way is followed.

    Example:
        >>> flatten({"s": {"milestones": Counter({3: 1}), "base_lrs": [0.1]}})
        [('s.milestones.3', ('s', 'milestones', '3'), 1), ('s.base_lrs', ('s', 'base_lrs'), [0.1])]
        >>> unflattened = StoredLayout({("s",): "s"}, frozenset())
        >>> flatten({"s": {"milestones": Counter({3: 1})}}, unflattened)
        [('s', ('s',), {'milestones': Counter({3: 1})})]
    """
    out: list[tuple[str, tuple, Any]] = []
    seen: set[str] = set()
    whole, split = (layout.whole, layout.split) if layout else ({}, frozenset())

    def emit(key: str, path: tuple, value: Any) -> None:
        if key in seen:
            raise StateError(f"two entries of the state flatten to the key {key[:80]!r}; "
                             "torch.distributed.checkpoint cannot store it")
        seen.add(key)
        out.append((key, path, value))

    def visit(path: tuple, value: Any) -> None:
        if path in whole:
            emit(whole[path], path, value)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                visit(path + (str(k),), v)
        elif _terminal(value) and not (path in split and isinstance(value, list)):
            emit(".".join(map(str, path)), path, value)
        else:
            for i, v in enumerate(value):
                visit(path + (i,), v)

    for k, v in root.items():
        visit((str(k),), v)
    return out


def _terminal(value: Any) -> bool:
    """Whether dcp.save stores ``value`` as one entry: not a dict, and not a list holding
    tensors or containers it would descend into."""
    if isinstance(value, Mapping):
        return False
    if not isinstance(value, list):
        return True
    return not any((isinstance(v, (Mapping, list)) and not _terminal(v)) or _is_tensor(v)
                   for v in value)


def _is_tensor(value: Any) -> bool:
    return isinstance(value, (TensorRef, NewTensor)) or _is_torch_tensor(value)


def _same(old: Any, new: Any) -> bool:
    """The source's value itself, or plain scalars (in lists and tuples) of the same types and
    bits: what would be stored again as it is."""
    if old is new:
        return True
    if type(old) is not type(new):
        return False
    if type(new) in (list, tuple):
        return len(old) == len(new) and all(_same(a, b) for a, b in zip(old, new))
    if not isinstance(new, _SCALARS):
        return False
    if isinstance(new, float):
        return struct.pack("<d", old) == struct.pack("<d", new)
    if isinstance(new, complex):
        return _same(old.real, new.real) and _same(old.imag, new.imag)
    return old == new


def _storages(where: StoredEntry | StoredTensor) -> list[StoredEntry]:
    return [where] if isinstance(where, StoredEntry) else [c[2] for c in where.chunks]


def _new_shard_name(names: list[str]) -> str:
    taken = set(names)
    n = 0
    while NEW_SHARD.format(n) in taken:
        n += 1
    return NEW_SHARD.format(n)


# --- the new shard -------------------------------------------------------------------------------


def _shard(entries: dict[str, tuple[tuple, _Kept | _New]], source: DCPDir,
           shard: str) -> tuple[bytes, dict[str, tuple[Any, StoredEntry]]]:
    """The new shard's bytes (non-tensor entries first, as DCP writes a rank's file) and, per
    new entry, (the torch value written, where it lies)."""
    import torch

    buffer = io.BytesIO()
    placed: dict[str, tuple[Any, StoredEntry]] = {}
    new = [(k, e[1]) for k, e in entries.items() if isinstance(e[1], _New)]
    for key, entry in sorted(new, key=lambda item: item[1].tensor):  # stable: bytes first
        where = join_location(entries[key][0])
        if entry.tensor:
            # DCP stores each tensor chunk as a CPU tensor of its own storage.
            value = (_cpu_tensor(entry.value) if isinstance(entry.value, NewTensor)
                     else _torch_value(entry.value, source, where).detach().to("cpu").clone())
        else:
            value = _torch_value(entry.value, source, where)
        blob = io.BytesIO()
        try:
            torch.save(value, blob)
        except Exception as e:  # noqa: BLE001  (torch refuses an object: say which entry)
            raise StateError(f"{where}: torch.save cannot store the new value "
                             f"({type(e).__name__}: {e})") from None
        offset = buffer.tell()
        buffer.write(blob.getbuffer())
        placed[key] = (value, StoredEntry(shard, offset, buffer.tell() - offset))
    return buffer.getvalue(), placed


def _torch_value(value: Any, source: DCPDir, where: str) -> Any:
    """A value of ckpttool's tree as the real Python / torch object torch.save writes."""
    import torch

    if isinstance(value, NewTensor):  # inside a non-tensor value: saved from its device
        try:
            return _cpu_tensor(value).to(value.location)
        except (RuntimeError, AssertionError) as e:
            raise StateError(f"{where}: a {value.dtype} tensor saved on {value.location} cannot "
                             f"be made here ({e}); it is written on the cpu only as a tensor "
                             "entry of its own") from None
    if isinstance(value, TensorRef):  # a tensor of the source inside a changed value
        try:
            return load_tensor(source, value)
        except (RuntimeError, AssertionError) as e:
            raise StateError(f"{where}: a tensor saved on {value.device} cannot be made here "
                             f"({e})") from None
    if _is_torch_tensor(value) or isinstance(value, _SCALARS):
        return value
    if isinstance(value, DType):
        return getattr(torch, value.name)
    if isinstance(value, Device):
        return torch.device(*value.args)
    if isinstance(value, Mapping):
        items = {k: _torch_value(v, source, where) for k, v in value.items()}
        return type(value)(items) if type(value) in (Counter, OrderedDict) else items
    if type(value) in (list, tuple):
        return type(value)(_torch_value(v, source, where) for v in value)
    shown = value.dotted if isinstance(value, Opaque) else type(value).__name__
    raise StateError(f"{where}: the new value holds an object of type {shown}, which ckpttool "
                     "cannot write into a new entry")


def _cpu_tensor(value: NewTensor) -> Any:
    """A NewTensor's values as a CPU torch tensor of its own storage."""
    import torch

    from ckpttool.serialization import _swap_bytes

    dtype = getattr(torch, value.dtype)
    raw = value.data if sys.byteorder == "little" else _swap_bytes(value.data, value.dtype)
    flat = (torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype) if raw
            else torch.empty(0, dtype=dtype))
    return flat.reshape(value.shape).clone()


# --- the .metadata -------------------------------------------------------------------------------


def _metadata(entries: dict[str, tuple[tuple, _Kept | _New]],
              placed: dict[str, tuple[Any, StoredEntry]], version: str | None) -> bytes:
    """The new ``.metadata``: real DCP dataclasses built from validated values, pickled as
    FileSystemWriter.finish pickles them."""
    import pickle

    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    state_dict_metadata: dict[str, Any] = {}
    planner_data: dict[str, tuple] = {}
    storage_data: dict[Any, Any] = {}

    def info(where: StoredEntry) -> Any:
        return _StorageInfo(where.shard, where.offset, where.length)

    for key, (path, entry) in entries.items():
        planner_data[key] = path
        if isinstance(entry, _New):
            value, where = placed[key]
            if not entry.tensor:
                state_dict_metadata[key] = BytesStorageMetadata()
                storage_data[MetadataIndex(key)] = info(where)
                continue
            state_dict_metadata[key] = TensorStorageMetadata(
                TensorProperties.create_from_tensor(value), value.size(),
                [ChunkStorageMetadata(torch.Size([0] * value.dim()), value.size())])
            storage_data[MetadataIndex(key, [0] * value.dim(), 0)] = info(where)
        elif isinstance(entry.where, StoredEntry):
            state_dict_metadata[key] = BytesStorageMetadata()
            storage_data[MetadataIndex(key)] = info(entry.where)
        else:
            stored = entry.where
            state_dict_metadata[key] = TensorStorageMetadata(
                _properties(stored, key), torch.Size(stored.size),
                [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s, _ in stored.chunks])
            for i, (offsets, _, where) in enumerate(stored.chunks):
                storage_data[MetadataIndex(key, offsets, i)] = info(where)
    metadata = Metadata(state_dict_metadata, planner_data, storage_data,
                        StorageMeta(save_id=str(uuid.uuid4())), version)
    return pickle.dumps(metadata)


def _properties(stored: StoredTensor, key: str) -> Any:
    """TensorProperties of a kept tensor, from the stored state: (dtype, layout, requires_grad,
    memory-format code, pin_memory), or an older torch's dict of fields."""
    import torch
    from torch.distributed.checkpoint.metadata import TensorProperties

    state = stored.properties
    if isinstance(state, tuple) and len(state) == 5:
        _, layout, requires_grad, memory_format, pin_memory = state
        code = (memory_format.args[0] if isinstance(memory_format, Opaque)
                and memory_format.dotted.endswith("._MEM_FORMAT_ENCODING")
                and len(memory_format.args) == 1 else None)
    elif isinstance(state, dict):
        layout = state.get("layout")
        requires_grad, pin_memory = state.get("requires_grad"), state.get("pin_memory")
        code = 0  # torch.memory_format cannot be pickled: older torch stored none
    else:
        layout = requires_grad = pin_memory = code = None
    strided = layout is None or (isinstance(layout, Opaque) and layout.args == ("torch.strided",)
                                 and layout.dotted == "torch.serialization._get_layout")
    if (not strided or not isinstance(requires_grad, bool) or not isinstance(pin_memory, bool)
            or code not in range(len(_MEMORY_FORMATS)) or isinstance(code, bool)):
        raise InputError(f"the tensor {key[:80]!r} has properties ckpttool cannot write back "
                         f"({state!r:.120}); the .metadata is damaged or from a DCP version "
                         "ckpttool does not know")
    return TensorProperties(getattr(torch, stored.dtype), torch.strided, requires_grad,
                            getattr(torch, _MEMORY_FORMATS[code]), pin_memory)


# --- files -----------------------------------------------------------------------------------


__all__ = ["NEW_SHARD", "DCPChanges", "flatten", "plan_changes", "stored_layout",
           "write_dcp"]
