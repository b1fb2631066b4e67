"""ckpttool.schedulers: which class a state is and the arguments that rebuild it.

The oracle is real torch: a scheduler is built from drawn arguments and stepped, its state is
identified, the recovered arguments must equal the drawn ones (defaults filled, per-group lists
collapsed as a user writes them), and ``schedule.verify`` must find the stored state bit-identical
to a replay. Each state also goes through a real ``torch.save`` file read by ckpttool's safe
reader (TensorRef lrs, Counter milestones) and must identify the same.
"""

from __future__ import annotations

import ast
import copy
import inspect
import math
import os
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from torch.optim import lr_scheduler as L

from ckpttool.errors import StateError
from ckpttool.schedule import materialize, verify
from ckpttool.schedulers import (
    REQUIRED,
    SCHEDULER_CLASSES,
    SIGNATURES,
    SchedulerInfo,
    differences,
    format_call,
    identify_scheduler,
    int_text,
    looks_like_scheduler,
    replay_steps,
    same,
    shortest_float,
    value_repr,
)
from ckpttool.serialization import TensorRef, read_checkpoint
from conftest import train_schedule

# --- drawing a training run ---------------------------------------------------------------------


@dataclass
class Spec:
    """A scheduler to build: torch class name, keyword arguments, sub-schedulers."""

    cls: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    children: list[Spec] = field(default_factory=list)


@dataclass
class Run:
    opt_class: str
    lrs: list[float]
    lr_dtype: torch.dtype | None  # None: float lrs; else tensor lrs of this dtype
    momentum: float
    params_per_group: list[int]
    spec: Spec
    steps: int
    metrics: list[float] = field(default_factory=list)  # ReduceLROnPlateau only


def make_optimizer(run: Run) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2)) for _ in range(n)],
               "lr": torch.tensor(lr, dtype=run.lr_dtype) if run.lr_dtype else lr}
              for n, lr in zip(run.params_per_group, run.lrs)]
    cls = getattr(torch.optim, run.opt_class)
    if run.opt_class == "SGD":
        return cls(groups, lr=run.lrs[0], momentum=run.momentum)
    return cls(groups, lr=run.lrs[0])


def build(spec: Spec, opt: torch.optim.Optimizer) -> Any:
    """The oracle's own construction, straight from torch (not ckpttool.schedule)."""
    cls = getattr(L, spec.cls)
    if spec.cls == "SequentialLR":
        return cls(opt, [build(c, opt) for c in spec.children], **spec.kwargs)
    if spec.cls == "ChainedScheduler":
        return cls([build(c, opt) for c in spec.children], optimizer=opt)
    return cls(opt, **spec.kwargs)


