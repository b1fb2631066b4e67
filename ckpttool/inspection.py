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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckpttool import layout
from ckpttool.errors import UnsafeCheckpointError
from ckpttool.schedulers import SchedulerInfo, format_call, identify_scheduler
from ckpttool.serialization import (
    Opaque,
    TensorRef,
    TorchFile,
    dotted_name,
    is_dangerous_global,
    read_checkpoint,
    walk,
)

# --- optimizer identification ----------------------------------------------------------------

# Group keys every torch optimizer may carry as behaviour flags; they say nothing about the class
# (their set changed across torch releases).
OPTIMIZER_FLAGS = frozenset({"foreach", "maximize", "capturable", "differentiable", "fused",
                             "decoupled_weight_decay"})
# Group keys a scheduler writes (torch-scheduler-state.md 2.3), never an optimizer's own.
SCHEDULER_GROUP_KEYS = ("initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum")
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
# A group may carry a few keys of the user's own (a "name", a tag) and still be that class;
# more unexplained keys than this means another library's optimizer.
_MAX_EXTRA_GROUP_KEYS = 2


@dataclass(frozen=True)
class OptimizerClass:
    """The inferred optimizer class: a name, or "unknown" with the candidates that fit."""

    name: str
    candidates: tuple[str, ...] = ()
    extra_keys: tuple[str, ...] = ()


def identify_optimizer(state: Mapping) -> OptimizerClass:
    """Infer the torch.optim class from a state's group keys (and per-parameter state keys).

    Adam and AdamW share every key; torch >= 2.2 tells them apart by ``decoupled_weight_decay``.
    Adamax and RAdam share their hyperparameters; their per-parameter state differs.
    """
    groups = state.get("param_groups") or []
    if not groups:
        return OptimizerClass("unknown")
    group = groups[0]
    keys = {k for k in group if isinstance(k, str)} - OPTIMIZER_FLAGS - GROUP_BOOKKEEPING
    keys -= set(SCHEDULER_GROUP_KEYS)
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
        if len(extras) > _MAX_EXTRA_GROUP_KEYS:
            return OptimizerClass("unknown", tuple(fitting), extras)
    state_keys = _state_keys(state)
    if "Adam" in fitting:
        decoupled = group.get("decoupled_weight_decay")
        fitting = (["AdamW"] if decoupled is True else ["Adam"] if decoupled is False
                   else ["Adam", "AdamW"])
    if "Adamax" in fitting:
        if "exp_inf" in state_keys:
            fitting = ["Adamax"]
        elif "exp_avg_sq" in state_keys or "decoupled_weight_decay" in group:
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


@dataclass(frozen=True)
class SchedulerReport:
    """One scheduler state: class, counters, recovered arguments, children."""

    location: str | None
    cls: str
    optimizer: str | None
    pairing: str | None
    last_epoch: int | None
    step_count: int | None
    base_lrs: list | None
    last_lr: list | None
    args: dict[str, Any]
    call: str
    children: tuple[SchedulerReport, ...]
    unrecoverable: tuple[str, ...]
    candidates: tuple[str, ...]
    info: SchedulerInfo = field(repr=False, compare=False)
    state: Mapping = field(repr=False, compare=False)
    verify: Any = None  # a schedule.VerifyResult after --verify


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
    verified: bool = False

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

    def plain(self, value: Any) -> Any:
        if isinstance(value, TensorRef):
            if value.numel == 1 and value.storage is not None:
                try:
                    return self.file.scalar(value)
                except (ValueError, Exception):  # an undecodable dtype stays a description
                    return value
            return value
        if isinstance(value, tuple):
            return tuple(self.plain(v) for v in value)
        if isinstance(value, list):
            return [self.plain(v) for v in value]
        if isinstance(value, Mapping):
            return {k: self.plain(v) for k, v in value.items()}
        return value


def _tensor_lr(value: Any) -> TensorLR | None:
    return TensorLR(value.dtype, value.device) if isinstance(value, TensorRef) else None


