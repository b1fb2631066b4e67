"""show --verify on HF Trainer folders: the schedule rebuilt by transformers and replayed, the
stored state and trainer_state.json's logged lrs compared bit for bit; a bar for long replays.

The oracles are the real Trainer (the fixtures are its output, see fixtures/dirs/LAYOUT.md) and
transformers' own schedules stepped on a real torch optimizer.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

import ckpttool
from ckpttool import schedule
from ckpttool.errors import EXIT_OK
from conftest import FIXTURES, run_main

transformers = pytest.importorskip("transformers")

DIRS = FIXTURES / "dirs"
HF20 = DIRS / "hf_trainer/checkpoint-20"
HF40 = DIRS / "hf_trainer/checkpoint-40"
COSINE8 = DIRS / "hf_trainer_cosine/checkpoint-8"
COSINE12 = DIRS / "hf_trainer_cosine/checkpoint-12"
REAL = [HF20, HF40, COSINE8, COSINE12]
# What make_fixtures.py gave the Trainer (LAYOUT.md): the schedule of each run.
SCHEDULES = {"hf_trainer": ("linear", 5, 40), "hf_trainer_cosine": ("cosine", 2, 12)}


def _log(folder) -> list[tuple[int, float]]:
    state = json.loads((folder / "trainer_state.json").read_text())
    return [(e["step"], e["learning_rate"]) for e in state["log_history"] if "learning_rate" in e]


def _transformers_lrs(folder) -> list[float]:
    """The first group's lr after 0, 1, ..., max_steps steps of transformers' own schedule, on
    a real AdamW with the run's learning_rate."""
    name, warmup, total = SCHEDULES[folder.parent.name]
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = transformers.get_scheduler(name, opt, num_warmup_steps=warmup,
                                       num_training_steps=total)
    lrs = [sched.get_last_lr()[0]]
    for _ in range(total):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    return lrs


def _copy(folder, tmp_path):
    out = tmp_path / folder.name
    shutil.copytree(folder, out)
    return out


def _edit_state(folder, edit) -> None:
    path = folder / "trainer_state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def _codes(ckpt) -> dict[str, object]:
    return {f.code: f for f in ckpt.findings}


# --- what the Trainer logs -----------------------------------------------------------------------


