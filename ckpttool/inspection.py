"""What the states in a checkpoint are: optimizer classes, scheduler classes and arguments,
and the consistency problems (findings) that would break a resume.

Everything here works on the tree the safe reader produced; the only bytes it reads are scalar
tensors (a tensor learning rate, Adam's ``step``), through :class:`TorchFile`.

Example:
    >>> import ckpttool
    >>> ckpt = ckpttool.load("fixtures/adamw_cosine.pt")        # doctest: +SKIP
    >>> ckpt.optimizers[0].cls, ckpt.schedulers[0].cls            # doctest: +SKIP
    ('AdamW', 'CosineAnnealingLR')
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ckpttool import layout
from ckpttool.directories import HFRun, hf_run, read_any
from ckpttool.errors import CkptToolError, StateError, UnsafeCheckpointError
from ckpttool.schedulers import (
    SCHEDULER_SET_KEYS,
    SchedulerInfo,
    identify_scheduler,
    int_text,
    same,
    value_repr,
)
from ckpttool.serialization import (
    _DTYPE_NAMES,
    Opaque,
    TensorRef,
    TorchFile,
    dotted_name,
    is_dangerous_global,
    name_calls,
    scalar_value,
    trusted_calls,
    walk,
)

# --- optimizer identification ----------------------------------------------------------------

# Group keys every torch optimizer may carry as behaviour flags; they say nothing about the class
# (their set changed across torch releases).
OPTIMIZER_FLAGS = frozenset({"foreach", "maximize", "capturable", "differentiable", "fused",
                             "decoupled_weight_decay"})
# Keys of a group that are bookkeeping, not hyperparameters.
GROUP_BOOKKEEPING = frozenset({"params", "param_names"})

# The hyperparameter keys of each torch.optim class in torch 2.13, flags and scheduler keys
# removed (verified against real optimizers in tests/test_inspection.py).
OPTIMIZER_SIGNATURES: dict[str, frozenset[str]] = {
    "SGD": frozenset({"lr", "momentum", "dampening", "weight_decay", "nesterov"}),
    "Adam": frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad"}),
    "AdamW": frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad"}),
    "RMSprop": frozenset({"lr", "momentum", "alpha", "eps", "centered", "weight_decay"}),
    "Adagrad": frozenset({"lr", "lr_decay", "eps", "weight_decay", "initial_accumulator_value"}),
    "Adadelta": frozenset({"lr", "rho", "eps", "weight_decay"}),
    "Adamax": frozenset({"lr", "betas", "eps", "weight_decay"}),
    "RAdam": frozenset({"lr", "betas", "eps", "weight_decay"}),
    "NAdam": frozenset({"lr", "betas", "eps", "weight_decay", "momentum_decay"}),
    "ASGD": frozenset({"lr", "lambd", "alpha", "t0", "weight_decay"}),
    "Rprop": frozenset({"lr", "etas", "step_sizes"}),
    "LBFGS": frozenset({"lr", "max_iter", "max_eval", "tolerance_grad", "tolerance_change",
                        "history_size", "line_search_fn"}),
    "SparseAdam": frozenset({"lr", "betas", "eps"}),
    "Adafactor": frozenset({"lr", "beta2_decay", "eps", "d", "weight_decay"}),
    "Muon": frozenset({"lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps",
                       "ns_steps", "adjust_lr_fn"}),
}
# A group may carry a few keys of the user's own (a "name", a tag: strings) and still be that
# class; more unexplained keys than this means another library's optimizer.
_MAX_EXTRA_GROUP_KEYS = 2


@dataclass(frozen=True)
class OptimizerClass:
    """The inferred optimizer class: a name, or "unknown" with the candidates that fit."""

    name: str
    candidates: tuple[str, ...] = ()
    extra_keys: tuple[str, ...] = ()


def identify_optimizer(state: Mapping) -> OptimizerClass:
    """Infer the torch.optim class from a state's group keys (and per-parameter state keys).

    Adam and AdamW share every key; torch >= 2.7 (where Adam gained the flag and AdamW became
    Adam with it set) tells them apart by ``decoupled_weight_decay``; older states are "unknown"
    with both as candidates. Adamax and RAdam share their hyperparameters: Adamax keeps
    ``exp_inf`` per parameter, RAdam has the ``decoupled_weight_decay`` flag (torch >= 2.1).
    A group with unexplained keys that hold numbers or flags (FusedAdam's ``bias_correction``,
    transformers.AdamW's ``correct_bias``) is another library's optimizer: "unknown", with the
    torch classes it resembles as candidates.

    Example:
        >>> identify_optimizer({"state": {}, "param_groups": [{"params": [0], "lr": 0.1,
        ...     "betas": (0.9, 0.999), "eps": 1e-06, "weight_decay": 0.0, "correct_bias": True}]})
        OptimizerClass(name='unknown', candidates=('Adamax', 'RAdam'), extra_keys=('correct_bias',))
    """
    groups = state.get("param_groups") or []
    if not groups or not isinstance(groups[0], Mapping):
        return OptimizerClass("unknown")
    group = groups[0]
    keys = {k for k in group if isinstance(k, str)} - OPTIMIZER_FLAGS - GROUP_BOOKKEEPING
    keys -= set(SCHEDULER_SET_KEYS)
    exact = [n for n, sig in OPTIMIZER_SIGNATURES.items() if sig == keys]
    if exact:
        fitting, extras = exact, ()
    else:
        subsets = [n for n, sig in OPTIMIZER_SIGNATURES.items() if sig <= keys]
        if not subsets:
            return OptimizerClass("unknown")
        best = max(len(OPTIMIZER_SIGNATURES[n]) for n in subsets)
        fitting = [n for n in subsets if len(OPTIMIZER_SIGNATURES[n]) == best]
        extras = tuple(sorted(keys - OPTIMIZER_SIGNATURES[fitting[0]]))
        # A user's own key names or tags a group (a string); one holding a number or a flag is
        # a hyperparameter of an algorithm torch's class does not have.
        if len(extras) > _MAX_EXTRA_GROUP_KEYS or any(
                not isinstance(group[k], str) for k in extras):
            return OptimizerClass("unknown", tuple(fitting), extras)
    state_keys = _state_keys(state)
    if "Adam" in fitting:
        decoupled = group.get("decoupled_weight_decay")
        fitting = (["AdamW"] if decoupled is True else ["Adam"] if decoupled is False
                   else ["Adam", "AdamW"])
    if "Adamax" in fitting:
        if "exp_inf" in state_keys:
            fitting = ["Adamax"]
        elif "decoupled_weight_decay" in group:
            fitting = ["RAdam"]
    if len(fitting) == 1:
        return OptimizerClass(fitting[0], (), extras)
    return OptimizerClass("unknown", tuple(fitting), extras)


def _state_keys(state: Mapping) -> list[str]:
    per_param = state.get("state")
    if isinstance(per_param, Mapping):
        for entry in per_param.values():
            if isinstance(entry, Mapping):
                return [str(k) for k in entry]
    return []


# --- result objects ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorLR:
    """Where a tensor learning rate lives: recomputes re-step it in this dtype, on this device."""

    dtype: str
    device: str

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "device": self.device}


@dataclass(frozen=True)
class GroupInfo:
    """One param group: its size, learning rates and other hyperparameters."""

    index: int
    num_params: int
    lr: Any
    initial_lr: Any
    lr_tensor: TensorLR | None
    hyper: dict[str, Any]


@dataclass(frozen=True)
class OptimizerInfo:
    """One optimizer state found in a checkpoint."""

    location: str
    cls: str
    candidates: tuple[str, ...]
    groups: tuple[GroupInfo, ...]
    params_with_state: int
    step: float | int | None
    state_keys: tuple[str, ...]
    state: Mapping = field(repr=False, compare=False)
    extra_keys: tuple[str, ...] = ()  # group keys no candidate class explains


@dataclass(frozen=True)
class SchedulerReport:
    """One scheduler state: counters and lrs as stored, class and arguments from ``info``.

    ``optimizer`` is the location of the optimizer it drives (None: unpaired or ambiguous) and
    ``pairing`` the evidence that decided it, or why there is none ("ambiguous: A or B").
    """

    location: str | None
    optimizer: str | None
    pairing: str | None
    last_epoch: int | None
    step_count: int | None
    base_lrs: list | None
    last_lr: list | None
    children: tuple[SchedulerReport, ...]
    info: SchedulerInfo = field(repr=False)
    state: Any = field(repr=False, compare=False)
    verify: Any = None  # a schedule.VerifyResult after --verify
    # The schedule by name when the checkpoint says it elsewhere: an HF Trainer's LambdaLR is
    # `hf:linear(num_warmup_steps=5, num_training_steps=40)` from training_args.bin.
    named: str | None = None

    @property
    def cls(self) -> str:
        return self.info.cls

    @property
    def args(self) -> dict[str, Any]:
        return self.info.args

    @property
    def call(self) -> str:
        return self.info.call

    @property
    def candidates(self) -> tuple[str, ...]:
        return self.info.candidates

    @property
    def unrecoverable(self) -> tuple[str, ...]:
        """What cannot be recovered, its sub-schedulers' included (``schedulers[i] (Cls): ...``)."""
        return self.info.unrecoverable + tuple(
            f"schedulers[{i}] ({child.cls}): {text}"
            for i, child in enumerate(self.children) for text in child.unrecoverable)


@dataclass(frozen=True)
class Finding:
    """A consistency problem, with a stable code and a one-line hint of the fix."""

    code: str
    severity: str  # "error" | "warning" | "info"
    location: str
    message: str
    hint: str = ""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as ckpttool sees it: its optimizers, schedulers and findings.

    Returned by :func:`ckpttool.load`; the raw file (tree and tensor records) is ``file``.
    """

    path: str
    kind: str
    size: int
    optimizers: tuple[OptimizerInfo, ...]
    schedulers: tuple[SchedulerReport, ...]
    findings: tuple[Finding, ...]
    unsafe_globals: tuple[str, ...]
    file: TorchFile = field(repr=False, compare=False)
    hf: HFRun | None = None  # an HF Trainer folder's schedule settings

    def optimizer(self, location: str) -> OptimizerInfo:
        """The optimizer at ``location`` (see :attr:`OptimizerInfo.location`)."""
        for opt in self.optimizers:
            if opt.location == location:
                return opt
        raise KeyError(location)


# --- reading values ----------------------------------------------------------------------------


class _Values:
    """Turns tree values into plain Python values, decoding scalar tensors from the file."""

    def __init__(self, file: TorchFile):
        self.file = file
        # By identity: equal-looking refs of two files of a folder (both "storage 0") are not
        # the same tensor.
        self._scalars: dict[int, Any] = {}

    def plain(self, value: Any) -> Any:
        """``value`` with its scalar tensors decoded (and containers copied).

        Raises:
            InputError: a tensor's bytes are missing or damaged.
        """
        if isinstance(value, TensorRef):
            if value.numel == 1 and value.storage is not None:
                if id(value) not in self._scalars:
                    try:
                        self._scalars[id(value)] = self.file.scalar(value)
                    except ValueError:  # a dtype decoded only by torch stays a description
                        self._scalars[id(value)] = value
                return self._scalars[id(value)]
            return value
        if isinstance(value, tuple):
            return tuple(self.plain(v) for v in value)
        if isinstance(value, list):
            return [self.plain(v) for v in value]
        if isinstance(value, Mapping):
            return {k: self.plain(v) for k, v in value.items()}
        return scalar_value(value)  # a numpy scalar (np.logspace sweeps) as its number

    def evidence(self, value: Any) -> Any:
        """:meth:`plain`, or the value as stored when it cannot be decoded: for weighing pairing
        evidence, where an unreadable tensor is simply no evidence (its description then says
        what is wrong with it)."""
        try:
            return self.plain(value)
        except Exception:
            return value


def _tensor_lr(value: Any) -> TensorLR | None:
    return TensorLR(value.dtype, value.device) if isinstance(value, TensorRef) else None


def _key_name(key: Any) -> str:
    return key if isinstance(key, str) else value_repr(key)


def _is_number(value: Any) -> bool:
    """An int or a float that is not NaN (bools are flags, not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return not (isinstance(value, float) and math.isnan(value))


def _describe_optimizer(site: layout.Site, values: _Values) -> OptimizerInfo:
    state = site.state
    klass = identify_optimizer(state)
    groups = []
    for index, g in enumerate(state["param_groups"]):
        hyper = {_key_name(k): values.plain(v) for k, v in g.items()
                 if k not in GROUP_BOOKKEEPING and k not in ("lr", "initial_lr")}
        params = g.get("params")
        groups.append(GroupInfo(index, len(params) if isinstance(params, (list, tuple)) else 0,
                                values.plain(g.get("lr")), values.plain(g.get("initial_lr")),
                                _tensor_lr(g.get("lr")), hyper))
    per_param = state["state"]
    steps = [values.plain(e.get("step")) for e in per_param.values()
             if isinstance(e, Mapping) and "step" in e]
    steps = [s for s in steps if _is_number(s)]
    step = max(steps) if steps else None
    return OptimizerInfo(site.location, klass.name, klass.candidates, tuple(groups),
                         len(per_param), step, tuple(_state_keys(state)), state,
                         klass.extra_keys)


def _describe_scheduler(state: Any, info: SchedulerInfo, values: _Values, *,
                        location: str | None = None, optimizer: str | None = None,
                        pairing: str | None = None) -> SchedulerReport:
    """The report of one scheduler state, given what identify_scheduler made of it."""
    subs = state.get("_schedulers") if isinstance(state, Mapping) else None
    subs = list(subs) if isinstance(subs, (list, tuple)) else []
    kids = tuple(_describe_scheduler(sub, child, values)
                 for sub, child in zip(subs, info.children))
    get = state.get if isinstance(state, Mapping) else (lambda key: None)
    return SchedulerReport(
        location, optimizer, pairing,
        _int_or_none(get("last_epoch")), _int_or_none(get("_step_count")),
        _list_or_none(values.plain(get("base_lrs"))),
        _list_or_none(values.plain(get("_last_lr"))), kids, info, state)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _list_or_none(value: Any) -> list | None:
    return list(value) if isinstance(value, (list, tuple)) else None


def _leaves(sched: SchedulerReport) -> Iterator[SchedulerReport]:
    """The non-composite schedulers of a report, in the order a script constructs them."""
    if sched.children:
        for child in sched.children:
            yield from _leaves(child)
    else:
        yield sched


def _initial_lr_source(sched: SchedulerReport) -> SchedulerReport:
    """The scheduler whose base_lrs the groups' initial_lr must equal.

    Each scheduler reads base_lrs from initial_lr when built; the first one sets initial_lr
    (setdefault), so for a SequentialLR / ChainedScheduler it is the first sub-scheduler, unless
    a later OneCycleLR assigned initial_lr anew (it does not setdefault): then the last of those.
    """
    leaves = list(_leaves(sched))
    onecycles = [leaf for leaf in leaves if leaf.cls == "OneCycleLR"]
    return onecycles[-1] if onecycles else leaves[0]


# --- findings --------------------------------------------------------------------------------


def _findings_for_optimizer_schedulers(opt: OptimizerInfo,
                                       scheds: list[SchedulerReport]) -> list[Finding]:
    """Findings about an optimizer and the schedulers that drive it (usually one; torch's
    chaining steps several in turn, and then the group lr is the last one's _last_lr)."""
    out: list[Finding] = []
    groups = opt.groups
    fitting = []
    for sched in scheds:
        loc = sched.location or ""
        source = _initial_lr_source(sched)
        counts = {len(x) for x in (sched.last_lr, source.base_lrs) if x is not None}
        wrong = sorted(n for n in counts if n != len(groups))
        if wrong:
            out.append(Finding(
                "group-count-mismatch", "error", loc,
                f"{opt.location} has {len(groups)} param groups but {loc} has lrs for "
                f"{wrong[0]}",
                "they are not from the same run; loading them together raises or drops groups: "
                "pair the right files, or rebuild the schedule with `ckpttool reschedule`"))
            continue
        fitting.append(sched)
        out += _initial_lr_findings(opt, sched, source)
    with_lr = [s for s in fitting if s.last_lr is not None]
    bad = [i for i, g in enumerate(groups) if with_lr and not any(
        same(g.lr, s.last_lr[i]) for s in with_lr)]
    if bad:
        i, last = bad[0], with_lr[-1]
        others = [s.location or "" for s in with_lr[:-1]]
        out.append(Finding(
            "lr-mismatch", "error", opt.location,
            f"group {i} lr {value_repr(groups[i].lr)} != {last.location or ''} _last_lr "
            f"{value_repr(last.last_lr[i])}"
            + (f" (nor the _last_lr of {', '.join(others)})" if others else "")
            + (f" (and {len(bad) - 1} more groups)" if len(bad) > 1 else ""),
            "the lr was edited by hand or the files are from different steps; the next "
            "step of a recursive scheduler rescales the edited value: use `ckpttool "
            "reschedule --lr` to change lrs"))
    return out


def _initial_lr_findings(opt: OptimizerInfo, sched: SchedulerReport,
                         source: SchedulerReport) -> list[Finding]:
    out: list[Finding] = []
    loc, groups, base_lrs = sched.location or "", opt.groups, source.base_lrs
    if base_lrs is None:
        return out
    epoch = sched.last_epoch if sched.last_epoch is not None else source.last_epoch
    missing = [i for i, g in enumerate(groups) if g.initial_lr is None]
    if missing and (epoch or 0) > 0:
        out.append(Finding(
            "missing-initial-lr", "error", opt.location,
            f"group {missing[0]} has no initial_lr but {loc} is at last_epoch {int_text(epoch)}",
            "constructing the scheduler with last_epoch>0 raises KeyError and OneCycleLR "
            "needs it every step: run `ckpttool reschedule` to restore it"))
    bad = [i for i, g in enumerate(groups)
           if g.initial_lr is not None and not same(g.initial_lr, base_lrs[i])]
    if bad:
        i = bad[0]
        whose = loc if source is sched else f"{loc} (its first sub-scheduler)" if (
            source.cls != "OneCycleLR") else f"{loc} (its OneCycleLR)"
        out.append(Finding(
            "initial-lr-mismatch", "error", opt.location,
            f"group {i} initial_lr {value_repr(groups[i].initial_lr)} != {whose} base_lrs "
            f"{value_repr(base_lrs[i])}",
            "a resume takes base_lrs from the scheduler but a rebuilt scheduler takes "
            "initial_lr from the group: use `ckpttool reschedule --lr` to change base lrs"))
    return out


def _findings_for_scheduler(sched: SchedulerReport) -> list[Finding]:
    out: list[Finding] = []
    loc = sched.location or ""
    if sched.cls == "OneCycleLR":
        total = sched.args.get("total_steps")
        epoch = sched.last_epoch
        if isinstance(total, int) and not isinstance(total, bool) and epoch is not None:
            if epoch >= total:
                out.append(Finding(
                    "onecycle-exhausted", "error", loc,
                    f"OneCycleLR is at step {int_text(epoch)} of total_steps={int_text(total)}: "
                    f"the next step raises \"Tried to step {int_text(epoch + 1)} times\"",
                    "to train on, extend the cycle: `ckpttool reschedule --set "
                    "total_steps=N`"))
            elif epoch == total - 1:
                out.append(Finding(
                    "onecycle-finished", "warning", loc,
                    f"OneCycleLR has finished its {int_text(total)} steps: the next step "
                    "overshoots (lr rises again) and the one after raises",
                    "extend the cycle with `ckpttool reschedule --set total_steps=N`"))
    for text in sched.unrecoverable:
        if "lambda" in text.lower():
            out.append(Finding(
                "lambda-not-stored", "warning", loc, text,
                "to replay or reschedule it, pass the function: `--scheduler my_sched.py:make` "
                "(a function that takes the optimizer and returns the scheduler)"))
        else:
            out.append(Finding(
                "not-recoverable", "warning", loc, text,
                "to replay or reschedule it, give the schedule in full: `--scheduler SPEC`, or "
                "`--scheduler my_sched.py:make` (a function that takes the optimizer and "
                "returns the scheduler)"))
    return out


def _findings_for_optimizer(opt: OptimizerInfo) -> list[Finding]:
    out: list[Finding] = []
    tensors = [g for g in opt.groups if g.lr_tensor is not None]
    if tensors:
        t = tensors[0].lr_tensor
        out.append(Finding(
            "tensor-lr", "info", opt.location,
            f"lr is a {t.dtype} tensor on {t.device} in {len(tensors)} of {len(opt.groups)} "
            "groups; schedulers update it in place in that dtype",
            f"recomputes re-step it as {t.dtype} on {t.device} (`--device` to choose); "
            "foreach=True optimizers need capturable=True for tensor lrs"))
    if opt.cls == "unknown":
        keys = sorted({k for g in opt.groups for k in g.hyper} - OPTIMIZER_FLAGS)
        resembles = ""
        if opt.candidates and opt.extra_keys:
            resembles = (f" (the keys of {' or '.join(opt.candidates)} plus "
                         f"{', '.join(opt.extra_keys)}: another library's optimizer?)")
        elif opt.candidates:
            resembles = f" (could be {' or '.join(opt.candidates)})"
        out.append(Finding(
            "unknown-optimizer", "info", opt.location,
            f"optimizer class not recognised from its group keys{resembles}: {', '.join(keys)}"
            if opt.groups else "the optimizer has no param groups: its class cannot be told",
            "recomputes use a generic stand-in optimizer with the same group keys"))
    return out


# Globals torch.load(weights_only=True) accepts (torch/_weights_only_unpickler.py), beyond the
# dtypes, storage classes and torch._utils._rebuild_* functions matched by prefix below.
_WEIGHTS_ONLY_GLOBALS = frozenset({
    "collections.OrderedDict", "collections.Counter", "torch.nn.parameter.Parameter",
    "torch.serialization._get_layout", "torch.Size", "torch.Tensor", "torch.device",
    "_codecs.encode", "builtins.bytearray", "builtins.set", "builtins.complex",
    "torch._tensor._rebuild_from_type_v2",
})


# Quantization schemes torch's weights_only loader also allows.
_QSCHEMES = frozenset({"per_tensor_affine", "per_tensor_symmetric", "per_channel_affine",
                       "per_channel_symmetric", "per_channel_affine_float_qparams"})


def _weights_only_allows(dotted: str) -> bool:
    if dotted.startswith("__builtin__."):  # protocol 2's spelling; torch maps it to builtins
        dotted = "builtins." + dotted.removeprefix("__builtin__.")
    if dotted in _WEIGHTS_ONLY_GLOBALS or dotted.startswith("torch._utils._rebuild_"):
        return True
    module, _, name = dotted.rpartition(".")
    return module in ("torch", "torch.storage") and (
        name.endswith("Storage") or name.endswith("Tensor") or name in _DTYPE_NAMES
        or name in _QSCHEMES)


def _dangerous_calls(root: Any) -> list[str]:
    """Calls of code-running globals recorded in the tree, as `name(args)` strings."""
    calls = []
    for _, value in walk(root):
        if isinstance(value, Opaque) and value.dangerous:
            args = ", ".join(value_repr(a)[:60] for a in value.args)
            calls.append(f"{value.dotted}({args})")
        elif dotted_name(value) and is_dangerous_global(dotted_name(value)):
            calls.append(dotted_name(value))
    return calls


# --- verification (imports torch) -------------------------------------------------------------


def _verify_all(file: TorchFile, optimizers: list[OptimizerInfo | None],
                paired: list[tuple[SchedulerReport, layout.Pairing]], hf: HFRun | None = None,
                progress: Callable[[int, int], None] | None = None) -> list[SchedulerReport]:
    """The scheduler reports with their replay verdicts attached (see schedule.verify_together).

    The schedulers of one optimizer are replayed together, built in file order and stepped in
    turn, as torch's chaining runs them; a state that cannot be read or replayed gets the reason.
    An HF Trainer's scheduler is rebuilt from its ``hf:`` name (through transformers), and the
    lrs of trainer_state.json's log are compared with the same replay.
    """
    from ckpttool import schedule, spec

    verdicts: dict[int, Any] = {}
    for index, opt in enumerate(optimizers):
        mine = [i for i, (_, p) in enumerate(paired) if p.optimizer == index]
        if not mine:
            continue
        try:
            if opt is None:
                raise StateError("its optimizer state is unreadable")
            groups = schedule.materialize(list(opt.state["param_groups"]), file)
            scheds = [(schedule.materialize(paired[i][0].state, file), paired[i][0].info)
                      for i in mine]
            named = [spec.parse_spec(paired[i][0].named) if is_hf_named(paired[i][0]) else None
                     for i in mine]
            logged = hf.logged if hf is not None and any(named) else ()
            results = schedule.verify_together(opt.cls, groups, scheds, named=named,
                                               logged=logged, progress=progress)
        except CkptToolError as e:
            results = [schedule.VerifyResult(None, reason=str(e))] * len(mine)
        except Exception as e:  # damage the replay trips over; the report stands without it
            results = [schedule.VerifyResult(None, reason=_exception_text(e))] * len(mine)
        verdicts.update(zip(mine, results))
    out = []
    for i, (sched, pairing) in enumerate(paired):
        result = verdicts.get(i) or schedule.VerifyResult(None, reason=(
            f"the file does not say which optimizer it drives ({pairing.reason})"
            if pairing.tied else "no optimizer in this file to replay it on"))
        out.append(replace(sched, verify=result))
    return out


def _verify_findings(sched: SchedulerReport) -> list[Finding]:
    v, loc = sched.verify, sched.location or ""
    if v.identical is False:
        return [Finding(
            "verify-mismatch", "error", loc,
            f"not what a clean run of {v.call or sched.call} holds at this step: "
            f"{v.first_difference}",
            "the state was edited or built another way; `ckpttool reschedule` rewrites it to "
            "the clean replay")]
    if v.identical is None:
        return [Finding("verify-unavailable", "info", loc, f"cannot replay: {v.reason}")]
    return []


# The file of an HF Trainer folder that holds the log of learning rates.
HF_STATE_FILE = "trainer_state.json"
# How each convention reads, for findings (see schedule.LOGGED_OFFSETS).
LOGGED_RULES = {
    "before-step": "the lr logged with step N is the replay's after N - 1 steps, the lr step N "
                   "used: transformers >= 4.51 reads it before stepping the scheduler",
    "after-step": "the lr logged with step N is the replay's after N steps: transformers < 4.51 "
                  "reads it after stepping the scheduler",
}


def is_hf_named(sched: SchedulerReport) -> bool:
    """A scheduler named after an HF Trainer folder's settings (an ``hf:`` SPEC)."""
    return (sched.named or "").startswith("hf:")


def _logged_findings(sched: SchedulerReport) -> list[Finding]:
    """trainer_state.json's logged lrs against the clean replay of the named HF schedule."""
    check = sched.verify.logged if sched.verify is not None else None
    if check is None:
        return []
    call = sched.verify.call
    skipped = (f"; {check.beyond} logged after the scheduler's step {sched.verify.steps} (or "
               "before step 1) not compared" if check.beyond else "")
    rule = LOGGED_RULES[check.convention]
    if check.agrees:
        return [Finding(
            "hf-logged-lr", "info", HF_STATE_FILE,
            f"all {check.checked} learning_rate values logged in log_history equal a clean "
            f"replay of {call} ({rule}){skipped}")]
    step, logged, replayed = check.first_mismatch
    if sched.verify.identical:
        # The state resumes as the named schedule; the log is history, e.g. of the schedule
        # the run had before `ckpttool reschedule` changed it.
        severity, hint = "warning", (
            "the stored state follows this schedule, so a resume is unaffected; the logged lrs "
            "come from another schedule: the one the run had before it was changed (as "
            "`ckpttool reschedule` does), or trainer_state.json comes from another run")
    else:
        severity, hint = "error", (
            "trainer_state.json was edited, or comes from another run or settings than "
            "scheduler.pt and training_args.bin; take all three from one checkpoint-N folder")
    return [Finding(
        "hf-logged-lr-mismatch", severity, HF_STATE_FILE,
        f"log_history step {int_text(step)} logged learning_rate {logged!r}, a clean replay of "
        f"{call} gives {replayed!r} ({rule}); {check.mismatches} of {check.checked} logged "
        f"lrs differ{skipped}", hint)]


# --- the entry point -------------------------------------------------------------------------


def _exception_text(e: Exception) -> str:
    try:
        text = str(e)
    except Exception:  # a message that cannot be written (an absurd int in it)
        text = ""
    text = " ".join(text.split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _guarded(findings: list[Finding], location: str, what: str,
             describe: Callable[..., Any], *args: Any) -> Any:
    """``describe(*args)``, or None with an ``unreadable-state`` finding when it fails
    unexpectedly.

    A state ckpttool did not foresee (hand-edited, from another tool) must not take the rest of
    the report down; a CkptToolError (damaged input) still ends it with one clear line.
    """
    try:
        return describe(*args)
    except CkptToolError:
        raise
    except Exception as e:
        findings.append(Finding(
            "unreadable-state", "error", location,
            f"cannot make sense of this {what} state ({_exception_text(e)})",
            "it is not laid out as torch saves it (edited by hand, or written by another "
            "tool); the rest of the report stands"))
        return None


def _describe_paired(site: layout.Site, pairing: layout.Pairing, lay: layout.Layout,
                     optimizers: list[OptimizerInfo | None], values: _Values) -> SchedulerReport:
    """A scheduler's report, identified with its optimizer's groups (OneCycleLR needs them)."""
    index = pairing.optimizer
    opt = optimizers[index] if index is not None else None
    groups = list(opt.state["param_groups"]) if opt is not None else None
    location = lay.optimizers[index].location if index is not None else None
    return _describe_scheduler(site.state, identify_scheduler(site.state, groups), values,
                               location=site.location, optimizer=location,
                               pairing=pairing.reason)


def _pairing_findings(sched: SchedulerReport, pairing: layout.Pairing) -> list[Finding]:
    loc = sched.location or ""
    if pairing.tied:
        return [Finding(
            "ambiguous-pairing", "warning", loc,
            f"{loc} may drive {pairing.reason.removeprefix('ambiguous: ')}: the file holds the "
            "same evidence for each, so its lrs are not checked",
            "to reschedule it, say which optimizer it drives: `ckpttool reschedule "
            f"--scheduler-state {loc} --optimizer LOCATION`; in your own saves, keep "
            "schedulers beside their optimizers under matching names (`opt_g` / `sched_g`)")]
    if pairing.optimizer is None:
        return [Finding(
            "unpaired-scheduler", "warning", loc,
            f"no optimizer in this file matches scheduler {loc}",
            "check that the optimizer was saved with it")]
    return []


def inspect_file(file: TorchFile, *, verify: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> Checkpoint:
    """Build the :class:`Checkpoint` view of a file that was read safely.

    A state that cannot be made sense of becomes an ``unreadable-state`` finding; the rest of the
    report stands. ``progress(done, steps)`` follows long ``verify`` replays.

    Raises:
        UnsafeCheckpointError: the pickle calls code-running globals (nothing was run).
        InputError: tensor data the report needs is missing or damaged.
    """
    dangerous = list(dict.fromkeys(_dangerous_calls(file.root))) or list(dict.fromkeys(
        g for g in file.globals_seen if is_dangerous_global(g)))
    findings: list[Finding] = []
    if dangerous:
        named = name_calls(dangerous)
        trusted = trusted_calls()
        if trusted is None:
            raise UnsafeCheckpointError(
                f"{file.path}: the pickle calls {named}, which would run code on "
                "torch.load(weights_only=False); nothing was executed. Do not load this file "
                "(--trust inspects it anyway, still running nothing)")
        trusted.append((file.path, dangerous))
        findings.append(Finding(
            "unsafe-pickle", "error", "",
            f"the pickle calls {named}: torch.load(weights_only=False) of this file runs it",
            "load it only if you trust where it comes from (--trust: ckpttool ran none of it)"))
    values = _Values(file)
    lay = layout.locate(file, plain=values.evidence)
    # One entry per state found (None: unreadable), so that pairings index them.
    described = [_guarded(findings, site.location, "optimizer", _describe_optimizer, site,
                          values) for site in lay.optimizers]
    paired = [(report, pairing) for site, pairing in zip(lay.schedulers, lay.pairing)
              if (report := _guarded(findings, site.location, "scheduler", _describe_paired,
                                     site, pairing, lay, described, values)) is not None]
    optimizers = [o for o in described if o is not None]
    for opt in optimizers:
        findings += _guarded(findings, opt.location, "optimizer", _findings_for_optimizer,
                             opt) or []
    for index, opt in enumerate(described):
        mine = [s for s, p in paired if p.optimizer == index]
        if opt is not None and mine:
            findings += _guarded(findings, mine[0].location or "", "scheduler",
                                 _findings_for_optimizer_schedulers, opt, mine) or []
    for sched, pairing in paired:
        findings += _pairing_findings(sched, pairing)
        findings += _guarded(findings, sched.location or "", "scheduler",
                             _findings_for_scheduler, sched) or []
    unsafe = tuple(dict.fromkeys(g for g in file.globals_seen if not _weights_only_allows(g)))
    # A folder's files are loaded one by one: each refused file is named.
    parts = ([(name, m.globals_seen) for name, m in file.members.items()]
             if hasattr(file, "members") else [("", file.globals_seen)])
    for where, seen in parts:
        refused = list(dict.fromkeys(g for g in seen if not _weights_only_allows(g)))
        if refused:
            findings.append(Finding(
                "weights-only-refused", "info", where,
                f"torch.load(weights_only=True) refuses {where or 'this file'}: it holds "
                f"{', '.join(refused)}",
                "load it with torch.serialization.safe_globals([...]) for those classes; "
                "ckpttool reads it without running them"))
    if not lay.optimizers and not lay.schedulers:
        findings.append(Finding(
            "no-state", "info", "", "no optimizer or scheduler state in this checkpoint",
            "it may hold model weights only; the optimizer is often saved in another file"))
    schedulers = [s for s, _ in paired]
    if lay.kind == "lightning" and optimizers:
        findings += _lightning_step_findings(file.root, schedulers, len(optimizers) > 1)
    hf = hf_run(file)
    if hf is not None:
        schedulers, findings = _with_hf_schedule(hf, schedulers, findings)
    if verify:
        paired = [(s, p) for s, (_, p) in zip(schedulers, paired, strict=True)]
        schedulers = _verify_all(file, described, paired, hf, progress)
        findings += [f for s in schedulers for f in _verify_findings(s) + _logged_findings(s)]
    order = {"error": 0, "warning": 1, "info": 2}
    findings.sort(key=lambda f: order.get(f.severity, 3))
    return Checkpoint(file.path, lay.kind, file.size, tuple(optimizers), tuple(schedulers),
                      tuple(findings), unsafe, file, hf)


def _lightning_step_findings(root: Mapping, schedulers: list[SchedulerReport],
                             several: bool = False) -> list[Finding]:
    """A Lightning scheduler whose step is neither the Trainer's step count (interval "step")
    nor its epoch (interval "epoch"; ReduceLROnPlateau lags one): its resume is off.

    The step count is global_step for one optimizer. With ``several`` (manual optimization,
    the only way Lightning 2 takes several), global_step counts the steps of all of them, and
    the module steps its schedulers itself: a schedule stepped once per batch is at the
    batches the loop stepped (``_batches_that_stepped``, which a checkpoint saved at a
    batch's end has not counted yet: one more is as right).
    """
    step, epoch = _int_or_none(root.get("global_step")), _int_or_none(root.get("epoch"))
    if step is None or epoch is None:
        return []
    if several:
        loops = root.get("loops")
        fit = loops.get("fit_loop") if isinstance(loops, Mapping) else None
        state = fit.get("epoch_loop.state_dict") if isinstance(fit, Mapping) else None
        batches = _int_or_none(state.get("_batches_that_stepped")) if isinstance(
            state, Mapping) else None
        if batches is None:
            return []
        steps = (batches, batches + 1, step)
        said = (f"the loop stepped {int_text(batches)} batches (global_step "
                f"{int_text(step)} counts the steps of every optimizer) and its epoch is "
                f"{int_text(epoch)}: a schedule stepped every batch should be at the batch "
                "count")
    else:
        steps = (step,)
        said = (f"the Trainer's global_step is {int_text(step)} and its epoch "
                f"{int_text(epoch)}: a schedule stepped every optimizer step (interval "
                "\"step\") should be at global_step")
    out = []
    for sched in schedulers:
        last = sched.last_epoch
        if last is None or last in (*steps, epoch, epoch - 1):
            continue
        out.append(Finding(
            "lightning-step-mismatch", "warning", sched.location or "",
            f"the scheduler is at last_epoch {int_text(last)}, but {said}, one stepped every "
            "epoch at epoch",
            "unless its frequency is not 1, the scheduler state comes from another run or "
            "was edited; `ckpttool reschedule --step N` sets the position"))
    return out


# The file an HF Trainer folder keeps its scheduler state in, a LambdaLR.
HF_SCHEDULER_FILE = "scheduler.pt"


def is_trainer_lambda(sched: SchedulerReport) -> bool:
    """Whether ``sched`` is an HF Trainer folder's LambdaLR (``scheduler.pt``), whose lambdas
    only the folder's settings describe."""
    return sched.location == HF_SCHEDULER_FILE and sched.cls in ("LambdaLR", "MultiplicativeLR")


def _with_hf_schedule(hf: HFRun, schedulers: list[SchedulerReport],
                      findings: list[Finding]) -> tuple[list[SchedulerReport], list[Finding]]:
    """An HF Trainer folder's LambdaLR named after training_args.bin, and its findings: its
    lambdas are the Trainer's (not lost), its step must be the Trainer's global_step."""
    out = []
    for sched in schedulers:
        if is_trainer_lambda(sched):
            if hf.spec is not None:
                sched = replace(sched, named=hf.spec)
                findings = [f for f in findings if not (
                    f.location == HF_SCHEDULER_FILE and f.code == "lambda-not-stored")]
                findings.append(Finding(
                    "hf-schedule", "info", HF_SCHEDULER_FILE,
                    f"the Trainer's LambdaLR; training_args.bin and trainer_state.json name "
                    f"its schedule: {hf.spec}",
                    "reschedule it with `--set num_training_steps=N` or an `hf:NAME(...)` "
                    "SPEC (needs transformers: pip install 'ckpttool[hf]')"))
            if (hf.global_step is not None and sched.last_epoch is not None
                    and hf.global_step != sched.last_epoch):
                findings.append(Finding(
                    "hf-step-mismatch", "error", HF_SCHEDULER_FILE,
                    f"trainer_state.json says global_step {int_text(hf.global_step)}, the "
                    f"scheduler is at last_epoch {int_text(sched.last_epoch)}: the resumed "
                    "run's lrs follow the scheduler, not the Trainer's step count",
                    "was scheduler.pt copied from another checkpoint? take both files from "
                    "one checkpoint-N folder"))
        out.append(sched)
    return out, findings


def load(path: str | os.PathLike, *, verify: bool = False,
         progress: Callable[[int, int], None] | None = None) -> Checkpoint:
    """Read a checkpoint safely and describe its optimizer and scheduler state.

    Args:
        path: a ``torch.save`` file (zip or legacy), a Lightning ``.ckpt``, or a checkpoint
            folder (HF Trainer, accelerate, DCP).
        verify: also replay each schedule with real torch (imports torch) and compare; an HF
            Trainer folder's schedule is rebuilt by transformers (the ``[hf]`` extra) and the
            logged lrs of its trainer_state.json are compared with the same replay.
        progress: ``progress(done, steps)`` during long ``verify`` replays.

    Example:
        >>> ckpt = load("fixtures/adamw_cosine.pt")                 # doctest: +SKIP
        >>> [g.lr for g in ckpt.optimizers[0].groups]               # doctest: +SKIP
        [0.0007..., 0.0007...]
    """
    return inspect_file(read_any(path), verify=verify, progress=progress)
