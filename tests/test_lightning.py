"""Lightning checkpoints with several optimizers: the optimizer <-> scheduler pairing is not
stored, ckpttool infers it, shows where it cannot, and `reschedule --scheduler-state LOCATION`
(with `--optimizer LOCATION`) lets the user say it.

The checkpoints come from a real Lightning Trainer run here (as fixtures/make_fixtures.py makes
dirs/lightning/two_optimizers.ckpt). The oracle for the rewritten one is Lightning itself: the
Trainer resumes from it with `ckpt_path=` and must step with the lrs of a plain torch run that
used the new schedule from step 0, bit for bit.
"""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim import lr_scheduler as lrs

import ckpttool
from ckpttool.errors import EXIT_ERROR, EXIT_OK, StateError
from conftest import FIXTURES

L = pytest.importorskip("lightning")

BATCHES = 4  # per epoch
X = torch.randn(4 * BATCHES, 4, generator=torch.Generator().manual_seed(0))
Y = torch.randn(4 * BATCHES, 2, generator=torch.Generator().manual_seed(1))
BODY, AUX, HEAD = "optimizer_states/0", "optimizer_states/1", "optimizer_states/2"
BODY_SCHED, HEAD_SCHED = "lr_schedulers/0", "lr_schedulers/1"


class ThreeOptimizers(L.LightningModule):
    """`body` (AdamW, 1e-3) under StepLR(step_size=2) stepped every epoch; `aux` (SGD, two
    groups, constant lrs: no scheduler) ; `head` (AdamW, 1e-3) under StepLR(step_size=head_step)
    stepped every batch. After 2 epochs of 4 batches both StepLRs are at lr 5e-4 from base 1e-3,
    so their lrs fit body and head alike: the lists' positions pair lr_schedulers/0 with body,
    and lr_schedulers/1 (whose position partner, aux, was never scheduled) with neither."""

    def __init__(self, head_step: int = 8) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.body = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        self.aux = nn.Linear(2, 2)
        self.head = nn.Linear(2, 2)
        self.head_step = head_step
        self.used: list[tuple[float, float]] = []  # (body lr, head lr) each batch stepped with

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizers = self.optimizers()
        loss = F.mse_loss(self.head(self.aux(self.body(x))), y)
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in optimizers:
            opt.step()
        self.used.append((optimizers[0].param_groups[0]["lr"],
                          optimizers[2].param_groups[0]["lr"]))
        self.lr_schedulers()[1].step()  # interval "step"
        return loss

    def on_train_epoch_end(self):
        self.lr_schedulers()[0].step()  # interval "epoch"

    def configure_optimizers(self):
        body = torch.optim.AdamW(self.body.parameters(), lr=1e-3)
        aux = torch.optim.SGD([{"params": [self.aux.weight]},
                               {"params": [self.aux.bias], "lr": 1e-3}], lr=1e-2)
        head = torch.optim.AdamW(self.head.parameters(), lr=1e-3)
        return [body, aux, head], [
            {"scheduler": lrs.StepLR(body, step_size=2, gamma=0.5), "interval": "epoch"},
            {"scheduler": lrs.StepLR(head, step_size=self.head_step, gamma=0.5),
             "interval": "step"}]


def _fit(module, epochs: int, ckpt_path=None):
    """A real Trainer (CPU, no logger, no checkpoint callback) fitting ``module``."""
    from torch.utils.data import DataLoader, TensorDataset

    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(TensorDataset(X, Y), batch_size=4), ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module", autouse=True)
