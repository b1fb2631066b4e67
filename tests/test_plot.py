"""ckpttool plot: the curves are real torch stepping, the PNG is a real picture, the sparklines
and JSON say the same, and matplotlib stays optional."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

import ckpttool
from ckpttool import plot
from ckpttool.errors import EXIT_ERROR, EXIT_OK
from conftest import ROOT, train_schedule

L = torch.optim.lr_scheduler
COSINE = "fixtures/adamw_cosine.pt"
ONECYCLE = "fixtures/schedulers/OneCycleLR.pt"


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _sgd(lrs=(0.1, 0.05), momentum=0.9):
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr}
                            for lr in lrs], momentum=momentum)


def _adam(lrs=(0.01, 0.005)):
    return torch.optim.Adam([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr}
                             for lr in lrs])


# (name, optimizer factory, scheduler factory, steps trained, horizon, caption words)
SCHEDULES = [
    ("cosine", _sgd, lambda o: L.CosineAnnealingLR(o, T_max=30, eta_min=1e-5), 10, 30, "T_max"),
    ("onecycle", _adam, lambda o: L.OneCycleLR(o, max_lr=[0.01, 0.005], total_steps=25), 7, 24,
     "total_steps=25"),
    ("cyclic", _sgd, lambda o: L.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=4,
                                          step_size_down=6), 12, 30, "3 cycles"),
    ("sequential", _sgd, lambda o: L.SequentialLR(o, [L.LinearLR(o, start_factor=0.1,
                                                                 total_iters=5),
                                                      L.CosineAnnealingLR(o, T_max=20)], [5]),
     8, 25, "last milestone"),
    ("step-twice", _sgd, lambda o: L.StepLR(o, step_size=3), 10, 20, "twice the current step"),
    ("step-periods", _sgd, lambda o: L.StepLR(o, step_size=10), 2, 40, "4 x step_size"),
    ("multistep", _sgd, lambda o: L.MultiStepLR(o, milestones=[5, 20]), 3, 24, "milestone"),
    ("exponential", _sgd, lambda o: L.ExponentialLR(o, gamma=0.95), 10, 100, "100 steps"),
    ("polynomial", _sgd, lambda o: L.PolynomialLR(o, total_iters=12, power=2.0), 4, 12,
     "total_iters"),
    ("warm-restarts", _sgd, lambda o: L.CosineAnnealingWarmRestarts(o, T_0=4, T_mult=2), 7, 28,
     "3 periods"),
    ("chained", _sgd, lambda o: L.ChainedScheduler([L.ConstantLR(o, factor=0.5, total_iters=3),
                                                    L.LinearLR(o, total_iters=8)]), 2, 8,
     "total_iters"),
]


def _save(tmp_path, make_opt, make_sched, steps, name="ckpt.pt"):
    state, groups = train_schedule(make_opt(), make_sched, steps)
    path = tmp_path / name
    torch.save({"optimizer": {"state": {}, "param_groups": groups}, "scheduler": state}, path)
    return path


def _oracle(make_opt, make_sched, horizon):
    """Each group's (lr, momentum or beta1) after every step 0..horizon, by real torch stepping."""
    opt = make_opt()
    sched = make_sched(opt)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(horizon + 1):
            if step:
                opt.step()
                sched.step()
            out.append([(g["lr"], g["betas"][0] if "betas" in g else g["momentum"])
                        for g in opt.param_groups])
    return out


@pytest.mark.parametrize("name, make_opt, make_sched, trained, horizon, why", SCHEDULES,
                         ids=[s[0] for s in SCHEDULES])
