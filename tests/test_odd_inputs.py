"""Valid but odd inputs, through show, diff and reschedule: sensible output, no traceback.

Checkpoints made by real torch in unusual states (no param groups, an optimizer never stepped,
a scheduler never stepped, past its horizon, 10 million steps in), and paths made odd
(non-ASCII, spaces, symlinks to files and folders, read-only files), and a file holding two
identical optimizers. Every command ends with exit 0/1 and a sensible report, or with one
error line that says what to do.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckpttool.cli import cli

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def invoke(*args) -> object:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, \
        result.stderr
    return result


def ok(*args) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, (args, result.stdout[-1000:], result.stderr)
    return result.stdout


def refused(*args) -> str:
    result = invoke(*args)
    lines = result.stderr.splitlines()
    assert result.exit_code == 2 and len(lines) == 1, (args, result.stdout, result.stderr)
    assert lines[0].startswith("ckpttool: error: ")
    return lines[0]


def _params(n: int = 2) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(3, generator=gen)) for _ in range(n)]


def _stepped(opt, sched=None, steps: int = 0):
    for p in (p for g in opt.param_groups for p in g["params"]):
        p.grad = torch.ones_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            opt.step()
            if sched is not None:
                sched.step()


def save(path: Path, **tree) -> Path:
    torch.save(tree, path)
    return path


def resumed_lrs(path: Path, make_opt, make_sched, steps: int = 3) -> list[float]:
    """The lrs a run resumed from ``path`` the documented way takes in its next steps."""
    ckpt = torch.load(path, weights_only=True)
    opt = make_opt(_params())
    sched = make_sched(opt)
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    return _next_lrs(opt, sched, steps)


def reference_lrs(make_opt, make_sched, at: int, steps: int = 3) -> list[float]:
    """The same, for a run that used ``make_sched`` from step 0 (the oracle)."""
    opt = make_opt(_params())
    sched = make_sched(opt)
    _stepped(opt, sched, at)
    return _next_lrs(opt, sched, steps)


def _next_lrs(opt, sched, steps: int) -> list[float]:
    """The first group's lr after each of the next ``steps`` steps."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            opt.step()
            sched.step()
            out.append(opt.param_groups[0]["lr"])
    return out


# --- odd states -------------------------------------------------------------------------------


def test_empty_param_groups(tmp_path):
    path = save(tmp_path / "empty.pt", optimizer={"state": {}, "param_groups": []})
    report = ok("show", path)
    assert "0 groups" in report and "no param groups" in report, report
    doc = json.loads(ok("show", "--json", path))
    assert doc["optimizers"][0]["groups"] == []
    assert invoke("diff", path, path).exit_code == 0
    assert "--step" in refused("reschedule", path, "--dry-run", "--scheduler",
                               "StepLR(step_size=2)")
    assert "no param groups" in refused("reschedule", path, "--dry-run", "--scheduler",
                                        "StepLR(step_size=2)", "--step", "0")


def test_an_optimizer_with_no_state_yet(tmp_path):
    """Built, never stepped: no per-parameter state and no step count. A new schedule needs
    a resume position, and says so; with one, the resume is exactly the new schedule's."""
    opt = torch.optim.AdamW(_params(), lr=0.01)
    path = save(tmp_path / "fresh.pt", optimizer=opt.state_dict())
    assert "state for 0" in ok("show", path)
    line = refused("reschedule", path, "-o", tmp_path / "out.pt", "--scheduler",
                   "CosineAnnealingLR(T_max=10)")
    assert "--step" in line
    ok("reschedule", path, "-o", tmp_path / "out.pt", "--scheduler",
       "CosineAnnealingLR(T_max=10)", "--step", "0")
    make_sched = lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10)
    make_opt = lambda p: torch.optim.AdamW(p, lr=0.01)
    assert resumed_lrs(tmp_path / "out.pt", make_opt, make_sched) == reference_lrs(
        make_opt, make_sched, 0)