def train(run: Run) -> tuple[dict, list[dict]]:
    """Run the schedule as a training loop does; return (scheduler state, param_groups)."""
    opt = make_optimizer(run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sched = build(run.spec, opt)
            if run.spec.cls == "ReduceLROnPlateau":
                for metric in run.metrics:
                    opt.step()
                    sched.step(metric)
            else:
                for _ in range(run.steps):
                    opt.step()  # no gradients: a no-op, as in a real loop's order
                    sched.step()
        except (ZeroDivisionError, ValueError, OverflowError):
            reject()  # torch itself refuses these arguments (e.g. a zero-length OneCycle phase)
    return copy.deepcopy(sched.state_dict()), copy.deepcopy(opt.state_dict()["param_groups"])


unit = st.floats(0.05, 1.0)
small_int = st.integers(1, 30)


def optional(draw, **strategies) -> dict[str, Any]:
    """Some of the optional arguments, so that defaults are exercised too."""
    return {k: draw(s) for k, s in strategies.items() if draw(st.booleans())}


def per_group(strategy: st.SearchStrategy, n: int) -> st.SearchStrategy:
    """One value for all groups, or one per group."""
    return st.one_of(strategy, st.lists(strategy, min_size=n, max_size=n))


def nice(lo: int, hi: int, scale: float) -> st.SearchStrategy[float]:
    """Decimals as people write them (0.25, 7.3): arguments ckpttool recovers by inversion."""
    return st.integers(lo, hi).map(lambda k: k / scale)


class Scale:
    """A callable lr_lambda object: torch saves its __dict__."""

    def __init__(self, k: float):
        self.k = k

    def __call__(self, epoch: int) -> float:
        return self.k ** epoch


@st.composite
def specs(draw, cls: str, n_groups: int) -> Spec:
    if cls in ("LambdaLR", "MultiplicativeLR"):
        fn = draw(st.sampled_from(["lambda", "object", "list"]))
        lam = {"lambda": lambda e: 0.97 ** e if cls == "LambdaLR" else 0.97,
               "object": Scale(0.9) if cls == "LambdaLR" else (lambda e: 0.95),
               "list": [(lambda e: 0.99) for _ in range(n_groups)]}[fn]
        return Spec(cls, {"lr_lambda": lam})
    if cls == "StepLR":
        return Spec(cls, {"step_size": draw(small_int), **optional(draw, gamma=unit)})
    if cls == "MultiStepLR":
        milestones = sorted(draw(st.lists(st.integers(1, 60), max_size=4)))
        return Spec(cls, {"milestones": milestones, **optional(draw, gamma=unit)})
    if cls == "ConstantLR":
        return Spec(cls, optional(draw, factor=unit, total_iters=small_int))
    if cls == "LinearLR":
        return Spec(cls, optional(draw, start_factor=unit, end_factor=st.floats(0.0, 1.0),
                                  total_iters=small_int))
    if cls == "ExponentialLR":
        return Spec(cls, {"gamma": draw(st.floats(0.5, 1.0))})
    if cls == "PolynomialLR":
        return Spec(cls, optional(draw, total_iters=st.integers(1, 60),
                                  power=st.floats(0.5, 3.0)))
    if cls == "CosineAnnealingLR":
        return Spec(cls, {"T_max": draw(st.integers(1, 100)),
                          **optional(draw, eta_min=st.floats(0.0, 1e-3))})
    if cls == "CosineAnnealingWarmRestarts":
        return Spec(cls, {"T_0": draw(st.integers(1, 20)),
                          **optional(draw, T_mult=st.integers(1, 3),
                                     eta_min=st.floats(0.0, 1e-3))})
    if cls == "ReduceLROnPlateau":
        min_lr = st.one_of(st.floats(0.0, 1e-4),
                           st.lists(st.floats(0.0, 1e-4), min_size=n_groups, max_size=n_groups))
        return Spec(cls, optional(
            draw, mode=st.sampled_from(["min", "max"]), factor=st.floats(0.05, 0.9),
            patience=st.integers(0, 5), threshold=st.floats(0.0, 0.1),
            threshold_mode=st.sampled_from(["rel", "abs"]), cooldown=st.integers(0, 3),
            min_lr=min_lr, eps=st.floats(0.0, 1e-6)))
    if cls == "CyclicLR":
        steps = st.one_of(st.integers(1, 50), nice(1, 200, 4))
        kwargs = {"base_lr": draw(per_group(st.floats(1e-4, 1e-2), n_groups)),
                  "max_lr": draw(per_group(st.floats(1e-2, 1.0), n_groups))}
        kwargs.update(optional(
            draw, step_size_up=steps, step_size_down=st.one_of(st.none(), steps),
            mode=st.sampled_from(["triangular", "triangular2", "exp_range"]),
            gamma=st.floats(0.9, 1.0), scale_mode=st.sampled_from(["cycle", "iterations"]),
            cycle_momentum=st.booleans()))
        kwargs.update(optional(draw, base_momentum=st.floats(0.5, 0.85),
                               max_momentum=st.floats(0.86, 0.99)))
        return Spec(cls, kwargs)
    if cls == "OneCycleLR":
        kwargs = {"max_lr": draw(per_group(st.floats(1e-3, 1.0), n_groups)),
                  "total_steps": draw(st.integers(1, 300))}
        kwargs.update(optional(
            draw, pct_start=nice(1, 99, 100), anneal_strategy=st.sampled_from(["cos", "linear"]),
            cycle_momentum=st.booleans(), three_phase=st.booleans(),
            base_momentum=per_group(nice(50, 85, 100), n_groups),
            max_momentum=per_group(nice(86, 99, 100), n_groups),
            div_factor=st.one_of(st.sampled_from([25.0, 10.0, 7.3, 1e3]), nice(2, 400, 2)),
            final_div_factor=st.sampled_from([1e4, 100.0, 33.3, 1e5, 7.0, 2.5e3])))
        return Spec(cls, kwargs)
    # Composites: children from the classes a training script chains.
    pool = ["StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR", "PolynomialLR",
            "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR", "OneCycleLR"]
    names = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3))
    # Two schedulers that assign the same group keys make the earlier one's arguments
    # unrecoverable by design; test_schedulers_sharing_group_keys covers that.
    cyclers = [i for i, c in enumerate(names) if c in ("CyclicLR", "OneCycleLR")]
    names = [c for i, c in enumerate(names) if i not in cyclers[1:]]
    children = [draw(specs(c, n_groups)) for c in names]
    if cls == "SequentialLR":
        milestones = sorted(draw(st.sets(st.integers(1, 60), min_size=len(children) - 1,
                                         max_size=len(children) - 1)))
        return Spec(cls, {"milestones": milestones}, children)
    return Spec(cls, {}, children)


