"""Benchmark: `ckpttool reschedule` of a ~4 GB checkpoint vs `cp` of the same file.

    python tests/bench/bench_reschedule.py [--gb 4] [--repeats 3]

Target (PRODUCT.md section 6): at most 1.2x cp's wall time, peak RSS under 1 GB. The
reschedule includes everything the command does: reading, the replay, writing (tensor bytes
copied, never unpickled) and the verification of the written file.
"""

from __future__ import annotations

import os

from common import DATA, PY, big_file_arguments, compare, make_checkpoint, report


def main() -> None:
    args = big_file_arguments(__doc__, 3)
    path = make_checkpoint(DATA / f"big_{args.gb:g}gb.pt", args.gb)
    ours_out, cp_out = DATA / "rescheduled.pt", DATA / "copied.pt"
    ours = [PY, "-m", "ckpttool", "reschedule", str(path), "-o", str(ours_out),
            "--quiet", "--set", "T_max=20000"]
    cp = ["cp", str(path), str(cp_out)]
    # ckpttool's output is durable (fsync before the rename); plain cp leaves dirty pages in
    # the page cache, so cp followed by a sync of its output is measured too.
    cp_sync = ["sh", "-c", f"cp '{path}' '{cp_out}' && sync '{cp_out}'"]
    try:
        report("reschedule vs cp", compare(ours, cp, args.repeats, writes=True, outputs=(ours_out, cp_out)), target=1.2)
        report("reschedule vs cp+sync", compare(ours, cp_sync, args.repeats, writes=True, outputs=(ours_out, cp_out)), target=1.2)
    finally:
        for p in (ours_out, cp_out):
            if p.exists():
                os.remove(p)


if __name__ == "__main__":
    main()
