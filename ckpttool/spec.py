"""The ``reschedule`` options ``--scheduler SPEC``, ``--set NAME=VALUE`` and ``--lr``, parsed
without running anything.

A SPEC (:func:`parse_spec`) is one of:

* A call over ``torch.optim.lr_scheduler`` classes with literal arguments, the syntax
  :func:`ckpttool.schedulers.format_call` writes (so a constructor line printed by ``show`` is a
  SPEC): ``CosineAnnealingLR(T_max=2000, eta_min=1e-6)``, ``SequentialLR(schedulers=[LinearLR(
  start_factor=0.1, total_iters=100), CosineAnnealingLR(T_max=1900)], milestones=[100])``. The
  class may be spelled ``lr_scheduler.X`` or ``torch.optim.lr_scheduler.X``. Arguments are
  keywords, or positional in torch's order without the optimizer. Values are literals: numbers
  (with a unary minus), strings, True/False/None, lists or tuples of them, ``inf``, ``nan`` and
  ``float('inf')`` (``float`` of a string or number). Scheduler calls may appear only inside
  ``schedulers=[...]`` of SequentialLR / ChainedScheduler. The text goes through
  ``ast.parse`` and this module walks the tree itself; it is never evaluated, and anything else
  (names, attribute access, lambdas, operators, comprehensions, other calls) is refused with
  what and where. ``optimizer`` and ``last_epoch`` are refused too: the recompute sets them.
  LambdaLR / MultiplicativeLR take a function, which a SPEC cannot hold: they need a factory.
* ``hf:NAME(key=value, ...)``: a HuggingFace named schedule, parsed into :class:`HFSpec` with the
  same literal rules (keyword arguments only).
* ``FILE.py:FUNC`` or ``package.module:FUNC``: a :class:`Factory`, a function
  ``FUNC(optimizer) -> scheduler`` in the user's own code, the way to give lambdas and custom
  ``LRScheduler`` subclasses. Unlike a checkpoint, this is code the user chose to run:
  :meth:`Factory.load` imports it.

``--set NAME=VALUE`` (:func:`apply_sets`) changes one argument of the stored schedule. VALUE is a
literal as in a SPEC; for an argument whose default is a string, a bare word is that string
(``--set anneal_strategy=linear``). NAME addresses the argument:

* a plain name (``T_max``) is the top-level scheduler's argument when its class has one by that
  name, otherwise the argument of the one sub-scheduler, at any depth, whose class has it; when
  several do (two children with ``total_iters``), the error lists their full addresses;
* a full address (``schedulers[1].T_max``, nesting as ``schedulers[0].schedulers[1].gamma``)
  names the sub-scheduler by its index in ``schedulers=[...]``, as ``format_call`` writes it.

Setting an argument ``show`` reported as ``<not stored>`` supplies it; once none is left, the
schedule can be replayed.

Example:
    >>> from ckpttool.schedulers import format_call
    >>> parse_spec("SequentialLR(schedulers=[LinearLR(start_factor=0.1, total_iters=5), "
    ...            "CosineAnnealingLR(T_max=20)], milestones=[5])").children[1].args
    {'T_max': 20, 'eta_min': 0.0}
    >>> format_call(apply_sets(parse_spec("StepLR(step_size=10)"), ["gamma=0.5"]))
    'StepLR(step_size=10, gamma=0.5)'
"""

from __future__ import annotations

import ast
import builtins
import difflib
import importlib
import importlib.util
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

from ckpttool.errors import SpecError
from ckpttool.schedulers import (
    REQUIRED,
    SCHEDULER_CLASSES,
    SIGNATURES,
    SchedulerInfo,
)

__all__ = ["Factory", "HFSpec", "apply_sets", "parse_lr_options", "parse_spec"]

# Module paths a SPEC may spell a class with, as a training script imports it.
_CLASS_PREFIXES = frozenset({"", "lr_scheduler", "optim.lr_scheduler",
                             "torch.optim.lr_scheduler"})

# Classes whose only argument is a function.
_LAMBDA_CLASSES = frozenset({"LambdaLR", "MultiplicativeLR"})

# Arguments that take a function; None (scale_fn's default) is the only literal that fits.
_FUNCTION_ARGS = frozenset({"lr_lambda", "scale_fn"})

# Names read as float literals: format_call writes float('inf'), people also write inf.
_FLOAT_NAMES = {"inf": math.inf, "nan": math.nan}

# Names a user may pass the optimizer as; refused with the reason rather than as "a name".
_OPTIMIZER_NAMES = frozenset({"optimizer", "opt", "optim"})

_FACTORY_HINT = ("--scheduler my_sched.py:make (a function that takes the optimizer and returns "
                 "the scheduler)")
_LITERAL_HINT = ("arguments are literals: numbers, strings, True/False/None, lists of them, "
                 "float('inf')")
