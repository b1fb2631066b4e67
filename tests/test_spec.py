"""ckpttool.spec: --scheduler SPEC, --set and --lr, parsed without evaluating anything.

The oracle is real torch: a SPEC must build the very scheduler torch builds from the same call
(states compared bit for bit after stepping both), and the constructor line ``show`` prints for
any identified state must parse back to the same SchedulerInfo.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_schedulers import runs, train  # real scheduler states from drawn training runs
from torch.optim import lr_scheduler as L

from ckpttool.errors import SpecError
from ckpttool.schedule import build_scheduler, verify
from ckpttool.schedulers import (
    SCHEDULER_CLASSES,
    SchedulerInfo,
    differences,
    format_call,
    identify_scheduler,
)
from ckpttool.spec import Factory, HFSpec, apply_sets, parse_lr_options, parse_spec


def sgd(n_groups: int = 1, lr: float = 0.1, momentum: float = 0.9) -> torch.optim.SGD:
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]}
                            for _ in range(n_groups)], lr=lr, momentum=momentum)


def stepped(scheduler, steps: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            scheduler.step()
    return copy.deepcopy(scheduler.state_dict())


def assert_same_schedule(info: SchedulerInfo, make, steps: int = 30, n_groups: int = 1) -> None:
    """build_scheduler(info) and torch's own ``make(optimizer)`` step to identical states."""
    ours_opt, torch_opt = sgd(n_groups), sgd(n_groups)
    ours, theirs = build_scheduler(info, ours_opt), make(torch_opt)
    assert type(ours) is type(theirs)
    assert list(differences(stepped(ours, steps), stepped(theirs, steps), "state")) == []
    assert list(differences(ours_opt.state_dict()["param_groups"],
                            torch_opt.state_dict()["param_groups"], "groups")) == []


# --- the constructor line show prints is a SPEC -------------------------------------------------

ROUND_TRIP = settings(max_examples=8, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
REPLAYABLE = [c for c in SCHEDULER_CLASSES if c not in ("LambdaLR", "MultiplicativeLR")]


@pytest.mark.parametrize("cls", REPLAYABLE)
@ROUND_TRIP
@given(data=st.data())
def test_format_call_of_an_identified_state_parses_back(cls, data):
    state, groups = train(data.draw(runs(cls)))
    info = identify_scheduler(state, groups)
    assert not info.missing, info
    assert parse_spec(format_call(info)) == info
    assert parse_spec(format_call(info, defaults=True)) == info


@pytest.mark.parametrize("cls", ["LambdaLR", "MultiplicativeLR"])
def test_a_lambda_schedule_points_to_a_factory(cls):
    opt = sgd()
    state = getattr(L, cls)(opt, lambda e: 0.9).state_dict()
    with pytest.raises(SpecError, match="<not stored>.*my_sched.py:make"):
        parse_spec(format_call(identify_scheduler(state)))
    with pytest.raises(SpecError, match=f"{cls} takes a function.*factory.*my_sched.py:make"):
        parse_spec(f"{cls}(lr_lambda=0.9)")


literals = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3), max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(value=literals)
def test_every_literal_format_call_writes_reads_back_bit_for_bit(value):
    info = SchedulerInfo("StepLR", {"step_size": value, "gamma": 0.1})
    parsed = parse_spec(format_call(info))
    assert list(differences(parsed.args["step_size"], value, "step_size")) == []


# --- SPECs build torch's own scheduler ----------------------------------------------------------

