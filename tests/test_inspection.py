"""Identification, pairing and findings, checked against real torch objects and the fixtures."""

from __future__ import annotations

import json
import zipfile
from collections import Counter

import pytest
import torch
from torch.optim import lr_scheduler as L

import ckpttool
from ckpttool.errors import InputError
from ckpttool.inspection import OPTIMIZER_FLAGS, OPTIMIZER_SIGNATURES, identify_optimizer
from ckpttool.schedulers import SCHEDULER_SET_KEYS
from ckpttool.serialization import read_checkpoint
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
    state["param_groups"][0].update({k: 0.1 for k in SCHEDULER_SET_KEYS})
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


# --- pairing: evidence, ties, the deciding reason ------------------------------------------------


def _sgd(lr=0.1, groups=1):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(groups)]
    return torch.optim.SGD([{"params": [p]} for p in params], lr=lr)


def _run(opt, *scheds, steps=5):
    for _ in range(steps):
        opt.step()
        for s in scheds:
            s.step()


def _load(tmp_path, tree, name="ckpt.pt", **kwargs):
    path = tmp_path / name
    torch.save(tree, path)
    return ckpttool.load(path, **kwargs)


def _pairs(ckpt):
    return {s.location: (s.optimizer, s.pairing) for s in ckpt.schedulers}


def test_last_lr_beats_a_lightning_position(tmp_path):
    """Lightning lists the one scheduler first although it drives the second optimizer."""
    gen, disc = _sgd(0.2), _sgd(0.1)
    sched = L.StepLR(disc, step_size=2)
    _run(gen)
    _run(disc, sched)
    ckpt = _load(tmp_path, {"pytorch-lightning_version": "2.4.0", "optimizer_states": [
        gen.state_dict(), disc.state_dict()], "lr_schedulers": [sched.state_dict()]})
    assert _pairs(ckpt) == {"lr_schedulers/0": ("optimizer_states/1", "_last_lr = group lrs")}
    assert [f for f in ckpt.findings if f.severity != "info"] == []


def test_an_optimizer_without_initial_lr_was_never_scheduled(tmp_path):
    a, b = _sgd(0.1), _sgd(0.1)
    sched = L.StepLR(b, step_size=2)
    _run(b, sched, steps=0)  # same lr in both: only initial_lr tells them apart
    ckpt = _load(tmp_path, {"a": a.state_dict(), "b": b.state_dict(),
                            "lr_sched": sched.state_dict()})
    assert _pairs(ckpt)["lr_sched"] == ("b", "base_lrs = initial_lr")


def test_a_name_match_with_another_group_count_is_not_a_pairing(tmp_path):
    gen, disc = _sgd(0.1, groups=2), _sgd(0.1)
    sched = L.StepLR(gen, step_size=2)
    _run(gen, sched)
    state = sched.state_dict()
    state["base_lrs"], state["_last_lr"] = state["base_lrs"][:1], state["_last_lr"][:1]
    ckpt = _load(tmp_path, {"opt_g": gen.state_dict(), "opt_d": disc.state_dict(),
                            "sched_g": state})
    assert _pairs(ckpt)["sched_g"][0] is None
    assert "unpaired-scheduler" in {f.code for f in ckpt.findings}


def test_key_names_decide_when_the_lrs_do_not(tmp_path):
    gen, disc = _sgd(0.1), _sgd(0.1)
    sg, sd = L.StepLR(gen, step_size=2), L.StepLR(disc, step_size=2)
    _run(gen, sg)
    _run(disc, sd)
    ckpt = _load(tmp_path, {"opt_d": disc.state_dict(), "opt_g": gen.state_dict(),
                            "sched_g": sg.state_dict(), "sched_d": sd.state_dict()})
    assert _pairs(ckpt) == {"sched_g": ("opt_g", "key names"), "sched_d": ("opt_d", "key names")}


def test_a_tie_is_ambiguous_and_guesses_nothing(tmp_path, run_cli):
    """Two optimizers with the same state, one scheduler, names that say nothing: no pairing,
    and no lr findings on a guess."""
    a, b = _sgd(0.1), _sgd(0.1)
    sa, sb = L.StepLR(a, step_size=2), L.StepLR(b, step_size=2)
    _run(a, sa)
    _run(b, sb)
    state = sb.state_dict()
    state["_last_lr"] = [0.5]  # matches neither, and would be an lr-mismatch with either
    tree = {"optimizers": {"x": a.state_dict(), "y": b.state_dict()}, "schedulers": [state]}
    ckpt = _load(tmp_path, tree)
    assert _pairs(ckpt) == {"schedulers/0": (None, "ambiguous: optimizers/x or optimizers/y")}
    assert {f.code for f in ckpt.findings if f.severity != "info"} == {"ambiguous-pairing"}
    doc = json.loads(run_cli("show", "--json", tmp_path / "ckpt.pt").stdout)
    assert doc["schedulers"][0]["optimizer"] is None
    assert doc["schedulers"][0]["pairing"] == "ambiguous: optimizers/x or optimizers/y"
    text = run_cli("show", "--verify", tmp_path / "ckpt.pt").stdout
    assert "drives ? (ambiguous: optimizers/x or optimizers/y)" in text
    assert "verify: not replayable: the file does not say which optimizer" in text


