"""Writing a rescheduled checkpoint folder (an HF Trainer ``checkpoint-N/``, an accelerate
``save_state()`` folder, a torch.distributed.checkpoint folder) without ever losing one.

A new folder is made complete beside the target under a hidden pending name
(``.NAME.ckpttool-new``): each rewritten file by the checkpoint writer
(:func:`ckpttool.serialization.write_checkpoint`, tensor bytes copied, never unpickled), a
rewritten JSON file with only its changed values edited, every other file and subfolder copied
byte for byte (never a hard link or a symlink: the new folder shares nothing with the old), each
file and folder fsynced; a rewritten file gets the mode its copy would. A link to a folder
outside the checkpoint, or a loop, is refused before anything is copied (:func:`check_links`);
the pending folder is made by this write or not at all (an existing one is left to its owner).
The caller verifies the pending folder, then :func:`publish` renames it into place: an existing
folder is first renamed aside, and removed only once the new one has its name, so at every
moment one complete copy exists under a known name; what fails after that rename is a warning,
not a failure. Which paths a write may replace is decided by identity (:func:`relation`), never
by spelling.

Example:
    >>> plan = ckpttool.reschedule("run/checkpoint-20",                  # doctest: +SKIP
    ...                            sets=["num_training_steps=80"])
    >>> write_folder(plan.source.file, plan.root, "run2/.c.ckpttool-new")  # doctest: +SKIP
    >>> publish("run2/.c.ckpttool-new", "run2/checkpoint-20")           # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from ckpttool.errors import CkptToolError, InputError, StateError
from ckpttool.serialization import (
    CopyProgress,
    atomic_output,
    copy_file,
    fsync_folder,
    write_checkpoint,
)

# The suffix of a folder renamed aside while its replacement takes its name (removed after).
ASIDE_SUFFIX = ".ckpttool-old"


# An in-place rewrite keeps the original as a backup where its framework will not take it for a
# checkpoint:
# - An HF Trainer's rotation (save_total_limit: transformers.trainer_utils.sort_checkpoints and
#   rotate_checkpoints) counts every folder of output_dir matching the glob `checkpoint-*`,
#   numbered by `.*checkpoint-([0-9]+)`. `checkpoint-20.bak` would be one more checkpoint 20,
#   sorted after the real one: kept as the newest while the real checkpoint is deleted first.
#   The backup is `bak-checkpoint-20`, beside it.
# - accelerate's automatic_checkpoint_naming saves `checkpoint_<i>` folders into
#   `<project_dir>/checkpoints/`; save_state's rotation (total_limit) counts every entry of that
#   folder, ordered by the first number in its name, and load_state() with no folder loads the
#   last of them. A backup there could be deleted instead of a checkpoint, or loaded instead of
#   the rewritten one: it goes one level up, `<project_dir>/checkpoint_<i>.bak`.
# - Anything else: `NAME.bak` beside it.
HF_BACKUP_PREFIX = "bak-"
BACKUP_SUFFIX = ".bak"
ACCELERATE_CHECKPOINTS = "checkpoints"
_ACCELERATE_AUTOMATIC = re.compile(r"checkpoint_[0-9]+")


def backup_path(kind: str, path: str) -> tuple[str, str | None]:
    """Where an in-place rewrite keeps the original ``path`` of this checkpoint ``kind``, and
    why it is not ``path.bak`` (None when it is).

    Example:
        >>> backup_path("hf-trainer", "run/checkpoint-20")[0]
        'run/bak-checkpoint-20'
        >>> backup_path("accelerate", "proj/checkpoints/checkpoint_3")[0]
        'proj/checkpoint_3.bak'
        >>> backup_path("torch-zip", "run/last.pt")
        ('run/last.pt.bak', None)
    """
    folder, name = os.path.split(path)
    if kind == "hf-trainer":
        return (os.path.join(folder, HF_BACKUP_PREFIX + name),
                ("named outside the `checkpoint-*` folders that the Trainer's save_total_limit "
                 "rotation counts"))
    if (kind == "accelerate" and _ACCELERATE_AUTOMATIC.fullmatch(name)
            and os.path.basename(folder) == ACCELERATE_CHECKPOINTS):
        return (os.path.join(os.path.dirname(folder), name + BACKUP_SUFFIX),
                (f"outside {ACCELERATE_CHECKPOINTS}/, every entry of which accelerate's "
                 "automatic_checkpoint_naming takes for a checkpoint"))
    return path + BACKUP_SUFFIX, None


def is_backup(path: str, kind: str | None) -> bool:
    """Whether ``path``, a checkpoint of this ``kind`` (``"torch-zip"``, ``"hf-trainer"``, ...;
    None for a folder that is no checkpoint), is named as :func:`backup_path` names the backup
    an in-place rewrite keeps: ``NAME.bak``, or for an HF Trainer folder ``bak-NAME``. A folder
    search never takes one for an input, and ``--in-place`` refuses to rewrite one.

    Example:
        >>> is_backup("run/bak-checkpoint-20", "hf-trainer"), is_backup("run/last.pt.bak", None)
        (True, True)
        >>> is_backup("run/bak-notes", None)
        False
    """
    name = os.path.basename(os.path.normpath(path))
    return name.endswith(BACKUP_SUFFIX) or (kind == "hf-trainer"
                                            and name.startswith(HF_BACKUP_PREFIX))


@dataclass(frozen=True)
class Place:
    """Where a path is, by identity (device and inode) rather than by its spelling: a bind
    mount, a symlinked parent, a hard link or another spelling on a case-insensitive
    filesystem name the same place.

    Attributes:
        key: the path's identity: (device, inode) of the path, or of its innermost existing
            folder, and the names below that folder that do not exist yet (``()`` when the path
            exists). Two paths with one key are one file or folder (or will be).
        around: the (device, inode) of every existing folder that contains the path.
    """

    key: tuple[tuple[int, int], tuple[str, ...]]
    around: frozenset[tuple[int, int]]

    @property
    def exists(self) -> bool:
        return not self.key[1]


def place(path: str | os.PathLike) -> Place:
    """The :class:`Place` of ``path`` (symlinks followed, each existing folder above it
    statted).

    Example:
        >>> place("fixtures").exists, place("fixtures/nope/x").key[1]
        (True, ('nope', 'x'))
    """
    here = os.path.realpath(path)
    missing: list[str] = []
    ident = None
    around: set[tuple[int, int]] = set()
    while True:
        try:
            st = os.stat(here)
        except OSError:
            st = None
        if st is not None:
            if ident is None:
                ident = (st.st_dev, st.st_ino)
                if missing:  # a missing path lies inside its innermost existing folder
                    around.add(ident)
            else:
                around.add((st.st_dev, st.st_ino))
        elif ident is None:
            missing.append(os.path.basename(here))
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    return Place((ident or (0, 0), tuple(reversed(missing))), frozenset(around))


def relation(path: str | os.PathLike, other: str | os.PathLike) -> str | None:
    """How ``path`` lies to ``other``, by identity (:class:`Place`): ``"same"`` (one file or
    folder, or one path still to be made), ``"inside"`` (``path`` lies inside the folder
    ``other``), ``"contains"`` (``other`` lies inside ``path``), or None.

    Example:
        >>> relation("fixtures/dirs", "fixtures"), relation("fixtures", "fixtures/dirs/x")
        ('inside', 'contains')
    """
    a, b = place(path), place(other)
    if a.key == b.key:
        return "same"
    if b.exists and b.key[0] in a.around:
        return "inside"
    if a.exists and a.key[0] in b.around:
        return "contains"
    return None


def aside_path(target: str) -> str:
    """Where ``target`` waits, hidden, while a new folder takes its name."""
    folder, name = os.path.split(target)
    return os.path.join(folder, f".{name}{ASIDE_SUFFIX}")


def check_free(*paths: str) -> None:
    """Refuse to start when a hidden name this write needs is taken: it is what an interrupted
    run left, and may hold the only complete copy of a checkpoint.

    Raises:
        StateError: naming the path and what to do.
    """
    for path in paths:
        if os.path.lexists(path):
            raise StateError(f"{path} exists (left by an interrupted ckpttool run?); look inside, "
                             "then move or remove it and run again")


def write_folder(source: Any, root: Mapping, pending: str, *,
                 progress: Callable[[int, int], None] | None = None) -> None:
    """Make ``pending`` (which must not exist) a complete, durable copy of the folder
    ``source`` (a :class:`ckpttool.directories.CheckpointDir`) with the files whose branch of
    ``root`` is not the source's own rewritten. A rewritten file gets the mode a copy of the
    file it replaces gets (:func:`member_mode`). ``progress(done_bytes, total_bytes)`` follows
    the whole folder as one copy (:class:`ckpttool.serialization.CopyProgress`: at most once
    per 32 MB, and at the end).

    Raises:
        StateError: ``pending`` exists (another run writes there, or one was interrupted); it
            is left as it is.
        InputError: the folder holds a link out of itself or a loop (:func:`check_links`).
        CkptToolError: a file cannot be read, written or copied; ``pending`` is then removed.
    """
    if source.kind == "dcp":
        from ckpttool.dcp_write import write_dcp  # (it imports this module)

        write_dcp(source, root, pending, progress=progress)  # removes what it made on failure
        try:
            fsync_folder(os.path.dirname(os.path.abspath(pending)))
        except BaseException:
            remove_tree(pending)
            raise
        return
    check_links(source.path)
    names = sorted(os.listdir(source.path))
    sizes = {name: size_of(os.path.join(source.path, name)) for name in names}
    # One progress over the folder; a rewritten file's input size stands for its own until
    # its exact size is known.
    copied = CopyProgress(sum(sizes.values()), progress)
    make_pending(pending, source.path)
    try:
        for name in names:
            src, dst = os.path.join(source.path, name), os.path.join(pending, name)
            member = source.members.get(name)
            if member is None or root[name] is member.root:
                copy_tree(src, dst, copied.add)
                continue
            new_file(dst, member_mode(src))  # replaced by the writer, which keeps its mode
            if member.kind == "json":
                written = _write_json(member, root[name], dst)
                copied.total += written - sizes[name]
                copied.add(written)
            else:
                write_checkpoint(member, root[name], dst,
                                 progress=_follow(copied, sizes[name]))
        fsync_folder(pending)
        fsync_folder(os.path.dirname(os.path.abspath(pending)))
    except OSError as e:
        remove_tree(pending)
        raise CkptToolError(f"{e.filename or pending}: {e.strerror or e}; nothing was "
                            "written") from None
    except BaseException:
        remove_tree(pending)
        raise
    finish_progress(copied)


def make_pending(pending: str, source: str) -> None:
    """Create the folder ``pending`` with :func:`folder_mode` of ``source``; the write that
    made it is then the one to remove it.

    Raises:
        StateError: it exists (another run writes there, or one was interrupted).
        CkptToolError: it cannot be created.
    """
    try:
        os.mkdir(pending, folder_mode(source))
    except FileExistsError:
        raise StateError(f"{pending} exists (left by an interrupted ckpttool run, or another "
                         "one writing there?); look inside, then move or remove it and run "
                         "again") from None
    except OSError as e:
        raise CkptToolError(f"{pending}: cannot create the folder ({e.strerror or e}); nothing "
                            "was written") from None


def member_mode(path: str) -> int:
    """The permission bits a folder's file gets in the new folder: those of the file at
    ``path``, writable by its owner (:func:`new_file` then takes the umask off, as
    :func:`ckpttool.serialization.copy_file` does for a copy).

    Example:
        >>> oct(member_mode("fixtures/dirs/dcp/single/.metadata"))           # doctest: +SKIP
        '0o644'
    """
    return stat.S_IMODE(os.stat(path).st_mode) | stat.S_IWUSR


def new_file(path: str, mode: int, data: bytes | None = None) -> None:
    """Create the file ``path`` with ``mode`` less the umask (as ``open`` applies it): empty,
    for a writer that keeps the mode of the file it replaces to fill, or holding ``data``, on
    disk before this returns.

    Raises:
        FileExistsError: ``path`` exists.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
    with open(fd, "wb") as f:
        if data is not None:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def check_links(folder: str) -> None:
    """Refuse a checkpoint folder that holds a link to a folder outside it, or a loop (a link
    to a folder that contains the link): its copy would follow the link out of the checkpoint
    (a link to its parent: into the very folder being written, without end). A link to a folder
    inside it is copied as a folder, a link to a file (wherever it lies) as that file's bytes.

    Raises:
        InputError: naming the link and what to do.

    Example:
        >>> check_links("fixtures/dirs/accelerate")
    """
    top = os.path.realpath(folder)

    def visit(path: str, ancestors: frozenset) -> None:
        st = os.stat(path)
        here = (st.st_dev, st.st_ino)
        if here in ancestors:
            raise InputError(f"{path}: a link to a folder that contains it; ckpttool will not "
                             "copy a loop")
        with os.scandir(path) as entries:
            listed = sorted(entries, key=lambda e: e.name)
        for entry in listed:
            if not entry.is_dir():  # (follows a link: a link to a file is a file)
                continue
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if target != top and not target.startswith(top + os.sep):
                    raise InputError(
                        f"{entry.path}: a link to the folder {target}, outside the checkpoint; "
                        "ckpttool copies only what the checkpoint folder holds (a linked file "
                        "as its bytes): remove the link, or copy that folder in")
            visit(entry.path, ancestors | {here})

    try:
        visit(folder, frozenset())
    except OSError as e:
        raise InputError(f"{e.filename or folder}: cannot list: {e.strerror or e}; nothing was "
                         "written") from None