EXAMPLES = [
    # PRODUCT.md, reschedule --scheduler
    ("CosineAnnealingLR(T_max=2000, eta_min=1e-6)",
     lambda o: L.CosineAnnealingLR(o, T_max=2000, eta_min=1e-6)),
    ("OneCycleLR(max_lr=0.01, total_steps=4000, pct_start=0.25)",
     lambda o: L.OneCycleLR(o, max_lr=0.01, total_steps=4000, pct_start=0.25)),
    ("SequentialLR(schedulers=[LinearLR(start_factor=0.1, total_iters=100), "
     + "CosineAnnealingLR(T_max=1900)], milestones=[100])",
     lambda o: L.SequentialLR(o, [L.LinearLR(o, start_factor=0.1, total_iters=100),
                                  L.CosineAnnealingLR(o, T_max=1900)], milestones=[100])),
    # spellings a training script uses
    ("torch.optim.lr_scheduler.StepLR(3, 0.5)", lambda o: L.StepLR(o, 3, 0.5)),
    ("lr_scheduler.MultiStepLR(milestones=(2, 5), gamma=0.3)",
     lambda o: L.MultiStepLR(o, milestones=[2, 5], gamma=0.3)),
    ("ChainedScheduler([ConstantLR(factor=0.5, total_iters=4), ExponentialLR(gamma=0.9)])",
     lambda o: L.ChainedScheduler([L.ConstantLR(o, factor=0.5, total_iters=4),
                                   L.ExponentialLR(o, gamma=0.9)], optimizer=o)),
    ("ChainedScheduler(schedulers=[SequentialLR(schedulers=[LinearLR(), "
     + "PolynomialLR(power=2.0)], milestones=[5]), ExponentialLR(gamma=0.95)])",
     lambda o: L.ChainedScheduler([
         L.SequentialLR(o, [L.LinearLR(o), L.PolynomialLR(o, power=2.0)], [5]),
         L.ExponentialLR(o, 0.95)], optimizer=o)),
    ("CyclicLR(base_lr=[0.01, 0.02], max_lr=0.1, step_size_up=4, mode='exp_range', gamma=0.99)",
     lambda o: L.CyclicLR(o, base_lr=[0.01, 0.02], max_lr=0.1, step_size_up=4,
                          mode="exp_range", gamma=0.99)),
    ("OneCycleLR(0.1, None, 3, 10, cycle_momentum=False, three_phase=True)",
     lambda o: L.OneCycleLR(o, 0.1, None, 3, 10, cycle_momentum=False, three_phase=True)),
    ("CosineAnnealingWarmRestarts(T_0=5, T_mult=2, eta_min=-0.0)",
     lambda o: L.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=2, eta_min=-0.0)),
]


@pytest.mark.parametrize(("text", "make"), EXAMPLES, ids=[t for t, _ in EXAMPLES])
def test_a_spec_builds_the_scheduler_torch_builds(text, make):
    assert_same_schedule(parse_spec(text), make, n_groups=2)


def test_reduce_on_plateau_spec():
    info = parse_spec("ReduceLROnPlateau(mode='max', patience=2, eps=float('inf'), "
                      "min_lr=[0.0, 1e-5])")
    assert info.args["eps"] == math.inf and info.args["min_lr"] == [0.0, 1e-5]
    ours = build_scheduler(info, sgd(2))
    theirs = L.ReduceLROnPlateau(sgd(2), mode="max", patience=2, eps=math.inf,
                                 min_lr=[0.0, 1e-5])
    assert list(differences(ours.state_dict(), theirs.state_dict(), "state")) == []


def test_parsed_info_has_identify_scheduler_shape():
    info = parse_spec("SequentialLR([LinearLR(start_factor=0.1), CyclicLR(0.01, 0.1, "
                      "cycle_momentum=False)], [5])")
    assert info.cls == "SequentialLR" and info.args == {"milestones": [5]}
    linear, cyclic = info.children
    assert linear.args == {"start_factor": 0.1, "end_factor": 1.0, "total_iters": 5}
    # momenta are left out when not cycled, as identify_scheduler reports them
    assert "base_momentum" not in cyclic.args and cyclic.args["scale_fn"] is None
    assert list(parse_spec("OneCycleLR(max_lr=1.0, total_steps=10)").args) == [
        "max_lr", "total_steps", "pct_start", "anneal_strategy", "cycle_momentum",
        "base_momentum", "max_momentum", "div_factor", "final_div_factor", "three_phase"]
    assert parse_spec("ExponentialLR(gamma=inf)").args == {"gamma": math.inf}
    assert math.isnan(parse_spec("ExponentialLR(gamma=float('nan'))").args["gamma"])
    assert parse_spec("ExponentialLR(gamma=-float('1e-3'))").args == {"gamma": -0.001}


# --- refusals ---------------------------------------------------------------------------------