def test_series_is_real_torch_stepping(tmp_path, name, make_opt, make_sched, trained, horizon,
                                       why):
    series = ckpttool.plot_series(_save(tmp_path, make_opt, make_sched, trained))
    assert (series.step, series.horizon, series.resume, series.new) == (trained, horizon, None,
                                                                        None)
    assert series.caption.startswith(f"steps 0 to {horizon}: ") and why in series.caption
    assert series.old.steps == tuple(range(horizon + 1))
    expected = _oracle(make_opt, make_sched, horizon)
    assert [list(x) for x in zip(*series.old.lrs)] == [[lr for lr, _ in e] for e in expected]
    cycled = name in ("onecycle", "cyclic")
    assert series.momentum_key == ({"onecycle": "beta1", "cyclic": "momentum"}.get(name))
    if cycled:
        assert [list(x) for x in zip(*series.old.momentum)] == [[m for _, m in e]
                                                                for e in expected]


def test_the_stored_curve_passes_through_the_stored_lr():
    series = ckpttool.plot_series(COSINE)
    ckpt = ckpttool.load(COSINE)
    at = series.old.steps.index(series.step)
    assert [lrs[at] for lrs in series.old.lrs] == [g.lr for g in ckpt.optimizers[0].groups]


def test_a_long_horizon_is_thinned_but_every_step_computed(tmp_path):
    make_sched = lambda o: L.CosineAnnealingLR(o, T_max=30_001)
    series = ckpttool.plot_series(_save(tmp_path, _sgd, make_sched, 1234))
    steps = series.old.steps
    assert steps[0] == 0 and steps[-1] == 30_001 and 1234 in steps
    assert len(steps) <= plot.MAX_POINTS + 2 and steps == tuple(sorted(set(steps)))
    expected = _oracle(_sgd, make_sched, 30_001)
    assert [lrs for lrs in zip(*series.old.lrs)] == [tuple(expected[s][i][0] for i in range(2))
                                                     for s in steps]


def test_steps_wins_and_torch_ends_onecycle():
    series = ckpttool.plot_series(ONECYCLE, steps=40)
    assert series.horizon == 40 and series.caption == "steps 0 to 40 (--steps)"
    # OneCycleLR(total_steps=30) may reach last_epoch 30; torch raises on the 31st step.
    assert series.old.steps[-1] == 30 and "torch raises" in series.old.end
    assert any("ends at step 30" in n for n in series.notes)
    assert ckpttool.plot_series(ONECYCLE, steps=5).old.steps == tuple(range(6))


def test_past_its_end_the_horizon_is_the_current_step():
    series = ckpttool.plot_series("fixtures/findings/onecycle_exhausted.pt")
    assert series.step == series.horizon == 10 and series.old.end is None
    assert "the current step (past the last step of OneCycleLR" in series.caption


def test_new_schedule_is_what_reschedule_plans_and_real_torch_steps():
    series = ckpttool.plot_series(COSINE, sets=["T_max=80"], lr=["1=0.002"])
    assert (series.step, series.resume, series.horizon) == (16, 16, 80)
    assert series.new.call == "CosineAnnealingLR(T_max=80, eta_min=1e-05)"
    assert series.old.steps[-1] == 40  # a cosine stops at its own T_max
    assert series.caption == "steps 0 to 80: T_max of CosineAnnealingLR (the new schedule)"

    def make_opt():
        return torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr}
                                  for lr in (0.001, 0.002)])

    expected = _oracle(make_opt, lambda o: L.CosineAnnealingLR(o, T_max=80, eta_min=1e-5), 80)
    assert [list(x) for x in zip(*series.new.lrs)] == [[lr for lr, _ in e] for e in expected]
    # The same plan as reschedule: the resumed lr of the new curve is what reschedule writes.
    plan = ckpttool.reschedule(COSINE, sets=["T_max=80"], lr=["1=0.002"])
    at = series.new.steps.index(16)
    assert [series.new.lrs[g.index][at] for g in plan.groups] == [
        g.changes["lr"][1] for g in plan.groups]
    assert ckpttool.plan_series(plan).new == series.new


