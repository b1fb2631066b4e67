"""The lr curves behind ``ckpttool plot`` and ``reschedule --plot``: series, sparklines, a PNG.

A curve is the real torch scheduler stepped from step 0 to the horizon (the schedule's own end:
OneCycleLR's total_steps, T_max, total_iters, the last milestone; or ``--steps``), never a
formula of ckpttool's own. Every step is computed; only the values kept for drawing are thinned,
to at most :data:`MAX_POINTS` per curve, so a million-step run costs what stepping it costs.
The stored schedule is rebuilt from its recovered arguments as ``show --verify`` rebuilds it;
the new one (``--scheduler`` / ``--set`` / ``--lr`` / ``--scale-lr``) is the one
:func:`ckpttool.reschedule` plans, from the same options.

matplotlib (the ``[plot]`` extra) is imported only to draw a PNG, on the Agg canvas: no window
ever opens. This module imports neither it nor torch at import time.

Example:
    >>> import ckpttool
    >>> series = ckpttool.plot_series("fixtures/adamw_cosine.pt", sets=["T_max=80"])
    >>> series.horizon, series.step, series.old.call, series.new.call
    (80, 16, 'CosineAnnealingLR(T_max=40, eta_min=1e-05)', 'CosineAnnealingLR(T_max=80, eta_min=1e-05)')
    >>> ckpttool.draw_png(series, "lr.png")                                   # doctest: +SKIP
"""

from __future__ import annotations

import bisect
import math
import os
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ckpttool.errors import CkptToolError, ReplayError, StateError
from ckpttool.inspection import Checkpoint
from ckpttool.schedulers import SchedulerInfo, replay_steps

PLOT_SCHEMA = "ckpttool.plot/1"
# Values kept per curve: more than a PNG or a terminal can show, few enough for JSON.
MAX_POINTS = 4000
# The longest curve drawn (about three minutes of stepping), as for `show --verify`.
MAX_HORIZON = 100_000_000
# A schedule with no end of its own (ExponentialLR, LambdaLR) is drawn at least this far.
OPEN_SPAN = 100
SPARK_LEVELS = "▁▂▃▄▅▆▇█"
# The PNG: inches at DPI dots per inch, so a PNG is 1000 x 480 (one panel) or 1000 x 680 pixels.
DPI = 100
FIGSIZE = (10.0, 4.8)
FIGSIZE_TWO_PANELS = (10.0, 6.8)
EXTRA_HINT = "pip install 'ckpttool[plot]'"


@dataclass(frozen=True)
class Curve:
    """One schedule's values at the kept steps.

    Attributes:
        call: the constructor call of the schedule.
        steps: the kept steps, ascending (every step up to MAX_POINTS, then evenly thinned).
        lrs: per param group, the lr after each kept step.
        momentum: per param group, the momentum (or beta1) after each kept step; None unless a
            curve of the plot cycles it.
        end: why the curve stops before the horizon (torch raised), else None.
    """

    call: str
    steps: tuple[int, ...]
    lrs: tuple[tuple[float, ...], ...]
    momentum: tuple[tuple[float, ...], ...] | None = None
    end: str | None = None

    def to_dict(self) -> dict:
        momentum = self.momentum or [None] * len(self.lrs)
        return {"call": self.call, "steps": list(self.steps),
                "groups": [{"index": i, "lr": list(lrs), "momentum": None if m is None else list(m)}
                           for i, (lrs, m) in enumerate(zip(self.lrs, momentum))],
                "end": self.end}


