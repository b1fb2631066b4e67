"""The resume-safe recompute behind ``ckpttool reschedule``.

The rewritten checkpoint holds exactly what a run with the new schedule would hold at the resume
step ("replay"): a stand-in optimizer of the stored class with the stored groups (new base lrs),
the new scheduler constructed on it with ``last_epoch=-1``, the real torch scheduler stepped N
times. Written back: the new scheduler ``state_dict()`` and, in each param group, every key the
scheduler owns (lr, initial_lr, momentum/betas when cycled, max_lr, min_lr, max_momentum,
base_momentum). Nothing else in the file changes. Learning rates never come from a closed form of
our own (torch-scheduler-state.md sections 3-5).

Example:
    >>> import ckpttool
    >>> plan = ckpttool.reschedule("fixtures/adamw_cosine.pt",                  # doctest: +SKIP
    ...                            scheduler="CosineAnnealingLR(T_max=80, eta_min=1e-05)")
    >>> plan.save("extended.pt")                                                # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
import secrets
import stat
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from ckpttool import hf_resume, inspection
from ckpttool.directories import FOLDER_KINDS, read_any
from ckpttool.errors import CkptToolError, ReplayError, StateError
from ckpttool.hf_resume import HFResume
from ckpttool.inspection import Checkpoint, OptimizerInfo, SchedulerReport
from ckpttool.schedulers import (
    SCHEDULER_SET_KEYS,
    SchedulerInfo,
    format_call,
    identify_scheduler,
    replay_steps,
    same,
)
from ckpttool.serialization import TensorRef

RESCHEDULE_SCHEMA = "ckpttool.reschedule/1"
PLATEAU = "ReduceLROnPlateau"
# Classes that set the group lr from their own arguments, not from the group's base lr.
_OWN_LR_CLASSES = ("OneCycleLR", "CyclicLR")
# ReduceLROnPlateau arguments that can be changed in place (the rest of its state is history).
_PLATEAU_ARGS = {"mode", "factor", "patience", "threshold", "threshold_mode", "cooldown",
                 "min_lr", "eps"}
DEFAULT_VERIFY_STEPS = 10


@dataclass(frozen=True)
class GroupChange:
    """What the rewrite does to one param group: (old, new) per scheduler-owned key."""

    index: int
    changes: dict[str, tuple[Any, Any]]
    removed: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rescheduled:
    """A planned rewrite: the new tree, what changed, and how to check a resume from it.

    ``save(path)`` writes it atomically and verifies the result by loading it the documented way.
    """

    source: Checkpoint
    optimizer: str
    scheduler: str  # location of the (new or replaced) scheduler state
    old_call: str | None
    new_call: str
    semantics: str  # "replay" or "plateau-in-place"
    steps: int
    groups: tuple[GroupChange, ...]
    old_state: Mapping | None
    new_state: Mapping
    notes: tuple[str, ...]
    root: Any = field(repr=False)
    info: SchedulerInfo | None = field(repr=False, default=None)  # None for a factory
    factory_text: str | None = None  # "my_sched.py:make" when the schedule came from one
    optimizer_path: tuple = ()
    scheduler_path: tuple = ()
    # lrs (and momentum/betas) per group for the steps after the resume point, from the replay
    expected: list = field(repr=False, default_factory=list)
    _rebuild: Callable | None = field(repr=False, default=None)
    hf: HFResume | None = None  # an HF Trainer folder: the TrainingArguments to resume with
    old_scheduler: SchedulerReport | None = field(repr=False, default=None)  # the stored one

    def rebuild(self) -> tuple[Any, Any] | None:
        """A fresh (stand-in optimizer, new scheduler) pair at step 0, built as the replay
        built it (the same groups and base lrs, the new schedule); stepping it N times gives
        the planned state. None for ReduceLROnPlateau changed in place (nothing is replayed).

        Example:
            >>> plan = reschedule("fixtures/adamw_cosine.pt", sets=["T_max=80"])  # doctest: +SKIP
            >>> optimizer, scheduler = plan.rebuild()                             # doctest: +SKIP
        """
        return self._rebuild() if self._rebuild is not None else None

    @property
    def changed(self) -> bool:
        return any(g.changes or g.removed for g in self.groups) or self.old_state is None or (
            not same(self.old_state, self.new_state))

    @property
    def is_folder(self) -> bool:
        """The checkpoint is a folder (HF Trainer, accelerate, DCP): saved as a new folder."""
        return self.source.kind in FOLDER_KINDS

    @property
    def rewritten(self) -> tuple[str, ...] | None:
        """The files of a checkpoint folder that the rewrite writes anew (every other file is
        copied byte for byte): an HF Trainer or accelerate folder's rewritten files, a DCP
        folder's ``.metadata`` and new shard (:attr:`dcp`); None for a file."""
        if self.dcp is not None:
            from ckpttool.directories import DCP_METADATA

            return (DCP_METADATA,) + ((self.dcp.shard,) if self.dcp.shard else ())
        if self.source.kind not in ("hf-trainer", "accelerate"):
            return None
        return tuple(name for name, member in self.source.file.members.items()
                     if self.root[name] is not member.root)

    @cached_property
    def dcp(self) -> Any:
        """For a DCP folder, what the rewrite changes in it (a
        :class:`ckpttool.dcp_write.DCPChanges`: the entries stored anew in a new shard, those
        dropped, the shards copied), decided as the writer decides, without writing; None for
        any other kind."""
        if self.source.kind != "dcp":
            return None
        from ckpttool.dcp_write import plan_changes

        return plan_changes(self.source.file, self.root)

    def save(self, path: str | os.PathLike, *, force: bool = False,
             verify_steps: int = DEFAULT_VERIFY_STEPS, progress=None,
             staged: Any = None, option: str | None = None) -> SaveResult:
        """Write the rewritten checkpoint to ``path`` and verify the resume, atomically.

        The file is written beside ``path`` under a hidden name, verified there, and only then
        renamed to ``path``: a failed write or verification leaves ``path`` as it was (absent,
        or the file ``force`` would have replaced). ``option`` is the command-line option that
        named ``path`` (``-o``, ``--out-dir``), for the messages. ``staged`` is the
        :class:`ckpttool.serialization.StagedWrite` that :func:`start_output` began before the
        replay, so that the big tensor records were being copied meanwhile.

        A file output keeps the mode of the file it replaces; a new one gets the input's mode
        less the umask (as ``cp`` does). ``force`` replaces only what the output stands for: a
        file with a file, a checkpoint folder with an empty folder or a checkpoint folder of
        its kind. Once the output has its name, what could not be finished (the rename made
        durable, an old folder removed) is a warning in :attr:`SaveResult.warnings`: the output
        is in place and verified.

        Raises:
            CkptToolError: ``path`` is or holds the input (compared by identity, so a bind
                mount or a hard link is seen through), exists (without ``force``), is of
                another kind, the write failed, or the written file does not resume as
                replayed; in every case nothing is left behind.
        """
        path = os.fspath(path)
        _check_output(self.source, path, force, option)
        target = os.path.realpath(path)
        # A file replaced keeps its mode; a new one gets the input's, less the umask (as cp).
        mode = None if self.is_folder else (
            _mode(target) if os.path.exists(target) else _mode(self.source.path) & ~_umask())
        verified = self._write_verified(pending_path(path), verify_steps, progress, staged, mode)
        if self.is_folder:  # an existing folder (--force) is renamed aside, then removed
            from ckpttool.folder_output import publish

            return SaveResult(target, verified, warnings=publish(pending_path(target), target))
        _replace(pending_path(target), target)
        return SaveResult(target, verified, warnings=_synced(target))

    def _write_verified(self, pending: str, verify_steps: int, progress, staged,
                        mode: int | None = None) -> int:
        """Write to ``pending`` (a file: with the permission bits ``mode``) and verify it; on
        any failure remove it. Returns the steps verified."""
        from ckpttool.serialization import write_checkpoint

        remove = _remove
        if self.is_folder:
            from ckpttool.folder_output import remove_tree, write_folder

            write_folder(self.source.file, self.root, pending, progress=progress)
            remove = remove_tree
        elif staged is None or staged.finish(self.root, progress=progress) is None:
            write_checkpoint(self.source.file, self.root, pending, progress=progress)
        try:
            if mode is not None:
                _set_mode(pending, mode)
            verdict = self.verify(pending, verify_steps)
            if verdict is not True:
                raise StateError(f"the rewritten checkpoint does not resume as replayed "
                                 f"({verdict}); nothing was written")
        except BaseException:
            remove(pending)
            raise
        possible = next((i for i, e in enumerate(self.expected) if isinstance(e, tuple)),
                        len(self.expected))
        return min(verify_steps, possible) if self.semantics == "replay" else 0

    def save_in_place(self, *, backup: bool = True, force: bool = False,
                      staged: Any = None, progress=None) -> SaveResult:
        """Rewrite the source file (or folder) itself: the new one is written and verified
        beside it, then the source becomes its backup (unless ``backup=False``:
        ``SOURCE.bak``, or for a checkpoint folder a name its framework does not take for a
        checkpoint, :func:`ckpttool.folder_output.backup_path`) and the new one takes its name
        (a file keeps the source's mode). At every moment one complete copy of the data exists
        under a known name.

        Raises:
            StateError: the source is itself such a backup (:func:`check_in_place`), or its
                backup exists (without ``force``); or as :meth:`save`.
        """
        from ckpttool.folder_output import backup_path

        check_in_place(self.source)
        src = os.path.realpath(self.source.path)  # through a symlink: rewrite its target
        bak, why = backup_path(self.source.kind, src)
        if backup and os.path.lexists(bak) and not force:
            raise StateError(f"{bak} exists; pass --force to replace that backup, or move it")
        pending = pending_path(src)
        if self.is_folder:
            from ckpttool.folder_output import aside_path, check_free, publish

            check_free(pending, aside_path(src), aside_path(bak))
            verified = self._write_verified(pending, DEFAULT_VERIFY_STEPS, progress, None)
            warnings = publish(pending, src, keep=bak if backup else None)
            return SaveResult(src, verified, bak if backup else None, why if backup else None,
                              warnings)
        verified = self._write_verified(pending, DEFAULT_VERIFY_STEPS, progress, staged,
                                        _mode(src))
        try:
            # The backup becomes a second name of the source, then the new file takes the
            # source's name in one rename: the name never goes missing. Where hard links
            # cannot be made, the source is renamed to the backup first.
            linked = backup and _link(src, bak)
            if backup and not linked:
                os.replace(src, bak)
            try:
                os.replace(pending, src)
            except BaseException:
                if linked:
                    _remove(bak)
                elif backup:
                    os.replace(bak, src)  # put the original back under its own name
                raise
        except BaseException:
            _remove(pending)
            raise
        return SaveResult(src, verified, bak if backup else None, warnings=_synced(src))

    def verify(self, path: str, steps: int = DEFAULT_VERIFY_STEPS) -> bool | str:
        """Load ``path`` the documented way and compare the next ``steps`` lrs with the replay
        (and, for an HF Trainer folder, check the trainer_state.json fields rewritten)."""
        from ckpttool import schedule

        file = read_any(path)
        verdict = schedule.verify_resume(self, file, steps)
        for key, (_, new) in (self.hf.trainer_state.items() if self.hf else ()):
            got = file.root.get(hf_resume.TRAINER_STATE, {}).get(key)
            if verdict is True and got != new:
                verdict = f"{hf_resume.TRAINER_STATE} says {key} {got!r}, not {new!r}"
        return verdict

    def __str__(self) -> str:
        """The report ``ckpttool reschedule --dry-run`` prints: per group old -> new, the
        scheduler, and the resume recipe."""
        from ckpttool.render import reschedule_text

        return reschedule_text(self)

    def to_dict(self) -> dict:
        from ckpttool.render import hf_resume_dict, jsonable

        rewritten = self.rewritten
        return {
            "schema": RESCHEDULE_SCHEMA,
            "path": self.source.path,
            "kind": self.source.kind,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "semantics": self.semantics,
            "step": self.steps,
            "old": self.old_call,
            "new": self.new_call,
            "groups": [{"index": g.index,
                        "changes": {k: {"old": jsonable(a), "new": jsonable(b)}
                                    for k, (a, b) in g.changes.items()},
                        "removed": list(g.removed)} for g in self.groups],
            "notes": list(self.notes),
            "load_order": LOAD_ORDER,
            "rewritten": list(rewritten) if rewritten is not None else None,
            "hf": hf_resume_dict(self) if self.hf is not None else None,
            "dcp": ({"written": list(self.dcp.written), "removed": list(self.dcp.removed),
                     "shard": self.dcp.shard, "copied": list(self.dcp.copied),
                     "left_out": list(self.dcp.left_out)} if self.dcp is not None else None),
        }