def test_switching_away_from_onecycle_keeps_both_panels():
    series = ckpttool.plot_series(ONECYCLE, scheduler="CosineAnnealingLR(T_max=60)",
                                  lr=["0.002"])
    assert series.momentum_key == "beta1" and series.horizon == 60
    assert len(set(series.new.momentum[0])) == 1  # the new schedule leaves beta1 where it was
    assert any("cycled betas" in n for n in series.notes)


def test_unreplayable_schedules_say_what_to_do(tmp_path):
    from ckpttool.errors import CkptToolError

    with pytest.raises(CkptToolError, match="ReduceLROnPlateau"):
        ckpttool.plot_series("fixtures/schedulers/ReduceLROnPlateau.pt")
    with pytest.raises(CkptToolError, match="--scheduler my_sched.py:make"):
        ckpttool.plot_series("fixtures/schedulers/LambdaLR.pt")
    factory = tmp_path / "my_sched.py"
    factory.write_text("import torch\n\ndef make(opt):\n"
                       "    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.9 ** e)\n")
    series = ckpttool.plot_series("fixtures/schedulers/LambdaLR.pt", scheduler=f"{factory}:make")
    assert series.old is None and series.new.steps[-1] == series.horizon == 100
    assert any("stored schedule is not drawn" in n for n in series.notes)


# --- sparklines -----------------------------------------------------------------------------------


def test_sparkline_levels():
    assert plot.sparkline((0, 1, 2, 3, 4, 5, 6, 7), tuple(map(float, range(8))), 8, 7, 0.0,
                          7.0) == "▁▂▃▄▅▆▇█"
    # Two steps per column (their mean), a blank where the curve has ended, flat in the middle.
    assert plot.sparkline((0, 1, 2, 3), (0.0, 0.0, 7.0, 7.0), 4, 7, 0.0, 7.0) == "▁█  "
    assert plot.sparkline((0, 1), (3.0, 3.0), 2, 1, 3.0, 3.0) == "▄▄"


def test_sparkline_report_of_a_known_schedule():
    from ckpttool import render

    assert render.plot_text(ckpttool.plot_series(COSINE), 80) == (
        "fixtures/adamw_cosine.pt  [optimizer]  steps 0 to 40: T_max of CosineAnnealingLR\n"
        "  stored: CosineAnnealingLR(T_max=40, eta_min=1e-05)\n"
        "\n"
        "  lr  groups 0, 1  ███████▇▇▇▇▇▇▆▆▆▆▅▅▅▄▄▄▄▃▃▃▃▂▂▂▂▂▂▁▁▁▁▁▁▁  1e-05 .. 0.001\n"
        "                                   ^ current step 16\n")


@pytest.mark.parametrize("width", [60, 100, 200])
def test_sparklines_fit_the_width_and_mark_the_step(width):
    from ckpttool import render

    series = ckpttool.plot_series(ONECYCLE, steps=2000)
    lines = render.plot_text(series, width).splitlines()
    rows = [line for line in lines if any(c in line for c in plot.SPARK_LEVELS)]
    assert len(rows) == 3  # lr of groups 0 and 1, beta1 of both
    [marker] = [line for line in lines if "^" in line]
    assert all(len(line) <= width for line in rows + [marker])
    spark_start = rows[0].index(next(c for c in rows[0] if c in plot.SPARK_LEVELS))
    columns = len(rows[0].rstrip().rsplit("  ", 1)[0]) - spark_start
    caret = marker.index("^") - spark_start
    first, stop = plot.column_steps(caret, columns, series.horizon)
    assert first <= series.step < stop


# --- the PNG ----------------------------------------------------------------------------------


def _image(path):
    import matplotlib.image

    return matplotlib.image.imread(path)


