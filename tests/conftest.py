"""Shared test helpers: paths to the committed fixtures and a CLI runner."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


@pytest.fixture
def run_cli():
    """Invoke the ckpttool CLI in-process; returns click's Result (stdout and stderr apart)."""
    from ckpttool.cli import cli

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)

    return invoke


def train_schedule(opt, make, steps: int):
    """Build a scheduler with `make(opt)`, step optimizer and scheduler `steps` times, and
    return (scheduler state, param_groups) as a checkpoint holds them."""
    import copy
    import warnings

    sched = make(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            opt.step()
            sched.step()
    return copy.deepcopy(sched.state_dict()), copy.deepcopy(opt.state_dict()["param_groups"])


def run_main(args, monkeypatch, capsys, *, tty: bool):
    """The real entry point (not CliRunner, whose streams are no terminal), with stderr a
    terminal or not; returns (exit code, stdout, stderr)."""
    import sys

    from ckpttool.cli import cli

    capsys.readouterr()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def record_durability(monkeypatch) -> list[str]:
    """Record every fsync ("fsync file" / "fsync folder") and rename ("rename to NAME"), in
    order, into the returned list (the calls still happen)."""
    import os
    import stat

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        real_fsync(fd)
        events.append("fsync " + ("file" if stat.S_ISREG(os.fstat(fd).st_mode) else "folder"))

    def replace(a, b):
        real_replace(a, b)
        events.append(f"rename to {os.path.basename(b)}")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events
