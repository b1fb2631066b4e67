"""ckpttool.schedule: the stand-in optimizer, rebuilding, replaying and verifying with real torch.

The oracle is always a real torch run; hand edits like a user's must be named by verify.
(The property over every class lives in test_schedulers.py, which also runs verify.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as L

from ckpttool.errors import ReplayError
from ckpttool.schedule import (
    VerifyResult,
    build_scheduler,
    materialize,
    replay,
    standin_optimizer,
    verify,
)
from ckpttool.schedulers import SchedulerInfo, identify_scheduler
from ckpttool.serialization import TensorRef, read_checkpoint
from conftest import FIXTURES, ROOT, train_schedule


def sgd(lrs=(0.1, 0.05), momentum=0.9, **kw) -> torch.optim.SGD:
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr}
                            for lr in lrs], lr=lrs[0], momentum=momentum, **kw)


run = train_schedule


def check(opt_class, groups, state) -> VerifyResult:
    return verify(opt_class, groups, state, identify_scheduler(state, groups))


# --- the stand-in optimizer ---------------------------------------------------------------------


def test_standin_takes_base_lrs_and_leaves_scheduler_keys_to_the_scheduler():
    _, groups = run(sgd(), lambda o: L.OneCycleLR(o, [1.0, 0.5], total_steps=50), 20)
    opt = standin_optimizer("SGD", groups)
    assert type(opt) is torch.optim.SGD
    assert [g["lr"] for g in opt.param_groups] == [g["initial_lr"] for g in groups]
    for g in opt.param_groups:
        assert not {"initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum"} & set(g)
    assert opt.defaults["lr"] == groups[0]["initial_lr"]
    assert opt.defaults["momentum"] == groups[0]["momentum"]
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in groups]
    without = [{k: v for k, v in g.items() if k != "initial_lr"} for g in groups]
    assert [g["lr"] for g in standin_optimizer("SGD", without).param_groups] == [
        g["lr"] for g in groups]


def test_standin_defaults_are_group_zero():
    groups = [{"lr": 0.01, "initial_lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-6,
               "weight_decay": 0.1, "params": [0, 1, 2]},
              {"lr": 0.5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
               "params": [3]}]
    opt = standin_optimizer("AdamW", groups)
    assert type(opt) is torch.optim.AdamW
    assert (opt.defaults["lr"], opt.defaults["betas"], opt.defaults["eps"]) == (
        0.02, (0.8, 0.99), 1e-6)
    assert [len(g["params"]) for g in opt.param_groups] == [3, 1]
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("flags", [{"capturable": True}, {"foreach": True}, {"fused": True},
                                   {"differentiable": True}])
def test_standin_accepts_flags_torch_refuses_on_cpu(flags):
    lr = torch.tensor(0.001, dtype=torch.float64)
    group = {"lr": lr, "initial_lr": lr.clone(), "betas": (torch.tensor(0.9), 0.999),
             "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False, "maximize": False,
             "foreach": None, "capturable": False, "differentiable": False, "fused": None,
             "decoupled_weight_decay": False, "params": [0], **flags}
    opt = standin_optimizer("Adam", [group])
    for key, value in flags.items():
        assert opt.param_groups[0][key] is value
    new_lr = opt.param_groups[0]["lr"]
    assert isinstance(new_lr, torch.Tensor) and new_lr.dtype == torch.float64
    assert new_lr is not lr and new_lr is not group["initial_lr"]  # never aliases the input
    sched = L.CosineAnnealingLR(opt, T_max=10)
    replay(sched, 3)
    assert lr.item() == 0.001  # the caller's tensors are untouched


def test_standin_for_classes_torch_lacks_or_refuses():
    groups = [{"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "params": [0, 1]},
              {"lr": 0.2, "momentum": 0.9, "weight_decay": 0.0, "params": [2]}]
    for name in ("Lion", "unknown", "bitsandbytes.optim.AdamW8bit", "LBFGS"):
        opt = standin_optimizer(name, groups)
        assert isinstance(opt, torch.optim.Optimizer)
        assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]
        assert opt.defaults["momentum"] == 0.9
        # a momentum-cycling scheduler finds the momentum key it needs in defaults
        L.CyclicLR(opt, 0.01, 0.1)
    assert type(standin_optimizer("torch.optim.SGD", groups)) is torch.optim.SGD


def test_standin_refuses_unread_tensors():
    ref = TensorRef("float32", (), (), 0, None)
    with pytest.raises(ReplayError, match=r"param_groups\[0\]\.lr is a tensor whose value was "
                                          "not read"):
        standin_optimizer("SGD", [{"lr": ref, "params": [0]}])


# --- build and replay ---------------------------------------------------------------------------


def test_build_scheduler_with_overrides_and_missing_arguments():
    opt = sgd()
    info = identify_scheduler(run(sgd(), lambda o: L.LambdaLR(o, lambda e: 0.9 ** e), 3)[0])
    with pytest.raises(ReplayError, match="lr_lambda.*function or lambda.*Give lr_lambda"):
        build_scheduler(info, opt)
    sched = build_scheduler(info, opt, lr_lambda=lambda e: 0.5 ** e)
    replay(sched, 2)
    assert opt.param_groups[0]["lr"] == 0.1 * 0.25
    with pytest.raises(ReplayError, match="unknown scheduler"):
        build_scheduler(SchedulerInfo("unknown", {}, unrecoverable=("odd keys",)), opt)


def test_build_scheduler_does_not_share_argument_objects():
    info = SchedulerInfo("SequentialLR", {"milestones": [3]}, children=(
        SchedulerInfo("ConstantLR", {"factor": 0.5, "total_iters": 3}),
        SchedulerInfo("ExponentialLR", {"gamma": 0.9})))
    sched = build_scheduler(info, sgd())
    assert sched._milestones == [3] and sched._milestones is not info.args["milestones"]


def test_replay_matches_a_bare_loop_and_reports_progress():
    opt_a, opt_b = sgd(), sgd()
    a, b = L.CosineAnnealingLR(opt_a, 100), L.CosineAnnealingLR(opt_b, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(70_000):
            a.step()
    calls = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # replay itself must not warn
        replay(b, 70_000, progress=lambda done, total: calls.append((done, total)))
    assert a.state_dict() == b.state_dict()
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"]
    assert calls == [(32768, 70_000), (65536, 70_000), (70_000, 70_000)]


def test_replay_refuses_plateau():
    with pytest.raises(ReplayError, match="ReduceLROnPlateau"):
        replay(L.ReduceLROnPlateau(sgd()), 1)


# --- verify: clean runs, hand edits, what cannot be replayed ----------------------------------


def test_verify_clean_runs_are_identical():
    state, groups = run(sgd(), lambda o: L.CosineAnnealingLR(o, T_max=40, eta_min=1e-5), 25)
    result = check("SGD", groups, state)
    assert result == VerifyResult(True, None, None, (), 25,
                                  "CosineAnnealingLR(T_max=40, eta_min=1e-05)")
    assert result.to_dict()["identical"] is True


def test_verify_names_a_group_lr_edited_by_hand():
    state, groups = run(sgd(), lambda o: L.CosineAnnealingLR(o, T_max=40), 25)
    groups[1]["lr"] = 0.0005
    result = check("SGD", groups, state)
    assert result.identical is False
    assert result.first_difference.startswith("optimizer.param_groups[1].lr: stored 0.0005 != "
                                              "replayed ")


def test_verify_names_t_max_edited_in_the_state():
    # The edited state replays with T_max=80 from step 0, so the stored lrs (made with 40) differ.
    state, groups = run(sgd(), lambda o: L.CosineAnnealingLR(o, T_max=40), 25)
    state["T_max"] = 80
    result = check("SGD", groups, state)
    assert result.identical is False
    assert result.first_difference.startswith("scheduler._last_lr[0]: stored ")
    assert "optimizer.param_groups[0].lr" in " ".join(result.differences)


def test_verify_names_base_lrs_edited_without_initial_lr():
    state, groups = run(sgd(), lambda o: L.StepLR(o, 5), 12)
    state["base_lrs"] = [0.2, 0.05]
    assert check("SGD", groups, state).first_difference == (
        "scheduler.base_lrs[0]: stored 0.2 != replayed 0.1")


def test_verify_onecycle_total_steps_edited_alone():
    # Editing only total_steps leaves _schedule_phases at the old length (reference 3c).
    state, groups = run(sgd(), lambda o: L.OneCycleLR(o, 1.0, total_steps=100), 30)
    state["total_steps"] = 200
    result = check("SGD", groups, state)
    assert result.identical is None  # no arguments at all rebuild it: say why, guess nothing
    assert "no pct_start reproduces _schedule_phases exactly" in result.reason
    state["_schedule_phases"][1]["end_step"] = 199  # now it is pct_start=0.15 of 200 steps
    assert check("SGD", groups, state).first_difference.startswith("scheduler._last_lr[0]")


def test_verify_names_a_cycled_momentum():
    state, groups = run(sgd(), lambda o: L.CyclicLR(o, 0.01, 0.1, 10), 7)
    groups[0]["momentum"] = 0.9
    assert check("SGD", groups, state).first_difference.startswith(
        "optimizer.param_groups[0].momentum: stored 0.9 != replayed 0.8")
    state, groups = run(torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))]),
                        lambda o: L.OneCycleLR(o, 0.01, total_steps=20), 7)
    groups[0]["betas"] = (0.95, 0.999)
    assert check("Adam", groups, state).first_difference.startswith(
        "optimizer.param_groups[0].betas[0]: stored 0.95 != replayed ")


def test_verify_restart_after_constructing_on_a_loaded_optimizer():
    # The scheduler built after optimizer.load_state_dict restarts at last_epoch 0 from the
    # loaded lr, keeping the stale initial_lr (reference 3d, D2).
    _, groups = run(sgd(), lambda o: L.CosineAnnealingLR(o, T_max=40), 20)
    opt = sgd()
    opt.load_state_dict({"state": {}, "param_groups": groups})
    state2, groups2 = run(opt, lambda o: L.CosineAnnealingLR(o, T_max=40), 5)
    result = check("SGD", groups2, state2)
    assert result.identical is False and result.first_difference.startswith(
        "scheduler._last_lr[0]")


def test_verify_chained_children_disagreeing():
    state, groups = run(sgd(), lambda o: L.ChainedScheduler(
        [L.ConstantLR(o, 0.5, 5), L.ExponentialLR(o, 0.97)]), 9)
    assert check("SGD", groups, state).identical is True
    state["_schedulers"][1]["last_epoch"] = 4
    assert check("SGD", groups, state).first_difference == (
        "scheduler._schedulers[1].last_epoch: stored 4 != replayed 9")


def test_verify_group_count_mismatch():
    state, _ = run(sgd(), lambda o: L.StepLR(o, 5), 6)
    _, groups = run(sgd(lrs=(0.1,)), lambda o: L.StepLR(o, 5), 6)
    assert check("SGD", groups, state).first_difference.startswith(
        "scheduler.base_lrs: stored 2 items")


def test_verify_onecycle_after_another_scheduler():
    # OneCycleLR assigns initial_lr, so the stand-in must start from the first child's base_lrs.
    state, groups = run(sgd(), lambda o: L.SequentialLR(
        o, [L.LinearLR(o, 0.1, total_iters=5), L.OneCycleLR(o, 1.0, total_steps=50)], [5]), 30)
    assert groups[0]["initial_lr"] == 0.04 and state["_schedulers"][0]["base_lrs"][0] == 0.1
    assert check("SGD", groups, state).identical is True


def test_verify_what_cannot_be_replayed():
    state, groups = run(sgd(), lambda o: L.LambdaLR(o, lambda e: 0.9 ** e), 5)
    result = check("SGD", groups, state)
    assert result.identical is None and "lr_lambda" in result.reason and result.steps is None
    opt = sgd()
    sched = L.ReduceLROnPlateau(opt)
    sched.step(1.0)
    result = check("SGD", opt.state_dict()["param_groups"], sched.state_dict())
    assert result.identical is None and "metric" in result.reason
    # OneCycleLR edited past its end: torch itself refuses to step there
    state, groups = run(sgd(), lambda o: L.OneCycleLR(o, 1.0, total_steps=20), 20)
    state["last_epoch"] = 25
    result = check("SGD", groups, state)
    assert result.identical is None and result.reason.startswith("torch refused to replay")
    # tensors not read from the file
    state, groups = run(sgd(), lambda o: L.StepLR(o, 5), 3)
    state["_last_lr"][0] = TensorRef("float32", (), (), 0, None)
    result = check("SGD", groups, state)
    assert result.identical is None and "not read" in result.reason


def test_verify_tensor_lrs_read_from_a_file():
    """A float32 tensor-lr run saved with torch.save, read safely, materialised, verified."""
    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(3))],
                              "lr": torch.tensor(0.001)}, {"params": [torch.nn.Parameter(
                                  torch.zeros(3))], "lr": torch.tensor(0.002)}], fused=True)
    sched = L.SequentialLR(opt, [L.LinearLR(opt, 0.01, total_iters=10),
                                 L.CosineAnnealingLR(opt, T_max=90, eta_min=1e-6)], [10])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(37):
            opt.step()
            sched.step()
    fd, path = tempfile.mkstemp(suffix=".pt")
    os.close(fd)
    try:
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, path)
        ckpt = read_checkpoint(path)
        stored_groups = ckpt.root["optimizer"]["param_groups"]
        assert isinstance(stored_groups[0]["lr"], TensorRef)
        info = identify_scheduler(ckpt.root["scheduler"], stored_groups)
        tree = materialize(ckpt.root, ckpt)
    finally:
        os.unlink(path)
    lr = tree["optimizer"]["param_groups"][0]["lr"]
    assert lr.dtype == torch.float32 and lr.shape == ()
    result = verify("AdamW", tree["optimizer"]["param_groups"], tree["scheduler"], info)
    assert result.identical is True, result
    # float32 arithmetic is part of the state: a float64 replay is not the same run
    as64 = [{**g, "lr": g["lr"].double(), "initial_lr": g["initial_lr"].double()}
            for g in tree["optimizer"]["param_groups"]]
    assert verify("AdamW", as64, tree["scheduler"], info).identical is False


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True)


def test_the_command_replays_without_importing_torch_dynamo(tmp_path):
    # torch imports torch._dynamo at an optimizer's first add_param_group/state_dict (1.5 s of
    # CPU); the ckpttool process defers it, and a compile afterwards still works.
    code = (
        "import gc, sys\n"
        "sys.argv = ['ckpttool', 'reschedule', sys.argv[1], '-o', sys.argv[2], '--set', "
        "'T_max=80', '--quiet']\n"
        "from ckpttool.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('dynamo', 'torch._dynamo' in sys.modules, 'frozen', gc.get_freeze_count() > 0)\n"
        "import torch\n"
        "opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)\n"
        "opt.load_state_dict(opt.state_dict())\n"
        "print(torch.compile(lambda x: x * 2, backend='eager')(torch.ones(2)).tolist())\n"
        "print('dynamo', 'torch._dynamo' in sys.modules)\n")
    proc = _python(code, str(FIXTURES / "adamw_cosine.pt"), str(tmp_path / "out.pt"))
    assert proc.returncode == 0, proc.stderr
    assert "verified" in proc.stdout
    assert proc.stdout.splitlines()[-3:] == ["dynamo False frozen True", "[2.0, 2.0]",
                                             "dynamo True"]


def test_the_library_leaves_torch_as_it_was(tmp_path):
    code = ("import sys, ckpttool, torch\n"
            "ckpttool.reschedule(sys.argv[1], sets=['T_max=80']).save(sys.argv[2])\n"
            "fn = torch.optim.Optimizer.state_dict.__wrapped__\n"
            "print('torch._dynamo' in sys.modules, getattr(fn, '__dynamo_disable', None) is None"
            " or fn.__dynamo_disable.__module__.startswith('torch'))\n")
    proc = _python(code, str(FIXTURES / "adamw_cosine.pt"), str(tmp_path / "out.pt"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"]