def test_a_scheduler_never_stepped(tmp_path):
    make_opt = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)
    opt = make_opt(_params())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    path = save(tmp_path / "new.pt", optimizer=opt.state_dict(), scheduler=sched.state_dict())
    report = ok("show", path)
    assert "last_epoch 0" in report and "StepLR(step_size=3, gamma=0.5)" in report
    assert "findings: none" in report
    ok("show", "--verify", path)
    out = tmp_path / "out.pt"
    ok("reschedule", path, "-o", out, "--set", "step_size=2")
    make_sched = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
    assert resumed_lrs(out, make_opt, make_sched, 5) == reference_lrs(make_opt, make_sched, 0, 5)
    assert invoke("diff", path, out).exit_code == 1


def test_one_cycle_at_and_past_its_total_steps(tmp_path):
    """OneCycleLR refuses to step past total_steps: at the end, show says so; rescheduling to
    a longer run works; a state edited past the end is named, not a traceback."""
    make_opt = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)
    opt = make_opt(_params())
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    _stepped(opt, sched, 9)  # last_epoch 9: the tenth and last lr
    at_end = save(tmp_path / "end.pt", optimizer=opt.state_dict(), scheduler=sched.state_dict())
    report = ok("show", at_end)
    assert "total_steps" in report
    out = tmp_path / "longer.pt"
    ok("reschedule", at_end, "-o", out, "--set", "total_steps=20")
    make_sched = lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1,
                                                               total_steps=20)
    assert resumed_lrs(out, make_opt, make_sched) == reference_lrs(make_opt, make_sched, 9)
    past = sched.state_dict() | {"last_epoch": 15, "_step_count": 16}
    beyond = save(tmp_path / "past.pt", optimizer=opt.state_dict(), scheduler=past)
    report = ok("show", beyond)
    assert "past" in report or "total_steps" in report
    result = invoke("reschedule", beyond, "-o", tmp_path / "same.pt", "--set", "max_lr=0.2")
    assert result.exit_code in (0, 2), result.stderr
    if result.exit_code == 2:
        assert "total_steps" in refused("reschedule", beyond, "--dry-run", "--set", "max_lr=0.2")
    ok("reschedule", beyond, "-o", tmp_path / "fixed.pt", "--set", "total_steps=40")


def test_cosine_past_t_max(tmp_path):
    """CosineAnnealingLR goes on past T_max (its lr rises again): a valid state."""
    make_opt = lambda p: torch.optim.SGD(p, lr=0.1)
    opt = make_opt(_params())
    make_sched = lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5)
    sched = make_sched(opt)
    _stepped(opt, sched, 12)
    path = save(tmp_path / "past.pt", optimizer=opt.state_dict(), scheduler=sched.state_dict())
    assert "last_epoch 12" in ok("show", "--verify", path)
    out = tmp_path / "out.pt"
    ok("reschedule", path, "-o", out, "--set", "T_max=5")
    assert invoke("diff", path, out).exit_code == 0  # the same schedule: nothing changes
    ok("reschedule", path, "-o", tmp_path / "longer.pt", "--set", "T_max=30")
    longer = lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=30)
    assert resumed_lrs(tmp_path / "longer.pt", make_opt, longer) == reference_lrs(
        make_opt, longer, 12)


@pytest.fixture
def ten_million(tmp_path):
    """A run 10,000,000 steps into a 20,000,000-step cosine (its state built by torch
    itself, stepped with epoch= to get there without 10 million steps)."""
    opt = torch.optim.SGD(_params(), lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20_000_000)
    state = sched.state_dict() | {"last_epoch": 10_000_000, "_step_count": 10_000_001}
    return save(tmp_path / "long.pt", optimizer=opt.state_dict(), scheduler=state)


def test_ten_million_steps_in_reads_fast_and_resumes_elsewhere(ten_million, tmp_path):
    """show and diff read it at once; a replay of 10,000,000 steps takes about 20 s of torch
    stepping (see the README), so here the resume moves to step 1000."""
    import time

    start = time.perf_counter()
    assert "last_epoch 10000000" in ok("show", ten_million)
    assert json.loads(ok("show", "--json", ten_million))["schedulers"][0]["last_epoch"] \
        == 10_000_000
    assert invoke("diff", ten_million, ten_million).exit_code == 0
    assert time.perf_counter() - start < 5
    out = tmp_path / "early.pt"
    ok("reschedule", ten_million, "-o", out, "--step", "1000")
    assert "last_epoch 1000" in ok("show", out)