def pending_path(target: str) -> str:
    """Where a rewrite is written and verified before it takes ``target``'s name (beside the
    file a symlink points to: a symlinked target is written through, as ``cp`` does)."""
    folder, name = os.path.split(os.path.realpath(target))
    return os.path.join(folder, f".{name}.ckpttool-new")


def _link(src: str, target: str) -> bool:
    """Make ``target`` a second name of the file ``src`` (replacing a ``target`` there, in one
    rename); False where the filesystem or the OS does not allow a hard link."""
    try:
        os.link(src, target)
        return True
    except FileExistsError:  # --force over an old backup: link beside it, then replace it
        pass
    except OSError:
        return False
    folder, name = os.path.split(target)
    tmp = os.path.join(folder, f".{name[:180]}.{secrets.token_hex(4)}.ckpttool-link")
    try:
        os.link(src, tmp)
    except OSError:
        return False
    try:
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
    return True


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _replace(pending: str, target: str) -> None:
    """Rename the verified file ``pending`` to ``target``; if that fails, remove it."""
    try:
        os.replace(pending, target)
    except BaseException:
        _remove(pending)
        raise


def _synced(path: str) -> tuple[str, ...]:
    """fsync the folder of ``path``, which has just taken its name: the warning when that
    fails (the output is in place), none when done."""
    from ckpttool.folder_output import sync_warning

    warning = sync_warning(os.path.dirname(os.path.abspath(path)), path)
    return (warning,) if warning else ()


