"""Checkpoint directories: an HF Trainer ``checkpoint-N/`` and an accelerate ``save_state()``
folder, read as one checkpoint (PRODUCT.md section 4).

Every file of the folder that ckpttool can read safely becomes one branch of a single tree,
under its file name: ``optimizer.pt`` holds the optimizer state, ``scheduler.pt`` the scheduler
state, ``trainer_state.json`` its parsed JSON, ``model.safetensors`` a tensor per weight (from
the safetensors header; no weight is read). So a state's location starts with its file
(``optimizer.pt``, ``optimizer.bin``, ``optimizer_1.bin``), the finder and the pairing work as
for one file, and a diff of two folders compares them file by file.

Nothing is executed: torch files go through the safe reader (``training_args.bin``, a pickled
TrainingArguments, becomes an opaque value whose fields are read as data), JSON through json.

Example:
    >>> ckpt = read_directory("fixtures/dirs/hf_trainer/checkpoint-20")   # doctest: +SKIP
    >>> sorted(ckpt.root)[:3]                                              # doctest: +SKIP
    ['model.safetensors', 'optimizer.pt', 'rng_state.pth']
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckpttool.errors import InputError
from ckpttool.serialization import (
    DTYPE_ITEMSIZE,
    Opaque,
    StorageRef,
    TensorRef,
    TorchFile,
    contiguous_stride,
    read_checkpoint,
    walk,
)

# Files whose presence names the kind of a folder (PRODUCT.md section 4).
HF_MARKERS = ("trainer_state.json", "training_args.bin")
HF_STATE_FILES = ("optimizer.pt", "scheduler.pt")
ACCELERATE_STATE = re.compile(r"(optimizer|scheduler)(_\d+)?\.bin")
DCP_METADATA = ".metadata"
# The kinds of checkpoint that are folders.
FOLDER_KINDS = ("hf-trainer", "accelerate", "dcp")
# The largest JSON file or safetensors header read: a trainer_state.json of a long run with
# dense logging is a few MB.
MAX_JSON_BYTES = 256 << 20
# safetensors dtype codes -> torch dtype names (safetensors' own table).
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "C64": "complex64",
}


def directory_kind(path: str | os.PathLike) -> str | None:
    """"hf-trainer", "accelerate" or "dcp" for a checkpoint folder, None for another folder."""
    try:
        names = set(os.listdir(path))
    except OSError:
        return None
    if DCP_METADATA in names and any(n.endswith(".distcp") for n in names):
        return "dcp"
    if any(n in names for n in HF_MARKERS) or all(n in names for n in HF_STATE_FILES):
        return "hf-trainer"
    if any(ACCELERATE_STATE.fullmatch(n) for n in names):
        return "accelerate"
    return None


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """Whether a folder is itself one checkpoint (not a folder of checkpoints)."""
    return os.path.isdir(path) and directory_kind(path) is not None


@dataclass
class CheckpointDir:
    """A checkpoint folder read safely, shaped like a :class:`TorchFile` for the rest of
    ckpttool: ``root`` is ``{file name: that file's tree}``, and tensor bytes are found through
    the file that holds them (:meth:`locate`).

    ``members`` holds each file read, by name; ``skipped`` the files of the folder that are not
    part of the tree (subfolders, files of no kind ckpttool reads).
    """

    path: str
    kind: str
    root: dict[str, Any]
    members: dict[str, TorchFile]
    globals_seen: list[str]
    size: int
    skipped: tuple[str, ...] = ()
    byteorder: str = "little"
    _owners: dict[int, TorchFile] = field(default_factory=dict, repr=False)

    def member_of(self, storage: StorageRef) -> TorchFile:
        owner = self._owners.get(id(storage))
        if owner is None:
            raise InputError(f"{self.path}: a tensor of no file of this folder")
        return owner

    def locate(self, storage: StorageRef, start: int = 0,
               length: int | None = None) -> tuple[str, int, int]:
        """(file path, absolute offset, length) of a storage's bytes, in the file holding it."""
        return self.member_of(storage).locate(storage, start, length)

    def read_storage(self, storage: StorageRef, start: int = 0, length: int | None = None) -> bytes:
        return self.member_of(storage).read_storage(storage, start, length)

    def tensor_bytes(self, ref: TensorRef) -> bytes:
        if ref.storage is None:
            raise InputError(f"{self.path}: a meta tensor has no data")
        return self.member_of(ref.storage).tensor_bytes(ref)

    def scalar(self, ref: TensorRef) -> float | int | bool:
        if ref.storage is None:
            raise ValueError(f"{ref!r} has no data")
        return self.member_of(ref.storage).scalar(ref)

    @property
    def storage_spans(self) -> dict:
        """Directories have no single span table; readers use :meth:`locate`."""
        raise InputError(f"{self.path}: a checkpoint folder cannot be rewritten as one file")


def read_directory(path: str | os.PathLike) -> CheckpointDir:
    """Read an HF Trainer or accelerate checkpoint folder safely, without tensor data.

    Raises:
        InputError: not a checkpoint folder ckpttool reads, or a file in it is damaged.
    """
    path = os.fspath(path)
    kind = directory_kind(path)
    if kind is None:
        raise InputError(f"{path}: is a directory, and not a checkpoint directory ckpttool knows "
                         "(an HF Trainer checkpoint-N/, an accelerate save_state() folder or a "
                         "torch.distributed.checkpoint folder); for a folder of checkpoint "
                         "files, pass the files")
    if kind == "dcp":
        from ckpttool.dcp import read_dcp  # dcp builds on this module

        return read_dcp(path)
    root: dict[str, Any] = {}
    members: dict[str, TorchFile] = {}
    skipped: list[str] = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            skipped.append(name)
            continue
        member = _read_member(full, name)
        if member is None:
            skipped.append(name)
            continue
        members[name] = member
        root[name] = member.root
    if not members:
        raise InputError(f"{path}: no file of this folder is a checkpoint")
    orders = {m.byteorder for m in members.values()}
    if orders != {"little"}:
        raise InputError(f"{path}: files saved on a big-endian machine; ckpttool reads those "
                         "one file at a time")
    owners = {}
    for member in members.values():
        for _, value in walk(member.root):
            if isinstance(value, TensorRef) and value.storage is not None:
                owners[id(value.storage)] = member
    globals_seen = list(dict.fromkeys(g for m in members.values() for g in m.globals_seen))
    return CheckpointDir(path, kind, root, members, globals_seen,
                         sum(m.size for m in members.values()), tuple(skipped), "little", owners)


def read_any(path: str | os.PathLike) -> TorchFile | CheckpointDir:
    """A checkpoint file or folder, read safely: what every command starts from."""
    if os.path.isdir(path):
        return read_directory(path)
    return read_checkpoint(path)


def _read_member(full: str, name: str) -> TorchFile | None:
    """One file of a folder as a TorchFile (a torch file, a JSON file or a safetensors
    header), or None for a file of another kind."""
    try:
        with open(full, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise InputError(f"{full}: cannot read: {e.strerror or e}") from None
    if name.endswith(".json"):
        return _read_json(full)
    if name.endswith(".safetensors"):
        return _read_safetensors(full)
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"
                                           and len(head) > 1):
        return read_checkpoint(full)
    return None


def _read_json(full: str) -> TorchFile:
    size = os.path.getsize(full)
    if size > MAX_JSON_BYTES:
        raise InputError(f"{full}: a {size >> 20} MB JSON file is more than ckpttool reads")
    try:
        with open(full, "rb") as f:
            value = json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{full}: not valid JSON ({str(e).splitlines()[0][:80]})") from None
    except RecursionError:
        raise InputError(f"{full}: the JSON nests too deeply to read") from None
    return TorchFile(full, "json", value, [], size)


def _read_safetensors(full: str) -> TorchFile:
    """A safetensors file's header as a tree of tensors whose bytes stay in the file."""
    size = os.path.getsize(full)
    with open(full, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{full}: a safetensors file shorter than its header; truncated")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_JSON_BYTES, size - 8):
            raise InputError(f"{full}: a safetensors header of {n} bytes does not fit the file; "
                             "it is damaged")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InputError(f"{full}: the safetensors header is not valid JSON; the file is "
                         "damaged") from None
    if not isinstance(header, dict):
        raise InputError(f"{full}: the safetensors header is not a JSON object")
    base = 8 + n
    root: dict[str, Any] = {}
    spans: dict[str, tuple[int, int]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            root[name] = entry
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{full}: the safetensors entry {name[:80]!r} is malformed") from None
        numel = math.prod(shape)
        nbytes = numel * DTYPE_ITEMSIZE.get(dtype, 1)
        if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes or base + end > size:
            raise InputError(f"{full}: the safetensors entry {name[:80]!r} does not fit the file; "
                             "it is damaged or truncated")
        storage = StorageRef(name, dtype, "cpu", numel, "UntypedStorage")
        root[name] = TensorRef(dtype, shape, contiguous_stride(shape), 0, storage)
        spans[name] = (base + begin, nbytes)
    return TorchFile(full, "safetensors", root, [], size, "little", None, spans)


# --- HF Trainer run settings -------------------------------------------------------------------


@dataclass(frozen=True)
class HFRun:
    """What an HF Trainer folder says about its schedule, read as data (nothing executed).

    ``warmup_steps`` is resolved the way the Trainer resolves it (a value < 1 is a ratio of the
    horizon); ``warmup_given`` is what training_args.bin holds. ``logged`` is log_history's
    (step, learning_rate) pairs: the lr each logged step used.
    """

    global_step: int | None
    max_steps: int | None
    scheduler_type: str | None
    warmup_steps: int | None
    warmup_given: Any
    learning_rate: float | None
    scheduler_kwargs: Mapping[str, Any]
    optim: str | None
    logged: tuple[tuple[int, float], ...]

    @property
    def spec(self) -> str | None:
        """The named schedule as a ckpttool SPEC: ``hf:linear(num_warmup_steps=5, ...)``."""
        if self.scheduler_type is None:
            return None
        args = []
        if self.scheduler_type != "constant" and self.warmup_steps is not None:
            args.append(f"num_warmup_steps={self.warmup_steps}")
        if self.scheduler_type not in ("constant", "constant_with_warmup") \
                and self.max_steps is not None:
            args.append(f"num_training_steps={self.max_steps}")
        args += [f"{k}={v!r}" for k, v in self.scheduler_kwargs.items()]
        return f"hf:{self.scheduler_type}({', '.join(args)})"


def hf_run(ckpt: Any) -> HFRun | None:
    """The schedule settings of an HF Trainer folder (None for any other checkpoint)."""
    if getattr(ckpt, "kind", None) != "hf-trainer":
        return None
    state = ckpt.root.get("trainer_state.json")
    state = state if isinstance(state, Mapping) else {}
    args_value = ckpt.root.get("training_args.bin")
    args = args_value.state if isinstance(args_value, Opaque) and isinstance(
        args_value.state, Mapping) else {}
    max_steps = _int(state.get("max_steps"))
    if max_steps is None or max_steps <= 0:
        max_steps = _int(args.get("max_steps"))
        max_steps = max_steps if max_steps and max_steps > 0 else None
    given = args.get("warmup_steps")
    warmup = None
    if isinstance(given, (int, float)) and not isinstance(given, bool):
        if given >= 1 or given == 0:
            warmup = int(given)
        elif max_steps is not None:
            warmup = math.ceil(max_steps * given)  # the Trainer's get_warmup_steps
    ratio = args.get("warmup_ratio")  # transformers 4.x: a separate field, used when steps == 0
    if warmup == 0 and isinstance(ratio, float) and ratio > 0 and max_steps is not None:
        warmup, given = math.ceil(max_steps * ratio), ratio
    kwargs = args.get("lr_scheduler_kwargs")
    logged = tuple((int(e["step"]), float(e["learning_rate"]))
                   for e in state.get("log_history") or () if isinstance(e, Mapping)
                   and isinstance(e.get("step"), int)
                   and isinstance(e.get("learning_rate"), (int, float)))
    return HFRun(
        global_step=_int(state.get("global_step")), max_steps=max_steps,
        scheduler_type=_enum_value(args.get("lr_scheduler_type")), warmup_steps=warmup,
        warmup_given=given,
        learning_rate=args.get("learning_rate") if isinstance(args.get("learning_rate"),
                                                              float) else None,
        scheduler_kwargs=dict(kwargs) if isinstance(kwargs, Mapping) else {},
        optim=_enum_value(args.get("optim")), logged=logged)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _enum_value(value: Any) -> str | None:
    """The value of a pickled str enum (``SchedulerType('linear')``), or a plain string."""
    if isinstance(value, str):
        return value
    if isinstance(value, Opaque) and len(value.args) == 1 and isinstance(value.args[0], str):
        return value.args[0]
    return None