def test_ten_million_step_replay_shows_a_bar_and_stops_cleanly(ten_million, tmp_path,
                                                               monkeypatch, capsys):
    """On a terminal, the replay draws a bar; Ctrl-C in it (here: after the first update)
    ends with one line, nothing written."""
    from conftest import run_main

    from ckpttool import cli as cli_module

    real = cli_module._progress_bar

    def interrupting(label, **kwargs):
        update = real(label, **kwargs)
        if update is None or label != "replaying":
            return update

        def each(done, total):
            update(done, total)
            if done:
                raise KeyboardInterrupt

        return each

    monkeypatch.setattr(cli_module, "_progress_bar", interrupting)
    out = tmp_path / "out.pt"
    code, _, err = run_main(["reschedule", ten_million, "-o", out, "--set", "T_max=40000000"],
                            monkeypatch, capsys, tty=True)
    assert code == 2 and "replaying" in err
    assert err.splitlines()[-1] == "ckpttool: error: interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.pt"]


# --- odd paths ----------------------------------------------------------------------------------


ODD_NAMES = ["run dir/ckpt 1.pt", "répertoire/チェックポイント.pt", "a'b\"c/$(x) *.pt",
             "-dash/-o.pt"]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_characters_in_paths(tmp_path, name):
    path = tmp_path / name
    path.parent.mkdir(parents=True)
    shutil.copyfile(FIXTURES / "adamw_cosine.pt", path)
    assert str(path) in ok("show", path)
    assert json.loads(ok("show", "--json", path))["path"] == str(path)
    out = path.parent / ("out " + path.name)
    ok("reschedule", path, "-o", out, "--set", "T_max=80")
    assert invoke("diff", path, out).exit_code == 1
    ok("reschedule", out, "--in-place", "--set", "T_max=40")
    assert invoke("diff", path, out).exit_code == 0  # back to the stored schedule
    assert (path.parent / (out.name + ".bak")).exists()
    # the folder kinds too
    folder = path.parent / ("HF " + path.stem)
    shutil.copytree(FIXTURES / "dirs" / "hf_trainer" / "checkpoint-20", folder)
    assert "hf-trainer" in ok("show", folder)
    ok("reschedule", folder, "-o", path.parent / "ü new", "--scheduler",
       "CosineAnnealingLR(T_max=40)")


def test_odd_bytes_in_a_name(tmp_path):
    """A name that is not UTF-8 (bytes a filesystem allows): one line, or a report."""
    raw = os.fsencode(tmp_path) + b"/bad\xff\xfe.pt"
    shutil.copyfile(FIXTURES / "adamw_cosine.pt", raw)
    name = os.fsdecode(raw)
    ok("show", name)
    doc = ok("show", "--json", name)
    json.loads(doc)
    ok("reschedule", name, "-o", name + ".out", "--set", "T_max=80")


def test_symlinks_to_a_file(tmp_path):
    target = tmp_path / "real" / "ckpt.pt"
    target.parent.mkdir()
    shutil.copyfile(FIXTURES / "adamw_cosine.pt", target)
    before = target.read_bytes()
    link = tmp_path / "link.pt"
    link.symlink_to(target)
    assert "CosineAnnealingLR" in ok("show", link)
    assert invoke("diff", link, target).exit_code == 0
    # the output named by a symlink to the input: refused, the input untouched
    assert "input" in refused("reschedule", target, "-o", link, "--set", "T_max=80",
                              "--force")
    assert target.read_bytes() == before
    # --in-place through a symlink rewrites the file it points to; the link stays a link
    ok("reschedule", link, "--in-place", "--set", "T_max=80")
    assert link.is_symlink() and link.resolve() == target
    assert target.read_bytes() != before
    assert (tmp_path / "real" / "ckpt.pt.bak").read_bytes() == before
    # an output through a symlink to an existing file (with --force) is written through it
    other = tmp_path / "real" / "other.pt"
    other.write_bytes(b"old")
    out_link = tmp_path / "out.pt"
    out_link.symlink_to(other)
    assert "exists" in refused("reschedule", target, "-o", out_link, "--set", "T_max=40")
    ok("reschedule", target, "-o", out_link, "--set", "T_max=40", "--force")
    assert out_link.is_symlink() and other.read_bytes()[:2] == b"PK"
    # a dangling symlink as the input
    dangling = tmp_path / "dangling.pt"
    dangling.symlink_to(tmp_path / "nowhere.pt")
    assert "no such file" in refused("show", dangling)