REFUSALS = [
    # evaluation attempts
    ("__import__('os').system('x')", r"refused a call to __import__\('os'\)\.system at column 1"),
    ("CosineAnnealingLR(T_max=__import__('os').getpid())", "refused a call to .* at column 25"),
    ("eval('StepLR(step_size=1)')", "refused a call to eval.*only torch.optim.lr_scheduler"),
    ("os.system('x')", "refused a call to os.system"),
    ("StepLR(step_size=(1).__class__)", "refused attribute access at column 18"),
    ("StepLR(step_size=x)", "refused the name 'x' at column 18"),
    ("StepLR(step_size=[i for i in range(3)])", "refused a comprehension"),
    ("StepLR(step_size=2 * 3)", "refused an operator at column 18 .2 \\* 3."),
    ("StepLR(step_size=f'{1}')", "refused an f-string"),
    ("StepLR(step_size={'a': 1})", "refused a dict"),
    ("StepLR(**{'step_size': 1})", "refused \\*\\* unpacking"),
    ("StepLR(*[1])", "refused \\* unpacking"),
    ("StepLR(step_size=b'1')", "refused a bytes literal"),
    ("StepLR(step_size=float('one'))", "float\\('one'\\).*not a number"),
    ("1 + 1", "refused an operator.*a SPEC is a call such as"),
    ("StepLR(step_size=1", "not valid syntax"),
    # lambdas and functions
    ("LambdaLR(lr_lambda=lambda e: 0.9 ** e)", "LambdaLR takes a function.*my_sched.py:make"),
    ("MultiplicativeLR(lambda e: 0.9)", "MultiplicativeLR takes a function"),
    ("StepLR(step_size=lambda: 1)", "refused a lambda at column 18.*factory"),
    ("lambda e: 0.9", "refused a lambda at column 1"),
    ("CyclicLR(0.01, 0.1, scale_fn='f')", "scale_fn is a function.*factory"),
    # classes and arguments
    ("CosineLR(T_max=3)", ("unknown scheduler class 'CosineLR' .did you mean CosineAnnealingLR.."
                          "; valid: ChainedScheduler, ConstantLR, .*factory")),
    ("torch.optim.lr_scheduler.WarmupLR(x=1)", "unknown scheduler class 'WarmupLR'"),
    ("mylib.StepLR(step_size=1)", "refused a call to mylib.StepLR"),
    ("CosineAnnealingLR(tmax=3)", ("CosineAnnealingLR has no argument 'tmax' .did you mean T_max.."
                                  "; valid: T_max, eta_min")),
    ("CosineAnnealingLR(T_max=3, T_max=4)", "got T_max twice"),
    ("StepLR(1, 0.1, 7)", "at most 2 positional arguments besides the optimizer"),
    ("CosineAnnealingLR()", "CosineAnnealingLR needs T_max"),
    ("CyclicLR(max_lr=0.1)", "CyclicLR needs base_lr"),
    ("SequentialLR(schedulers=[StepLR(2)])", "SequentialLR needs milestones"),
    ("OneCycleLR(max_lr=0.1)", "OneCycleLR needs total_steps"),
    ("CosineAnnealingLR", "call it with its arguments"),
    # what the recompute sets
    ("CosineAnnealingLR(T_max=3, last_epoch=10)", "last_epoch is not an argument.*--step N"),
    ("StepLR(optimizer=0.1, step_size=1)", "optimizer is not an argument"),
    ("StepLR(1, optimizer)", "refused the name 'optimizer'.*checkpoint's optimizer"),
    # nesting
    ("StepLR(step_size=StepLR(step_size=1))", "scheduler calls go only in schedulers="),
    ("SequentialLR(schedulers=[LinearLR(), CosineAnnealingLR()], milestones=[5])",
     "^SPEC schedulers\\[1\\]: CosineAnnealingLR needs T_max$"),
    ("ChainedScheduler([StepLR(1), SequentialLR([StepLR(1), StepLR(1)], [2, 3])])",
     "SPEC schedulers\\[1\\]: SequentialLR has 2 schedulers, so it needs 1 milestone "),
    ("ChainedScheduler(schedulers=[])", "needs at least one scheduler"),
    ("ChainedScheduler(schedulers=StepLR(1))", "a list of scheduler calls"),
    ("ChainedScheduler(schedulers=[1])", "schedulers\\[0\\]: refused an int literal"),
    ("ChainedScheduler([LambdaLR(0.9)])", "schedulers\\[0\\]: LambdaLR takes a function"),
    # other forms
    ("", "SPEC is empty"),
    ("StepLR(step_size=<not stored>)", "step_size=<not stored> is what show writes"),
    ("my_sched.py:3", "'3' is not a function name"),
    ("hf:linear(100, 2000)", "keyword arguments only"),
    ("hf:linear(num_warmup_steps=lambda: 1)", "refused a lambda at column 28"),
    ("hf:linear(last_epoch=3)", "last_epoch is not an argument"),
]