def _mode(path: str) -> int:
    """The permission bits of the file ``path``."""
    return stat.S_IMODE(os.stat(path).st_mode)


def _umask() -> int:
    """The process's umask: from /proc where Linux shows it, else set and put back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _set_mode(path: str, mode: int) -> None:
    """Give the written file ``path`` the permission bits ``mode``, durably (nothing to do,
    and no second fsync, when it has them)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
            os.fchmod(fd, mode) if hasattr(os, "fchmod") else os.chmod(path, mode)
            os.fsync(fd)
    finally:
        os.close(fd)


def check_in_place(source: Checkpoint) -> None:
    """Refuse to rewrite in place a checkpoint named as ckpttool names the backups an in-place
    rewrite keeps (:func:`ckpttool.folder_output.is_backup`): its rewrite would replace the
    original that backup holds (and, without a backup, lose it).

    Raises:
        StateError: saying how to reschedule it instead.

    Example:
        >>> check_in_place(ckpttool.load("run/bak-checkpoint-20"))            # doctest: +SKIP
        Traceback (most recent call last):
        StateError: run/bak-checkpoint-20 is named as the backup ...
    """
    from ckpttool.folder_output import is_backup

    if is_backup(source.path, source.kind):
        raise StateError(f"{source.path} is named as the backup ckpttool keeps of a checkpoint "
                         "rewritten in place; rewriting it in place would replace that "
                         "original: write a rescheduled copy with -o OUT (or rename it first)")


def _check_output(source: Checkpoint, path: str, force: bool,
                  option: str | None = None) -> None:
    """Refuse an output that is the input, inside or around an input folder (by identity:
    :func:`ckpttool.folder_output.relation`), of another kind than the output (a folder over a
    file, a file over a folder, a folder over a folder that is not a checkpoint of this kind
    and not empty), or that exists (without ``force``); ``option`` named it on the command
    line."""
    from ckpttool.folder_output import aside_path, check_free, relation

    # from the command line, the option that named it; from Python, save()'s arguments
    force_text = "--force" if option else "force=True"
    option = option or "path"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise StateError(f"{os.path.dirname(path) or parent}: no such folder for the output "
                         f"{path}; create it first (--out-dir creates the folders it needs)")
    out = os.path.realpath(path)
    where = relation(path, source.path)
    if where == "same":
        raise StateError("the output is the input; use --in-place (it keeps a backup)")
    if where == "inside":
        raise StateError(f"{path} is inside the input folder {source.path}; write the new "
                         "folder outside it")
    if where == "contains":
        raise StateError(f"{path} contains the input {source.path}; replacing it would "
                         f"remove the input: choose another {option}")
    if os.path.exists(path):
        _check_replaceable(source, path, option)
        if not force:
            raise StateError(f"{path} exists; pass {force_text} to overwrite it, or choose "
                             f"another {option}")
    if source.kind in FOLDER_KINDS:
        check_free(pending_path(out), aside_path(out))


def _check_replaceable(source: Checkpoint, path: str, option: str) -> None:
    """Refuse an existing ``path`` that the output of ``source`` must not replace, even with
    --force: only a file replaces a file, and a checkpoint folder replaces an empty folder or
    a checkpoint folder of its own kind."""
    from ckpttool.directories import directory_kind

    folder = source.kind in FOLDER_KINDS
    if os.path.isdir(path):
        if not folder:
            name = os.path.basename(os.path.normpath(source.path))
            raise StateError(f"{path} is a folder; name the output file ({option} "
                             f"{os.path.join(path, name)})")
        kind = directory_kind(path)
        if kind != source.kind and os.listdir(path):
            what = f"a {kind} checkpoint" if kind else "not a checkpoint folder"
            raise StateError(f"{path} exists and is {what}; --force replaces only an empty "
                             f"folder or a checkpoint folder of its kind ({source.kind}): "
                             f"choose another {option}, or move it away first")
    elif not os.path.isfile(path) or folder:
        what = "a file" if os.path.isfile(path) else "neither a file nor a folder"
        raise StateError(f"{path} exists and is {what}; a "
                         f"{'checkpoint folder' if folder else 'checkpoint file'} cannot "
                         f"replace it: choose another {option}")