# --- several schedulers stepping one optimizer (torch's chaining) --------------------------------


def _chained(tmp_path, edit=None):
    opt = _sgd(0.1)
    s1 = L.ExponentialLR(opt, gamma=0.9)
    s2 = L.MultiStepLR(opt, milestones=[2, 4], gamma=0.1)
    _run(opt, s1, s2, steps=4)
    tree = {"optimizer": opt.state_dict(), "scheduler1": s1.state_dict(),
            "scheduler2": s2.state_dict()}
    if edit:
        edit(tree)
    return _load(tmp_path, tree, verify=True)


def test_chained_schedulers_are_consistent_and_replay_together(tmp_path):
    ckpt = _chained(tmp_path)
    assert [f for f in ckpt.findings if f.severity != "info"] == []
    assert [s.verify.identical for s in ckpt.schedulers] == [True, True]


def test_chained_schedulers_lr_mismatch_only_when_none_matches(tmp_path):
    def edit(tree):
        tree["optimizer"]["param_groups"][0]["lr"] = 0.123

    ckpt = _chained(tmp_path, edit)
    [finding] = [f for f in ckpt.findings if f.code == "lr-mismatch"]
    assert "scheduler2 _last_lr" in finding.message and "nor the _last_lr of scheduler1" in (
        finding.message)
    # The replay compares the groups once, with the scheduler that wrote them last.
    assert [s.verify.identical for s in ckpt.schedulers] == [True, False]
    assert "param_groups[0].lr: stored 0.123" in ckpt.schedulers[1].verify.first_difference


def test_chained_schedulers_at_different_steps_are_not_replayed(tmp_path):
    def edit(tree):
        tree["scheduler2"]["last_epoch"] = 3

    ckpt = _chained(tmp_path, edit)
    assert [s.verify.identical for s in ckpt.schedulers] == [None, None]
    assert "different steps (4, 3)" in ckpt.schedulers[0].verify.reason
    assert "verify-mismatch" not in {f.code for f in ckpt.findings}


# --- optimizer classes of other libraries --------------------------------------------------------


def _foreign(**extra):
    step = {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}
    group = {"params": [0], "lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    return {"state": {0: step}, "param_groups": [{**group, **extra}]}


@pytest.mark.parametrize("extra", [{"bias_correction": True},  # apex / DeepSpeed FusedAdam
                                   {"correct_bias": True},  # transformers.AdamW
                                   {"bias_correction": True, "amsgrad": False}])
def test_other_libraries_adam_is_unknown_not_radam(extra):
    found = identify_optimizer(_foreign(**extra))
    assert found.name == "unknown" and found.candidates
    assert set(found.extra_keys) == set(extra) - {"amsgrad"}


def test_radam_needs_its_flag_and_adamax_its_state():
    assert identify_optimizer(_real_state("RAdam")).name == "RAdam"
    assert identify_optimizer(_real_state("Adamax")).name == "Adamax"
    flagless = _real_state("RAdam")
    del flagless["param_groups"][0]["decoupled_weight_decay"]
    assert identify_optimizer(flagless) == identify_optimizer(_foreign())
    assert identify_optimizer(flagless).candidates == ("Adamax", "RAdam")


def test_unknown_optimizer_finding_names_the_foreign_keys(tmp_path):
    ckpt = _load(tmp_path, {"optimizer": _foreign(bias_correction=True)})
    [finding] = [f for f in ckpt.findings if f.code == "unknown-optimizer"]
    assert "plus bias_correction" in finding.message


# --- composite schedulers ----------------------------------------------------------------------


def _sequential(tmp_path, edit=None, second=None):
    opt = _sgd(0.1, groups=2)
    warm = L.LinearLR(opt, start_factor=0.1, total_iters=3)
    rest = second(opt) if second else L.CosineAnnealingLR(opt, T_max=10)
    sched = L.SequentialLR(opt, [warm, rest], milestones=[3])
    _run(opt, sched)
    tree = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    if edit:
        edit(tree)
    return _load(tmp_path, tree)


def test_composite_initial_lr_is_checked_against_its_first_scheduler(tmp_path):
    assert [f for f in _sequential(tmp_path).findings if f.severity != "info"] == []

    def edit(tree):
        tree["optimizer"]["param_groups"][1]["initial_lr"] = 0.5

    [finding] = [f for f in _sequential(tmp_path, edit).findings if f.severity == "error"]
    assert finding.code == "initial-lr-mismatch" and "group 1 initial_lr 0.5" in finding.message

    def drop(tree):
        del tree["optimizer"]["param_groups"][0]["initial_lr"]

    assert "missing-initial-lr" in {f.code for f in _sequential(tmp_path, drop).findings}


def test_composite_with_a_later_onecycle_checks_its_initial_lr(tmp_path):
    """OneCycleLR assigns initial_lr: the groups hold its base_lrs, not the first child's."""
    ckpt = _sequential(tmp_path, second=lambda o: L.OneCycleLR(o, max_lr=1.0, total_steps=20))
    assert [f for f in ckpt.findings if f.severity != "info"] == []


def test_unreadable_sub_schedulers_say_why(tmp_path):
    opt = _sgd(0.1)
    tree = {"optimizer": opt.state_dict(), "scheduler": {
        "_schedulers": [1, "x"], "_milestones": [1], "last_epoch": 1, "_last_lr": [0.1]}}
    sched = _load(tmp_path, tree).schedulers[0]
    assert sched.unrecoverable == ("schedulers[0] (unknown): the state is an int, not a dict",
                                   "schedulers[1] (unknown): the state is a str, not a dict")
    assert [c.cls for c in sched.children] == ["unknown", "unknown"]


# --- odd values never break the report ---------------------------------------------------------


def _stepped(sched_cls=L.StepLR, groups=1, **kwargs):
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]}
                           for _ in range(groups)], lr=0.1, momentum=0.9)
    sched = sched_cls(opt, **(kwargs or {"step_size": 2}))
    _run(opt, sched, steps=3)
    return opt.state_dict(), sched.state_dict()


