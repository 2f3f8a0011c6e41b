"""This process: its size, and its standard error redirected (pure Python: measuring workers
use it without MXNet)."""
from __future__ import annotations

import contextlib
import os
from typing import IO, Iterator

from ..core.units import MB

__all__ = ["resident_bytes", "resident_mb", "stderr_into"]


def resident_bytes() -> int:
    """Resident memory of this process in bytes (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", "r", encoding="ascii") as handle:
            pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def resident_mb() -> float:
    """Resident memory of this process in MB."""
    return resident_bytes() / MB


@contextlib.contextmanager
def stderr_into(handle: IO[bytes]) -> Iterator[None]:
    """File descriptor 2, where MXNet logs (its memory plan among others), written into
    ``handle`` for the block."""
    saved = os.dup(2)
    try:
        os.dup2(handle.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
