"""The recompute: a stand-in optimizer, the real torch scheduler, re-stepped.

Learning rates are never computed from a formula of ckpttool's own: recursive and closed forms
differ in the last bits (reference section 3a), so only re-stepping the real scheduler is bit-exact.
A stand-in optimizer carries the stored groups' hyperparameters on one tiny dummy parameter per
stored parameter; it is never stepped with gradients, only schedulers touch it.

This module imports torch; only ``show --verify`` and ``reschedule`` import it.

Example:
    >>> import torch
    >>> from ckpttool.schedulers import identify_scheduler
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
    >>> for _ in range(7):
    ...     opt.step(); sched.step()
    >>> groups = opt.state_dict()["param_groups"]
    >>> info = identify_scheduler(sched.state_dict(), groups)
    >>> verify("SGD", groups, sched.state_dict(), info).identical
    True
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import chain, islice, repeat
from typing import Any, Protocol

# torch warns on import when numpy is absent (ckpttool does not need it): not a message for
# ckpttool's users, whose stderr carries only ckpttool's own lines.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch
    from torch.optim import lr_scheduler as torch_schedulers

from ckpttool.errors import CkptToolError, ReplayError
from ckpttool.schedulers import (
    SCHEDULER_SET_KEYS,
    SCHEDULER_STEPPED_KEYS,
    TRANSIENT_KEYS,
    SchedulerInfo,
    differences,
    format_call,
    int_text,
    replay_steps,
    same,
    value_repr,
)
from ckpttool.serialization import TensorRef, TorchFile, load_tensor



def defer_dynamo() -> None:
    """Let the stand-in optimizers skip torch._dynamo until something else imports it.

    torch wraps Optimizer.add_param_group, state_dict, load_state_dict and zero_grad in
    ``torch._disable_dynamo``, which imports torch._dynamo at their first call: 1.5 s of CPU, as
    much as importing torch itself, for stand-ins nobody compiles. That wrapper first looks for a
    cached ``__dynamo_disable`` on the wrapped function; the one given here calls the function
    itself while torch._dynamo is not imported (nothing can be compiling then) and, from the
    moment it is, what torch._dynamo.disable makes of it, exactly as torch would. It changes
    torch for the whole process, so only the ``ckpttool`` command calls it (at the first import
    of this module in that process), never the library. With a torch whose wrapper differs,
    nothing changes.
    """
    lazy = getattr(torch, "_disable_dynamo", None)
    code = getattr(lazy(lambda: None), "__code__", None) if callable(lazy) else None
    if code is None:
        return
    for method in vars(torch.optim.Optimizer).values():
        fn = getattr(method, "__wrapped__", None)
        if (fn is not None and getattr(method, "__code__", None) is code
                and getattr(fn, "__dynamo_disable", None) is None):
            setattr(fn, "__dynamo_disable", _until_dynamo(fn))


def _until_dynamo(fn: Callable) -> Callable:
    """``fn`` itself until torch._dynamo is imported; from then on torch._dynamo.disable(fn)."""
    disabled = None

    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal disabled
        if disabled is None:
            dynamo = sys.modules.get("torch._dynamo")
            disable = getattr(dynamo, "disable", None)  # None while it is still importing
            if disable is None:
                return fn(*args, **kwargs)
            disabled = disable(fn, recursive=True, wrapping=False)
        return disabled(*args, **kwargs)

    return call


if getattr(sys.modules.get("ckpttool.cli"), "RUNNING", False):
    defer_dynamo()

__all__ = ["LoggedCheck", "NamedSchedule", "VerifyResult", "build_scheduler", "compare_logged",
           "logged_lr", "logged_steps", "materialize", "rebuild_stored", "replay",
           "standin_optimizer", "verify", "verify_together"]

# A stand-in leaves out the group keys a scheduler constructor sets itself (SCHEDULER_SET_KEYS):
# the constructor then sets them as it did in the original run, where a stale copy would win
# over the new lr (setdefault, reference 2.6).

# `show --verify` replays at most this many steps (minutes of CosineAnnealingLR): a last_epoch
# beyond it is a damaged counter more likely than a run, and would hang the report.
MAX_VERIFY_STEPS = 100_000_000

# Torch warns when a scheduler steps before its optimizer; a replay never steps the optimizer
# (it has no gradients), so the warning says nothing here.
_STEP_ORDER_WARNING = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"

# Steps between progress reports: about a tenth of a second of CosineAnnealingLR.
_PROGRESS_EVERY = 1 << 15

# At most this many differences are collected: enough to see a pattern, bounded for huge states.
_MAX_DIFFERENCES = 50


# --- the stand-in optimizer -------------------------------------------------------------------


class _StandinOptimizer(torch.optim.Optimizer):
    """A generic optimizer for classes torch lacks (or refuses on CPU); it never updates."""

    def step(self, closure: Callable | None = None) -> None:
        """Nothing to do: schedulers only read and write the groups."""


def _optimizer_class(name: str) -> type[torch.optim.Optimizer] | None:
    short = name.rsplit(".", 1)[-1] if name.startswith("torch.optim") else name
    cls = getattr(torch.optim, short, None)
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and (
            cls is not torch.optim.Optimizer):
        return cls
    return None


def _check_read(value: Any, where: str) -> None:
    if isinstance(value, TensorRef):
        raise ReplayError(f"{where} is a tensor whose value was not read; materialize the "
                          "checkpoint's tensors first (ckpttool.schedule.materialize)")
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_read(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_read(v, f"{where}[{i}]")


def _base_lr(group: Mapping[str, Any], index: int) -> Any:
    """The lr a group had when its scheduler was built: initial_lr, in the type of lr."""
    lr = group.get("lr")
    base = group.get("initial_lr", lr)
    if base is None:
        raise ReplayError(f"param group {index} has neither lr nor initial_lr")
    if isinstance(lr, torch.Tensor):
        # Scheduler arithmetic runs in the lr tensor's dtype and on its device (reference 5), so
        # the stand-in's lr is a tensor like the run's, holding the base value.
        if isinstance(base, torch.Tensor):
            return base.detach().to(dtype=lr.dtype, device=lr.device, copy=True)
        return torch.tensor(base, dtype=lr.dtype, device=lr.device)
    if isinstance(base, torch.Tensor):
        return base.detach().clone()
    return base


def _hyperparameters(group: Mapping[str, Any], index: int) -> dict[str, Any]:
    hyper = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
             for k, v in group.items()
             if k not in SCHEDULER_SET_KEYS and k not in ("params", "param_names")}
    hyper["lr"] = _base_lr(group, index)
    return hyper


def standin_optimizer(opt_class: str, groups: list[Mapping[str, Any]]) -> torch.optim.Optimizer:
    """An optimizer of the stored class with the stored groups, ready for a scheduler.

    One tiny dummy Parameter per stored param (``len(group["params"])``). Each group carries the
    stored hyperparameters with lr = its base lr (``initial_lr`` when present, else ``lr``; a
    tensor lr stays a tensor of the same dtype and device) and without the keys a scheduler sets
    itself (``initial_lr``, ``max_lr``, ``min_lr``, ``max_momentum``, ``base_momentum``).
    ``defaults`` are group 0's values, as if the run built the optimizer with them (HF's
    polynomial schedule reads ``optimizer.defaults["lr"]``). The class is built with its own
    defaults and then given the stored values, so flags torch refuses on CPU (capturable, foreach
    with a tensor lr, fused) still load; a class torch lacks becomes a generic Optimizer subclass
    with the same keys. The stand-in is never stepped with gradients.

    Args:
        opt_class: the optimizer class name ("AdamW", "torch.optim.SGD", or anything else).
        groups: the stored param_groups; tensors already materialised as torch tensors.

    Raises:
        ReplayError: no groups, a group without lr, or an unread TensorRef.

    Example:
        >>> opt = standin_optimizer("AdamW", [{"lr": 0.0005, "initial_lr": 0.001,
        ...     "betas": (0.9, 0.999), "weight_decay": 0.01, "params": [0, 1]}])
        >>> opt.param_groups[0]["lr"], len(opt.param_groups[0]["params"]), opt.defaults["lr"]
        (0.001, 2, 0.001)
    """
    if not groups:
        raise ReplayError("the optimizer has no param groups to rebuild")
    _check_read(list(groups), "param_groups")
    hypers = [_hyperparameters(g, i) for i, g in enumerate(groups)]
    params = []
    for g in groups:
        stored = g.get("params")
        count = len(stored) if isinstance(stored, (list, tuple)) else 1
        params.append([torch.nn.Parameter(torch.zeros(1)) for _ in range(count)])
    defaults = dict(hypers[0])
    cls = _optimizer_class(opt_class)
    optimizer: torch.optim.Optimizer | None = None
    if cls is not None:
        try:
            optimizer = cls([{"params": p} for p in params])
        except (ValueError, TypeError, RuntimeError, AssertionError):
            optimizer = None  # e.g. LBFGS allows one group, Muon only 2-D params
    if optimizer is None:
        optimizer = _StandinOptimizer([{"params": p} for p in params], dict(defaults))
    optimizer.defaults.update(defaults)
    for group, hyper in zip(optimizer.param_groups, hypers, strict=True):
        group.update(hyper)
    return optimizer


def materialize(value: Any, file: TorchFile, device: str | None = None) -> Any:
    """A copy of a tree with every TensorRef replaced by the torch tensor its bytes hold.

    It reads every tensor in ``value``: pass the param_groups and the scheduler state, never a
    whole checkpoint with its model weights.

    Args:
        value: a tree read by ckpttool.serialization (dicts, lists, tuples, TensorRef, ...).
        file: the file the tree was read from (its tensor records hold the bytes).
        device: where the tensors go; default: where each was saved from. Scheduler arithmetic
            runs where the lr lives, so a bit-exact check of a CUDA run wants ``"cuda"``.

    Example:
        >>> from ckpttool.serialization import read_checkpoint  # doctest: +SKIP
        >>> ckpt = read_checkpoint("run.pt")                     # doctest: +SKIP
        >>> groups = materialize(ckpt.root["optimizer"]["param_groups"], ckpt)  # doctest: +SKIP
    """
    if isinstance(value, TensorRef):
        if not isinstance(getattr(torch, value.dtype, None), torch.dtype):
            raise ReplayError(f"cannot rebuild a {value.dtype} tensor")
        return load_tensor(file, value, device or "cpu")
    if isinstance(value, Mapping):
        out = {k: materialize(v, file, device) for k, v in value.items()}
        return type(value)(out) if type(value) is not dict else out
    if isinstance(value, tuple):
        return tuple(materialize(v, file, device) for v in value)
    if isinstance(value, list):
        return [materialize(v, file, device) for v in value]
    return value


# --- the scheduler ----------------------------------------------------------------------------


def build_scheduler(info: SchedulerInfo, optimizer: torch.optim.Optimizer,
                    **overrides: Any) -> torch_schedulers.LRScheduler:
    """The torch scheduler ``info`` describes, constructed on ``optimizer`` with last_epoch=-1.

    Sub-schedulers are built first, in order, on the same optimizer, as a training script does
    (their constructors touch the group lrs, and SequentialLR undoes that).

    Args:
        info: from :func:`ckpttool.schedulers.identify_scheduler`.
        optimizer: usually a :func:`standin_optimizer`.
        **overrides: constructor arguments replacing or completing the recovered ones (e.g.
            ``lr_lambda=fn`` for a LambdaLR, ``T_max=2000``, ``schedulers=[...]``).

    Raises:
        ReplayError: unknown class, or an argument that was not stored and not given.

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> info = SchedulerInfo("StepLR", {"step_size": 10, "gamma": 0.5})
        >>> build_scheduler(info, opt, step_size=20).step_size
        20
    """
    if info.cls not in torch_schedulers.__all__ or info.cls == "LRScheduler":
        raise ReplayError(f"cannot rebuild an unknown scheduler class: "
                          f"{'; '.join(info.unrecoverable) or info.cls}")
    missing = [name for name in info.missing if name not in overrides]
    if missing:
        raise ReplayError(f"cannot rebuild {format_call(info)}: {' '.join(info.unrecoverable)} "
                          f"Give {', '.join(missing)} explicitly.")
    # Copies: torch keeps some argument objects (SequentialLR's milestones list) as its state.
    kwargs = copy.deepcopy(info.args)
    kwargs.update(overrides)
    cls = getattr(torch_schedulers, info.cls)
    if info.cls in ("SequentialLR", "ChainedScheduler"):
        if "schedulers" not in kwargs:
            kwargs["schedulers"] = [build_scheduler(c, optimizer) for c in info.children]
        if info.cls == "ChainedScheduler":
            return cls(kwargs.pop("schedulers"), optimizer=optimizer, **kwargs)
    return cls(optimizer, **kwargs)


class NamedSchedule(Protocol):
    """A schedule known by a name rather than by a torch class and its recovered arguments:
    an HF Trainer's LambdaLR is ``hf:linear(num_warmup_steps=5, num_training_steps=40)``
    (:class:`ckpttool.spec.HFSpec`), built by its library's own factory."""

    @property
    def text(self) -> str:
        """The SPEC, as shown (``hf:linear(...)``)."""

    def build(self, optimizer: Any) -> Any:
        """The scheduler, constructed on ``optimizer`` with last_epoch=-1."""