_FORMS_HINT = ("a SPEC is a call such as CosineAnnealingLR(T_max=1000), FILE.py:FUNC, "
               "module:FUNC or hf:NAME(...)")

# Arguments the recompute sets itself, and why a SPEC or --set cannot.
_SET_BY_RECOMPUTE = {
    "optimizer": "optimizer is not an argument to give: ckpttool builds the scheduler on the "
                 "checkpoint's optimizer",
    "last_epoch": "last_epoch is not an argument to give: the recompute builds the scheduler with "
                  "last_epoch=-1 and steps it to the resume position (choose it with --step N)",
}

_IDENT = r"[A-Za-z_]\w*"
_ADDRESS_STEP = re.compile(r"schedulers\[(\d+)\]")

# What a refused node is, in words.
_NODE_WORDS: dict[type, str] = {
    ast.Attribute: "attribute access", ast.Lambda: "a lambda", ast.Dict: "a dict",
    ast.Set: "a set", ast.Subscript: "subscripting", ast.JoinedStr: "an f-string",
    ast.Starred: "* unpacking", ast.NamedExpr: "an assignment expression",
    ast.ListComp: "a comprehension", ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension", ast.GeneratorExp: "a generator expression",
    ast.BinOp: "an operator", ast.BoolOp: "an operator", ast.Compare: "a comparison",
    ast.UnaryOp: "an operator", ast.IfExp: "a conditional expression",
    ast.Await: "await", ast.Yield: "yield", ast.YieldFrom: "yield", ast.Slice: "a slice",
}


# --- results ----------------------------------------------------------------------------------


# transformers.get_scheduler's own parameters; every other hf: argument is one of the named
# schedule's (scheduler_specific_kwargs: num_cycles, power, lr_end, min_lr, ...).
HF_MAIN_ARGS = ("num_warmup_steps", "num_training_steps")


@dataclass(frozen=True)
class HFSpec:
    """A HuggingFace named schedule, ``hf:NAME(...)``: the name and its literal keyword args.

    It is built by transformers' own ``get_scheduler`` (the ``[hf]`` extra), never by a formula
    of ckpttool's.
    """

    name: str
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The SPEC: ``hf:linear(num_warmup_steps=5, num_training_steps=40)``."""
        return f"hf:{self.name}({', '.join(f'{k}={v!r}' for k, v in self.args.items())})"

    @property
    def extra(self) -> dict[str, Any]:
        """The named schedule's own arguments (get_scheduler's scheduler_specific_kwargs; the
        Trainer's lr_scheduler_kwargs)."""
        return {k: v for k, v in self.args.items() if k not in HF_MAIN_ARGS}

    @property
    def python(self) -> str:
        """The call a training script makes to build it."""
        main = [f"{k}={self.args[k]!r}" for k in HF_MAIN_ARGS if k in self.args]
        if self.extra:
            main.append(f"scheduler_specific_kwargs={self.extra!r}")
        return f"transformers.get_scheduler({self.name!r}, optimizer, {', '.join(main)})"

    def with_sets(self, assignments: list[str]) -> HFSpec:
        """This schedule with ``--set NAME=VALUE`` applied (``--set num_training_steps=80``).

        Raises:
            SpecError: a malformed assignment or a value that is not a literal.
        """
        args = dict(self.args)
        for assignment in assignments:
            name, sep, raw = (part.strip() for part in assignment.partition("="))
            if not sep or not re.fullmatch(_IDENT, name) or not raw:
                raise SpecError(f"--set {assignment!r}: expected NAME=VALUE, e.g. --set "
                                "num_training_steps=4000")
            args[name] = _parse_hf(f"hf:x({name}={raw})").args[name]
        return HFSpec(self.name, args)

    def build(self, optimizer: Any) -> Any:
        """The scheduler transformers builds for this schedule on ``optimizer``.

        Raises:
            SpecError: transformers is not installed, or refuses the name or the arguments.
        """
        try:
            import transformers
        except ImportError:
            raise SpecError(f"{self.text} needs transformers: pip install 'ckpttool[hf]'") \
                from None
        try:
            return transformers.get_scheduler(
                self.name, optimizer, num_warmup_steps=self.args.get("num_warmup_steps"),
                num_training_steps=self.args.get("num_training_steps"),
                scheduler_specific_kwargs=self.extra or None)
        except (ValueError, TypeError, KeyError) as e:
            text = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            valid = hf_arguments(self.name)
            unknown = [k for k in self.args if valid is not None and k not in valid]
            if unknown:
                close = difflib.get_close_matches(unknown[0], valid, n=1)
                text = (f"hf:{self.name} has no argument {unknown[0]!r}"
                        + (f"; did you mean {close[0]}?" if close else "")
                        + f"; valid: {', '.join(valid)}")
            raise SpecError(f"transformers refused {self.text}: {text}") from None


