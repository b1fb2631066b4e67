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
        "named": s.named,
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
        **({"hf": hf_dict(ckpt.hf)} if ckpt.hf is not None else {}),
    }


def hf_dict(hf: Any) -> dict:
    """What an HF Trainer folder says of its schedule (``show --json``'s ``hf``)."""
    return {"global_step": hf.global_step, "max_steps": hf.max_steps,
            "lr_scheduler_type": hf.scheduler_type, "warmup_steps": hf.warmup_steps,
            "warmup_given": jsonable(hf.warmup_given), "learning_rate": jsonable(hf.learning_rate),
            "lr_scheduler_kwargs": jsonable(hf.scheduler_kwargs), "optim": hf.optim,
            "schedule": hf.spec,
            "logged_lrs": [[step, jsonable(lr)] for step, lr in hf.logged]}


def _hf_lines(hf: Any) -> list[str]:
    warmup = _text(hf.warmup_steps)
    if hf.warmup_given is not None and hf.warmup_given != hf.warmup_steps:
        warmup += f" (warmup_steps={_text(hf.warmup_given)}, a ratio)"
    return [f"HF Trainer: global_step {_text(hf.global_step)} of max_steps "
            f"{_text(hf.max_steps)}",
            f"  lr_scheduler_type {_text(hf.scheduler_type)}, warmup {warmup}, learning_rate "
            f"{_text(hf.learning_rate)}, optim {_text(hf.optim)}"
            + (f", lr_scheduler_kwargs {_text(dict(hf.scheduler_kwargs))}"
               if hf.scheduler_kwargs else ""),
            f"  {_plural(len(hf.logged), 'logged lr')} in trainer_state.json"]


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
    call = f"{s.cls} = {s.named}" if s.named else s.call
    head = f"{indent}[{s.location}] {call}" if top else f"{indent}{call}"
    if top:
        if s.optimizer:
            head += f"\n{indent}  drives [{s.optimizer}] (paired by {s.pairing})"
        elif (s.pairing or "").startswith("ambiguous"):
            head += f"\n{indent}  drives ? ({s.pairing})"
        else:
            head += f"\n{indent}  drives no optimizer in this file"
    lines = [head]
    if s.candidates and not s.named:
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
    if top and not s.named:  # a sub-scheduler's are listed with its parent's, by position
        lines += [f"{indent}  not recoverable: {text}" for text in s.unrecoverable]
    if s.verify is not None:
        v = s.verify
        if v.identical:
            lines.append(f"{indent}  verify: identical to a clean replay")
        elif v.identical is False:
            lines.append(f"{indent}  verify: DIFFERS from a clean replay: {v.first_difference}")
        else:
            lines.append(f"{indent}  verify: not replayable: {v.reason}")
        if v.logged is not None:
            lines.append(f"{indent}  " + _logged_line(v.logged))
    return lines


def _logged_line(check: Any) -> str:
    """A schedule.LoggedCheck in a few words (the finding has the details)."""
    where = "logged lrs (trainer_state.json)"
    if check.agrees:
        return f"{where}: all {check.checked} equal the replay"
    step = check.first_mismatch[0]
    return (f"{where}: {check.mismatches} of {check.checked} DIFFER from the replay, the first "
            f"at step {_text(step)}")


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
    if ckpt.hf is not None:
        blocks.append(_hf_lines(ckpt.hf))
    blocks += [_optimizer_lines(o) for o in ckpt.optimizers]
    blocks += [_scheduler_lines(s) for s in ckpt.schedulers]
    blocks.append(_finding_lines(ckpt.findings))
    return "\n\n".join("\n".join(b) for b in blocks) + "\n"


# --- many checkpoints ---------------------------------------------------------------------------

SHOW_SUMMARY_HEADER = ["path", "kind", "step", "lr", "scheduler", "findings"]
# Distinct group lrs listed in a summary cell; more are shown as their range.
_SUMMARY_LRS = 3


