"""A progress bar for plans that take more than a second (tqdm, on standard error).

Shown only when standard error is a terminal or the ``mxnet_mirror_hook``
logger is enabled for INFO, and only once planning has taken a second
(tqdm's ``delay``), so quick plans and quiet scripts print nothing.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, Optional

__all__ = ["PlanProgress", "PROGRESS_DELAY_SECONDS"]

#: Seconds of planning before a bar appears.
PROGRESS_DELAY_SECONDS = 1.0

_PACKAGE_LOGGER = logging.getLogger("mxnet_mirror_hook")


def _info_shown() -> bool:
    """Whether an INFO record of the package's logger reaches some handler."""
    if not _PACKAGE_LOGGER.isEnabledFor(logging.INFO):
        return False
    current: Optional[logging.Logger] = _PACKAGE_LOGGER
    while current is not None:
        for handler in current.handlers:
            shows = getattr(handler, "shows", None)  # the script runner's bridge decides itself
            if shows(logging.INFO) if shows is not None else handler.level <= logging.INFO:
                return True
        if not current.propagate:
            return False
        current = current.parent
    return False


def _wanted() -> bool:
    try:
        attached = sys.stderr.isatty()
    except (AttributeError, ValueError):
        attached = False
    return attached or _info_shown()


class PlanProgress:
    """Progress of one plan: phases (``'binding'``, ``'search'``...) with counted steps.

    The bar is created only once planning has taken :data:`PROGRESS_DELAY_SECONDS`
    (before that, phases and steps are only counted), so quick plans print nothing.

    Parameters
    ----------
    label : str
        What is being planned (its input shapes), shown before the bar.
    enabled : bool, optional
        Force the bar on or off (default: see the module docstring).
    """

    def __init__(self, label: str, enabled: Optional[bool] = None) -> None:
        self._bar: Any = None
        self.label = label
        self.enabled = _wanted() if enabled is None else enabled
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