@pytest.mark.parametrize(("text", "message"), REFUSALS, ids=[t for t, _ in REFUSALS])
def test_refusals_say_what_and_where(text, message):
    with pytest.raises(SpecError, match=message) as caught:
        parse_spec(text)
    assert "\n" not in str(caught.value)


def test_nothing_in_a_spec_runs(tmp_path):
    canary = tmp_path / "ran"
    for text in (f"StepLR(step_size=open({str(canary)!r}, 'w').write('x'))",
                 f"__import__('pathlib').Path({str(canary)!r}).touch()",
                 f"hf:linear(n=open({str(canary)!r}, 'w'))"):
        with pytest.raises(SpecError):
            parse_spec(text)
    assert not canary.exists()


def test_importing_spec_does_not_import_torch():
    code = ("import sys, ckpttool.spec\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": root}, check=True)
    assert out.stdout.strip() == "[]"


# --- other SPEC forms ---------------------------------------------------------------------------


def test_hf_specs_parse_to_literal_args():
    assert parse_spec("hf:linear(num_warmup_steps=100, num_training_steps=2000)") == HFSpec(
        "linear", {"num_warmup_steps": 100, "num_training_steps": 2000})
    assert parse_spec("hf:cosine_with_min_lr(num_warmup_steps=10, num_training_steps=100, "
                      "min_lr_rate=0.1, num_cycles=0.5)").args["min_lr_rate"] == 0.1
    assert parse_spec(" hf:constant ") == HFSpec("constant", {})


def test_factory_forms():
    assert parse_spec("my_sched.py:make") == Factory("file", "my_sched.py", "make")
    assert parse_spec("runs/exp 1/sched.py:make_scheduler") == Factory(
        "file", "runs/exp 1/sched.py", "make_scheduler")
    assert parse_spec("train.schedules:cosine") == Factory("module", "train.schedules", "cosine")
    assert parse_spec("train.schedules:cosine").text == "train.schedules:cosine"


FACTORY_FILE = """\
import torch
from helper_for_spec_test import GAMMA  # a neighbour of this file


class Warmup(torch.optim.lr_scheduler.LRScheduler):
    def get_lr(self):
        return [base * min(1.0, (self.last_epoch + 1) / 4) for base in self.base_lrs]


def make(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: GAMMA ** e)


def make_custom(optimizer):
    return Warmup(optimizer)


def make_nothing(optimizer):
    pass


def make_elsewhere(optimizer):
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    return torch.optim.lr_scheduler.StepLR(other, 1)


def make_broken(optimizer):
    raise ValueError("bad warmup")


NOT_A_FUNCTION = 3
"""


@pytest.fixture
def factory_file(tmp_path):
    (tmp_path / "helper_for_spec_test.py").write_text("GAMMA = 0.5\n")
    path = tmp_path / "my_sched.py"
    path.write_text(FACTORY_FILE)
    yield path
    sys.modules.pop("helper_for_spec_test", None)
    sys.modules.pop("_ckpttool_factory_my_sched", None)


def test_a_factory_file_builds_lambdas_and_custom_classes(factory_file):
    path_before = list(sys.path)
    factory = parse_spec(f"{factory_file}:make")
    assert factory.kind == "file"
    opt = sgd(lr=1.0)
    scheduler = factory.build(opt)
    assert isinstance(scheduler, L.LambdaLR) and scheduler.optimizer is opt
    stepped(scheduler, 2)
    assert opt.param_groups[0]["lr"] == 0.25
    custom = parse_spec(f"{factory_file}:make_custom").build(sgd())
    assert type(custom).__name__ == "Warmup"
    assert sys.path == path_before  # the file's folder was on sys.path only while it ran