@dataclass(frozen=True)
class PlotSeries:
    """The stored schedule of one optimizer, and the new one when a change was asked.

    Attributes:
        path: the checkpoint.
        optimizer: the optimizer's location; ``scheduler`` its scheduler's (None: none stored).
        step: the stored schedule's current step (its last_epoch), None without one.
        resume: where the new schedule resumes (``reschedule``'s step), None without a change.
        horizon: the curves run from step 0 to this step.
        caption: how the horizon was chosen ("steps 0 to 40: T_max of CosineAnnealingLR").
        old: the stored schedule (None when it cannot be replayed and a new one is drawn).
        new: the new schedule, or None.
        momentum_key: "momentum" or "beta1" when a curve cycles it, else None.
        notes: what the picture does not say by itself.
        logged: an HF Trainer folder's logged lrs, (step, lr) as trainer_state.json's
            log_history holds them (the first group's lr).
        logged_check: a :class:`ckpttool.schedule.LoggedCheck` of them against the stored
            curve (None when it is not drawn); its ``offset`` places them (:attr:`logged_points`).
    """

    path: str
    optimizer: str
    scheduler: str | None
    step: int | None
    resume: int | None
    horizon: int
    caption: str
    old: Curve | None
    new: Curve | None
    momentum_key: str | None = None
    notes: tuple[str, ...] = ()
    logged: tuple[tuple[int, float], ...] = ()
    logged_check: Any = None

    @property
    def curves(self) -> list[tuple[str, Curve]]:
        """("stored", curve) and ("new", curve), those present."""
        return [(name, c) for name, c in (("stored", self.old), ("new", self.new)) if c]

    @property
    def logged_points(self) -> list[tuple[int, float]]:
        """The logged lrs where they belong on the curves' step axis, which counts scheduler
        steps: the lr logged with step N at N - 1 (the lr step N used, as transformers >= 4.51
        logs it), or at N when the log follows the older convention (``logged_check``)."""
        offset = self.logged_check.offset if self.logged_check is not None else -1
        return [(step + offset, lr) for step, lr in self.logged]

    def to_dict(self) -> dict:
        """The ``ckpttool.plot/1`` document."""
        return {"schema": PLOT_SCHEMA, "path": self.path, "optimizer": self.optimizer,
                "scheduler": self.scheduler, "step": self.step, "resume": self.resume,
                "horizon": self.horizon, "caption": self.caption,
                "momentum_key": self.momentum_key,
                "old": self.old.to_dict() if self.old else None,
                "new": self.new.to_dict() if self.new else None, "notes": list(self.notes),
                "logged": [[step, lr] for step, lr in self.logged],
                "logged_check": (self.logged_check.to_dict() if self.logged_check is not None
                                 else None)}


# --- the series ---------------------------------------------------------------------------------


def plot_series(source: str | os.PathLike | Checkpoint, *, scheduler: Any = None,
                sets: list[str] | tuple[str, ...] = (), lr: list[str] | tuple[str, ...] = (),
                scale_lr: float | None = None, step: int | None = None,
                momentum: float | None = None, optimizer: str | None = None,
                scheduler_state: str | None = None, steps: int | None = None,
                progress: Callable | None = None) -> PlotSeries:
    """The lr curves of a checkpoint's schedule, stepped with the real torch scheduler.

    Without a change the stored schedule alone; with ``scheduler`` / ``sets`` / ``lr`` /
    ``scale_lr`` / ``step`` / ``momentum`` (the options of :func:`ckpttool.reschedule`, which
    plans the new schedule) the new one too.

    Args:
        source: a checkpoint path, or a :class:`ckpttool.Checkpoint`.
        scheduler, sets, lr, scale_lr, momentum, optimizer, scheduler_state: as for
            :func:`ckpttool.reschedule`.
        step: where the new schedule resumes, as for :func:`ckpttool.reschedule` (default: the
            stored step); not the end of the picture, which is ``steps``.
        steps: draw steps 0 to ``steps`` (default: the schedule's own horizon).
        progress: ``progress(done, total)`` while stepping long curves.

    Raises:
        CkptToolError: no scheduler to draw, a schedule that cannot be replayed, a horizon
            beyond MAX_HORIZON, or whatever ``reschedule`` refuses.

    Example:
        >>> s = plot_series("fixtures/schedulers/OneCycleLR.pt")
        >>> s.horizon, s.step, s.momentum_key, len(s.old.lrs)
        (29, 12, 'beta1', 2)
    """
    from ckpttool import inspection, rescheduling

    ckpt = source if isinstance(source, Checkpoint) else inspection.load(source)
    if not ckpt.optimizers:
        raise StateError(f"{ckpt.path}: no optimizer state in this checkpoint; nothing to plot")
    if (scheduler is not None or sets or lr or scale_lr is not None or step is not None
            or momentum is not None):
        plan = rescheduling.reschedule(ckpt, scheduler=scheduler, sets=sets, lr=lr,
                                       scale_lr=scale_lr, step=step, momentum=momentum,
                                       optimizer=optimizer, scheduler_state=scheduler_state,
                                       progress=progress)
        return plan_series(plan, steps=steps, progress=progress)
    chosen = rescheduling.choose_states(ckpt, optimizer, scheduler_state)
    opt, old = chosen.optimizer, chosen.scheduler
    if old is None:
        raise StateError(f"{ckpt.path}: {opt.location} has no scheduler to plot; give one with "
                         "--scheduler SPEC to see it")
    return _series(ckpt, opt, old, None, steps, progress)


