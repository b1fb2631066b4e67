"""Benchmark: `ckpttool show` on a ~4 GB checkpoint vs torch.load(mmap=True, weights_only=True).

    python tests/bench/bench_show.py [--gb 4] [--repeats 5]

Target (PRODUCT.md section 6): ckpttool at most 0.25x the torch one-liner's wall time.
"""

from __future__ import annotations


from common import DATA, PY, big_file_arguments, compare, make_checkpoint, report


def main() -> None:
    args = big_file_arguments(__doc__, 5)
    path = make_checkpoint(DATA / f"big_{args.gb:g}gb.pt", args.gb)
    ours = [PY, "-m", "ckpttool", "show", str(path)]
    torch_load = [PY, "-c", "import torch, sys; torch.load(sys.argv[1], mmap=True, "
                  "weights_only=True)", str(path)]
    report("show", compare(ours, torch_load, args.repeats), target=0.25)
    report("show --json", compare(ours[:4] + ["--json", str(path)], torch_load, args.repeats),
           target=0.25)


if __name__ == "__main__":
    main()
