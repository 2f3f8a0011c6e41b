"""Types of the compiled replay built from ``_replay.c`` (NOTE [ the compiled replay ] in allocator.py)."""
from array import array
from typing import Dict, Iterable, Tuple

__all__ = ["prepare", "planned_bytes_of_names"]

def prepare(num_forward: int, match_range: int, arrays: Tuple[array[int], ...]) -> object:
    """The executed graph's flat int64 arrays, checked, as an opaque model (a capsule)."""

def planned_bytes_of_names(model: object, mirrored: Iterable[str], index: Dict[str, int],
                           limit: int) -> int:
    """Bytes nnvm's allocator plans with ``mirrored`` recomputed (``limit`` -1: no limit)."""