def plan_series(plan: Any, *, steps: int | None = None,
                progress: Callable | None = None) -> PlotSeries:
    """The curves of a :class:`ckpttool.Rescheduled` plan: the stored schedule and the new one,
    the resume point marked (what ``reschedule --plot`` draws).

    Example:
        >>> import ckpttool
        >>> plan = ckpttool.reschedule("fixtures/adamw_cosine.pt", scale_lr=0.5)
        >>> s = plan_series(plan)
        >>> s.old.lrs[0][0], s.new.lrs[0][0], s.resume
        (0.001, 0.0005, 16)
    """
    if plan.semantics != "replay":
        raise ReplayError(f"{plan.source.path}: {plan.old_call} cannot be replayed (its steps "
                          "follow metric values that are not stored), so it has no curve to "
                          "plot")
    ckpt = plan.source
    return _series(ckpt, ckpt.optimizer(plan.optimizer), plan.old_scheduler, plan, steps,
                   progress)


@dataclass
class _Built:
    """A schedule rebuilt at step 0, ready to be traced."""

    label: str  # "stored" or "new"
    call: str
    info: SchedulerInfo | None
    named: Any  # the schedule by name (an hf: SPEC), else None
    stand_in: Any
    sched: Any
    current: int  # its current (stored) or resume (new) step


def _series(ckpt: Checkpoint, opt: Any, old: Any, plan: Any, steps: int | None,
            progress: Callable | None) -> PlotSeries:
    from ckpttool import schedule

    notes = list(plan.notes) if plan is not None else []
    built: list[_Built] = []
    if old is not None:
        named = _named(old.named)
        blocker = old.info.replay_blocker if named is None else None
        if blocker is not None and plan is None:
            raise ReplayError(f"{ckpt.path}: cannot plot [{old.location}]: {blocker} Pass "
                              "--scheduler my_sched.py:make (a function that takes the optimizer "
                              "and returns the scheduler) to draw it from your code")
        if blocker is not None:
            notes.append(f"the stored schedule is not drawn: {blocker}")
        else:
            call = named.text if named is not None else old.call
            groups = schedule.materialize(list(opt.state["param_groups"]), ckpt.file)
            state = schedule.materialize(old.state, ckpt.file)
            stand_in, [sched] = _torch_refusal(
                lambda: schedule.rebuild_stored(opt.cls, groups, [(state, old.info)],
                                                named=[named]), call)
            built.append(_Built("stored", call, old.info, named, stand_in, sched,
                                replay_steps(state, old.info)))
    if plan is not None:
        stand_in, sched = plan.rebuild()
        _leave_momentum(plan, stand_in, sched)
        built.append(_Built("new", plan.new_call, plan.info, _named(plan.factory_text), stand_in,
                            sched, plan.steps))

    horizons = [_horizon(b.info, type(b.sched).__name__, b.current, _named_end(b.named))
                for b in built]
    if steps is not None:
        horizon, caption = steps, f"steps 0 to {steps} (--steps)"
    else:
        pick = max(range(len(built)), key=lambda i: horizons[i][0])
        horizon, why, _ = horizons[pick]
        whose = f" (the {built[pick].label} schedule)" if len(built) > 1 else ""
        caption = f"steps 0 to {horizon}: {why}{whose}"
    if horizon > MAX_HORIZON:
        raise StateError(f"{ckpt.path}: a horizon of {horizon} steps is more than the "
                         f"{MAX_HORIZON:,} ckpttool steps through; pass --steps N")
    marks = {b.current for b in built if b.current <= horizon}
    every = max(1, math.ceil((horizon + 1) / MAX_POINTS))
    kept = sorted(set(range(0, horizon + 1, every)) | {horizon} | marks)
    momentum_key = _momentum_key(opt.state["param_groups"])
    logged = tuple(ckpt.hf.logged) if ckpt.hf is not None else ()
    traced, check = {}, None
    for b, (end, _, ends) in zip(built, horizons):
        # A schedule with an end of its own stops there (a cosine past T_max only climbs back);
        # one without runs to the common horizon; --steps asks for every step.
        stop = end if ends and steps is None else horizon
        # The logged lrs belong to the stored schedule: its values at their steps are kept
        # aside (not drawn as curve points) to place and check them.
        record = (schedule.logged_steps(logged, stop) if b.label == "stored" and b.named
                  else set())
        curve, momentum, lrs = _trace(b.call, b.stand_in, b.sched,
                                      [k for k in kept if k < stop] + [stop], momentum_key,
                                      progress, record)
        traced[b.label] = (curve, momentum)
        if record:
            check = schedule.compare_logged(logged, lrs, curve.steps[-1] if curve.steps else 0)
    if not any(_varies(m) for _, m in traced.values()):
        momentum_key = None  # the second panel is for schedules that cycle it
    curves = {label: Curve(c.call, c.steps, c.lrs, m if momentum_key else None, c.end)
              for label, (c, m) in traced.items()}
    for label, curve in curves.items():
        if curve.end:
            notes.append(f"the {label} schedule {curve.end}")
    if logged:
        notes.append(_logged_note(logged, check))
    current = next((b.current for b in built if b.label == "stored"), None)
    return PlotSeries(ckpt.path, opt.location, old.location if old else None, current,
                      plan.steps if plan is not None else None, horizon, caption,
                      curves.get("stored"), curves.get("new"), momentum_key, tuple(notes),
                      logged, check)


