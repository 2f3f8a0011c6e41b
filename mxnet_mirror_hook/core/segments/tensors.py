"""The shape and element type of one array a segment chain allocates, from MXNet's inference
or from the graph."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

from ..graph import Graph

__all__ = ["TensorSpec", "graph_tensor"]


@dataclass(frozen=True)
class TensorSpec:
    """Shape and element type of one array.

    Attributes
    ----------
    shape : tuple of int
        Its shape (``()``: unknown, counted as 0 bytes).
    itemsize : int
        Bytes per element.
    dtype : str
        NumPy name of the element type (``'float16'``), or ``''`` when only the size is known
        (a graph node's).
    """

    shape: Tuple[int, ...]
    itemsize: int = 4
    dtype: str = ""

    @property
    def nbytes(self) -> int:
        """Bytes of the array."""
        return math.prod(self.shape) * self.itemsize if self.shape else 0

    @property
    def key(self) -> Tuple[Tuple[int, ...], str]:
        """What two arrays must share to be one array: shape and type."""
        return tuple(self.shape), self.dtype or f"{self.itemsize}B"


def graph_tensor(graph: Graph, position: int, output: int) -> TensorSpec:
    """The :class:`TensorSpec` of output ``output`` of node ``position`` of ``graph`` (its
    element size is the node's: :attr:`~mxnet_mirror_hook.core.graph.Node.itemsize`)."""
    node = graph.nodes[position]
    shape = tuple(node.output_shapes[output]) if output < len(node.output_shapes) else ()
    return TensorSpec(shape, node.itemsize)