def _compact(value: Any) -> str:
    """A number to 3 significant digits, for a summary table (reports and JSON are exact)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.3g}"
    return _text(value)


def compact_lrs(lrs: list) -> str:
    """Group lrs in one short cell: ``0.001`` when all groups share it, ``0.001, 0.002`` for a
    few, ``1e-05 .. 0.01`` for many."""
    distinct = list(dict.fromkeys(_compact(v) for v in lrs))
    numbers = [v for v in lrs if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(distinct) > _SUMMARY_LRS and len(numbers) == len(lrs):
        return f"{_compact(min(numbers))} .. {_compact(max(numbers))}"
    return ", ".join(distinct) if distinct else "-"


def _severity_counts(findings: tuple[Finding, ...]) -> str:
    counts = {}
    for f in findings:
        counts[f.severity] = counts.get(f.severity, 0) + 1
    parts = [f"{n} {sev}" if sev == "info" else _plural(n, sev)
             for sev in ("error", "warning", "info") if (n := counts.get(sev))]
    return ", ".join(parts) or "none"


def show_summary_row(ckpt: Checkpoint) -> list[str]:
    """One checkpoint as a row of the summary table (:data:`SHOW_SUMMARY_HEADER`); several
    optimizers or schedulers are separated by ``|`` in their cells."""
    steps = " | ".join(_text(_summary_step(s)) for s in ckpt.schedulers) or "-"
    lrs = " | ".join(compact_lrs([g.lr for g in o.groups]) for o in ckpt.optimizers) or "-"
    # an HF Trainer's LambdaLR by the schedule it is (hf:linear(...)), as the report names it
    classes = " | ".join(s.named or s.cls for s in ckpt.schedulers) or "-"
    return [ckpt.path, ckpt.kind, steps, lrs, classes, _severity_counts(ckpt.findings)]


def _summary_step(sched: Any) -> Any:
    """A scheduler's position: its last_epoch, or for a ChainedScheduler (which stores none of
    its own) its children's, when they agree."""
    if sched.last_epoch is None and sched.children:
        positions = {c.last_epoch for c in sched.children}
        if len(positions) == 1:
            return positions.pop()
    return sched.last_epoch


def show_summary_failed_row(path: str) -> list[str]:
    """The row of a PATH that could not be read (its error is on stderr)."""
    return [path, "unreadable", "-", "-", "-", "-"]


def show_summary_text(rows: list[list[str]], failed: int = 0) -> str:
    """The summary table of many checkpoints, and a count under it."""
    with_errors = sum(1 for r in rows if r[1] != "unreadable" and "error" in r[5])
    tail = [f"{_plural(len(rows), 'checkpoint')}"]
    if with_errors:
        tail.append(f"{with_errors} with error findings")
    if failed:
        tail.append(f"{failed} unreadable")
    return "\n".join(_table([SHOW_SUMMARY_HEADER, *rows], indent="")
                     + [", ".join(tail)]) + "\n"


# --- reschedule --------------------------------------------------------------------------------


def hf_resume_dict(plan: Any) -> dict:
    """How an HF Trainer resumes the rewritten folder (``reschedule --json``'s ``hf``)."""
    hf = plan.hf
    return {"training_args": jsonable(hf.training_args),
            "training_args_bin": jsonable(hf.stored),
            "changed": list(hf.changed),
            "trainer_state": {k: {"old": jsonable(a), "new": jsonable(b)}
                              for k, (a, b) in hf.trainer_state.items()},
            "create_scheduler": trainer_subclass(plan) if hf.custom_scheduler else None}


def trainer_subclass(plan: Any) -> str:
    """Python source of a Trainer that builds the new (torch or factory) scheduler itself: the
    Trainer builds its own from TrainingArguments otherwise, and ``optimizers=(None, s)`` cannot
    work, since the optimizer the scheduler needs is made inside ``train()``."""
    return "\n".join([
        "class Trainer(transformers.Trainer):",
        "    def create_scheduler(self, num_training_steps, optimizer=None):",
        "        if self.lr_scheduler is None:",
        "            optimizer = self.optimizer if optimizer is None else optimizer",
        f"            self.lr_scheduler = {_python_call(plan.info, plan.factory_text)}",
        "        return self.lr_scheduler"])