def hf_arguments(name: str) -> list[str] | None:
    """The arguments of transformers' named schedule ``name`` (``num_warmup_steps``,
    ``num_training_steps`` and its own), from the function ``get_scheduler`` calls; None when
    transformers or the name is not known."""
    try:
        import inspect

        from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
        from transformers.trainer_utils import SchedulerType

        function = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
        names = list(inspect.signature(function).parameters)
    except Exception:  # an older or newer transformers laid out otherwise: no list
        return None
    return [n for n in names if n not in ("optimizer", "last_epoch")]


@dataclass(frozen=True)
class Factory:
    """A scheduler factory in the user's own code: ``FUNC(optimizer) -> scheduler``.

    Attributes:
        kind: "file" (``target`` is a path to a .py file) or "module" (an importable name).
        target: the path or the dotted module name, as written.
        func: the name of the function in it.
    """

    kind: Literal["file", "module"]
    target: str
    func: str

    @property
    def text(self) -> str:
        """The SPEC as written: ``target:func``."""
        return f"{self.target}:{self.func}"

    def load(self) -> Callable[..., Any]:
        """Import the user's code and return FUNC.

        A file runs as a module named ``_ckpttool_factory_<stem>`` with its own folder first on
        ``sys.path`` while it runs (as ``python FILE.py`` would, so it can import its
        neighbours); a module is imported with the current directory on ``sys.path``.

        Raises:
            SpecError: the file or module is missing, running it raised, FUNC is not defined
                there or is not callable.

        Example:
            >>> Factory("module", "math", "floor").load()(2.5)
            2
        """
        module = self._import_file() if self.kind == "file" else self._import_module()
        where = self.target if self.kind == "file" else f"module {self.target}"
        if not hasattr(module, self.func):
            defined = sorted(name for name, value in vars(module).items()
                             if callable(value) and not name.startswith("_")
                             and getattr(value, "__module__", None) == module.__name__)
            listed = f"; it defines {', '.join(defined)}" if defined else ""
            raise SpecError(f"factory {self.text}: {where} has no {self.func!r}{listed}")
        fn = getattr(module, self.func)
        if not callable(fn):
            raise SpecError(f"factory {self.text}: {self.func} is {_a(type(fn).__name__)}, not a "
                            "function taking the optimizer")
        return fn

    def build(self, optimizer: Any) -> Any:
        """``FUNC(optimizer)``, checked to be a torch scheduler driving that optimizer.

        Raises:
            SpecError: as :meth:`load`; FUNC raised, returned something else than a
                ``torch.optim.lr_scheduler`` scheduler, or built it on another optimizer.
        """
        from torch.optim import lr_scheduler  # the caller is replaying, so torch is needed anyway

        fn = self.load()
        try:
            scheduler = fn(optimizer)
        except Exception as e:  # the user's code: any failure is theirs to see, in one line
            raise SpecError(f"factory {self.text}(optimizer) raised {type(e).__name__}: {e}") \
                from e
        if not isinstance(scheduler, (lr_scheduler.LRScheduler, lr_scheduler.ReduceLROnPlateau)):
            raise SpecError(f"factory {self.text} returned {_a(type(scheduler).__name__)}, not a "
                            "torch.optim.lr_scheduler scheduler (did it forget to return it?)")
        if getattr(scheduler, "optimizer", optimizer) is not optimizer:
            raise SpecError(f"factory {self.text} built its scheduler on another optimizer; it "
                            "must use the optimizer it is given")
        return scheduler

    def _import_file(self) -> Any:
        path = Path(self.target).expanduser()
        if not path.is_file():
            what = "is a folder, not a .py file" if path.is_dir() else "does not exist"
            if not path.is_absolute():
                what += f" (relative to {os.getcwd()})"
            raise SpecError(f"factory {self.text}: {self.target} {what}")
        name = "_ckpttool_factory_" + re.sub(r"\W", "_", path.stem)
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise SpecError(f"factory {self.text}: Python cannot load {self.target} as a module")
        module = importlib.util.module_from_spec(spec)
        # Registered first, as importlib's recipe does: dataclasses and pickling in the user's
        # code look their module up in sys.modules.
        sys.modules[name] = module
        folder = str(path.resolve().parent)
        sys.path.insert(0, folder)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise SpecError(f"factory {self.text}: running {self.target} raised "
                            f"{type(e).__name__}: {e}") from e
        finally:
            sys.path.remove(folder)
        return module

    def _import_module(self) -> Any:
        # The console script's sys.path lacks the current directory, where a project's own
        # package usually is (uvicorn's module:app does the same).
        cwd = os.getcwd()
        added = "" not in sys.path and cwd not in sys.path
        if added:
            sys.path.insert(0, cwd)
        try:
            return importlib.import_module(self.target)
        except ModuleNotFoundError as e:
            if e.name and (self.target == e.name or self.target.startswith(e.name + ".")):
                raise SpecError(f"factory {self.text}: no module named {e.name!r} (looked in "
                                f"{cwd} and the installed packages)") from e
            raise SpecError(f"factory {self.text}: importing {self.target} raised "
                            f"ModuleNotFoundError: {e}") from e
        except Exception as e:
            raise SpecError(f"factory {self.text}: importing {self.target} raised "
                            f"{type(e).__name__}: {e}") from e
        finally:
            if added:
                sys.path.remove(cwd)


