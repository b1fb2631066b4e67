"""The command line: golden reports, JSON schema, exit codes, one-line errors, no torch import."""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys

import click
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpttool.errors import EXIT_ERROR, EXIT_OK
from conftest import FIXTURES, ROOT, run_main

GOLDEN = ROOT / "tests" / "golden" / "show"
# Every readable fixture has a golden human report: adding a fixture adds a case.
GOOD = sorted(p.relative_to(ROOT).as_posix() for p in FIXTURES.rglob("*")
              if p.suffix in (".pt", ".ckpt") and "bad" not in p.parts)
BAD = sorted(p.relative_to(ROOT).as_posix() for p in (FIXTURES / "bad").iterdir())


def _golden_name(rel: str) -> str:
    return rel.removeprefix("fixtures/").replace("/", "__") + ".txt"


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("rel", GOOD)
def test_show_matches_golden_report(run_cli, rel):
    result = run_cli("show", rel)
    assert result.exit_code == EXIT_OK, result.stderr
    golden = GOLDEN / _golden_name(rel)
    if os.environ.get("CKPTTOOL_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(result.stdout)
    assert result.stdout == golden.read_text(), f"update with CKPTTOOL_UPDATE_GOLDEN=1 ({golden})"


def test_no_stale_golden_files():
    assert sorted(p.name for p in GOLDEN.glob("*.txt")) == sorted(_golden_name(r) for r in GOOD)


@pytest.mark.parametrize("rel", BAD)
def test_bad_input_is_one_line_and_exit_2(run_cli, rel):
    result = run_cli("show", rel)
    assert result.exit_code == EXIT_ERROR
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ckpttool: error: {rel}: ")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["show"], "Missing argument"),
    (["show", "fixtures/nope.pt"], "no such file"),
    (["show", "fixtures/bad/nope-*.pt"], "no file matches this pattern"),
    (["show", "ckpttool"], "no checkpoint in this folder"),
    (["show", "--bogus", "x"], "No such option"),
    (["frobnicate"], "No such command"),
])
def test_usage_and_path_errors(run_cli, args, message):
    result = run_cli(*args)
    assert result.exit_code == EXIT_ERROR
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr


def test_many_paths_one_document_or_report_each_and_failure_is_exit_2(run_cli):
    result = run_cli("show", "--json", "fixtures/adamw_cosine.pt", "fixtures/bad/empty.pt",
                     "fixtures/legacy.pt")
    assert result.exit_code == EXIT_ERROR
    docs = json.loads(result.stdout)
    assert [d["path"] for d in docs] == ["fixtures/adamw_cosine.pt", "fixtures/bad/empty.pt",
                                         "fixtures/legacy.pt"]
    assert "error" in docs[1] and "optimizers" in docs[2]
    text = run_cli("show", "--full", "fixtures/adamw_cosine.pt", "fixtures/legacy.pt")
    assert text.exit_code == EXIT_OK and text.stdout.count("[optimizer] AdamW") == 2
    summary = run_cli("show", "fixtures/adamw_cosine.pt", "fixtures/legacy.pt")
    assert summary.exit_code == EXIT_OK and summary.stdout.startswith("path ")
    assert summary.stdout.count("CosineAnnealingLR") == 2


def _check_show_schema(doc: dict) -> None:
    """PRODUCT.md section 5, field by field."""
    assert doc["schema"] == "ckpttool.show/1"
    assert isinstance(doc["path"], str) and isinstance(doc["kind"], str)
    for opt in doc["optimizers"]:
        assert set(opt) >= {"location", "class", "groups", "state"}
        for g in opt["groups"]:
            assert set(g) >= {"index", "num_params", "lr", "initial_lr", "lr_tensor", "hyper"}
            assert isinstance(g["hyper"], dict)
        assert set(opt["state"]) >= {"params_with_state", "step"}
    for s in doc["schedulers"]:
        assert set(s) >= {"location", "class", "optimizer", "last_epoch", "step_count",
                          "base_lrs", "last_lr", "args", "children", "unrecoverable"}
        assert isinstance(s["args"], dict) and isinstance(s["children"], list)
    for f in doc["findings"]:
        assert set(f) >= {"code", "severity", "location", "message"}
        assert f["severity"] in ("error", "warning", "info")


@pytest.mark.parametrize("rel", GOOD)
def test_json_schema(run_cli, rel):
    result = run_cli("show", "--json", rel)
    assert result.exit_code == EXIT_OK
    _check_show_schema(json.loads(result.stdout))


