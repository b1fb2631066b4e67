"""ckpttool reschedule of checkpoint folders: an HF Trainer checkpoint-N/ and an accelerate
save_state() folder become a new folder, complete before it takes its name.

The oracle is the frameworks themselves: a real transformers Trainer resumes from the rewritten
folder with the TrainingArguments ckpttool printed and must follow, step by step and bit for bit,
a Trainer that used the new schedule from step 0; accelerate's own load_state restores the
rewritten folder into real objects, which must follow a torch run of the new schedule.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import shutil
import sys
import warnings

import pytest
import torch

import ckpttool
from ckpttool import rescheduling
from ckpttool.errors import EXIT_ERROR, EXIT_OK, CkptToolError, InputError, StateError
from ckpttool.serialization import TensorRef, read_checkpoint, walk
from conftest import FIXTURES, record_durability, run_main

DIRS = FIXTURES / "dirs"
HF20 = DIRS / "hf_trainer" / "checkpoint-20"
HF40 = DIRS / "hf_trainer" / "checkpoint-40"
COS8 = DIRS / "hf_trainer_cosine" / "checkpoint-8"
ACCELERATE = DIRS / "accelerate"


def files(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def storages(path) -> dict:
    """{storage key: its raw bytes} of a torch file, read from the records (nothing unpickled)."""
    file = read_checkpoint(path)
    refs = {v.storage.key: v.storage for _, v in walk(file.root)
            if isinstance(v, TensorRef) and v.storage is not None}
    return {key: file.read_storage(ref) for key, ref in refs.items()}


def snapshot(path) -> dict | bytes:
    """A file's bytes, or every file and folder under a folder (relative path -> bytes, None
    for a folder)."""
    if not path.is_dir():
        return path.read_bytes()
    return {p.relative_to(path).as_posix(): None if p.is_dir() else p.read_bytes()
            for p in sorted(path.rglob("*"))}


def leftovers(folder) -> list[str]:
    """Everything in ``folder``, hidden names included (a pending or aside folder)."""
    return sorted(os.listdir(folder))


# --- planning ----------------------------------------------------------------------------------


def test_an_hf_folder_keeps_its_trainer_schedule_and_set_changes_it():
    pytest.importorskip("transformers")
    plan = ckpttool.reschedule(HF20, sets=["num_training_steps=80"])
    assert plan.optimizer == "optimizer.pt" and plan.scheduler == "scheduler.pt"
    assert plan.new_call == "LambdaLR from hf:linear(num_warmup_steps=5, num_training_steps=80)"
    assert plan.old_call == "LambdaLR from hf:linear(num_warmup_steps=5, num_training_steps=40)"
    assert plan.rewritten == ("optimizer.pt", "scheduler.pt", "trainer_state.json")
    assert plan.hf.training_args == {"lr_scheduler_type": "linear", "warmup_steps": 5,
                                     "max_steps": 80, "learning_rate": 0.001}
    assert plan.hf.changed == ("max_steps",)
    assert plan.hf.trainer_state == {"max_steps": (40, 80)}
    assert plan.root["trainer_state.json"]["max_steps"] == 80
    assert plan.source.file.root["trainer_state.json"]["max_steps"] == 40  # the input's tree


def test_a_warmup_ratio_is_kept_only_while_it_gives_the_same_steps():
    pytest.importorskip("transformers")
    longer = ckpttool.reschedule(COS8, sets=["num_training_steps=24"])
    assert longer.hf.training_args["warmup_steps"] == 2  # ceil(0.1 * 24) would be 3
    assert longer.hf.changed == ("warmup_steps", "max_steps")
    same = ckpttool.reschedule(COS8)
    assert same.hf.training_args["warmup_steps"] == 0.1 and same.hf.changed == ()
    assert "max_steps" not in same.hf.training_args  # num_train_epochs=3 still gives 12 steps
    assert same.hf.trainer_state == {} and not same.changed
    assert "trainer_state.json" not in same.rewritten


def test_an_hf_spec_with_its_own_arguments_names_lr_scheduler_kwargs():
    pytest.importorskip("transformers")
    plan = ckpttool.reschedule(HF20, scheduler="hf:cosine_with_min_lr(num_warmup_steps=5, "
                               "num_training_steps=60, min_lr=1e-05)", lr=["0.002"])
    assert plan.hf.training_args == {
        "lr_scheduler_type": "cosine_with_min_lr", "warmup_steps": 5, "max_steps": 60,
        "learning_rate": 0.002, "lr_scheduler_kwargs": {"min_lr": 1e-05}}
    assert plan.hf.changed == ("lr_scheduler_type", "max_steps", "learning_rate",
                               "lr_scheduler_kwargs")


def test_an_hf_folder_whose_schedule_is_not_recorded_says_what_to_pass(tmp_path):
    pytest.importorskip("transformers")
    folder = tmp_path / "checkpoint-20"
    shutil.copytree(HF20, folder)
    os.remove(folder / "training_args.bin")  # the schedule type is only there
    with pytest.raises(StateError, match=r"pass it: --scheduler 'hf:linear\("):
        ckpttool.reschedule(folder, sets=["num_training_steps=80"])
    plan = ckpttool.reschedule(folder, scheduler="hf:linear(num_warmup_steps=5, "
                               "num_training_steps=80)")
    assert plan.hf.changed == ("lr_scheduler_type", "warmup_steps", "max_steps",
                               "learning_rate")  # nothing in training_args.bin to compare with


def test_a_folder_rescheduled_to_another_hf_schedule_is_not_replayed_as_the_old_one(tmp_path):
    """training_args.bin is never rewritten: it still names the old schedule, which must not
    be taken for the folder's own when its lrs say otherwise."""
    pytest.importorskip("transformers")
    ckpttool.reschedule(HF20, scheduler="hf:cosine(num_warmup_steps=5, num_training_steps=80)"
                        ).save(tmp_path / "cosine")
    with pytest.raises(StateError, match="was this folder rescheduled"):
        ckpttool.reschedule(tmp_path / "cosine", sets=["num_training_steps=100"])
    again = ckpttool.reschedule(tmp_path / "cosine", scheduler="hf:cosine(num_warmup_steps=5, "
                                "num_training_steps=100)")
    assert again.hf.trainer_state == {"max_steps": (80, 100)}


