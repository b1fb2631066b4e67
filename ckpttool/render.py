"""Human reports and JSON, rendered from the same result objects.

Floats are written with ``repr`` in both: the shortest text that reads back bit-identical.
Strict JSON has no infinities or NaN, so those are written as the strings "inf", "-inf", "nan".
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from ckpttool.inspection import (
    OPTIMIZER_FLAGS,
    Checkpoint,
    Finding,
    OptimizerInfo,
    SchedulerReport,
)
from ckpttool.schedulers import MAX_INT_TEXT_BITS, SCHEDULER_SET_KEYS, int_text, value_repr
from ckpttool.serialization import Marker, Opaque, TensorRef, dotted_name

SHOW_SCHEMA = "ckpttool.show/1"


# --- JSON --------------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """A value made of JSON types only (see the module docstring for floats; an int too long
    to write in decimal becomes the string ``"<int of N bits>"``)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value if abs(value).bit_length() <= MAX_INT_TEXT_BITS else int_text(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, TensorRef):
        return {"tensor": {"dtype": value.dtype, "shape": list(value.shape),
                           "device": value.device}}
    if isinstance(value, Opaque):
        return {"opaque": value.dotted, "args": jsonable(list(value.args)),
                "state": jsonable(value.state)}
    if dotted_name(value):
        return {"global": dotted_name(value)}
    if isinstance(value, Marker):
        return repr(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": len(value)}
    if isinstance(value, complex):
        return {"real": jsonable(value.real), "imag": jsonable(value.imag)}
    return value_repr(value)


def optimizer_dict(opt: OptimizerInfo) -> dict:
    return {
        "location": opt.location,
        "class": opt.cls,
        **({"candidates": list(opt.candidates)} if opt.candidates else {}),
        "groups": [{
            "index": g.index, "num_params": g.num_params, "lr": jsonable(g.lr),
            "initial_lr": jsonable(g.initial_lr),
            "lr_tensor": g.lr_tensor.to_dict() if g.lr_tensor else None,
            "hyper": jsonable(g.hyper),
        } for g in opt.groups],
        "state": {"params_with_state": opt.params_with_state, "step": jsonable(opt.step),
                  "keys": list(opt.state_keys)},
    }


def scheduler_dict(s: SchedulerReport, *, top: bool = True) -> dict:
    out: dict[str, Any] = {}
    if top:
        out["location"] = s.location
    out["class"] = s.cls
    if top:
        out["optimizer"] = s.optimizer
        out["pairing"] = s.pairing
    out.update({
        "last_epoch": jsonable(s.last_epoch), "step_count": jsonable(s.step_count),
        "base_lrs": jsonable(s.base_lrs), "last_lr": jsonable(s.last_lr),
        "args": jsonable(s.args), "call": s.call,
        "children": [scheduler_dict(c, top=False) for c in s.children],
        "unrecoverable": list(s.unrecoverable),
    })
    if s.candidates:
        out["candidates"] = list(s.candidates)
    if s.verify is not None:
        out["verify"] = jsonable(s.verify.to_dict())
    return out


def finding_dict(f: Finding) -> dict:
    return {"code": f.code, "severity": f.severity, "location": f.location,
            "message": f.message, "hint": f.hint}


def show_dict(ckpt: Checkpoint) -> dict:
    """The ``ckpttool.show/1`` document for one checkpoint (PRODUCT.md section 5)."""
    return {
        "schema": SHOW_SCHEMA,
        "path": ckpt.path,
        "kind": ckpt.kind,
        "size": ckpt.size,
        "optimizers": [optimizer_dict(o) for o in ckpt.optimizers],
        "schedulers": [scheduler_dict(s) for s in ckpt.schedulers],
        "findings": [finding_dict(f) for f in ckpt.findings],
    }


def dumps(doc: Any) -> str:
    return json.dumps(doc, indent=2, allow_nan=False)


# --- human report ------------------------------------------------------------------------------


def _text(value: Any) -> str:
    """A value in a report: numbers exactly, strings quoted (an lr "0.1" is not the number)."""
    if value is None:
        return "-"
    if isinstance(value, tuple):
        return "(" + ", ".join(_text(v) for v in value) + ")"
    if isinstance(value, list):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    if isinstance(value, (bool, int, float, str, dict)):
        return value_repr(value)
    try:
        return str(value)
    except ValueError:  # an object whose text holds an absurd int
        return f"<{type(value).__name__}>"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _optimizer_lines(opt: OptimizerInfo) -> list[str]:
    cls = opt.cls if not opt.candidates else f"{opt.cls} ({' or '.join(opt.candidates)})"
    n_params = sum(g.num_params for g in opt.groups)
    step = f", step {_text(opt.step)}" if opt.step is not None else ""
    lines = [f"[{opt.location}] {cls}: {_plural(len(opt.groups), 'group')}, "
             f"{_plural(n_params, 'param')}, state for {opt.params_with_state}{step}"]
    if not opt.groups:
        return lines
    # Hyperparameter columns: every key any group has, flags aside, scheduler keys last.
    keys: list[str] = []
    for g in opt.groups:
        for k in g.hyper:
            if k not in keys and k not in OPTIMIZER_FLAGS and k not in SCHEDULER_SET_KEYS:
                keys.append(k)
    # initial_lr has its own column; the other keys a scheduler set go last
    keys += [k for k in SCHEDULER_SET_KEYS if k != "initial_lr" and any(
        k in g.hyper for g in opt.groups)]
    rows = [["group", "params", "lr", "initial_lr", *keys]]
    for g in opt.groups:
        lr = _text(g.lr) + (f" ({g.lr_tensor.dtype} tensor, {g.lr_tensor.device})"
                            if g.lr_tensor else "")
        rows.append([str(g.index), str(g.num_params), lr, _text(g.initial_lr),
                     *[_text(g.hyper.get(k)) for k in keys]])
    lines += _table(rows)
    flags = sorted({f"{k}={_text(v)}" for g in opt.groups for k, v in g.hyper.items()
                    if k in OPTIMIZER_FLAGS and v not in (None, False)})
    if flags:
        lines.append("  flags: " + " ".join(flags))
    return lines


def _scheduler_lines(s: SchedulerReport, indent: str = "") -> list[str]:
    top = s.location is not None
    head = f"{indent}[{s.location}] {s.call}" if top else f"{indent}{s.call}"
    if top:
        if s.optimizer:
            head += f"\n{indent}  drives [{s.optimizer}] (paired by {s.pairing})"
        elif (s.pairing or "").startswith("ambiguous"):
            head += f"\n{indent}  drives ? ({s.pairing})"
        else:
            head += f"\n{indent}  drives no optimizer in this file"
    lines = [head]
    if s.candidates:
        lines.append(f"{indent}  class: {' or '.join(s.candidates)} (same saved state)")
    counters = []
    if s.last_epoch is not None:
        counters.append(f"last_epoch {_text(s.last_epoch)}")
    if s.step_count is not None:
        counters.append(f"step_count {_text(s.step_count)}")
    if counters:
        lines.append(f"{indent}  " + "  ".join(counters))
    if s.base_lrs is not None:
        lines.append(f"{indent}  base_lrs  {_text(s.base_lrs)}")
    if s.last_lr is not None:
        lines.append(f"{indent}  last_lr   {_text(s.last_lr)}")
    if s.children:
        lines.append(f"{indent}  children:")
    for i, child in enumerate(s.children):
        sub = _scheduler_lines(child, indent + "      ")
        lines.append(f"{indent}    [{i}] " + sub[0].lstrip())
        lines += sub[1:]
    if top:  # a sub-scheduler's are listed with its parent's, by position
        lines += [f"{indent}  not recoverable: {text}" for text in s.unrecoverable]
    if s.verify is not None:
        v = s.verify
        if v.identical:
            lines.append(f"{indent}  verify: identical to a clean replay")
        elif v.identical is False:
            lines.append(f"{indent}  verify: DIFFERS from a clean replay: {v.first_difference}")
        else:
            lines.append(f"{indent}  verify: not replayable: {v.reason}")
    return lines


def _finding_lines(findings: tuple[Finding, ...]) -> list[str]:
    if not findings:
        return ["findings: none"]
    lines = ["findings:"]
    width = max(len(f.code) for f in findings)
    for f in findings:
        lines.append(f"  {f.severity:<7}  {f.code:<{width}}  {f.message}")
        if f.hint:
            lines.append(f"  {'':<7}  {'':<{width}}  fix: {f.hint}")
    return lines


def show_text(ckpt: Checkpoint) -> str:
    """The human report of one checkpoint."""
    blocks = [[f"{ckpt.path}  ({ckpt.kind}, {_size(ckpt.size)})"]]
    blocks += [_optimizer_lines(o) for o in ckpt.optimizers]
    blocks += [_scheduler_lines(s) for s in ckpt.schedulers]
    blocks.append(_finding_lines(ckpt.findings))
    return "\n\n".join("\n".join(b) for b in blocks) + "\n"


# --- reschedule --------------------------------------------------------------------------------


def reschedule_dict(plan: Any, saved: Any = None) -> dict:
    """The ``ckpttool.reschedule/1`` document."""
    doc = plan.to_dict()
    doc["output"] = saved.path if saved is not None else None
    doc["backup"] = saved.backup if saved is not None else None
    doc["verified_steps"] = saved.verified_steps if saved is not None else None
    doc["dry_run"] = saved is None
    return doc


def _python_call(info: Any, factory: str | None = None) -> str:
    """The constructor as Python source (``lr_scheduler`` being ``torch.optim.lr_scheduler``),
    with the optimizer passed where torch wants it."""
    from dataclasses import replace

    from ckpttool.schedulers import format_call

    if info is None:
        return f"{(factory or 'your_factory').rpartition(':')[2]}(optimizer)  # from {factory}" \
            if factory else "your_factory(optimizer)"
    args = format_call(replace(info, children=()))[len(info.cls) + 1:-1]
    args = args.replace("schedulers=[], ", "").replace("schedulers=[]", "")
    if info.cls == "ChainedScheduler":
        subs = ", ".join(_python_call(c) for c in info.children)
        return f"lr_scheduler.ChainedScheduler([{subs}], optimizer=optimizer)"
    if info.children:
        subs = ", ".join(_python_call(c) for c in info.children)
        args = f"schedulers=[{subs}]" + (f", {args}" if args else "")
    return f"lr_scheduler.{info.cls}(optimizer{', ' + args if args else ''})"


def _subscript(path: tuple) -> str:
    return "ckpt" + "".join(f"[{p!r}]" for p in path)


def reschedule_text(plan: Any, saved: Any = None) -> str:
    """The human report of a reschedule: per group old -> new, the scheduler, what to do next."""
    how = (f"replayed {plan.steps} steps" if plan.semantics == "replay"
           else "changed in place, not replayed")
    where = f"-> {saved.path}" if saved is not None else "(dry run: nothing written)"
    lines = [f"{plan.source.path} {where}  ({how})", ""]
    keys: list[str] = []
    for g in plan.groups:
        keys += [k for k in g.changes if k not in keys]
    if keys:
        rows = [["group", *keys]]
        for g in plan.groups:
            rows.append([str(g.index)] + [
                f"{_text(g.changes[k][0])} -> {_text(g.changes[k][1])}" if k in g.changes
                else "unchanged" for k in keys])
        lines.append(f"[{plan.optimizer}]")
        lines += _table(rows)
    else:
        lines.append(f"[{plan.optimizer}] param groups unchanged")
    removed = sorted({k for g in plan.groups for k in g.removed})
    if removed:
        lines.append(f"  removed from the groups: {', '.join(removed)}")
    lines += ["", f"[{plan.scheduler}] {plan.old_call or '(none)'}", f"  -> {plan.new_call}"]
    lines += [f"note: {note}" for note in plan.notes]
    if saved is not None:
        lines.append("")
        lines.append(
            f"verified: a fresh optimizer and scheduler loaded from {saved.path} follow the "
            f"replay bit for bit for the next {saved.verified_steps} steps"
            if saved.verified_steps else f"verified: {saved.path} reads back as planned")
    if saved is not None and saved.backup:
        lines.append(f"backup: the original is now {saved.backup}")
    target = saved.path if saved is not None else "OUT"
    lines += ["", "Resume with the new schedule in this order:",
              "  import torch",
              "  from torch.optim import lr_scheduler",
              f"  ckpt = torch.load({target!r}, weights_only=True)",
              "  optimizer = ...  # as before",
              f"  scheduler = {_python_call(plan.info, plan.factory_text)}",
              f"  optimizer.load_state_dict({_subscript(plan.optimizer_path)})",
              f"  scheduler.load_state_dict({_subscript(plan.scheduler_path)})"]
    if plan.source.kind == "lightning":
        lines.append("(Lightning restores both itself when you resume with ckpt_path=...: "
                     "return this scheduler from configure_optimizers.)")
    return "\n".join(lines) + "\n"