def reschedule_dict(plan: Any, saved: Any = None) -> dict:
    """The ``ckpttool.reschedule/1`` document."""
    doc = plan.to_dict()
    doc["output"] = saved.path if saved is not None else None
    doc["backup"] = saved.backup if saved is not None else None
    doc["verified_steps"] = saved.verified_steps if saved is not None else None
    doc["warnings"] = list(saved.warnings) if saved is not None else []
    doc["dry_run"] = saved is None
    return doc


def _python_call(info: Any, factory: str | None = None) -> str:
    """The constructor as Python source (``lr_scheduler`` being ``torch.optim.lr_scheduler``),
    with the optimizer passed where torch wants it."""
    from dataclasses import replace

    from ckpttool.schedulers import format_call

    if info is None:
        if factory and factory.startswith("hf:"):
            from ckpttool.spec import parse_spec

            return parse_spec(factory).python
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
    if plan.dcp is not None:
        lines += ["", dcp_rewritten_text(plan.dcp)]
    elif plan.rewritten is not None:
        edits = ", ".join(f"{k} {_text(a)} -> {_text(b)}"
                          for k, (a, b) in (plan.hf.trainer_state.items() if plan.hf else ()))
        files = ", ".join(f"{name} ({edits})" if name == "trainer_state.json" and edits else name
                          for name in plan.rewritten)
        lines += ["", f"[{plan.source.kind} folder] rewritten: {files}; every other file "
                  "copied byte for byte"]
    lines += [f"note: {note}" for note in plan.notes]
    if saved is not None:
        lines.append("")
        lines.append(
            f"verified: a fresh optimizer and scheduler loaded from {saved.path} follow the "
            f"replay bit for bit for the next {saved.verified_steps} steps"
            if saved.verified_steps else f"verified: {saved.path} reads back as planned")
    if saved is not None and saved.backup:
        why = f" ({saved.backup_why})" if saved.backup_why else ""
        lines.append(f"backup: the original is now {saved.backup}{why}")
    target = saved.path if saved is not None else "OUT"
    return "\n".join(lines + _resume_lines(plan, target)) + "\n"


# Entries a DCP folder's line names before it counts the rest.
DCP_ENTRIES_SHOWN = 4


def dcp_rewritten_text(changes: Any) -> str:
    """What a reschedule changes in a DCP folder, in one line (from a
    :class:`ckpttool.dcp_write.DCPChanges`).

    Example:
        >>> from ckpttool.dcp_write import DCPChanges
        >>> dcp_rewritten_text(DCPChanges(("optim.param_groups.0.lr", "scheduler.T_max"), (),
        ...                               "__ckpttool_0.distcp", ("__0_0.distcp",), ()))
        '[dcp folder] rewritten: 2 entries (optim.param_groups.0.lr, scheduler.T_max) in a new shard __ckpttool_0.distcp, a new .metadata; every shard copied byte for byte'
    """
    def some(keys: tuple[str, ...]) -> str:
        shown = ", ".join(keys[:DCP_ENTRIES_SHOWN])
        more = len(keys) - DCP_ENTRIES_SHOWN
        return f"{shown}, and {more} more" if more > 0 else shown

    new = (f"{len(changes.written)} {'entry' if len(changes.written) == 1 else 'entries'} "
           f"({some(changes.written)}) in a new shard {changes.shard}, " if changes.written
           else "")
    line = f"[dcp folder] rewritten: {new}a new .metadata"
    if changes.removed:
        n = len(changes.removed)
        line += f"; {n} {'entry' if n == 1 else 'entries'} dropped ({some(changes.removed)})"
    if changes.left_out:
        return (line + "; every other shard copied byte for byte (" + ", ".join(changes.left_out)
                + ", added by an earlier rewrite and no longer used, left out)")
    return line + "; every shard copied byte for byte"