# --- the safe walk ----------------------------------------------------------------------------


def _a(word: str) -> str:
    """``word`` with its indefinite article."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def _suggest(name: str, valid: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean X?)`` for the closest valid name, compared case-blind."""
    by_lower = {v.lower(): v for v in valid}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[close[0]]}?)" if close else ""


def _arg_names(cls: str) -> list[str]:
    """The constructor arguments a SPEC or --set may give for ``cls`` (not ``schedulers``)."""
    return [name for name, _ in SIGNATURES.get(cls, ()) if name != "schedulers"]


def _unknown_argument(cls: str, name: str) -> str:
    valid = [name for name, _ in SIGNATURES[cls]]
    return f"{cls} has no argument {name!r}{_suggest(name, valid)}; valid: {', '.join(valid)}"


def _function_argument(cls: str, name: str) -> str:
    return (f"{cls}'s {name} is a function, which a SPEC or --set cannot hold: pass it through "
            f"a factory: {_FACTORY_HINT}")


def _address(at: str, part: str) -> str:
    return f"{at}.{part}" if at else part


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a chain of attribute accesses on a name, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _check_args(cls: str, args: dict[str, Any], n_children: int) -> str | None:
    """What torch would refuse in this combination of arguments, said ahead of time."""
    if cls == "SequentialLR" and "milestones" in args:
        milestones = args["milestones"]
        if not isinstance(milestones, list):
            return f"SequentialLR's milestones is a list of step numbers, not {milestones!r}"
        if len(milestones) != n_children - 1:
            return (f"SequentialLR has {n_children} schedulers, so it needs {n_children - 1} "
                    f"milestone{'s' if n_children != 2 else ''} (one per switch); got "
                    f"{len(milestones)}")
    if cls == "OneCycleLR" and "total_steps" in args and args["total_steps"] is None and (
            args.get("epochs") is None or args.get("steps_per_epoch") is None):
        return "OneCycleLR needs total_steps (or epochs and steps_per_epoch)"
    return None


def _complete(cls: str, given: dict[str, Any]) -> dict[str, Any]:
    """``given`` in signature order with torch's defaults filled in, as identify_scheduler
    reports arguments: those torch ignores given the others are left out unless given."""
    ignored = {"epochs", "steps_per_epoch"} if cls == "OneCycleLR" else set()
    if cls in ("CyclicLR", "OneCycleLR") and given.get("cycle_momentum", True) is False:
        ignored |= {"base_momentum", "max_momentum"}
    return {name: given.get(name, default) for name, default in SIGNATURES[cls]
            if name in given or (name != "schedulers" and name not in ignored
                                 and default is not REQUIRED)}


