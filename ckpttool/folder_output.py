"""Writing a rescheduled checkpoint folder (an HF Trainer ``checkpoint-N/``, an accelerate
``save_state()`` folder, a torch.distributed.checkpoint folder) without ever losing one.

A new folder is made complete beside the target under a hidden pending name
(``.NAME.ckpttool-new``): each rewritten file by the checkpoint writer
(:func:`ckpttool.serialization.write_checkpoint`, tensor bytes copied, never unpickled), a
rewritten JSON file with only its changed values edited, every other file and subfolder copied
byte for byte (never a hard link or a symlink: the new folder shares nothing with the old), each
file and folder fsynced. The caller verifies the pending folder, then :func:`publish` renames it
into place: an existing folder is first renamed aside, and removed only once the new one has its
name, so at every moment one complete copy exists under a known name.

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


def aside_path(target: str) -> str:
    """Where ``target`` waits, hidden, while a new folder takes its name."""
    folder, name = os.path.split(target)
    return os.path.join(folder, f".{name}{ASIDE_SUFFIX}")


def dcp_writer(path: str) -> Callable:
    """``ckpttool.dcp_write.write_dcp``, which fills a new DCP folder.

    Raises:
        InputError: that module is not there (DCP folders are then read, not rewritten).
    """
    try:
        from ckpttool.dcp_write import write_dcp
    except ImportError:
        raise InputError(f"{path}: rewriting dcp checkpoint folders is not supported yet "
                         "(`show`, `diff` and `plot` read it); see issue #5") from None
    return write_dcp


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
    ``root`` is not the source's own rewritten. ``progress(done_bytes, total_bytes)`` follows
    the whole folder as one copy (:class:`ckpttool.serialization.CopyProgress`: at most once per
    32 MB, and at the end).

    Raises:
        CkptToolError: a file cannot be read, written or copied; ``pending`` is then removed.
    """
    if source.kind == "dcp":
        write_dcp = dcp_writer(source.path)
        try:
            write_dcp(source, root, pending, progress=progress)
            fsync_folder(os.path.dirname(os.path.abspath(pending)))
        except BaseException:
            remove_tree(pending)
            raise
        return
    names = sorted(os.listdir(source.path))
    sizes = {name: size_of(os.path.join(source.path, name)) for name in names}
    # One progress over the folder; a rewritten file's input size stands for its own until
    # its exact size is known.
    copied = CopyProgress(sum(sizes.values()), progress)
    os.mkdir(pending, folder_mode(source.path))
    try:
        for name in names:
            src, dst = os.path.join(source.path, name), os.path.join(pending, name)
            member = source.members.get(name)
            if member is None or root[name] is member.root:
                copy_tree(src, dst, copied.add)
            elif member.kind == "json":
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


def publish(pending: str, target: str, *, keep: str | None = None) -> None:
    """Rename the complete folder ``pending`` to ``target``.

    An existing ``target`` is first renamed to ``keep`` (a backup the caller wants, on the same
    filesystem; see :func:`backup_path`) or to a hidden aside name (removed once the new folder has its name); an existing ``keep`` is itself
    renamed aside first and removed at the end. If a rename fails, the ones done are undone and
    ``pending`` is removed: the old folder is back under its name.
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
    for parent in parents:
        fsync_folder(parent)
    for _, aside in moved:
        if aside != keep:
            remove_tree(aside)
    if moved:
        for parent in parents:
            fsync_folder(parent)


def remove_tree(path: str) -> None:
    """Remove a file or a folder with everything in it, if it exists."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def json_bytes(original: bytes, old: Any, new: Any) -> bytes:
    """``new`` as JSON, written as ``original`` (the JSON of ``old``) was: each top-level
    value that changed is edited in place, every other byte kept (the HF Trainer writes
    ``json.dumps(state, indent=2, sort_keys=True)``; a hand-edited file keeps its own layout).
    Where that cannot be done, the Trainer's own format.

    Example:
        >>> json_bytes(b'{\\n  "a": [1],\\n  "max_steps": 40\\n}\\n', {"a": [1], "max_steps": 40},
        ...            {"a": [1], "max_steps": 80})
        b'{\\n  "a": [1],\\n  "max_steps": 80\\n}\\n'
    """
    if isinstance(old, Mapping) and isinstance(new, Mapping) and old.keys() == new.keys():
        text = original.decode("utf-8")
        for key in (k for k in new if new[k] != old[k] or type(new[k]) is not type(old[k])):
            line = re.compile(rf'^(\s*{re.escape(json.dumps(key))}: )(.*?)(,?)$', re.MULTILINE)
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
    return (json.dumps(new, indent=2, sort_keys=True) + "\n").encode("utf-8")


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