@pytest.mark.parametrize("folder", REAL, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_trainer_logs_the_lr_each_step_used(folder):
    """Established on the real Trainer's output (transformers 5.23, trainer.py reads
    `_get_learning_rate()` before `lr_scheduler.step()`): the lr logged with step N is
    get_last_lr()[0] after N - 1 scheduler steps, exactly (the JSON float reads back bit for
    bit); never the one after N steps."""
    lrs, log = _transformers_lrs(folder), _log(folder)
    assert log and all(lr == lrs[n - 1] for n, lr in log)
    assert not any(lr == lrs[n] for n, lr in log)


# --- the real folders verify ----------------------------------------------------------------------


@pytest.mark.parametrize("folder", REAL, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_real_trainer_folders_verify(folder):
    ckpt = ckpttool.load(folder, verify=True)
    (sched,) = ckpt.schedulers
    spec = ckpt.hf.spec
    assert sched.named == spec  # the name survives the verify
    v = sched.verify
    assert (v.identical, v.call, v.steps) == (True, spec, ckpt.hf.global_step)
    assert v.logged.agrees and v.logged.convention == "before-step"
    assert (v.logged.checked, v.logged.beyond) == (len(_log(folder)), 0)
    codes = _codes(ckpt)
    assert codes["hf-logged-lr"].severity == "info" and spec in codes["hf-logged-lr"].message
    assert not {"verify-unavailable", "verify-mismatch", "hf-logged-lr-mismatch"} & set(codes)
    assert not [f for f in ckpt.findings if f.severity == "error"]


def test_show_verify_text_and_json(run_cli):
    result = run_cli("show", "--verify", HF20)
    assert result.exit_code == EXIT_OK and result.stderr == ""
    assert "  verify: identical to a clean replay\n" in result.stdout
    assert "  logged lrs (trainer_state.json): all 4 equal the replay\n" in result.stdout
    assert "hf-logged-lr  " in result.stdout
    doc = json.loads(run_cli("show", "--json", "--verify", HF20).stdout)
    plain = json.loads(run_cli("show", "--json", HF20).stdout)
    (sched,) = doc["schedulers"]
    assert {k: v for k, v in sched.items() if k != "verify"} == plain["schedulers"][0]
    verify = sched["verify"]
    assert {"identical", "first_difference", "reason", "differences", "steps",
            "call"} < set(verify)
    assert verify["identical"] is True and verify["call"] == plain["hf"]["schedule"]
    assert verify["logged"] == {"convention": "before-step", "offset": -1, "checked": 4,
                                "agrees": True, "mismatches": 0, "first_mismatch": None,
                                "beyond": 0}


# --- doctored folders are caught ------------------------------------------------------------------


def test_a_doctored_logged_lr_is_named_with_both_values(tmp_path, run_cli):
    folder = _copy(HF20, tmp_path)
    _edit_state(folder, lambda s: s["log_history"][1].__setitem__("learning_rate", 0.0009))
    ckpt = ckpttool.load(folder, verify=True)
    replayed = _transformers_lrs(HF20)[10 - 1]
    check = ckpt.schedulers[0].verify.logged
    assert (check.convention, check.mismatches, check.first_mismatch) == (
        "before-step", 1, (10, 0.0009, replayed))
    finding = _codes(ckpt)["hf-logged-lr-mismatch"]
    # the state follows the schedule: the log is history (a warning, not an error)
    assert (finding.severity, finding.location) == ("warning", "trainer_state.json")
    assert "step 10 logged learning_rate 0.0009, a clean replay" in finding.message
    assert repr(replayed) in finding.message and "1 of 4" in finding.message
    assert ckpt.schedulers[0].verify.identical  # the scheduler state itself is clean
    result = run_cli("show", "--verify", folder)
    assert "logged lrs (trainer_state.json): 1 of 4 DIFFER from the replay, the first at step 10" \
        in result.stdout
    doc = json.loads(run_cli("show", "--verify", "--json", folder).stdout)
    assert doc["schedulers"][0]["verify"]["logged"]["first_mismatch"] == {
        "step": 10, "logged": 0.0009, "replayed": replayed}


def test_a_last_bit_is_enough(tmp_path):
    import math

    folder = _copy(COSINE8, tmp_path)
    last = _log(COSINE8)[-1][1]
    _edit_state(folder, lambda s: s["log_history"][-1].__setitem__(
        "learning_rate", math.nextafter(last, 1.0)))
    check = ckpttool.load(folder, verify=True).schedulers[0].verify.logged
    assert check.first_mismatch[0] == _log(COSINE8)[-1][0] and check.mismatches == 1


def test_a_doctored_global_step_is_caught(tmp_path):
    folder = _copy(HF20, tmp_path)
    _edit_state(folder, lambda s: s.__setitem__("global_step", 21))
    ckpt = ckpttool.load(folder, verify=True)
    finding = _codes(ckpt)["hf-step-mismatch"]
    assert finding.severity == "error" and "global_step 21" in finding.message
    assert ckpt.schedulers[0].verify.identical  # the replay follows the scheduler's own step


@pytest.mark.parametrize("file, edit, first", [
    ("scheduler.pt", lambda s: s["_last_lr"].__setitem__(1, 0.0005), "scheduler._last_lr[1]"),
    ("scheduler.pt", lambda s: s.__setitem__("base_lrs", [0.002, 0.002]), "scheduler.base_lrs[0]"),
    ("scheduler.pt", lambda s: s.__setitem__("_step_count", 20), "scheduler._step_count"),
    # replayed to 19 steps: the counter after it disagrees first
    ("scheduler.pt", lambda s: s.__setitem__("last_epoch", 19), "scheduler._step_count"),
    ("optimizer.pt", lambda s: s["param_groups"][0].__setitem__("lr", 0.0005),
     "optimizer.param_groups[0].lr"),
], ids=["last_lr", "base_lrs", "step_count", "last_epoch", "group lr"])
def test_a_doctored_state_is_named_by_its_first_field(tmp_path, file, edit, first):
    folder = _copy(HF20, tmp_path)
    state = torch.load(folder / file, weights_only=True)
    edit(state)
    torch.save(state, folder / file)
    ckpt = ckpttool.load(folder, verify=True)
    v = ckpt.schedulers[0].verify
    assert v.identical is False and v.first_difference.startswith(first + ":"), v.first_difference
    finding = _codes(ckpt)["verify-mismatch"]
    assert finding.severity == "error" and "hf:linear(num_warmup_steps=5" in finding.message


def test_the_older_convention_is_recognised(tmp_path):
    """transformers < 4.51 logged the lr after stepping (huggingface/transformers#36973): a log
    made so, here from transformers' own schedule, agrees under that convention."""
    folder = _copy(HF20, tmp_path)
    lrs = _transformers_lrs(HF20)

    def after_step(state):
        for entry in state["log_history"]:
            entry["learning_rate"] = lrs[entry["step"]]

    _edit_state(folder, after_step)
    ckpt = ckpttool.load(folder, verify=True)
    check = ckpt.schedulers[0].verify.logged
    assert (check.convention, check.agrees, check.offset) == ("after-step", True, 0)
    assert "transformers < 4.51" in _codes(ckpt)["hf-logged-lr"].message


def test_logged_steps_past_the_scheduler_are_not_compared(tmp_path):
    folder = _copy(HF20, tmp_path)
    shutil.copy(HF40 / "trainer_state.json", folder / "trainer_state.json")
    ckpt = ckpttool.load(folder, verify=True)
    check = ckpt.schedulers[0].verify.logged
    assert (check.checked, check.beyond, check.agrees) == (4, 4, True)
    message = _codes(ckpt)["hf-logged-lr"].message
    assert "4 logged after the scheduler's step 20" in message
    assert "hf-step-mismatch" in _codes(ckpt)


def test_without_transformers_verify_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    ckpt = ckpttool.load(HF20, verify=True)
    v = ckpt.schedulers[0].verify
    assert v.identical is None and "pip install 'ckpttool[hf]'" in v.reason
    assert v.logged is None and "hf-logged-lr" not in _codes(ckpt)
    assert _codes(ckpt)["verify-unavailable"].severity == "info"
    code, out, err = run_main(["show", "--verify", HF20], monkeypatch, capsys, tty=False)
    assert code == EXIT_OK and err == ""
    assert "verify: not replayable: hf:linear(num_warmup_steps=5, num_training_steps=40) needs " \
           "transformers: pip install 'ckpttool[hf]'" in out


# --- comparing logs -------------------------------------------------------------------------------


def test_compare_logged_picks_the_convention_with_fewer_mismatches():
    replayed = {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}
    before = schedule.compare_logged([(1, 0.1), (2, 0.9), (3, 0.3)], replayed, 3)
    assert (before.convention, before.mismatches, before.first_mismatch) == (
        "before-step", 1, (2, 0.9, 0.2))
    after = schedule.compare_logged([(1, 0.2), (2, 0.9), (3, 0.4)], replayed, 3)
    assert (after.convention, after.mismatches, after.first_mismatch) == (
        "after-step", 1, (2, 0.9, 0.3))
    neither = schedule.compare_logged([(1, 0.7), (2, 0.8)], replayed, 3)
    assert (neither.convention, neither.mismatches) == ("before-step", 2)
    constant = schedule.compare_logged([(1, 0.5), (2, 0.5)], {0: 0.5, 1: 0.5, 2: 0.5}, 2)
    assert constant.convention == "before-step" and constant.agrees
    assert schedule.compare_logged([(0, 0.1), (4, 0.1)], replayed, 3).beyond == 2


# --- a bar for long replays -----------------------------------------------------------------------

LONG_STEPS = 150_000


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A real StepLR run saved at step 150000 (a replay long enough for a bar)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=50_000, gamma=0.5)
    schedule.replay(sched, LONG_STEPS)
    path = tmp_path_factory.mktemp("long") / "long.pt"
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, path)
    return path