class _Walker:
    """Reads one parsed text into values; every refusal says what and where."""

    def __init__(self, text: str, label: str, offset: int = 0):
        self.text = text
        self.label = label  # "SPEC", "--set T_max", ...
        self.offset = offset  # columns of the original text before `text`

    def error(self, message: str, at: str = "") -> SpecError:
        return SpecError(f"{self.label}{' ' + at if at else ''}: {message}")

    def refuse(self, node: ast.AST, what: str | None = None, hint: str | None = None,
               at: str = "") -> SpecError:
        if what is None:
            what = _NODE_WORDS.get(type(node), f"a {type(node).__name__} expression")
            if isinstance(node, ast.Name):
                what = f"the name {node.id!r}"
            elif isinstance(node, ast.Call):
                what = "a call to " + self.snippet(node.func)
            elif isinstance(node, ast.Constant):
                what = _a(f"{type(node.value).__name__} literal")
        if hint is None:
            hint = _LITERAL_HINT
            if isinstance(node, ast.Lambda):
                hint = f"pass lambdas through a factory: {_FACTORY_HINT}"
            elif isinstance(node, ast.Name) and node.id in _OPTIMIZER_NAMES:
                hint = _SET_BY_RECOMPUTE["optimizer"]
            elif isinstance(node, ast.Call) and (_dotted(node.func) or "").rpartition(".")[
                    2] in SCHEDULER_CLASSES:
                hint = "scheduler calls go only in schedulers=[...] of SequentialLR or "\
                       "ChainedScheduler"
        line, col = getattr(node, "lineno", 1), getattr(node, "col_offset", 0) + 1
        where = f"column {col + self.offset}" if line == 1 else f"line {line}, column {col}"
        return self.error(f"refused {what} at {where} ({self.snippet(node)}); {hint}", at)

    def snippet(self, node: ast.AST) -> str:
        text = " ".join((ast.get_source_segment(self.text, node) or "").split())
        return text if len(text) <= 40 else text[:37] + "..."

    def value(self, node: ast.expr) -> Any:
        """The literal ``node`` spells, or SpecError."""
        if isinstance(node, ast.Constant) and (
                node.value is None or isinstance(node.value, (bool, int, float, str))):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            return [self.value(e) for e in node.elts]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            operand = self.value(node.operand)
            if isinstance(operand, (int, float)) and not isinstance(operand, bool):
                return -operand
        elif isinstance(node, ast.Name) and node.id in _FLOAT_NAMES:
            return _FLOAT_NAMES[node.id]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "float" and len(node.args) == 1 and not node.keywords):
            arg = self.value(node.args[0])
            if isinstance(arg, (str, int, float)) and not isinstance(arg, bool):
                try:
                    return float(arg)
                except ValueError:
                    raise self.refuse(node, f"float({arg!r})", "it is not a number") from None
        raise self.refuse(node)

    def scheduler(self, node: ast.expr, at: str = "") -> SchedulerInfo:
        """One scheduler call (``at``: its address, for messages), nested ones included."""
        if not isinstance(node, ast.Call):
            hint = _FORMS_HINT if not at else "schedulers=[...] holds scheduler calls"
            if isinstance(node, ast.Name) and node.id in SCHEDULER_CLASSES:
                hint = f"call it with its arguments: {node.id}(...)"
            raise self.refuse(node, hint=hint, at=at)
        cls = self.class_name(node, at)
        nodes = self.arguments(cls, node, at)
        missing = [name for name, default in SIGNATURES[cls]
                   if default is REQUIRED and name not in nodes]
        if missing:
            raise self.error(f"{cls} needs {' and '.join(missing)}", at)
        children: tuple[SchedulerInfo, ...] = ()
        given = {}
        for name, value in nodes.items():
            if name == "schedulers":
                children = self.children(cls, value, at)
            else:
                given[name] = self.value(value)
                if name in _FUNCTION_ARGS and given[name] is not None:
                    raise self.error(_function_argument(cls, name), at)
        args = _complete(cls, given)
        args.pop("schedulers", None)
        problem = _check_args(cls, args, len(children))
        if problem:
            raise self.error(problem, at)
        return SchedulerInfo(cls, args, children)

    def class_name(self, call: ast.Call, at: str) -> str:
        dotted = _dotted(call.func)
        prefix, _, name = (dotted or "").rpartition(".")
        if dotted is None or prefix not in _CLASS_PREFIXES or (
                not prefix and name not in SCHEDULER_CLASSES and hasattr(builtins, name)):
            raise self.refuse(call, hint="only torch.optim.lr_scheduler classes can be called",
                              at=at)
        if name in _LAMBDA_CLASSES:
            raise self.error(f"{name} takes a function (lr_lambda), which a SPEC cannot hold: "
                             f"pass lambdas through a factory: {_FACTORY_HINT}", at)
        if name not in SCHEDULER_CLASSES:
            raise self.error(
                f"unknown scheduler class {name!r}{_suggest(name, SCHEDULER_CLASSES)}; valid: "
                f"{', '.join(sorted(SCHEDULER_CLASSES))}; a custom LRScheduler subclass goes "
                f"through a factory: {_FACTORY_HINT}", at)
        return name

    def arguments(self, cls: str, call: ast.Call, at: str) -> dict[str, ast.expr]:
        """Argument name -> value node, positional ones named by torch's order."""
        names = [name for name, _ in SIGNATURES[cls]]
        # The constructor line ckpttool prints passes the optimizer (first, or as
        # optimizer=optimizer for ChainedScheduler); pasted back, it is simply left out.
        args = list(call.args)
        if args and isinstance(args[0], ast.Name) and args[0].id in _OPTIMIZER_NAMES:
            args = args[1:]
        keywords = [k for k in call.keywords if not (
            k.arg == "optimizer" and isinstance(k.value, ast.Name)
            and k.value.id in _OPTIMIZER_NAMES)]
        if len(args) > len(names):
            raise self.error(f"{cls} takes at most {len(names)} positional argument"
                             f"{'s' if len(names) > 1 else ''} besides the optimizer "
                             f"({', '.join(names)}); got {len(args)}", at)
        nodes: dict[str, ast.expr] = {}
        for name, node in zip(names, args):
            if isinstance(node, ast.Starred):
                raise self.refuse(node, at=at)
            nodes[name] = node
        for keyword in keywords:
            if keyword.arg is None:
                raise self.refuse(keyword, "** unpacking", at=at)
            if keyword.arg in _SET_BY_RECOMPUTE:
                raise self.error(_SET_BY_RECOMPUTE[keyword.arg], at)
            if keyword.arg not in names:
                raise self.error(_unknown_argument(cls, keyword.arg), at)
            if keyword.arg in nodes:
                raise self.error(f"{cls} got {keyword.arg} twice", at)
            nodes[keyword.arg] = keyword.value
        return nodes

    def children(self, cls: str, node: ast.expr, at: str) -> tuple[SchedulerInfo, ...]:
        if not isinstance(node, (ast.List, ast.Tuple)):
            raise self.refuse(node, hint=f"{cls} takes schedulers=[LinearLR(...), ...], a list "
                                         "of scheduler calls", at=at)
        if not node.elts:
            raise self.error(f"{cls} needs at least one scheduler in schedulers=[...]", at)
        return tuple(self.scheduler(sub, _address(at, f"schedulers[{i}]"))
                     for i, sub in enumerate(node.elts))