def test_json_floats_read_back_bit_identical(run_cli):
    path = "fixtures/schedulers/CosineAnnealingLR.pt"
    doc = json.loads(run_cli("show", "--json", path).stdout)
    ref = torch.load(path, weights_only=True)
    assert [g["lr"] for g in doc["optimizers"][0]["groups"]] == [
        g["lr"] for g in ref["optimizer"]["param_groups"]]
    assert doc["schedulers"][0]["last_lr"] == ref["scheduler"]["_last_lr"]


def test_json_has_no_bare_infinity(run_cli):
    out = run_cli("show", "--json", "fixtures/schedulers/ReduceLROnPlateau.pt").stdout
    json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_show_does_not_import_torch():
    """The real console process: -X importtime lists every module imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "ckpttool", "show",
                           "fixtures/adamw_cosine.pt"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "torch" not in imported and "deepdiff" not in imported


def test_version_and_help_have_examples(run_cli):
    assert run_cli("--version").stdout.startswith("ckpttool, version ")
    from ckpttool.cli import cli
    for name in cli.commands:
        help_text = run_cli(name, "--help").stdout
        assert "Example" in help_text, name


def test_debug_shows_the_traceback_for_library_errors(run_cli):
    result = run_cli("--debug", "show", "fixtures/bad/empty.pt")
    assert result.exit_code == EXIT_ERROR and "Traceback" in result.stderr


def test_a_bug_on_one_path_does_not_lose_the_batch(run_cli, monkeypatch):
    from ckpttool import inspection

    real = inspection.load

    def load(path, **kwargs):
        if str(path).endswith("legacy.pt"):
            raise RuntimeError("a bug")
        return real(path, **kwargs)

    monkeypatch.setattr(inspection, "load", load)
    paths = ["fixtures/adamw_cosine.pt", "fixtures/legacy.pt", "fixtures/tensor_lr.pt"]
    text = run_cli("show", "--full", *paths)
    assert text.exit_code == EXIT_ERROR
    assert text.stdout.count("findings:") == 2
    [line] = text.stderr.splitlines()
    assert line.startswith("ckpttool: error: fixtures/legacy.pt: internal error: RuntimeError")
    summary = run_cli("show", *paths)
    assert summary.exit_code == EXIT_ERROR and summary.stderr == text.stderr
    assert [row.split()[:2] for row in summary.stdout.splitlines()[1:4]] == [
        ["fixtures/adamw_cosine.pt", "torch-zip"], ["fixtures/legacy.pt", "unreadable"],
        ["fixtures/tensor_lr.pt", "torch-zip"]]
    as_json = run_cli("show", "--json", *paths)
    docs = json.loads(as_json.stdout)
    assert [("error" in d) for d in docs] == [False, True, False]
    assert as_json.stdout.rstrip("\n") == json.dumps(docs, indent=2)  # the usual layout


def test_a_closed_pipe_ends_quietly():
    """`ckpttool show ... | head -1`: more output than a pipe buffers, reader gone after a line."""
    paths = ["fixtures/adamw_cosine.pt"] * 200
    proc = subprocess.Popen([sys.executable, "-m", "ckpttool", "show", "--full", *paths], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"fixtures/adamw_cosine.pt")
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == EXIT_OK and stderr == b""


# --- no input makes `show` fail with anything but one clear line ----------------------------------


@functools.cache
def _base_trees() -> list[dict]:
    """Real states of the shapes show handles: plain, composite, per-group values, tensors."""
    L = torch.optim.lr_scheduler

    def run(opt, sched, steps=3, metric=False):
        for _ in range(steps):
            opt.step()
            sched.step(1.0) if metric else sched.step()
        return {"epoch": steps, "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}

    def sgd(groups=2, **kw):
        return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]}
                                for _ in range(groups)], lr=0.1, momentum=0.9, **kw)

    adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=torch.tensor(0.01),
                            capturable=True)
    trees = [
        run(adam, L.StepLR(adam, step_size=2)),
        run(o := sgd(), L.SequentialLR(o, [L.LinearLR(o, total_iters=2),
                                           L.OneCycleLR(o, max_lr=1.0, total_steps=20)], [2])),
        run(o := sgd(), L.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=2)),
        run(o := sgd(), L.MultiStepLR(o, milestones=[1, 2, 2])),
        run(o := sgd(), L.ReduceLROnPlateau(o), metric=True),
        run(o := sgd(), L.LambdaLR(o, lambda e: 0.9 ** e)),
    ]
    trees.append({"optimizer_states": [trees[2]["optimizer"], trees[3]["optimizer"]],
                  "lr_schedulers": [trees[3]["scheduler"], trees[2]["scheduler"]],
                  "pytorch-lightning_version": "2.4.0"})
    return trees


_ODD_VALUES = ["0.1", None, [], [1, "x"], {}, {"a": 1}, 10**5000, -(2**64), float("nan"),
               float("-inf"), -1, 0, True, (0.5,), torch.tensor([1.0, 2.0])]


def _paths(tree, prefix=()):
    """Every (container path, key) in a tree, tensors and strings being leaves."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in items:
        yield prefix, key
        if isinstance(value, (dict, list)):
            yield from _paths(value, prefix + (key,))


