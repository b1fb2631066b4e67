"""Shared pieces of the benchmarks: a big realistic checkpoint, and timing of whole commands.

Benchmarks compare ckpttool with a baseline *in the same run, on the same files*, alternating
the two, and report the median ratio; absolute times on one machine mean little elsewhere.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "_data"
# Commands run as a user's would: with Python's bytecode cache (a sandbox or CI image may set
# PYTHONDONTWRITEBYTECODE, which makes every ckpttool start compile its modules again).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
_in_builder = False


def make_checkpoint(path: Path, gigabytes: float = 4.0, *, seed: int = 0) -> Path:
    """A torch.save file of about `gigabytes`: model weights plus AdamW state (step, moments).

    One third of the bytes are weights, two thirds Adam moments, as in a real AdamW run; the
    optimizer and a CosineAnnealingLR come from real torch objects stepped on a tiny stand-in
    and then given the big state, so every key is what torch writes.
    """
    if path.exists():
        return path
    if not _in_builder:
        # Build in a child: a process that once held 4 GB passes that high-water mark on to the
        # commands it later forks, which would spoil their peak-RSS figures.
        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                        "import common; common._in_builder = True; "
                        "common.make_checkpoint(common.Path(sys.argv[2]), float(sys.argv[3]))",
                        str(Path(__file__).parent), str(path), str(gigabytes)], check=True)
        return path
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    per_tensor = 16 * 1024 * 1024  # 64 MB float32 tensors, like a large transformer's layers
    n_params = max(1, int(gigabytes * 1024**3 / 3 / (per_tensor * 4)))
    names = [f"layers.{i}.weight" for i in range(n_params)]
    model = {n: torch.randn(per_tensor) for n in names}
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in names]
    opt = torch.optim.AdamW([{"params": params[::2], "weight_decay": 0.01},
                             {"params": params[1::2], "weight_decay": 0.0}], lr=3e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10_000, eta_min=1e-6)
    for _ in range(500):
        opt.step()
        sched.step()
    sd = opt.state_dict()
    order = [i for g in sd["param_groups"] for i in g["params"]]
    sd["state"] = {i: {"step": torch.tensor(500.0), "exp_avg": torch.randn(per_tensor) * 1e-3,
                       "exp_avg_sq": torch.rand(per_tensor) * 1e-6} for i in order}
    torch.save({"step": 500, "model": model, "optimizer": sd, "scheduler": sched.state_dict()},
               path)
    return path


def run(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one command, run to completion."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{cmd} failed ({proc.returncode}): {err}")
    return wall, usage.ru_maxrss * 1024


def settle() -> None:
    """Flush the previous run's dirty pages to disk (untimed), so a command that writes gigabytes
    is not charged for the writeback of the one before it."""
    os.sync()
    time.sleep(1.0)


def compare(ours: list[str], baseline: list[str], repeats: int = 5, *,
            writes: bool = False, outputs: tuple[Path, ...] = ()) -> dict:
    """Alternate the two commands `repeats` times; medians, their ratio, peak RSS.

    With ``writes``, every timed run starts from a settled disk (:func:`settle`) with the
    ``outputs`` of earlier runs removed (a new file, as in normal use)."""
    a, b, rss_a, rss_b = [], [], [], []

    def fresh() -> None:
        for p in outputs:
            if p.exists():
                os.remove(p)
        if writes:
            settle()

    fresh(), run(ours), fresh(), run(baseline)  # warm the page cache for both
    for _ in range(repeats):
        fresh()
        t, r = run(ours)
        a.append(t), rss_a.append(r)
        fresh()
        t, r = run(baseline)
        b.append(t), rss_b.append(r)
    ma, mb = statistics.median(a), statistics.median(b)
    return {"ours_s": ma, "baseline_s": mb, "ratio": ma / mb,
            "ours_peak_rss_mb": max(rss_a) / 2**20, "baseline_peak_rss_mb": max(rss_b) / 2**20,
            "ours_runs": a, "baseline_runs": b}


def report(name: str, result: dict, target: float) -> None:
    verdict = "OK" if result["ratio"] <= target else "OVER TARGET"
    print(f"{name}: ckpttool {result['ours_s']:.3f}s vs baseline {result['baseline_s']:.3f}s "
          f"-> ratio {result['ratio']:.3f} (target <= {target}) {verdict}; peak RSS "
          f"{result['ours_peak_rss_mb']:.0f} MB vs {result['baseline_peak_rss_mb']:.0f} MB",
          flush=True)
    if "ours_runs" in result:  # the spread says how noisy the machine was
        print(f"  runs: ckpttool {' '.join(f'{t:.2f}' for t in result['ours_runs'])}; baseline "
              f"{' '.join(f'{t:.2f}' for t in result['baseline_runs'])}", flush=True)


PY = sys.executable


def big_file_arguments(doc: str, repeats: int, argv: list[str] | None = None) -> Any:
    """The options every 4 GB benchmark takes: ``--gb`` (the checkpoint's size) and
    ``--repeats`` (alternating runs of each command)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--gb", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser.parse_args(argv)