@pytest.mark.parametrize(("func", "message"), [
    ("missing", "has no 'missing'; it defines Warmup, make, make_broken, make_custom"),
    ("NOT_A_FUNCTION", "NOT_A_FUNCTION is an int, not a function"),
    ("make_nothing", "returned a NoneType, not a torch.optim.lr_scheduler scheduler"),
    ("make_elsewhere", "built its scheduler on another optimizer"),
    ("make_broken", r"make_broken\(optimizer\) raised ValueError: bad warmup"),
])
def test_factory_file_errors(factory_file, func, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(f"{factory_file}:{func}").build(sgd())


def test_factory_file_that_is_missing_or_fails(tmp_path):
    with pytest.raises(SpecError, match="nope.py does not exist"):
        parse_spec(f"{tmp_path}/nope.py:make").load()
    with pytest.raises(SpecError, match="is a folder"):
        Factory("file", str(tmp_path), "make").load()
    broken = tmp_path / "broken_sched.py"
    broken.write_text("1 / 0\n")
    with pytest.raises(SpecError, match="running .*broken_sched.py raised ZeroDivisionError"):
        parse_spec(f"{broken}:make").load()
    assert "_ckpttool_factory_broken_sched" not in sys.modules


@pytest.fixture
def package(tmp_path, monkeypatch):
    pkg = tmp_path / "spec_test_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sched.py").write_text(
        "import torch\n\ndef make(optimizer):\n"
        "    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)\n")
    (pkg / "needs_dep.py").write_text("import not_installed_dependency_xyz\n")
    monkeypatch.chdir(tmp_path)
    yield pkg
    for name in [m for m in sys.modules if m.startswith("spec_test_pkg")]:
        del sys.modules[name]


def test_a_factory_module_from_the_current_directory(package):
    factory = parse_spec("spec_test_pkg.sched:make")
    assert factory == Factory("module", "spec_test_pkg.sched", "make")
    assert isinstance(factory.build(sgd()), L.StepLR)
    with pytest.raises(SpecError, match="no module named 'spec_test_pkg.nothing'"):
        parse_spec("spec_test_pkg.nothing:make").load()
    with pytest.raises(SpecError, match="importing spec_test_pkg.needs_dep raised "
                                        "ModuleNotFoundError.*not_installed_dependency_xyz"):
        parse_spec("spec_test_pkg.needs_dep:make").load()
    with pytest.raises(SpecError, match="module spec_test_pkg.sched has no 'other'; it "
                                        "defines make"):
        parse_spec("spec_test_pkg.sched:other").load()


# --- --set ------------------------------------------------------------------------------------

WARMUP_COSINE = ("SequentialLR(schedulers=[LinearLR(start_factor=0.1, total_iters=5), "
                 "CosineAnnealingLR(T_max=20)], milestones=[5])")


def test_set_a_top_level_argument():
    info = parse_spec("StepLR(step_size=10)")
    new = apply_sets(info, ["gamma=0.5", "step_size = 20"])
    assert new.args == {"step_size": 20, "gamma": 0.5}
    assert info.args == {"step_size": 10, "gamma": 0.1}  # a new info; the old one unchanged
    assert apply_sets(info, []) == info


def test_set_reaches_the_one_child_that_has_the_argument():
    new = apply_sets(parse_spec(WARMUP_COSINE), ["T_max=40", "start_factor=0.25"])
    assert format_call(new) == ("SequentialLR(schedulers=[LinearLR(start_factor=0.25), "
                                "CosineAnnealingLR(T_max=40)], milestones=[5])")
    assert_same_schedule(new, lambda o: L.SequentialLR(o, [
        L.LinearLR(o, start_factor=0.25), L.CosineAnnealingLR(o, T_max=40)], [5]))