def start_output(source: Checkpoint, path: str | os.PathLike, *, optimizer: str | None = None,
                 scheduler_state: str | None = None, force: bool = False,
                 option: str | None = None) -> Any:
    """Start copying the tensor records that a reschedule of ``optimizer`` cannot change into
    the file that will become ``path`` (or, for ``--in-place``, the source), before the replay
    (which imports torch) runs; pass the result to :meth:`Rescheduled.save`. None where nothing
    can be staged (a legacy file; no storages). The output is checked first (as ``save``
    checks it; ``--in-place``: :func:`check_in_place`).

    The records kept are the input's storages, in the order its pickle names them, up to the
    first one inside the param groups or the scheduler that the rewrite replaces
    (``optimizer`` and ``scheduler_state`` as for :func:`reschedule`; ``option`` as for
    :meth:`Rescheduled.save`).
    """
    from ckpttool.serialization import StagedWrite, TensorRef, walk

    path = os.fspath(path)
    if os.path.realpath(path) == os.path.realpath(source.path):  # --in-place passes the source
        check_in_place(source)
    else:
        _check_output(source, path, force, option)
    file = source.file
    if source.kind in FOLDER_KINDS or file.kind != "torch-zip" or not file.storage_order:
        return None
    chosen = choose_states(source, optimizer, scheduler_state)
    opt, sched = chosen.optimizer, chosen.scheduler
    paths = _state_paths(source)
    changing: set[str] = set()
    for subtree in [paths[opt.location] + ("param_groups",)] + (
            [paths[sched.location]] if sched is not None else []):
        node = file.root
        for key in subtree:
            node = node[key]
        changing.update(v.storage.key for _, v in walk(node)
                        if isinstance(v, TensorRef) and v.storage is not None)
    keep = []
    for key in file.storage_order:
        if key in changing:
            break
        keep.append(key)
    return StagedWrite(file, pending_path(path), keep) if keep else None


@dataclass(frozen=True)
class SaveResult:
    """Where a rewrite was written, and how many resumed steps were verified bit for bit."""

    path: str
    verified_steps: int
    backup: str | None = None  # --in-place: where the original now is
    backup_why: str | None = None  # why the backup is not named SOURCE.bak
    # what could not be finished once the output had its name (a rename not made durable, an
    # old folder left aside), one line each: the output is in place and verified
    warnings: tuple[str, ...] = ()


LOAD_ORDER = ("optimizer = Opt(params, ...); scheduler = <new constructor line>(optimizer); "
              "optimizer.load_state_dict(ckpt[...]); scheduler.load_state_dict(ckpt[...])")


@dataclass(frozen=True)
class ChosenStates:
    """The optimizer a reschedule rewrites and the stored scheduler state that drives it.

    Attributes:
        optimizer: the optimizer's report.
        scheduler: the scheduler state's report (None: the optimizer has none), identified
            against the chosen optimizer's groups.
        notes: what a choice overrode (a pairing the file suggested otherwise, other
            schedulers paired with this optimizer, left as stored).
    """

    optimizer: OptimizerInfo
    scheduler: SchedulerReport | None
    notes: tuple[str, ...] = ()


def choose_states(ckpt: Checkpoint, optimizer: str | None = None,
                  scheduler_state: str | None = None) -> ChosenStates:
    """Which optimizer to rewrite and which stored scheduler state drives it: the one
    optimizer, or the one at ``optimizer``; its scheduler as the file pairs them
    (:func:`ckpttool.layout.pair_schedulers`), or the state at ``scheduler_state``, which
    overrides that pairing (a Lightning checkpoint stores none: its lists are parallel by
    convention only). With ``scheduler_state`` alone, its optimizer is the one it is paired
    with.

    Raises:
        StateError: naming the option to pass: several optimizers and no choice; a pairing
            the file leaves ambiguous; several schedulers paired with the optimizer; no state
            at a location; a scheduler state whose group count is not the optimizer's.

    Example:
        >>> ckpt = ckpttool.load("fixtures/dirs/lightning/two_optimizers.ckpt")   # doctest: +SKIP
        >>> chosen = choose_states(ckpt, scheduler_state="lr_schedulers/1")       # doctest: +SKIP
        >>> chosen.optimizer.location, chosen.scheduler.cls                       # doctest: +SKIP
        ('optimizer_states/1', 'StepLR')
    """
    if scheduler_state is None:
        opt = _choose_optimizer(ckpt, optimizer)
        return _unique(ckpt, ChosenStates(opt, _paired_scheduler(ckpt, opt)))
    sched = next((s for s in ckpt.schedulers if s.location == scheduler_state), None)
    if sched is None:
        listed = ", ".join(s.location or "?" for s in ckpt.schedulers) or "none"
        raise StateError(f"{ckpt.path}: no scheduler state at --scheduler-state "
                         f"{scheduler_state!r}; scheduler states: {listed}")
    if optimizer is None and len(ckpt.optimizers) > 1:
        if sched.optimizer is None:
            raise StateError(f"{ckpt.path}: --scheduler-state {sched.location} is paired with "
                             f"no optimizer ({sched.pairing}); say which one it drives with "
                             "--optimizer LOCATION")
        optimizer = sched.optimizer
    opt = _choose_optimizer(ckpt, optimizer)
    groups = len(opt.state["param_groups"])
    count = _group_count(sched)
    if count is not None and count != groups:
        raise StateError(f"{ckpt.path}: --scheduler-state {sched.location} holds lrs for "
                         f"{_plural(count, 'param group')} and {opt.location} has {groups}: it "
                         f"cannot drive it; choose the scheduler state of {opt.location} "
                         "(`ckpttool show` lists which drives which)")
    notes = []
    if sched.optimizer != opt.location:
        was = (f"paired with {sched.optimizer} by {sched.pairing}" if sched.optimizer
               else f"not paired ({sched.pairing})")
        notes.append(f"{sched.location} was {was}; rescheduled as the scheduler of "
                     f"{opt.location}, as --scheduler-state chose")
        sched = replace(sched, optimizer=opt.location, pairing="--scheduler-state",
                        info=identify_scheduler(sched.state, list(opt.state["param_groups"])))
    others = [s.location for s in ckpt.schedulers if s.location != sched.location and (
        s.optimizer == opt.location or _may_drive(s, opt))]
    if others:
        notes.append(f"{', '.join(map(str, others))} {'is' if len(others) == 1 else 'are'} "
                     f"also paired (or may be) with {opt.location}; left as stored")
    return _unique(ckpt, ChosenStates(opt, sched, tuple(notes)))


def _unique(ckpt: Checkpoint, chosen: ChosenStates) -> ChosenStates:
    """``chosen``, unless a location it names is shared by another state: a key holding a ``/``
    (``{"a/b": ..., "a": {"b": ...}}``) makes two states answer to ``a/b``, and a rewrite of
    one could land on the other."""
    locations = [s.location for s in (*ckpt.optimizers, *ckpt.schedulers)]
    for state in (chosen.optimizer, chosen.scheduler):
        if state is not None and locations.count(state.location) > 1:
            raise StateError(f"{ckpt.path}: two states are at {state.location!r} (a key holds a "
                             "'/'), so ckpttool cannot tell which to rewrite; rename the key in "
                             "the script that saves it")
    return chosen