def test_accelerate_optimizers_are_chosen_by_location():
    with pytest.raises(StateError, match="choose one with --optimizer"):
        ckpttool.reschedule(ACCELERATE, sets=["T_max=40"])
    first = ckpttool.reschedule(ACCELERATE, optimizer="optimizer.bin", sets=["T_max=40"])
    second = ckpttool.reschedule(ACCELERATE, optimizer="optimizer_1.bin", sets=["step_size=4"])
    assert (first.scheduler, first.rewritten) == ("scheduler.bin",
                                                  ("optimizer.bin", "scheduler.bin"))
    assert (second.scheduler, second.rewritten) == ("scheduler_1.bin",
                                                    ("optimizer_1.bin", "scheduler_1.bin"))
    assert first.hf is None and second.new_call == "StepLR(step_size=4, gamma=0.5)"


def test_a_folder_without_a_scheduler_file_gets_none_added(tmp_path):
    folder = tmp_path / "state"
    shutil.copytree(ACCELERATE, folder)
    os.remove(folder / "scheduler.bin")
    with pytest.raises(StateError, match="adds no file"):
        ckpttool.reschedule(folder, optimizer="optimizer.bin",
                            scheduler="CosineAnnealingLR(T_max=20)")


# --- saving ------------------------------------------------------------------------------------


@pytest.mark.parametrize("source, options, rewritten", [
    (HF20, dict(sets=["num_training_steps=80"]),
     {"optimizer.pt", "scheduler.pt", "trainer_state.json"}),
    (COS8, dict(sets=["num_training_steps=24"]),
     {"optimizer.pt", "scheduler.pt", "trainer_state.json"}),
    (ACCELERATE, dict(optimizer="optimizer.bin", sets=["T_max=40"]),
     {"optimizer.bin", "scheduler.bin"}),
    (ACCELERATE, dict(optimizer="optimizer_1.bin", sets=["step_size=4"]),
     {"optimizer_1.bin", "scheduler_1.bin"}),
], ids=["hf-linear", "hf-cosine", "accelerate-0", "accelerate-1"])
def test_a_saved_folder_changes_only_the_rewritten_fields(tmp_path, source, options, rewritten):
    if source != ACCELERATE:
        pytest.importorskip("transformers")
    plan = ckpttool.reschedule(source, **options)
    saved = plan.save(tmp_path / "out")
    assert saved.verified_steps == 10 and saved.path == str((tmp_path / "out").resolve())
    assert leftovers(tmp_path) == ["out"]  # no pending or aside folder
    before, after = files(source), files(tmp_path / "out")
    assert before.keys() == after.keys()
    assert {n for n in before if before[n] != after[n]} == rewritten
    for name in after:  # copies, never links: writing to one never changes the other
        assert not os.path.islink(tmp_path / "out" / name)
        assert os.stat(tmp_path / "out" / name).st_ino != os.stat(source / name).st_ino
    for name in rewritten - {"trainer_state.json"}:  # tensor records copied as they were
        assert storages(source / name) == storages(tmp_path / "out" / name)
    # Structurally, only the planned fields differ: the lrs, the scheduler, the horizon.
    changes = {c.path for c in ckpttool.diff(source, tmp_path / "out").changes}
    opt, sched = plan.optimizer, plan.scheduler
    expected = {f"{opt}/param_groups/{g.index}/{k}" for g in plan.groups for k in g.changes}
    expected |= {f"{sched}/{k}" for k in plan.new_state if plan.new_state[k] != (
        plan.old_state or {}).get(k)}
    expected |= {f"trainer_state.json/{k}" for k in (plan.hf.trainer_state if plan.hf else {})}

    def under(path, field):
        return path == field or path.startswith(field + "/")

    assert all(any(under(p, e) for e in expected) for p in changes), changes
    assert all(any(under(p, e) for p in changes) for e in expected), expected


def test_subfolders_are_copied_and_links_become_files(tmp_path):
    folder = tmp_path / "state"
    shutil.copytree(ACCELERATE, folder)
    (folder / "extra" / "deep").mkdir(parents=True)
    (folder / "extra" / "deep" / "notes.txt").write_text("kept")
    os.symlink("extra/deep/notes.txt", folder / "link.txt")
    os.symlink("../..", folder / "extra" / "deep" / "up")  # a loop: refused, nothing left
    plan = ckpttool.reschedule(folder, optimizer="optimizer.bin", sets=["T_max=40"])
    with pytest.raises(CkptToolError, match="a link to a folder that contains it"):
        plan.save(tmp_path / "out")
    assert leftovers(tmp_path) == ["state"]
    os.remove(folder / "extra" / "deep" / "up")
    plan.save(tmp_path / "out")
    assert (tmp_path / "out" / "extra" / "deep" / "notes.txt").read_text() == "kept"
    assert not os.path.islink(tmp_path / "out" / "link.txt")
    assert (tmp_path / "out" / "link.txt").read_text() == "kept"


def test_trainer_state_json_keeps_the_trainers_format(tmp_path):
    pytest.importorskip("transformers")
    ckpttool.reschedule(HF20, sets=["num_training_steps=80"]).save(tmp_path / "out")
    old = (HF20 / "trainer_state.json").read_text()
    new = (tmp_path / "out" / "trainer_state.json").read_text()
    assert new == old.replace('\n  "max_steps": 40,\n', '\n  "max_steps": 80,\n')
    assert new == json.dumps(json.loads(new), indent=2, sort_keys=True) + "\n"  # the Trainer's


def test_json_edits_keep_a_hand_written_layout_or_fall_back_to_the_trainers():
    from ckpttool.folder_output import json_bytes

    old = {"b": 1, "max_steps": 40, "log": [{"max_steps": 40}]}
    text = b'{"b": 1, "max_steps": 40, "log": [{"max_steps": 40}]}'  # not line by line
    assert json_bytes(text, old, {**old, "max_steps": 80}) == (
        json.dumps({**old, "max_steps": 80}, indent=2, sort_keys=True) + "\n").encode()
    text = b'{\n "b": 1,\n "max_steps": 40,\n "log": [\n  {\n   "max_steps": 40\n  }\n ]\n}'
    assert json_bytes(text, old, {**old, "max_steps": 80}) == text.replace(
        b' "max_steps": 40,', b' "max_steps": 80,')
    # Windows line endings stay what they were, on the edited line too
    crlf = text.replace(b"\n", b"\r\n")
    assert json_bytes(crlf, old, {**old, "max_steps": 80}) == crlf.replace(
        b' "max_steps": 40,', b' "max_steps": 80,')
    last = b'{\r\n "b": 1,\r\n "max_steps": 40\r\n}\r\n'  # the value ends its line
    assert json_bytes(last, {"b": 1, "max_steps": 40}, {"b": 1, "max_steps": 80}) == \
        last.replace(b"40", b"80")
    nested = {**old, "log": [{"max_steps": 80}]}  # not editable in place: the Trainer's format
    assert json_bytes(crlf, old, nested) == (
        json.dumps(nested, indent=2, sort_keys=True) + "\n").replace("\n", "\r\n").encode()