def test_set_top_level_wins_and_full_addresses_reach_any_child():
    info = parse_spec("SequentialLR([MultiStepLR([2, 4]), StepLR(3)], milestones=[6])")
    new = apply_sets(info, ["milestones=[8]", "schedulers[0].milestones=[1, 3]"])
    assert new.args["milestones"] == [8]
    assert new.children[0].args["milestones"] == [1, 3]
    nested = parse_spec(f"ChainedScheduler([{WARMUP_COSINE}, ExponentialLR(gamma=0.99)])")
    new = apply_sets(nested, ["schedulers[0].schedulers[1].eta_min=1e-5", "gamma=0.9",
                              "T_max=30"])
    assert new.children[0].children[1].args == {"T_max": 30, "eta_min": 1e-5}
    assert new.children[1].args == {"gamma": 0.9}


def test_set_ambiguous_names_list_the_addresses():
    info = parse_spec("SequentialLR([LinearLR(), ConstantLR()], milestones=[5])")
    with pytest.raises(SpecError, match=r"^--set total_iters: several sub-schedulers have "
                                        r"total_iters; address one: schedulers\[0\]\.total_iters, "
                                        r"schedulers\[1\]\.total_iters$"):
        apply_sets(info, ["total_iters=10"])
    new = apply_sets(info, ["schedulers[1].total_iters=10"])
    assert new.children[1].args["total_iters"] == 10 and new.children[0].args["total_iters"] == 5


@pytest.mark.parametrize(("info_text", "assignment", "message"), [
    ("CosineAnnealingLR(T_max=3)", "tmax=5", ("CosineAnnealingLR has no argument 'tmax' "
                                             r"\(did you mean T_max\?\); valid: T_max, eta_min")),
    (WARMUP_COSINE, "tmax=5", (r"no scheduler in SequentialLR has an argument 'tmax' \(did you "
                              r"mean T_max\?\); valid: milestones, schedulers\[0\].start_factor, "
                              r"schedulers\[0\].end_factor, schedulers\[0\].total_iters, "
                              r"schedulers\[1\].T_max, schedulers\[1\].eta_min")),
    (WARMUP_COSINE, "schedulers[1].gamma=5", "CosineAnnealingLR has no argument 'gamma'"),
    (WARMUP_COSINE, "schedulers[2].T_max=5",
     r"schedulers\[2\]: SequentialLR has 2 sub-schedulers, schedulers\[0\] to schedulers\[1\]"),
    (WARMUP_COSINE, "schedulers[1].schedulers[0].T_max=5",
     r"schedulers\[1\].schedulers\[0\]: CosineAnnealingLR has no sub-schedulers"),
    (WARMUP_COSINE, "schedulers(1).T_max=5", "is not NAME or schedulers"),
    (WARMUP_COSINE, "milestones=[5, 10]", "2 schedulers, so it needs 1 milestone"),
    (WARMUP_COSINE, "schedulers=[]", "with --scheduler SPEC"),
    ("StepLR(1)", "last_epoch=3", "last_epoch is not an argument"),
    ("StepLR(1)", "gamma", "expected NAME=VALUE"),
    ("StepLR(1)", "gamma=", "expected NAME=VALUE"),
    ("StepLR(1)", "gamma=x", "refused the name 'x' at column 1"),
    ("StepLR(1)", "gamma=0.1 * 2", "refused an operator"),
    ("StepLR(1)", "gamma=__import__('os')", "refused a call to __import__"),
    ("CyclicLR(0.01, 0.1)", "scale_fn=max", "refused the name 'max'"),
    ("OneCycleLR(max_lr=1.0, total_steps=10)", "total_steps=None", "needs total_steps"),
])
def test_set_refusals(info_text, assignment, message):
    with pytest.raises(SpecError, match=message):
        apply_sets(parse_spec(info_text), [assignment])


def test_set_bare_words_are_strings_only_for_string_arguments():
    info = parse_spec("OneCycleLR(max_lr=1.0, total_steps=10)")
    assert apply_sets(info, ["anneal_strategy=linear"]).args["anneal_strategy"] == "linear"
    assert apply_sets(info, ["anneal_strategy='linear'"]).args["anneal_strategy"] == "linear"
    assert apply_sets(info, ["div_factor=inf"]).args["div_factor"] == math.inf


