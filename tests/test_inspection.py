"""Identification, pairing and findings, checked against real torch objects and the fixtures."""

from __future__ import annotations

import pytest
import torch

import ckpttool
from ckpttool.inspection import OPTIMIZER_FLAGS, OPTIMIZER_SIGNATURES, SCHEDULER_GROUP_KEYS, identify_optimizer
from conftest import FIXTURES

OPTIMIZERS = sorted(p.stem for p in (FIXTURES / "optimizers").glob("*.pt"))


def _real_state(name: str) -> dict:
    params = [torch.nn.Parameter(torch.randn(3, 3))]
    opt = getattr(torch.optim, name)(params, lr=0.01)
    if name not in ("LBFGS", "SparseAdam"):
        params[0].grad = torch.randn(3, 3)
        opt.step()
    return opt.state_dict()


@pytest.mark.parametrize("name", sorted(OPTIMIZER_SIGNATURES))
def test_signatures_match_real_torch(name):
    """The key table in inspection.py is what this torch writes."""
    state = _real_state(name)
    keys = set(state["param_groups"][0]) - OPTIMIZER_FLAGS - {"params"}
    assert keys == OPTIMIZER_SIGNATURES[name]
    assert identify_optimizer(state).name == name


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_fixture_is_identified(name):
    ckpt = ckpttool.load(FIXTURES / "optimizers" / f"{name}.pt")
    assert [o.cls for o in ckpt.optimizers] == [name]


def test_adam_and_adamw_without_the_flag_are_ambiguous():
    state = _real_state("Adam")
    for g in state["param_groups"]:
        del g["decoupled_weight_decay"]
    found = identify_optimizer(state)
    assert found.name == "unknown" and found.candidates == ("Adam", "AdamW")


def test_user_keys_in_groups_are_tolerated_but_foreign_optimizers_are_unknown():
    state = _real_state("SGD")
    state["param_groups"][0]["name"] = "decay"
    assert identify_optimizer(state).name == "SGD"
    for key in ("optim_bits", "min_8bit_size", "percentile_clipping"):  # bitsandbytes-like
        state["param_groups"][0][key] = 1
    assert identify_optimizer(state).name == "unknown"


def test_scheduler_keys_do_not_confuse_identification():
    state = _real_state("SGD")
    state["param_groups"][0].update({k: 0.1 for k in SCHEDULER_GROUP_KEYS})
    assert identify_optimizer(state).name == "SGD"


@pytest.mark.parametrize("fixture, pairs", [
    ("adamw_cosine.pt", {"scheduler": "optimizer"}),
    ("layouts/tutorial.pt", {"scheduler_state_dict": "optimizer_state_dict"}),
    ("layouts/nested.pt", {"train_state/scheduler": "train_state/optimizer"}),
    ("layouts/gan.pt", {"sched_g": "opt_g", "sched_d": "opt_d"}),
    ("layouts/lightning.ckpt", {"lr_schedulers/0": "optimizer_states/0"}),
    ("layouts/two_optimizers.pt", {"schedulers/0": "optimizers/0", "schedulers/1": "optimizers/1"}),
])
def test_states_are_found_and_paired(fixture, pairs):
    ckpt = ckpttool.load(FIXTURES / fixture)
    assert {s.location: s.optimizer for s in ckpt.schedulers} == pairs


def test_lightning_kind():
    assert ckpttool.load(FIXTURES / "layouts/lightning.ckpt").kind == "lightning"
    assert ckpttool.load(FIXTURES / "legacy.pt").kind == "torch-legacy"


@pytest.mark.parametrize("fixture, code", [
    ("lr_mismatch", "lr-mismatch"),
    ("initial_lr_mismatch", "initial-lr-mismatch"),
    ("missing_initial_lr", "missing-initial-lr"),
    ("onecycle_exhausted", "onecycle-exhausted"),
    ("group_count_mismatch", "group-count-mismatch"),
    ("lambda_not_stored", "lambda-not-stored"),
])
def test_each_problem_has_its_finding(fixture, code):
    ckpt = ckpttool.load(FIXTURES / "findings" / f"{fixture}.pt")
    assert code in {f.code for f in ckpt.findings}
    finding = next(f for f in ckpt.findings if f.code == code)
    assert finding.hint and finding.location


@pytest.mark.parametrize("fixture", ["adamw_cosine.pt", "legacy.pt", "layouts/gan.pt",
                                     "schedulers/SequentialLR.pt", "schedulers/OneCycleLR.pt",
                                     "schedulers/CyclicLR.pt"])
def test_consistent_checkpoints_have_no_problem_findings(fixture):
    ckpt = ckpttool.load(FIXTURES / fixture)
    assert [f for f in ckpt.findings if f.severity != "info"] == []


def test_tensor_lr_is_reported_with_dtype_and_exact_value():
    ckpt = ckpttool.load(FIXTURES / "tensor_lr.pt")
    group = ckpt.optimizers[0].groups[0]
    assert group.lr_tensor.dtype == "float32" and group.lr_tensor.device == "cpu"
    assert "tensor-lr" in {f.code for f in ckpt.findings}
    # The value shown is the float32 value itself, read from the tensor's bytes.
    assert torch.tensor(group.lr, dtype=torch.float32).item() == group.lr


def test_values_match_torch_load():
    path = FIXTURES / "adamw_cosine.pt"
    ckpt = ckpttool.load(path)
    ref = torch.load(path, weights_only=True)
    groups = ckpt.optimizers[0].groups
    assert [g.lr for g in groups] == [g["lr"] for g in ref["optimizer"]["param_groups"]]
    assert [g.initial_lr for g in groups] == [
        g["initial_lr"] for g in ref["optimizer"]["param_groups"]]
    sched = ckpt.schedulers[0]
    assert sched.last_lr == ref["scheduler"]["_last_lr"]
    assert sched.last_epoch == ref["scheduler"]["last_epoch"]
    assert ckpt.optimizers[0].step == ref["optimizer"]["state"][0]["step"].item()


def test_opaque_values_are_listed_as_refused_by_weights_only():
    ckpt = ckpttool.load(FIXTURES / "opaque.pt")
    assert "argparse.Namespace" in ckpt.unsafe_globals
    assert ckpt.optimizers and ckpt.schedulers  # still fully inspectable


def test_model_only_says_so():
    ckpt = ckpttool.load(FIXTURES / "model_only.pt")
    assert not ckpt.optimizers and {f.code for f in ckpt.findings} == {"no-state"}