def _choose_optimizer(ckpt: Checkpoint, location: str | None) -> OptimizerInfo:
    if not ckpt.optimizers:
        raise StateError(f"{ckpt.path}: no optimizer state in this checkpoint; nothing to "
                         "reschedule")
    if location is not None:
        try:
            return ckpt.optimizer(location)
        except KeyError:
            raise StateError(f"{ckpt.path}: no optimizer at --optimizer {location!r}; "
                             "optimizers: "
                             + ", ".join(o.location for o in ckpt.optimizers)) from None
    if len(ckpt.optimizers) > 1:
        raise StateError(f"{ckpt.path} holds {len(ckpt.optimizers)} optimizers ("
                         + ", ".join(o.location for o in ckpt.optimizers)
                         + "); choose one with --optimizer LOCATION")
    return ckpt.optimizers[0]


def _paired_scheduler(ckpt: Checkpoint, opt: OptimizerInfo) -> SchedulerReport | None:
    """The scheduler the file pairs with ``opt``, or None; refused where that is unclear."""
    unsure = [s for s in ckpt.schedulers if _may_drive(s, opt)]
    mine = [s for s in ckpt.schedulers if s.optimizer == opt.location]
    if unsure:
        candidates = ", ".join(str(s.location) for s in mine + unsure)
        raise StateError(f"{ckpt.path}: scheduler {unsure[0].location} could drive "
                         f"{unsure[0].pairing.removeprefix('ambiguous: ')}; the file does not "
                         "say which, so ckpttool will not guess: name the scheduler state of "
                         f"{opt.location} with --scheduler-state LOCATION ({candidates})")
    if len(mine) > 1:
        raise StateError(f"{ckpt.path}: several schedulers are paired with {opt.location} ("
                         + ", ".join(str(s.location) for s in mine) + "); choose the one to "
                         "rewrite with --scheduler-state LOCATION (schedulers that step one "
                         "optimizer together cannot be replayed one by one)")
    return mine[0] if mine else None


def _may_drive(sched: SchedulerReport, opt: OptimizerInfo) -> bool:
    """``sched`` is ambiguous between optimizers, ``opt`` one of them."""
    return (sched.optimizer is None and (sched.pairing or "").startswith("ambiguous")
            and opt.location in sched.pairing.removeprefix("ambiguous: ").replace(
                " or ", ", ").split(", "))