@st.composite
def runs(draw, cls: str) -> Run:
    n = draw(st.integers(1, 3))
    opt_class = draw(st.sampled_from(["SGD", "Adam", "AdamW"]))
    spec = draw(specs(cls, n))
    steps = draw(st.integers(0, 200))
    if cls == "OneCycleLR":  # stepping past total_steps raises in torch
        steps = min(steps, spec.kwargs["total_steps"])
    metrics = draw(st.lists(st.floats(0.0, 10.0), max_size=30)) if cls == "ReduceLROnPlateau" \
        else []
    return Run(opt_class, draw(st.lists(st.floats(1e-4, 1.0), min_size=n, max_size=n)),
               draw(st.sampled_from([None, None, torch.float32, torch.float64])),
               draw(st.sampled_from([0.0, 0.9])), draw(st.lists(st.integers(1, 2), min_size=n,
                                                                max_size=n)),
               spec, steps, metrics)


# --- what identify_scheduler must say ---------------------------------------------------------


def collapse(value: Any) -> Any:
    """A per-group list whose values agree reads as the one value."""
    if isinstance(value, (list, tuple)) and value and all(v == value[0] for v in value):
        return value[0]
    return list(value) if isinstance(value, tuple) else value


def expected_args(spec: Spec) -> dict[str, Any]:
    params = inspect.signature(getattr(L, spec.cls).__init__).parameters
    args = {name: p.default for name, p in params.items()
            if name not in ("self", "optimizer", "last_epoch", "schedulers")}
    args.update(spec.kwargs)
    if spec.cls in ("LambdaLR", "MultiplicativeLR"):
        return {}  # the lambda is not stored
    if spec.cls == "MultiStepLR":
        args["milestones"] = sorted(args["milestones"])
    if spec.cls == "CyclicLR":
        for name in ("base_lr", "max_lr", "base_momentum", "max_momentum"):
            args[name] = collapse(args[name])
        if args["step_size_down"] == args["step_size_up"]:
            args["step_size_down"] = None
        # torch forces scale_mode for its built-in modes
        args["scale_mode"] = "iterations" if args["mode"] == "exp_range" else "cycle"
    if spec.cls == "OneCycleLR":
        del args["epochs"], args["steps_per_epoch"]
        for name in ("max_lr", "base_momentum", "max_momentum"):
            args[name] = collapse(args[name])
    if spec.cls in ("CyclicLR", "OneCycleLR") and not args["cycle_momentum"]:
        del args["base_momentum"], args["max_momentum"]  # not stored, no effect
    return args