def _named(text: str | None) -> Any:
    """The :class:`ckpttool.spec.HFSpec` of an ``hf:`` SPEC (an HF Trainer's schedule, or a
    new one given so), else None."""
    from ckpttool import spec

    return spec.parse_spec(text) if (text or "").startswith("hf:") else None


def _named_end(named: Any) -> tuple[int, str] | None:
    """Where a named (HF) schedule ends: its num_training_steps (HF max_steps); None for the
    constant ones, which have none."""
    if named is None or "num_training_steps" not in named.args:
        return None
    try:
        return _int(named.args["num_training_steps"]), f"num_training_steps of hf:{named.name}"
    except ValueError:
        return None


def _logged_note(logged: tuple, check: Any) -> str:
    """What the logged points say, for the notes under the picture."""
    what = (f"{len(logged)} logged lrs of trainer_state.json (points: step N drawn at "
            f"{'N - 1, the lr step N used' if check is None or check.offset else 'N, the lr after it'})")
    if check is None:
        return f"{what}, not compared: the stored schedule is not drawn"
    if check.agrees:
        return f"{what}: all {check.checked} equal the replay"
    step, value, replayed = check.first_mismatch
    return (f"{what}: {check.mismatches} of {check.checked} DIFFER from the replay, the first "
            f"at step {step}: logged {value!r}, replayed {replayed!r}")


def _leave_momentum(plan: Any, stand_in: Any, sched: Any) -> None:
    """Give the new schedule's stand-in the momentum (or beta1) the rewrite leaves in the
    groups, when the new schedule does not cycle it: ``--momentum``'s value, else the stored
    one. A run with that schedule from step 0 had it all along."""
    from ckpttool import rescheduling

    if rescheduling.cycles_momentum(plan.info, sched):
        return
    node = plan.root
    for key in plan.optimizer_path + ("param_groups",):
        node = node[key]
    for live, written in zip(stand_in.param_groups, node):
        if "betas" in live and isinstance(written.get("betas"), (list, tuple)):
            beta1 = written["betas"][0]
            if isinstance(beta1, (int, float)) and not isinstance(beta1, bool):
                live["betas"] = (beta1, *tuple(live["betas"])[1:])
        elif "momentum" in live:
            value = written.get("momentum")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                live["momentum"] = value


def _torch_refusal(build: Callable, call: str) -> Any:
    """``build()``, with torch refusing the arguments said in one line."""
    try:
        return build()
    except CkptToolError:
        raise
    except (ArithmeticError, LookupError, RuntimeError, TypeError, ValueError) as e:
        raise ReplayError(f"torch refused to build {call}: {e}") from None