@pytest.mark.parametrize("source, kwargs, figsize", [
    (COSINE, {}, plot.FIGSIZE),
    (ONECYCLE, {}, plot.FIGSIZE_TWO_PANELS),
    (COSINE, {"sets": ["T_max=80"], "lr": ["1=0.002"]}, plot.FIGSIZE),
])
def test_png_decodes_with_the_expected_size_and_is_not_blank(tmp_path, source, kwargs, figsize):
    out = tmp_path / "lr.png"
    assert ckpttool.draw_png(ckpttool.plot_series(source, **kwargs), out) == str(out)
    image = _image(out)
    assert image.shape[:2] == (round(figsize[1] * plot.DPI), round(figsize[0] * plot.DPI))
    gray = image[..., :3].mean(axis=2)
    assert gray.std() > 0.05 and (gray < 0.9).mean() > 0.01


def test_png_of_a_change_shows_the_new_curve(tmp_path):
    same, changed = tmp_path / "same.png", tmp_path / "changed.png"
    ckpttool.draw_png(ckpttool.plot_series(COSINE), same)
    series = ckpttool.plot_series(COSINE, scale_lr=0.5)
    assert series.new.lrs != series.old.lrs
    ckpttool.draw_png(series, changed)
    assert (_image(same) != _image(changed)).any()


def test_other_formats_by_suffix_and_unknown_refused(tmp_path):
    from ckpttool.errors import CkptToolError

    series = ckpttool.plot_series(COSINE)
    ckpttool.draw_png(series, tmp_path / "lr.svg")
    assert (tmp_path / "lr.svg").read_text().lstrip().startswith("<?xml")
    with pytest.raises(CkptToolError, match="cannot write .xyz"):
        ckpttool.draw_png(series, tmp_path / "lr.xyz")


# --- the command line -----------------------------------------------------------------------------


def test_plot_prints_sparklines_without_output(run_cli):
    result = run_cli("plot", COSINE)
    assert result.exit_code == EXIT_OK and result.stderr == ""
    assert "groups 0, 1  ███" in result.stdout and "^ current step 16" in result.stdout


def test_plot_writes_a_png(run_cli, tmp_path):
    out = tmp_path / "lr.png"
    result = run_cli("plot", ONECYCLE, "-o", out)
    assert result.exit_code == EXIT_OK, result.stderr
    assert result.stdout == "" and result.stderr == f"ckpttool: wrote {out}\n"
    assert _image(out).shape[:2] == (680, 1000)


def test_plot_json_schema(run_cli):
    result = run_cli("plot", "--json", COSINE, "--set", "T_max=80", "--steps", "90")
    assert result.exit_code == EXIT_OK
    doc = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(c))
    assert set(doc) == {"schema", "path", "optimizer", "scheduler", "step", "resume", "horizon",
                        "caption", "momentum_key", "old", "new", "notes", "logged",
                        "logged_check"}
    assert (doc["schema"], doc["step"], doc["resume"], doc["horizon"]) == ("ckpttool.plot/1", 16,
                                                                          16, 90)
    assert (doc["logged"], doc["logged_check"]) == ([], None)  # no HF log in a plain file
    series = ckpttool.plot_series(COSINE, sets=["T_max=80"], steps=90)
    for name, curve in (("old", series.old), ("new", series.new)):
        part = doc[name]
        assert set(part) == {"call", "steps", "groups", "end"}
        assert part["steps"] == list(curve.steps) == list(range(91))
        assert [g["index"] for g in part["groups"]] == [0, 1]
        assert [g["lr"] for g in part["groups"]] == [list(v) for v in curve.lrs]  # exact
        assert all(g["momentum"] is None for g in part["groups"])
    assert doc["old"]["call"] == "CosineAnnealingLR(T_max=40, eta_min=1e-05)"
    assert doc["momentum_key"] is None
    onecycle = json.loads(run_cli("plot", "--json", ONECYCLE).stdout)
    assert onecycle["new"] is None and onecycle["momentum_key"] == "beta1"
    assert len(onecycle["old"]["groups"][0]["momentum"]) == len(onecycle["old"]["steps"])