def check_info(info: SchedulerInfo, spec: Spec) -> None:
    if spec.cls in ("LambdaLR", "MultiplicativeLR"):
        assert info.cls == "LambdaLR"
        assert info.candidates == ("LambdaLR", "MultiplicativeLR")
        assert info.missing == ("lr_lambda",) and not info.replayable
        return
    assert info.cls == spec.cls
    assert info.args == expected_args(spec), format_call(info, defaults=True)
    assert not info.missing and not info.unrecoverable and not info.candidates
    assert len(info.children) == len(spec.children)
    for child, child_spec in zip(info.children, spec.children):
        check_info(child, child_spec)


def check_call_parses(info: SchedulerInfo, node: ast.expr) -> None:
    """format_call's output is a Python call whose keyword values are exactly the args."""
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    assert node.func.id == info.cls and not node.args
    keywords = {k.arg: k.value for k in node.keywords}
    if "schedulers" in keywords:
        subs = keywords.pop("schedulers")
        assert isinstance(subs, ast.List) and len(subs.elts) == len(info.children)
        for child, sub in zip(info.children, subs.elts):
            check_call_parses(child, sub)
    assert keywords.keys() == info.args.keys()
    for name, value in keywords.items():
        parsed = ast.literal_eval(value)
        assert parsed == info.args[name] and type(parsed) is type(info.args[name])


def file_round_trip(state: dict, groups: list[dict]) -> tuple[Any, Any, Any]:
    """The state and groups as ckpttool reads them from a real torch.save file."""
    fd, path = tempfile.mkstemp(suffix=".pt")
    os.close(fd)
    try:
        torch.save({"optimizer": {"state": {}, "param_groups": groups}, "scheduler": state},
                   path)
        ckpt = read_checkpoint(path)
        root = ckpt.root
        materialized = materialize(root, ckpt)
    finally:
        os.unlink(path)
    return root["scheduler"], root["optimizer"]["param_groups"], materialized


# Examples per class: the whole file stays well under a minute on two cores.
PROPERTY = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.mark.parametrize("cls", SCHEDULER_CLASSES)
@PROPERTY
@given(data=st.data())
def test_identify_recovers_the_arguments_and_verify_replays_them(cls, data):
    run = data.draw(runs(cls))
    state, groups = train(run)

    assert looks_like_scheduler(state)
    info = identify_scheduler(state, groups)
    check_info(info, run.spec)
    if not info.missing:
        check_call_parses(info, ast.parse(format_call(info, defaults=True), mode="eval").body)
        assert replay_steps(state, info) == (len(run.metrics) if cls == "ReduceLROnPlateau"
                                             else run.steps)

    # The same through a real file: TensorRef lrs, Counter milestones, nothing imported.
    file_state, file_groups, materialized = file_round_trip(state, groups)
    assert looks_like_scheduler(file_state)
    assert identify_scheduler(file_state, file_groups) == info

    result = verify(run.opt_class, groups, state, info)
    file_result = verify(run.opt_class, materialized["optimizer"]["param_groups"],
                         materialized["scheduler"], info)
    if cls in ("LambdaLR", "MultiplicativeLR", "ReduceLROnPlateau"):
        assert result.identical is None and result.reason
        assert file_result.identical is None
    else:
        assert result.identical is True, result
        assert file_result.identical is True, file_result


# --- the class table ----------------------------------------------------------------------------


def test_classes_are_torchs_fifteen():
    assert set(SCHEDULER_CLASSES) == set(L.__all__) - {"LRScheduler"}
    assert len(SCHEDULER_CLASSES) == 15 and set(SIGNATURES) == set(SCHEDULER_CLASSES)


@pytest.mark.parametrize("cls", SCHEDULER_CLASSES)
def test_signatures_match_torch(cls):
    params = [(name, p.default) for name, p in
              inspect.signature(getattr(L, cls).__init__).parameters.items()
              if name not in ("self", "optimizer", "last_epoch")]
    table = [(name, inspect.Parameter.empty if d is REQUIRED else d) for name, d in SIGNATURES[cls]]
    assert table == params
    for (_, ours), (_, theirs) in zip(table, params):
        assert type(ours) is type(theirs)