def _expression(text: str, label: str) -> ast.expr:
    """``text`` parsed as one Python expression (parsing runs nothing)."""
    try:
        return ast.parse(text, mode="eval").body
    except SyntaxError as e:
        where = f" at column {e.offset}" if e.offset else ""
        raise SpecError(f"{label}: not valid syntax{where} ({e.msg}): {text!r}") from None
    except (ValueError, RecursionError, MemoryError) as e:  # null bytes, absurd nesting
        raise SpecError(f"{label}: cannot be parsed ({type(e).__name__}: {e})") from None


# --- public API -------------------------------------------------------------------------------


def parse_spec(text: str) -> SchedulerInfo | Factory | HFSpec:
    """A ``--scheduler SPEC`` as a SchedulerInfo, an HFSpec or a Factory; nothing is evaluated.

    A scheduler call becomes the SchedulerInfo :func:`~ckpttool.schedulers.identify_scheduler`
    would report for the same schedule: arguments in signature order with torch's defaults
    filled in, sub-schedulers as ``children``; ``ckpttool.schedule.build_scheduler`` builds it.
    The module docstring gives the grammar.

    Raises:
        SpecError: a refused construct (what and where), an unknown class or argument (listing
            the valid ones), a missing required argument, ``optimizer`` / ``last_epoch``, or
            LambdaLR / MultiplicativeLR (which need a factory).

    Example:
        >>> parse_spec("CosineAnnealingLR(T_max=2000, eta_min=1e-6)")
        SchedulerInfo(cls='CosineAnnealingLR', args={'T_max': 2000, 'eta_min': 1e-06}, \
children=(), unrecoverable=(), candidates=(), missing=(), notes=())
        >>> parse_spec("my_sched.py:make")
        Factory(kind='file', target='my_sched.py', func='make')
        >>> parse_spec("hf:linear(num_warmup_steps=100, num_training_steps=2000)")
        HFSpec(name='linear', args={'num_warmup_steps': 100, 'num_training_steps': 2000})
    """
    spec = re.sub(r"^\s*[A-Za-z_]\w*\s*=(?!=)\s*", "", text).strip()  # "scheduler = X(...)" pasted
    if not spec:
        raise SpecError(f"SPEC is empty; {_FORMS_HINT}")
    if spec.startswith("hf:"):
        return _parse_hf(spec)
    if "(" not in spec and ":" in spec:
        factory = _parse_factory(spec)
        if factory is not None:
            return factory
    not_stored = re.findall(rf"({_IDENT})\s*=\s*<not stored>", spec)
    if not_stored:
        raise SpecError(f"SPEC: {', '.join(not_stored)}=<not stored> is what show writes where "
                        "the checkpoint lacks an argument; write its value (a function goes "
                        f"through a factory: {_FACTORY_HINT})")
    return _Walker(spec, "SPEC").scheduler(_expression(spec, "SPEC"))


def _parse_hf(spec: str) -> HFSpec:
    body = spec[3:].strip()
    if re.fullmatch(_IDENT, body):
        return HFSpec(body, {})
    example = "e.g. hf:linear(num_warmup_steps=100, num_training_steps=2000)"
    node = _expression(body, "SPEC")
    walker = _Walker(body, "SPEC", offset=spec.index(body))
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise SpecError(f"SPEC {spec!r}: an HF schedule is hf:NAME(key=value, ...), {example}")
    if node.args:
        raise SpecError(f"SPEC {spec!r}: an HF schedule takes keyword arguments only, {example}")
    args: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise walker.refuse(keyword, "** unpacking")
        if keyword.arg in _SET_BY_RECOMPUTE:
            raise SpecError(f"SPEC: {_SET_BY_RECOMPUTE[keyword.arg]}")
        if keyword.arg in args:
            raise SpecError(f"SPEC: hf:{node.func.id} got {keyword.arg} twice")
        args[keyword.arg] = walker.value(keyword.value)
    return HFSpec(node.func.id, args)