def _group_count(sched: SchedulerReport) -> int | None:
    """How many param groups a scheduler state holds lrs for (its first child's, for a
    SequentialLR / ChainedScheduler), None where it does not say."""
    for values in (sched.base_lrs, sched.last_lr):
        if values is not None:
            return len(values)
    return next((n for c in sched.children if (n := _group_count(c)) is not None), None)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _set_at(root: Any, path: tuple, value: Any) -> Any:
    """A copy of ``root`` with the value at ``path`` replaced, copying only the containers on the
    way (everything else stays shared, so the writer re-emits it exactly)."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(root, Mapping):
        new = copy.copy(root)
        new[key] = _set_at(root[key] if key in root else None, rest, value)
        return new
    if isinstance(root, list):
        new = list(root)
        new[key] = _set_at(root[key], rest, value)
        return new
    if isinstance(root, tuple):
        items = list(root)
        items[key] = _set_at(root[key], rest, value)
        return tuple(items)
    raise StateError(f"cannot rewrite inside a {type(root).__name__} at {path!r}")


def _state_paths(ckpt: Checkpoint) -> dict[str, tuple]:
    """Tree path of every optimizer and scheduler state, by location (one walk)."""
    from ckpttool.layout import find_states

    optimizers, schedulers = find_states(ckpt.file.root)
    return {site.location: site.path for site in optimizers + schedulers}


def reschedule(source: str | os.PathLike | Checkpoint, *, scheduler: Any = None,
               sets: list[str] | tuple[str, ...] = (), lr: list[str] | tuple[str, ...] = (),
               scale_lr: float | None = None, step: int | None = None,
               device: str | None = None, optimizer: str | None = None,
               scheduler_state: str | None = None, momentum: float | None = None,
               scheduler_key: str = "scheduler", progress=None) -> Rescheduled:
    """Plan the rewrite of a checkpoint's schedule by replaying the real torch scheduler.

    Args:
        source: a checkpoint path, or a :class:`ckpttool.Checkpoint` from ``ckpttool.load``.
        scheduler: the new schedule: a SPEC string (``"CosineAnnealingLR(T_max=2000)"``), a
            ``FILE.py:FUNC`` / ``module:FUNC`` factory string, or a callable
            ``f(optimizer) -> scheduler``; None keeps the stored class and arguments.
        sets: ``NAME=VALUE`` changes to the (stored or given) schedule's arguments.
        lr: ``["VALUE"]`` for every group or ``["GROUP=VALUE", ...]``: new base lrs.
        scale_lr: multiply the base lrs by this factor.
        step: the resume position (default: the stored one).
        device: where tensor lrs are re-stepped (default: where they were saved, else cpu).
        optimizer: the optimizer's location when the checkpoint holds several.
        scheduler_state: the location of the stored scheduler state that drives it, where the
            file's pairing is ambiguous or wrong (see :func:`choose_states`).
        momentum: the momentum / beta1 to leave when the new schedule no longer cycles it.
        scheduler_key: the key for a new scheduler state when the checkpoint has none.
        progress: ``progress(done, total)`` during long replays.

    Returns:
        a :class:`Rescheduled`; nothing is written until ``.save(path)``.

    Example:
        >>> plan = reschedule("fixtures/adamw_cosine.pt", lr=["0.0005"])   # doctest: +SKIP
        >>> plan.groups[0].changes["initial_lr"]                            # doctest: +SKIP
        (0.001, 0.0005)
    """
    from ckpttool import schedule, spec

    ckpt = source if isinstance(source, Checkpoint) else inspection.load(source)
    chosen = choose_states(ckpt, optimizer, scheduler_state)
    opt, old = chosen.optimizer, chosen.scheduler
    file = ckpt.file
    groups = schedule.materialize(list(opt.state["param_groups"]), file)
    old_state = schedule.materialize(old.state, file) if old is not None else None
    notes: list[str] = list(chosen.notes)

    # The target schedule: a SPEC, a factory, or the stored one (an HF Trainer's LambdaLR: the
    # hf: schedule its folder names); then --set.
    factory: Callable | None = None
    hf_spec = None
    if scheduler is None:
        if old is None:
            raise StateError(f"{ckpt.path}: {opt.location} has no scheduler; give the new one "
                             "with --scheduler SPEC")
        scheduler = named = _stored_hf_spec(ckpt, old)
        if named is not None:
            _check_named_schedule(ckpt, opt, old, groups, old_state, named)
    if scheduler is None:
        target = old.info
    elif callable(scheduler):
        target, factory = None, scheduler
    else:
        parsed = spec.parse_spec(scheduler)
        if isinstance(parsed, SchedulerInfo):
            target = parsed
        elif isinstance(parsed, spec.Factory):
            target, factory = None, parsed.build
        else:  # hf:NAME(...): built by transformers' get_scheduler; --set edits its arguments
            hf_spec = parsed.with_sets(list(sets))
            target, factory, sets, scheduler = None, hf_spec.build, (), hf_spec.text
    if sets:
        if target is None:
            raise StateError("--set changes a SPEC's arguments; a factory's cannot be changed")
        target = spec.apply_sets(target, list(sets))
    if target is not None and target.cls == "unknown":
        raise StateError(f"{old.location if old else 'the scheduler'}: unknown scheduler class; "
                         "pass --scheduler SPEC or a FILE.py:FUNC factory")
    if target is not None and target.missing and factory is None:
        raise StateError(f"{format_call(target)}: {' '.join(target.unrecoverable)} Pass "
                         "--scheduler my_sched.py:make (a function that takes the optimizer "
                         "and returns the scheduler)")

    # Base lrs (what the new schedule starts from), per group.
    current = [_base_of(g) for g in groups]
    if target is not None and target.cls in _OWN_LR_CLASSES and (lr or scale_lr is not None):
        target = _scale_own_lr_args(target, lr, scale_lr)
        bases = current
    else:
        bases = spec.parse_lr_options(list(lr), scale_lr, len(groups), current) if (
            lr or scale_lr is not None) else current

    if not lr and scale_lr is None and old is not None and factory is None and (
            target is None or target.cls != old.cls) and _sets_initial_lr(old.info):
        notes.append(f"the new schedule starts from the stored initial_lr {current!r}, which "
                     f"{old.cls} set from its own arguments; the lr the optimizer was built "
                     "with is not stored: pass --lr to choose the base lr")

    # The resume position.
    if step is None:
        if old is not None:
            step = replay_steps(old_state, old.info)
        elif isinstance(opt.step, (int, float)) and float(opt.step).is_integer():
            step = int(opt.step)
            notes.append(f"no scheduler was stored: resuming at the optimizer's step {step}")
        else:
            raise StateError(f"{ckpt.path}: no scheduler and no optimizer step count to resume "
                             "from; pass --step N")
    if step < 0:
        raise StateError(f"--step must be >= 0, not {step}")

    target_cls = target.cls if target is not None else None
    if (target_cls == PLATEAU and old is not None and old.cls == PLATEAU
            and factory is None):
        plan = _plateau_in_place(ckpt, opt, old, groups, old_state, target, lr, scale_lr, notes)
        return replace(plan, hf=hf_resume.plan_resume(ckpt, None, bases)) if (
            ckpt.kind == "hf-trainer") else plan

    device = _replay_device(opt, device, notes)
    groups = [schedule.move_tensors(g, device) for g in groups] if device else groups
    start_groups = [_with_base(g, b, device) for g, b in zip(groups, bases)]
    rebuild = _rebuilder(opt.cls, start_groups, target, factory)
    shown = format_call(target) if target is not None else "the factory's scheduler"
    try:
        stand_in, sched = rebuild()
        if target_cls == PLATEAU:
            notes.append("ReduceLROnPlateau cannot be replayed (it follows metric values that "
                         f"are not stored): it starts fresh at step {step} with no metric "
                         "history")
            sched.last_epoch = step
        else:
            schedule.replay(sched, step, progress)
    except CkptToolError:
        raise
    except (ArithmeticError, LookupError, RuntimeError, TypeError, ValueError) as e:
        hint = (" (OneCycleLR's total_steps must exceed the resume step)"
                if "total steps" in str(e) else "")
        raise ReplayError(f"torch refused to replay {shown} to step {step}: {e}{hint}") from None
    lr_location = next((g["lr"].device for g in opt.state["param_groups"]
                        if isinstance(g.get("lr"), TensorRef)), None)
    new_state = _to_tree(sched.state_dict(), lr_location)
    cycled_before = any("max_momentum" in g for g in opt.state["param_groups"])
    cycles_now = cycles_momentum(target, sched)
    overridden = cycled_before and not cycles_now and momentum is not None
    if overridden:  # the run with the new schedule keeps this momentum from here on
        for g in stand_in.param_groups:
            if "betas" in g:
                g["betas"] = (momentum, *tuple(g["betas"])[1:])
            elif "momentum" in g:
                g["momentum"] = momentum
    elif momentum is not None:
        notes.append("--momentum was not applied: it sets the momentum to leave when the old "
                     "schedule cycled it and the new one does not")
    elif cycled_before and not cycles_now:
        key = "betas" if "betas" in groups[0] else "momentum"
        notes.append(f"the old schedule cycled {key}; the current value "
                     f"{_plain(groups[0].get(key))!r} stays (set it with --momentum)")
    new_groups, changes = _rewrite_groups(opt, groups, stand_in.param_groups,
                                          cycles_now or overridden)
    notes += _position_and_jump_notes(opt, step, changes)
    expected = [] if target_cls == PLATEAU else _continue(sched, stand_in, DEFAULT_VERIFY_STEPS)
    ends = next((i for i, e in enumerate(expected) if isinstance(e, tuple)), None)
    if ends is not None:
        shown = format_call(target) if target is not None else "the new schedule"
        if ends == 0:
            raise StateError(f"{shown} ends at step {step}: a run resumed from it raises at its "
                             f"first step ({expected[0][1]}); give it a longer horizon (e.g. "
                             "--set total_steps=...)")
        notes.append(f"{shown} ends {ends} step{'s' if ends > 1 else ''} after the resume "
                     f"point: the resumed run raises at step {step + ends + 1}")

    paths = _state_paths(ckpt)
    opt_path = paths[opt.location]
    root = _set_at(file.root, opt_path + ("param_groups",), new_groups)
    if old is not None:
        sched_path = paths[old.location]
    elif ckpt.kind in ("hf-trainer", "accelerate"):
        raise StateError(f"{ckpt.path}: {opt.location} has no scheduler file beside it, and "
                         "ckpttool adds no file to a framework's folder (the framework would "
                         "not load it); save a scheduler with the run, then reschedule it")
    else:
        parent = opt_path[:-1]
        container = root
        for key in parent:
            container = container[key]
        if not isinstance(container, Mapping):
            raise StateError(f"cannot add a scheduler beside {opt.location}: it sits in a "
                             f"{type(container).__name__}; use a checkpoint dict")
        if scheduler_key in container:
            raise StateError(f"{scheduler_key!r} already exists beside {opt.location}; choose "
                             "another --scheduler-key")
        sched_path = parent + (scheduler_key,)
    root = _set_at(root, sched_path, new_state)
    hf = None
    if ckpt.kind == "hf-trainer":
        hf = hf_resume.plan_resume(ckpt, hf_spec, bases)
        for key, (_, value) in hf.trainer_state.items():
            root = _set_at(root, (hf_resume.TRAINER_STATE, key), value)
    new_call = (format_call(target) if target is not None
                else f"{type(sched).__name__} from {scheduler if isinstance(scheduler, str) else 'a factory'}")
    old_call = (f"{old.cls} from {old.named}" if old is not None and old.named
                else old.call if old is not None else None)
    return Rescheduled(ckpt, opt.location, "/".join(str(p) for p in sched_path),
                       old_call, new_call, "replay", step, tuple(changes),
                       old.state if old else None, new_state, tuple(notes), root, target,
                       scheduler if isinstance(scheduler, str) and target is None else None,
                       opt_path, sched_path, expected, rebuild, hf, old)


def _check_named_schedule(ckpt: Checkpoint, opt: OptimizerInfo, old: SchedulerReport,
                          groups: list, old_state: Mapping, named: str) -> None:
    """Refuse an ``hf:`` schedule named by training_args.bin that did not give the stored lrs:
    the folder was rescheduled to another schedule (training_args.bin is never rewritten), and
    replaying the named one would silently change the run.

    The Trainer's schedules are LambdaLRs, whose lr at step N is ``base_lr * lambda(N)`` as torch
    computes it: one call of the real scheduler, no replay.
    """
    from ckpttool import spec

    at = old_state.get("last_epoch")
    if not isinstance(at, int) or at < 0:
        return
    bases = [_base_of(g) for g in groups]
    stand_in, sched = _rebuilder(opt.cls, [_with_base(g, b, None) for g, b in zip(groups, bases)],
                                 None, spec.parse_spec(named).build)()
    if not hasattr(sched, "lr_lambdas"):
        return
    sched.last_epoch = at
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        named_lrs = sched.get_lr()
    stored = [_plain(g.get("lr")) for g in groups]
    if not same(stored, named_lrs):
        raise StateError(f"{ckpt.path}: {opt.location}'s lrs {stored!r} at step {at} are not "
                         f"those of {named} ({named_lrs!r}), the schedule training_args.bin "
                         "names: was this folder rescheduled? pass its schedule with "
                         "--scheduler")


def _stored_hf_spec(ckpt: Checkpoint, old: SchedulerReport) -> str | None:
    """The ``hf:`` SPEC an HF Trainer folder names for its own LambdaLR (None for any other
    scheduler, whose stored class and arguments are the schedule).

    Raises:
        StateError: the Trainer's LambdaLR, and its folder does not say which schedule it is.
    """
    if inspection.is_hf_named(old):
        return old.named
    if ckpt.kind == "hf-trainer" and inspection.is_trainer_lambda(old):
        raise StateError(f"{ckpt.path}: {old.location} is the Trainer's LambdaLR, and "
                         "training_args.bin / trainer_state.json do not say its schedule; pass "
                         "it: --scheduler 'hf:linear(num_warmup_steps=W, num_training_steps=N)' "
                         "(your lr_scheduler_type, warmup steps and max_steps)")
    return None


def _sets_initial_lr(info: SchedulerInfo) -> bool:
    """Whether a schedule (or one of its children) writes initial_lr from its own arguments."""
    return info.cls in _OWN_LR_CLASSES or any(_sets_initial_lr(c) for c in info.children)


def _base_of(group: Mapping) -> Any:
    """The lr a group's schedule starts from: its initial_lr, else (never scheduled) its lr."""
    if "initial_lr" in group:
        return _plain(group["initial_lr"])
    return _plain(group.get("lr"))