def test_force_replaces_an_existing_folder_and_without_it_nothing_changes(tmp_path):
    out = tmp_path / "out"
    shutil.copytree(ACCELERATE, out)  # an earlier output
    (out / "old.txt").write_text("the old output")
    plan = ckpttool.reschedule(ACCELERATE, optimizer="optimizer.bin", sets=["T_max=40"])
    with pytest.raises(StateError, match="exists; pass force=True"):
        plan.save(out)
    assert "old.txt" in os.listdir(out)
    plan.save(out, force=True)
    assert sorted(os.listdir(out)) == sorted(os.listdir(ACCELERATE))
    assert leftovers(tmp_path) == ["out"]
    (tmp_path / "empty").mkdir()
    plan.save(tmp_path / "empty", force=True)  # an empty folder is replaced too
    assert sorted(os.listdir(tmp_path / "empty")) == sorted(os.listdir(ACCELERATE))


@pytest.mark.parametrize("existing", ["notes", "dcp", "file"])
def test_force_never_replaces_what_is_not_a_checkpoint_folder_of_the_kind(tmp_path, run_cli,
                                                                          existing):
    """--force replaces an earlier output, not a folder of notes (or another kind of checkpoint,
    or a file) that happens to be named OUT: refused, one line, nothing written."""
    out = tmp_path / "P"
    if existing == "notes":
        (out / "sub").mkdir(parents=True)
        (out / "notes.txt").write_text("data")
    elif existing == "dcp":
        shutil.copytree(DIRS / "dcp" / "single", out)
    else:
        out.write_text("data")
    before = snapshot(out)
    result = run_cli("reschedule", ACCELERATE, "--optimizer", "optimizer.bin", "--set",
                     "T_max=40", "-o", out, "--force")
    assert result.exit_code == EXIT_ERROR and result.stderr.count("\n") == 1, result.stderr
    assert {"notes": "is not a checkpoint folder; --force replaces only an empty folder or a "
                     "checkpoint folder of its kind (accelerate)",
            "dcp": "is a dcp checkpoint; --force replaces only",
            "file": "exists and is a file; a checkpoint folder cannot replace it"}[existing] \
        in result.stderr
    assert snapshot(out) == before
    assert leftovers(tmp_path) == ["P"]


