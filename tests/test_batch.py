"""Many checkpoints at once: PATH expansion (folders, patterns), `show`'s summary table and JSON
list, `reschedule` over many inputs (--out-dir, --in-place, --dry-run), each input standing
alone: a failure leaves nothing behind for it and the others are still written."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import ckpttool
from ckpttool import batch
from ckpttool.errors import EXIT_ERROR, EXIT_OK, InputError
from conftest import ROOT, run_main

COSINE = "fixtures/adamw_cosine.pt"
# A sweep of runs, each file a copy of a fixture: run10 sorts after run2.
SWEEP = {"run1/last.pt": COSINE,
         "run2/last.pt": "fixtures/schedulers/CosineAnnealingLR.pt",
         "run10/last.ckpt": "fixtures/layouts/lightning.ckpt"}


def _make(folder, files: dict) -> None:
    for name, fixture in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if fixture is None:
            path.write_bytes(b"")
        else:
            shutil.copy(ROOT / fixture, path)


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    """tmp_path as the working folder, holding sweep/ (SWEEP)."""
    _make(tmp_path / "sweep", SWEEP)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _files(folder) -> list[str]:
    """Every file and folder under ``folder`` (hidden ones too), relative, sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# --- expand_paths ---------------------------------------------------------------------------------


def test_a_folder_is_searched_in_natural_order(sweep):
    _make(sweep / "sweep", {"run2/notes.txt": None, "run2/model.safetensors": None,
                            ".hidden/x.pt": None, "run2/.x.pt.ckpttool-new": None,
                            "run3/weights.pth": COSINE, "run3/sub/opt.bin": COSINE,
                            "run3/last.pt.bak": None})
    found = ckpttool.expand_paths(["sweep"])
    assert [f.name for f in found] == ["run1/last.pt", "run2/last.pt", "run3/sub/opt.bin",
                                       "run3/weights.pth", "run10/last.ckpt"]
    assert [f.path for f in found][0] == os.path.join("sweep", "run1/last.pt")
    assert all(f.expanded for f in found)


def test_files_are_kept_whatever_their_name_and_patterns_expand(sweep):
    (sweep / "odd.name").write_bytes(b"")
    assert ckpttool.expand_paths(["odd.name", "nope.pt"]) == [
        batch.Found("odd.name", "odd.name"), batch.Found("nope.pt", "nope.pt")]
    found = ckpttool.expand_paths(["sweep/run*/last.*"])  # as a quoted pattern arrives
    assert [f.path for f in found] == ["sweep/run1/last.pt", "sweep/run2/last.pt",
                                       "sweep/run10/last.ckpt"]
    assert [f.name for f in found] == ["last.pt", "last.pt", "last.ckpt"]
    assert [f.path for f in ckpttool.expand_paths(["sweep/**/*.ckpt"])] == [
        "sweep/run10/last.ckpt"]
    assert [f.name for f in ckpttool.expand_paths(["sweep/run1*"])] == [
        "last.pt", "last.ckpt"]  # matched folders are searched too