def _edited(opt=None, sched=None, **kwargs):
    o, s = _stepped(**kwargs)
    if opt:
        opt(o)
    if sched:
        sched(s)
    return {"optimizer": o, "scheduler": s}


# name -> a function building the checkpoint tree (torch.save writes anything)
ODD = {
    "base_lrs shorter than the groups": lambda: _edited(
        groups=2, sched=lambda s: s.update(base_lrs=s["base_lrs"][:1])),
    "CyclicLR mode as a list": lambda: _edited(
        sched_cls=L.CyclicLR, base_lr=0.01, max_lr=0.1, sched=lambda s: s.update(
            mode=["triangular"])),
    "OneCycleLR max_lr beyond floats": lambda: _edited(
        sched_cls=L.OneCycleLR, max_lr=0.1, total_steps=100,
        opt=lambda o: o["param_groups"][0].update(max_lr=10**400, initial_lr=1)),
    "OneCycleLR total_steps beyond floats": lambda: _edited(
        sched_cls=L.OneCycleLR, max_lr=0.1, total_steps=100,
        sched=lambda s: s.update(total_steps=10**400)),
    "OneCycleLR phase end beyond floats": lambda: _edited(
        sched_cls=L.OneCycleLR, max_lr=0.1, total_steps=100,
        sched=lambda s: s["_schedule_phases"][0].update(end_step=10**400)),
    "milestone key that isdigit() but int() refuses": lambda: _edited(
        sched_cls=L.MultiStepLR, milestones=[2], sched=lambda s: s.update(
            milestones=Counter({"²": 1}))),
    "milestone counted 10**12 times": lambda: _edited(
        sched_cls=L.MultiStepLR, milestones=[2], sched=lambda s: s.update(
            milestones=Counter({10: 10**12}))),
    "int too long for str() in a group": lambda: _edited(
        opt=lambda o: o["param_groups"][0].update(weight_decay=10**5000, lr=10**5000)),
    "int too long for str() as a counter": lambda: _edited(
        sched=lambda s: s.update(last_epoch=10**5000, step_size=10**5000)),
    "string lr": lambda: _edited(opt=lambda o: o["param_groups"][0].update(lr="0.1")),
}


@pytest.mark.parametrize("name", sorted(ODD))
def test_odd_states_are_described_not_crashed_on(tmp_path, run_cli, name):
    path = tmp_path / "odd.pt"
    torch.save(ODD[name](), path)
    for args in ([], ["--json"], ["--verify"]):
        result = run_cli("show", *args, path)
        assert result.exit_code == 0, result.stderr
        assert result.stderr == ""
    json.loads(run_cli("show", "--json", "--verify", path).stdout)