def _describe_optimizer(site: layout.Site, values: _Values) -> OptimizerInfo:
    state = site.state
    klass = identify_optimizer(state)
    groups = []
    for index, g in enumerate(state["param_groups"]):
        hyper = {str(k): values.plain(v) for k, v in g.items()
                 if k not in GROUP_BOOKKEEPING and k not in ("lr", "initial_lr")}
        params = g.get("params")
        groups.append(GroupInfo(index, len(params) if isinstance(params, (list, tuple)) else 0,
                                values.plain(g.get("lr")), values.plain(g.get("initial_lr")),
                                _tensor_lr(g.get("lr")), hyper))
    per_param = state["state"]
    steps = [values.plain(e.get("step")) for e in per_param.values()
             if isinstance(e, Mapping) and "step" in e]
    steps = [s for s in steps if isinstance(s, (int, float))]
    step = max(steps) if steps else None
    return OptimizerInfo(site.location, klass.name, klass.candidates, tuple(groups),
                         len(per_param), step, tuple(_state_keys(state)), state)


def _describe_scheduler(state: Mapping, location: str | None, optimizer: str | None,
                        pairing: str | None, groups: list | None,
                        values: _Values) -> SchedulerReport:
    info = identify_scheduler(state, groups)
    subs = state.get("_schedulers")
    kids = []
    if isinstance(subs, (list, tuple)):
        for sub_state, sub_info in zip(subs, info.children):
            if isinstance(sub_state, Mapping):
                kids.append(_describe_scheduler(sub_state, None, None, None, groups, values))
    return SchedulerReport(
        location, info.cls, optimizer, pairing,
        _int_or_none(state.get("last_epoch")), _int_or_none(state.get("_step_count")),
        _list_or_none(values.plain(state.get("base_lrs"))),
        _list_or_none(values.plain(state.get("_last_lr"))),
        {k: values.plain(v) for k, v in info.args.items()}, format_call(info), tuple(kids),
        tuple(info.unrecoverable), tuple(info.candidates), info, state)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _list_or_none(value: Any) -> list | None:
    return list(value) if isinstance(value, (list, tuple)) else None


# --- findings --------------------------------------------------------------------------------


