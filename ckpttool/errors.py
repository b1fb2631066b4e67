"""Errors ckpttool raises on purpose, and the exit codes the CLI maps them to.

Every error carries a one-line message that says what went wrong and, where there is one, what
to do next. The CLI turns them into ``ckpttool: error: <message>`` and exit code 2; nothing else
reaches a user as a traceback (unless ``--debug``).
"""

from __future__ import annotations

# Exit codes, asserted in tests. "Differences found" is kept apart from "failure" so scripts can
# tell `diff` saying "not equal" from `diff` breaking.
EXIT_OK = 0
EXIT_DIFFERENT = 1
EXIT_ERROR = 2


class CkptToolError(Exception):
    """Something ckpttool cannot do with this input; the message is shown to the user as is."""


class InputError(CkptToolError):
    """The input is missing, unreadable, or not a checkpoint of a kind ckpttool reads."""


class UnsafeCheckpointError(InputError):
    """The checkpoint's pickle names code that would run on a normal torch.load; nothing was run."""


class StateError(CkptToolError):
    """The checkpoint is readable but its optimizer/scheduler state cannot serve the request."""


class ReplayError(CkptToolError):
    """A schedule cannot be rebuilt or re-stepped (missing lambda, unknown class, ...)."""


class SpecError(CkptToolError):
    """A --scheduler SPEC, --set or --lr option is refused as written; nothing was evaluated."""
