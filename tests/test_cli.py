"""The command line: golden reports, JSON schema, exit codes, one-line errors, no torch import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ckpttool.errors import EXIT_ERROR, EXIT_OK
from conftest import FIXTURES, ROOT

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
    (["show", "fixtures"], "directory"),
    (["show", "--bogus", "x"], "No such option"),
    (["frobnicate"], "No such command"),
])
def test_usage_and_path_errors(run_cli, args, message):
    result = run_cli(*args)
    assert result.exit_code == EXIT_ERROR
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr


def test_many_paths_one_report_each_and_failure_is_exit_2(run_cli):
    result = run_cli("show", "--json", "fixtures/adamw_cosine.pt", "fixtures/bad/empty.pt",
                     "fixtures/legacy.pt")
    assert result.exit_code == EXIT_ERROR
    docs = json.loads(result.stdout)
    assert [d["path"] for d in docs] == ["fixtures/adamw_cosine.pt", "fixtures/bad/empty.pt",
                                         "fixtures/legacy.pt"]
    assert "error" in docs[1] and "optimizers" in docs[2]
    text = run_cli("show", "fixtures/adamw_cosine.pt", "fixtures/legacy.pt")
    assert text.exit_code == EXIT_OK and text.stdout.count("[optimizer] AdamW") == 2


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