def _resume_lines(plan: Any, target: str) -> list[str]:
    """How the training script resumes from the rewritten checkpoint ``target``, by kind."""
    if plan.hf is not None:
        return _hf_resume_lines(plan, target)
    head = ["", "Resume with the new schedule in this order:"]
    constructor = f"  scheduler = {_python_call(plan.info, plan.factory_text)}"
    if plan.source.kind == "accelerate":
        return head + [
            "  from torch.optim import lr_scheduler", "  optimizer = ...  # as before",
            constructor,
            "  ... = accelerator.prepare(...)  # the same objects in the same order as before",
            f"  accelerator.load_state({target!r})"]
    if plan.source.kind == "dcp":
        return head + [
            "  import torch.distributed.checkpoint as dcp",
            "  from torch.optim import lr_scheduler",
            "  optimizer = ...  # as before", constructor,
            "  state = ...  # the state dict you saved, built as before",
            f"  dcp.load(state, checkpoint_id={target!r})",
            f"  # then the optimizer from state[{plan.optimizer_path[0]!r}], then the scheduler "
            f"from state[{plan.scheduler_path[0]!r}], as before"]
    lines = head + [
        "  import torch",
        *(["  import transformers"] if (plan.factory_text or "").startswith("hf:") else []),
        "  from torch.optim import lr_scheduler",
        f"  ckpt = torch.load({target!r}, weights_only=True)",
        "  optimizer = ...  # as before", constructor,
        f"  optimizer.load_state_dict({_subscript(plan.optimizer_path)})",
        f"  scheduler.load_state_dict({_subscript(plan.scheduler_path)})"]
    if plan.source.kind == "lightning":
        lines.append("(Lightning restores both itself when you resume with ckpt_path=...: "
                     "return this scheduler from configure_optimizers.)")
    return lines


def _hf_resume_lines(plan: Any, target: str) -> list[str]:
    """What an HF Trainer resuming from the rewritten folder needs: the TrainingArguments that
    rebuild an hf: schedule, or a Trainer that builds the new scheduler itself."""
    hf = plan.hf
    if hf.custom_scheduler:
        return ["", "Resume with the HF Trainer, handing it the new scheduler (from "
                "TrainingArguments it would build its own):",
                "  import transformers", "  from torch.optim import lr_scheduler", "",
                *("  " + line for line in trainer_subclass(plan).split("\n")), "",
                f"  Trainer(model=..., args=args, ...).train(resume_from_checkpoint={target!r})",
                "(max_steps in TrainingArguments still sets how long it trains.)"]
    rows = []
    for name, value in hf.training_args.items():
        was = ("unchanged" if name not in hf.changed else "not in training_args.bin"
               if name not in hf.stored else f"training_args.bin: {_text(hf.stored[name])}")
        rows.append([f"{name}={value!r}", f"({was})"])
    lines = ["", "Resume with the HF Trainer, with these TrainingArguments (the Trainer rebuilds "
             "its schedule from them):", *_table(rows),
             f"  trainer.train(resume_from_checkpoint={target!r})"]
    if hf.changed:
        lines.append("(training_args.bin is copied as it was: it names the old schedule until "
                     "the resumed Trainer saves its next checkpoint.)")
    return lines


RESCHEDULE_SUMMARY_HEADER = ["input", "output", "step", "lr", "new schedule", "result"]


def reschedule_summary_text(entries: list[tuple[str, str | None, Any, Any]], *,
                            dry_run: bool = False) -> str:
    """The summary of a reschedule over many inputs: one row per input (``entries`` of
    ``(input, output, plan, saved)``, plan None for an input that failed), the notes, a count.
    """
    rows, notes = [], []
    written = failed = 0
    backups: list[str] = []
    for source, output, plan, saved in entries:
        if plan is None:
            failed += 1
            rows.append([source, "-", "-", "-", "-", "failed"])
            continue
        stored = [g.lr for g in plan.source.optimizer(plan.optimizer).groups]
        new = [g.changes["lr"][1] if "lr" in g.changes else old
               for g, old in zip(plan.groups, stored)]
        lr = ("unchanged" if all("lr" not in g.changes for g in plan.groups)
              else f"{compact_lrs(stored)} -> {compact_lrs(new)}")
        if saved is not None:
            written += 1
            if saved.backup is not None:
                backups.append(saved.backup)
            result = "verified" if saved.verified_steps else "written"
        else:
            result = "planned"
        rows.append([source, output or (saved.path if saved is not None else "-"),
                     str(plan.steps), lr, plan.new_call, result])
        notes += [f"note: {source}: {note}" for note in plan.notes]
    count = [_plural(len(entries), "input")]
    if dry_run:
        count.append(f"{len(entries) - failed} planned (dry run: nothing written)")
    else:
        kept = ""
        if backups and all(b.endswith(".bak") for b in backups):
            kept = ", each original kept as its .bak"
        elif len(backups) == 1:
            kept = f", the original kept as {backups[0]}"
        elif backups:
            kept = ", each original kept as a backup (bak-NAME for an HF Trainer folder)"
        count.append(f"{written} written and verified{kept}")
    if failed:
        count.append(f"{failed} failed (nothing written for {'it' if failed == 1 else 'them'})")
    return "\n".join(_table([RESCHEDULE_SUMMARY_HEADER, *rows], indent="") + notes
                     + [f"{count[0]}: {', '.join(count[1:])}"]) + "\n"


