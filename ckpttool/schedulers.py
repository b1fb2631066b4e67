"""What a scheduler state is: its ``torch.optim.lr_scheduler`` class and constructor arguments.

A scheduler's ``state_dict()`` is its ``__dict__`` minus the optimizer, so its keys name its
class (torch 2.13 layouts, reference section 2.2) and most constructor arguments are stored
verbatim. The rest are recovered by inverting torch's own float arithmetic exactly: CyclicLR keeps
``step_size_up/down`` only as ``total_size``/``step_ratio``; OneCycleLR keeps ``pct_start`` only in
``_schedule_phases`` and ``max_lr``/``div_factor``/``final_div_factor``/momenta only in the
optimizer's param_groups. Every inverse is checked against the forward formula torch applies to
its arguments, so constructing the class with the recovered arguments (``last_epoch=-1``) and
stepping it :func:`replay_steps` times rebuilds the stored state bit for bit (``schedule.verify``
proves it with real torch). Learning rates themselves are never computed here.

This module must not import torch (``show`` runs without it); it accepts states read by
:mod:`ckpttool.serialization` (``TensorRef`` for tensors, ``Counter`` milestones, possibly with
string keys after a ``torch.distributed.checkpoint`` round trip) and live ``state_dict()`` output.

Example:
    >>> state = {"T_max": 40, "eta_min": 1e-05, "base_lrs": [0.1], "last_epoch": 7,
    ...          "_step_count": 8, "_is_initial": False, "_get_lr_called_within_step": False,
    ...          "_last_lr": [0.09]}
    >>> info = identify_scheduler(state)
    >>> format_call(info), replay_steps(state, info)
    ('CosineAnnealingLR(T_max=40, eta_min=1e-05)', 7)
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ckpttool.errors import StateError
from ckpttool.serialization import TensorRef

# The 15 scheduler classes of torch.optim.lr_scheduler (its __all__ minus the LRScheduler base).
SCHEDULER_CLASSES: tuple[str, ...] = (
    "LambdaLR", "MultiplicativeLR", "StepLR", "MultiStepLR", "ConstantLR", "LinearLR",
    "ExponentialLR", "SequentialLR", "CosineAnnealingLR", "ChainedScheduler",
    "ReduceLROnPlateau", "CyclicLR", "CosineAnnealingWarmRestarts", "OneCycleLR", "PolynomialLR",
)

# Param-group keys a scheduler adds to the groups when it is built (setdefault or assignment,
# reference 2.3), never an optimizer's own: optimizer identification ignores them, a stand-in
# optimizer leaves them to the scheduler it is given, a rewrite removes those the new one lacks.
SCHEDULER_SET_KEYS: tuple[str, ...] = (
    "initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum")
# Param-group keys a scheduler rewrites as it steps: lr always, momentum / betas only while a
# CyclicLR or OneCycleLR cycles them (SchedulerInfo.cycles_momentum). With SCHEDULER_SET_KEYS,
# every group key a scheduler owns; a rewrite must set them together.
SCHEDULER_STEPPED_KEYS: tuple[str, ...] = ("lr", "momentum", "betas")

# Base-class attributes saved by torch but transient: always False in a saved state, and absent
# from states saved by older torch. Comparisons of whole states skip them.
TRANSIENT_KEYS = frozenset({"_is_initial", "_get_lr_called_within_step"})


class _Required:
    """Marks a constructor argument without a default."""

    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Any = _Required()

# Constructor keyword arguments in signature order with torch 2.13's defaults, without
# `optimizer` and `last_epoch` (a test checks this table against inspect.signature).
SIGNATURES: dict[str, tuple[tuple[str, Any], ...]] = {
    "LambdaLR": (("lr_lambda", REQUIRED),),
    "MultiplicativeLR": (("lr_lambda", REQUIRED),),
    "StepLR": (("step_size", REQUIRED), ("gamma", 0.1)),
    "MultiStepLR": (("milestones", REQUIRED), ("gamma", 0.1)),
    "ConstantLR": (("factor", 1.0 / 3), ("total_iters", 5)),
    "LinearLR": (("start_factor", 1.0 / 3), ("end_factor", 1.0), ("total_iters", 5)),
    "ExponentialLR": (("gamma", REQUIRED),),
    "SequentialLR": (("schedulers", REQUIRED), ("milestones", REQUIRED)),
    "CosineAnnealingLR": (("T_max", REQUIRED), ("eta_min", 0.0)),
    "ChainedScheduler": (("schedulers", REQUIRED),),
    "ReduceLROnPlateau": (
        ("mode", "min"), ("factor", 0.1), ("patience", 10), ("threshold", 1e-4),
        ("threshold_mode", "rel"), ("cooldown", 0), ("min_lr", 0), ("eps", 1e-8)),
    "CyclicLR": (
        ("base_lr", REQUIRED), ("max_lr", REQUIRED), ("step_size_up", 2000),
        ("step_size_down", None), ("mode", "triangular"), ("gamma", 1.0), ("scale_fn", None),
        ("scale_mode", "cycle"), ("cycle_momentum", True), ("base_momentum", 0.8),
        ("max_momentum", 0.9)),
    "CosineAnnealingWarmRestarts": (("T_0", REQUIRED), ("T_mult", 1), ("eta_min", 0.0)),
    "OneCycleLR": (
        ("max_lr", REQUIRED), ("total_steps", None), ("epochs", None),
        ("steps_per_epoch", None), ("pct_start", 0.3), ("anneal_strategy", "cos"),
        ("cycle_momentum", True), ("base_momentum", 0.85), ("max_momentum", 0.95),
        ("div_factor", 25.0), ("final_div_factor", 1e4), ("three_phase", False)),
    "PolynomialLR": (("total_iters", 5), ("power", 1.0)),
}

# Classes whose arguments hold sub-schedulers (SchedulerInfo.children).
COMPOSITE_CLASSES = frozenset({"SequentialLR", "ChainedScheduler"})

# CyclicLR's built-in modes force scale_mode (LS:_init_scale_fn) unless a custom scale_fn is set.
_CYCLIC_FORCED_SCALE_MODE = {"triangular": "cycle", "triangular2": "cycle",
                             "exp_range": "iterations"}


# --- state layouts --------------------------------------------------------------------------

# Saved by every LRScheduler subclass that calls LRScheduler.__init__.
_BASE_REQUIRED = frozenset({"base_lrs", "last_epoch"})
# Also saved by LRScheduler, but version-dependent (older torch saved `verbose` and lacked
# `_is_initial`), so their presence or absence decides nothing.
_BASE_OPTIONAL = frozenset({"_step_count", "_last_lr", "verbose"}) | TRANSIENT_KEYS


@dataclass(frozen=True)
class _Layout:
    """The keys of one class's state: all of `required`, any of `optional`."""

    required: frozenset[str]
    optional: frozenset[str] = frozenset()
    base: bool = True  # True: also the LRScheduler base keys

    def matches(self, keys: set[str]) -> bool:
        required = self.required | (_BASE_REQUIRED if self.base else frozenset())
        allowed = required | self.optional | (_BASE_OPTIONAL if self.base else {"verbose"})
        return required <= keys <= allowed