def _plain(value: Any) -> Any:
    """A one-element tensor as its Python number (for reports); anything else as it is."""
    import torch

    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def _scale_own_lr_args(target: SchedulerInfo, lr: tuple, scale_lr: float | None) -> SchedulerInfo:
    if lr:
        raise StateError(f"{target.cls} sets the lr from its own arguments; change them with "
                         "--set (e.g. --set max_lr=0.01) or scale them with --scale-lr")
    names = ("max_lr",) if target.cls == "OneCycleLR" else ("base_lr", "max_lr")
    args = dict(target.args)
    for name in names:
        value = args.get(name)
        args[name] = ([v * scale_lr for v in value] if isinstance(value, (list, tuple))
                      else value * scale_lr)
    return replace(target, args=args)


def _replay_device(opt: OptimizerInfo, device: str | None, notes: list[str]) -> str | None:
    """Where tensor lrs are re-stepped: --device, else where they were saved, else cpu."""
    import torch

    saved = next((g["lr"].device for g in opt.state["param_groups"]
                  if isinstance(g.get("lr"), TensorRef)), None)
    if device is None:
        if saved is None:
            return None
        from ckpttool.schedule import device_usable

        if device_usable(saved):
            return saved
        why = ("no CUDA device is here" if saved.startswith("cuda")
               else "torch cannot use that device here")
        notes.append(f"the lr tensors were saved on {saved}, and {why}: re-stepped on cpu, "
                     f"written back on {saved} (use --device to choose)")
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StateError(f"--device {device}: no CUDA device here; use --device cpu")
    return device


def _with_base(group: Mapping, base: Any, device: str | None) -> dict:
    import torch

    g = dict(group)
    lr = g.get("lr")
    if isinstance(lr, torch.Tensor):
        target = device or str(lr.device)
        g["lr"] = lr.to(target)
        g["initial_lr"] = torch.tensor(base, dtype=lr.dtype, device=target) if not isinstance(
            base, torch.Tensor) else base.to(dtype=lr.dtype, device=target)
    else:
        g["initial_lr"] = base
    return g


def _rebuilder(opt_cls: str, groups: list, target: SchedulerInfo | None,
               factory: Callable | None) -> Callable:
    """A function that builds (stand-in optimizer, new scheduler) afresh, the same every time."""
    from ckpttool import schedule

    def rebuild():
        stand_in = schedule.standin_optimizer(opt_cls, groups)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched = (factory(stand_in) if factory is not None
                     else schedule.build_scheduler(target, stand_in))
        return stand_in, sched

    return rebuild


