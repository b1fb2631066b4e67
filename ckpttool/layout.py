"""Where optimizer and scheduler states live inside a checkpoint, and which drives which.

A checkpoint is a tree; states sit anywhere in it: `optimizer` / `scheduler` at the top, the
tutorial's `optimizer_state_dict`, a nested `train_state/optimizer`, Lightning's parallel lists
`optimizer_states/0` and `lr_schedulers/0`, a GAN's `opt_g` / `sched_g`. This module finds every
optimizer and scheduler state by its shape, not its key name, and pairs each scheduler with the
optimizer it drives from the evidence the file holds (key names, position, group counts, and
whether the scheduler's base_lrs are the optimizer's initial_lr values).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ckpttool.schedulers import looks_like_scheduler
from ckpttool.serialization import MAX_DEPTH, TorchFile, children, join_location

# Top-level keys Lightning writes into every .ckpt (lightning/pytorch/trainer/connectors/
# checkpoint_connector.py); any of the first two marks a Lightning checkpoint.
LIGHTNING_MARKERS = ("pytorch-lightning_version", "lightning_version")
LIGHTNING_OPTIMIZERS_KEY = "optimizer_states"
LIGHTNING_SCHEDULERS_KEY = "lr_schedulers"

# Words that name "an optimizer" / "a scheduler" in key paths; what is left after removing them
# (`g` in `opt_g`, `sched_g`) is what pairs a scheduler with its optimizer by name.
_ROLE_WORDS = re.compile(
    r"(lr_schedulers?|schedulers?|sched|lr_sched|optimizer_states|optimizers?|optim|opt"
    r"|state_dicts?|states?|dict|sd)", re.IGNORECASE)


@dataclass(frozen=True)
class Site:
    """One state found in the tree: its path from the root and the state mapping itself."""

    path: tuple
    state: Mapping

    @property
    def location(self) -> str:
        return join_location(self.path)


@dataclass(frozen=True)
class Layout:
    """The states of one checkpoint and the pairing of schedulers to optimizers."""

    kind: str
    optimizers: tuple[Site, ...]
    schedulers: tuple[Site, ...]
    # scheduler location -> (optimizer location or None, how the pairing was decided)
    pairing: dict[str, tuple[str | None, str]]


def looks_like_optimizer(value: Any) -> bool:
    """An optimizer ``state_dict()``: a mapping with ``state`` and a list of ``param_groups``."""
    if not isinstance(value, Mapping) or "param_groups" not in value or "state" not in value:
        return False
    groups = value["param_groups"]
    return (isinstance(groups, (list, tuple))
            and all(isinstance(g, Mapping) and "params" in g for g in groups)
            and isinstance(value["state"], Mapping))


def checkpoint_kind(ckpt: TorchFile) -> str:
    """The kind of a single-file checkpoint: torch-zip, torch-legacy or lightning."""
    root = ckpt.root
    if isinstance(root, Mapping) and any(k in root for k in LIGHTNING_MARKERS):
        return "lightning"
    return ckpt.kind


def find_states(root: Any) -> tuple[list[Site], list[Site]]:
    """Every optimizer and scheduler state in a tree, in depth-first (file) order.

    The search does not descend into a state once found: a SequentialLR's children are part of
    their parent, not schedulers of their own.
    """
    optimizers: list[Site] = []
    schedulers: list[Site] = []
    seen: set[int] = set()
    stack: list[tuple[tuple, Any]] = [((), root)]
    while stack:
        path, value = stack.pop()
        if looks_like_optimizer(value):
            optimizers.append(Site(path, value))
            continue
        if isinstance(value, Mapping) and looks_like_scheduler(value):
            schedulers.append(Site(path, value))
            continue
        kids = children(value)
        if not kids or id(value) in seen or len(path) >= MAX_DEPTH:
            continue
        seen.add(id(value))
        for key, child in reversed(kids):
            stack.append((path + (key,), child))
    return optimizers, schedulers


def _role_residue(path: tuple) -> tuple[tuple, str]:
    """(parent path, the key's name without role words) — e.g. ('opt_g',) -> ((), 'g')."""
    if not path:
        return (), ""
    *parent, last = path
    if isinstance(last, int) and parent:
        # Lightning-style parallel lists: optimizer_states/0 pairs with lr_schedulers/0.
        return tuple(parent[:-1]), f"#{last}"
    residue = _ROLE_WORDS.sub("", str(last)).strip("_-. ").lower()
    return tuple(parent), residue


def _group_count(state: Mapping) -> int | None:
    for key in ("base_lrs", "_last_lr", "min_lrs"):
        value = state.get(key)
        if isinstance(value, (list, tuple)):
            return len(value)
    subs = state.get("_schedulers")
    if isinstance(subs, (list, tuple)) and subs and isinstance(subs[0], Mapping):
        return _group_count(subs[0])
    return None


def _base_lrs(state: Mapping) -> list | None:
    value = state.get("base_lrs")
    if isinstance(value, (list, tuple)):
        return list(value)
    subs = state.get("_schedulers")
    if isinstance(subs, (list, tuple)) and subs and isinstance(subs[0], Mapping):
        return _base_lrs(subs[0])
    return None


def _score(sched: Site, opt: Site) -> tuple[int, str]:
    """How strongly the file says `sched` drives `opt`, and the strongest reason."""
    score, reasons = 0, []
    s_parent, s_res = _role_residue(sched.path)
    o_parent, o_res = _role_residue(opt.path)
    if s_parent == o_parent and s_res == o_res:
        score += 4
        reasons.append("key names")
    groups = opt.state["param_groups"]
    n = _group_count(sched.state)
    if n is not None:
        if n == len(groups):
            score += 2
            reasons.append("group count")
        else:
            score -= 6
    base = _base_lrs(sched.state)
    initial = [g.get("initial_lr") for g in groups]
    if base is not None and len(base) == len(initial) and all(
            i is not None and _same(b, i) for b, i in zip(base, initial)):
        score += 3
        reasons.append("base_lrs = initial_lr")
    return score, (reasons[0] if reasons else "only candidate")


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    return a == b


def pair_schedulers(optimizers: list[Site], schedulers: list[Site]) -> dict[str, tuple[str | None, str]]:
    """Pair every scheduler with the optimizer it most likely drives.

    Greedy over all (scheduler, optimizer) scores, best first, one scheduler per optimizer while
    unpaired optimizers remain; a scheduler with no positive evidence for any optimizer stays
    unpaired unless the file has exactly one optimizer.
    """
    pairing: dict[str, tuple[str | None, str]] = {}
    if not optimizers:
        return {s.location: (None, "no optimizer in the checkpoint") for s in schedulers}
    if len(optimizers) == 1:
        opt = optimizers[0]
        return {s.location: (opt.location, "only optimizer") for s in schedulers}
    scored = sorted(
        ((_score(s, o), si, oi) for si, s in enumerate(schedulers) for oi, o in enumerate(optimizers)),
        key=lambda t: (-t[0][0], t[1], t[2]))
    used_opts: set[int] = set()
    for (score, reason), si, oi in scored:
        loc = schedulers[si].location
        if loc in pairing or score <= 0 or oi in used_opts:
            continue
        pairing[loc] = (optimizers[oi].location, reason)
        used_opts.add(oi)
    for (score, reason), si, oi in scored:  # several schedulers on one optimizer
        loc = schedulers[si].location
        if loc not in pairing and score > 0:
            pairing[loc] = (optimizers[oi].location, reason)
    for s in schedulers:
        pairing.setdefault(s.location, (None, "no optimizer matches its groups or key name"))
    return pairing


def locate(ckpt: TorchFile) -> Layout:
    """Find and pair the states of a single-file checkpoint."""
    optimizers, schedulers = find_states(ckpt.root)
    return Layout(checkpoint_kind(ckpt), tuple(optimizers), tuple(schedulers),
                  pair_schedulers(optimizers, schedulers))