# --- plot --------------------------------------------------------------------------------------


def plot_text(series: Any, width: int = 80) -> str:
    """Sparklines of a :class:`ckpttool.plot.PlotSeries`, fitted to ``width`` columns: one row
    per distinct group curve (stored, then new), one scale per panel (lr, momentum), each row's
    own range beside it, and the current step marked under them."""
    import textwrap

    from ckpttool.plot import column_steps, distinct_curves, groups_label, marks, sparkline

    both = len(series.curves) > 1
    panels = [("lr", "lrs")] + ([(series.momentum_key, "momentum")] if series.momentum_key
                                else [])
    rows = []  # (panel, label, steps, values)
    for panel, field in panels:
        for name, curve in series.curves:
            for indices, values in distinct_curves(getattr(curve, field) or ()):
                rows.append((panel, (f"{name} " if both else "") + groups_label(indices),
                             curve.steps, values))
        if field == "lrs" and series.logged:  # under the curves, on their scale
            points = sorted(p for p in series.logged_points if 0 <= p[0] <= series.horizon)
            rows.append((panel, "logged", tuple(x for x, _ in points),
                         tuple(lr for _, lr in points)))
    ranges = [f"{min(v):.4g} .. {max(v):.4g}" if v else "" for *_, v in rows]
    panel_w = max(len(p) for p, _ in panels)
    label_w = max((len(label) for _, label, *_ in rows), default=0)
    lead = 2 + panel_w + 2 + label_w + 2
    # one column per step at most (more would leave blank columns), at least 10 when the
    # terminal is narrow
    columns = min(series.horizon + 1, max(10, width - lead - 2 - max(map(len, ranges),
                                                                       default=0)))
    lines = [f"{series.path}  [{series.optimizer}]  {series.caption}"]
    lines += [textwrap.fill(f"{name}: {curve.call}", max(width, 40), initial_indent="  ",
                            subsequent_indent="      ") for name, curve in series.curves]
    lines.append("")
    shown = None
    for (panel, label, steps, values), span in zip(rows, ranges):
        group = [v for p, *_, v in rows if p == panel]
        lo, hi = min(min(v) for v in group if v), max(max(v) for v in group if v)
        spark = sparkline(steps, values, columns, series.horizon, lo, hi)
        lines.append(f"  {panel if panel != shown else '':<{panel_w}}  {label:<{label_w}}  "
                     f"{spark}  {span}".rstrip())
        shown = panel
    for step, label, _ in marks(series):
        column = next(c for c in range(columns) if column_steps(c, columns, series.horizon)[1]
                      > step)
        text = f"^ {label}" if lead + column + len(label) + 2 <= width else f"{label} ^"
        lines.append(" " * (lead + column - (len(text) - 1 if text.endswith("^") else 0))
                     + text)
    lines += [f"note: {note}" for note in series.notes]
    return "\n".join(lines) + "\n"


# --- diff --------------------------------------------------------------------------------------

# Items listed per section of a human diff unless --limit says otherwise.
DIFF_LIMIT = 20


def _diff_value(value: Any) -> Any:
    from ckpttool.diffing import TensorValue

    if isinstance(value, TensorValue):
        out: dict[str, Any] = {"tensor": {"dtype": value.dtype, "shape": list(value.shape),
                                          "device": value.device}}
        if value.value is not None:
            out["value"] = jsonable(value.value)
        return out
    return jsonable(value)


