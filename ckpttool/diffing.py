"""A semantic diff of two checkpoints (PRODUCT.md section 2, ``diff``).

The tree of values is compared with deepdiff, every tensor in it replaced by a placeholder, so
deepdiff never walks tensor data. Tensors found at the same path in both trees are compared by
ckpttool: the raw bytes of their storage records first (read in chunks, never unpickled into
torch, no torch import when they are equal), and only for those whose bytes differ, numeric
statistics computed with torch over bounded chunks.

Example:
    >>> d = diff("fixtures/adamw_cosine.pt", "rescheduled.pt")       # doctest: +SKIP
    >>> d.summary                                                    # doctest: +SKIP
    'optimizer: lr, initial_lr changed in 2 groups; scheduler: ...; 0 of 18 tensors changed'
"""

from __future__ import annotations

import fnmatch
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ckpttool.errors import InputError
from ckpttool.inspection import Checkpoint, OptimizerInfo, load
from ckpttool.serialization import (
    ByteRun,
    Marker,
    Opaque,
    TensorRef,
    TorchFile,
    children,
    dotted_name,
    extent,
    join_location,
    same_bytes,
    scalar_value,
    storage_extent,
    walk,
)

SCHEMA = "ckpttool.diff/1"
# What a change is (PRODUCT.md section 2): a value that differs, a tensor whose elements differ,
# a key only one side has, a value of another type, a tensor of another shape or dtype.
KINDS = ("value", "tensor", "added", "removed", "type", "shape", "dtype")
# What `--only` selects: changes inside an optimizer state, inside a scheduler state, on any
# tensor (model weights and optimizer moments alike), and every other value.
SECTIONS = ("optimizer", "scheduler", "tensors", "other")
# The scheduler fields a person checks first, in this order, before the other stored keys.
SCHEDULER_FIELDS = ("last_epoch", "_step_count", "base_lrs", "_last_lr")
# Elements per chunk when the statistics of a differing tensor are computed: a few float64
# temporaries of this many elements stay far below the memory budget.
STATS_CHUNK = 4 << 20