def test_importing_schedulers_does_not_import_torch():
    code = ("import sys, ckpttool.schedulers\n"
            "leaked = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "print(leaked)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": root}, check=True)
    assert out.stdout.strip() == "[]"


# --- identification details ---------------------------------------------------------------------


def cosine_state(**extra) -> dict:
    return {"T_max": 40, "eta_min": 0.0, "base_lrs": [0.1], "last_epoch": 5, "_step_count": 6,
            "_is_initial": False, "_get_lr_called_within_step": False, "_last_lr": [0.09],
            **extra}


def test_looks_like_scheduler_rejects_other_dicts():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    for value in (opt.state_dict(), {"weight": 1}, {}, [cosine_state()], None, "base_lrs",
                  {"last_epoch": 3}, {"_schedulers": "x", "_last_lr": []}):
        assert not looks_like_scheduler(value)
    assert looks_like_scheduler(cosine_state(warmup=3))  # a custom subclass is still one


def test_older_torch_keys_are_tolerated():
    state = cosine_state(verbose=False)
    del state["_is_initial"]
    assert identify_scheduler(state).cls == "CosineAnnealingLR"


def test_a_custom_subclass_is_unknown_with_a_hint():
    info = identify_scheduler(cosine_state(warmup_steps=100))
    assert info.cls == "unknown" and info.args == {} and not info.replayable
    assert "CosineAnnealingLR plus ['warmup_steps']" in info.unrecoverable[0]
    assert format_call(info) == "<unknown scheduler>"
    weird = identify_scheduler({"base_lrs": [0.1], "last_epoch": 1, "foo": 2})
    assert weird.cls == "unknown" and "match none" in weird.unrecoverable[0]
    assert identify_scheduler([1, 2]).cls == "unknown"
    assert identify_scheduler({1: 2}).cls == "unknown"


def test_milestones_from_dcp_have_string_keys():
    state = {"milestones": {"30": 1, "10": 2}, "gamma": 0.1, "base_lrs": [0.1], "last_epoch": 0}
    info = identify_scheduler(state)
    assert info.args["milestones"] == [10, 10, 30] and not info.notes
    # dcp.load into a template keeps the template's int keys and adds the string ones
    state["milestones"] = Counter({10: 2, 30: 1, "10": 2, "30": 1})
    info = identify_scheduler(state)
    assert info.args["milestones"] == [10, 10, 30] and "string" in info.notes[0]


def test_lambda_messages_say_what_each_group_lost():
    state = {"base_lrs": [0.1, 0.1, 0.1], "last_epoch": 3, "_last_lr": [0.1] * 3,
             "lr_lambdas": [None, {}, {"k": 0.5}]}
    info = identify_scheduler(state)
    assert info.cls == "LambdaLR" and info.candidates == ("LambdaLR", "MultiplicativeLR")
    text = " ".join(info.unrecoverable)
    assert "group 0 was a function or lambda" in text
    assert "group 1 was a functools.partial" in text
    assert "group 2 was a callable object; torch saved only its attributes (k)" in text
    assert format_call(info) == "LambdaLR(lr_lambda=<not stored>)"
    assert "LambdaLR or MultiplicativeLR" in info.replay_blocker
    same = identify_scheduler({**state, "lr_lambdas": [None] * 3})
    assert same.unrecoverable[0].startswith("lr_lambda (all 3 groups) was a function or lambda")


def onecycle_run(steps: int = 3, **kwargs) -> tuple[dict, list[dict]]:
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]},
                           {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=0.1,
                          momentum=0.9)
    sched = L.OneCycleLR(opt, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            sched.step()
    return copy.deepcopy(sched.state_dict()), copy.deepcopy(opt.state_dict()["param_groups"])


def test_onecycle_needs_the_param_groups():
    state, groups = onecycle_run(max_lr=[1.0, 0.5], total_steps=100, div_factor=10.0)
    info = identify_scheduler(state)
    assert info.missing == ("max_lr", "base_momentum", "max_momentum", "div_factor",
                            "final_div_factor")
    assert "param_groups" in info.unrecoverable[0] and len(info.unrecoverable) == 1
    assert format_call(info) == ("OneCycleLR(max_lr=<not stored>, total_steps=100, "
                                 "base_momentum=<not stored>, max_momentum=<not stored>, "
                                 "div_factor=<not stored>, final_div_factor=<not stored>)")
    full = identify_scheduler(state, groups)
    assert format_call(full) == "OneCycleLR(max_lr=[1.0, 0.5], total_steps=100, div_factor=10.0)"


def test_onecycle_inversions_read_as_written():
    state, groups = onecycle_run(max_lr=[1.0, 0.007], total_steps=3, pct_start=0.37,
                                 div_factor=7.3, final_div_factor=333.0, three_phase=True)
    # The algebraic inverses are off in the last bit; the shortest exact one is what was typed.
    assert groups[0]["max_lr"] / groups[0]["initial_lr"] == 7.300000000000001
    assert (state["_schedule_phases"][0]["end_step"] + 1) / 3 == 0.36999999999999994
    info = identify_scheduler(state, groups)
    assert info.args["div_factor"] == 7.3 and info.args["final_div_factor"] == 333.0
    assert info.args["pct_start"] == 0.37 and info.args["three_phase"] is True
    state, groups = onecycle_run(max_lr=0.007, total_steps=100)
    assert groups[0]["max_lr"] / groups[0]["initial_lr"] == 24.999999999999996
    assert identify_scheduler(state, groups).args["div_factor"] == 25.0


def test_onecycle_hand_edits_are_unrecoverable_not_guessed():
    state, groups = onecycle_run(max_lr=1.0, total_steps=100)
    state["_schedule_phases"][1]["end_step"] = 77  # torch writes total_steps - 1 there
    groups[1]["initial_lr"] = 0.123456789
    info = identify_scheduler(state, groups)
    assert {"pct_start", "three_phase", "div_factor"} <= set(info.missing)
    assert any("_schedule_phases" in s for s in info.unrecoverable)
    assert any("div_factor" in s and "every group" in s for s in info.unrecoverable)


def composite_run(make, steps: int = 5) -> tuple[dict, list[dict]]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.9)
    return train_schedule(opt, make, steps)