def _trace(call: str, optimizer: Any, sched: Any, kept: list[int], momentum_key: str | None,
           progress: Callable | None, record: set[int] | frozenset = frozenset(),
           ) -> tuple[Curve, tuple | None, dict[int, float]]:
    """Step ``sched`` through every step up to ``kept[-1]``, keeping the group lrs (and
    momentum or beta1) at the ``kept`` steps, and the lr a training log shows
    (:func:`ckpttool.schedule.logged_lr`) at the ``record`` steps; stops where torch raises
    (OneCycleLR past total_steps)."""
    from ckpttool import schedule

    steps: list[int] = []
    rows: list[tuple[list[float], list[float] | None]] = []
    recorded: dict[int, float] = {}
    keep = set(kept)
    done, end = 0, None
    for step in sorted(keep | {r for r in record if 0 <= r < kept[-1]}):
        try:
            schedule.replay(sched, step - done)
        except CkptToolError:
            raise
        except (ArithmeticError, LookupError, RuntimeError, TypeError, ValueError) as e:
            # The failing step raised before it set any lr: the groups hold the step before it.
            failed = getattr(sched, "last_epoch", None)
            if isinstance(failed, int) and steps and failed - 1 > steps[-1]:
                steps.append(failed - 1)
                rows.append(_values(optimizer, momentum_key))
            end = f"ends at step {steps[-1] if steps else 0}: torch raises on the next ({e})"
            break
        done = step
        if step in record:
            recorded[step] = schedule.logged_lr(sched)
        if step not in keep:
            continue
        steps.append(step)
        rows.append(_values(optimizer, momentum_key))
        if progress is not None:
            progress(step, kept[-1])
    lrs = tuple(zip(*(r[0] for r in rows))) if rows else ()
    momentum = tuple(zip(*(r[1] for r in rows))) if rows and rows[0][1] is not None else None
    return Curve(call, tuple(steps), lrs, None, end), momentum, recorded


def _values(optimizer: Any, momentum_key: str | None) -> tuple[list[float], list[float] | None]:
    """Each group's lr, and its momentum or beta1 (None without a ``momentum_key``)."""
    groups = optimizer.param_groups
    lrs = [float(g["lr"]) for g in groups]
    if momentum_key == "beta1":
        return lrs, [float(g["betas"][0]) for g in groups]
    if momentum_key == "momentum":
        return lrs, [float(g["momentum"]) for g in groups]
    return lrs, None


def _momentum_key(groups: list[Mapping]) -> str | None:
    """Which group key a cycling schedule moves: beta1 of ``betas``, or ``momentum``."""
    if groups and all("betas" in g for g in groups):
        return "beta1"
    if groups and all("momentum" in g for g in groups):
        return "momentum"
    return None


def _varies(per_group: tuple | None) -> bool:
    return per_group is not None and any(len(set(values)) > 1 for values in per_group)


# --- the horizon ----------------------------------------------------------------------------------