def test_reschedule_plot_with_dry_run_and_with_a_write(run_cli, tmp_path):
    picture = tmp_path / "change.png"
    result = run_cli("reschedule", COSINE, "--dry-run", "--set", "T_max=80", "--plot", picture)
    assert result.exit_code == EXIT_OK, result.stderr
    assert f"ckpttool: wrote {picture}" in result.stderr and "dry run" in result.stdout
    assert _image(picture).shape[:2] == (480, 1000)
    out, picture2 = tmp_path / "out.pt", tmp_path / "change2.png"
    result = run_cli("reschedule", COSINE, "-o", out, "--scale-lr", "0.5", "--plot", picture2)
    assert result.exit_code == EXIT_OK, result.stderr
    assert out.exists() and picture2.exists()


def test_reschedule_plot_of_plateau_fails_before_writing(run_cli, tmp_path):
    out = tmp_path / "out.pt"
    result = run_cli("reschedule", "fixtures/schedulers/ReduceLROnPlateau.pt", "-o", out,
                     "--scale-lr", "0.5", "--plot", tmp_path / "x.png")
    assert result.exit_code == EXIT_ERROR and "cannot be replayed" in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [
    ["plot", COSINE, "-o", "{tmp}/lr.png"],
    ["reschedule", COSINE, "-o", "{tmp}/out.pt", "--set", "T_max=80", "--plot", "{tmp}/lr.png"],
    ["reschedule", COSINE, "--dry-run", "--set", "T_max=80", "--plot", "{tmp}/lr.png"],
])
def test_without_matplotlib_the_extra_is_named(run_cli, monkeypatch, tmp_path, args):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    result = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == EXIT_ERROR and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("ckpttool: error: ") and "pip install 'ckpttool[plot]'" in line
    assert list(tmp_path.iterdir()) == []  # nothing drawn, nothing rewritten