def finish_progress(copied: CopyProgress) -> None:
    """Report a folder's copy complete (once): its total made what was really written, which
    differs from the estimate when a file changed size meanwhile, or for an empty folder."""
    if copied.done != copied.total or not copied.done:
        copied.total = copied.done
        copied.add(0)


def _follow(copied: CopyProgress, estimate: int) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` for one file written into a folder: its bytes added to the
    folder's progress as they come, its exact size put in place of ``estimate`` at once."""
    last = None

    def progress(done: int, total: int) -> None:
        nonlocal last
        if last is None:
            copied.total += total - estimate
            last = 0
        copied.add(done - last)
        last = done

    return progress


def publish(pending: str, target: str, *, keep: str | None = None) -> tuple[str, ...]:
    """Rename the complete folder ``pending`` to ``target``.

    An existing ``target`` is first renamed to ``keep`` (a backup the caller wants, on the same
    filesystem; see :func:`backup_path`) or to a hidden aside name (removed once the new folder
    has its name); an existing ``keep`` is itself renamed aside first and removed at the end.
    If a rename fails, the ones done are undone and ``pending`` is removed: the old folder is
    back under its name.

    Returns:
        what could not be finished once the new folder had its name, one line each (the
        renames not made durable, an old folder that could not be removed, and where it is):
        the output is in place, and these are warnings, not failures.
    """
    parents = {os.path.dirname(os.path.abspath(p)) for p in (target, keep) if p is not None}
    moved: list[tuple[str, str]] = []
    try:
        if keep is not None and os.path.lexists(keep):
            moved.append((keep, aside_path(keep)))
            os.rename(*moved[-1])
        if os.path.lexists(target):
            moved.append((target, keep or aside_path(target)))
            os.rename(*moved[-1])
        os.rename(pending, target)
    except BaseException:
        for original, aside in reversed(moved):
            with suppress(OSError):  # what stays aside keeps its hidden name, intact
                os.rename(aside, original)
        remove_tree(pending)
        raise
    warnings = [w for parent in sorted(parents) if (w := sync_warning(parent, target))]
    for original, aside in moved:
        if aside != keep and (error := remove_tree(aside)) is not None:
            warnings.append(f"the old {original} is left at {aside} (it could not be removed: "
                            f"{error.strerror or error}); remove it: ckpttool refuses to write "
                            f"{original} again while it is there")
    if moved:
        warnings += [w for parent in sorted(parents) if (w := sync_warning(parent, target))]
    return tuple(dict.fromkeys(warnings))


def sync_warning(folder: str, written: str) -> str | None:
    """fsync ``folder`` after ``written`` took its name in it: None when done, else the warning
    that says so (the output is in place; a power loss could still undo the rename)."""
    try:
        fsync_folder(folder)
    except OSError as e:
        return (f"{written} is written and verified, but {folder} could not be synced to disk "
                f"({e.strerror or e}): run `sync` before relying on it after a power loss")
    return None


def remove_tree(path: str) -> OSError | None:
    """Remove a file or a folder with everything in it, if it exists; as much as can be
    removed is. Returns the first error when something is left (None: it is gone)."""
    error = None
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            try:
                shutil.rmtree(path)
            except OSError as e:
                error = e
                shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        error = e
    return error if error is not None and os.path.lexists(path) else None


def json_bytes(original: bytes, old: Any, new: Any) -> bytes:
    """``new`` as JSON, written as ``original`` (the JSON of ``old``) was: each top-level
    value that changed is edited in place, every other byte kept (the HF Trainer writes
    ``json.dumps(state, indent=2, sort_keys=True)``; a hand-edited file keeps its own layout,
    its line endings included). Where that cannot be done, the Trainer's own format, with the
    line endings of ``original`` (``\\r\\n`` when it has them).

    Example:
        >>> json_bytes(b'{\\n  "a": [1],\\n  "max_steps": 40\\n}\\n', {"a": [1], "max_steps": 40},
        ...            {"a": [1], "max_steps": 80})
        b'{\\n  "a": [1],\\n  "max_steps": 80\\n}\\n'
    """
    text = original.decode("utf-8")
    if isinstance(old, Mapping) and isinstance(new, Mapping) and old.keys() == new.keys():
        for key in (k for k in new if new[k] != old[k] or type(new[k]) is not type(old[k])):
            # (the value ends before a comma and a CR: `$` is only the LF's place)
            line = re.compile(rf'^(\s*{re.escape(json.dumps(key))}: )(.*?)(,?)(\r?)$',
                              re.MULTILINE)
            found = [m for m in line.finditer(text) if _same_json(m.group(2), old[key])]
            # the top-level key is the least indented (a nested one may hold the same value)
            top = [m for m in found if len(m.group(1)) == min(len(f.group(1)) for f in found)]
            if len(top) != 1:
                break
            m = top[0]
            text = text[:m.start(2)] + json.dumps(new[key]) + text[m.end(2):]
        else:
            if _same_json(text, new):
                return text.encode("utf-8")
    newline = "\r\n" if "\r\n" in text else "\n"
    return (json.dumps(new, indent=2, sort_keys=True) + "\n").replace("\n", newline).encode(
        "utf-8")


def _same_json(text: str, value: Any) -> bool:
    """Whether ``text`` is the JSON of ``value`` (types included: 40 is not 40.0)."""
    try:
        parsed = json.loads(text)
    except ValueError:
        return False
    return json.dumps(parsed, sort_keys=True) == json.dumps(value, sort_keys=True)


def _write_json(member: Any, value: Any, dst: str) -> int:
    """Write the JSON file ``member`` with ``value`` as :func:`json_bytes` edits it; the bytes
    written."""
    with open(member.path, "rb") as f:
        original = f.read()
    try:
        unchanged = _same_json(original.decode("utf-8"), member.root)
    except UnicodeDecodeError:
        unchanged = False
    if not unchanged:
        raise InputError(f"{member.path}: changed since ckpttool read it; nothing was written")
    data = json_bytes(original, member.root, value)
    with atomic_output(dst) as out:
        out.write(data)
    return len(data)


def copy_tree(src: str, dst: str, report: Callable[[int], None] | None = None, *,
              _ancestors: frozenset = frozenset()) -> None:
    """Copy the file or folder ``src`` (with everything in it) to the new path ``dst``, byte for
    byte and durably: each file by :func:`ckpttool.serialization.copy_file`, each folder made
    with :func:`folder_mode` and fsynced once filled. Links are followed (the copy holds the
    bytes, never a link); a folder linked from inside itself is refused. ``report(n)`` follows
    each chunk copied, e.g. a :class:`ckpttool.serialization.CopyProgress`'s ``add``.

    Raises:
        InputError: a dangling link, a loop, or something that is neither a file nor a folder.
        OSError: reading or writing failed (``dst`` may be partial; the caller removes it).

    Example:
        >>> copy_tree("run/checkpoint-20/logs", "run2/.pending/logs")     # doctest: +SKIP
    """
    try:
        st = os.stat(src)
    except FileNotFoundError:
        raise InputError(f"{src}: a link to nothing (or removed while copying); nothing was "
                         "written") from None
    if stat.S_ISREG(st.st_mode):
        copy_file(src, dst, report=report)
    elif stat.S_ISDIR(st.st_mode):
        if (st.st_dev, st.st_ino) in _ancestors:
            raise InputError(f"{src}: a link to a folder that contains it; ckpttool will not copy "
                             "a loop")
        os.mkdir(dst, folder_mode(src))
        for name in sorted(os.listdir(src)):
            copy_tree(os.path.join(src, name), os.path.join(dst, name), report,
                      _ancestors=_ancestors | {(st.st_dev, st.st_ino)})
        fsync_folder(dst)
    else:
        raise InputError(f"{src}: neither a file nor a folder; ckpttool copies only those (move "
                         "it out of the checkpoint folder)")


def size_of(path: str) -> int:
    """Bytes in the file ``path``, or in every file under the folder ``path`` (links
    followed, as :func:`copy_tree` copies them): the total of a copy's progress; 0 where it
    cannot tell.

    Example:
        >>> size_of("fixtures/dirs/dcp/single/.metadata") > 0
        True
    """
    try:
        if not os.path.isdir(path):
            return os.stat(path).st_size
        return sum(os.stat(os.path.join(folder, f)).st_size
                   for folder, _, files in os.walk(path, followlinks=True) for f in files)
    except OSError:
        return 0


def folder_mode(path: str) -> int:
    """The permission bits for a new folder copying the folder ``path``: its own, always
    writable by its owner (so the copy can be filled).

    Example:
        >>> oct(folder_mode("fixtures"))                                      # doctest: +SKIP
        '0o755'
    """
    return stat.S_IMODE(os.stat(path).st_mode) | stat.S_IRWXU