def _layout(required: str, optional: str = "", base: bool = True) -> _Layout:
    return _Layout(frozenset(required.split()), frozenset(optional.split()), base)


# Reference section 2.2 (e01). LambdaLR and MultiplicativeLR share one layout.
_LAYOUTS: dict[str, _Layout] = {
    "LambdaLR": _layout("lr_lambdas"),
    "MultiplicativeLR": _layout("lr_lambdas"),
    "StepLR": _layout("step_size gamma"),
    "MultiStepLR": _layout("milestones gamma"),
    "ConstantLR": _layout("factor total_iters"),
    "LinearLR": _layout("start_factor end_factor total_iters"),
    "ExponentialLR": _layout("gamma"),
    # SequentialLR and ChainedScheduler never call LRScheduler.__init__.
    "SequentialLR": _layout("_milestones last_epoch _last_lr _schedulers", base=False),
    "CosineAnnealingLR": _layout("T_max eta_min"),
    "ChainedScheduler": _layout("_last_lr _schedulers", base=False),
    # ReduceLROnPlateau is not an LRScheduler in spirit: no base_lrs; default_min_lr and
    # _last_lr are missing from states saved by older torch.
    "ReduceLROnPlateau": _layout(
        "factor min_lrs patience cooldown eps last_epoch mode_worse mode threshold "
        "threshold_mode best cooldown_counter num_bad_epochs", "default_min_lr _last_lr verbose",
        base=False),
    # use_beta1 and the momenta exist only with cycle_momentum=True.
    "CyclicLR": _layout(
        "max_lrs total_size step_ratio mode gamma scale_mode cycle_momentum",
        "use_beta1 base_momentums max_momentums _scale_fn_custom"),
    "CosineAnnealingWarmRestarts": _layout("T_0 T_i T_mult eta_min T_cur"),
    # use_beta1 exists only with cycle_momentum=True; older torch lacks _anneal_func_type.
    "OneCycleLR": _layout("total_steps _schedule_phases cycle_momentum",
                          "_anneal_func_type use_beta1"),
    "PolynomialLR": _layout("total_iters power"),
}


def looks_like_scheduler(state: Any) -> bool:
    """Cheap structural test: could this value be an LR-scheduler ``state_dict()``?

    True for the states of all 15 torch classes and of custom ``LRScheduler`` subclasses
    (``base_lrs`` + ``last_epoch``); :func:`identify_scheduler` then says which class. A walker
    that finds a SequentialLR / ChainedScheduler should not descend into its ``_schedulers``:
    those sub-states are reported as its children.

    Example:
        >>> looks_like_scheduler({"base_lrs": [0.1], "last_epoch": 3, "gamma": 0.9})
        True
        >>> looks_like_scheduler({"state": {}, "param_groups": []})
        False
    """
    if not isinstance(state, Mapping):
        return False
    if "base_lrs" in state and "last_epoch" in state:
        return True
    if "_schedulers" in state and "_last_lr" in state:
        return isinstance(state["_schedulers"], (list, tuple))
    return {"min_lrs", "best", "num_bad_epochs", "last_epoch"} <= state.keys()


