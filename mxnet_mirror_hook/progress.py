"""A progress bar for plans that take more than a second (tqdm, on standard error).

Drawn only when standard error is a terminal (NOTE [ where the bar is drawn ]) and
``$MXNET_MIRROR_HOOK_PROGRESS`` is not ``0``, and only once planning has taken a
second (tqdm's ``delay``), so quick plans, redirected output and log files get no bar.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Any, Optional

from . import env

__all__ = ["PlanProgress", "PROGRESS_DELAY_SECONDS", "PROGRESS", "bar_wanted"]

#: Seconds of planning before a bar appears.
PROGRESS_DELAY_SECONDS = 1.0

#: ``0`` (or ``off``, ``false``, ``no``): never draw the bar (read by :func:`env.progress_allowed`).
PROGRESS = env.PROGRESS


# NOTE [ where the bar is drawn ]
# tqdm redraws its line with carriage returns: on a terminal that is one line updating in
# place, but in a file or a pipe every redraw stays ("mirror plan data 8x3x64x64: 0%| ...",
# many times over, in the middle of the log).  The bar used to be drawn also when the
# package's INFO records reached a handler, for scripts whose logging goes to the terminal
# through a pipe; that drew it into log files and CI logs too.  So the bar is drawn only
# when standard error itself is a terminal, and ``$MXNET_MIRROR_HOOK_PROGRESS=0`` turns it
# off there as well (scripts that print their own progress, screen recordings).  Planning
# still logs what it does at INFO, which is where a log file gets it.
def bar_wanted() -> bool:
    """Whether the bar is drawn: standard error is a terminal and ``$MXNET_MIRROR_HOOK_PROGRESS`` is
    not ``0`` (NOTE [ where the bar is drawn ])."""
    if not env.progress_allowed():
        return False
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        return False


class PlanProgress:
    """Progress of one plan: phases (``'binding'``, ``'search'``...) with counted steps.

    The bar is created only once planning has taken :data:`PROGRESS_DELAY_SECONDS`
    (before that, phases and steps are only counted), so quick plans print nothing.

    Parameters
    ----------
    label : str
        What is being planned (its input shapes), shown before the bar.
    enabled : bool, optional
        Force the bar on or off (default: :func:`bar_wanted`).
    """

    def __init__(self, label: str, enabled: Optional[bool] = None) -> None:
        self._bar: Any = None
        self.label = label
        self.enabled = bar_wanted() if enabled is None else enabled
        self._started = time.monotonic()
        self._name = ""
        self._total: Optional[int] = None
        self._done = 0
        # Only the planning thread reports: measurements started in the background
        # (CandidateEvaluator.prefetch) would otherwise reset its phase or open a second bar.
        self._owner = threading.get_ident()

    def _show(self) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            if time.monotonic() - self._started < PROGRESS_DELAY_SECONDS:
                return
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self._total, initial=self._done, desc=f"mirror plan {self.label}",
                             unit="step", file=sys.stderr, leave=False, dynamic_ncols=True)
            self._bar.set_postfix_str(self._name)
            return
        self._bar.update(self._done - self._bar.n)

    def phase(self, name: str, total: Optional[int] = None) -> None:
        """Start a phase of ``total`` steps (None: unknown)."""
        if threading.get_ident() != self._owner:
            return
        self._name, self._total, self._done = name, total, 0
        if self._bar is not None:
            self._bar.reset(total=total)
            self._bar.set_postfix_str(name, refresh=False)
        self._show()

    def advance(self, steps: int = 1) -> None:
        """``steps`` more steps done in the current phase."""
        if threading.get_ident() != self._owner:
            return
        self._done += steps
        self._show()

    def close(self) -> None:
        """Remove the bar (it is not left on the screen)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "PlanProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
