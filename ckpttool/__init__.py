"""ckpttool: inspect and safely reschedule optimizer and LR-scheduler state in PyTorch
checkpoints.

The package imports no torch at import time; only replays (``verify``, ``reschedule``) do.

Example:
    >>> import ckpttool
    >>> ckpt = ckpttool.load("fixtures/adamw_cosine.pt")       # doctest: +SKIP
    >>> ckpt.schedulers[0].call                                 # doctest: +SKIP
    'CosineAnnealingLR(T_max=40, eta_min=1e-05)'
"""

__version__ = "0.1.0"

from ckpttool.batch import Found, expand_paths  # noqa: E402
from ckpttool.diffing import Diff, diff  # noqa: E402
from ckpttool.errors import CkptToolError  # noqa: E402
from ckpttool.inspection import Checkpoint, load  # noqa: E402
from ckpttool.plot import PlotSeries, draw_png, plan_series, plot_series  # noqa: E402
from ckpttool.rescheduling import Rescheduled, SaveResult, reschedule  # noqa: E402

__all__ = ["Checkpoint", "CkptToolError", "Diff", "Found", "PlotSeries", "Rescheduled",
           "SaveResult", "diff", "draw_png", "expand_paths", "load", "plan_series", "plot_series",
           "reschedule", "__version__"]