def _quiet_lightning():
    logger = logging.getLogger("lightning")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """The checkpoint of ThreeOptimizers after 2 epochs."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lightning") / "three.ckpt"
    _fit(ThreeOptimizers(), 2).save_checkpoint(path)
    return path


def _torch_lrs(make, steps: int, per_epoch: bool = False) -> list[float]:
    """The lr each of ``steps`` batches steps with, for a plain torch optimizer under
    ``make(opt)``, stepped every batch or every epoch."""
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = make(opt)
    used = []
    for i in range(steps):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        if not per_epoch or (i + 1) % BATCHES == 0:
            sched.step()
    return used


# --- the pairing, as show says it ------------------------------------------------------------


def test_show_lists_the_states_and_the_ambiguity(three, run_cli):
    doc = json.loads(run_cli("show", three, "--json").stdout)
    assert [o["location"] for o in doc["optimizers"]] == [BODY, AUX, HEAD]
    pairs = {s["location"]: (s["optimizer"], s["pairing"]) for s in doc["schedulers"]}
    assert pairs == {BODY_SCHED: (BODY, "list position"),
                     HEAD_SCHED: (None, f"ambiguous: {BODY} or {HEAD}")}
    assert "ambiguous-pairing" in {f["code"] for f in doc["findings"]}


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", [HEAD, BODY])
def test_an_ambiguous_pairing_is_refused_naming_scheduler_state(three, run_cli, tmp_path,
                                                                optimizer):
    result = run_cli("reschedule", three, "-o", tmp_path / "out.ckpt", "--optimizer", optimizer,
                     "--set", "step_size=4")
    assert result.exit_code == EXIT_ERROR and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert "will not guess" in line and "--scheduler-state LOCATION" in line
    assert f"lr_schedulers/1 could drive {BODY} or {HEAD}" in line
    # the candidates named for the optimizer asked about
    assert line.endswith(f"({BODY_SCHED}, {HEAD_SCHED})" if optimizer == BODY
                         else f"({HEAD_SCHED})")
    assert list(tmp_path.iterdir()) == []


def test_plot_refuses_the_same_way_and_takes_the_choice(three, run_cli):
    refused = run_cli("plot", three, "--optimizer", HEAD)
    assert refused.exit_code == EXIT_ERROR and "--scheduler-state LOCATION" in refused.stderr
    doc = json.loads(run_cli("plot", three, "--optimizer", HEAD, "--scheduler-state", HEAD_SCHED,
                             "--json").stdout)
    assert (doc["optimizer"], doc["scheduler"], doc["step"]) == (HEAD, HEAD_SCHED, 8)
    assert doc["old"]["call"] == "StepLR(step_size=8, gamma=0.5)"
    stepped = _torch_lrs(lambda o: lrs.StepLR(o, step_size=8, gamma=0.5), doc["horizon"] + 1)
    assert doc["old"]["steps"] == list(range(doc["horizon"] + 1))
    assert doc["old"]["groups"][0]["lr"] == stepped  # the head's stored schedule, not body's
    new = json.loads(run_cli("plot", three, "--optimizer", HEAD, "--scheduler-state", HEAD_SCHED,
                             "--set", "step_size=4", "--json").stdout)
    assert new["new"]["call"] == "StepLR(step_size=4, gamma=0.5)" and new["resume"] == 8


def test_a_scheduler_state_alone_needs_the_optimizer_when_it_is_ambiguous(three):
    with pytest.raises(StateError, match=r"--scheduler-state lr_schedulers/1 is paired with no "
                                         r"optimizer .*say which one it drives with --optimizer"):
        ckpttool.reschedule(three, scheduler_state=HEAD_SCHED, sets=["step_size=4"])
    # a paired one brings its optimizer
    plan = ckpttool.reschedule(three, scheduler_state=BODY_SCHED, sets=["step_size=3"])
    assert (plan.optimizer, plan.scheduler, plan.steps) == (BODY, BODY_SCHED, 2)
    assert plan.notes[0] == (f"{HEAD_SCHED} is also paired (or may be) with {BODY}; left as "
                             "stored")


def test_a_scheduler_state_of_another_group_count_is_refused(three, run_cli, tmp_path):
    """aux has two groups, the head's StepLR one lr: it cannot be aux's scheduler."""
    result = run_cli("reschedule", three, "-o", tmp_path / "out.ckpt", "--optimizer", AUX,
                     "--scheduler-state", HEAD_SCHED, "--scale-lr", "0.5")
    assert result.exit_code == EXIT_ERROR
    assert result.stderr.strip() == (
        f"ckpttool: error: {three}: --scheduler-state {HEAD_SCHED} holds lrs for 1 param group "
        f"and {AUX} has 2: it cannot drive it; choose the scheduler state of {AUX} (`ckpttool "
        "show` lists which drives which)")
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_scheduler_state_lists_the_locations(three):
    with pytest.raises(StateError, match=r"no scheduler state at --scheduler-state "
                                         r"'lr_schedulers/2'; scheduler states: lr_schedulers/0, "
                                         r"lr_schedulers/1$"):
        ckpttool.reschedule(three, optimizer=HEAD, scheduler_state="lr_schedulers/2")


# --- the choice, written and resumed ---------------------------------------------------------


def test_the_chosen_pairing_is_written_and_lightning_resumes_on_it(three, run_cli, tmp_path):
    out = tmp_path / "head4.ckpt"
    result = run_cli("reschedule", three, "-o", out, "--optimizer", HEAD, "--scheduler-state",
                     HEAD_SCHED, "--set", "step_size=4")
    assert result.exit_code == EXIT_OK, result.stderr
    assert f"[{HEAD}]" in result.stdout and f"[{HEAD_SCHED}] StepLR(step_size=8" in result.stdout
    assert (f"note: {HEAD_SCHED} was not paired (ambiguous: {BODY} or {HEAD}); rescheduled as "
            f"the scheduler of {HEAD}, as --scheduler-state chose") in result.stdout
    assert "verified: a fresh optimizer and scheduler loaded from" in result.stdout

    before, after = (torch.load(p, weights_only=True) for p in (three, out))
    assert after["lr_schedulers"][1]["step_size"] == 4
    assert after["optimizer_states"][2]["param_groups"][0]["lr"] == 2.5e-4  # 1e-3 * 0.5 ** 2
    assert after["lr_schedulers"][0] == before["lr_schedulers"][0]
    for i in (0, 1):  # the other optimizers, moments included, are the input's
        for name, state in before["optimizer_states"][i]["state"].items():
            for k, v in state.items():
                assert torch.equal(after["optimizer_states"][i]["state"][name][k], v)
        assert after["optimizer_states"][i]["param_groups"] == \
            before["optimizer_states"][i]["param_groups"]

    # Lightning resumes: each batch steps with the lrs a run of the new schedule had there.
    torch.manual_seed(0)
    resumed = ThreeOptimizers(head_step=4)
    _fit(resumed, 4, ckpt_path=out)
    head = _torch_lrs(lambda o: lrs.StepLR(o, step_size=4, gamma=0.5), 4 * BATCHES)
    body = _torch_lrs(lambda o: lrs.StepLR(o, step_size=2, gamma=0.5), 4 * BATCHES,
                      per_epoch=True)
    assert resumed.used == list(zip(body, head))[2 * BATCHES:]


def test_several_schedulers_paired_with_one_optimizer_need_a_choice(tmp_path):
    """Two schedulers whose lrs fit the one optimizer: which to rewrite is the user's call."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    warm = lrs.LinearLR(opt, start_factor=0.5, total_iters=4)
    decay = lrs.StepLR(opt, step_size=3, gamma=0.5)
    for _ in range(2):
        opt.step()
        warm.step()
        decay.step()
    path = tmp_path / "chained.ckpt"
    torch.save({"pytorch-lightning_version": "2.6.6", "global_step": 2, "epoch": 0,
                "optimizer_states": [opt.state_dict()],
                "lr_schedulers": [warm.state_dict(), decay.state_dict()]}, path)
    with pytest.raises(StateError, match=r"several schedulers are paired with "
                                         r"optimizer_states/0 \(lr_schedulers/0, lr_schedulers/1\); "
                                         r"choose the one to rewrite with --scheduler-state"):
        ckpttool.reschedule(path, scale_lr=0.5)
    plan = ckpttool.reschedule(path, scheduler_state="lr_schedulers/1", sets=["step_size=4"])
    assert plan.scheduler == "lr_schedulers/1"
    assert plan.notes == (("lr_schedulers/0 is also paired (or may be) with optimizer_states/0; "
                           "left as stored"),)