# --- the result -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SchedulerInfo:
    """What a scheduler state is and how to rebuild it.

    Attributes:
        cls: one of SCHEDULER_CLASSES, or "unknown" (never a guess).
        args: constructor keyword arguments as Python literals, in signature order, without
            optimizer / last_epoch / schedulers; every argument that influences the state, with
            the value that reproduces it (defaults included).
        children: SequentialLR / ChainedScheduler sub-schedulers, in order.
        unrecoverable: one sentence each: what cannot be recovered and why.
        candidates: all classes with this exact state layout, when ambiguous (LambdaLR /
            MultiplicativeLR); empty otherwise.
        missing: names of constructor arguments that could not be recovered (shown as
            ``name=<not stored>`` by :func:`format_call`, needed as overrides to rebuild).
        notes: one sentence each: oddities worth telling that do not block a rebuild.
    """

    cls: str
    args: dict[str, Any]
    children: tuple[SchedulerInfo, ...] = ()
    unrecoverable: tuple[str, ...] = ()
    candidates: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def call(self) -> str:
        """The constructor call, as :func:`format_call` writes it."""
        return format_call(self)

    @property
    def cycles_momentum(self) -> bool:
        """True when this scheduler (or a child) rewrites momentum / betas[0] every step."""
        own = self.cls in ("CyclicLR", "OneCycleLR") and self.args.get("cycle_momentum") is True
        return own or any(c.cycles_momentum for c in self.children)

    @property
    def replay_blocker(self) -> str | None:
        """Why re-stepping cannot rebuild this state, or None when it can."""
        if self.cls == "unknown":
            why = self.unrecoverable[0] if self.unrecoverable else "its keys match no class"
            return f"the scheduler class is not recognised: {why}"
        if self.cls == "ReduceLROnPlateau":
            return ("ReduceLROnPlateau follows the metric values passed to step(), which are not "
                    "stored, so it cannot be replayed")
        if self.missing:
            what = " or ".join(self.candidates) if self.candidates else self.cls
            return f"{what}: " + " ".join(self.unrecoverable)
        for i, child in enumerate(self.children):
            blocker = child.replay_blocker
            if blocker is not None:
                return f"{self.cls} scheduler {i} ({child.cls}): {blocker}"
        return None

    @property
    def replayable(self) -> bool:
        """True when the recovered arguments suffice to re-step the stored state."""
        return self.replay_blocker is None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (floats stay floats; the renderer writes them round-trip exact)."""
        return {"class": self.cls, "call": format_call(self), "args": dict(self.args),
                "children": [c.to_dict() for c in self.children],
                "unrecoverable": list(self.unrecoverable), "candidates": list(self.candidates),
                "missing": list(self.missing), "notes": list(self.notes)}


# --- exact comparison of plain values ---------------------------------------------------------


def _float_bits(x: float) -> bytes:
    return struct.pack("<d", x)


def is_tensor(value: Any) -> bool:
    """True for a TensorRef or a torch tensor (recognised without importing torch)."""
    if isinstance(value, TensorRef):
        return True
    return type(value).__module__.startswith("torch") and hasattr(value, "dtype") and hasattr(
        value, "shape")


def differences(a: Any, b: Any, path: str, *,
                tensor_equal: Callable[[Any, Any], bool] | None = None,
                ignore: frozenset[str] = frozenset()) -> Iterator[str]:
    """Every way ``a`` (stored) differs from ``b`` (replayed), bit for bit, as one line each.

    Floats compare by their bytes (so -0.0 != 0.0 and a NaN equals the same NaN), ints / bools /
    str by type and value; dicts by keys and values (key order is not state); lists and tuples
    alike as sequences (pickling formats and DCP may turn tuples into lists; torch only indexes
    them). Tensors need ``tensor_equal``; without it they differ from anything. Dict keys in
    ``ignore`` are skipped at every level.

    Example:
        >>> list(differences({"a": [1.0, 2.0]}, {"a": [1.0, 2.5]}, "s"))
        ['s.a[1]: stored 2.0 != replayed 2.5']
    """
    if is_tensor(a) or is_tensor(b):
        if not (tensor_equal is not None and is_tensor(a) and is_tensor(b)
                and tensor_equal(a, b)):
            yield f"{path}: stored {_show(a)} != replayed {_show(b)}"
        return
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        yield from _mapping_differences(a, b, path, tensor_equal, ignore)
        return
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            yield f"{path}: stored {len(a)} items {_show(a)} != replayed {len(b)} items {_show(b)}"
            return
        for i, (x, y) in enumerate(zip(a, b)):
            yield from differences(x, y, f"{path}[{i}]", tensor_equal=tensor_equal, ignore=ignore)
        return
    if type(a) is not type(b):
        yield (f"{path}: stored {type(a).__name__} {_show(a)} != replayed "
               f"{type(b).__name__} {_show(b)}")
    elif isinstance(a, float):
        if _float_bits(a) != _float_bits(b):
            yield f"{path}: stored {_show(a)} != replayed {_show(b)}"
    elif a != b:
        yield f"{path}: stored {_show(a)} != replayed {_show(b)}"


def _mapping_differences(a: Mapping, b: Mapping, path: str, tensor_equal, ignore) -> Iterator[str]:
    b_by_key: Mapping = b
    if a.keys() != b.keys() and a and all(isinstance(k, str) for k in a):
        # torch.distributed.checkpoint stores dict keys as strings (a Counter of milestones
        # {2: 1} comes back as {'2': 1}); the schedule is the same when they match as strings.
        as_str = {_key_text(k): v for k, v in b.items()}
        if len(as_str) == len(b) and as_str.keys() == a.keys():
            b_by_key = as_str
    def sub(key: Any) -> str:
        return f"{path}.{key}" if isinstance(key, str) else f"{path}[{value_repr(key)}]"

    for key in a:
        if key in ignore:
            continue
        if key not in b_by_key:
            yield f"{sub(key)}: in the stored state, absent from a clean run"
        else:
            yield from differences(a[key], b_by_key[key], sub(key), tensor_equal=tensor_equal,
                                   ignore=ignore)
    for key in b_by_key:
        if key not in a and key not in ignore:
            yield (f"{sub(key)}: absent from the stored state (a clean run has "
                   f"{_show(b_by_key[key])})")


def _show(value: Any) -> str:
    """A short, exact rendering of a value for a difference message."""
    if isinstance(value, TensorRef):
        return f"{value!r} (value not read)"
    if is_tensor(value):
        try:
            scalar = value.item() if value.numel() == 1 else None
        except (RuntimeError, ValueError):  # a meta tensor, or a device this process lacks
            scalar = None
        dtype = str(value.dtype).replace("torch.", "")
        return f"tensor({scalar!r}, {dtype})" if scalar is not None else repr(value)
    text = value_repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def same(a: Any, b: Any) -> bool:
    """Exact equality of two stored values, the one test ckpttool uses for learning rates.

    Floats compare bit for bit (so -0.0 != 0.0 and a NaN equals the same NaN), other scalars by
    type and value, containers item by item (see :func:`differences`). A tensor's value is
    compared once decoded to a Python number (inspection decodes scalar tensors), so a float32
    lr equals a ``_last_lr`` holding the same float32 value.

    Example:
        >>> same([0.1, 0.2], (0.1, 0.2)), same(0.0, -0.0), same(1, 1.0)
        (True, False, False)
    """
    return next(differences(a, b, ""), None) is None


# --- text of values that may be absurd -------------------------------------------------------

# Python refuses to write an int of more than 4300 decimal digits (sys.set_int_max_str_digits,
# a guard against quadratic conversions) and a checkpoint may hold one: those are shown by their
# size. 14_000 bits is about 4214 digits, safely under the limit.
MAX_INT_TEXT_BITS = 14_000


def int_text(value: int) -> str:
    """``repr(value)``, or ``<int of N bits>`` for an int too long to write in decimal.

    Example:
        >>> int_text(12), int_text(2**20_000)
        ('12', '<int of 20001 bits>')
    """
    bits = abs(value).bit_length()
    return repr(value) if bits <= MAX_INT_TEXT_BITS else f"<int of {bits} bits>"


def _key_text(key: Any) -> str:
    """A dict key as ``str`` writes it (the form torch.distributed.checkpoint saves), safely."""
    return key if isinstance(key, str) else value_repr(key)


def value_repr(value: Any) -> str:
    """``repr`` of a plain value (numbers, strings, containers), safe for absurd ints.

    Example:
        >>> value_repr({"a": [1, 2**20_000]})
        "{'a': [1, <int of 20001 bits>]}"
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return int_text(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(value_repr, value)) + "]"
    if isinstance(value, tuple):
        inner = ", ".join(map(value_repr, value))
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{value_repr(k)}: {value_repr(v)}" for k, v in value.items()) + "}"
    try:
        return repr(value)
    except ValueError:  # an object whose repr holds an absurd int
        return f"<{type(value).__name__}>"


