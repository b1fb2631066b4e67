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