def test_nothing_found_is_an_error(sweep):
    (sweep / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no checkpoint in this folder"):
        ckpttool.expand_paths(["empty"])
    with pytest.raises(InputError, match=r"sweep/\*\.pt: no file matches this pattern"):
        ckpttool.expand_paths(["sweep/*.pt"])


def test_a_checkpoint_folder_is_one_checkpoint(sweep, monkeypatch):
    """The hook: a folder that is itself a checkpoint is neither searched nor expanded."""
    monkeypatch.setattr(batch, "is_checkpoint_dir",
                        lambda p: os.path.basename(os.path.normpath(p)).startswith("checkpoint-"))
    _make(sweep / "hf", {"checkpoint-8/optimizer.pt": COSINE, "checkpoint-12/optimizer.pt": COSINE})
    found = ckpttool.expand_paths(["hf"])
    assert [(f.path, f.name) for f in found] == [("hf/checkpoint-8", "checkpoint-8"),
                                                 ("hf/checkpoint-12", "checkpoint-12")]
    [one] = ckpttool.expand_paths(["hf/checkpoint-8/"])
    assert one == batch.Found("hf/checkpoint-8/", "checkpoint-8", expanded=False)


def test_a_link_back_up_the_tree_ends(sweep):
    os.symlink(sweep / "sweep", sweep / "sweep" / "run1" / "loop")
    assert len(ckpttool.expand_paths(["sweep"])) == 3


# --- show over many -------------------------------------------------------------------------------


def test_show_a_folder_prints_one_summary_table(run_cli, sweep):
    _make(sweep / "sweep", {"run3/last.pt": None,
                            "run4/last.pt": "fixtures/findings/lr_mismatch.pt"})
    result = run_cli("show", "sweep")
    assert result.exit_code == EXIT_ERROR
    assert result.stderr == ("ckpttool: error: sweep/run3/last.pt: the file is empty (0 bytes); "
                             "was the save interrupted?\n")
    assert result.stdout == (
        "path                   kind        step  lr                scheduler          findings\n"
        "sweep/run1/last.pt     torch-zip   16    0.000658          CosineAnnealingLR  none\n"
        "sweep/run2/last.pt     torch-zip   10    0.0501, 0.0251    CosineAnnealingLR  none\n"
        "sweep/run3/last.pt     unreadable  -     -                 -                  -\n"
        "sweep/run4/last.pt     torch-zip   16    0.0005, 0.000658  CosineAnnealingLR  1 error\n"
        "sweep/run10/last.ckpt  lightning   16    0.0005            CosineAnnealingLR  none\n"
        "5 checkpoints, 1 with error findings, 1 unreadable\n")


def test_show_json_list_is_the_single_documents(run_cli, sweep):
    (sweep / "sweep" / "run3").mkdir()
    (sweep / "sweep" / "run3" / "last.pt").write_bytes(b"")
    docs = json.loads(run_cli("show", "--json", "sweep").stdout)
    assert [d["path"] for d in docs] == ["sweep/run1/last.pt", "sweep/run2/last.pt",
                                         "sweep/run3/last.pt", "sweep/run10/last.ckpt"]
    for doc in docs:
        single = run_cli("show", "--json", doc["path"])
        if "error" in doc:
            assert single.exit_code == EXIT_ERROR
            assert doc == {"schema": "ckpttool.show/1", "path": doc["path"],
                           "error": single.stderr.removeprefix("ckpttool: error: ").strip()}
        else:
            assert doc == json.loads(single.stdout)
    # a folder with one checkpoint is still a batch: a list
    assert isinstance(json.loads(run_cli("show", "--json", "sweep/run1").stdout), list)


def test_show_full_is_each_single_report(run_cli, sweep):
    result = run_cli("show", "--full", "sweep")
    assert result.exit_code == EXIT_OK
    singles = [run_cli("show", f"sweep/{name}").stdout for name in SWEEP]
    assert result.stdout == "\n".join(singles)


def test_one_file_keeps_its_report(run_cli, sweep):
    assert run_cli("show", "sweep/run1/last.pt").stdout.startswith(
        "sweep/run1/last.pt  (torch-zip, 6.0 KB)\n\n[optimizer] AdamW")


def _main(args, monkeypatch, capsys, *, tty: bool):
    return run_main(args, monkeypatch, capsys, tty=tty)


@pytest.mark.parametrize("command", [["show", "sweep"],
                                     ["reschedule", "sweep", "--dry-run", "--scale-lr", "0.5"]])
def test_many_inputs_draw_a_bar_on_a_terminal(sweep, monkeypatch, capsys, command):
    from ckpttool import cli

    monkeypatch.setattr(cli, "BAR_DELAY_S", 0.0)  # (else only batches longer than a second)
    code, out, err = _main(command, monkeypatch, capsys, tty=True)
    label = {"show": "reading", "reschedule": "rescheduling"}[command[0]]
    assert code == EXIT_OK and f"{label}  [" in err and "66%" in err
    assert out.splitlines()[0].split()[0] in ("path", "input")
    for quiet in (["-q"], ["--quiet"]):
        assert _main(command + quiet, monkeypatch, capsys, tty=True)[2] == ""
    assert _main(command, monkeypatch, capsys, tty=False)[2] == ""


# --- reschedule over many -------------------------------------------------------------------------


def test_reschedule_a_folder_into_out_dir(run_cli, sweep):
    result = run_cli("reschedule", "sweep", "--out-dir", "halved", "--scale-lr", "0.5",
                     "--set", "T_max=60")
    assert result.exit_code == EXIT_OK, result.stderr
    assert _files(sweep / "halved") == ["run1", "run1/last.pt", "run10", "run10/last.ckpt",
                                        "run2", "run2/last.pt"]
    for name in SWEEP:
        before = ckpttool.load(sweep / "sweep" / name)
        after = ckpttool.load(sweep / "halved" / name, verify=True)
        assert after.schedulers[0].args["T_max"] == 60 and after.schedulers[0].verify.identical
        assert after.schedulers[0].base_lrs == [b / 2 for b in before.schedulers[0].base_lrs]
        # each output is exactly what the single-input command writes
        single = sweep / "single" / name
        single.parent.mkdir(parents=True, exist_ok=True)
        assert run_cli("reschedule", f"sweep/{name}", "-o", single, "--scale-lr", "0.5",
                       "--set", "T_max=60").exit_code == EXIT_OK
        assert single.read_bytes() == (sweep / "halved" / name).read_bytes()
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["input", "output", "step", "lr", "new", "schedule", "result"]
    assert [line.split()[:3] for line in lines[1:4]] == [
        ["sweep/run1/last.pt", "halved/run1/last.pt", "16"],
        ["sweep/run2/last.pt", "halved/run2/last.pt", "10"],
        ["sweep/run10/last.ckpt", "halved/run10/last.ckpt", "16"]]
    assert all(line.endswith("verified") for line in lines[1:4])
    assert lines[-1] == "3 inputs: 3 written and verified"


def test_a_failed_input_leaves_nothing_and_the_others_are_written(run_cli, sweep, monkeypatch):
    from ckpttool.rescheduling import Rescheduled

    _make(sweep / "sweep", {"run3/last.pt": None})  # unreadable
    real = Rescheduled.verify

    def verify(self, path, steps=10):  # run2's written file does not resume as replayed
        return "a planted mismatch" if "run2" in self.source.path else real(self, path, steps)

    monkeypatch.setattr(Rescheduled, "verify", verify)
    result = run_cli("reschedule", "sweep", "--out-dir", "out", "--set", "T_max=60")
    assert result.exit_code == EXIT_ERROR
    assert result.stderr.splitlines() == [
        "ckpttool: error: sweep/run2/last.pt: the rewritten checkpoint does not resume as "
        "replayed (a planted mismatch); nothing was written",
        "ckpttool: error: sweep/run3/last.pt: the file is empty (0 bytes); was the save "
        "interrupted?"]
    # no output, no pending file, no folder for the failed ones
    assert _files(sweep / "out") == ["run1", "run1/last.pt", "run10", "run10/last.ckpt"]
    assert [line.split()[-1] for line in result.stdout.splitlines()[1:5]] == [
        "verified", "failed", "failed", "verified"]
    assert result.stdout.splitlines()[-1] == (
        "4 inputs: 2 written and verified, 2 failed (nothing written for them)")


def test_an_interrupt_keeps_what_was_done_and_leaves_no_half_output(run_cli, sweep, monkeypatch):
    from ckpttool import rescheduling

    real = rescheduling.reschedule

    def reschedule(ckpt, **kwargs):
        if "run2" in ckpt.path:
            raise KeyboardInterrupt
        return real(ckpt, **kwargs)

    monkeypatch.setattr(rescheduling, "reschedule", reschedule)
    result = run_cli("reschedule", "sweep", "--out-dir", "out", "--set", "T_max=60")
    assert result.exit_code == EXIT_ERROR
    assert result.stderr.strip() == "ckpttool: error: interrupted"
    assert _files(sweep / "out") == ["run1", "run1/last.pt"]


def test_an_existing_output_fails_alone(run_cli, sweep):
    (sweep / "out" / "run2").mkdir(parents=True)
    (sweep / "out" / "run2" / "last.pt").write_bytes(b"keep me")
    result = run_cli("reschedule", "sweep", "--out-dir", "out", "--scale-lr", "0.5")
    assert result.exit_code == EXIT_ERROR
    assert "out/run2/last.pt exists; pass --force" in result.stderr
    assert (sweep / "out" / "run2" / "last.pt").read_bytes() == b"keep me"
    assert (sweep / "out" / "run1" / "last.pt").exists()
    assert (sweep / "out" / "run10" / "last.ckpt").exists()
    forced = run_cli("reschedule", "sweep", "--out-dir", "out", "--scale-lr", "0.5", "--force")
    assert forced.exit_code == EXIT_OK
    assert (sweep / "out" / "run2" / "last.pt").read_bytes() != b"keep me"


def test_reschedule_many_in_place_keeps_each_backup(run_cli, sweep):
    originals = {name: (sweep / "sweep" / name).read_bytes() for name in SWEEP}
    result = run_cli("reschedule", "sweep", "--in-place", "--lr", "0.01")
    assert result.exit_code == EXIT_OK, result.stderr
    assert "each original kept as its .bak" in result.stdout
    for name, data in originals.items():
        assert (sweep / "sweep" / f"{name}.bak").read_bytes() == data
        ckpt = ckpttool.load(sweep / "sweep" / name)
        assert [g.initial_lr for g in ckpt.optimizers[0].groups] == [0.01] * len(
            ckpt.optimizers[0].groups)


def test_reschedule_many_dry_run_writes_nothing_and_json_lists_the_plans(run_cli, sweep):
    before = _files(sweep)
    result = run_cli("reschedule", "sweep", "--out-dir", "out", "--dry-run", "--scale-lr", "0.5")
    assert result.exit_code == EXIT_OK and _files(sweep) == before
    assert [line.split()[1] for line in result.stdout.splitlines()[1:4]] == [
        "out/run1/last.pt", "out/run2/last.pt", "out/run10/last.ckpt"]
    assert result.stdout.splitlines()[-1] == "3 inputs: 3 planned (dry run: nothing written)"
    _make(sweep / "sweep", {"run3/last.pt": None})
    docs = json.loads(run_cli("reschedule", "sweep", "--dry-run", "--json",
                              "--scale-lr", "0.5").stdout)
    assert docs[2] == {"schema": "ckpttool.reschedule/1", "path": "sweep/run3/last.pt",
                       "error": "sweep/run3/last.pt: the file is empty (0 bytes); was the save "
                                "interrupted?"}
    for doc in docs[:2] + docs[3:]:
        single = run_cli("reschedule", doc["path"], "--dry-run", "--json", "--scale-lr", "0.5")
        assert doc == json.loads(single.stdout)


@pytest.mark.parametrize("args, message", [
    (["sweep"], "give exactly one of -o OUT, --out-dir DIR and --in-place (or --dry-run)"),
    (["sweep", "-o", "x.pt", "--in-place"],
     "give exactly one of -o OUT, --out-dir DIR and --in-place"),
    (["sweep", "-o", "x.pt"], "-o names one output; for several inputs use --out-dir DIR"),
    (["sweep/run1/last.pt", "sweep/run2/last.pt", "-o", "x.pt"], "-o names one output"),
    (["sweep", "--out-dir", "o", "--plot", "x.png"], "--plot draws the change of one input"),
    (["sweep/run1/last.pt", "sweep/run2/last.pt", "--out-dir", "o"],
     "sweep/run1/last.pt and sweep/run2/last.pt would both be written to o/last.pt"),
])
def test_reschedule_many_usage_errors_write_nothing(run_cli, sweep, args, message):
    before = _files(sweep)
    result = run_cli("reschedule", *args, "--scale-lr", "0.5")
    assert result.exit_code == EXIT_ERROR and message in result.stderr
    assert len(result.stderr.splitlines()) == 1 and _files(sweep) == before


def test_reschedule_one_input_with_out_dir_is_a_single_reschedule(run_cli, sweep):
    result = run_cli("reschedule", "sweep/run1/last.pt", "--out-dir", "deep/er", "--scale-lr",
                     "0.5")
    assert result.exit_code == EXIT_OK, result.stderr
    assert "Resume with the new schedule in this order:" in result.stdout  # the full report
    lrs = torch.load(sweep / "deep" / "er" / "last.pt", weights_only=True)
    assert lrs["optimizer"]["param_groups"][0]["initial_lr"] == 0.0005
    failed = run_cli("reschedule", "sweep/run1/last.pt", "--out-dir", "made/for/it", "--set",
                     "nope=1")
    assert failed.exit_code == EXIT_ERROR and not (sweep / "made").exists()


def test_the_summary_names_hf_schedules_and_the_position_of_chained_schedulers():
    from ckpttool import render

    hf = render.show_summary_row(ckpttool.load(ROOT / "fixtures/dirs/hf_trainer/checkpoint-20"))
    assert hf[2:5] == ["20", "0.000571", "hf:linear(num_warmup_steps=5, num_training_steps=40)"]
    chained = ckpttool.load(ROOT / "fixtures/schedulers/ChainedScheduler.pt")
    assert chained.schedulers[0].last_epoch is None  # stored by its children only
    assert render.show_summary_row(chained)[2] == str(chained.schedulers[0].children[0].last_epoch)


# --- what one input's write must not destroy ----------------------------------------------------


def test_a_folder_search_skips_ckpttools_backups(sweep):
    """In-place backups (NAME.bak, an HF Trainer folder's bak-NAME) are the originals of
    rewritten checkpoints, never inputs of a search; named on their own they are read."""
    acc = ROOT / "fixtures/dirs/accelerate"
    hf = ROOT / "fixtures/dirs/hf_trainer/checkpoint-20"
    shutil.copytree(acc, sweep / "runs" / "state")
    shutil.copytree(acc, sweep / "runs" / "state.bak")
    shutil.copytree(hf, sweep / "runs" / "checkpoint-20")
    shutil.copytree(hf, sweep / "runs" / "bak-checkpoint-20")
    _make(sweep / "runs", {"bak-notes/last.pt": COSINE, "last.pt.bak": COSINE})
    assert [f.name for f in ckpttool.expand_paths(["runs"])] == [
        "bak-notes/last.pt", "checkpoint-20", "state"]
    assert [f.path for f in ckpttool.expand_paths(["runs/bak-checkpoint-20", "runs/state.bak"])
            ] == ["runs/bak-checkpoint-20", "runs/state.bak"]


def test_an_output_that_is_another_input_is_refused_before_anything_is_written(run_cli, sweep):
    """sweep/run1/last.pt would be written to out/run1/last.pt, the second input, before that
    one is read: refused, nothing written, --force or not."""
    _make(sweep / "out", {"run1/last.pt": COSINE})
    before = _files(sweep)
    result = run_cli("reschedule", "sweep", "out/run1/last.pt", "--out-dir", "out", "--force",
                     "--scale-lr", "0.5")
    assert result.exit_code == EXIT_ERROR and len(result.stderr.splitlines()) == 1
    assert ("the output of sweep/run1/last.pt, out/run1/last.pt, is the input "
            "out/run1/last.pt: it would be replaced before it is read") in result.stderr
    assert _files(sweep) == before


def test_check_targets_compares_places_not_spellings(sweep, monkeypatch):
    """Every way one write can destroy another input, each also through a second path to the
    same folder that string comparison cannot see (realpath made blind, as to a bind mount)."""
    from ckpttool.errors import StateError

    acc = ROOT / "fixtures/dirs/accelerate"
    shutil.copytree(acc, sweep / "runs" / "state")
    shutil.copytree(acc, sweep / "runs" / "state.bak")
    _make(sweep / "runs", {"state/sub/x.pt": COSINE})
    os.symlink(sweep / "runs", sweep / "alias")
    monkeypatch.setattr(os.path, "realpath", os.path.abspath)
    for inputs, targets, message in [
        (["sweep/run1/last.pt", "sweep/run2/last.pt"], ["o/last.pt", "o/./last.pt"],
         "sweep/run1/last.pt and sweep/run2/last.pt would both be written to o/./last.pt"),
        (["sweep/run1/last.pt", "runs/state"], ["alias/state", None],
         "the output of sweep/run1/last.pt, alias/state, is the input runs/state"),
        (["sweep/run1/last.pt", "runs/state"], ["alias/state/new.pt", None],
         "alias/state/new.pt, lies inside the input runs/state"),
        (["runs/state/sub/x.pt", "runs/state"], [None, "alias/state"],
         "the output of runs/state, alias/state, contains the input runs/state/sub/x.pt"),
    ]:
        with pytest.raises(StateError, match=message.replace(".", r"\.")):
            batch.check_targets(inputs, targets)
    inputs = ["runs/state", "alias/state.bak"]
    batch.check_targets(inputs, inputs)  # without backups, state.bak is another input
    with pytest.raises(StateError, match="alias/state.bak is where --in-place keeps the backup "
                                         "of runs/state"):
        batch.check_targets(inputs, inputs, backups=True)
    batch.check_targets(["sweep/run1/last.pt"], ["sweep/run1/last.pt"])  # its own: save()'s
