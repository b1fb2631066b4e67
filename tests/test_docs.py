"""The README stays true: every command and option is documented, examples are real output,
and the Python API example runs."""

from __future__ import annotations

import re

import click
import pytest

from ckpttool.cli import cli
from conftest import ROOT

README = (ROOT / "README.md").read_text()


def _options(command: click.Command) -> list[str]:
    return [opt for p in command.params if isinstance(p, click.Option) for opt in p.opts
            if opt.startswith("--") and opt != "--help"]


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_a_section(name):
    assert f"## `ckpttool {name}`" in README


def _section(name: str) -> str:
    """The README's section of a command, from its heading to the next."""
    start = README.index(f"## `ckpttool {name}`")
    end = README.find("\n## ", start + 1)
    return README[start:end if end >= 0 else None]


@pytest.mark.parametrize("name, option", [(n, o) for n, c in sorted(cli.commands.items())
                                          for o in _options(c)] + [("", o) for o in _options(cli)])
def test_every_option_is_documented(name, option):
    """In its command's own section (and the group's options anywhere)."""
    where = _section(name) if name else README
    assert f"`{option}" in where, f"{option} of {name or 'ckpttool'} is not in its README section"


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_usage_line_names_every_option(name):
    """The usage block at the top of a section lists each option of the command."""
    usage = re.search(r"```\n(ckpttool .*?)```", _section(name), re.S).group(1)
    missing = [o for o in _options(cli.commands[name]) if o not in usage
               and not (o == "--output" and "-o " in usage)]
    assert not missing, f"the usage of {name} lacks {missing}"


EXAMPLES = re.findall(r"<!-- example: (.+?) -->\n```\n\$ ckpttool .+?\n(.*?)```", README, re.S)


def test_examples_are_found():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("args, shown", EXAMPLES, ids=[a for a, _ in EXAMPLES])
def test_readme_examples_are_real_output(run_cli, monkeypatch, args, shown):
    monkeypatch.chdir(ROOT)
    result = run_cli(*args.split())
    actual = (result.stdout + result.stderr).rstrip("\n")
    if shown.startswith("...\n"):  # an elided example shows the end of the output
        assert actual.endswith(shown[4:].rstrip("\n"))
    else:
        assert actual == shown.rstrip("\n")


def test_python_api_example_runs(monkeypatch, capsys, tmp_path):
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    monkeypatch.chdir(tmp_path)  # the example writes files
    block = re.search(r"## Python API\n\n```python\n(.*?)```", README, re.S).group(1)
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "CosineAnnealingLR(T_max=40, eta_min=1e-05) 16 optimizer" in out
    assert "True" in out and "0 (0.001, 0.0005)" in out
    assert (tmp_path / "extended.pt").exists()
    assert "False 0" in out and "optimizer/param_groups/0/initial_lr 0.001 -> 0.0005" in out


def test_python_api_migration_example_runs(monkeypatch, capsys, tmp_path):
    """The sweep example: run in a folder holding copies of fixtures as a sweep of runs."""
    import shutil

    import ckpttool

    runs = {"run1/last.pt": "fixtures/adamw_cosine.pt",
            "run2/last.pt": "fixtures/schedulers/CosineAnnealingLR.pt",
            "run10/last.ckpt": "fixtures/layouts/lightning.ckpt",
            "run11/last.pt": "fixtures/layouts/tutorial.pt"}  # StepLR: skipped
    for name, fixture in runs.items():
        (tmp_path / "sweep" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / fixture, tmp_path / "sweep" / name)
    monkeypatch.chdir(tmp_path)
    block = re.search(r"<!-- example-python: sweep -->\n```python\n(.*?)```", README,
                      re.S).group(1)
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.count("(dry run: nothing written)") == 3 and "skipped: sweep/run11/last.pt" in out
    # The dry run came first: every plan was printed before anything was saved.
    assert out.rindex("(dry run: nothing written)") < out.index("verified for 10 steps")
    assert sorted(p.relative_to(tmp_path / "sweep-halved").as_posix()
                  for p in (tmp_path / "sweep-halved").rglob("*") if p.is_file()) == [
        "run1/last.pt", "run10/last.ckpt", "run2/last.pt"]
    for name in ("run1/last.pt", "run2/last.pt", "run10/last.ckpt"):
        before = ckpttool.load(tmp_path / "sweep" / name)
        after = ckpttool.load(tmp_path / "sweep-halved" / name, verify=True)
        old, new = before.schedulers[0], after.schedulers[0]
        assert new.args["T_max"] == int(old.args["T_max"] * 1.5)
        assert new.base_lrs == [b * 0.5 for b in old.base_lrs]
        assert new.verify.identical and new.last_epoch == old.last_epoch
    assert ckpttool.load(tmp_path / "sweep" / "run1/last.pt").schedulers[0].args["T_max"] == 40
