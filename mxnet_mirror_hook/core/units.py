"""Units: one definition of a megabyte for the whole package (MXNet reports MiB as "MB")."""
from __future__ import annotations

__all__ = ["KB", "MB", "GB", "MB_SHIFT", "to_mb"]

#: Bytes in a kilobyte, megabyte and gigabyte as MXNet counts them (powers of two).
KB = 1 << 10
MB = 1 << 20
GB = 1 << 30
#: ``bytes >> MB_SHIFT`` is whole megabytes (the seed's thresholds are in these).
MB_SHIFT = 20


def to_mb(nbytes: float) -> float:
    """``nbytes`` in MB."""
    return nbytes / MB