def test_symlinks_to_folders(tmp_path):
    real = tmp_path / "runs" / "checkpoint-20"
    shutil.copytree(FIXTURES / "dirs" / "hf_trainer" / "checkpoint-20", real)
    link = tmp_path / "latest"
    link.symlink_to(real, target_is_directory=True)
    assert "hf-trainer" in ok("show", link)
    assert invoke("diff", link, real).exit_code == 0
    # an output folder reached through a symlinked parent
    parent_link = tmp_path / "out-link"
    (tmp_path / "out-real").mkdir()
    parent_link.symlink_to(tmp_path / "out-real", target_is_directory=True)
    ok("reschedule", link, "-o", parent_link / "checkpoint-20", "--scheduler",
       "CosineAnnealingLR(T_max=40)")
    assert (tmp_path / "out-real" / "checkpoint-20" / "optimizer.pt").exists()
    # a folder of runs holding a symlink to a checkpoint: found once per name
    table = ok("show", tmp_path / "runs")
    assert "checkpoint-20" in table


def test_read_only_inputs(tmp_path):
    path = tmp_path / "ro.pt"
    shutil.copyfile(FIXTURES / "adamw_cosine.pt", path)
    before = path.read_bytes()
    path.chmod(0o444)
    try:
        ok("show", path)
        ok("reschedule", path, "-o", tmp_path / "out.pt", "--set", "T_max=80")
        line = refused("reschedule", path, "--in-place", "--set", "T_max=80")
        assert "read-only" in line and "-o" in line, line
        assert path.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt", "ro.pt"]
        assert stat.S_IMODE(path.stat().st_mode) == 0o444
    finally:
        path.chmod(0o644)


# --- two identical optimizers -------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True], ids=["equal-copies", "one-object-twice"])
def test_two_identical_optimizers(tmp_path, shared):
    """Two equal optimizer states (or one object saved under two names): show lists both and
    cannot tell which one the scheduler drives; reschedule asks which (--optimizer, then
    --scheduler-state) and changes only that one (one object saved twice is then two)."""
    make_opt = lambda p: torch.optim.AdamW(p, lr=0.01)
    opt = make_opt(_params())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    _stepped(opt, sched, 4)
    state = opt.state_dict()
    import copy

    second = state if shared else copy.deepcopy(state)
    path = save(tmp_path / "two.pt", opt_a=state, opt_b=second, scheduler=sched.state_dict())
    report = ok("show", path)
    assert "[opt_a]" in report and "[opt_b]" in report
    assert "ambiguous" in report or "may drive" in report
    assert invoke("diff", path, path).exit_code == 0
    line = refused("reschedule", path, "--dry-run", "--set", "T_max=40")
    assert "opt_a" in line and "opt_b" in line and "--optimizer" in line
    line = refused("reschedule", path, "--dry-run", "--set", "T_max=40", "--optimizer", "opt_a")
    assert "--scheduler-state" in line  # which one the scheduler drives is not stored
    out = tmp_path / "out.pt"
    result = invoke("reschedule", path, "-o", out, "--set", "T_max=40", "--optimizer", "opt_a",
                    "--scheduler-state", "scheduler")
    assert result.exit_code == 0, result.stderr
    loaded = torch.load(out, weights_only=True)
    original = torch.load(path, weights_only=True)
    assert loaded["opt_b"]["param_groups"] == original["opt_b"]["param_groups"]
    assert loaded["opt_a"]["param_groups"] != original["opt_a"]["param_groups"]