def cycles_momentum(target: SchedulerInfo | None, sched: Any) -> bool:
    """Whether a new schedule cycles the momentum (or beta1) of its groups: from its SPEC
    (``target``), or, for a factory's scheduler (``target`` None), from the torch scheduler
    ``sched`` itself (OneCycleLR / CyclicLR with ``cycle_momentum``).

    Example:
        >>> cycles_momentum(SchedulerInfo("OneCycleLR", {"max_lr": 0.1, "total_steps": 10,
        ...                                              "cycle_momentum": True}), None)
        True
    """
    if target is not None:
        return target.cycles_momentum
    return bool(getattr(sched, "cycle_momentum", False))


def _to_tree(value: Any, location: str | None = None) -> Any:
    """A torch state value in the reader's vocabulary: tensors become NewTensor records, saved
    as from ``location`` (the device the run's lr lived on) when given."""
    import torch

    from ckpttool.serialization import new_tensor_from_torch

    if isinstance(value, torch.Tensor):
        return new_tensor_from_torch(value, location)
    if isinstance(value, Mapping):
        out = {k: _to_tree(v, location) for k, v in value.items()}
        return type(value)(out) if type(value) is not dict else out
    if isinstance(value, list):
        return [_to_tree(v, location) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_tree(v, location) for v in value)
    return value


def _rewrite_groups(opt: OptimizerInfo, groups: list, replayed: list,
                    momentum_owned: bool) -> tuple[list, list[GroupChange]]:
    """The checkpoint's param groups with every scheduler-owned key taken from the replay
    (momentum / betas too when the new schedule cycles them or --momentum set them)."""
    stored_groups = opt.state["param_groups"]
    owned = ["lr", *SCHEDULER_SET_KEYS] + (["momentum", "betas"] if momentum_owned else [])
    new_groups, changes = [], []
    for i, (stored, live, new) in enumerate(zip(stored_groups, groups, replayed)):
        g = copy.copy(stored)
        diff: dict[str, tuple[Any, Any]] = {}
        for key in (k for k in owned if k in new):
            old_ref = stored.get(key)
            location = old_ref.device if isinstance(old_ref, TensorRef) else None
            g[key] = _to_tree(copy.deepcopy(new[key]), location)
            old_value, new_value = _plain(live.get(key)), _plain(new[key])
            if key not in stored or not same(old_value, new_value):
                diff[key] = (old_value if key in stored else None, new_value)
        # Keys only the old schedule used (OneCycleLR's max_lr, CyclicLR's momenta) go.
        removed = tuple(k for k in SCHEDULER_SET_KEYS if k in stored and k not in new)
        for k in removed:
            del g[k]
        new_groups.append(g)
        changes.append(GroupChange(i, diff, removed))
    return new_groups if isinstance(stored_groups, list) else type(stored_groups)(new_groups), changes


def _position_and_jump_notes(opt: OptimizerInfo, step: int, changes: list) -> list[str]:
    """What a user must know that the table does not shout: the resume position moved away
    from the optimizer's own step count, or an lr jumps by more than 2x at the resume."""
    notes = []
    if isinstance(opt.step, (int, float)) and opt.step == opt.step and int(opt.step) != step:
        notes.append(f"the schedule now resumes at step {step} while the optimizer has taken "
                     f"{int(opt.step)} steps: resume your training loop's counter at {step}")
    for change in changes:
        old, new = change.changes.get("lr", (None, None))
        if isinstance(old, float) and isinstance(new, float) and old > 0 and new > 0 and (
                new / old > 2 or old / new > 2):
            notes.append(f"group {change.index}'s lr jumps from {old!r} to {new!r} "
                         f"({new / old:.3g}x) at the resume step")
            break
    return notes


def _continue(sched: Any, optimizer: Any, steps: int) -> list:
    """The next ``steps`` lrs (and momentum/betas) per group, by stepping on from the replay.

    The scheduler's state was already taken; stepping it further only yields what a resumed run
    must see next.
    """
    from ckpttool import schedule

    out = []
    for _ in range(steps):
        try:
            schedule.replay(sched, 1)
        except Exception as e:  # e.g. OneCycleLR at its end: the resumed run raises too
            out.append(("raises", type(e).__name__))
            break
        out.append(schedule.group_snapshot(optimizer))
    return out


def _plateau_in_place(ckpt, opt, old, groups, old_state, target, lr, scale_lr, notes):
    """ReduceLROnPlateau: change its arguments and scale its lr in place, keeping its history."""
    from ckpttool import spec

    changed_args = {k: v for k, v in target.args.items()
                    if k in _PLATEAU_ARGS and old.info.args.get(k) != v}
    new_state = dict(old_state)
    for name, value in changed_args.items():
        if name == "min_lr":
            new_state["min_lrs"] = (list(value) if isinstance(value, (list, tuple))
                                    else [value] * len(groups))
            new_state["default_min_lr"] = None if isinstance(value, (list, tuple)) else value
        else:
            new_state[name] = value
    current = [_plain(g["lr"]) for g in groups]
    new_lrs = spec.parse_lr_options(list(lr), scale_lr, len(groups), current) if (
        lr or scale_lr is not None) else current
    new_groups, changes = [], []
    for i, (stored, new_lr) in enumerate(zip(opt.state["param_groups"], new_lrs)):
        g = copy.copy(stored)
        if not same(current[i], new_lr):
            g["lr"] = new_lr
            changes.append(GroupChange(i, {"lr": (current[i], new_lr)}))
        else:
            changes.append(GroupChange(i, {}))
        new_groups.append(g)
    new_state["_last_lr"] = list(new_lrs)
    new_state = _to_tree(new_state)
    notes.append("ReduceLROnPlateau cannot be replayed (its steps follow metric values that are "
                 "not stored): its arguments and lr were changed in place, keeping best, "
                 "num_bad_epochs, cooldown_counter and last_epoch")
    paths = _state_paths(ckpt)
    root = _set_at(ckpt.file.root, paths[opt.location] + ("param_groups",), new_groups)
    sched_path = paths[old.location]
    root = _set_at(root, sched_path, new_state)
    return Rescheduled(ckpt, opt.location, old.location, old.call, format_call(target),
                       "plateau-in-place", int(old_state.get("last_epoch", 0)), tuple(changes),
                       old.state, new_state, tuple(notes), root, target, None,
                       paths[opt.location], sched_path, [], None, None, old)