# --- exact inversion of torch's float arithmetic ---------------------------------------------

# Ulps tried on each side of an algebraic inverse: a quotient or product is off by at most a few.
_NEIGHBOURS = 8


def _holds(check: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(check(value))
    except (ArithmeticError, TypeError, ValueError):
        return False


def shortest_float(estimate: float, reproduces: Callable[[float], bool],
                   default: float | None = None) -> float | None:
    """The shortest decimal near ``estimate`` for which ``reproduces`` holds, or None.

    ``reproduces(x)`` applies torch's own formula to a candidate argument and compares the result
    with the stored value exactly, so any answer is as good as the original argument for the
    state; the shortest reads as the user wrote it (25.0, not 24.999999999999996). ``default``, when
    it reproduces, wins: it is what an unspecified argument was.

    Example:
        >>> shortest_float(0.1 / (0.1 / 25.0), lambda d: 0.1 / d == 0.1 / 25.0)
        25.0
    """
    if default is not None and _holds(reproduces, default):
        return default
    if not isinstance(estimate, float) or not math.isfinite(estimate):
        return None
    seeds = [estimate]
    low = high = estimate
    for _ in range(_NEIGHBOURS):
        low, high = math.nextafter(low, -math.inf), math.nextafter(high, math.inf)
        seeds += [low, high]
    for digits in range(1, 18):  # 17 significant digits round-trip every double
        tried: set[float] = set()
        for seed in seeds:  # nearest seeds first: among equally short answers, the closest
            candidate = float(f"{seed:.{digits - 1}e}")
            if candidate not in tried:
                tried.add(candidate)
                if _holds(reproduces, candidate):
                    return candidate
    return None


def _ratio(a: Any, b: Any) -> float:
    """``a / b`` as an estimate for :func:`shortest_float`; NaN when there is none (a zero, an
    overflow: stored values may be absurd)."""
    try:
        return float(a / b)
    except (ArithmeticError, TypeError, ValueError):
        return math.nan


def _intify(x: float) -> int | float:
    """An integral step count reads as an int; torch applies float() to it either way."""
    return int(x) if x.is_integer() and abs(x) < 2**53 else x


# --- recovery ---------------------------------------------------------------------------------


class _NotLiteral(Exception):
    """args[0]: what the offending value is, in words."""


def _literal(value: Any) -> Any:
    """A copy of a stored value as a Python literal, or _NotLiteral (tensors, opaque objects)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_literal(v) for v in value]
    raise _NotLiteral(_describe(value))


def _per_group(values: Any) -> Any:
    """One value for all groups when they agree (as a user writes it), else the list."""
    values = _literal(values)
    if isinstance(values, list) and values and all(same(v, values[0]) for v in values):
        return values[0]
    return values


def _describe(value: Any) -> str:
    if is_tensor(value):
        return "a tensor"
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


class _Recovery:
    """Collects what one state yields: arguments, what is missing and why, notes."""

    def __init__(self, cls: str, state: Mapping, groups: list | None,
                 overwritten: frozenset[str]):
        self.cls = cls
        self.state = state
        self.groups = groups
        self.overwritten = overwritten  # group keys a later sibling scheduler assigned
        self.args: dict[str, Any] = {}
        self.missing: list[str] = []
        self.why: list[str] = []
        self.notes: list[str] = []
        self.children: list[SchedulerInfo] = []
        self.candidates: tuple[str, ...] = ()

    def set(self, name: str, value: Any, *, per_group: bool = False,
            source: str = "in the state") -> None:
        try:
            self.args[name] = _per_group(value) if per_group else _literal(value)
        except _NotLiteral as e:
            self.lost(name, f"{name} is stored {source} as {e.args[0]}, and ckpttool writes "
                            "only plain numbers, strings and lists as arguments")

    def take(self, *names: str) -> None:
        for name in names:
            self.set(name, self.state[name])

    def lost(self, name: str, sentence: str) -> None:
        if name not in self.missing:
            self.missing.append(name)
        if sentence and sentence not in self.why:
            self.why.append(sentence)

    def info(self) -> SchedulerInfo:
        order = [name for name, _ in SIGNATURES[self.cls]]
        args = {k: self.args[k] for k in order if k in self.args}
        missing = tuple(k for k in order if k in self.missing)
        return SchedulerInfo(self.cls, args, tuple(self.children), tuple(self.why),
                             self.candidates, missing, tuple(self.notes))


def _recover_lambda(r: _Recovery) -> None:
    # LambdaLR (closed form) and MultiplicativeLR (recursive) save the very same keys.
    r.candidates = ("LambdaLR", "MultiplicativeLR")
    saved = r.state["lr_lambdas"]
    if not isinstance(saved, (list, tuple)):
        r.lost("lr_lambda", f"lr_lambdas is stored as {_describe(saved)}, not a list")
        return
    kinds: dict[str, list[int]] = {}
    for i, fn in enumerate(saved):
        if fn is None:
            kind = "was a function or lambda, which torch does not save"
        elif isinstance(fn, Mapping) and not fn:
            kind = ("was a functools.partial, a bound method or a callable object without "
                    "attributes; torch saved an empty dict, so its code and arguments are lost")
        elif isinstance(fn, Mapping):
            kind = (f"was a callable object; torch saved only its attributes "
                    f"({', '.join(map(_key_text, fn))}), not its code")
        else:
            kind = f"is stored as {_describe(fn)}, which torch never writes"
        kinds.setdefault(kind, []).append(i)
    for kind, where in kinds.items():
        if len(where) == len(saved):
            whose = "lr_lambda" if len(saved) == 1 else f"lr_lambda (all {len(saved)} groups)"
        else:
            whose = f"lr_lambda for group{'s' if len(where) > 1 else ''} " + ", ".join(
                map(str, where))
        r.lost("lr_lambda", f"{whose} {kind}.")
    if not saved:
        r.lost("lr_lambda", "lr_lambdas is empty: no group's function was saved.")


# MultiStepLR keeps its milestones as a Counter (a milestone listed twice decays twice); a list
# longer than this is no run's schedule, and spelling out a forged count would exhaust memory.
MAX_MILESTONES = 10_000


def _milestones(value: Any, r: _Recovery) -> list[int] | str:
    """The milestones list a Counter (or an older torch's list) stands for, or why there is none."""
    if isinstance(value, (list, tuple)):  # older torch kept the list as given
        items = [(m, 1) for m in value]
    elif isinstance(value, Mapping):
        items = list(value.items())
    else:
        return f"milestones is stored as {_describe(value)}, not a Counter of int epochs"
    ints: Counter = Counter()
    from_str: Counter = Counter()
    for key, count in items:
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            return (f"milestone {value_repr(key)[:40]} has the count "
                    f"{value_repr(count)[:40]}, not a non-negative int")
        if isinstance(key, int) and not isinstance(key, bool):
            ints[key] += count
        elif isinstance(key, str) and _is_int_text(key):
            from_str[int(key)] += count
        else:
            return f"milestones hold the key {value_repr(key)[:40]}, not an int epoch"
    total = sum((ints or from_str).values())
    if total > MAX_MILESTONES:
        return (f"milestones count {int_text(total)} epochs in all; ckpttool rebuilds at most "
                f"{MAX_MILESTONES} (edited by hand?)")
    if ints and from_str:
        r.notes.append("milestones hold both int and string keys (a torch.distributed.checkpoint "
                       "state loaded into a template): step() matches only the int ones, and "
                       "step(epoch) or an enclosing SequentialLR crash on the mix.")
    return sorted((ints or from_str).elements())


def _is_int_text(text: str) -> bool:
    """True for the decimal text of an int, as str(int) writes it (DCP keys)."""
    digits = text.removeprefix("-")
    if not (digits.isdecimal() and digits.isascii()) or len(digits) > 4000:
        return False
    try:
        int(text)
    except ValueError:
        return False
    return True


def _recover_multistep(r: _Recovery) -> None:
    milestones = _milestones(r.state["milestones"], r)
    if isinstance(milestones, str):
        r.lost("milestones", milestones)
    else:
        r.args["milestones"] = milestones
    r.take("gamma")


def _recover_plateau(r: _Recovery) -> None:
    r.take("mode", "factor", "patience", "threshold", "threshold_mode", "cooldown")
    default_min_lr = r.state.get("default_min_lr")
    # None: min_lr was given as a list (or the state predates default_min_lr)
    r.set("min_lr", r.state["min_lrs"] if default_min_lr is None else default_min_lr)
    r.take("eps")


def _cyclic_step_sizes(total: Any, ratio: Any) -> tuple[Any, Any] | None:
    """step_size_up/down from total_size = up + down and step_ratio = up / total_size."""
    if not (isinstance(total, float) and isinstance(ratio, float)):
        return None
    up = shortest_float(ratio * total, lambda u: u / total == ratio)
    if up is None:
        return None
    down = shortest_float(total - up, lambda d: up + d == total)
    if down is None:
        return None
    return _intify(up), _intify(down)


def _recover_cyclic(r: _Recovery) -> None:
    s = r.state
    r.set("base_lr", s["base_lrs"], per_group=True)
    r.set("max_lr", s["max_lrs"], per_group=True)
    sizes = _cyclic_step_sizes(s["total_size"], s["step_ratio"])
    if sizes is None:
        for name in ("step_size_up", "step_size_down"):
            r.lost(name, f"no step_size_up/step_size_down reproduce total_size="
                         f"{value_repr(s['total_size'])} and step_ratio="
                         f"{value_repr(s['step_ratio'])} exactly "
                         "(edited by hand?)")
    else:
        up, down = sizes
        r.args["step_size_up"] = up
        r.args["step_size_down"] = None if float(down) == float(up) else down
    r.take("mode", "gamma")
    mode, scale_mode, custom = s["mode"], s["scale_mode"], s.get("_scale_fn_custom")
    if custom is not None:
        keys = ", ".join(map(_key_text, custom)) if isinstance(custom, Mapping) else ""
        r.lost("scale_fn", f"scale_fn was a callable object; torch saved only its attributes "
                           f"({keys}), not its code")
    elif not isinstance(mode, str) or mode not in _CYCLIC_FORCED_SCALE_MODE:
        r.lost("scale_fn", f"scale_fn was a function or lambda (mode {value_repr(mode)} is not "
                           "built in), which torch does not save")
    elif scale_mode != _CYCLIC_FORCED_SCALE_MODE[mode]:
        r.lost("scale_fn", f"scale_fn was a function or lambda (scale_mode "
                           f"{value_repr(scale_mode)} with mode {mode!r} needs one), which "
                           "torch does not save")
    else:
        # A function given as scale_fn is saved as None too; it is told apart only by the clues
        # above, and otherwise shows up as a verify difference.
        r.args["scale_fn"] = None
    r.take("scale_mode", "cycle_momentum")
    if s["cycle_momentum"] is True:
        for arg, key in (("base_momentum", "base_momentums"), ("max_momentum", "max_momentums")):
            if key in s:
                r.set(arg, s[key], per_group=True)
            else:
                r.lost(arg, f"{key} is missing although cycle_momentum is True")


def _onecycle_phases(pct: float, total: int, three_phase: bool) -> list[dict[str, Any]]:
    """OneCycleLR.__init__'s _schedule_phases for these arguments (torch 2.13, LS:2432-2472)."""
    if three_phase:
        return [
            {"end_step": float(pct * total) - 1, "start_lr": "initial_lr", "end_lr": "max_lr",
             "start_momentum": "max_momentum", "end_momentum": "base_momentum"},
            {"end_step": float(2 * pct * total) - 2, "start_lr": "max_lr",
             "end_lr": "initial_lr", "start_momentum": "base_momentum",
             "end_momentum": "max_momentum"},
            {"end_step": total - 1, "start_lr": "initial_lr", "end_lr": "min_lr",
             "start_momentum": "max_momentum", "end_momentum": "max_momentum"},
        ]
    return [
        {"end_step": float(pct * total) - 1, "start_lr": "initial_lr", "end_lr": "max_lr",
         "start_momentum": "max_momentum", "end_momentum": "base_momentum"},
        {"end_step": total - 1, "start_lr": "max_lr", "end_lr": "min_lr",
         "start_momentum": "base_momentum", "end_momentum": "max_momentum"},
    ]


def _group_values(r: _Recovery, key: str) -> list[float] | None:
    """group[key] of every group, when all are plain floats/ints."""
    values = []
    for g in r.groups or ():
        v = g.get(key) if isinstance(g, Mapping) else None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        values.append(v)
    return values or None


def _recover_divisor(r: _Recovery, name: str, top: list | None, bottom: list | None,
                     top_key: str, bottom_key: str, default: float) -> None:
    """OneCycleLR's ``name`` from ``bottom = top / name``, exact in every group (div_factor
    from max_lr and initial_lr; final_div_factor from initial_lr and min_lr)."""
    if top is None or bottom is None or len(top) != len(bottom):
        r.lost(name, f"{name}: the param_groups need float {top_key} and {bottom_key}")
        return
    value = shortest_float(
        _ratio(top[0], bottom[0]),
        lambda d: all(t / d == b for t, b in zip(top, bottom, strict=True)), default)
    if value is None:
        r.lost(name, f"no {name} gives {bottom_key} = {top_key} / {name} exactly in every group "
                     f"({top_key} or {bottom_key} edited by hand?)")
    else:
        r.args[name] = value


def _recover_onecycle(r: _Recovery) -> None:
    s = r.state
    total = s["total_steps"]
    r.take("total_steps")
    phases = s["_schedule_phases"]
    found = None
    if isinstance(total, int) and isinstance(phases, list) and len(phases) in (2, 3) and all(
            isinstance(p, Mapping) and isinstance(p.get("end_step"), (int, float)) for p in phases):
        three = len(phases) == 3
        found = shortest_float(_ratio(phases[0]["end_step"] + 1, total),
                               lambda p: same(phases, _onecycle_phases(p, total, three)), 0.3)
    if found is None:
        r.lost("pct_start", "no pct_start reproduces _schedule_phases exactly (edited by hand?)")
        r.lost("three_phase", "")
    else:
        r.args["pct_start"] = found
        r.args["three_phase"] = len(phases) == 3
    if "_anneal_func_type" in s:
        r.set("anneal_strategy", s["_anneal_func_type"])
    else:
        r.lost("anneal_strategy", "anneal_strategy: states saved by older torch do not record it "
                                  "(no _anneal_func_type)")
    r.take("cycle_momentum")
    momentum = s["cycle_momentum"] is True
    group_args = ["max_lr", "div_factor", "final_div_factor"]
    if momentum:
        group_args += ["base_momentum", "max_momentum"]
    if r.groups is None or "max_lr" in r.overwritten:
        where = ("the optimizer's param_groups, which were not given" if r.groups is None else
                 "the optimizer's param_groups, where a later OneCycleLR in the same "
                 "SequentialLR/ChainedScheduler overwrote them")
        for name in group_args:
            r.lost(name, f"{', '.join(group_args[:-1])} and {group_args[-1]}: OneCycleLR keeps "
                         f"them only in {where}")
        return
    initial, max_lrs, min_lrs = (_group_values(r, k) for k in ("initial_lr", "max_lr", "min_lr"))
    if max_lrs is None:
        r.lost("max_lr", "max_lr: the param_groups hold no float max_lr in every group")
    else:
        r.set("max_lr", max_lrs, per_group=True)
    _recover_divisor(r, "div_factor", max_lrs, initial, "max_lr", "initial_lr", 25.0)
    _recover_divisor(r, "final_div_factor", initial, min_lrs, "initial_lr", "min_lr", 1e4)
    if momentum:
        for name in ("base_momentum", "max_momentum"):
            values = [g.get(name) if isinstance(g, Mapping) else None for g in r.groups]
            if any(v is None for v in values):
                r.lost(name, f"{name}: the param_groups lack it although cycle_momentum is True")
            else:
                r.set(name, values, per_group=True, source="in the param_groups")
        if "max_momentum" in r.overwritten:
            r.notes.append("base_momentum and max_momentum are those a later CyclicLR wrote into "
                           "the param_groups, which OneCycleLR reads every step; its own were "
                           "overwritten and leave no trace in the state.")


def _group_keys_assigned(state: Any) -> frozenset[str]:
    """Group keys the scheduler saved as ``state`` assigns when built (not setdefault)."""
    cls = _match(state)
    if cls in COMPOSITE_CLASSES and isinstance(state["_schedulers"], (list, tuple)):
        return frozenset().union(*map(_group_keys_assigned, state["_schedulers"]))
    momenta = frozenset({"max_momentum", "base_momentum"}) if cls in (
        "OneCycleLR", "CyclicLR") and state["cycle_momentum"] is True else frozenset()
    if cls == "OneCycleLR":
        return momenta | {"initial_lr", "max_lr", "min_lr"}
    return momenta


def _recover_composite(r: _Recovery) -> None:
    subs = r.state["_schedulers"]
    if not isinstance(subs, (list, tuple)) or not subs:
        r.lost("schedulers", f"_schedulers is stored as {_describe(subs)}, not a list of states")
        return
    # OneCycleLR reads its arguments back from group keys, which a sub-scheduler built after it
    # may assign again; each child learns which keys its later siblings overwrote.
    later = [r.overwritten.union(*map(_group_keys_assigned, subs[i + 1:]))
             for i in range(len(subs))]
    r.children = [_identify(sub, r.groups, after) for sub, after in zip(subs, later)]
    if r.cls == "SequentialLR":
        milestones = r.state["_milestones"]
        r.set("milestones", list(milestones) if isinstance(milestones, (list, tuple))
              else milestones)


def _taker(*names: str) -> Callable[[_Recovery], None]:
    return lambda r: r.take(*names)


_RECOVER: dict[str, Callable[[_Recovery], None]] = {
    "LambdaLR": _recover_lambda,
    "StepLR": _taker("step_size", "gamma"),
    "MultiStepLR": _recover_multistep,
    "ConstantLR": _taker("factor", "total_iters"),
    "LinearLR": _taker("start_factor", "end_factor", "total_iters"),
    "ExponentialLR": _taker("gamma"),
    "SequentialLR": _recover_composite,
    "CosineAnnealingLR": _taker("T_max", "eta_min"),
    "ChainedScheduler": _recover_composite,
    "ReduceLROnPlateau": _recover_plateau,
    "CyclicLR": _recover_cyclic,
    "CosineAnnealingWarmRestarts": _taker("T_0", "T_mult", "eta_min"),
    "OneCycleLR": _recover_onecycle,
    "PolynomialLR": _taker("total_iters", "power"),
}


def _unknown(sentence: str) -> SchedulerInfo:
    return SchedulerInfo("unknown", {}, unrecoverable=(sentence,))


def _unknown_layout(keys: set[str]) -> SchedulerInfo:
    # Name the closest class as a hint for the reader (a custom subclass usually adds keys),
    # without calling the state that class.
    best, extra = None, None
    for cls, layout in _LAYOUTS.items():
        required = layout.required | (_BASE_REQUIRED if layout.base else frozenset())
        if required <= keys and layout.required and (
                best is None or len(layout.required) > len(_LAYOUTS[best].required)):
            allowed = required | layout.optional | (_BASE_OPTIONAL if layout.base else set())
            best, extra = cls, sorted(keys - allowed)
    if best is not None:
        return _unknown(f"its keys are those of {best} plus {extra}: perhaps a custom subclass; "
                        "ckpttool rebuilds only the torch classes themselves")
    return _unknown(f"its keys {sorted(keys)} match none of the {len(SCHEDULER_CLASSES)} torch "
                    "schedulers (a custom LRScheduler subclass?)")


def _match(state: Any) -> str | None:
    """The first class whose layout the state's keys fit (LambdaLR for the Lambda pair)."""
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        return None
    keys = set(state)
    return next((cls for cls, layout in _LAYOUTS.items() if layout.matches(keys)), None)


def identify_scheduler(state: Any, groups: list[Mapping] | None = None) -> SchedulerInfo:
    """Which torch scheduler saved ``state``, and the constructor arguments that rebuild it.

    The class comes from the exact key set (reference 2.2; version-dependent base keys such as
    ``verbose`` are tolerated), never from values; an unmatched layout is "unknown".

    Args:
        state: a scheduler ``state_dict()``, live or read by ckpttool.serialization.
        groups: the paired optimizer's ``param_groups`` (list of dicts), or None. Needed for
            OneCycleLR, whose max_lr / div factors / momenta live only there.

    Example:
        >>> info = identify_scheduler({"milestones": {"30": 1, "10": 1}, "gamma": 0.5,
        ...                            "base_lrs": [0.1], "last_epoch": 0})
        >>> info.cls, info.args
        ('MultiStepLR', {'milestones': [10, 30], 'gamma': 0.5})
    """
    return _identify(state, list(groups) if groups is not None else None, frozenset())


def _identify(state: Any, groups: list | None, overwritten: frozenset[str]) -> SchedulerInfo:
    if not isinstance(state, Mapping):
        return _unknown(f"the state is {_describe(state)}, not a dict")
    if not all(isinstance(k, str) for k in state):
        return _unknown("the state has non-string keys, which no torch scheduler saves")
    cls = _match(state)
    if cls is None:
        return _unknown_layout(set(state))
    r = _Recovery(cls, state, groups, overwritten)
    _RECOVER[cls](r)
    return r.info()


def replay_steps(state: Mapping, info: SchedulerInfo) -> int:
    """How many ``step()`` calls after construction (``last_epoch=-1``) rebuild ``state``.

    Rule: construction leaves every class at ``last_epoch`` 0 (its initial step; SequentialLR
    sets it to 0 itself; ReduceLROnPlateau starts at 0) and each ``step()`` adds one, so the
    answer is ``last_epoch``. ChainedScheduler has no counter of its own: one chained step steps
    every child once, so it is its first child's answer (recursively); a child that disagrees
    shows up as a verify difference. ``_step_count`` is never used (CosineAnnealingWarmRestarts
    keeps it at 0).

    Raises:
        StateError: the counter is missing, negative or not an int.

    Example:
        >>> replay_steps({"gamma": 0.9, "base_lrs": [0.1], "last_epoch": 12},
        ...              SchedulerInfo("ExponentialLR", {"gamma": 0.9}))
        12
    """
    if info.cls == "ChainedScheduler":
        subs = state.get("_schedulers") if isinstance(state, Mapping) else None
        if not subs or not info.children:
            raise StateError("ChainedScheduler state has no sub-schedulers to count steps from")
        return replay_steps(subs[0], info.children[0])
    epoch = state.get("last_epoch") if isinstance(state, Mapping) else None
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise StateError(f"{info.cls} state has last_epoch={value_repr(epoch)}; a replay needs the "
                         "non-negative int that stepping leaves there")
    return epoch


# --- the constructor line ---------------------------------------------------------------------


def _text(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "float('nan')"
        if math.isinf(value):
            return "float('inf')" if value > 0 else "float('-inf')"
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    return value_repr(value)


def format_call(info: SchedulerInfo, *, defaults: bool = False) -> str:
    """The constructor call that rebuilds the scheduler, as the ``--scheduler SPEC`` syntax.

    Python call syntax with keyword literals; floats by repr (round-trip exact; infinities as
    ``float('inf')``); sub-schedulers as nested calls; arguments that cannot be recovered as
    ``name=<not stored>``. Arguments equal to torch's default are left out unless ``defaults``.

    Example:
        >>> format_call(SchedulerInfo("SequentialLR", {"milestones": [5]}, children=(
        ...     SchedulerInfo("LinearLR", {"start_factor": 0.1, "end_factor": 1.0,
        ...                                "total_iters": 5}),
        ...     SchedulerInfo("CosineAnnealingLR", {"T_max": 35, "eta_min": 0.0}))))[13:]
        'schedulers=[LinearLR(start_factor=0.1), CosineAnnealingLR(T_max=35)], milestones=[5])'
    """
    if info.cls not in SIGNATURES:
        return "<unknown scheduler>"
    parts = []
    for name, default in SIGNATURES[info.cls]:
        if name == "schedulers":
            inner = ", ".join(format_call(c, defaults=defaults) for c in info.children)
            parts.append(f"schedulers=[{inner}]")
        elif name in info.missing:
            parts.append(f"{name}=<not stored>")
        elif name in info.args:
            value = info.args[name]
            if defaults or default is REQUIRED or not same(value, default):
                parts.append(f"{name}={_text(value)}")
    return f"{info.cls}({', '.join(parts)})"