def change_dict(c: Any) -> dict:
    """One entry of ``changes`` in ``ckpttool.diff/1``; the side a key is missing from has no
    ``a`` (added) or ``b`` (removed)."""
    from ckpttool.diffing import MISSING

    out: dict[str, Any] = {"path": c.path, "kind": c.kind, "section": c.section}
    if c.kind == "tensor":
        out.update({"max_abs": jsonable(c.max_abs), "max_rel": jsonable(c.max_rel),
                    "n_diff": c.n_diff, "numel": c.numel})
        if c.a is not None and c.a.value is not None:  # one element: its two values
            out.update({"a": jsonable(c.a.value), "b": jsonable(c.b.value)})
        return out
    if c.a is not MISSING:
        out["a"] = _diff_value(c.a)
    if c.b is not MISSING:
        out["b"] = _diff_value(c.b)
    return out


def _triples(items: Any) -> list[dict]:
    from ckpttool.diffing import MISSING

    return [{"key": k, **({"a": _diff_value(a)} if a is not MISSING else {}),
             **({"b": _diff_value(b)} if b is not MISSING else {})} for k, a, b in items]


def diff_dict(d: Any, limit: int | None = None) -> dict:
    """The ``ckpttool.diff/1`` document; ``limit`` caps the ``changes`` list (``truncated``
    then says how many were left out)."""
    from ckpttool.diffing import SCHEMA

    changes = list(d.changes)
    shown = changes if not limit else changes[:limit]
    return {
        "schema": SCHEMA,
        "a": d.a, "b": d.b, "kind_a": d.kind_a, "kind_b": d.kind_b,
        "equal": d.equal,
        "summary": d.summary,
        "rtol": d.rtol, "atol": d.atol, "only": list(d.only), "ignore": list(d.ignore),
        "tensors": {"compared": d.tensors.compared, "changed": d.tensors.changed,
                    "added": d.tensors.added, "removed": d.tensors.removed},
        "optimizers": [{
            "location": o.location, "class": list(o.cls), "groups": list(o.group_count),
            "group_changes": [{"index": g.index, "changes": _triples(g.changes)}
                              for g in o.groups],
            "state": [{"key": st.key, "changed": st.changed, "added": st.added,
                       "removed": st.removed, "params": st.params} for st in o.state],
        } for o in d.optimizers],
        "schedulers": [{
            "location": s.location, "class": list(s.cls), "fields": _triples(s.fields),
            "args": _triples(s.args),
        } for s in d.schedulers],
        "changes": [change_dict(c) for c in shown],
        "truncated": len(changes) - len(shown),
    }


def _diff_text(value: Any) -> str:
    from ckpttool.diffing import MISSING

    if value is MISSING:
        return "-"
    if isinstance(value, str) and value.startswith("<") and value.endswith(">"):
        return value  # a description (`<dict of 13>`), not a string value
    return _text(value)


def _change_line(c: Any, prefix: str = "") -> str:
    path = c.path[len(prefix):].lstrip("/") if prefix and c.path != prefix else c.path
    if c.kind == "added":
        return f"{path}: added ({_diff_text(c.b)})"
    if c.kind == "removed":
        return f"{path}: removed ({_diff_text(c.a)})"
    if c.kind in ("shape", "dtype"):
        return f"{path}: {c.kind} {_diff_text(c.a)} -> {_diff_text(c.b)}"
    if c.kind == "tensor":
        if c.a is not None and c.a.value is not None:
            return f"{path}: {_text(c.a.value)} -> {_text(c.b.value)} ({c.a.dtype} tensor)"
        return (f"{path}: {c.n_diff} of {c.numel} elements differ, max |a-b| "
                f"{_stat(c.max_abs)}, max rel {_stat(c.max_rel)}")
    return f"{path}: {_diff_text(c.a)} -> {_diff_text(c.b)}"


def _stat(value: float | None) -> str:
    """A statistic, to 4 significant digits (JSON has it exactly)."""
    return "-" if value is None else f"{value:.4g}"


def _classes(cls: tuple) -> str:
    """``AdamW``, ``SGD -> Adam``, ``AdamW: only in A``."""
    if cls[0] == cls[1]:
        return cls[0]
    if cls[1] is None:
        return f"{cls[0]}: only in A"
    if cls[0] is None:
        return f"{cls[1]}: only in B"
    return f"{cls[0]} -> {cls[1]}"


