"""The long fuzz: many more mutants of the fixtures than CI runs, and some through the real
command in a child process with its address space limited.

``tests/test_fuzz.py`` makes and checks the mutants (see its docstring); this runs its check
on mutants ``--start`` to ``--start + --count`` of each seed, in-process, prints progress, and
keeps each failing mutant's bytes under ``--keep`` (git-ignored ``tests/bench/_data/fuzz/`` by
default) with the problems found, so that it can be run again by hand:

    python tests/bench/fuzz_long.py --count 20000             # every seed, 20,000 mutants each
    python tests/bench/fuzz_long.py --seed dcp-metadata --count 5000 --start 20000
    python -m ckpttool show tests/bench/_data/fuzz/<seed>-<index>/...   # a kept mutant

Every ``--child-every``-th mutant also goes through ``ckpttool show`` and ``ckpttool diff`` as a
real process under RLIMIT_AS (``--child-memory`` MB): that checks the one-line stderr of the
real entry point (warnings included) and that no mutant needs more memory than that.
The same check in pytest: ``CKPTTOOL_FUZZ=20000 python -m pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]

import test_fuzz as fuzz  # (tests/ is not a package: found through sys.path above)
from click.testing import CliRunner


def _limited(megabytes: int):
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (megabytes << 20, megabytes << 20))

    return limit


def child_problems(ws: fuzz.Workspace, megabytes: int) -> list[str]:
    """``ckpttool show`` and ``diff`` on the mutant in place, as real processes."""
    found = []
    for args in (["show", str(ws.path)], ["diff", str(ws.original), str(ws.path)]):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "ckpttool", *args], capture_output=True,
                              text=True, preexec_fn=_limited(megabytes), timeout=120, check=False)
        outcome = fuzz.Outcome(tuple(args), proc.returncode, proc.stderr,
                               time.perf_counter() - start)
        # a process also pays for starting Python and importing: only the exit and the stderr
        problems = [p for p in fuzz.problems(outcome, may_differ=args[0] == "diff")
                    if not p.startswith("took")]
        found += [f"child {args[0]}: {p}" for p in problems]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="mutants per seed")
    parser.add_argument("--start", type=int, default=0, help="first mutant index")
    parser.add_argument("--seed", action="append", choices=[s.name for s in fuzz.SEEDS],
                        help="only this seed (repeatable; default: all)")
    parser.add_argument("--keep", type=Path, default=HERE / "_data" / "fuzz",
                        help="where failing mutants are kept")
    parser.add_argument("--child-every", type=int, default=50,
                        help="every N-th mutant also through a real process (0: none)")
    parser.add_argument("--child-memory", type=int, default=1024,
                        help="RLIMIT_AS of that process, MB")
    args = parser.parse_args()
    fuzz.warm_up()
    runner = CliRunner()
    failed = 0
    for seed in fuzz.SEEDS:
        if args.seed and seed.name not in args.seed:
            continue
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            ws = fuzz.Workspace(seed, Path(tmp))
            for index in range(args.start, args.start + args.count):
                found = fuzz.check_mutant(ws, runner, index, reschedule=index % 2 == 0)
                if args.child_every and index % args.child_every == 0:
                    label, data = fuzz.make_mutant(seed, index, ws.data)
                    ws.put(data)
                    found += [f"{seed.name} mutant {index} ({label}): {p}"
                              for p in child_problems(ws, args.child_memory)]
                    ws.restore()
                if found:
                    failed += 1
                    keep = args.keep / f"{seed.name}-{index}"
                    shutil.rmtree(keep, ignore_errors=True)
                    keep.mkdir(parents=True)
                    label, data = fuzz.make_mutant(seed, index, ws.data)
                    ws.put(data)
                    shutil.copytree(ws.path, keep / ws.path.name) if ws.path.is_dir() else \
                        shutil.copy(ws.path, keep / ws.path.name)
                    ws.restore()
                    (keep / "problems.json").write_text(json.dumps(found, indent=2))
                    print("\n".join(found), flush=True)
                done = index - args.start + 1
                if done % 100 == 0 or done == args.count:
                    rate = done / (time.perf_counter() - started)
                    print(f"{seed.name}: {done}/{args.count} mutants, {rate:.0f}/s, "
                          f"{failed} failing so far", file=sys.stderr, flush=True)
    print(f"{failed} failing mutants" + (f", kept under {args.keep}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