def _num_eq(a: Any, b: Any) -> bool:
    """Exact equality of two learning rates (bit-exact; a float and a tensor value compare by value)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _findings_for_pair(opt: OptimizerInfo, sched: SchedulerReport) -> list[Finding]:
    out: list[Finding] = []
    loc = sched.location or ""
    groups = opt.groups
    n_sched = len(sched.last_lr) if sched.last_lr is not None else (
        len(sched.base_lrs) if sched.base_lrs is not None else None)
    if n_sched is not None and n_sched != len(groups):
        out.append(Finding(
            "group-count-mismatch", "error", loc,
            f"{opt.location} has {len(groups)} param groups but {loc} has lrs for {n_sched}",
            "they are not from the same run; loading them together raises or drops groups: "
            "pair the right files, or rebuild the schedule with `ckpttool reschedule`"))
        return out
    if sched.last_lr is not None:
        bad = [i for i, g in enumerate(groups) if not _num_eq(g.lr, sched.last_lr[i])]
        if bad:
            i = bad[0]
            out.append(Finding(
                "lr-mismatch", "error", opt.location,
                f"group {i} lr {_fmt(groups[i].lr)} != {loc} _last_lr {_fmt(sched.last_lr[i])}"
                + (f" (and {len(bad) - 1} more groups)" if len(bad) > 1 else ""),
                "the lr was edited by hand or the files are from different steps; the next "
                "step of a recursive scheduler rescales the edited value: use `ckpttool "
                "reschedule --lr` to change lrs"))
    if sched.base_lrs is not None:
        missing = [i for i, g in enumerate(groups) if g.initial_lr is None]
        stepped = (sched.last_epoch or 0) > 0
        if missing and stepped:
            out.append(Finding(
                "missing-initial-lr", "error", opt.location,
                f"group {missing[0]} has no initial_lr but {loc} is at last_epoch "
                f"{sched.last_epoch}",
                "constructing the scheduler with last_epoch>0 raises KeyError and OneCycleLR "
                "needs it every step: run `ckpttool reschedule` to restore it"))
        bad = [i for i, g in enumerate(groups)
               if g.initial_lr is not None and not _num_eq(g.initial_lr, sched.base_lrs[i])]
        if bad:
            i = bad[0]
            out.append(Finding(
                "initial-lr-mismatch", "error", opt.location,
                f"group {i} initial_lr {_fmt(groups[i].initial_lr)} != {loc} base_lrs "
                f"{_fmt(sched.base_lrs[i])}",
                "a resume takes base_lrs from the scheduler but a rebuilt scheduler takes "
                "initial_lr from the group: use `ckpttool reschedule --lr` to change base lrs"))
    return out


def _findings_for_scheduler(sched: SchedulerReport) -> list[Finding]:
    out: list[Finding] = []
    loc = sched.location or ""
    if sched.cls == "OneCycleLR":
        total = sched.args.get("total_steps")
        if isinstance(total, int) and sched.last_epoch is not None:
            if sched.last_epoch >= total:
                out.append(Finding(
                    "onecycle-exhausted", "error", loc,
                    f"OneCycleLR is at step {sched.last_epoch} of total_steps={total}: the next "
                    f"step raises \"Tried to step {sched.last_epoch + 1} times\"",
                    "to train on, extend the cycle: `ckpttool reschedule --set "
                    "total_steps=N`"))
            elif sched.last_epoch == total - 1:
                out.append(Finding(
                    "onecycle-finished", "warning", loc,
                    f"OneCycleLR has finished its {total} steps: the next step overshoots "
                    "(lr rises again) and the one after raises",
                    "extend the cycle with `ckpttool reschedule --set total_steps=N`"))
    for text in sched.unrecoverable:
        code = "lambda-not-stored" if "lambda" in text.lower() else "not-recoverable"
        out.append(Finding(
            code, "warning", loc, text,
            "to replay or reschedule it, pass the function: `--scheduler my_sched.py:make` "
            "(a function that takes the optimizer and returns the scheduler)"))
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
        out.append(Finding(
            "unknown-optimizer", "info", opt.location,
            "optimizer class not recognised from its group keys"
            + (f" (could be {' or '.join(opt.candidates)})" if opt.candidates else "")
            + f": {', '.join(keys)}",
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


def _weights_only_allows(dotted: str) -> bool:
    if dotted in _WEIGHTS_ONLY_GLOBALS or dotted.startswith("torch._utils._rebuild_"):
        return True
    module, _, name = dotted.rpartition(".")
    return module in ("torch", "torch.storage") and (
        name.endswith("Storage") or name.endswith("Tensor") or name.islower())


def _dangerous_calls(root: Any) -> list[str]:
    """Calls of code-running globals recorded in the tree, as `name(args)` strings."""
    calls = []
    for _, value in walk(root):
        if isinstance(value, Opaque) and value.dangerous:
            args = ", ".join(repr(a)[:60] for a in value.args)
            calls.append(f"{value.dotted}({args})")
        elif dotted_name(value) and is_dangerous_global(dotted_name(value)):
            calls.append(dotted_name(value))
    return calls


# --- verification (imports torch) -------------------------------------------------------------


def _verified(file: TorchFile, opt: OptimizerInfo | None, sched: SchedulerReport) -> SchedulerReport:
    """The scheduler report with its replay verdict attached (see schedule.verify)."""
    from dataclasses import replace

    from ckpttool import schedule

    if opt is None:
        result = schedule.VerifyResult(None, reason="no optimizer to replay it on")
    else:
        groups = schedule.materialize(list(opt.state["param_groups"]), file)
        state = schedule.materialize(sched.state, file)
        result = schedule.verify(opt.cls, groups, state, sched.info)
    return replace(sched, verify=result)


def _verify_findings(sched: SchedulerReport) -> list[Finding]:
    v, loc = sched.verify, sched.location or ""
    if v.identical is False:
        return [Finding(
            "verify-mismatch", "error", loc,
            f"not what a clean run of {sched.call} holds at this step: {v.first_difference}",
            "the state was edited or built another way; `ckpttool reschedule` rewrites it to "
            "the clean replay")]
    if v.identical is None:
        return [Finding("verify-unavailable", "info", loc, f"cannot replay: {v.reason}")]
    return []


# --- the entry point -------------------------------------------------------------------------


def inspect_file(file: TorchFile, *, verify: bool = False) -> Checkpoint:
    """Build the :class:`Checkpoint` view of a file that was read safely.

    Raises:
        UnsafeCheckpointError: the pickle calls code-running globals (nothing was run).
    """
    dangerous = _dangerous_calls(file.root)
    if dangerous or any(is_dangerous_global(g) for g in file.globals_seen):
        named = dangerous[0] if dangerous else next(
            g for g in file.globals_seen if is_dangerous_global(g))
        raise UnsafeCheckpointError(
            f"{file.path}: the pickle calls {named}, which would run code on "
            "torch.load(weights_only=False); nothing was executed. Do not load this file")
    lay = layout.locate(file)
    values = _Values(file)
    optimizers = [_describe_optimizer(site, values) for site in lay.optimizers]
    by_location = {o.location: o for o in optimizers}
    schedulers = []
    for site in lay.schedulers:
        opt_loc, reason = lay.pairing[site.location]
        groups = list(by_location[opt_loc].state["param_groups"]) if opt_loc else None
        schedulers.append(_describe_scheduler(site.state, site.location, opt_loc, reason,
                                              groups, values))
    findings: list[Finding] = []
    for opt in optimizers:
        findings += _findings_for_optimizer(opt)
    for sched in schedulers:
        if sched.optimizer is not None:
            findings += _findings_for_pair(by_location[sched.optimizer], sched)
        else:
            findings.append(Finding(
                "unpaired-scheduler", "warning", sched.location or "",
                f"no optimizer in this file matches scheduler {sched.location}",
                "check that the optimizer was saved with it"))
        findings += _findings_for_scheduler(sched)
    unsafe = tuple(dict.fromkeys(g for g in file.globals_seen if not _weights_only_allows(g)))
    if unsafe:
        findings.append(Finding(
            "weights-only-refused", "info", "",
            f"torch.load(weights_only=True) refuses this file: it holds {', '.join(unsafe)}",
            "load it with torch.serialization.safe_globals([...]) for those classes; ckpttool "
            "reads it without running them"))
    if not optimizers and not schedulers:
        findings.append(Finding(
            "no-state", "info", "", "no optimizer or scheduler state in this checkpoint",
            "it may hold model weights only; the optimizer is often saved in another file"))
    if verify:
        schedulers = [_verified(file, by_location.get(s.optimizer), s) for s in schedulers]
        findings += [f for s in schedulers for f in _verify_findings(s)]
    order = {"error": 0, "warning": 1, "info": 2}
    findings.sort(key=lambda f: order.get(f.severity, 3))
    return Checkpoint(file.path, lay.kind, file.size, tuple(optimizers), tuple(schedulers),
                      tuple(findings), unsafe, file, verify)


def load(path: str | os.PathLike, *, verify: bool = False) -> Checkpoint:
    """Read a checkpoint safely and describe its optimizer and scheduler state.

    Args:
        path: a ``torch.save`` file (zip or legacy) or a Lightning ``.ckpt``.
        verify: also replay each schedule with real torch (imports torch) and compare.

    Example:
        >>> ckpt = load("fixtures/adamw_cosine.pt")                 # doctest: +SKIP
        >>> [g.lr for g in ckpt.optimizers[0].groups]               # doctest: +SKIP
        [0.0007..., 0.0007...]
    """
    return inspect_file(read_checkpoint(path), verify=verify)