def _on_a_tensor(c: Any) -> bool:
    """A change of a tensor itself (not of a container that holds some)."""
    from ckpttool.diffing import TensorValue

    return c.kind in ("tensor", "shape", "dtype") or isinstance(c.a, TensorValue) or isinstance(
        c.b, TensorValue)


def _limited(lines: list[str], limit: int | None, indent: str = "  ") -> list[str]:
    if not limit or len(lines) <= limit:
        return lines
    return lines[:limit] + [f"{indent}... and {len(lines) - limit} more (--limit 0 lists all)"]


def diff_text(d: Any, limit: int | None = DIFF_LIMIT) -> str:
    """The human diff: the summary line, then each changed state, tensors, other values."""
    from ckpttool.diffing import within

    blocks = [[d.summary, f"  A  {d.a}  ({d.kind_a})", f"  B  {d.b}  ({d.kind_b})"]]
    covered: set[int] = set()  # changes a state's block has shown
    for o in d.optimizers:
        lines = [f"[{o.location}] {_classes(o.cls)}"]
        if o.group_count[0] != o.group_count[1] and None not in o.cls:
            lines.append(f"  groups: {o.group_count[0]} -> {o.group_count[1]}")
        for g in o.groups:
            lines.append(f"  group {g.index}: " + ", ".join(
                f"{k} {_diff_text(a)} -> {_diff_text(b)}" for k, a, b in g.changes))
        for st in o.state:
            counts = [f"changed for {st.changed} of {_plural(st.params, 'param')}"
                      if st.changed else "",
                      f"added for {_plural(st.added, 'param')}" if st.added else "",
                      f"removed for {_plural(st.removed, 'param')}" if st.removed else ""]
            lines.append(f"  state {st.key}: " + ", ".join(c for c in counts if c))
        rest = []
        for i, c in enumerate(d.changes):
            if not within(c.path, o.location):
                continue
            sub = c.path[len(o.location):].lstrip("/").split("/")
            grouped = len(sub) == 3 and sub[0] == "param_groups"
            stated = c.tensor and len(sub) == 3 and sub[0] == "state"
            covered.add(i)
            if not (grouped or stated or sub[:1] == ["param_groups"] and len(sub) > 3
                    or None in o.cls):
                rest.append("  " + _change_line(c, o.location))
        blocks.append(lines + _limited(rest, limit))
    for s in d.schedulers:
        lines = [f"[{s.location}] {_classes(s.cls)}"]
        lines += [f"  {k}: {_diff_text(a)} -> {_diff_text(b)}" for k, a, b in s.fields]
        field_keys = {k for k, _, _ in s.fields}
        lines += [f"  {k} (recovered): {_diff_text(a)} -> {_diff_text(b)}"
                  for k, a, b in s.args if k not in field_keys]
        rest = []
        for i, c in enumerate(d.changes):
            if not within(c.path, s.location):
                continue
            covered.add(i)
            sub = c.path[len(s.location):].lstrip("/").split("/")
            if sub[0] not in field_keys and None not in s.cls:
                rest.append("  " + _change_line(c, s.location))
        blocks.append(lines + _limited(rest, limit))
    loose = [c for i, c in enumerate(d.changes)
             if i not in covered and c.section in ("optimizer", "scheduler") and not c.tensor]
    if loose:
        blocks.append(["state values:"] + _limited(["  " + _change_line(c) for c in loose],
                                                   limit))
    t = d.tensors
    tensor_lines = ["  " + _change_line(c) for c in d.changes if _on_a_tensor(c)]
    if tensor_lines:  # (the summary has the count when none changed)
        head = f"tensors: {t.changed} of {t.compared} changed"
        head += "".join(f", {n} {what}" for n, what in ((t.added, "added"),
                                                         (t.removed, "removed")) if n)
        blocks.append([head] + _limited(tensor_lines, limit))
    other = ["  " + _change_line(c) for c in d.changes if c.section == "other"]
    if other:
        blocks.append(["other:"] + _limited(other, limit))
    return "\n\n".join("\n".join(b) for b in blocks) + "\n"
