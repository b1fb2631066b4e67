"""Where optimizer and scheduler states live inside a checkpoint, and which drives which.

A checkpoint is a tree; states sit anywhere in it: `optimizer` / `scheduler` at the top, the
tutorial's `optimizer_state_dict`, a nested `train_state/optimizer`, Lightning's parallel lists
`optimizer_states/0` and `lr_schedulers/0`, a GAN's `opt_g` / `sched_g`. This module finds every
optimizer and scheduler state by its shape, not its key name, and pairs each scheduler with the
optimizer it drives from the evidence the file holds: the lrs the scheduler saved against the
groups' lr and initial_lr, group counts, key names, positions in parallel lists.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ckpttool.schedulers import int_text, looks_like_scheduler, same, value_repr
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
        # Keys as str() writes them, but an absurd int key by its size (str() refuses it).
        return join_location(tuple(k if isinstance(k, str) else value_repr(k) for k in self.path))


@dataclass(frozen=True)
class Pairing:
    """Which optimizer one scheduler drives, and the evidence that decided it.

    ``optimizer`` indexes :attr:`Layout.optimizers` (None: unpaired or ambiguous); ``reason`` is
    the deciding evidence ("_last_lr = group lrs", "only optimizer"), why there is no optimizer,
    or "ambiguous: A or B"; ``tied`` indexes the optimizers that tie for an ambiguous one.
    """

    optimizer: int | None
    reason: str
    tied: tuple[int, ...] = ()


@dataclass(frozen=True)
class Layout:
    """The states of one checkpoint and the pairing of schedulers to optimizers."""

    kind: str
    optimizers: tuple[Site, ...]
    schedulers: tuple[Site, ...]
    pairing: tuple[Pairing, ...]  # one per scheduler, in the order of `schedulers`


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
        return tuple(parent[:-1]), "#" + int_text(last)
    name = last if isinstance(last, str) else value_repr(last)
    residue = _ROLE_WORDS.sub("", name).strip("_-. ").lower()
    return tuple(parent), residue


def _group_count(state: Mapping) -> int | None:
    for key in ("base_lrs", "_last_lr", "min_lrs"):
        value = state.get(key)
        if isinstance(value, (list, tuple)):
            return len(value)
    first = _first_child(state)
    return _group_count(first) if first is not None else None


def _base_lrs(state: Mapping) -> list | None:
    """base_lrs of a scheduler, or of the first one a SequentialLR / ChainedScheduler built."""
    value = state.get("base_lrs")
    if isinstance(value, (list, tuple)):
        return list(value)
    first = _first_child(state)
    return _base_lrs(first) if first is not None else None


def _first_child(state: Mapping) -> Mapping | None:
    subs = state.get("_schedulers")
    if isinstance(subs, (list, tuple)) and subs and isinstance(subs[0], Mapping):
        return subs[0]
    return None


# Evidence that a scheduler drives an optimizer, with its weight. What the scheduler saved of the
# groups it stepped is the strongest: `_last_lr` is what it last wrote into each group's lr,
# `base_lrs` what it read from each group's initial_lr when it was built. Key names come next
# (`opt_g` / `sched_g`), a position in parallel lists last (Lightning saves `lr_schedulers` in
# configuration order, which need not be the optimizers' order). Two kinds of evidence rule a
# candidate out: another group count (one scheduler lr per group), and an optimizer without any
# initial_lr (every LRScheduler sets it when built, so no scheduler ever drove that optimizer).
LAST_LR = "_last_lr = group lrs"
BASE_LRS = "base_lrs = initial_lr"
KEY_NAMES = "key names"
POSITION = "list position"
GROUP_COUNT = "group count"
INITIAL_LR = "initial_lr present"
_WEIGHTS = {LAST_LR: 16, BASE_LRS: 8, KEY_NAMES: 4, POSITION: 1, GROUP_COUNT: 1}
_GROUP_COUNT_MISMATCH = -64
_NO_INITIAL_LR = -32


def _evidence(sched: Site, opt: Site, plain: Callable[[Any], Any]) -> dict[str, int]:
    """Evidence label -> weight (negative: evidence against) for `sched` driving `opt`."""
    found: dict[str, int] = {}
    s_parent, s_res = _role_residue(sched.path)
    o_parent, o_res = _role_residue(opt.path)
    if s_parent == o_parent and s_res == o_res:
        label = POSITION if s_res.startswith("#") else KEY_NAMES
        found[label] = _WEIGHTS[label]
    groups = [g for g in opt.state["param_groups"] if isinstance(g, Mapping)]
    n = _group_count(sched.state)
    if n is not None:
        found[GROUP_COUNT] = _WEIGHTS[GROUP_COUNT] if n == len(groups) else _GROUP_COUNT_MISMATCH
    last_lr = sched.state.get("_last_lr")
    if _all_same(last_lr, [g.get("lr") for g in groups], plain):
        found[LAST_LR] = _WEIGHTS[LAST_LR]
    base = _base_lrs(sched.state)
    initial = [g.get("initial_lr") for g in groups]
    if base is not None:  # a scheduler that sets initial_lr (ReduceLROnPlateau does not)
        if _all_same(base, initial, plain):
            found[BASE_LRS] = _WEIGHTS[BASE_LRS]
        if groups and all("initial_lr" not in g for g in groups):
            found[INITIAL_LR] = _NO_INITIAL_LR
    return found


def _all_same(saved: Any, values: list, plain: Callable[[Any], Any]) -> bool:
    if not isinstance(saved, (list, tuple)) or len(saved) != len(values) or not values:
        return False
    return all(v is not None and same(plain(a), plain(v)) for a, v in zip(saved, values))


def _deciding(best: dict[str, int], runner_up: dict[str, int]) -> str:
    """The evidence that sets the best candidate apart from the runner-up: its strongest own
    evidence the runner-up lacks, else the strongest evidence against the runner-up."""
    own = [k for k, w in best.items() if w > 0 and runner_up.get(k, 0) < w]
    if own:
        return max(own, key=lambda k: best[k])
    return min(runner_up, key=lambda k: runner_up[k] - best.get(k, 0))


def pair_schedulers(optimizers: list[Site], schedulers: list[Site], *,
                    plain: Callable[[Any], Any] = lambda v: v) -> tuple[Pairing, ...]:
    """Pair every scheduler with the optimizer it most likely drives.

    Each scheduler independently takes the optimizer with the most evidence (see ``_WEIGHTS``;
    several schedulers may drive one optimizer, as torch's chaining does). It stays unpaired
    when no candidate has positive evidence, and is ambiguous when the best two tie; then the
    file does not say, and no pairing is guessed. With a single optimizer in the file, every
    scheduler drives it (its findings then say what does not fit).

    Args:
        optimizers, schedulers: from :func:`find_states`.
        plain: turns a stored value into a plain one (decodes a scalar tensor lr), so that lrs
            compare by value.

    Example:
        >>> opt = {"state": {}, "param_groups": [{"params": [0], "lr": 0.05, "initial_lr": 0.1}]}
        >>> other = {"state": {}, "param_groups": [{"params": [0], "lr": 0.1}]}
        >>> sched = {"base_lrs": [0.1], "last_epoch": 3, "_last_lr": [0.05], "gamma": 0.5}
        >>> pair_schedulers([Site(("a",), other), Site(("b",), opt)], [Site(("s",), sched)])
        (Pairing(optimizer=1, reason='_last_lr = group lrs', tied=()),)
    """
    if not optimizers:
        return tuple(Pairing(None, "no optimizer in the checkpoint") for _ in schedulers)
    if len(optimizers) == 1:
        return tuple(Pairing(0, "only optimizer") for _ in schedulers)
    out = []
    for sched in schedulers:
        evidence = [_evidence(sched, opt, plain) for opt in optimizers]
        scores = [sum(e.values()) for e in evidence]
        order = sorted(range(len(optimizers)), key=lambda i: -scores[i])
        best, second = order[0], order[1]
        if scores[best] <= 0:
            out.append(Pairing(None, "no optimizer matches its group count, lrs or key names"))
        elif scores[second] == scores[best]:
            tied = tuple(i for i in order if scores[i] == scores[best])
            names = [optimizers[i].location for i in tied]
            out.append(Pairing(None, f"ambiguous: {', '.join(names[:-1])} or {names[-1]}",
                               tied))
        else:
            out.append(Pairing(best, _deciding(evidence[best], evidence[second])))
    return tuple(out)


def locate(ckpt: TorchFile, *, plain: Callable[[Any], Any] = lambda v: v) -> Layout:
    """Find and pair the states of a single-file checkpoint (``plain``: see pair_schedulers)."""
    optimizers, schedulers = find_states(ckpt.root)
    return Layout(checkpoint_kind(ckpt), tuple(optimizers), tuple(schedulers),
                  pair_schedulers(optimizers, schedulers, plain=plain))