def test_set_on_states_that_cannot_take_it():
    lam = identify_scheduler(L.LambdaLR(sgd(), lambda e: 1.0).state_dict())
    with pytest.raises(SpecError, match="lr_lambda is a function.*factory"):
        apply_sets(lam, ["lr_lambda=1"])
    unknown = identify_scheduler({"base_lrs": [0.1], "last_epoch": 1, "warmup": 3})
    with pytest.raises(SpecError, match="not recognised.*--scheduler SPEC"):
        apply_sets(unknown, ["warmup=4"])


def test_set_supplies_arguments_the_checkpoint_lacks():
    opt = sgd(2)
    sched = L.OneCycleLR(opt, max_lr=[1.0, 0.5], total_steps=100, div_factor=10.0)
    state = stepped(sched, 7)
    groups = copy.deepcopy(opt.state_dict()["param_groups"])
    info = identify_scheduler(state)  # without the groups: max_lr and friends are lost
    assert info.missing == ("max_lr", "base_momentum", "max_momentum", "div_factor",
                            "final_div_factor") and not info.replayable
    partly = apply_sets(info, ["max_lr=[1.0, 0.5]", "div_factor=10.0"])
    assert partly.missing == ("base_momentum", "max_momentum", "final_div_factor")
    assert partly.unrecoverable == info.unrecoverable and not partly.replayable
    full = apply_sets(partly, ["base_momentum=0.85", "max_momentum=0.95",
                               "final_div_factor=1e4"])
    assert not full.missing and not full.unrecoverable and full.replayable
    assert full == identify_scheduler(state, groups)
    assert verify("SGD", groups, state, full).identical is True


# --- --lr / --scale-lr ------------------------------------------------------------------------


def test_lr_options():
    current = [0.1, 0.2, 0.3]
    assert parse_lr_options([], None, 3, current) == current
    assert parse_lr_options(["1e-3"], None, 3, current) == [0.001] * 3
    assert parse_lr_options(["2=5e-4", "0 = 1e-4"], None, 3, current) == [1e-4, 0.2, 5e-4]
    assert parse_lr_options(["1=0", "1e-3"], None, 3, current) == [0.001, 0.0, 0.001]
    assert parse_lr_options([], 0.5, 3, current) == [0.05, 0.1, 0.15]


@pytest.mark.parametrize(("lr", "scale", "message"), [
    (["1e-3"], 0.5, "--lr and --scale-lr together"),
    (["3=1e-3"], None, "no param group '3'; the optimizer has 3 groups, 0 to 2"),
    (["-1=1e-3"], None, "no param group '-1'"),
    (["x=1e-3"], None, "no param group 'x'"),
    (["1=1e-3", "1=2e-3"], None, "group 1 given twice"),
    (["1e-3", "2e-3"], None, "--lr VALUE given twice"),
    (["fast"], None, "'fast' is not a number"),
    (["nan"], None, "finite number >= 0"),
    (["-1e-3"], None, "finite number >= 0"),
    (["0=inf"], None, "finite number >= 0"),
    ([], 0.0, "--scale-lr: the factor is a finite number > 0"),
    ([], math.inf, "--scale-lr: the factor is a finite number > 0"),
])
def test_lr_option_errors(lr, scale, message):
    with pytest.raises(SpecError, match=message):
        parse_lr_options(lr, scale, 3, [0.1, 0.2, 0.3])


@pytest.mark.parametrize("text, expected", [
    ("lr_scheduler.CosineAnnealingLR(optimizer, T_max=100, eta_min=1e-05)",
     "CosineAnnealingLR(T_max=100, eta_min=1e-05)"),
    ("scheduler = lr_scheduler.StepLR(optimizer, 3)", "StepLR(step_size=3)"),
    ("lr_scheduler.ChainedScheduler([lr_scheduler.ConstantLR(optimizer, factor=0.5), "
     "lr_scheduler.ExponentialLR(optimizer, gamma=0.9)], optimizer=optimizer)",
     "ChainedScheduler(schedulers=[ConstantLR(factor=0.5), ExponentialLR(gamma=0.9)])"),
])
def test_the_printed_constructor_line_reads_back(text, expected):
    """`reschedule` prints the line for the training script; pasted into --scheduler it works."""
    assert format_call(parse_spec(text)) == expected
