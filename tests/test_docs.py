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


@pytest.mark.parametrize("name, option", [(n, o) for n, c in sorted(cli.commands.items())
                                          for o in _options(c)] + [("", o) for o in _options(cli)])
def test_every_option_is_documented(name, option):
    assert f"`{option}" in README, f"{option} of {name or 'ckpttool'} is not in the README"


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
    assert (tmp_path / "longer.pt").exists()
    assert "False 0" in out and "optimizer/param_groups/0/initial_lr 0.001 -> 0.0005" in out