def test_schedulers_sharing_group_keys():
    # OneCycleLR reads max_lr, min_lr and its momenta back from the groups every step; a later
    # OneCycleLR assigns them again, so the earlier one's arguments are gone (not guessed) ...
    state, groups = composite_run(lambda o: L.ChainedScheduler(
        [L.OneCycleLR(o, 1.0, total_steps=10), L.OneCycleLR(o, 0.5, total_steps=10)]))
    first, second = identify_scheduler(state, groups).children
    assert set(first.missing) == {"max_lr", "div_factor", "final_div_factor", "base_momentum",
                                  "max_momentum"}
    assert "a later OneCycleLR" in first.unrecoverable[0] and not first.replayable
    assert second.args["max_lr"] == 0.5 and not second.missing
    # ... while a later CyclicLR overwrites only the momenta, which then never reach the state.
    state, groups = composite_run(lambda o: L.SequentialLR(o, [
        L.OneCycleLR(o, 1.0, total_steps=10, max_momentum=0.97),
        L.CyclicLR(o, 0.01, 0.1, max_momentum=0.93)], [4]))
    first, _ = identify_scheduler(state, groups).children
    assert first.args["max_momentum"] == 0.93 and "later CyclicLR" in first.notes[0]
    assert verify("SGD", groups, state, identify_scheduler(state, groups)).identical is True


