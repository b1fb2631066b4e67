"""Many checkpoints at once: the PATH arguments of ``show`` and ``reschedule`` expanded into the
checkpoints they name (files, shell patterns, folders of runs).

A folder that is itself one checkpoint (an HF Trainer ``checkpoint-N/``, an accelerate
``save_state()`` folder, a torch.distributed.checkpoint folder) stays one checkpoint; any other
folder is searched, subfolders included, for checkpoint files (:data:`CHECKPOINT_SUFFIXES`) and
checkpoint folders. The order is natural (``step-8.pt`` before ``step-12.pt``), so a sweep lists
as its runs were numbered.

Example:
    >>> import ckpttool
    >>> [c.path for c in ckpttool.expand_paths(["fixtures/findings"])][:2]     # doctest: +SKIP
    ['fixtures/findings/group_count_mismatch.pt', 'fixtures/findings/initial_lr_mismatch.pt']
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ckpttool.errors import InputError

# The file names a folder search picks up: torch.save's usual suffixes, Lightning's .ckpt, and
# accelerate's / HF's .bin. A file named on the command line is read whatever its name.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
# Characters that make a PATH a pattern when no file has that name (the shell left it unexpanded:
# it was quoted, or nothing matched it).
_PATTERN = re.compile(r"[*?[]")


@dataclass(frozen=True)
class Found:
    """One checkpoint named by the PATH arguments.

    Attributes:
        path: where it is, as to open it (the argument, or the argument joined with what the
            folder search found).
        name: its name relative to the folder it was found in (``run3/ckpt.pt``), or its base
            name for a file named directly or by a pattern: ``reschedule --out-dir DIR`` writes
            it to ``DIR/name``.
        expanded: True when it came out of a folder search or a pattern, not a PATH as given.
    """

    path: str
    name: str
    expanded: bool = False


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """Whether a folder is itself one checkpoint rather than a folder of checkpoints: the hook
    the folder search asks before it descends (the kinds are ``ckpttool.directories``')."""
    from ckpttool.directories import is_checkpoint_dir as known

    return known(path)


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[Found]:
    """The checkpoints that PATH arguments name, in order.

    - a file (or anything that does not exist and is no pattern: reading it says what is wrong)
      stays as it is;
    - a folder that is one checkpoint (:func:`is_checkpoint_dir`) stays as it is;
    - another folder is searched recursively for files ending in :data:`CHECKPOINT_SUFFIXES`
      and for checkpoint folders (which are not searched further), hidden names skipped, in
      natural order;
    - a name with ``*``, ``?`` or ``[`` that no file has is a shell pattern (``**`` spans
      folders), expanded in natural order, each match then treated as above.

    Raises:
        InputError: a folder with no checkpoint in it, or a pattern that matches nothing.

    Example:
        >>> [f.name for f in expand_paths(["sweep"])]                  # doctest: +SKIP
        ['run1/last.pt', 'run2/last.pt', 'run10/last.pt']
    """
    out: list[Found] = []
    for arg in paths:
        arg = os.fspath(arg)
        if not os.path.lexists(arg) and _PATTERN.search(arg):
            matches = sorted(glob.glob(arg, recursive=True), key=natural_key)
            if not matches:
                raise InputError(f"{arg}: no file matches this pattern")
            for match in matches:
                out += _expand_one(match, expanded=True)
        else:
            out += _expand_one(arg, expanded=False)
    return out


def _expand_one(path: str, *, expanded: bool) -> list[Found]:
    if not os.path.isdir(path) or is_checkpoint_dir(path):
        return [Found(path, os.path.basename(os.path.normpath(path)), expanded)]
    found = [Found(os.path.join(path, rel), rel, True) for rel in _search(path)]
    if not found:
        raise InputError(f"{path}: no checkpoint in this folder (files ending in "
                         f"{', '.join(CHECKPOINT_SUFFIXES)}, or checkpoint folders)")
    return found


def _search(folder: str, rel: str = "") -> Iterator[str]:
    """Checkpoint files and folders under ``folder``, as paths relative to it, natural order."""
    try:
        entries = sorted(os.scandir(os.path.join(folder, rel) if rel else folder),
                         key=lambda e: natural_key(e.name))
    except OSError as e:
        raise InputError(f"{os.path.join(folder, rel)}: cannot list: {e.strerror or e}") from None
    for entry in entries:
        if entry.name.startswith("."):  # .git, .ipynb_checkpoints, ckpttool's pending writes
            continue
        name = os.path.join(rel, entry.name) if rel else entry.name
        if entry.is_dir():
            if is_checkpoint_dir(entry.path):
                if not _is_backup_dir(entry.path):
                    yield name
            elif not entry.is_symlink():  # (a link back up the tree would never end)
                yield from _search(folder, name)
        elif entry.name.endswith(CHECKPOINT_SUFFIXES):
            yield name


def _is_backup_dir(path: str) -> bool:
    """A checkpoint folder named as ckpttool names an in-place backup (``NAME.bak``,
    ``bak-checkpoint-N``): the original of a rewritten checkpoint, never an input of a search
    (a second ``--in-place`` pass would rewrite it, or with ``--no-backup`` lose it)."""
    from ckpttool.directories import directory_kind
    from ckpttool.folder_output import is_backup

    return is_backup(path, directory_kind(path))


def check_targets(inputs: list[str], targets: list[str | None], *,
                  backups: bool = False) -> None:
    """Refuse, before anything is written, a batch in which writing one input would destroy
    what another reads or writes: two inputs written to one path; an output that is another
    input, lies inside one, or contains one (it would be replaced, or removed with the folder
    it replaces, before that input is read); with ``backups`` (``--in-place``, keeping them),
    an input that is another input's backup (:func:`ckpttool.folder_output.backup_path`).
    Paths are compared by identity (:func:`ckpttool.folder_output.place`: a bind mount, a
    symlinked folder or a hard link is seen through). An input written over itself, or
    inside itself, is refused by its own write (:meth:`ckpttool.Rescheduled.save`).

    Raises:
        StateError: naming the two inputs.

    Example:
        >>> check_targets(["s1/run/c20", "s2/run/c20"], ["s2/run/c20", "s2/c20"])  # doctest: +SKIP
        Traceback (most recent call last):
        StateError: the output of s1/run/c20, s2/run/c20, is the input s2/run/c20 ...
    """
    from ckpttool.directories import directory_kind
    from ckpttool.errors import StateError
    from ckpttool.folder_output import backup_path, place

    places = [place(p) for p in inputs]
    by_key: dict = {}
    around: dict = {}  # identity of a folder -> the inputs inside it
    for i, p in enumerate(places):
        by_key.setdefault(p.key, i)
        for ident in p.around:
            around.setdefault(ident, []).append(i)
    written: dict = {}
    for i, target in enumerate(targets):
        if target is None:
            continue
        p = place(target)
        if p.key in written:
            raise StateError(f"{inputs[written[p.key]]} and {inputs[i]} would both be written "
                             f"to {target}; give them different names")
        written[p.key] = i
        same = by_key.get(p.key)
        if same is not None and same != i:
            raise StateError(f"the output of {inputs[i]}, {target}, is the input "
                             f"{inputs[same]}: it would be replaced before it is read; "
                             "choose another output")
        inside = [j for j in (by_key.get((ident, ())) for ident in p.around)
                  if j is not None and j != i]
        contained = [j for j in around.get(p.key[0], []) if j != i] if p.exists else []
        if inside or contained:
            j = (inside or contained)[0]
            how = "lies inside" if inside else "contains"
            raise StateError(f"the output of {inputs[i]}, {target}, {how} the input "
                             f"{inputs[j]}: writing it could replace that input before it is "
                             "read; choose another output")
        if backups:
            path = os.path.realpath(inputs[i])
            bak = place(backup_path(directory_kind(path) or "", path)[0])
            j = by_key.get(bak.key)
            if j is not None and j != i:
                raise StateError(f"{inputs[j]} is where --in-place keeps the backup of "
                                 f"{inputs[i]}, which would replace it: move {inputs[j]} away "
                                 "first")


def natural_key(text: str) -> list:
    """Sort key that orders digit runs by their value: ``step-8`` before ``step-12``."""
    return [(0, int(part), part) if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", text) if part]
