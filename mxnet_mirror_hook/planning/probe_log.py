"""Warnings of plans the user did not ask for, held back: :class:`HeldWarnings`.

# NOTE [ warnings of internal probes ]
# ``max_batch`` plans at batches and with backends the user did not choose (``backend=
# 'segments'`` at every probe of the segments kind, ``'min'``, no ``device_memory``).  The
# planners' warnings are written for a user who asked for that plan ("backend='segments' was
# asked for, so it is used"): shown for each probe they name choices the user never made (a
# resnet50 max-batch printed twelve).  While the probes are planned a filter on the package's
# loggers holds WARNING records back; afterwards each is logged at DEBUG under its own logger
# and one INFO line says how many were held and what the first said.  Errors still pass (they
# come with an exception).  A logger filter sees only records logged on that logger, not those
# propagated from its children, so the filter sits on every package logger that exists, and is
# attached again before each probe (planning imports modules, creating loggers, as it goes).
"""
from __future__ import annotations

import logging
from typing import Any, List

__all__ = ["HeldWarnings", "PACKAGE"]

#: The package whose loggers are filtered.
PACKAGE = "mxnet_mirror_hook"


def _package_loggers() -> List[logging.Logger]:
    """Every logger of the package that exists now (the package's own included)."""
    found = [logging.getLogger(PACKAGE)]
    for name, item in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith(PACKAGE + ".") and isinstance(item, logging.Logger):
            found.append(item)
    return found


class HeldWarnings(logging.Filter):
    """Hold back the package's WARNING records while active (NOTE [ warnings of internal probes ]).

    Use as a context manager around the whole search and call :meth:`attach` before each probe.

    Parameters
    ----------
    what : str
        What the held warnings came from, for the summary line (``'max_batch's probes'``).
    logger : logging.Logger
        Where the summary line goes.
    """

    def __init__(self, what: str, logger: logging.Logger) -> None:
        super().__init__()
        self.what = what
        self.logger = logger
        self.held: List[logging.LogRecord] = []
        self._on: List[logging.Logger] = []

    def filter(self, record: logging.LogRecord) -> bool:
        """False (held) for a WARNING record, True otherwise."""
        if record.levelno == logging.WARNING:
            self.held.append(record)
            return False
        return True

    def attach(self) -> None:
        """Filter every package logger that exists now (and was not filtered yet)."""
        for item in _package_loggers():
            if item not in self._on:
                item.addFilter(self)
                self._on.append(item)

    def detach(self) -> None:
        """Stop filtering."""
        for item in self._on:
            item.removeFilter(self)
        self._on = []

    def summary(self) -> str:
        """One line: how many warnings were held, how many distinct, and the first."""
        messages = [record.getMessage() for record in self.held]
        distinct = list(dict.fromkeys(messages))
        first = " ".join(distinct[0].split()) if distinct else ""
        return (f"{len(messages)} planning warning(s) held back during {self.what} ({len(distinct)} "
                f"distinct; they concern plans made internally, not the options given; DEBUG logging "
                f"shows each); the first: {first}")

    def __enter__(self) -> "HeldWarnings":
        self.attach()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()
        for record in self.held:
            logging.getLogger(record.name).debug("held back during %s: %s", self.what, record.getMessage())
        if self.held:
            self.logger.info("%s", self.summary())