def test_cyclic_custom_scale_fn_is_unrecoverable():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    state = L.CyclicLR(opt, 0.01, 0.1, scale_fn=Scale(0.5)).state_dict()
    info = identify_scheduler(state)
    assert info.missing == ("scale_fn",) and "callable object" in info.unrecoverable[0]
    assert "scale_fn=<not stored>" in format_call(info)
    state = L.CyclicLR(opt, 0.01, 0.1, scale_fn=lambda x: 1.0, mode="mine").state_dict()
    assert "mode 'mine' is not built in" in identify_scheduler(state).unrecoverable[0]


def test_cyclic_step_sizes_invert_exactly():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for up, down in ((2000, None), (3, 7), (1000.5, 0.25), (1, 1)):
        state = L.CyclicLR(opt, 0.01, 0.1, step_size_up=up, step_size_down=down).state_dict()
        args = identify_scheduler(state).args
        assert (args["step_size_up"], args["step_size_down"]) == (
            up, None if down in (None, up) else down)
    # No float step_size_up divided by 3.0 gives this ratio (the quotients skip it).
    state["total_size"], state["step_ratio"] = 3.0, 0.33333333333333337
    info = identify_scheduler(state)
    assert info.missing == ("step_size_up", "step_size_down")
    assert "edited by hand" in info.unrecoverable[0]


def test_reduce_on_plateau_min_lr_forms():
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]},
                           {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=0.1)
    assert identify_scheduler(L.ReduceLROnPlateau(opt, min_lr=1e-5).state_dict()).args[
        "min_lr"] == 1e-5
    info = identify_scheduler(L.ReduceLROnPlateau(opt, min_lr=[1e-5, 0.0]).state_dict())
    assert info.args["min_lr"] == [1e-5, 0.0]
    assert "cannot be replayed" in info.replay_blocker


def test_replay_steps_rules():
    state = cosine_state()
    assert replay_steps(state, identify_scheduler(state)) == 5
    chained = {"_last_lr": [0.1], "_schedulers": [
        {"gamma": 0.9, "base_lrs": [0.1], "last_epoch": 7},
        {"factor": 0.5, "total_iters": 3, "base_lrs": [0.1], "last_epoch": 7}]}
    assert replay_steps(chained, identify_scheduler(chained)) == 7
    for bad in (-1, 2.0, None, True):
        state = cosine_state(last_epoch=bad)
        with pytest.raises(StateError, match="last_epoch"):
            replay_steps(state, identify_scheduler(state))


# --- format_call and helpers ------------------------------------------------------------------


def test_format_call_examples():
    assert format_call(identify_scheduler(cosine_state(eta_min=1e-05))) == (
        "CosineAnnealingLR(T_max=40, eta_min=1e-05)")
    assert format_call(identify_scheduler(cosine_state()), defaults=True) == (
        "CosineAnnealingLR(T_max=40, eta_min=0.0)")
    info = SchedulerInfo("ReduceLROnPlateau", {"mode": "max", "eps": math.inf, "min_lr": 0})
    assert format_call(info) == "ReduceLROnPlateau(mode='max', eps=float('inf'))"
    seq = SchedulerInfo("SequentialLR", {"milestones": [5]}, children=(
        SchedulerInfo("LinearLR", {"start_factor": 0.1, "end_factor": 1.0, "total_iters": 5}),
        SchedulerInfo("CosineAnnealingLR", {"T_max": 35, "eta_min": 1e-6})))
    assert format_call(seq) == ("SequentialLR(schedulers=[LinearLR(start_factor=0.1), "
                                "CosineAnnealingLR(T_max=35, eta_min=1e-06)], milestones=[5])")
    # 0.1 + 0.2 prints as itself: repr round-trips
    assert format_call(SchedulerInfo("ExponentialLR", {"gamma": 0.1 + 0.2})) == (
        "ExponentialLR(gamma=0.30000000000000004)")


def test_shortest_float():
    assert shortest_float(24.999999999999996, lambda d: 0.1 / d == 0.1 / 25.0) == 25.0
    assert shortest_float(3.0, lambda d: d == 3.0, default=0.3) == 3.0
    assert shortest_float(1.0, lambda d: False) is None
    assert shortest_float(math.nan, lambda d: True) is None