def _int(value: Any) -> int:
    """A positive whole number of steps from an argument, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or (
            not float(value).is_integer()):
        raise ValueError(value)
    return int(value)


def _natural_end(info: SchedulerInfo) -> tuple[int, str] | None:
    """The last step where the schedule still changes, and why; None when it never ends."""
    a = info.args
    if info.cls == "OneCycleLR":
        total = a.get("total_steps") or _int(a.get("epochs")) * _int(a.get("steps_per_epoch"))
        return _int(total) - 1, f"the last step of OneCycleLR(total_steps={_int(total)})"
    if info.cls == "CosineAnnealingLR":
        return _int(a["T_max"]), "T_max of CosineAnnealingLR"
    if info.cls in ("LinearLR", "ConstantLR", "PolynomialLR"):
        return _int(a["total_iters"]), f"total_iters of {info.cls}"
    if info.cls == "MultiStepLR":
        last = max(_int(m) for m in a["milestones"])
        return last + max(1, last // 5), "the last milestone of MultiStepLR + 20%"
    if info.cls == "SequentialLR" and info.children:
        tail = _natural_end(info.children[-1])
        if tail is None:
            return None
        last = _int(max(a["milestones"]))
        return last + tail[0], f"the last milestone of SequentialLR + {tail[1]}"
    if info.cls == "ChainedScheduler" and info.children:
        ends = [_natural_end(c) for c in info.children]
        if any(e is None for e in ends):
            return None
        return max(ends)
    return None


def _open_span(info: SchedulerInfo) -> tuple[int, str]:
    """How far to draw a schedule with no end: a few of its periods, or OPEN_SPAN steps."""
    a = info.args
    if info.cls == "StepLR":
        return 4 * _int(a["step_size"]), "4 x step_size"
    if info.cls == "CyclicLR":
        up = _int(a["step_size_up"])
        down = _int(a["step_size_down"]) if a.get("step_size_down") is not None else up
        return 3 * (up + down), "3 cycles"
    if info.cls == "CosineAnnealingWarmRestarts":
        t0, mult = _int(a["T_0"]), _int(a.get("T_mult", 1))
        return t0 * (1 + mult + mult * mult), "3 periods"
    if info.cls == "SequentialLR" and info.children:
        span, why = _open_span(info.children[-1])
        return _int(max(a["milestones"])) + span, f"the last milestone + {why}"
    if info.cls == "ChainedScheduler" and info.children:
        return max(_natural_end(c) or _open_span(c) for c in info.children)
    return OPEN_SPAN, f"{OPEN_SPAN} steps"


def _horizon(info: SchedulerInfo | None, cls: str, current: int,
             named_end: tuple[int, str] | None = None) -> tuple[int, str, bool]:
    """The step a curve is drawn to, why, and whether that is the schedule's own end: its
    natural end (``named_end`` for a schedule known by name, else from ``info``; or the current
    step, when past it); for a schedule that never ends, twice the current step or a few
    periods."""
    open_span = (OPEN_SPAN, f"{OPEN_SPAN} steps")
    try:
        if named_end is not None:
            end, span = named_end, open_span
        else:
            end = _natural_end(info) if info is not None else None
            span = _open_span(info) if info is not None and end is None else open_span
    except (ArithmeticError, KeyError, LookupError, TypeError, ValueError):  # odd arguments
        end, span = None, open_span
    if end is not None:
        if current > end[0]:
            return current, f"the current step (past {end[1]}: step {end[0]})", True
        return end[0], end[1], True
    if 2 * current >= span[0]:
        return 2 * current, f"twice the current step ({cls} has no natural end)", False
    return span[0], f"{span[1]} ({cls} has no natural end)", False


# --- text -----------------------------------------------------------------------------------------


def sparkline(steps: tuple[int, ...], values: tuple[float, ...], columns: int, horizon: int,
              lo: float, hi: float) -> str:
    """``values`` at ``steps`` as block characters, one per column over steps 0 to ``horizon``
    (the mean of the values in each column's steps; a blank past the curve's end), scaled from
    ``lo`` (▁) to ``hi`` (█).

    Example:
        >>> sparkline((0, 1, 2, 3), (0.0, 1.0, 2.0, 3.0), 4, 3, 0.0, 3.0)
        '▁▃▆█'
    """
    out = []
    top = len(SPARK_LEVELS) - 1
    for c in range(columns):
        first, stop = column_steps(c, columns, horizon)
        i, j = bisect.bisect_left(steps, first), bisect.bisect_left(steps, stop)
        if i == j:
            out.append(" ")
            continue
        mean = math.fsum(values[i:j]) / (j - i)
        if not math.isfinite(mean):
            out.append("?")
        elif hi > lo:
            out.append(SPARK_LEVELS[min(top, max(0, round((mean - lo) / (hi - lo) * top)))])
        else:
            out.append(SPARK_LEVELS[top // 2])
    return "".join(out)


def column_steps(column: int, columns: int, horizon: int) -> tuple[int, int]:
    """The steps [first, stop) one sparkline column stands for."""
    return column * (horizon + 1) // columns, (column + 1) * (horizon + 1) // columns


# --- the picture ----------------------------------------------------------------------------------


def require_matplotlib() -> None:
    """Raise the one-line error naming the extra when matplotlib is not installed.

    Raises:
        CkptToolError: matplotlib cannot be imported.
    """
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise CkptToolError("drawing a PNG needs matplotlib, the optional extra [plot]: "
                            f"{EXTRA_HINT} (without -o, plot prints sparklines)") from None


def draw_png(series: PlotSeries, path: str | os.PathLike) -> str:
    """Draw ``series`` into an image file (PNG, or SVG / PDF by the name's suffix) and return
    its path: lr per group against step, the stored schedule solid and the new one dashed, the
    current step marked, momentum / beta1 in a second panel when a schedule cycles it.

    The figure is drawn on matplotlib's Agg canvas, never through pyplot: no window opens and
    no global state changes. A PNG is ``FIGSIZE x DPI`` pixels (``FIGSIZE_TWO_PANELS`` with
    the momentum panel).

    Raises:
        CkptToolError: matplotlib is missing (the message names the extra), or the suffix is
            not an image format matplotlib writes.

    Example:
        >>> draw_png(plot_series("fixtures/adamw_cosine.pt"), "lr.png")  # doctest: +SKIP
        'lr.png'
    """
    require_matplotlib()
    import matplotlib
    import matplotlib.ticker
    from matplotlib.figure import Figure

    path = os.fspath(path)
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    fig = Figure(figsize=FIGSIZE_TWO_PANELS if series.momentum_key else FIGSIZE, dpi=DPI,
                 layout="constrained")
    if fmt not in fig.canvas.get_supported_filetypes():
        raise CkptToolError(f"{path}: matplotlib cannot write .{fmt} images; use a .png, .svg "
                            "or .pdf name")
    panels = [("lr", "lrs")] + ([(series.momentum_key, "momentum")] if series.momentum_key
                                else [])
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False,
                        height_ratios=[2, 1][:len(panels)])[:, 0]
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    both = series.old is not None and series.new is not None
    for ax, (ylabel, field) in zip(axes, panels):
        for name, curve in series.curves:
            for indices, values in distinct_curves(getattr(curve, field) or ()):
                label = groups_label(indices) + (f", {name}" if both else "")
                ax.plot(curve.steps, values, "--" if name == "new" else "-",
                        color=colors[indices[0] % len(colors)], linewidth=1.6,
                        label=label if field == "lrs" else None)
        if field == "lrs" and series.logged:
            # hollow, so the curve shows through: a logged lr off the curve stands out
            xs, ys = zip(*series.logged_points)
            ax.plot(xs, ys, linestyle="none", marker="o", markersize=6, markerfacecolor="none",
                    markeredgecolor="black", markeredgewidth=1.2, zorder=3,
                    label="logged (trainer_state.json)")
        for step, label, style in marks(series):
            ax.axvline(step, color="0.3", linestyle=style, linewidth=1.2,
                       label=label if field == "lrs" else None)
        ax.set_ylabel(ylabel)
        ax.set_xlim(0, max(series.horizon, 1))
        ax.grid(True, alpha=0.3)
        # lrs as written in a training script (1e-05, 0.0003), not as offsets from an exponent
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
    axes[0].legend(loc="best", fontsize=8, ncol=max(1, math.ceil(len(axes[0].lines) / 8)))
    axes[-1].set_xlabel("step")
    axes[0].set_title(_title(series), loc="left", fontsize=9)
    fig.suptitle(f"{series.path}  [{series.optimizer}]", fontsize=11)
    fig.supxlabel("\n".join(textwrap.fill(line, 160) for line in (series.caption, *series.notes)),
                  fontsize=8, color="0.3")
    fig.savefig(path, format=fmt)
    return path


def distinct_curves(per_group: tuple) -> list[tuple[list[int], tuple[float, ...]]]:
    """Groups with identical values drawn as one line (else the last hides the others)."""
    out: dict[tuple, list[int]] = {}
    for i, values in enumerate(per_group):
        out.setdefault(values, []).append(i)
    return [(indices, values) for values, indices in out.items()]


def groups_label(indices: list[int]) -> str:
    """``group 0``, or ``groups 0, 1`` for groups sharing one curve."""
    return (f"group {indices[0]}" if len(indices) == 1
            else "groups " + ", ".join(map(str, indices)))


def marks(series: PlotSeries) -> list[tuple[int, str, str]]:
    """The vertical lines as (step, label, line style): the current step, and the resume point
    when it differs."""
    out = []
    if series.step is not None:
        same = series.resume == series.step
        out.append((series.step, f"current step {series.step}" + (" = resume" if same else ""),
                    ":"))
    if series.resume is not None and series.resume != series.step:
        out.append((series.resume, f"resume at step {series.resume}", "-."))
    return [m for m in out if m[0] <= series.horizon]


def _title(series: PlotSeries) -> str:
    lines = []
    for name, curve in series.curves:
        style = (" (dashed)" if name == "new" else " (solid)") if len(series.curves) > 1 else ""
        lines.append(textwrap.fill(f"{name}: {curve.call}{style}", 130,
                                   subsequent_indent="    "))
    return "\n".join(lines)
