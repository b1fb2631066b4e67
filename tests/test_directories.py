"""Checkpoint folders (HF Trainer checkpoint-N/, accelerate save_state()): read as one tree,
shown, diffed; the oracle is the frameworks' own files loaded with torch, json and safetensors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import ckpttool
from ckpttool.directories import directory_kind, hf_run, is_checkpoint_dir, read_directory
from ckpttool.errors import EXIT_DIFFERENT, EXIT_ERROR, EXIT_OK, InputError
from conftest import FIXTURES

DIRS = FIXTURES / "dirs"
HF20 = DIRS / "hf_trainer/checkpoint-20"
HF40 = DIRS / "hf_trainer/checkpoint-40"
COSINE8 = DIRS / "hf_trainer_cosine/checkpoint-8"
ACCELERATE = DIRS / "accelerate"


def test_folder_kinds(tmp_path):
    assert directory_kind(HF20) == "hf-trainer"
    assert directory_kind(ACCELERATE) == "accelerate"
    assert directory_kind(DIRS / "dcp/single") == "dcp"
    assert directory_kind(DIRS / "hf_trainer") is None  # a folder of checkpoints
    assert not is_checkpoint_dir(tmp_path) and is_checkpoint_dir(HF20)
    assert not is_checkpoint_dir(HF20 / "optimizer.pt")


def test_a_folder_is_one_tree_under_its_file_names():
    d = read_directory(HF20)
    assert sorted(d.root) == sorted(p.name for p in HF20.iterdir())
    optimizer = torch.load(HF20 / "optimizer.pt")
    assert d.root["optimizer.pt"]["param_groups"][0]["lr"] == optimizer["param_groups"][0]["lr"]
    assert d.root["trainer_state.json"] == json.loads((HF20 / "trainer_state.json").read_text())
    assert d.size == sum(p.stat().st_size for p in HF20.iterdir())


def test_safetensors_weights_are_tensors_whose_bytes_stay_in_the_file():
    from safetensors.torch import load_file

    d = read_directory(HF20)
    weights = load_file(HF20 / "model.safetensors")
    tree = d.root["model.safetensors"]
    assert set(tree) - {"__metadata__"} == set(weights)
    for name, tensor in weights.items():
        ref = tree[name]
        assert (ref.dtype, ref.shape) == (str(tensor.dtype).removeprefix("torch."),
                                          tuple(tensor.shape))
        assert d.tensor_bytes(ref) == tensor.contiguous().view(torch.uint8).numpy().tobytes()


def test_show_hf_trainer_folder_names_the_schedule(run_cli):
    ckpt = ckpttool.load(HF20)
    assert ckpt.kind == "hf-trainer"
    assert [o.location for o in ckpt.optimizers] == ["optimizer.pt"]
    (sched,) = ckpt.schedulers
    assert (sched.location, sched.optimizer, sched.last_epoch) == ("scheduler.pt",
                                                                   "optimizer.pt", 20)
    assert sched.named == "hf:linear(num_warmup_steps=5, num_training_steps=40)"
    codes = {f.code for f in ckpt.findings}
    assert "hf-schedule" in codes and "lambda-not-stored" not in codes
    assert "hf-step-mismatch" not in codes
    refused = {f.location for f in ckpt.findings if f.code == "weights-only-refused"}
    assert refused == {"training_args.bin", "rng_state.pth"}
    result = run_cli("show", HF20)
    assert result.exit_code == EXIT_OK
    assert "[scheduler.pt] LambdaLR = hf:linear(num_warmup_steps=5, num_training_steps=40)" \
        in result.stdout
    assert "HF Trainer: global_step 20 of max_steps 40" in result.stdout
    doc = json.loads(run_cli("show", "--json", HF20).stdout)
    assert doc["kind"] == "hf-trainer" and doc["hf"]["schedule"] == sched.named
    assert doc["hf"]["logged_lrs"][0] == [5, 0.0008]


def test_warmup_given_as_a_ratio_is_resolved_as_the_trainer_does():
    run = hf_run(read_directory(COSINE8))
    assert (run.warmup_given, run.warmup_steps, run.max_steps) == (0.1, 2, 12)
    assert run.spec == "hf:cosine(num_warmup_steps=2, num_training_steps=12)"


def test_a_scheduler_from_another_checkpoint_is_found(tmp_path, run_cli):
    mixed = tmp_path / "checkpoint-20"
    shutil.copytree(HF20, mixed)
    shutil.copy(HF40 / "scheduler.pt", mixed / "scheduler.pt")
    (finding,) = [f for f in ckpttool.load(mixed).findings if f.code == "hf-step-mismatch"]
    assert finding.severity == "error" and "global_step 20" in finding.message
    assert "last_epoch 40" in finding.message


def test_show_accelerate_folder_pairs_by_number():
    ckpt = ckpttool.load(ACCELERATE)
    assert ckpt.kind == "accelerate"
    assert [(o.location, o.cls) for o in ckpt.optimizers] == [("optimizer.bin", "AdamW"),
                                                              ("optimizer_1.bin", "SGD")]
    assert [(s.location, s.cls, s.optimizer) for s in ckpt.schedulers] == [
        ("scheduler.bin", "CosineAnnealingLR", "optimizer.bin"),
        ("scheduler_1.bin", "StepLR", "optimizer_1.bin")]
    assert not [f for f in ckpt.findings if f.severity != "info"]


def test_diff_of_two_hf_checkpoints(run_cli):
    d = ckpttool.diff(HF20, HF40)
    paths = {c.path: c for c in d.changes}
    assert paths["scheduler.pt/last_epoch"].b == 40
    assert paths["optimizer.pt/param_groups/0/lr"].b == 0.0
    assert paths["trainer_state.json/global_step"].a == 20
    assert {"model.safetensors/net.0.weight", "optimizer.pt/state/0/exp_avg"} <= set(paths)
    # The oracle: safetensors' own loader.
    from safetensors.torch import load_file

    a, b = load_file(HF20 / "model.safetensors"), load_file(HF40 / "model.safetensors")
    for name in a:
        change = paths[f"model.safetensors/{name}"]
        assert change.n_diff == int((a[name] != b[name]).sum())
        assert change.max_abs == float((a[name].double() - b[name].double()).abs().max())
    assert run_cli("diff", HF20, HF40).exit_code == EXIT_DIFFERENT


def test_a_folder_equals_its_copy(tmp_path, run_cli):
    copy = tmp_path / "copy"
    shutil.copytree(ACCELERATE, copy)
    assert ckpttool.diff(ACCELERATE, copy).equal
    result = run_cli("diff", ACCELERATE, copy)
    assert result.exit_code == EXIT_OK and "no differences" in result.stdout


def test_rewriting_a_folder_into_itself_is_refused_cleanly(run_cli, tmp_path):
    folder = tmp_path / "state"
    shutil.copytree(ACCELERATE, folder)
    result = run_cli("reschedule", folder, "--optimizer", "optimizer.bin", "--set",
                     "T_max=40", "-o", folder / "out")
    assert result.exit_code == EXIT_ERROR
    assert "inside the input folder" in result.stderr and result.stderr.count("\n") == 1
    assert sorted(os.listdir(folder)) == sorted(os.listdir(ACCELERATE))


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "no checkpoint"),
    (lambda d: (d / "trainer_state.json").write_text("{not json"), "not valid JSON"),
    (lambda d: ((d / "trainer_state.json").write_text("{}"),
                (d / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")), "safetensors"),
    (lambda d: (d / "optimizer.bin").write_bytes(b"PK\x03\x04 truncated"), "optimizer.bin"),
])
def test_bad_folders_get_one_line(tmp_path, run_cli, make, message):
    folder = tmp_path / "run"
    folder.mkdir()
    make(folder)
    result = run_cli("show", folder)
    assert result.exit_code == EXIT_ERROR
    assert message in result.stderr and result.stderr.count("\n") == 1
    with pytest.raises(InputError):
        ckpttool.load(folder)


def test_a_folder_of_checkpoint_folders_is_not_one(run_cli):
    result = run_cli("show", DIRS / "hf_trainer")
    assert result.exit_code == EXIT_ERROR or "checkpoint-20" in result.stdout


def test_equal_looking_tensors_of_two_files_keep_their_own_values(tmp_path):
    """Storage keys repeat across the files of a folder ("0" in each): a value read from one
    file must not be shown for the other."""
    folder = tmp_path / "state"
    folder.mkdir()
    for name, steps in (("optimizer.bin", 6), ("optimizer_1.bin", 3)):
        p = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.Adam([p], lr=0.1)
        for _ in range(steps):
            p.grad = torch.ones(2)
            opt.step()
        torch.save(opt.state_dict(), folder / name)
    ckpt = ckpttool.load(folder)
    assert [(o.location, o.step) for o in ckpt.optimizers] == [("optimizer.bin", 6.0),
                                                               ("optimizer_1.bin", 3.0)]
    d = ckpttool.diff(folder / "optimizer.bin", folder / "optimizer_1.bin")
    assert {c.path for c in d.changes} >= {"state/0/step"}