class _Missing:
    """A key one side does not have (shown as ``-``)."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing()


@dataclass(frozen=True)
class Change:
    """One difference between A and B, at ``path`` (the `/`-joined form of ``location``).

    ``section`` is where it belongs (one of :data:`SECTIONS`). For ``kind == "tensor"``:
    ``n_diff`` elements of ``numel`` differ, by at most ``max_abs`` (``|a - b|``) and
    ``max_rel`` (``|a - b| / |b|``); ``a`` and ``b`` then hold the values of a one-element
    tensor, or None.
    """

    path: str
    kind: str
    section: str
    a: Any = None
    b: Any = None
    tensor: bool = False  # either side is a tensor
    max_abs: float | None = None
    max_rel: float | None = None
    n_diff: int | None = None
    numel: int | None = None


@dataclass(frozen=True)
class TensorCounts:
    """Tensors at paths both sides hold (``compared``), how many of them differ in values,
    shape or dtype (``changed``), and how many only one side holds."""

    compared: int = 0
    changed: int = 0
    added: int = 0
    removed: int = 0


@dataclass(frozen=True)
class TensorValue:
    """A tensor where a change shows a value: its description, and its value if it has one
    element (a step count, a tensor lr)."""

    dtype: str
    shape: tuple[int, ...]
    device: str
    value: Any = None

    def __str__(self) -> str:
        dims = ", ".join(str(n) for n in self.shape)
        text = f"tensor({self.dtype}[{dims}])"
        return text if self.value is None else f"{text} {self.value!r}"


@dataclass(frozen=True)
class GroupDiff:
    """The keys of one param group that differ: (key, a, b), ``MISSING`` for an absent key."""

    index: int
    changes: tuple[tuple[str, Any, Any], ...]


@dataclass(frozen=True)
class StateDiff:
    """One per-parameter state key (``exp_avg``) of an optimizer: for how many params its
    tensor changed, appeared or disappeared, of the ``params`` that hold it in A."""

    key: str
    changed: int
    added: int
    removed: int
    params: int


@dataclass(frozen=True)
class OptimizerDiff:
    """An optimizer state matched by location; ``cls`` is (A's class, B's class), None if absent."""

    location: str
    cls: tuple[str | None, str | None]
    group_count: tuple[int, int]
    groups: tuple[GroupDiff, ...]
    state: tuple[StateDiff, ...]

    @property
    def changed(self) -> bool:
        return bool(self.groups or self.state or self.cls[0] != self.cls[1]
                    or self.group_count[0] != self.group_count[1])


@dataclass(frozen=True)
class SchedulerDiff:
    """A scheduler state matched by location: its fields and recovered arguments that differ."""

    location: str
    cls: tuple[str | None, str | None]
    fields: tuple[tuple[str, Any, Any], ...]  # stored keys, SCHEDULER_FIELDS first
    args: tuple[tuple[str, Any, Any], ...]  # recovered constructor arguments

    @property
    def changed(self) -> bool:
        return bool(self.fields or self.args or self.cls[0] != self.cls[1])


@dataclass(frozen=True)
class Diff:
    """The differences between checkpoints ``a`` and ``b``, as :func:`diff` found them.

    ``changes`` holds every difference that ``only`` and ``ignore`` select; ``optimizers`` and
    ``schedulers`` the same differences read per state, for people.
    """

    a: str
    b: str
    kind_a: str
    kind_b: str
    changes: tuple[Change, ...]
    tensors: TensorCounts
    values_compared: int
    optimizers: tuple[OptimizerDiff, ...]
    schedulers: tuple[SchedulerDiff, ...]
    rtol: float = 0.0
    atol: float = 0.0
    only: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    @property
    def equal(self) -> bool:
        return not self.changes

    @property
    def summary(self) -> str:
        """One line: what changed in each optimizer and scheduler, then the tensor count."""
        return _summary(self)

    def section(self, name: str) -> tuple[Change, ...]:
        """The changes of one section (see :data:`SECTIONS`)."""
        return tuple(c for c in self.changes if c.section == name)


# --- the tree ----------------------------------------------------------------------------------


class _TensorLeaf:
    """Where a tensor was: every placeholder equals every other (deepdiff compares objects by
    their empty ``__dict__``), so deepdiff reports only a tensor that appears or disappears or
    stands where another type stood."""


class _BytesKey(str):
    """A bytes dict key, as its repr: deepdiff cannot name a path through a bytes key (it
    raises TypeError). Equal only to the same bytes key of the other tree."""

    def __eq__(self, other: object) -> bool:
        return type(other) is _BytesKey and str.__eq__(self, other)

    def __hash__(self) -> int:
        return hash((bytes, str(self)))


def _key(key: Any) -> Any:
    return _BytesKey(repr(key)) if isinstance(key, (bytes, bytearray)) else key


def _mirror(root: Any, path: tuple, tensors: dict[tuple, TensorRef]) -> Any:
    """A copy of a tree made of plain values that deepdiff can walk, tensors replaced by
    placeholders (and collected in ``tensors`` by path), opaque objects by their content."""
    memo: dict[int, Any] = {}

    def copy(value: Any, where: tuple) -> Any:
        if isinstance(value, TensorRef):
            tensors.setdefault(where, value)
            return _TensorLeaf()
        if isinstance(value, (dict, list, tuple, Opaque)):
            # A subtree the pickle shares is copied once; its tensors are recorded under the
            # first path that reaches them, as ``walk`` visits it.
            if id(value) in memo:
                return memo[id(value)]
            # A container is memoised before its parts are copied: a pickle can make one hold
            # itself (deepdiff keeps track of such cycles).
            out: Any
            if isinstance(value, dict):
                out = memo[id(value)] = {}
                for k, v in value.items():
                    out[_key(k)] = copy(v, where + (k,))
            elif isinstance(value, list):
                out = memo[id(value)] = []
                out.extend(copy(v, where + (i,)) for i, v in enumerate(value))
            elif isinstance(value, tuple):
                memo[id(value)] = None  # a tuple holding itself holds a list or dict between
                out = memo[id(value)] = tuple(copy(v, where + (i,)) for i, v in enumerate(value))
            else:
                out = memo[id(value)] = {"__class__": value.dotted}
                for k, v in children(value):  # keys as walk() names them
                    out[str(k)] = copy(v, where + (str(k),))
            return out
        if isinstance(value, Marker):
            return repr(value)
        name = dotted_name(value)
        if name:
            return f"<global {name}>"
        return scalar_value(value)

    return copy(root, path)


# --- the comparison ----------------------------------------------------------------------------


def diff(a: str | os.PathLike | Checkpoint, b: str | os.PathLike | Checkpoint, *,
         rtol: float = 0.0, atol: float = 0.0, only: Iterable[str] = (),
         ignore: Iterable[str] = (), progress: Callable[[int, int], None] | None = None) -> Diff:
    """Compare two checkpoints: optimizer and scheduler states, other values, and tensors.

    Args:
        a, b: checkpoint paths (or what :func:`ckpttool.load` returned for them).
        rtol, atol: numbers (scalars and tensor elements) ``x`` in A and ``y`` in B are equal
            when ``|x - y| <= atol + rtol * |y|`` (torch.isclose's rule; NaN equals NaN).
            Default: exact equality (so ``-0.0 == 0.0``).
        only: sections to compare (:data:`SECTIONS`); default all. Tensors outside the chosen
            sections are not read.
        ignore: shell-style globs on paths (``model/*``, ``*/exp_avg_sq``); a path is ignored
            when it or any of its parents matches.
        progress: ``progress(done, total)`` in bytes while tensor data is compared.

    Raises:
        InputError: a file is missing, damaged or not a checkpoint; ``only`` names no section.
        UnsafeCheckpointError: a pickle calls code-running globals (nothing is run).

    Example:
        >>> d = diff("run/step500.pt", "run/step500-cos2000.pt")       # doctest: +SKIP
        >>> [(c.path, c.a, c.b) for c in d.changes][:1]                  # doctest: +SKIP
        [('optimizer/param_groups/0/lr', 0.0005, 0.00085)]
    """
    only = tuple(dict.fromkeys(only))
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        raise InputError(f"--only {unknown[0]!r}: choose from {', '.join(SECTIONS)}")
    if rtol < 0 or atol < 0 or math.isnan(rtol) or math.isnan(atol):
        raise InputError("--rtol and --atol must be numbers >= 0")
    ckpt_a, ckpt_b = (x if isinstance(x, Checkpoint) else load(x)
                      for x in (a, b))
    rules = _Rules(rtol, atol, tuple(only), tuple(ignore), ckpt_a, ckpt_b)
    tensors_a: dict[tuple, TensorRef] = {}
    tensors_b: dict[tuple, TensorRef] = {}
    try:
        tree_a = _mirror(ckpt_a.file.root, (), tensors_a)
        tree_b = _mirror(ckpt_b.file.root, (), tensors_b)
    except RecursionError:
        raise InputError("the checkpoints nest too deeply to compare") from None
    changes = _tree_changes(tree_a, tree_b, tensors_a, tensors_b, rules)
    tensor_changes, counts = _tensor_changes(ckpt_a.file, ckpt_b.file, tensors_a, tensors_b,
                                             rules, progress)
    changes += tensor_changes
    changes = [c for c in changes if rules.selected(c)]
    changes.sort(key=_order)
    counts = TensorCounts(
        counts.compared, counts.changed,
        added=sum(1 for p in tensors_b if p not in tensors_a
                  and rules.wants_tensor(join_location(p))),
        removed=sum(1 for p in tensors_a if p not in tensors_b
                    and rules.wants_tensor(join_location(p))))
    values = sum(1 for p, v in walk(ckpt_a.file.root)
                 if not isinstance(v, (dict, list, tuple, TensorRef))
                 and not rules.ignored(join_location(p)))
    return Diff(ckpt_a.path, ckpt_b.path, ckpt_a.kind, ckpt_b.kind, tuple(changes), counts,
                values, _optimizer_diffs(ckpt_a, ckpt_b, changes, rules),
                _scheduler_diffs(ckpt_a, ckpt_b, changes, rules), rtol, atol, tuple(only),
                tuple(ignore))


@dataclass(frozen=True)
class _Rules:
    """What counts as equal and what is looked at: tolerances, sections, ignored paths."""

    rtol: float
    atol: float
    only: tuple[str, ...]
    ignore: tuple[str, ...]
    ckpt_a: Checkpoint = field(repr=False)
    ckpt_b: Checkpoint = field(repr=False)

    def ignored(self, path: str) -> bool:
        if not self.ignore:
            return False
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch.fnmatchcase(p, g) for g in self.ignore for p in prefixes)

    def state_section(self, path: str) -> str:
        """"optimizer" or "scheduler" for a path inside such a state (in A or B), else "other"."""
        for ckpt in (self.ckpt_a, self.ckpt_b):
            for opt in ckpt.optimizers:
                if within(path, opt.location):
                    return "optimizer"
            for sched in ckpt.schedulers:
                if sched.location is not None and within(path, sched.location):
                    return "scheduler"
        return "other"

    def section(self, path: str, tensor: bool) -> str:
        """The section of a change; ``tensor``: the changed value itself is a tensor."""
        where = self.state_section(path)
        return "tensors" if where == "other" and tensor else where

    def selected(self, change: Change) -> bool:
        if self.ignored(change.path):
            return False
        if not self.only:
            return True
        return change.section in self.only or (change.tensor and "tensors" in self.only)

    def wants_tensor(self, path: str) -> bool:
        """Whether a tensor at ``path`` is compared at all (its bytes are read only if so)."""
        if self.ignored(path):
            return False
        return not self.only or "tensors" in self.only or self.section(path, True) in self.only

    def close(self, x: Any, y: Any) -> bool:
        """Two scalars equal under the tolerances (numbers only; everything else exactly)."""
        if not (_is_real(x) and _is_real(y)):
            return False
        if x == y or (math.isnan(x) and math.isnan(y)):
            return True
        if not (self.rtol or self.atol) or math.isinf(x) or math.isinf(y):
            return False
        return abs(x - y) <= self.atol + self.rtol * abs(y)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def within(path: str, location: str) -> bool:
    """Whether ``path`` is ``location`` or lies under it ("" is the root: everything does)."""
    return location == "" or path == location or path.startswith(location + "/")


def _tree_changes(tree_a: Any, tree_b: Any, tensors_a: dict, tensors_b: dict,
                  rules: _Rules) -> list[Change]:
    import logging

    from deepdiff import DeepDiff

    # deepdiff logs (to stderr, with no handler configured) about keys whose repr it cannot
    # parse back, e.g. an opaque value; ckpttool's paths use the list form, which has no such
    # trouble, and stderr is for ckpttool's one-line errors.
    deepdiff_log = logging.getLogger("deepdiff")
    level = deepdiff_log.level
    deepdiff_log.setLevel(logging.CRITICAL + 1)
    try:
        return _deepdiff_changes(DeepDiff, tree_a, tree_b, tensors_a, tensors_b, rules)
    finally:
        deepdiff_log.setLevel(level)


def _deepdiff_changes(deepdiff: Any, tree_a: Any, tree_b: Any, tensors_a: dict,
                      tensors_b: dict, rules: _Rules) -> list[Change]:
    try:
        # threshold_to_diff_deeper=0: keys added and removed one by one, however few two
        # dicts share (deepdiff would otherwise call two such dicts one changed value)
        found = deepdiff(tree_a, tree_b, view="tree", verbose_level=2,
                         threshold_to_diff_deeper=0)
    except RecursionError:
        raise InputError("the checkpoints nest too deeply to compare") from None
    under_a, under_b = _prefix_counts(tensors_a), _prefix_counts(tensors_b)
    changes = []
    for report, levels in found.items():
        for level in levels:
            keys = tuple(level.path(output_format="list"))
            path = join_location(keys)
            a = MISSING if report.endswith("_added") else level.t1
            b = MISSING if report.endswith("_removed") else level.t2
            itself = isinstance(a, _TensorLeaf) or isinstance(b, _TensorLeaf)
            held = 0
            if report.endswith("_added"):
                kind = "added"
                held = under_b.get(keys, 0)
            elif report.endswith("_removed"):
                kind = "removed"
                held = under_a.get(keys, 0)
            elif report == "values_changed":
                if rules.close(a, b):
                    continue
                kind = "value"
            elif report == "type_changes":
                # 1 and 1.0 differ in type exactly; under a tolerance only their values count
                if (rules.rtol or rules.atol) and rules.close(a, b):
                    continue
                kind = "type"
            else:  # repetition or attribute reports: deepdiff sees no other on plain trees
                kind = "value"
            changes.append(Change(
                path, kind, rules.section(path, itself),
                a=_describe(a, tensors_a.get(keys), rules.ckpt_a.file, held),
                b=_describe(b, tensors_b.get(keys), rules.ckpt_b.file, held),
                tensor=itself or held > 0))
    return changes


def _prefix_counts(tensors: dict[tuple, TensorRef]) -> dict[tuple, int]:
    """How many tensors lie under each path (a subtree that appears holds that many)."""
    counts: dict[tuple, int] = {}
    for path in tensors:
        for i in range(len(path) + 1):
            counts[path[:i]] = counts.get(path[:i], 0) + 1
    return counts


def _describe(value: Any, ref: TensorRef | None, file: TorchFile, held: int = 0) -> Any:
    """What a change shows of a value: scalars as they are, tensors and containers briefly
    (``<dict of 4, 4 tensors>``)."""
    if isinstance(value, _TensorLeaf):
        return _tensor_value(file, ref)
    holding = f", {_count(held, 'tensor')}" if held else ""
    if isinstance(value, Mapping):
        if "__class__" in value:
            return f"<{value['__class__']}{holding}>"
        return f"<dict of {len(value)}{holding}>"
    if isinstance(value, (list, tuple)) and (holding or len(value) > 8 or any(
            isinstance(v, (Mapping, list, tuple)) for v in value)):
        return f"<{type(value).__name__} of {len(value)}{holding}>"
    return value


# --- tensors -----------------------------------------------------------------------------------


def _tensor_changes(file_a: TorchFile, file_b: TorchFile, tensors_a: dict, tensors_b: dict,
                    rules: _Rules, progress: Any) -> tuple[list[Change], TensorCounts]:
    """Changes of the tensors at paths both trees hold: shape, dtype, then values."""
    changes: list[Change] = []
    to_compare: list[tuple[str, TensorRef, TensorRef]] = []
    in_both = 0
    for keys, ra in tensors_a.items():
        rb = tensors_b.get(keys)
        path = join_location(keys)
        if rb is None or not rules.wants_tensor(path):
            continue
        in_both += 1
        section = rules.section(path, True)
        if ra.dtype != rb.dtype:
            changes.append(Change(path, "dtype", section, ra.dtype, rb.dtype, tensor=True))
        elif ra.shape != rb.shape:
            changes.append(Change(path, "shape", section, list(ra.shape), list(rb.shape),
                                  tensor=True))
        else:
            to_compare.append((path, ra, rb, _pieces(file_a, ra, file_b, rb)))
    # Equal bytes mean equal tensors; only the pairs whose bytes differ are read as numbers.
    runs: dict[tuple, int] = {}
    pairs: list[tuple[ByteRun, ByteRun]] = []
    by_bytes: list[int | None] = []
    for _, _, _, pieces in to_compare:
        for pa, pb in pieces:
            run = _byte_runs(file_a, pa, file_b, pb)
            if run is None:
                by_bytes.append(None)
                continue
            # Storages are told apart by where their bytes are: keys repeat across the files
            # of a folder.
            ident = (file_a.locate(run[0].storage, run[0].start, run[0].length),
                     file_b.locate(run[1].storage, run[1].start, run[1].length))
            if ident not in runs:
                runs[ident] = len(pairs)
                pairs.append(run)
            by_bytes.append(runs[ident])
    torch_import = _TorchImport()
    # The statistics of differing tensors need torch only for dtypes numpy lacks (or without
    # numpy); its import then starts at the first difference, beside the rest of the comparison.
    needs_torch = _numpy() is None or any(
        ra.dtype not in NUMPY_DTYPES for _, ra, _, _ in to_compare)
    same = same_bytes(file_a, file_b, pairs, progress=progress,
                      on_difference=torch_import.start if needs_torch else None)
    changed = len(changes)
    indices = iter(by_bytes)
    for path, ra, rb, pieces in to_compare:
        stats = _Stats()
        for (pa, pb), index in zip(pieces, indices):
            if index is not None and same[index]:
                continue
            if pa.storage is None or pb.storage is None:  # meta tensors hold no data to differ
                continue
            if needs_torch:
                torch_import.wait()
            piece = _statistics(file_a, pa, file_b, pb, rules)
            stats.add(piece.n_diff, piece.max_abs, piece.max_rel)
        if stats.n_diff == 0:
            continue
        changed += 1
        changes.append(Change(
            path, "tensor", rules.section(path, True),
            a=_tensor_value(file_a, ra), b=_tensor_value(file_b, rb), tensor=True,
            max_abs=stats.max_abs, max_rel=stats.max_rel, n_diff=stats.n_diff, numel=ra.numel))
    return changes, TensorCounts(in_both, changed)


def _pieces(file_a: TorchFile, ra: TensorRef, file_b: TorchFile,
            rb: TensorRef) -> list[tuple[TensorRef, TensorRef]]:
    """The pairs of same-shaped views that make up two tensors of one shape: the tensors
    themselves, or for a tensor saved in chunks (a sharded tensor of a DCP folder, whose file
    has ``tensor_chunks``) the overlaps of the two chunk grids, each a view into one chunk of
    each side (chunk against chunk when both were sharded alike)."""
    grid_a, grid_b = _chunks(file_a, ra), _chunks(file_b, rb)
    if grid_a is None and grid_b is None:
        return [(ra, rb)]
    if grid_a and grid_b and [(o, c.shape) for o, c in grid_a] == [
            (o, c.shape) for o, c in grid_b]:
        return [(ca, cb) for (_, ca), (_, cb) in zip(grid_a, grid_b)]
    out = []
    for off_a, ca in grid_a or [((0,) * len(ra.shape), ra)]:
        for off_b, cb in grid_b or [((0,) * len(rb.shape), rb)]:
            lo = tuple(max(x, y) for x, y in zip(off_a, off_b))
            hi = tuple(min(x + n, y + m) for x, n, y, m in zip(off_a, ca.shape, off_b, cb.shape))
            if all(h > l for l, h in zip(lo, hi)):
                out.append((_window(ca, off_a, lo, hi), _window(cb, off_b, lo, hi)))
    return out


def _chunks(file: TorchFile, ref: TensorRef) -> Any:
    chunks = getattr(file, "tensor_chunks", None)
    return chunks(ref) if chunks is not None else None


def _window(ref: TensorRef, origin: tuple, lo: tuple, hi: tuple) -> TensorRef:
    """The view ``[lo, hi)`` (in the full tensor's coordinates) of a chunk placed at ``origin``."""
    if lo == origin and all(h - l == n for l, h, n in zip(lo, hi, ref.shape)):
        return ref
    start = ref.storage_offset + sum((l - o) * s for l, o, s in zip(lo, origin, ref.stride))
    return TensorRef(ref.dtype, tuple(h - l for l, h in zip(lo, hi)), ref.stride, start,
                     ref.storage)


def _byte_runs(file_a: TorchFile, ra: TensorRef, file_b: TorchFile,
               rb: TensorRef) -> tuple[ByteRun, ByteRun] | None:
    """The runs of bytes whose equality proves the tensors equal; None when bytes cannot tell
    (another layout, another byte order, or no data at all)."""
    if (ra.storage is None or rb.storage is None or ra.stride != rb.stride
            or (file_a.byteorder != file_b.byteorder and ra.itemsize > 1)):
        return None
    start_a, length = storage_extent(ra)
    start_b, _ = storage_extent(rb)
    return ByteRun(ra.storage, start_a, length), ByteRun(rb.storage, start_b, length)


def _tensor_value(file: TorchFile, ref: TensorRef | None) -> TensorValue | None:
    if ref is None:
        return None
    return TensorValue(ref.dtype, ref.shape, ref.device, _scalar(file, ref))


def _scalar(file: TorchFile, ref: TensorRef) -> Any:
    """The value of a one-element tensor (a step count, a tensor lr), else None."""
    if ref.numel != 1 or ref.storage is None:
        return None
    try:
        return file.scalar(ref)
    except (ValueError, InputError):
        return None


class _TorchImport:
    """Imports torch in the background from the first differing tensor on, so that the import
    overlaps the byte comparison of the rest; equal files never import it."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None

    def start(self, *_: Any) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=import_torch, daemon=True)
            self._thread.start()

    def wait(self) -> None:
        self.start()
        self._thread.join()


def import_torch() -> Any:
    """torch, imported without its warning that numpy is absent (ckpttool does not need it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
        import torch
    return torch


@dataclass
class _Stats:
    n_diff: int = 0
    max_abs: float | None = None
    max_rel: float | None = None

    def add(self, n_diff: int, max_abs: float | None, max_rel: float | None) -> None:
        self.n_diff += n_diff
        self.max_abs = _nan_max(self.max_abs, max_abs)
        self.max_rel = _nan_max(self.max_rel, max_rel)


def _nan_max(x: float | None, y: float | None) -> float | None:
    if x is None:
        return y
    if y is None:
        return x
    if math.isnan(x) or math.isnan(y):
        return math.nan
    return max(x, y)


# dtypes numpy holds as they are: their statistics need no torch (whose import costs more than
# a second); the others (bfloat16, float8, ...) are read with torch.
NUMPY_DTYPES = {
    "float16": "<f2", "float32": "<f4", "float64": "<f8", "complex64": "<c8",
    "complex128": "<c16", "int8": "i1", "int16": "<i2", "int32": "<i4", "int64": "<i8",
    "uint8": "u1", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8", "bool": "?",
}


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # not a dependency of ckpttool: torch then does the arithmetic
        return None
    return numpy


def _statistics(file_a: TorchFile, ra: TensorRef, file_b: TorchFile, rb: TensorRef,
                rules: _Rules) -> _Stats:
    """Differing elements, max |a-b| and max |a-b|/|b| of two tensors of one dtype and shape,
    read chunk by chunk (memory stays bounded whatever their size)."""
    np = _numpy() if ra.dtype in NUMPY_DTYPES else None
    torch = import_torch() if np is None else None
    stats = _Stats()
    for shape, sa, oa, sb, ob in _blocks(ra.shape, ra.stride, ra.storage_offset, rb.stride,
                                         rb.storage_offset, STATS_CHUNK):
        if np is not None:
            x = _read_numpy_block(np, file_a, ra, shape, sa, oa)
            y = _read_numpy_block(np, file_b, rb, shape, sb, ob)
            stats.add(*_compare_numpy_block(np, x, y, rules))
        else:
            x = _read_block(torch, file_a, ra, shape, sa, oa)
            y = _read_block(torch, file_b, rb, shape, sb, ob)
            stats.add(*_compare_block(torch, x, y, rules))
    return stats


def _read_numpy_block(np: Any, file: TorchFile, ref: TensorRef, shape: tuple, stride: tuple,
                      offset: int) -> Any:
    """One block of a tensor as a numpy view of its own dtype (native byte order)."""
    size = ref.itemsize
    n = extent(shape, stride)
    raw = file.read_storage(ref.storage, offset * size, n * size) if n else b""
    dtype = np.dtype(NUMPY_DTYPES[ref.dtype])
    if file.byteorder != "little":
        dtype = dtype.newbyteorder(">")
    flat = np.frombuffer(raw, dtype=dtype)
    return np.lib.stride_tricks.as_strided(flat, shape, tuple(s * size for s in stride),
                                           writeable=False)


def _compare_numpy_block(np: Any, x: Any, y: Any, rules: _Rules) -> tuple[int, Any, Any]:
    """:func:`_compare_block` with numpy: the elements whose bits differ are found first, and
    only those are compared as numbers (a tensor that differs in a few elements costs one pass
    over its bits)."""
    if x.size == 0:
        return 0, None, None
    if x.dtype == np.bool_:
        n = int(np.count_nonzero(x != y))
        return n, (1.0 if n else 0.0), None
    if x.dtype.kind == "c":  # the bits of the real and of the imaginary parts
        bits = np.dtype(f"u{x.dtype.itemsize // 2}")
        differ = (_bits_differ(np, x.real, y.real, bits)
                  | _bits_differ(np, x.imag, y.imag, bits))
    else:
        differ = _bits_differ(np, x, y, np.dtype(f"u{x.dtype.itemsize}"))
    if not differ.any():
        return 0, 0.0, 0.0
    wide = np.complex128 if x.dtype.kind == "c" else np.float64
    xs, ys = x[differ].astype(wide), y[differ].astype(wide)
    with np.errstate(all="ignore"):
        both_nan = np.isnan(xs) & np.isnan(ys)
        equal = (xs == ys) | both_nan
        dist = np.abs(xs - ys)
        if rules.rtol or rules.atol:
            close = equal | (dist <= rules.atol + rules.rtol * np.abs(ys))
        else:
            close = equal
        dist = np.where(equal, 0.0, dist)
        rel = np.where(equal, 0.0, dist / np.abs(ys))
    return int(np.count_nonzero(~close)), float(dist.max()), float(rel.max())


def _bits_differ(np: Any, x: Any, y: Any, bits: Any) -> Any:
    """Elementwise "the bits differ" of two same-dtype views (strided views compare as views)."""
    try:
        return x.view(bits) != y.view(bits)
    except ValueError:  # a strided view numpy will not reinterpret: compare by value, NaN-aware
        with np.errstate(all="ignore"):
            return (x != y) | (np.isnan(x) != np.isnan(y)) if x.dtype.kind == "f" else x != y


def _blocks(shape: tuple, stride_a: tuple, off_a: int, stride_b: tuple, off_b: int,
            limit: int) -> Iterator[tuple[tuple, tuple, int, tuple, int]]:
    """Pieces of a tensor in logical order, as (shape, stride_a, offset_a, stride_b, offset_b),
    each covering at most ``limit`` storage elements on either side (rows of the outermost
    dimension; a row too big on its own is split in turn). Both sides are cut at the same
    logical indices, so that a tensor laid out differently in A and B still lines up."""
    if not shape or max(extent(shape, stride_a), extent(shape, stride_b)) <= limit:
        yield shape, stride_a, off_a, stride_b, off_b
        return
    rows, rest = shape[0], shape[1:]
    row_a, row_b = extent(rest, stride_a[1:]), extent(rest, stride_b[1:])
    if max(row_a, row_b) > limit:
        for i in range(rows):
            yield from _blocks(rest, stride_a[1:], off_a + i * stride_a[0], stride_b[1:],
                               off_b + i * stride_b[0], limit)
        return
    per = rows
    for row, step in ((row_a, stride_a[0]), (row_b, stride_b[0])):
        if step > 0:
            per = min(per, (limit - row) // step + 1)
    per = max(per, 1)
    for i in range(0, rows, per):
        yield ((min(per, rows - i),) + rest, stride_a, off_a + i * stride_a[0], stride_b,
               off_b + i * stride_b[0])


def _read_block(torch: Any, file: TorchFile, ref: TensorRef, shape: tuple, stride: tuple,
                offset: int) -> Any:
    """One block of a tensor as a torch tensor of its own dtype, read raw from the file."""
    n = extent(shape, stride)
    size = ref.itemsize
    raw = bytearray(file.read_storage(ref.storage, offset * size, n * size)) if n else bytearray()
    flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    if file.byteorder != "little" and size > 1:  # saved on a big-endian machine
        flat = flat.view(-1, size).flip(1).reshape(-1)
    dtype = getattr(torch, ref.dtype)
    return flat.view(dtype).as_strided(shape, stride, 0)


def _compare_block(torch: Any, x: Any, y: Any, rules: _Rules) -> tuple[int, Any, Any]:
    """(differing elements, max |x-y|, max |x-y|/|y|) of two blocks; None where the dtype
    has no arithmetic (bit-pattern dtypes compare as bits)."""
    if x.dtype == torch.bool:
        return int((x != y).sum()), (1.0 if bool((x != y).any()) else 0.0), None
    wide = torch.complex128 if (x.is_complex()) else torch.float64
    try:
        xw, yw = x.to(wide), y.to(wide)
    except (RuntimeError, TypeError):  # float8 variants, bits: compare element bit patterns
        size = x.element_size()
        xb = x.contiguous().view(torch.uint8).reshape(-1, size)
        yb = y.contiguous().view(torch.uint8).reshape(-1, size)
        return int((xb != yb).any(1).sum()), None, None
    if x.numel() == 0:
        return 0, None, None
    both_nan = xw.isnan() & yw.isnan()
    equal = (xw == yw) | both_nan
    diff = (xw - yw).abs()
    if rules.rtol or rules.atol:
        close = equal | (diff <= rules.atol + rules.rtol * yw.abs())
    else:
        close = equal
    if not x.is_floating_point() and not x.is_complex():
        # integers: the count comes from exact comparison in their own dtype
        close = close & (x == y) if not (rules.rtol or rules.atol) else close
    n_diff = int((~close).sum())
    diff = diff.masked_fill(equal, 0.0)  # inf == inf would give inf - inf = nan
    max_abs = float(diff.max())
    rel = (diff / yw.abs()).masked_fill(equal, 0.0)
    max_rel = float(rel.max())
    return n_diff, max_abs, max_rel


# --- per state ---------------------------------------------------------------------------------


def _optimizer_diffs(ckpt_a: Checkpoint, ckpt_b: Checkpoint, changes: list[Change],
                     rules: _Rules) -> tuple[OptimizerDiff, ...]:
    out = []
    locations = dict.fromkeys([o.location for o in ckpt_a.optimizers]
                              + [o.location for o in ckpt_b.optimizers])
    for loc in locations:
        if rules.ignored(loc) or (rules.only and "optimizer" not in rules.only):
            continue
        oa, ob = _by_location(ckpt_a.optimizers, loc), _by_location(ckpt_b.optimizers, loc)
        groups = []
        if oa is not None and ob is not None:
            for i, (ga, gb) in enumerate(zip(oa.groups, ob.groups)):
                fa, fb = _group_fields(ga), _group_fields(gb)
                delta = tuple(
                    (k, fa.get(k, MISSING), fb.get(k, MISSING))
                    for k in dict.fromkeys([*fa, *fb])
                    if not rules.ignored(f"{loc}/param_groups/{i}/{k}")
                    and not _same(fa.get(k, MISSING), fb.get(k, MISSING), rules))
                if delta:
                    groups.append(GroupDiff(i, delta))
        state: dict[str, dict[str, int]] = {}
        for c in changes:
            sub = c.path[len(loc):].lstrip("/").split("/") if within(c.path, loc) else []
            if len(sub) == 3 and sub[0] == "state" and c.tensor:
                counts = state.setdefault(sub[2], {"added": 0, "removed": 0, "changed": 0})
                counts[c.kind if c.kind in ("added", "removed") else "changed"] += 1
        have = _state_key_counts(oa)
        diff_ = OptimizerDiff(
            loc, (oa.cls if oa else None, ob.cls if ob else None),
            (len(oa.groups) if oa else 0, len(ob.groups) if ob else 0), tuple(groups),
            tuple(StateDiff(k, n["changed"], n["added"], n["removed"], have.get(k, 0))
                  for k, n in state.items()))
        if diff_.changed:
            out.append(diff_)
    return tuple(out)


def _by_location(items: Iterable[Any], loc: str) -> Any:
    return next((x for x in items if x.location == loc), None)


def _group_fields(group: Any) -> dict[str, Any]:
    """A group's keys as a person reads them (``params`` as their number); a group without
    ``initial_lr`` has none (GroupInfo says None)."""
    fields = {"lr": group.lr, "initial_lr": group.initial_lr, "params": group.num_params,
              **group.hyper}
    if group.initial_lr is None:
        del fields["initial_lr"]
    return fields


def _state_key_counts(opt: OptimizerInfo | None) -> dict[str, int]:
    counts: dict[str, int] = {}
    if opt is None or not isinstance(opt.state.get("state"), Mapping):
        return counts
    for per_param in opt.state["state"].values():
        if isinstance(per_param, Mapping):
            for k in per_param:
                counts[str(k)] = counts.get(str(k), 0) + 1
    return counts


def _same(x: Any, y: Any, rules: _Rules) -> bool:
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_same(p, q, rules) for p, q in zip(x, y))
    if x is y or rules.close(x, y):
        return True
    try:
        return bool(x == y) and type(x) is type(y)
    except Exception:
        return False


def _scheduler_diffs(ckpt_a: Checkpoint, ckpt_b: Checkpoint, changes: list[Change],
                     rules: _Rules) -> tuple[SchedulerDiff, ...]:
    out = []
    locations = dict.fromkeys([s.location for s in ckpt_a.schedulers if s.location is not None]
                              + [s.location for s in ckpt_b.schedulers
                                 if s.location is not None])
    for loc in locations:
        if rules.ignored(loc) or (rules.only and "scheduler" not in rules.only):
            continue
        sa, sb = _by_location(ckpt_a.schedulers, loc), _by_location(ckpt_b.schedulers, loc)
        fields: list[tuple[str, Any, Any]] = []
        if sa is not None and sb is not None:
            state_a = sa.state if isinstance(sa.state, Mapping) else {}
            state_b = sb.state if isinstance(sb.state, Mapping) else {}
            plain_a, plain_b = _plain_state(ckpt_a, state_a), _plain_state(ckpt_b, state_b)
            keys = [k for k in SCHEDULER_FIELDS if k in plain_a or k in plain_b]
            keys += [k for k in dict.fromkeys([*plain_a, *plain_b]) if k not in keys]
            for k in keys:
                x, y = plain_a.get(k, MISSING), plain_b.get(k, MISSING)
                if not rules.ignored(f"{loc}/{k}") and not _same(x, y, rules):
                    fields.append((str(k), x, y))
            args = tuple((k, sa.args.get(k, MISSING), sb.args.get(k, MISSING))
                         for k in dict.fromkeys([*sa.args, *sb.args])
                         if not _same(sa.args.get(k, MISSING), sb.args.get(k, MISSING), rules))
        else:
            args = ()
        d = SchedulerDiff(loc, (sa.cls if sa else None, sb.cls if sb else None), tuple(fields),
                          args)
        if d.changed:
            out.append(d)
    return tuple(out)


def _plain_state(ckpt: Checkpoint, state: Mapping) -> dict[str, Any]:
    """A scheduler's stored keys with plain values: scalar tensors decoded, nested states
    (SequentialLR's ``_schedulers``) and opaque objects shown briefly."""
    out = {}
    for k, v in state.items():
        if isinstance(v, TensorRef):
            out[str(k)] = _scalar(ckpt.file, v) if v.numel == 1 else v
        elif isinstance(v, list) and all(isinstance(x, TensorRef) and x.numel == 1 for x in v) \
                and v:
            out[str(k)] = [_scalar(ckpt.file, x) for x in v]
        elif isinstance(v, (Mapping, Opaque)) or (
                isinstance(v, list) and any(isinstance(x, (Mapping, Opaque)) for x in v)):
            continue  # nested states and lambdas: their keys are in the changes list
        else:
            out[str(k)] = scalar_value(v) if not isinstance(v, (list, tuple)) else v
    return out


def _order(change: Change) -> tuple:
    """Sections in a fixed order, then paths as numbers read (group 10 after group 9)."""
    return (SECTIONS.index(change.section),
            tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in change.path.split("/")))


# --- the summary -------------------------------------------------------------------------------


def _summary(d: Diff) -> str:
    parts = []
    for o in d.optimizers:
        parts.append(f"{o.location}: {_optimizer_summary(o)}")
    for s in d.schedulers:
        parts.append(f"{s.location}: {_scheduler_summary(s)}")
    state_paths = {o.location for o in d.optimizers} | {s.location for s in d.schedulers}
    other = [c for c in d.changes if c.section == "other"]
    if other:
        if len(other) <= 3:
            parts.append("other: " + ", ".join(_phrase(c) for c in other))
        else:
            parts.append(f"other: {_count(len(other), 'value')} changed")
    for sect in ("optimizer", "scheduler"):
        loose = [c for c in d.changes if c.section == sect and not c.tensor
                 and not any(within(c.path, loc) for loc in state_paths)]
        if loose:
            parts.append(f"{sect}: {_count(len(loose), 'value')} changed")
    t = d.tensors
    if t.compared or t.added or t.removed or not d.only or "tensors" in d.only:
        text = f"{t.changed} of {_count(t.compared, 'tensor')} changed"
        extra = [f"{n} {what}" for n, what in ((t.added, "added"), (t.removed, "removed")) if n]
        parts.append(text + (", " + ", ".join(extra) if extra else ""))
    if d.equal:
        return (f"no differences ({_count(d.tensors.compared, 'tensor')} and "
                f"{_count(d.values_compared, 'value')} compared)")
    return "; ".join(parts)


def _class_change(cls: tuple[str | None, str | None]) -> str | list[str]:
    """A state only one side has, in words; else the start of its summary (a class change)."""
    if cls[0] is None:
        return f"added ({cls[1]})"
    if cls[1] is None:
        return f"removed ({cls[0]})"
    return [f"class {cls[0]} -> {cls[1]}"] if cls[0] != cls[1] else []


def _optimizer_summary(o: OptimizerDiff) -> str:
    bits = _class_change(o.cls)
    if isinstance(bits, str):
        return bits
    if o.group_count[0] != o.group_count[1]:
        bits.append(f"groups {o.group_count[0]} -> {o.group_count[1]}")
    per_key: dict[tuple[str, str], int] = {}
    for g in o.groups:
        for k, a, b in g.changes:
            how = "added to" if a is MISSING else "removed from" if b is MISSING else "changed in"
            per_key[k, how] = per_key.get((k, how), 0) + 1
    phrases: dict[tuple[str, int], list[str]] = {}
    for (k, how), n in per_key.items():
        phrases.setdefault((how, n), []).append(k)
    for (how, n), keys in phrases.items():
        bits.append(f"{', '.join(keys)} {how} {_count(n, 'group')}")
    for how in ("changed", "added", "removed"):
        keys = [st.key for st in o.state if getattr(st, how)]
        if keys:
            n = max(getattr(st, how) for st in o.state)
            bits.append(f"{', '.join(keys)} {how} for {_count(n, 'param')}")
    return "; ".join(bits) if bits else "changed"


def _scheduler_summary(s: SchedulerDiff) -> str:
    bits = _class_change(s.cls)
    if isinstance(bits, str):
        return bits
    for k, x, y in s.fields:
        if isinstance(x, (list, tuple, TensorRef)) or isinstance(y, (list, tuple, TensorRef)):
            bits.append(f"{k} changed")
        else:
            bits.append(f"{k} {_short(x)} -> {_short(y)}")
    return ", ".join(bits) if bits else "arguments changed"


def _phrase(c: Change) -> str:
    """A change in a few words: ``epoch 3 -> 4``, ``step added``."""
    if c.kind in ("added", "removed"):
        return f"{c.path} {c.kind}"
    if c.kind == "tensor":
        return f"{c.path} changed"
    return f"{c.path} {_short(c.a)} -> {_short(c.b)}"


def _short(value: Any) -> str:
    if value is MISSING:
        return "-"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
