"""Benchmark: rewriting a ~4 GB checkpoint (read it, write the same tree) against `cp` of it.

    python tests/bench/bench_rewrite.py [--gb 4] [--repeats 5]

Target (PRODUCT.md section 6): at most 1.2x the wall time of `cp`, peak RSS under 1 GB. The
rewrite is what `reschedule` does to the bytes: the pickle is written anew and every storage
record is copied byte for byte, straight to disk (O_DIRECT); unlike `cp` it also fsyncs the file
and its folder (the write is atomic and durable), so the figure includes getting the bytes to
disk. Both outputs go to the folder of the input, the same filesystem for both, and are removed at
the end.

Exit status 1 when the ratio or the peak RSS misses its target.
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import DATA, PY, big_file_arguments, compare, make_checkpoint, report

ROOT = Path(__file__).resolve().parents[2]  # the checkout: runs without installing ckpttool
TARGET_RATIO = 1.2
MAX_PEAK_RSS_MB = 1024

REWRITE = (
    "import sys\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "from ckpttool.serialization import read_checkpoint, write_checkpoint\n"
    "ckpt = read_checkpoint(sys.argv[2])\n"
    "write_checkpoint(ckpt, ckpt.root, sys.argv[3])\n"
)


def main(argv: list[str] | None = None) -> int:
    args = big_file_arguments(__doc__.splitlines()[0], 5, argv)
    path = make_checkpoint(DATA / f"big_{args.gb:g}gb.pt", args.gb)
    ours_out, cp_out = path.with_name("rewrite_out.pt"), path.with_name("cp_out.pt")
    try:
        result = compare([PY, "-c", REWRITE, str(ROOT), str(path), str(ours_out)],
                         ["cp", str(path), str(cp_out)], args.repeats)
    finally:
        ours_out.unlink(missing_ok=True)
        cp_out.unlink(missing_ok=True)
    report("rewrite", result, target=TARGET_RATIO)
    rss_ok = result["ours_peak_rss_mb"] < MAX_PEAK_RSS_MB
    print(f"rewrite peak RSS {result['ours_peak_rss_mb']:.0f} MB (target < {MAX_PEAK_RSS_MB} MB) "
          f"{'OK' if rss_ok else 'OVER TARGET'}", flush=True)
    return 0 if result["ratio"] <= TARGET_RATIO and rss_ok else 1


if __name__ == "__main__":
    sys.exit(main())