def test_a_long_verify_draws_a_bar_on_a_terminal(long_run, monkeypatch, capsys):
    code, out, err = run_main(["show", "--verify", long_run], monkeypatch, capsys, tty=True)
    assert code == EXIT_OK and "verifying" in err and "100%" in err and "#" in err
    assert "verify: identical to a clean replay" in out and "verifying" not in out


@pytest.mark.parametrize("tty, extra", [(True, ["--quiet"]), (False, [])])
def test_no_verify_bar_with_quiet_or_off_a_terminal(long_run, monkeypatch, capsys, tty, extra):
    code, out, err = run_main(["show", "--verify", long_run, *extra], monkeypatch, capsys,
                              tty=tty)
    assert code == EXIT_OK and err == "" and "verify: identical" in out


def test_a_short_verify_draws_no_bar(monkeypatch, capsys):
    code, _, err = run_main(["show", "--verify", HF20], monkeypatch, capsys, tty=True)
    assert code == EXIT_OK and err == ""


def test_verify_progress_counts_the_replay(long_run):
    seen = []
    ckpt = ckpttool.load(long_run, verify=True, progress=lambda d, t: seen.append((d, t)))
    assert ckpt.schedulers[0].verify.identical
    assert seen[-1] == (LONG_STEPS, LONG_STEPS) and len(seen) == -(-LONG_STEPS // 32768)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_a_rescheduled_folder_verifies_with_a_warning_on_its_older_log(tmp_path, run_cli):
    out = tmp_path / "checkpoint-20"
    ckpttool.reschedule(HF20, sets=["num_training_steps=80"]).save(out)
    ckpt = ckpttool.load(out, verify=True)
    assert ckpt.schedulers[0].verify.identical
    codes = _codes(ckpt)
    assert codes["hf-logged-lr-mismatch"].severity == "warning"
    assert "verify-mismatch" not in codes
    assert not [f for f in ckpt.findings if f.severity == "error"]
    # a doctored state on top of it: the log's disagreement is an error again
    state = torch.load(out / "scheduler.pt", weights_only=True)
    state["_last_lr"][0] = 0.0005
    torch.save(state, out / "scheduler.pt")
    doctored = ckpttool.load(out, verify=True)
    assert doctored.schedulers[0].verify.identical is False
    assert _codes(doctored)["hf-logged-lr-mismatch"].severity == "error"
