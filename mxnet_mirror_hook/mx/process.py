"""The size of this process (pure Python: measuring workers read it without MXNet)."""
from __future__ import annotations

import os

from ..core.units import MB

__all__ = ["resident_bytes", "resident_mb"]


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