def test_a_file_output_onto_a_folder_is_refused_and_leaves_nothing(tmp_path, run_cli):
    (tmp_path / "out").mkdir()
    for force in ((), ("--force",)):
        result = run_cli("reschedule", FIXTURES / "adamw_cosine.pt", "-o", tmp_path / "out",
                         "--set", "T_max=80", *force)
        assert result.exit_code == EXIT_ERROR, result.stdout
        assert (f"{tmp_path / 'out'} is a folder; name the output file (-o "
                f"{tmp_path / 'out' / 'adamw_cosine.pt'})") in result.stderr
        assert leftovers(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == []


def test_at_every_moment_one_complete_folder_exists(tmp_path, monkeypatch):
    """--force over an existing folder: the old one is renamed aside, the new renamed in, the
    old removed, each rename made durable before the next step."""
    out = tmp_path / "out"
    shutil.copytree(ACCELERATE, out)
    plan = ckpttool.reschedule(ACCELERATE, optimizer="optimizer.bin", sets=["T_max=40"])
    events = record_durability(monkeypatch)
    real_rename = os.rename

    def rename(a, b):
        # whenever a folder leaves `out`, a complete one is already in place or waits beside it
        assert os.path.isdir(a) and len(os.listdir(a)) == 7
        events.append(f"move {os.path.basename(a)} to {os.path.basename(b)}")
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    plan.save(out, force=True)
    moves = [e for e in events if e.startswith("move")]
    assert moves == ["move out to .out.ckpttool-old", "move .out.ckpttool-new to out"]
    first = events.index(moves[0])
    assert events[:first].count("fsync file") == 7  # every file of the new folder, before
    assert events[first - 1] == "fsync folder"  # ... and the new folder itself
    assert events[first + 2] == "fsync folder" and events[-1] == "fsync folder"
    assert leftovers(tmp_path) == ["out"]


def test_in_place_keeps_the_original_as_bak(tmp_path, run_cli):
    folder = tmp_path / "state"
    shutil.copytree(ACCELERATE, folder)
    args = ("reschedule", folder, "--in-place", "--optimizer", "optimizer_1.bin",
            "--set", "step_size=4")
    result = run_cli(*args)
    assert result.exit_code == EXIT_OK, result.stderr
    assert files(tmp_path / "state.bak") == files(ACCELERATE)
    assert ckpttool.load(folder).schedulers[1].args["step_size"] == 4
    assert f"backup: the original is now {tmp_path / 'state.bak'}" in result.stdout
    again = run_cli(*args)
    assert again.exit_code == EXIT_ERROR and "--force to replace that backup" in again.stderr
    assert run_cli(*args, "--set", "gamma=0.25", "--force").exit_code == EXIT_OK
    assert ckpttool.load(tmp_path / "state.bak").schedulers[1].args["step_size"] == 4
    assert run_cli(*args[:-2], "--set", "step_size=5", "--no-backup", "--force").exit_code == 0
    assert leftovers(tmp_path) == ["state", "state.bak"]
    assert ckpttool.load(tmp_path / "state.bak").schedulers[1].args["step_size"] == 4


def test_an_hf_backup_is_not_a_checkpoint_to_the_trainers_rotation(tmp_path, run_cli):
    """The Trainer's save_total_limit rotation (transformers.trainer_utils.sort_checkpoints /
    rotate_checkpoints, which Trainer._save_checkpoint calls) counts every `checkpoint-*`
    folder of output_dir: the in-place backup must not be one, or a real checkpoint goes."""
    pytest.importorskip("transformers")
    from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints, sort_checkpoints

    run = tmp_path / "run"
    for source in (HF20, HF40):
        shutil.copytree(source, run / source.name)
    result = run_cli("reschedule", run / "checkpoint-20", "--in-place", "--set",
                     "num_training_steps=80")
    assert result.exit_code == EXIT_OK, result.stderr
    backup = run / "bak-checkpoint-20"
    assert files(backup) == files(HF20)
    assert (f"backup: the original is now {backup} (named outside the `checkpoint-*` folders "
            "that the Trainer's save_total_limit rotation counts)") in result.stdout
    assert sort_checkpoints(str(run)) == [str(run / "checkpoint-20"), str(run / "checkpoint-40")]
    assert get_last_checkpoint(str(run)) == str(run / "checkpoint-40")
    for use_mtime in (True, False):  # the Trainer rotates by mtime where it can
        rotate_checkpoints(str(run), save_total_limit=2, use_mtime=use_mtime)
        assert leftovers(run) == ["bak-checkpoint-20", "checkpoint-20", "checkpoint-40"]
    assert files(run / "checkpoint-40") == files(HF40)
    assert ckpttool.load(run / "checkpoint-20").hf.max_steps == 80


def test_an_accelerate_automatic_checkpoint_backup_leaves_the_checkpoints_folder(
        tmp_path, run_cli, fresh_accelerate_state):
    """accelerate's automatic_checkpoint_naming counts every entry of PROJECT/checkpoints/ for
    its total_limit rotation and load_state(): the backup goes one level up, and the next
    save_state() deletes only the oldest real checkpoint."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    mf = _make_fixtures()
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True, project_config=ProjectConfiguration(
        project_dir=str(tmp_path), automatic_checkpoint_naming=True, total_limit=2))
    model = mf.tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    checkpoints = tmp_path / "checkpoints"
    for _ in range(2):
        opt.step()
        sched.step()
        accelerator.save_state()
    assert leftovers(checkpoints) == ["checkpoint_0", "checkpoint_1"]
    result = run_cli("reschedule", checkpoints / "checkpoint_1", "--in-place", "--set",
                     "step_size=3")
    assert result.exit_code == EXIT_OK, result.stderr
    assert leftovers(checkpoints) == ["checkpoint_0", "checkpoint_1"]
    assert (tmp_path / "checkpoint_1.bak").is_dir()
    assert f"backup: the original is now {tmp_path / 'checkpoint_1.bak'} (outside checkpoints/" \
        in result.stdout
    accelerator.save_state()  # total_limit=2: checkpoint_0 goes, the rewritten one stays
    assert leftovers(checkpoints) == ["checkpoint_1", "checkpoint_2"]
    assert ckpttool.load(checkpoints / "checkpoint_1").schedulers[0].args["step_size"] == 3


def test_dry_run_writes_nothing(tmp_path, run_cli):
    pytest.importorskip("transformers")
    result = run_cli("reschedule", HF20, "--dry-run", "--set", "num_training_steps=80", "-o",
                     tmp_path / "out")
    assert result.exit_code == EXIT_OK
    assert "(dry run: nothing written)" in result.stdout and os.listdir(tmp_path) == []


def test_a_failed_verification_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(ACCELERATE, out)
    plan = ckpttool.reschedule(ACCELERATE, optimizer="optimizer.bin", sets=["T_max=40"])
    monkeypatch.setattr(rescheduling.Rescheduled, "verify",
                        lambda self, path, steps=10: "resumed step 1: lr differs")
    with pytest.raises(StateError, match="does not resume as replayed"):
        plan.save(out, force=True)
    assert files(out) == files(ACCELERATE)  # the old output, intact
    with pytest.raises(StateError):
        plan.save(tmp_path / "new")
    assert leftovers(tmp_path) == ["out"]


def test_a_failed_copy_leaves_nothing(tmp_path, monkeypatch):
    from ckpttool import folder_output

    real = folder_output.copy_file
    copied = []

    def copy_file(src, dst, report=None):
        if copied:
            raise OSError(28, "No space left on device", dst)
        copied.append(real(src, dst, report=report))

    monkeypatch.setattr(folder_output, "copy_file", copy_file)
    plan = ckpttool.reschedule(ACCELERATE, optimizer="optimizer.bin", sets=["T_max=40"])
    with pytest.raises(CkptToolError, match="No space left on device; nothing was written"):
        plan.save(tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_a_verified_resume_is_checked_on_the_written_folder(tmp_path, monkeypatch):
    """Mutation guard: a writer that drops the rewritten scheduler is caught by verification."""
    plan = ckpttool.reschedule(ACCELERATE, optimizer="optimizer.bin", sets=["T_max=40"])
    stale = dataclasses.replace(plan, root=dict(plan.root, **{
        "scheduler.bin": plan.source.file.root["scheduler.bin"]}))
    with pytest.raises(StateError, match="does not resume as replayed"):
        stale.save(tmp_path / "out")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["inside", "around"])
def test_an_output_inside_or_around_the_input_is_refused(tmp_path, run_cli, where):
    folder = tmp_path / "runs" / "state"
    shutil.copytree(ACCELERATE, folder)
    out = folder / "new" if where == "inside" else tmp_path / "runs"
    result = run_cli("reschedule", folder, "--optimizer", "optimizer.bin", "--set", "T_max=40",
                     "-o", out, "--force")
    assert result.exit_code == EXIT_ERROR and result.stderr.count("\n") == 1
    assert ("inside the input folder" if where == "inside" else "contains the input") \
        in result.stderr
    assert files(folder) == files(ACCELERATE) and not (folder / "new").exists()


def test_a_stale_pending_folder_is_reported_not_removed(tmp_path):
    (tmp_path / ".out.ckpttool-new").mkdir()
    (tmp_path / ".out.ckpttool-new" / "half").write_text("")
    plan = ckpttool.reschedule(ACCELERATE, optimizer="optimizer.bin", sets=["T_max=40"])
    with pytest.raises(StateError, match="interrupted ckpttool run"):
        plan.save(tmp_path / "out")
    assert leftovers(tmp_path) == [".out.ckpttool-new"]


# --- what a write must never destroy or leave behind -------------------------------------------


def test_a_second_in_place_pass_over_a_folder_of_runs_leaves_the_backups_alone(tmp_path,
                                                                               run_cli):
    """A folder search never takes ckpttool's backups (bak-checkpoint-N) for inputs: the second
    pass, even with --no-backup, rewrites the checkpoints, never the originals kept."""
    pytest.importorskip("transformers")
    runs = tmp_path / "S"
    shutil.copytree(HF20, runs / "run1" / "checkpoint-20")
    shutil.copytree(HF20, runs / "run2" / "checkpoint-20")
    first = run_cli("reschedule", runs, "--in-place", "--set", "num_training_steps=80")
    assert first.exit_code == EXIT_OK, first.stderr
    second = run_cli("reschedule", runs, "--in-place", "--no-backup", "--set",
                     "num_training_steps=100")
    assert second.exit_code == EXIT_OK, second.stderr
    assert second.stdout.splitlines()[-1] == "2 inputs: 2 written and verified"
    assert files(runs / "run1" / "bak-checkpoint-20") == files(HF20)
    assert files(runs / "run2" / "bak-checkpoint-20") == files(HF20)
    assert ckpttool.load(runs / "run1" / "checkpoint-20").hf.max_steps == 100
    assert leftovers(runs / "run1") == ["bak-checkpoint-20", "checkpoint-20"]
    # named on its own, a backup is read (show), and rewritten only as a copy
    backup = runs / "run1" / "bak-checkpoint-20"
    assert run_cli("show", backup).exit_code == EXIT_OK
    refused = run_cli("reschedule", backup, "--in-place", "--no-backup", "--set",
                      "num_training_steps=100")
    assert refused.exit_code == EXIT_ERROR and refused.stderr.count("\n") == 1
    assert ("is named as the backup ckpttool keeps of a checkpoint rewritten in place; "
            "rewriting it in place would replace that original: write a rescheduled copy with "
            "-o OUT") in refused.stderr
    assert files(backup) == files(HF20)
    copied = run_cli("reschedule", backup, "-o", tmp_path / "c20", "--set",
                     "num_training_steps=100")
    assert copied.exit_code == EXIT_OK, copied.stderr


def test_write_folder_leaves_a_pending_folder_it_did_not_make(tmp_path):
    """Two runs to one target: the second finds the first one's pending folder and stops,
    leaving it (and what it holds) as it is."""
    from ckpttool.folder_output import write_folder

    for source, options in [(DIRS / "dcp" / "single", {"sets": ["gamma=0.25"]}),
                            (ACCELERATE, {"optimizer": "optimizer.bin", "sets": ["T_max=40"]})]:
        pending = tmp_path / f".{source.name}.ckpttool-new"
        pending.mkdir()
        (pending / "other-run-data").write_text("x")
        plan = ckpttool.reschedule(source, **options)
        with pytest.raises(StateError, match="exists"):
            write_folder(plan.source.file, plan.root, str(pending))
        assert os.listdir(pending) == ["other-run-data"]


@pytest.mark.parametrize("source, options", [
    (ACCELERATE, {"optimizer": "optimizer.bin", "sets": ["T_max=40"]}),
    (DIRS / "dcp" / "single", {"sets": ["gamma=0.25"]}),
], ids=["accelerate", "dcp"])
def test_a_link_out_of_the_folder_is_refused_before_anything_is_copied(tmp_path, source,
                                                                      options):
    """A link to the checkpoint's parent would copy the parent, pending folder included, into
    itself without end: refused at once. A linked file is copied as its bytes."""
    par = tmp_path / "par"
    shutil.copytree(source, par / "c20")
    (tmp_path / "outside.txt").write_text("kept")
    os.symlink(tmp_path / "outside.txt", par / "c20" / "notes.txt")
    plan = ckpttool.reschedule(par / "c20", **options)
    os.symlink("..", par / "c20" / "up")
    with pytest.raises(InputError, match=rf"up: a link to the folder {par}, outside the "
                                         "checkpoint; .* remove the link"):
        plan.save(par / "out")
    assert leftovers(par) == ["c20"]
    os.remove(par / "c20" / "up")
    plan.save(par / "out")
    assert not os.path.islink(par / "out" / "notes.txt")
    assert (par / "out" / "notes.txt").read_text() == "kept"


def _alias(tmp_path):
    """runs/state (an accelerate folder) and `alias`, a second path to runs/."""
    shutil.copytree(ACCELERATE, tmp_path / "runs" / "state")
    os.symlink(tmp_path / "runs", tmp_path / "alias")
    return tmp_path / "runs" / "state", tmp_path / "alias"


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_the_input_is_recognised_by_identity_not_by_its_spelling(tmp_path, monkeypatch, where):
    """An output reached by another path to the input folder (here a symlinked parent, with
    realpath unable to see through it, as it cannot see through a bind mount) is refused."""
    folder, alias = _alias(tmp_path)
    monkeypatch.setattr(os.path, "realpath", os.path.abspath)
    out = {"same": alias / "state", "inside": alias / "state" / "new", "around": alias}[where]
    plan = ckpttool.reschedule(folder, optimizer="optimizer.bin", sets=["T_max=40"])
    message = {"same": "the output is the input", "inside": "is inside the input folder",
               "around": "contains the input"}[where]
    with pytest.raises(StateError, match=message):
        plan.save(out, force=True)
    assert files(folder) == files(ACCELERATE)
    assert leftovers(tmp_path / "runs") == ["state"]


def test_a_bind_mount_of_the_input_is_seen_through(tmp_path):
    """The real case: the input folder reached through a bind mount (root only)."""
    import subprocess

    folder = tmp_path / "src" / "c20"
    shutil.copytree(ACCELERATE, folder)
    (tmp_path / "mnt").mkdir()
    if os.name != "posix" or os.geteuid() != 0 or subprocess.run(
            ["mount", "--bind", tmp_path / "src", tmp_path / "mnt"],
            capture_output=True).returncode != 0:
        pytest.skip("bind mounts need root")
    try:
        plan = ckpttool.reschedule(folder, optimizer="optimizer.bin", sets=["T_max=40"])
        for out, message in [(tmp_path / "mnt" / "c20", "the output is the input"),
                             (tmp_path / "mnt" / "c20" / "new", "inside the input folder"),
                             (tmp_path / "mnt", "contains the input")]:
            with pytest.raises(StateError, match=message):
                plan.save(out, force=True)
        assert files(folder) == files(ACCELERATE)
    finally:
        subprocess.run(["umount", tmp_path / "mnt"], check=True)


def test_a_failure_after_the_rename_is_a_warning_and_the_output_stands(tmp_path, run_cli,
                                                                       monkeypatch):
    """Once the new folder has its name, an fsync of its parent that fails, or an old folder
    that cannot be removed, is a warning saying what is left where: exit 0, output in place."""
    out = tmp_path / "out"
    shutil.copytree(ACCELERATE, out)  # an earlier output, replaced with --force
    aside = tmp_path / ".out.ckpttool-old"
    renamed = []
    real_rename, real_fsync, real_rmtree = os.rename, os.fsync, shutil.rmtree

    def rename(a, b):
        real_rename(a, b)
        renamed.append(os.path.basename(b))

    def fsync(fd):
        if "out" in renamed and os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    def rmtree(path, *args, ignore_errors=False, **kwargs):
        if os.fspath(path) == str(aside):
            if ignore_errors:
                return
            raise PermissionError(13, "Permission denied", os.fspath(path))
        real_rmtree(path, *args, ignore_errors=ignore_errors, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    args = ("reschedule", ACCELERATE, "--optimizer", "optimizer.bin", "--set", "T_max=40",
            "-o", out, "--force")
    result = run_cli(*args)
    assert result.exit_code == EXIT_OK, result.stderr
    assert "verified: " in result.stdout
    assert result.stderr.splitlines() == [
        f"ckpttool: warning: {out} is written and verified, but {tmp_path} could not be synced "
        "to disk (Input/output error): run `sync` before relying on it after a power loss",
        f"ckpttool: warning: the old {out} is left at {aside} (it could not be removed: "
        f"Permission denied); remove it: ckpttool refuses to write {out} again while it is "
        "there"]
    assert ckpttool.load(out).schedulers[0].args["T_max"] == 40
    assert files(aside) == files(ACCELERATE)
    monkeypatch.undo()
    again = run_cli(*args)
    assert again.exit_code == EXIT_ERROR and "interrupted ckpttool run" in again.stderr


def test_rewritten_files_keep_the_mode_of_those_they_replace(tmp_path):
    """A 0600 checkpoint stays 0600: the rewritten files get the mode their copies would
    (the input file's, writable by its owner, less the umask), as the copied ones do."""
    pytest.importorskip("transformers")
    umask = os.umask(0o022)
    os.umask(umask)
    for source, options, new in [(HF20, {"sets": ["num_training_steps=80"]}, ()),
                                 (DIRS / "dcp" / "single", {"sets": ["gamma=0.25"]},
                                  ("__ckpttool_0.distcp",))]:
        folder = tmp_path / source.name
        shutil.copytree(source, folder)
        for name in os.listdir(folder):
            os.chmod(folder / name, 0o600)
        ckpttool.reschedule(folder, **options).save(tmp_path / f"{source.name}-out")
        modes = {name: oct(os.stat(tmp_path / f"{source.name}-out" / name).st_mode & 0o777)
                 for name in sorted(os.listdir(folder)) + list(new)}
        assert modes == dict.fromkeys(modes, oct(0o600 & ~umask))


def test_a_crlf_trainer_state_keeps_its_line_endings(tmp_path):
    pytest.importorskip("transformers")
    folder = tmp_path / "checkpoint-20"
    shutil.copytree(HF20, folder)
    crlf = (HF20 / "trainer_state.json").read_bytes().replace(b"\n", b"\r\n")
    (folder / "trainer_state.json").write_bytes(crlf)
    ckpttool.reschedule(folder, sets=["num_training_steps=80"]).save(tmp_path / "out")
    assert (tmp_path / "out" / "trainer_state.json").read_bytes() == crlf.replace(
        b'\r\n  "max_steps": 40,\r\n', b'\r\n  "max_steps": 80,\r\n')


@pytest.mark.parametrize("source, options", [
    (ACCELERATE, {"optimizer": "optimizer.bin", "sets": ["T_max=40"]}),
    (HF20, {"sets": ["num_training_steps=400"]}),  # trainer_state.json gets a byte longer
], ids=["accelerate", "hf"])
def test_folder_writing_reports_progress(tmp_path, monkeypatch, source, options):
    """Reported as written (every chunk, PROGRESS_BYTES lowered), never past the total: a
    rewritten file's size replaces its input's as soon as it is known."""
    from ckpttool import serialization

    if source == HF20:
        pytest.importorskip("transformers")
    monkeypatch.setattr(serialization, "PROGRESS_BYTES", 1)
    seen = []
    plan = ckpttool.reschedule(source, **options)
    plan.save(tmp_path / "out", progress=lambda done, total: seen.append((done, total)))
    total = sum(len(b) for b in files(tmp_path / "out").values())  # what was written
    assert seen[-1] == (total, total) and all(d <= t for d, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_one_progress_over_the_folder_at_most_every_progress_bytes(tmp_path, monkeypatch):
    """Many files (copied ones, rewritten ones, a subfolder's) report as one copy: at most once
    per PROGRESS_BYTES of the folder (lowered here), however small each file is, and once at
    the end, never past the total."""
    from ckpttool import serialization

    folder = tmp_path / "state"
    shutil.copytree(ACCELERATE, folder)
    (folder / "logs").mkdir()
    for i in range(40):
        (folder / "logs" / f"event_{i}").write_bytes(bytes(300))
    monkeypatch.setattr(serialization, "PROGRESS_BYTES", 4096)
    seen = []
    plan = ckpttool.reschedule(folder, optimizer="optimizer.bin", sets=["T_max=40"])
    plan.save(tmp_path / "out", progress=lambda done, total: seen.append((done, total)))
    written = sum(os.path.getsize(os.path.join(d, f))
                  for d, _, names in os.walk(tmp_path / "out") for f in names)
    assert seen[-1] == (written, written)
    done = [d for d, _ in seen]
    assert all(b - a >= 4096 for a, b in itertools.pairwise(done[:-1]))  # not once per file
    assert len(seen) >= written // 4096 // 2  # ... but all along the folder
    assert all(d <= t for d, t in seen)


@pytest.mark.parametrize("source, options", [
    (ACCELERATE, ["--optimizer", "optimizer.bin", "--set", "T_max=40"]),
    (DIRS / "dcp" / "single", ["--scale-lr", "0.5"]),
], ids=["accelerate", "dcp"])
def test_a_big_folder_output_draws_a_writing_bar(tmp_path, monkeypatch, capsys, source,
                                                 options):
    """As for a file (test_cli), above BAR_MIN_COPY_BYTES (lowered here) writing a folder
    draws one bar on a terminal's stderr, ended before the report; none off a terminal."""
    from ckpttool import cli, serialization

    monkeypatch.setattr(cli, "BAR_MIN_COPY_BYTES", 1)
    monkeypatch.setattr(serialization, "PROGRESS_BYTES", 1)
    args = ["reschedule", source, "-o", tmp_path / "out", *options]
    code, out, err = run_main(args, monkeypatch, capsys, tty=True)
    assert code == EXIT_OK and "verified" in out and "writing" not in out
    assert err.count("writing") >= 1 and "100%" in err and err.endswith("\n")
    shutil.rmtree(tmp_path / "out")
    code, out, err = run_main(args, monkeypatch, capsys, tty=False)
    assert code == EXIT_OK and err == ""


def test_out_dir_writes_each_folder_under_its_name(tmp_path, run_cli):
    pytest.importorskip("transformers")
    result = run_cli("reschedule", HF20, COS8, "--out-dir", tmp_path / "longer", "--scale-lr",
                     "0.5")
    assert result.exit_code == EXIT_OK, result.stderr
    assert sorted(os.listdir(tmp_path / "longer")) == ["checkpoint-20", "checkpoint-8"]
    assert "2 inputs: 2 written and verified" in result.stdout
    for name in ("checkpoint-20", "checkpoint-8"):
        ckpt = ckpttool.load(tmp_path / "longer" / name)
        assert [g.initial_lr for g in ckpt.optimizers[0].groups] == [0.0005, 0.0005]


# --- the CLI -----------------------------------------------------------------------------------


def test_cli_text_says_which_training_arguments_to_change(tmp_path, run_cli):
    pytest.importorskip("transformers")
    result = run_cli("reschedule", COS8, "-o", tmp_path / "out", "--set",
                     "num_training_steps=24")
    assert result.exit_code == EXIT_OK, result.stderr
    out = result.stdout
    assert ("[hf-trainer folder] rewritten: optimizer.pt, scheduler.pt, trainer_state.json "
            "(max_steps 12 -> 24); every other file copied byte for byte") in out
    assert "  warmup_steps=2              (training_args.bin: 0.1)\n" in out
    assert "  max_steps=24                (training_args.bin: -1)\n" in out
    assert "  lr_scheduler_type='cosine'  (unchanged)\n" in out
    assert f"trainer.train(resume_from_checkpoint={str((tmp_path / 'out').resolve())!r})" in out


def test_cli_json_carries_the_folder_and_the_trainer_arguments(tmp_path, run_cli):
    pytest.importorskip("transformers")
    result = run_cli("reschedule", HF20, "-o", tmp_path / "out", "--set",
                     "num_training_steps=80", "--json")
    assert result.exit_code == EXIT_OK, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema"] == "ckpttool.reschedule/1" and doc["kind"] == "hf-trainer"
    assert doc["rewritten"] == ["optimizer.pt", "scheduler.pt", "trainer_state.json"]
    assert doc["verified_steps"] == 10 and doc["output"] == str((tmp_path / "out").resolve())
    assert doc["hf"] == {
        "training_args": {"lr_scheduler_type": "linear", "warmup_steps": 5, "max_steps": 80,
                          "learning_rate": 0.001},
        "training_args_bin": {"lr_scheduler_type": "linear", "warmup_steps": 5, "max_steps": 40,
                              "learning_rate": 0.001, "lr_scheduler_kwargs": {}},
        "changed": ["max_steps"], "trainer_state": {"max_steps": {"old": 40, "new": 80}},
        "create_scheduler": None}
    assert doc["groups"][0]["changes"]["lr"]["new"] == 0.0008
    plain = json.loads(run_cli("reschedule", FIXTURES / "adamw_cosine.pt", "--dry-run",
                               "--json").stdout)
    assert plain["kind"] == "torch-zip" and plain["rewritten"] is None and plain["hf"] is None


def test_cli_for_a_torch_scheduler_on_an_hf_folder_prints_a_trainer_override(run_cli):
    pytest.importorskip("transformers")
    result = run_cli("reschedule", HF40, "--dry-run", "--scheduler",
                     "CosineAnnealingLR(T_max=80)", "--json")
    code = json.loads(result.stdout)["hf"]["create_scheduler"]
    assert "def create_scheduler(self, num_training_steps, optimizer=None):" in code
    assert "lr_scheduler.CosineAnnealingLR(optimizer, T_max=80)" in code
    text = run_cli("reschedule", HF40, "--dry-run", "--scheduler",
                   "CosineAnnealingLR(T_max=80)").stdout
    assert "  class Trainer(transformers.Trainer):" in text


def test_cli_accelerate_resume_recipe(run_cli):
    result = run_cli("reschedule", ACCELERATE, "--dry-run", "--optimizer", "optimizer.bin",
                     "--set", "T_max=40")
    assert result.exit_code == EXIT_OK
    assert "  scheduler = lr_scheduler.CosineAnnealingLR(optimizer, T_max=40, eta_min=1e-05)\n" \
        in result.stdout
    assert "  accelerator.load_state('OUT')\n" in result.stdout


# --- the frameworks resume the rewritten folders ------------------------------------------------


def _make_fixtures():
    """The fixture script as a module: the same tiny model, data and TrainingArguments."""
    if "make_fixtures" not in sys.modules:
        spec = importlib.util.spec_from_file_location("make_fixtures",
                                                      FIXTURES / "make_fixtures.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["make_fixtures"] = module
        spec.loader.exec_module(module)
    return sys.modules["make_fixtures"]


class _LrRecorder:
    """A TrainerCallback recording, per optimizer step, the lr of every group as it steps."""

    def __init__(self):
        import transformers

        class Callback(transformers.TrainerCallback):
            def on_optimizer_step(cb, args, state, control, optimizer=None, **kwargs):
                self.lrs[state.global_step + 1] = [g["lr"] for g in optimizer.param_groups]

        self.lrs: dict[int, list] = {}
        self.callback = Callback()


def _hf_run(trainer_cls, args, resume=None):
    """Train (or resume) the fixtures' Trainer setup; (lr per step, logged (step, lr) pairs)."""
    mf = _make_fixtures()
    recorder = _LrRecorder()
    trainer = mf.hf_trainer(args)
    trainer = trainer_cls(model=trainer.model, args=args, train_dataset=trainer.train_dataset,
                          callbacks=[recorder.callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    logged = {e["step"]: e["learning_rate"] for e in trainer.state.log_history
              if "learning_rate" in e}
    return recorder.lrs, logged


HF_RESUMES = [
    (HF20, dict(sets=["num_training_steps=80"]),
     dict(per_device_train_batch_size=4, logging_steps=5)),
    (COS8, dict(sets=["num_training_steps=24"]),
     dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, logging_steps=2)),
    (HF20, dict(scheduler="hf:cosine_with_min_lr(num_warmup_steps=3, num_training_steps=60, "
                          "min_lr=1e-05)", lr=["0.002"]),
     dict(per_device_train_batch_size=4, logging_steps=5)),
    (HF40, dict(scheduler="CosineAnnealingLR(T_max=80, eta_min=1e-05)"),
     dict(per_device_train_batch_size=4, logging_steps=5, max_steps=80)),
]


@pytest.mark.parametrize("source, options, run", HF_RESUMES,
                         ids=["longer", "longer-epochs-ratio", "hf-spec", "torch-spec"])
def test_the_trainer_resumes_the_rewritten_folder_on_the_new_schedule(tmp_path, source,
                                                                     options, run):
    """The central promise: trainer.train(resume_from_checkpoint=OUT) with the TrainingArguments
    ckpttool printed (or the create_scheduler override it printed) gives, from its first step,
    the lrs of a Trainer that used the new schedule from step 0, bit for bit."""
    transformers = pytest.importorskip("transformers")
    mf = _make_fixtures()
    plan = ckpttool.reschedule(source, **options)
    plan.save(tmp_path / "out")
    step = plan.steps
    args = mf.hf_training_args(str(tmp_path / "run"), save_strategy="no", **run)
    args = dataclasses.replace(args, **plan.hf.training_args)
    trainer_cls = transformers.Trainer
    if plan.hf.custom_scheduler:  # the override exactly as printed
        from ckpttool.render import trainer_subclass

        scope = {"transformers": transformers, "lr_scheduler": torch.optim.lr_scheduler}
        exec(trainer_subclass(plan), scope)
        trainer_cls = scope["Trainer"]
    fresh, fresh_logged = _hf_run(trainer_cls, args)
    resumed, resumed_logged = _hf_run(trainer_cls, args, resume=tmp_path / "out")
    assert min(resumed) == step + 1 and max(resumed) == max(fresh) == args.max_steps
    assert resumed == {s: lrs for s, lrs in fresh.items() if s > step}  # bit for bit
    later = {s: lr for s, lr in fresh_logged.items() if s > step}
    assert later and {s: lr for s, lr in resumed_logged.items() if s > step} == later
    # and the first resumed step is the replayed lr, not the old schedule's
    assert resumed[step + 1] == [g.changes.get("lr", (None, g_lr))[1] for g, g_lr in zip(
        plan.groups, [g.lr for g in plan.source.optimizers[0].groups])]


@pytest.fixture
def fresh_accelerate_state():
    """accelerate's shared state, reset after the test whatever happened in it."""
    state = pytest.importorskip("accelerate.state")
    yield
    state.AcceleratorState._reset_state(True)


def test_accelerate_load_state_resumes_the_rewritten_folder(tmp_path, fresh_accelerate_state):
    """Accelerator.load_state into real objects (the fixture's model, optimizers and the new
    schedulers, prepared in the same order) follows a torch run of the new schedule."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from torch.optim import lr_scheduler as L

    mf = _make_fixtures()
    ckpttool.reschedule(ACCELERATE, optimizer="optimizer.bin",
                        scheduler="LinearLR(start_factor=0.5, total_iters=12)").save(tmp_path / "a")
    ckpttool.reschedule(tmp_path / "a", optimizer="optimizer_1.bin",
                        sets=["step_size=4"]).save(tmp_path / "b")

    def optimizers(model):
        first, last = model[0], model[2]
        adamw = torch.optim.AdamW([{"params": [first.weight], "weight_decay": 0.01},
                                   {"params": [first.bias], "weight_decay": 0.0}], lr=1e-3)
        return adamw, torch.optim.SGD(last.parameters(), lr=0.05, momentum=0.9)

    def schedulers(adamw, sgd):
        return (L.LinearLR(adamw, start_factor=0.5, total_iters=12),
                L.StepLR(sgd, step_size=4, gamma=0.5))

    AcceleratorState._reset_state(True)  # a Trainer run leaves its state behind
    accelerator = Accelerator(cpu=True)
    accelerator.register_for_checkpointing(mf.BatchCounter())
    model = mf.tiny_model()
    adamw, sgd = optimizers(model)
    model, adamw, sgd, *scheds = accelerator.prepare(model, adamw, sgd, *schedulers(adamw, sgd))
    accelerator.load_state(str(tmp_path / "b"))
    # The oracle: the new schedules from step 0 in plain torch, 6 steps then 10 more.
    ref_adamw, ref_sgd = optimizers(mf.tiny_model())
    ref_scheds = schedulers(ref_adamw, ref_sgd)
    expected, got = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(16):
            if i >= 6:
                expected.append([g["lr"] for o in (ref_adamw, ref_sgd) for g in o.param_groups])
                got.append([g["lr"] for o in (adamw, sgd) for g in o.param_groups])
                for o in (adamw, sgd):
                    o.step()
                for s in scheds:
                    s.step()
            for o in (ref_adamw, ref_sgd):
                o.step()
            for s in ref_scheds:
                s.step()
    assert got == expected
    # The moments came through untouched.
    stored = torch.load(ACCELERATE / "optimizer.bin", weights_only=True)["state"]
    loaded = adamw.state_dict()["state"]
    for key, state in stored.items():
        for name, value in state.items():
            assert torch.equal(value, loaded[key][name])