def _mutate(tree, data):
    """Change, drop, add or resize a few values anywhere in the tree."""
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        where, key = data.draw(st.sampled_from(list(_paths(tree))), label="at")
        parent = tree
        for k in where:
            parent = parent[k]
        op = data.draw(st.sampled_from(["set"] * 4 + ["drop", "add", "shorten", "lengthen"]),
                       label="op")
        value = copy.deepcopy(data.draw(st.sampled_from(_ODD_VALUES), label="value"))
        target = parent[key]
        if op == "drop":
            parent.pop(key)
        elif op == "add" and isinstance(target, dict):
            target[data.draw(st.sampled_from(["lr", "params", "_schedulers", "x", 3]))] = value
        elif op == "shorten" and isinstance(target, list) and target:
            del target[-1]
        elif op == "lengthen" and isinstance(target, list):
            target.append(target[0] if target else value)
        else:
            parent[key] = value


@settings(max_examples=500, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_show_never_fails_but_with_one_line(tmp_path_factory, run_cli, data):
    tree = copy.deepcopy(data.draw(st.sampled_from(_base_trees()), label="base"))
    _mutate(tree, data)
    path = tmp_path_factory.mktemp("mutated") / "ckpt.pt"
    torch.save(tree, path)
    for args in (["show"], ["show", "--json"], ["show", "--verify"]):
        result = run_cli(*args, path)
        if result.exit_code == EXIT_OK:
            if "--json" in args:
                json.loads(result.stdout)
            continue
        assert result.exit_code == EXIT_ERROR, result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("ckpttool: error: "), result.stderr
        assert "internal error" not in lines[0], lines[0]


def test_bare_ckpttool_prints_the_help(run_cli):
    result = run_cli()
    assert result.exit_code == EXIT_OK
    assert result.stdout.startswith("Usage: ") and "reschedule" in result.stdout
    assert result.stderr == ""


# --- options every command shares, progress bars, shell completion --------------------------------


def test_shared_options_have_one_spelling():
    """--json and -q/--quiet on every command, -o/--output wherever one file is written, and
    each of them declared the same way everywhere."""
    from ckpttool.cli import cli

    def option(command, name):
        return next((p for p in cli.commands[command].params if p.name == name), None)

    for command in cli.commands:
        assert option(command, "as_json").opts == ["--json"], command
        quiet = option(command, "quiet")
        assert sorted(quiet.opts) == ["--quiet", "-q"] and quiet.help == "No progress bar.", command
    for command in ("reschedule", "plot"):
        assert option(command, "output").opts == ["-o", "--output"], command
    # every option of every command has a long name, and no short name is used twice
    for command in cli.commands.values():
        shorts = [o for p in command.params for o in getattr(p, "opts", []) if len(o) == 2]
        assert len(shorts) == len(set(shorts))
        assert all(any(o.startswith("--") for o in p.opts) for p in command.params
                   if isinstance(p, click.Option))


def test_shell_completion_script_and_completions():
    env = {**os.environ, "_CKPTTOOL_COMPLETE": "bash_source"}
    script = subprocess.run([sys.executable, "-m", "ckpttool"], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert script.returncode == 0 and "_ckpttool_completion()" in script.stdout
    assert "complete -o nosort -F _ckpttool_completion ckpttool" in script.stdout
    env = {**os.environ, "_CKPTTOOL_COMPLETE": "bash_complete", "COMP_WORDS": "ckpttool res",
           "COMP_CWORD": "1"}
    words = subprocess.run([sys.executable, "-m", "ckpttool"], cwd=ROOT, env=env,
                           capture_output=True, text=True)
    assert words.stdout.split() == ["plain,reschedule"]
    env.update(COMP_WORDS="ckpttool reschedule --out", COMP_CWORD="2")
    words = subprocess.run([sys.executable, "-m", "ckpttool"], cwd=ROOT, env=env,
                           capture_output=True, text=True)
    assert "plain,--out-dir" in words.stdout.split()


def _main(args, monkeypatch, capsys, *, tty: bool):
    return run_main(args, monkeypatch, capsys, tty=tty)


LONG_REPLAY = ["reschedule", "fixtures/adamw_cosine.pt", "--dry-run", "--step", "150000"]


def test_a_long_replay_draws_a_bar_on_a_terminal(monkeypatch, capsys):
    code, out, err = _main(LONG_REPLAY, monkeypatch, capsys, tty=True)
    assert code == EXIT_OK and "replaying" in err and "100%" in err and "#" in err
    assert "replaying" not in out and out.startswith("fixtures/adamw_cosine.pt (dry run")


@pytest.mark.parametrize("tty, extra", [(True, ["--quiet"]), (True, ["-q"]), (False, [])])
def test_no_bar_with_quiet_or_off_a_terminal(monkeypatch, capsys, tty, extra):
    code, out, err = _main(LONG_REPLAY + extra, monkeypatch, capsys, tty=tty)
    assert code == EXIT_OK and err == "" and "replayed 150000 steps" in out


def test_a_short_replay_draws_no_bar(monkeypatch, capsys):
    code, _, err = _main(["plot", "fixtures/adamw_cosine.pt"], monkeypatch, capsys, tty=True)
    assert code == EXIT_OK and err == ""


def test_plot_of_a_long_horizon_draws_a_bar(monkeypatch, capsys):
    code, out, err = _main(["plot", "fixtures/adamw_cosine.pt", "--steps", "150000"],
                           monkeypatch, capsys, tty=True)
    assert code == EXIT_OK and "replaying" in err and "100%" in err and "groups 0, 1" in out


def test_an_error_starts_a_line_of_its_own_after_a_bar(monkeypatch, capsys):
    from ckpttool import schedule

    real = schedule.replay

    def replay(scheduler, steps, progress=None):
        real(scheduler, steps // 2, progress and (lambda done, _: progress(done, steps)))
        raise KeyboardInterrupt

    monkeypatch.setattr(schedule, "replay", replay)
    code, _, err = _main(LONG_REPLAY, monkeypatch, capsys, tty=True)
    assert code == EXIT_ERROR and "replaying" in err
    assert err.splitlines()[-1] == "ckpttool: error: interrupted"


def _writing(tmp_path, monkeypatch, capsys, extra=(), *, tty=True):
    return _main(["reschedule", "fixtures/adamw_cosine.pt", "-o", tmp_path / "out.pt",
                  "--set", "T_max=80", *extra], monkeypatch, capsys, tty=tty)


def test_a_small_output_draws_no_writing_bar(tmp_path, monkeypatch, capsys):
    from ckpttool import cli

    assert cli.BAR_MIN_COPY_BYTES == 256 << 20  # the documented threshold
    code, out, err = _writing(tmp_path, monkeypatch, capsys)
    assert code == EXIT_OK and err == "" and "verified" in out


def test_a_big_output_draws_a_writing_bar(tmp_path, monkeypatch, capsys):
    """Above BAR_MIN_COPY_BYTES (here lowered, with progress reported per chunk: the fixture is
    small) the copy draws a bar on stderr, which ends before the report starts."""
    from ckpttool import cli, serialization

    monkeypatch.setattr(cli, "BAR_MIN_COPY_BYTES", 1)
    monkeypatch.setattr(serialization, "PROGRESS_BYTES", 1)
    code, out, err = _writing(tmp_path, monkeypatch, capsys)
    assert code == EXIT_OK and "writing" in err and "100%" in err and "#" in err
    assert "writing" not in out and "verified" in out
    for extra, tty in ((["--quiet"], True), ([], False)):
        (tmp_path / "out.pt").unlink()
        code, out, err = _writing(tmp_path, monkeypatch, capsys, extra, tty=tty)
        assert code == EXIT_OK and err == "" and "verified" in out


def test_debug_is_taken_after_the_command_too():
    # `ckpttool show --debug X` as well as `ckpttool --debug show X`: the traceback, not a line
    for args in (["show", "--debug", "fixtures/bad/empty.pt"],
                 ["--debug", "show", "fixtures/bad/empty.pt"]):
        proc = subprocess.run([sys.executable, "-m", "ckpttool", *args], cwd=ROOT,
                              capture_output=True, text=True)
        assert proc.returncode == 2 and "Traceback" in proc.stderr, proc.stderr
    # after `--`, it is a path
    proc = subprocess.run([sys.executable, "-m", "ckpttool", "show", "--", "--debug"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "--debug" in proc.stderr