def test_differences_are_bitwise():
    assert list(differences(0.0, -0.0, "x")) == ["x: stored 0.0 != replayed -0.0"]
    assert list(differences(math.nan, math.nan, "x")) == []
    assert list(differences(1, 1.0, "x")) == ["x: stored int 1 != replayed float 1.0"]
    assert list(differences((0.9, 0.999), [0.9, 0.999], "b")) == []
    assert list(differences({"10": 1}, Counter({10: 1}), "m")) == []
    assert list(differences({"a": 1}, {"b": 1}, "s")) == [
        "s.a: in the stored state, absent from a clean run",
        "s.b: absent from the stored state (a clean run has 1)"]
    ref = TensorRef("float32", (), (), 0, None)
    assert list(differences(ref, ref, "t")) == [
        ("t: stored tensor(float32[] @meta) (value not read) != replayed "
         "tensor(float32[] @meta) (value not read)")]


def test_same_is_the_one_exact_equality():
    assert same([0.1, 0.2], (0.1, 0.2)) and same(math.nan, math.nan)
    assert not same(0.0, -0.0) and not same(1, 1.0) and not same(True, 1)


def test_absurd_ints_are_written_by_their_size():
    assert int_text(-12) == "-12" and int_text(2**20_000) == "<int of 20001 bits>"
    assert value_repr((10**5000, "s")) == "(<int of 16610 bits>, 's')"
    assert list(differences([10**5000], [1], "x")) == [
        "x[0]: stored <int of 16610 bits> != replayed 1"]


def _step_state(**changes):
    state = {"step_size": 2, "gamma": 0.5, "base_lrs": [0.1], "last_epoch": 3,
             "_step_count": 4, "_last_lr": [0.05]}
    return {**state, **changes}


@pytest.mark.parametrize("milestones, why", [
    (Counter({"²": 1}), "milestones hold the key '²', not an int epoch"),  # isdigit, not int()
    (Counter({"1" * 5000: 1}), "not an int epoch"),
    (Counter({10: 10**12}), ("milestones count 1000000000000 epochs in all; ckpttool "
                             "rebuilds at most 10000")),
    (Counter({10: -1}), "milestone 10 has the count -1, not a non-negative int"),
    ("x", "milestones is stored as a str, not a Counter of int epochs"),
])
def test_odd_milestones_are_not_recoverable(milestones, why):
    state = {"milestones": milestones, "gamma": 0.1, "base_lrs": [0.1], "last_epoch": 0}
    info = identify_scheduler(state)
    assert info.missing == ("milestones",) and why in info.unrecoverable[0]


def test_odd_values_are_unrecoverable_not_errors():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    cyclic = L.CyclicLR(opt, base_lr=0.01, max_lr=0.1).state_dict()
    cyclic["mode"] = ["triangular"]  # unhashable: not a built-in mode
    assert identify_scheduler(cyclic).missing == ("scale_fn",)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    onecycle = L.OneCycleLR(opt, max_lr=0.1, total_steps=100)
    groups = copy.deepcopy(opt.state_dict()["param_groups"])
    for state, group in [({"total_steps": 10**400}, {}),
                         ({}, {"max_lr": 10**400, "initial_lr": 1}),
                         ({}, {"min_lr": 10**-300, "initial_lr": 10**400})]:
        edited = {**onecycle.state_dict(), **state}
        info = identify_scheduler(edited, [{**groups[0], **group}])
        assert info.cls == "OneCycleLR" and info.missing and not info.replayable
    phases = copy.deepcopy(onecycle.state_dict())
    phases["_schedule_phases"][0]["end_step"] = 10**400
    assert "pct_start" in identify_scheduler(phases, groups).missing
    with pytest.raises(StateError, match="last_epoch=<int of 16610 bits>"):
        replay_steps(_step_state(last_epoch=-(10**5000)), identify_scheduler(_step_state()))