def _build(info: SchedulerInfo, named: NamedSchedule | None, optimizer: Any) -> Any:
    """The scheduler ``named`` builds, else the torch class ``info`` describes."""
    if named is None:
        return build_scheduler(info, optimizer)
    with warnings.catch_warnings():  # a library's deprecation notes are not ckpttool's to show
        warnings.simplefilter("ignore")
        return named.build(optimizer)


def replay(scheduler: Any, steps: int,
           progress: Callable[[int, int], None] | None = None) -> None:
    """Call ``scheduler.step()`` ``steps`` times, as fast as a bare loop.

    Args:
        scheduler: a torch scheduler (not ReduceLROnPlateau, whose steps need metrics).
        steps: how many steps.
        progress: called as ``progress(done, steps)`` every 32768 steps and at the end.

    Raises:
        ReplayError: ReduceLROnPlateau, or a negative step count.

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
        >>> replay(sched, 3)
        >>> sched.last_epoch, opt.param_groups[0]["lr"]
        (3, 0.0125)
    """
    if steps < 0:
        raise ReplayError(f"cannot replay a negative number of steps ({steps})")
    _replay_in_turn([scheduler], steps, progress=progress)


# --- verification -----------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    """Whether a stored schedule is bit-identical to a clean replay of its recovered arguments.

    Attributes:
        identical: True / False, or None when it cannot be replayed (see ``reason``).
        first_difference: the first differing field, e.g. ``"scheduler._last_lr[1]: stored
            0.0005 != replayed 0.00049999"``; None when identical or not replayed.
        reason: why it cannot be replayed (ReduceLROnPlateau, a lambda not stored, ...).
        differences: every differing field found (at most 50), first one first.
        steps: the number of steps replayed, when replayed.
        call: the constructor call that was replayed.
        logged: a training log's lrs compared with the same replay, when a log was given
            (:func:`verify_together`'s ``logged``).
    """

    identical: bool | None
    first_difference: str | None = None
    reason: str | None = None
    differences: tuple[str, ...] = ()
    steps: int | None = None
    call: str | None = None
    logged: LoggedCheck | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (``logged`` only when a log was compared)."""
        out = {"identical": self.identical, "first_difference": self.first_difference,
               "reason": self.reason, "differences": list(self.differences),
               "steps": self.steps, "call": self.call}
        if self.logged is not None:
            out["logged"] = self.logged.to_dict()
        return out


# How a logged lr relates to the scheduler, by convention: the replay's lr after N + offset
# steps is the one logged with step N. The HF Trainer reads get_last_lr() just before it steps
# the scheduler in step N (the lr step N used) since huggingface/transformers#36973 (March
# 2025, transformers 4.51), and read it after that step before (the lr of step N + 1).
LOGGED_OFFSETS = {"before-step": -1, "after-step": 0}


@dataclass(frozen=True)
class LoggedCheck:
    """A training log's learning rates (the HF Trainer's ``log_history``) compared bit for bit
    with a clean replay of the schedule.

    A log holds, per logged step N, the first group's lr (``get_last_lr()[0]``, a tensor as
    its ``.item()``, written to JSON as the shortest repr, which reads back exactly). Which
    replayed step it equals depends on the logger (:data:`LOGGED_OFFSETS`); the convention is
    the one every compared value agrees with ("before-step" when both do, as on a constant
    schedule); when none does, the one with fewer mismatches (ties: "before-step"), and its first
    mismatch is named.

    Attributes:
        convention: "before-step" (logged lr of step N = replay after N - 1 steps) or
            "after-step" (= replay after N steps).
        checked: logged lrs compared: those at steps 1 to the replayed position.
        mismatches: how many of them differ under ``convention``.
        first_mismatch: (step, logged lr, replayed lr) of the first that differs, else None.
        beyond: logged steps not compared, past the replayed position (or below 1).
    """

    convention: str
    checked: int
    mismatches: int = 0
    first_mismatch: tuple[int, float, float] | None = None
    beyond: int = 0

    @property
    def agrees(self) -> bool:
        """Every compared lr equals the replay."""
        return self.mismatches == 0

    @property
    def offset(self) -> int:
        """The replay step a logged step N shows: N + offset."""
        return LOGGED_OFFSETS[self.convention]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        first = self.first_mismatch
        return {"convention": self.convention, "offset": self.offset, "checked": self.checked,
                "agrees": self.agrees, "mismatches": self.mismatches,
                "first_mismatch": None if first is None else {
                    "step": first[0], "logged": first[1], "replayed": first[2]},
                "beyond": self.beyond}


def logged_steps(logged: Sequence[tuple[int, float]], position: int) -> set[int]:
    """The replay steps whose lr :func:`compare_logged` needs for a log compared up to
    ``position``: N - 1 and N for every logged step N in 1..position."""
    return {n + off for n, _ in logged if 1 <= n <= position for off in LOGGED_OFFSETS.values()}


def compare_logged(logged: Sequence[tuple[int, float]], replayed: Mapping[int, float],
                   position: int) -> LoggedCheck:
    """Compare logged (step, lr) pairs with the replay's first-group lr after each step count
    (``replayed``: every step of :func:`logged_steps`; a logged step whose values are missing
    counts as not compared), for the steps 1 to ``position``; see :class:`LoggedCheck` for the
    conventions.

    Example:
        >>> compare_logged([(1, 0.1), (2, 0.05)], {0: 0.1, 1: 0.05, 2: 0.025}, 2)
        LoggedCheck(convention='before-step', checked=2, mismatches=0, first_mismatch=None, beyond=0)
        >>> compare_logged([(1, 0.1), (2, 0.07)], {0: 0.1, 1: 0.05, 2: 0.025}, 2).first_mismatch
        (2, 0.07, 0.05)
    """
    compared = [(n, lr) for n, lr in logged if 1 <= n <= position
                and all(n + off in replayed for off in LOGGED_OFFSETS.values())]
    verdicts = []
    for convention, offset in LOGGED_OFFSETS.items():
        wrong = [(n, lr, replayed[n + offset]) for n, lr in compared
                 if not same(lr, replayed[n + offset])]
        verdicts.append(LoggedCheck(convention, len(compared), len(wrong),
                                    wrong[0] if wrong else None, len(logged) - len(compared)))
    return min(verdicts, key=lambda check: check.mismatches)  # ties: the first, before-step


def _tensors_equal(a: Any, b: Any) -> bool:
    """Same dtype, shape and bytes (devices may differ: the caller chose where to load)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False  # an unread TensorRef has no bytes to compare
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a_bytes = a.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    b_bytes = b.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return torch.equal(a_bytes, b_bytes)


def _group_differences(stored: list[Mapping], replayed: list[Mapping], cycles_momentum: bool):
    keys = [k for k in (*SCHEDULER_STEPPED_KEYS, *SCHEDULER_SET_KEYS)
            if k not in ("momentum", "betas") or cycles_momentum]
    if len(stored) != len(replayed):
        yield (f"optimizer.param_groups: stored {len(stored)} groups != replayed "
               f"{len(replayed)}")
        return
    for i, (s, r) in enumerate(zip(stored, replayed)):
        for key in keys:
            path = f"optimizer.param_groups[{i}].{key}"
            if key in s and key in r:
                yield from differences(s[key], r[key], path, tensor_equal=_tensors_equal)
            elif key in s:
                yield (f"{path}: in the stored group ({value_repr(s[key])}), absent from a "
                       "clean run")
            elif key in r:
                yield (f"{path}: absent from the stored group (a clean run has "
                       f"{value_repr(r[key])})")


def _leaves(state: Any, info: SchedulerInfo):
    """(state, info) of each non-composite scheduler, in the order a script constructs them."""
    if info.children and isinstance(state, Mapping) and isinstance(
            state.get("_schedulers"), (list, tuple)):
        for sub, child in zip(state["_schedulers"], info.children):
            yield from _leaves(sub, child)
    else:
        yield state, info


def _lrs_seen_by_first_scheduler(state: Mapping, info: SchedulerInfo) -> list | None:
    """The group lrs the first-built scheduler saw, when group initial_lr no longer holds them.

    Every class setdefaults initial_lr except OneCycleLR, which assigns it; so when a OneCycleLR
    follows another scheduler inside a SequentialLR / ChainedScheduler, initial_lr is OneCycle's
    and only the first scheduler's base_lrs remember the optimizer's lr. (CyclicLR and OneCycleLR
    set the lr from their own arguments, so when one of them comes first nothing is lost.)
    """
    leaves = list(_leaves(state, info))
    first_state, first = leaves[0]
    if first.cls in ("OneCycleLR", "CyclicLR") or not any(
            leaf.cls == "OneCycleLR" for _, leaf in leaves[1:]):
        return None
    base_lrs = first_state.get("base_lrs") if isinstance(first_state, Mapping) else None
    return list(base_lrs) if isinstance(base_lrs, (list, tuple)) else None


def verify(opt_class: str, groups: list[Mapping[str, Any]], sched_state: Mapping[str, Any],
           info: SchedulerInfo) -> VerifyResult:
    """Replay the stored schedule from its recovered arguments and compare bit for bit.

    Rebuilds the stand-in optimizer from the stored groups (base lrs = initial_lr, or the first
    sub-scheduler's base_lrs when a later OneCycleLR overwrote initial_lr), constructs
    the scheduler from ``info`` with last_epoch=-1, replays ``replay_steps`` steps, then compares
    every key of the scheduler state (children too; floats by their bytes, tensors by dtype and
    bytes) and every scheduler-owned key of each param group (lr, initial_lr, momentum/betas when
    cycled, max_lr, min_lr, max_momentum, base_momentum).

    Args:
        opt_class: the optimizer class name, as inferred from its group keys.
        groups: the stored param_groups, tensors materialised (see :func:`materialize`).
        sched_state: the stored scheduler state, tensors materialised.
        info: ``identify_scheduler(sched_state, groups)``.

    Example:
        >>> from ckpttool.schedulers import identify_scheduler
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
        >>> for _ in range(5):
        ...     opt.step(); sched.step()
        >>> groups = opt.state_dict()["param_groups"]
        >>> groups[0]["lr"] = 0.02  # a hand edit
        >>> verify("SGD", groups, sched.state_dict(), identify_scheduler(sched.state_dict(),
        ...        groups)).first_difference
        'optimizer.param_groups[0].lr: stored 0.02 != replayed 0.010000000000000002'
    """
    return verify_together(opt_class, groups, [(sched_state, info)])[0]


def verify_together(opt_class: str, groups: list[Mapping[str, Any]],
                    schedulers: Sequence[tuple[Mapping[str, Any], SchedulerInfo]], *,
                    named: Sequence[NamedSchedule | None] | None = None,
                    logged: Sequence[tuple[int, float]] = (),
                    progress: Callable[[int, int], None] | None = None
                    ) -> tuple[VerifyResult, ...]:
    """:func:`verify` for schedulers that step one optimizer in turn (torch's chaining).

    torch documents stepping several schedulers one after another on one optimizer, each
    rescaling the lr the one before left. They are rebuilt on one stand-in optimizer in the
    order given (the file's), stepped in turn that order, and each state is compared with its
    own; the param groups, which the last one wrote, are compared in the last one's result.

    Args:
        opt_class, groups: as for :func:`verify`.
        schedulers: (stored state, ``identify_scheduler`` of it) per scheduler, in file order.
        named: per scheduler, the schedule by name (an ``hf:`` SPEC) that rebuilds it instead of
            its recovered class, or None; the whole argument None: none is named.
        logged: a training log's (step, first-group lr) pairs (an HF Trainer's log_history),
            compared with the same replay (:func:`compare_logged`); the result is the last
            scheduler's ``logged``.
        progress: ``progress(done, steps)`` every 32768 steps of the replay and at its end.

    Returns:
        one VerifyResult per scheduler, in order. When any of them cannot be replayed (or their
        step counts differ, so they were not stepped in turn), none can, and all say why.

    Example:
        >>> from ckpttool.schedulers import identify_scheduler
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> s1 = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
        >>> s2 = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
        >>> for _ in range(5):
        ...     opt.step(); s1.step(); s2.step()
        >>> groups = opt.state_dict()["param_groups"]
        >>> states = [s1.state_dict(), s2.state_dict()]
        >>> [r.identical for r in verify_together("SGD", groups, [
        ...     (st, identify_scheduler(st, groups)) for st in states])]
        [True, True]
    """
    named = list(named) if named is not None else [None] * len(schedulers)
    calls = [n.text if n is not None else format_call(info)
             for (_, info), n in zip(schedulers, named, strict=True)]
    together = " stepped in turn with ".join(calls)

    def unavailable(reason: str) -> tuple[VerifyResult, ...]:
        return tuple(VerifyResult(None, reason=reason, call=call) for call in calls)

    for (_, info), call, name in zip(schedulers, calls, named):
        blocker = info.replay_blocker if name is None else None
        if blocker is not None:
            return unavailable(blocker if len(schedulers) == 1 else
                               f"{call}, stepped in turn on the same optimizer: {blocker}")
    try:
        for state, _ in schedulers:
            _check_read(state, "scheduler")
        counts = [replay_steps(state, info) for state, info in schedulers]
        if len(set(counts)) > 1:
            return unavailable(
                "the schedulers of this optimizer are at different steps ("
                + ", ".join(map(int_text, counts)) + "), so they were not stepped in turn and "
                "no replay order is known")
        steps = counts[0]
        if steps > MAX_VERIFY_STEPS:
            return unavailable(
                f"last_epoch {int_text(steps)} is more than the {MAX_VERIFY_STEPS:,} steps "
                "ckpttool replays (a damaged counter?)")
        optimizer, built = rebuild_stored(opt_class, groups, schedulers, named=named)
        lrs = _replay_in_turn(built, steps, record=logged_steps(logged, steps),
                              progress=progress)
    except CkptToolError as e:
        return unavailable(str(e))
    except (ArithmeticError, LookupError, RuntimeError, TypeError, ValueError) as e:
        # torch refusing the arguments or a step, e.g. stepping OneCycleLR past total_steps
        return unavailable(f"torch refused to replay {together}: {type(e).__name__}: {e}")
    # _is_initial / _get_lr_called_within_step are transients (always False when saved, absent
    # in older torch) and `verbose` (saved by torch < 2.7) changes no lr: the only keys skipped.
    ignore = TRANSIENT_KEYS | {"verbose"}
    cycles = any(info.cycles_momentum for _, info in schedulers)
    results = []
    for i, ((state, _), sched, call) in enumerate(zip(schedulers, built, calls)):
        found = differences(state, sched.state_dict(), "scheduler", tensor_equal=_tensors_equal,
                            ignore=ignore)
        if i == len(schedulers) - 1:
            found = chain(found, _group_differences(list(groups), optimizer.param_groups,
                                                     cycles))
        lines = tuple(islice(found, _MAX_DIFFERENCES))
        results.append(VerifyResult(not lines, lines[0] if lines else None, None, lines, steps,
                                    call))
    if logged:
        results[-1] = replace(results[-1], logged=compare_logged(logged, lrs, steps))
    return tuple(results)


def rebuild_stored(opt_class: str, groups: list[Mapping[str, Any]],
                   schedulers: Sequence[tuple[Mapping[str, Any], SchedulerInfo]], *,
                   named: Sequence[NamedSchedule | None] | None = None,
                   ) -> tuple[torch.optim.Optimizer, list[Any]]:
    """The stored schedulers rebuilt at step 0 from their recovered arguments (or, where
    ``named`` gives one, from the schedule's name: an ``hf:`` SPEC through transformers), on
    one stand-in optimizer, in the order given: what :func:`verify_together` replays and
    ``plot`` draws.

    The base lrs are the groups' initial_lr, or what the first scheduler saw when a later
    OneCycleLR overwrote initial_lr, or its base_lrs when a group lost initial_lr.

    Raises:
        ReplayError: an argument that was not stored, an unknown class, no groups.

    Example:
        >>> from ckpttool.schedulers import identify_scheduler
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
        >>> replay(sched, 5)
        >>> groups = opt.state_dict()["param_groups"]
        >>> state = sched.state_dict()
        >>> fresh, [again] = rebuild_stored("SGD", groups, [(state, identify_scheduler(state))])
        >>> again.last_epoch, fresh.param_groups[0]["lr"]
        (0, 0.1)
    """
    first_state, first_info = schedulers[0]
    start_lrs = _lrs_seen_by_first_scheduler(first_state, first_info)
    if start_lrs is None and any("initial_lr" not in g for g in groups):
        # A group lost its initial_lr (a hand edit): the scheduler's base_lrs still say what
        # the run started from, so the replay answers "is the schedule itself clean?".
        leaf_state, _ = next(_leaves(first_state, first_info))
        base = leaf_state.get("base_lrs") if isinstance(leaf_state, Mapping) else None
        start_lrs = list(base) if isinstance(base, (list, tuple)) else None
    if start_lrs is not None and len(start_lrs) == len(groups):
        groups_at_start = [{**g, "initial_lr": lr} for g, lr in zip(groups, start_lrs)]
    else:
        groups_at_start = list(groups)
    optimizer = standin_optimizer(opt_class, groups_at_start)
    named = named if named is not None else [None] * len(schedulers)
    return optimizer, [_build(info, name, optimizer)
                       for (_, info), name in zip(schedulers, named, strict=True)]


def _replay_in_turn(schedulers: list[Any], steps: int, *, record: set[int] | frozenset = frozenset(),
                    progress: Callable[[int, int], None] | None = None) -> dict[int, float]:
    """Step each scheduler once per step, in order, ``steps`` times, as fast as a bare loop.

    Returns the first group's lr (the last scheduler's ``get_last_lr()[0]``, a tensor as its
    ``.item()``: what the HF Trainer logs) after each step count in ``record`` (0: as built).
    ``progress(done, steps)`` follows every 32768 steps and the end.

    Raises:
        ReplayError: a ReduceLROnPlateau (its steps need metrics).
    """
    if any(isinstance(s, torch_schedulers.ReduceLROnPlateau) for s in schedulers):
        raise ReplayError("ReduceLROnPlateau cannot be replayed: its steps follow metric values "
                          "that are not stored")
    calls = [s.step for s in schedulers]
    one = calls[0] if len(calls) == 1 else None
    lrs: dict[int, float] = {}
    done = 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_STEP_ORDER_WARNING, category=UserWarning)
        for stop in sorted({n for n in record if 0 <= n < steps} | {steps}):
            while done < stop:
                n = min(_PROGRESS_EVERY - done % _PROGRESS_EVERY, stop - done)
                if one is not None:
                    for _ in repeat(None, n):
                        one()
                else:
                    for _ in repeat(None, n):
                        for step in calls:
                            step()
                done += n
                if progress is not None and (done % _PROGRESS_EVERY == 0 or done == steps):
                    progress(done, steps)
            if stop in record:
                lrs[stop] = logged_lr(schedulers[-1])
    return lrs


def logged_lr(scheduler: Any) -> float:
    """The lr a training log shows for ``scheduler`` now: ``get_last_lr()[0]``, a tensor as its
    ``.item()`` (what the HF Trainer logs)."""
    lr = scheduler.get_last_lr()[0]
    return lr.item() if isinstance(lr, torch.Tensor) else lr


# --- resuming from a rewritten checkpoint -------------------------------------------------------

# Group keys a resumed run reads every step: what the rewrite must get bit-exact.
_RESUME_KEYS = ("lr", "momentum", "betas")


def device_usable(device: str) -> bool:
    """Whether torch can put a tensor on ``device`` in this process (a CUDA device on a machine
    without one, an ``mps`` or ``xla`` device, a damaged name: not)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        return False  # without initialising CUDA
    try:
        torch.empty(0, device=device)
    except (RuntimeError, ValueError, TypeError, AssertionError):
        return False
    return True


def move_tensors(value: Any, device: str) -> Any:
    """A copy of a (materialised) tree with its tensors on ``device``."""
    if isinstance(value, torch.Tensor):
        try:
            return value.to(device)
        except RuntimeError as e:  # a device torch does not know, or not usable here
            detail = " ".join(str(e).split())[:120]
            raise ReplayError(f"cannot re-step the lr tensors on device {device!r} ({detail}); "
                              "pass --device cpu") from None
    if isinstance(value, Mapping):
        out = {k: move_tensors(v, device) for k, v in value.items()}
        return type(value)(out) if type(value) is not dict else out
    if isinstance(value, (list, tuple)):
        return type(value)(move_tensors(v, device) for v in value)
    return value


def group_snapshot(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The lr (and momentum / betas) of each group right now, copied."""
    return [{k: copy.deepcopy(g[k]) for k in _RESUME_KEYS if k in g}
            for g in optimizer.param_groups]


def verify_resume(plan: Any, file: TorchFile, steps: int) -> bool | str:
    """Resume from a rewritten file the documented way and compare with the replay.

    Documented order: construct the optimizer, construct the scheduler,
    ``optimizer.load_state_dict``, ``scheduler.load_state_dict``; then step ``steps`` times and
    compare each step's group lrs (and momentum/betas) bit for bit with what the replay went on
    to produce. Per-parameter state is not loaded: schedulers never read it.

    Returns:
        True, or a sentence naming the first difference.
    """
    from ckpttool.inspection import inspect_file

    ckpt = inspect_file(file)
    opt = ckpt.optimizer(plan.optimizer)
    sched_report = next((s for s in ckpt.schedulers if s.location == plan.scheduler), None)
    if sched_report is None:
        return f"no scheduler at {plan.scheduler} in the written file"
    device = None
    lrs = [g.lr_tensor for g in opt.groups if g.lr_tensor is not None]
    if lrs and device_usable(lrs[0].device):
        device = lrs[0].device
    groups = materialize(list(opt.state["param_groups"]), file, device)
    state = materialize(sched_report.state, file, device)
    if plan.semantics != "replay":
        # Nothing to step (ReduceLROnPlateau needs metrics): the state must read back as planned.
        # Tensors in it are lr values the writer's own round-trip tests cover.
        for line in differences(plan.new_state, state, "scheduler",
                                tensor_equal=lambda a, b: True):
            return line
        return True
    optimizer, scheduler = plan.rebuild()
    try:
        optimizer.load_state_dict({"state": {}, "param_groups": groups})
        scheduler.load_state_dict(state)
    except Exception as e:  # a state torch refuses (damaged values the rewrite kept)
        detail = " ".join(str(e).split())[:160]
        return f"torch cannot load its state ({type(e).__name__}: {detail})"
    for i, expected in enumerate(plan.expected[:steps]):
        if isinstance(expected, tuple) and expected[0] == "raises":
            try:
                replay(scheduler, 1)
            except Exception as e:  # the replay raised here too: same behaviour
                return True if type(e).__name__ == expected[1] else f"step {i + 1} raised {e}"
            return f"step {i + 1}: the replay raised {expected[1]}, the resumed run did not"
        replay(scheduler, 1)
        got = group_snapshot(optimizer)
        for line in differences(expected, got, f"resumed step {i + 1}",
                                tensor_equal=_tensors_equal):
            return line
    return True
