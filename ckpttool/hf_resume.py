"""What an HF Trainer needs to resume a rescheduled ``checkpoint-N/`` folder on the new schedule.

On ``trainer.train(resume_from_checkpoint=...)`` the Trainer (transformers 5.x) builds a fresh
scheduler from its TrainingArguments (``get_scheduler(lr_scheduler_type, optimizer,
num_warmup_steps=args.get_warmup_steps(max_steps), num_training_steps=max_steps,
scheduler_specific_kwargs=lr_scheduler_kwargs)``, the optimizer built with ``learning_rate``),
then loads ``optimizer.pt`` and ``scheduler.pt`` into them. Only a schedule built the same way
continues the rewritten state; so for an ``hf:NAME(...)`` schedule ckpttool says which
TrainingArguments rebuild it. A torch scheduler or a factory reaches the Trainer through
``create_scheduler`` (the render module prints the override).

``trainer_state.json`` is read back on resume for the step count, the logs and the callbacks;
its ``max_steps`` and ``num_train_epochs`` are then overwritten from the TrainingArguments. ckpttool
still writes the new horizon into ``max_steps``, so that the folder says what it holds (``show``
and ``plot`` read it). ``training_args.bin`` is a pickle of the user's objects and is copied as
it is: it names the old schedule until the resumed Trainer saves its next checkpoint.

Example:
    >>> plan = ckpttool.reschedule("run/checkpoint-20",                  # doctest: +SKIP
    ...                            sets=["num_training_steps=80"])
    >>> plan.hf.training_args                                            # doctest: +SKIP
    {'lr_scheduler_type': 'linear', 'warmup_steps': 5, 'max_steps': 80, 'learning_rate': 0.001}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ckpttool.serialization import Opaque

TRAINER_STATE = "trainer_state.json"
TRAINING_ARGS = "training_args.bin"


@dataclass(frozen=True)
class HFResume:
    """How an HF Trainer resumes the rewritten folder on the new schedule.

    Attributes:
        training_args: the TrainingArguments that rebuild an ``hf:`` schedule, by name, in the
            order to show them; empty for a torch scheduler or a factory
            (``custom_scheduler``), which the Trainer must be handed through
            ``create_scheduler``.
        stored: what ``training_args.bin`` holds for each of those names (missing: absent).
        trainer_state: the ``trainer_state.json`` fields rewritten, name -> (old, new).
        custom_scheduler: the new schedule is not one the Trainer builds from its arguments.
    """

    training_args: dict[str, Any]
    stored: dict[str, Any]
    trainer_state: dict[str, tuple[Any, Any]]
    custom_scheduler: bool

    @property
    def changed(self) -> tuple[str, ...]:
        """The TrainingArguments whose value differs from ``training_args.bin``'s."""
        return tuple(k for k, v in self.training_args.items()
                     if k not in self.stored or not _same(self.stored[k], v))


def plan_resume(ckpt: Any, hf_spec: Any, bases: list) -> HFResume:
    """The TrainingArguments and trainer_state.json changes for a resume on ``hf_spec`` (an
    :class:`ckpttool.spec.HFSpec`, or None for a torch scheduler or factory) starting from
    the base lrs ``bases``."""
    run = ckpt.hf
    state = ckpt.file.root.get(TRAINER_STATE)
    state = state if isinstance(state, Mapping) else {}
    args_value = ckpt.file.root.get(TRAINING_ARGS)
    args = args_value.state if isinstance(args_value, Opaque) and isinstance(
        args_value.state, Mapping) else {}
    stored: dict[str, Any] = {}
    if run is not None:
        stored = {"lr_scheduler_type": run.scheduler_type, "warmup_steps": run.warmup_given,
                  "max_steps": args.get("max_steps"), "learning_rate": run.learning_rate,
                  "lr_scheduler_kwargs": dict(run.scheduler_kwargs)}
        stored = {k: v for k, v in stored.items() if v is not None}
    if hf_spec is None:
        return HFResume({}, stored, {}, True)
    wanted: dict[str, Any] = {"lr_scheduler_type": hf_spec.name}
    horizon = hf_spec.args.get("num_training_steps")
    resumed_horizon = horizon if horizon is not None else (run.max_steps if run else None)
    if "num_warmup_steps" in hf_spec.args:
        warmup = hf_spec.args["num_warmup_steps"]
        given = stored.get("warmup_steps")
        # A ratio stays a ratio when it still gives these steps over the resumed horizon.
        keeps_ratio = (isinstance(given, float) and 0 < given < 1
                       and isinstance(resumed_horizon, int)
                       and math.ceil(resumed_horizon * given) == warmup)
        wanted["warmup_steps"] = given if keeps_ratio else warmup
    by_epochs = isinstance(args.get("max_steps"), int) and args["max_steps"] <= 0
    if horizon is not None and not (by_epochs and run is not None and run.max_steps == horizon):
        wanted["max_steps"] = horizon  # (num_train_epochs already gives the stored horizon)
    plain = [b for b in bases if isinstance(b, (int, float)) and not isinstance(b, bool)]
    if plain and len(plain) == len(bases) and all(b == plain[0] for b in plain):
        wanted["learning_rate"] = plain[0]
    extra = hf_spec.extra
    if extra or stored.get("lr_scheduler_kwargs"):
        wanted["lr_scheduler_kwargs"] = extra
    changes = {}
    if horizon is not None and isinstance(state.get("max_steps"), int) and (
            state["max_steps"] != horizon):
        changes["max_steps"] = (state["max_steps"], horizon)
    return HFResume(wanted, stored, changes, False)


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b  # warmup_steps 0.1 (a ratio) is not 2; 40 is not 40.0