def _parse_factory(spec: str) -> Factory | None:
    """FILE.py:FUNC or module:FUNC; None when the text before the colon is neither."""
    target, _, func = (part.strip() for part in spec.rpartition(":"))
    if target.endswith(".py") or "/" in target or os.sep in target:
        kind: Literal["file", "module"] = "file"
    elif re.fullmatch(rf"{_IDENT}(\.{_IDENT})*", target):
        kind = "module"
    else:
        return None  # e.g. a lambda: the walker says what it is
    if not re.fullmatch(_IDENT, func):
        raise SpecError(f"SPEC {spec!r}: {func!r} is not a function name; a factory is "
                        "FILE.py:FUNC or module:FUNC, FUNC(optimizer) returning the scheduler")
    return Factory(kind, target, func)


def _nodes(info: SchedulerInfo, path: tuple[int, ...] = ()) -> Iterator[
        tuple[tuple[int, ...], SchedulerInfo]]:
    """(path, scheduler) for ``info`` and every sub-scheduler, depth first."""
    yield path, info
    for i, child in enumerate(info.children):
        yield from _nodes(child, (*path, i))


def _path_text(path: tuple[int, ...]) -> str:
    return ".".join(f"schedulers[{i}]" for i in path)


def _replace_at(info: SchedulerInfo, path: tuple[int, ...],
                change: Callable[[SchedulerInfo], SchedulerInfo]) -> SchedulerInfo:
    if not path:
        return change(info)
    children = list(info.children)
    children[path[0]] = _replace_at(children[path[0]], path[1:], change)
    return replace(info, children=tuple(children))


def _resolve(info: SchedulerInfo, name: str, label: str) -> tuple[tuple[int, ...], str]:
    """The path of the scheduler an address means, and the argument name."""
    *steps, arg = name.split(".")
    path = []
    for step in steps:
        match = _ADDRESS_STEP.fullmatch(step)
        if match is None:
            break
        path.append(int(match[1]))
    if len(path) != len(steps) or not re.fullmatch(_IDENT, arg):
        raise SpecError(f"{label}: {name!r} is not NAME or schedulers[I].NAME "
                        "(e.g. --set T_max=2000, --set schedulers[1].T_max=2000)")
    node = info
    for depth, i in enumerate(path):
        here = _path_text(tuple(path[:depth + 1]))
        if not node.children:
            raise SpecError(f"{label}: {here}: {node.cls} has no sub-schedulers")
        if i >= len(node.children):
            last = len(node.children) - 1
            raise SpecError(f"{label}: {here}: {node.cls} has {last + 1} sub-schedulers, "
                            f"schedulers[0] to schedulers[{last}]")
        node = node.children[i]
    if steps or arg in _arg_names(info.cls) or arg in _SET_BY_RECOMPUTE or arg == "schedulers":
        return tuple(path), arg
    holders = [p for p, n in _nodes(info) if p and arg in _arg_names(n.cls)]
    if len(holders) == 1:
        return holders[0], arg
    if holders:
        listed = ", ".join(f"{_path_text(p)}.{arg}" for p in holders)
        raise SpecError(f"{label}: several sub-schedulers have {arg}; address one: {listed}")
    if not info.children:
        return (), arg  # the class lacks it: _set_argument says which ones it has
    valid = [_address(_path_text(p), a) for p, n in _nodes(info) for a in _arg_names(n.cls)]
    plain = sorted({a for _, n in _nodes(info) for a in _arg_names(n.cls)})
    raise SpecError(f"{label}: no scheduler in {info.cls} has an argument {arg!r}"
                    f"{_suggest(arg, plain)}; valid: {', '.join(valid)}")


def _set_argument(node: SchedulerInfo, arg: str, raw: str, label: str) -> SchedulerInfo:
    if node.cls not in SIGNATURES:
        raise SpecError(f"{label}: the stored scheduler's class is not recognised, so it has no "
                        "arguments to change; give the whole schedule with --scheduler SPEC")
    if arg in _SET_BY_RECOMPUTE:
        raise SpecError(f"{label}: {_SET_BY_RECOMPUTE[arg]}")
    if arg == "schedulers":
        raise SpecError(f"{label}: sub-schedulers are changed one argument at a time "
                        "(schedulers[I].NAME=VALUE) or all together with --scheduler SPEC")
    if arg not in _arg_names(node.cls):
        raise SpecError(f"{label}: {_unknown_argument(node.cls, arg)}")
    if arg == "lr_lambda":
        raise SpecError(f"{label}: {_function_argument(node.cls, arg)}")
    tree = _expression(raw, label)
    default = dict(SIGNATURES[node.cls])[arg]
    if isinstance(tree, ast.Name) and tree.id not in _FLOAT_NAMES and isinstance(default, str):
        value: Any = tree.id  # --set mode=triangular2: a bare word is the string
    else:
        value = _Walker(raw, label).value(tree)
    if arg in _FUNCTION_ARGS and value is not None:
        raise SpecError(f"{label}: {_function_argument(node.cls, arg)}")
    merged = {**node.args, arg: value}
    args = {name: merged[name] for name in _arg_names(node.cls) if name in merged}
    problem = _check_args(node.cls, args, len(node.children))
    if problem:
        raise SpecError(f"{label}: {problem}")
    missing = tuple(m for m in node.missing if m != arg)
    # The unrecoverable sentences explain the missing arguments; once all are given, none holds.
    return replace(node, args=args, missing=missing,
                   unrecoverable=node.unrecoverable if missing else ())


