"""Benchmark: ckpttool.schedule.replay against a bare ``scheduler.step()`` loop (PRODUCT.md 6).

Replaying 1,000,000 steps of CosineAnnealingLR must be no slower than the bare loop. Each timing
is the best of several alternating rounds, so that machine noise does not decide the ratio.

Run it explicitly (it is not part of the default test run):

    python tests/bench/bench_replay.py            # prints the times and the ratio
    python tests/bench/bench_replay.py --steps 200000 --rounds 5 --max-ratio 1.05

Exit status 1 when the ratio exceeds ``--max-ratio``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.optim import lr_scheduler

# Runs from a checkout without installing: the repository root holds the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ckpttool.schedule import replay


def fresh_scheduler() -> lr_scheduler.CosineAnnealingLR:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    return lr_scheduler.CosineAnnealingLR(opt, T_max=1_000_000, eta_min=1e-6)


def time_bare(steps: int) -> tuple[float, dict]:
    sched = fresh_scheduler()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            sched.step()
    return time.perf_counter() - start, sched.state_dict()


def time_replay(steps: int) -> tuple[float, dict]:
    sched = fresh_scheduler()
    start = time.perf_counter()
    replay(sched, steps, progress=lambda done, total: None)
    return time.perf_counter() - start, sched.state_dict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-ratio", type=float, default=1.05,
                        help="fail above this replay/bare ratio (noise margin over 1.0)")
    args = parser.parse_args(argv)

    bare_times, replay_times = [], []
    for _ in range(args.rounds):
        bare, bare_state = time_bare(args.steps)
        fast, replay_state = time_replay(args.steps)
        if bare_state != replay_state:
            print("replay and the bare loop ended in different states", file=sys.stderr)
            return 1
        bare_times.append(bare)
        replay_times.append(fast)
    ratio = min(replay_times) / min(bare_times)
    print(f"CosineAnnealingLR, {args.steps:,} steps, best of {args.rounds}: "
          f"bare loop {min(bare_times):.3f} s, replay {min(replay_times):.3f} s, "
          f"ratio {ratio:.3f}")
    return 0 if ratio <= args.max_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