def test_odd_values_are_shown_as_what_they_are(tmp_path, run_cli):
    path = tmp_path / "odd.pt"
    torch.save(ODD["string lr"](), path)
    assert "  0      1       '0.1'" in run_cli("show", path).stdout
    torch.save(ODD["int too long for str() in a group"](), path)
    assert "<int of 16610 bits>" in run_cli("show", path).stdout
    doc = json.loads(run_cli("show", "--json", path).stdout)
    assert doc["optimizers"][0]["groups"][0]["lr"] == "<int of 16610 bits>"
    torch.save(ODD["milestone counted 10**12 times"](), path)
    sched = ckpttool.load(path).schedulers[0]
    assert sched.info.missing == ("milestones",) and "at most 10000" in sched.unrecoverable[0]


def test_nan_steps_do_not_hide_the_step(tmp_path):
    opt, sched = _stepped()
    opt["state"] = {0: {"step": torch.tensor(3.0)}, 1: {"step": float("nan")}}
    ckpt = _load(tmp_path, {"optimizer": opt, "scheduler": sched})
    assert ckpt.optimizers[0].step == 3.0


def test_a_huge_replay_is_refused_with_a_reason(tmp_path):
    def edit(s):
        s["last_epoch"] = s["_step_count"] = 2**70

    ckpt = _load(tmp_path, _edited(sched=edit), verify=True)
    verdict = ckpt.schedulers[0].verify
    assert verdict.identical is None and "more than the 100,000,000 steps" in verdict.reason


def test_damaged_tensor_bytes_are_reported_not_hidden(tmp_path):
    """A group lr whose record is gone is an error of the file (exit 2, one line)."""
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=torch.tensor(0.01),
                           capturable=True)
    path = tmp_path / "ok.pt"
    torch.save({"optimizer": opt.state_dict()}, path)
    key = read_checkpoint(path).root["optimizer"]["param_groups"][0]["lr"].storage.key
    damaged = tmp_path / "damaged.pt"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(damaged, "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith(f"/data/{key}"):
                zout.writestr(info, zin.read(info))
    with pytest.raises(InputError, match="missing from the file"):
        ckpttool.load(damaged)


def test_damage_the_replay_trips_over_makes_verify_unavailable(tmp_path):
    """A scheduler tensor the report does not read but the replay does: the report stands."""
    opt, sched = _stepped()
    sched["base_lrs"] = [torch.tensor([0.1, 0.1])]  # not a scalar: the report leaves it be
    path = tmp_path / "ok.pt"
    torch.save({"optimizer": opt, "scheduler": sched}, path)
    ref = read_checkpoint(path).root["scheduler"]["base_lrs"][0]
    damaged = tmp_path / "damaged.pt"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(damaged, "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith(f"/data/{ref.storage.key}"):
                zout.writestr(info, zin.read(info))
    verdict = ckpttool.load(damaged, verify=True).schedulers[0].verify
    assert verdict.identical is None and "missing from the file" in verdict.reason


def test_an_unforeseen_failure_is_a_finding_and_the_rest_stands(tmp_path, monkeypatch):
    from ckpttool import inspection

    def broken(site, values):
        raise TypeError("something no input should do")

    monkeypatch.setattr(inspection, "_describe_optimizer", broken)
    ckpt = ckpttool.load(FIXTURES / "adamw_cosine.pt")
    [finding] = [f for f in ckpt.findings if f.code == "unreadable-state"]
    assert finding.severity == "error" and finding.location == "optimizer"
    assert "TypeError: something no input should do" in finding.message
    assert not ckpt.optimizers and ckpt.schedulers[0].cls == "CosineAnnealingLR"


def test_numpy_scalar_lrs_read_as_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=float(np.logspace(-3, -1, 3)[1]))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    state = opt.state_dict()
    state["param_groups"][0]["lr"] = np.float64(state["param_groups"][0]["lr"])
    path = tmp_path / "np.pt"
    torch.save({"optimizer": state, "scheduler": sched.state_dict()}, path)
    ckpt = ckpttool.load(path)
    lr = ckpt.optimizers[0].groups[0].lr
    assert type(lr) is float and lr == float(state["param_groups"][0]["lr"])
    assert "lr-mismatch" not in {f.code for f in ckpt.findings}


def test_lightning_scheduler_off_the_trainer_step(tmp_path):
    """A Lightning scheduler at neither global_step nor epoch is found; the fixtures are not."""
    import torch

    from ckpttool import load

    assert "lightning-step-mismatch" not in {
        f.code for p in ("layouts/lightning.ckpt", "dirs/lightning/two_optimizers.ckpt")
        for f in load(FIXTURES / p).findings}
    ckpt = torch.load(FIXTURES / "layouts/lightning.ckpt", weights_only=False)
    ckpt["lr_schedulers"][0]["last_epoch"] = 11
    torch.save(ckpt, tmp_path / "off.ckpt")
    (f,) = [f for f in load(tmp_path / "off.ckpt").findings
            if f.code == "lightning-step-mismatch"]
    assert f.location == "lr_schedulers/0" and "global_step is 16" in f.message
