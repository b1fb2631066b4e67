"""Benchmark: `ckpttool diff` of two ~4 GB checkpoints vs `cmp` of the same two files.

    python tests/bench/bench_diff.py [--gb 4] [--repeats 3]

Target (PRODUCT.md section 6): at most 1.2x cmp's wall time, peak RSS under 1 GB. Two cases,
each reading both files whole: files that differ in one tensor near their end (cmp stops at the
first differing byte, so the change is put in the last tensor record), and two identical copies.
The diff includes everything the command does: reading both trees, the deepdiff of the values,
the byte comparison of every tensor record, and statistics (with torch) of the tensor that
differs.
"""

from __future__ import annotations

import shutil
import struct

from common import DATA, PY, big_file_arguments, compare, make_checkpoint, report


def changed_copy(path, out):
    """A copy of `path` with one float of its last tensor record (by file offset) changed."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from ckpttool.serialization import read_checkpoint

    if out.exists():
        return out
    shutil.copyfile(path, out)
    spans = read_checkpoint(path).storage_spans
    offset, size = max(spans.values())
    with open(out, "r+b") as f:
        f.seek(offset + (size // 2 // 4) * 4)
        (value,) = struct.unpack("<f", f.read(4))
        f.seek(-4, 1)
        f.write(struct.pack("<f", value + 1.0))
    return out


def main() -> None:
    args = big_file_arguments(__doc__, 3)
    path = make_checkpoint(DATA / f"big_{args.gb:g}gb.pt", args.gb)
    changed = changed_copy(path, DATA / f"big_{args.gb:g}gb_changed.pt")
    same = DATA / f"big_{args.gb:g}gb_copy.pt"
    if not same.exists():
        shutil.copyfile(path, same)
    for name, other in (("one tensor differs", changed), ("identical copies", same)):
        ours = [PY, "-m", "ckpttool", "diff", "--quiet", str(path), str(other)]
        report(f"diff vs cmp ({name})", compare(ours, ["cmp", str(path), str(other)],
                                                args.repeats), target=1.2)


if __name__ == "__main__":
    main()