def test_sparklines_need_no_matplotlib(run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert run_cli("plot", COSINE).exit_code == EXIT_OK


def test_importing_ckpttool_imports_neither_matplotlib_nor_torch():
    code = "import sys, ckpttool; print(sorted({'matplotlib', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=False)
    assert out.stdout.strip() == "[]", out.stderr


def test_plot_and_reschedule_share_the_new_schedule_options():
    from ckpttool.cli import cli

    def options(command):
        return {p.name: (p.opts, p.multiple, p.type.name, p.help)
                for p in cli.commands[command].params
                if p.name in ("spec", "sets", "lrs", "scale_lr", "step", "momentum", "optimizer")}

    assert len(options("plot")) == 7 and options("plot") == options("reschedule")


def test_errors_are_one_line(run_cli, tmp_path):
    for args in (["plot", "fixtures/schedulers/ReduceLROnPlateau.pt"],
                 ["plot", "fixtures/layouts/two_optimizers.pt"],
                 ["plot", COSINE, "--scheduler", "NoSuchLR(x=1)"],
                 ["plot", COSINE, "-o", tmp_path / "lr.xyz"]):
        result = run_cli(*args)
        assert result.exit_code == EXIT_ERROR, args
        assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert run_cli("plot", "fixtures/layouts/two_optimizers.pt", "--optimizer",
                   "optimizers/1").exit_code == EXIT_OK


# --- nothing to plot, --momentum, --step ------------------------------------------------------


def test_a_checkpoint_without_an_optimizer_has_nothing_to_plot(run_cli):
    result = run_cli("plot", "fixtures/model_only.pt")
    assert result.exit_code == EXIT_ERROR
    assert result.stderr == ("ckpttool: error: fixtures/model_only.pt: no optimizer state in this "
                             "checkpoint; nothing to plot\n")
    with_change = run_cli("plot", "fixtures/model_only.pt", "--scale-lr", "0.5")
    assert with_change.stderr == result.stderr


def test_the_new_momentum_curve_shows_momentum(tmp_path):
    """Switching away from a schedule that cycles beta1 with --momentum X: the new schedule
    leaves X in the groups, so its curve is X (real torch: the groups reschedule writes)."""
    series = ckpttool.plot_series(ONECYCLE, scheduler="CosineAnnealingLR(T_max=60)",
                                  lr=["0.002"], momentum=0.85)
    assert series.momentum_key == "beta1"
    assert series.new.momentum == ((0.85,) * len(series.new.steps),) * 2
    assert len(set(series.old.momentum[0])) > 1  # the stored curve still cycles
    plan = ckpttool.reschedule(ONECYCLE, scheduler="CosineAnnealingLR(T_max=60)", lr=["0.002"],
                               momentum=0.85)
    out = tmp_path / "out.pt"
    plan.save(out)
    saved = torch.load(out, weights_only=True)["optimizer"]["param_groups"]
    assert [g["betas"][0] for g in saved] == [0.85, 0.85]
    # without --momentum the current beta1 stays, and the curve says so
    kept = ckpttool.plot_series(ONECYCLE, scheduler="CosineAnnealingLR(T_max=60)", lr=["0.002"])
    current = torch.load(ONECYCLE, weights_only=True)["optimizer"]["param_groups"][0]["betas"][0]
    assert set(kept.new.momentum[0]) == {current}


def test_reschedule_plot_draws_the_momentum_given(run_cli, tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(plot, "draw_png", lambda series, path: drawn.append(series))
    result = run_cli("reschedule", ONECYCLE, "--dry-run", "--scheduler",
                     "CosineAnnealingLR(T_max=60)", "--lr", "0.002", "--momentum", "0.85",
                     "--plot", tmp_path / "lr.png")
    assert result.exit_code == EXIT_OK, result.stderr
    [series] = drawn
    assert {v for group in series.new.momentum for v in group} == {0.85}


def test_plot_step_moves_the_resume_point(run_cli):
    series = ckpttool.plot_series(COSINE, step=30)
    assert (series.step, series.resume) == (16, 30)
    # the same schedule, resumed later: the curves agree, the marks differ
    assert series.new.steps == series.old.steps and series.new.lrs == series.old.lrs
    doc = json.loads(run_cli("plot", "--json", COSINE, "--step", "30").stdout)
    assert (doc["step"], doc["resume"]) == (16, 30)
    text = run_cli("plot", COSINE, "--set", "T_max=80", "--step", "30").stdout
    assert "^ current step 16" in text and "resume at step 30" in text


def test_plot_step_gives_a_new_schedule_where_nothing_says_the_step(run_cli):
    """LBFGS keeps no step count and has no scheduler: reschedule and plot both ask for --step,
    and plot accepts it."""
    args = ["plot", "fixtures/optimizers/LBFGS.pt", "--scheduler", "CosineAnnealingLR(T_max=10)"]
    refused = run_cli(*args)
    assert refused.exit_code == EXIT_ERROR and "pass --step N" in refused.stderr
    result = run_cli(*args, "--step", "4")
    assert result.exit_code == EXIT_OK, result.stderr
    assert "new: CosineAnnealingLR(T_max=10)" in result.stdout
    assert "^ resume at step 4" in result.stdout


# --- HF Trainer folders: the schedule through transformers, the logged lrs as points ----------

HF20 = ROOT / "fixtures/dirs/hf_trainer/checkpoint-20"


def _hf_log(folder):
    state = json.loads((folder / "trainer_state.json").read_text())
    return [[e["step"], e["learning_rate"]] for e in state["log_history"] if "learning_rate" in e]


def test_plot_of_an_hf_folder_carries_the_logged_lrs(run_cli):
    transformers = pytest.importorskip("transformers")
    result = run_cli("plot", "--json", HF20)
    assert result.exit_code == EXIT_OK, result.stderr
    doc = json.loads(result.stdout)
    assert doc["old"]["call"] == "hf:linear(num_warmup_steps=5, num_training_steps=40)"
    assert doc["horizon"] == 40 and "num_training_steps" in doc["caption"]
    assert doc["logged"] == _hf_log(HF20)  # as trainer_state.json holds them, exactly
    assert doc["logged_check"]["agrees"] and doc["logged_check"]["offset"] == -1
    # The curve is transformers' own schedule, and each logged lr sits on it at step N - 1.
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = transformers.get_scheduler("linear", opt, num_warmup_steps=5, num_training_steps=40)
    expected = [opt.param_groups[0]["lr"]]
    for _ in range(40):
        opt.step()
        sched.step()
        expected.append(opt.param_groups[0]["lr"])
    assert doc["old"]["steps"] == list(range(41))
    assert doc["old"]["groups"][0]["lr"] == expected
    assert all(expected[step - 1] == lr for step, lr in doc["logged"])
    assert "all 4 equal the replay" in doc["notes"][-1]


def test_hf_logged_lrs_in_the_sparklines(run_cli):
    pytest.importorskip("transformers")
    lines = run_cli("plot", HF20).stdout.splitlines()
    (curve,) = [line for line in lines if "groups 0, 1" in line]
    (logged,) = [line for line in lines if line.split()[:1] == ["logged"]]
    start = curve.index("groups 0, 1") + len("groups 0, 1  ")
    marks = [i - start for i, c in enumerate(logged) if c in plot.SPARK_LEVELS]
    # one mark per logged step, in the column of step N - 1, at the curve's level there
    columns = len(curve[start:].split()[0])
    assert marks == [next(c for c in range(columns)
                          if plot.column_steps(c, columns, 40)[1] > step - 1)
                     for step, _ in _hf_log(HF20)]
    assert all(logged[start + m] == curve[start + m] for m in marks)
    assert any("4 logged lrs of trainer_state.json" in line for line in lines)


def test_hf_logged_lrs_are_drawn_on_the_png(tmp_path):
    pytest.importorskip("transformers")
    import dataclasses

    series = ckpttool.plot_series(HF20)
    with_points = _image(plot.draw_png(series, tmp_path / "with.png"))
    without = _image(plot.draw_png(dataclasses.replace(series, logged=(), notes=series.notes),
                                   tmp_path / "without.png"))
    assert with_points.shape == without.shape == (480, 1000, 4)
    differ = (abs(with_points - without).sum(axis=2) > 0.1)
    assert differ.any()
    rows, cols = differ.nonzero()
    # the points lie inside the axes, not only in the legend at the top right
    assert (cols < 700).any() and (rows > 100).any()


def test_a_doctored_logged_lr_is_flagged_in_the_plot(tmp_path):
    pytest.importorskip("transformers")
    import shutil

    folder = tmp_path / "checkpoint-20"
    shutil.copytree(HF20, folder)
    state = json.loads((folder / "trainer_state.json").read_text())
    state["log_history"][2]["learning_rate"] = 0.0007
    (folder / "trainer_state.json").write_text(json.dumps(state))
    series = ckpttool.plot_series(folder)
    assert series.logged[2] == (15, 0.0007) and not series.logged_check.agrees
    assert series.logged_check.first_mismatch[:2] == (15, 0.0007)
    assert "1 of 4 DIFFER from the replay, the first at step 15: logged 0.0007" in series.notes[-1]


def test_hf_plot_without_transformers_names_the_extra(run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    result = run_cli("plot", HF20)
    assert result.exit_code == EXIT_ERROR
    assert "needs transformers: pip install 'ckpttool[hf]'" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_a_short_run_gets_one_column_per_step_and_no_gaps(run_cli):
    # 8 steps drawn in 8 columns: a blank column would read as a missing step
    out = run_cli("plot", ROOT / "fixtures/dirs/dcp/single").stdout
    row = next(line for line in out.splitlines() if "group 0" in line)
    spark = row.split("group 0")[1].split()[0]
    assert spark == "███▄▄▄▁▁"