def apply_sets(info: SchedulerInfo, assignments: list[str]) -> SchedulerInfo:
    """The stored schedule with ``--set NAME=VALUE`` assignments applied, in order.

    NAME is a plain argument name or a full address (``schedulers[1].T_max``); the module
    docstring gives the rules. Giving an argument the checkpoint could not recover removes it
    from ``missing`` (and, once none is missing, clears ``unrecoverable``).

    Raises:
        SpecError: a malformed assignment, an address that names no scheduler, an argument the
            class does not have (listing the valid ones), a plain name several sub-schedulers
            share (listing their addresses), a value that is not a literal, or arguments torch
            would refuse together.

    Example:
        >>> from ckpttool.schedulers import format_call
        >>> seq = parse_spec("SequentialLR(schedulers=[LinearLR(total_iters=5), "
        ...                  "ConstantLR(total_iters=5), CosineAnnealingLR(T_max=20)], "
        ...                  "milestones=[5, 10])")
        >>> format_call(apply_sets(seq, ["T_max=40", "schedulers[1].total_iters=3"]))[13:]
        'schedulers=[LinearLR(), ConstantLR(total_iters=3), CosineAnnealingLR(T_max=40)], \
milestones=[5, 10])'
    """
    for assignment in assignments:
        name, sep, raw = (part.strip() for part in assignment.partition("="))
        if not sep or not name or not raw:
            raise SpecError(f"--set {assignment!r}: expected NAME=VALUE, e.g. --set T_max=2000")
        label = f"--set {name}"
        path, arg = _resolve(info, name, label)
        info = _replace_at(info, path, partial(_set_argument, arg=arg, raw=raw, label=label))
    return info


def _learning_rate(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SpecError(f"{option}: {text.strip()!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise SpecError(f"{option}: a learning rate is a finite number >= 0, not {text.strip()}")
    return value


def parse_lr_options(lr: list[str], scale_lr: float | None, n_groups: int,
                     current: list[float]) -> list[float]:
    """The new base lr of each param group from ``--lr`` / ``--scale-lr``.

    ``--lr VALUE`` sets every group, ``--lr GROUP=VALUE`` one group (repeatable, and applied
    over a plain ``--lr VALUE`` whatever the order); ``--scale-lr FACTOR`` multiplies the
    current base lrs. Groups no option names keep their current lr.

    Args:
        lr: the ``--lr`` values as typed.
        scale_lr: the ``--scale-lr`` factor, or None.
        n_groups: the optimizer's number of param groups.
        current: the current base lr per group.

    Raises:
        SpecError: --lr with --scale-lr, a value that is not a finite number >= 0 (a factor
            > 0), a group index out of range, or the same group (or plain --lr) given twice.

    Example:
        >>> parse_lr_options(["1e-3", "1=5e-4"], None, 3, [0.1, 0.1, 0.1])
        [0.001, 0.0005, 0.001]
        >>> parse_lr_options([], 0.5, 2, [0.1, 0.2])
        [0.05, 0.1]
    """
    if len(current) != n_groups:
        raise ValueError(f"current holds {len(current)} lrs for {n_groups} groups")
    if lr and scale_lr is not None:
        raise SpecError("--lr and --scale-lr together: give one (--lr sets the base lrs, "
                        "--scale-lr multiplies the current ones)")
    if scale_lr is not None:
        if isinstance(scale_lr, bool) or not math.isfinite(scale_lr) or scale_lr <= 0:
            raise SpecError(f"--scale-lr: the factor is a finite number > 0, not {scale_lr}")
        return [c * scale_lr for c in current]
    everyone: float | None = None
    per_group: dict[int, float] = {}
    for item in lr:
        group, sep, value = item.partition("=")
        option = f"--lr {item}"
        if not sep:
            if everyone is not None:
                raise SpecError(f"{option}: --lr VALUE given twice; one sets every group, "
                                "--lr GROUP=VALUE sets one")
            everyone = _learning_rate(item, option)
            continue
        group = group.strip()
        if not (group.isascii() and group.isdigit()) or int(group) >= n_groups:
            raise SpecError(f"{option}: no param group {group!r}; the optimizer has {n_groups} "
                            f"group{'s' if n_groups != 1 else ''}, 0 to {n_groups - 1}")
        if int(group) in per_group:
            raise SpecError(f"{option}: group {int(group)} given twice")
        per_group[int(group)] = _learning_rate(value, option)
    new = list(current) if everyone is None else [everyone] * n_groups
    for index, value in per_group.items():
        new[index] = value
    return new