# --- lightning-step-mismatch -------------------------------------------------------------------


class OneOptimizer(L.LightningModule):
    """Automatic optimization, AdamW under CosineAnnealingLR stepped every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        return {"optimizer": opt, "lr_scheduler": {
            "scheduler": lrs.CosineAnnealingLR(opt, T_max=20), "interval": "step"}}


def test_lightning_step_mismatch_is_found_and_reschedule_step_fixes_it(tmp_path, run_cli):
    torch.manual_seed(0)
    path = tmp_path / "one.ckpt"
    _fit(OneOptimizer(), 2).save_checkpoint(path)
    codes = {f.code for f in ckpttool.load(path).findings}
    assert "lightning-step-mismatch" not in codes  # the Trainer's own file is consistent

    ckpt = torch.load(path, weights_only=True)
    assert ckpt["global_step"] == 2 * BATCHES == ckpt["lr_schedulers"][0]["last_epoch"]
    ckpt["lr_schedulers"][0]["last_epoch"] = 5  # a scheduler state from elsewhere
    torch.save(ckpt, tmp_path / "off.ckpt")
    (finding,) = [f for f in ckpttool.load(tmp_path / "off.ckpt").findings
                  if f.code == "lightning-step-mismatch"]
    assert finding.location == "lr_schedulers/0" and "global_step is 8" in finding.message

    result = run_cli("reschedule", tmp_path / "off.ckpt", "-o", tmp_path / "fixed.ckpt",
                     "--step", "8")
    assert result.exit_code == EXIT_OK and "verified" in result.stdout
    fixed = ckpttool.load(tmp_path / "fixed.ckpt")
    assert "lightning-step-mismatch" not in {f.code for f in fixed.findings}
    assert fixed.schedulers[0].last_epoch == 8


def test_no_step_finding_with_several_optimizers(three):
    """global_step counts every optimizer's steps (3 per batch here), so a step-interval
    scheduler at the batch count is not flagged against it."""
    ckpt = ckpttool.load(three)
    assert torch.load(three, weights_only=True)["global_step"] == 3 * 2 * BATCHES
    assert ckpt.schedulers[1].last_epoch == 2 * BATCHES
    assert "lightning-step-mismatch" not in {f.code for f in ckpt.findings}


@pytest.mark.parametrize("source", ["three", "two_optimizers"])
def test_with_several_optimizers_the_step_is_checked_against_the_batches(three, tmp_path,
                                                                        source):
    """Manual optimization: the loop's _batches_that_stepped is the count a scheduler stepped
    every batch is at (the fixture's, and the one trained here); another position is found."""
    path = three if source == "three" else FIXTURES / "dirs/lightning/two_optimizers.ckpt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"] == 8
    at = 1 if source == "three" else 0  # the step-interval scheduler
    assert ckpt["lr_schedulers"][at]["last_epoch"] == 8
    ckpt["lr_schedulers"][at]["last_epoch"] = 5  # a scheduler state from elsewhere
    torch.save(ckpt, tmp_path / "off.ckpt")
    found = [f for f in ckpttool.load(tmp_path / "off.ckpt").findings
             if f.code == "lightning-step-mismatch"]
    assert [f.location for f in found] == [f"lr_schedulers/{at}"]
    assert "the loop stepped 8 batches (global_step" in found[0].message


def test_an_ambiguous_pairing_says_which_options_choose_it(three):
    (finding,) = [f for f in ckpttool.load(three).findings if f.code == "ambiguous-pairing"]
    assert f"--scheduler-state {HEAD_SCHED} --optimizer LOCATION" in finding.hint
