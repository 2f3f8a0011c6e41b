"""Decision -> Symbol with ``force_mirroring`` set on exactly the chosen nodes."""
from __future__ import annotations

import json
from typing import AbstractSet, Any, Dict, Optional

import mxnet as mx

from . import fused as _fused  # noqa: F401 (registers the fused recomputing operators)
from .convert import MIRROR_ATTR, json_node_keys

__all__ = ["MirrorTemplate"]


# NOTE [ BatchNorm recomputed ]
# A recomputed node runs its forward twice per iteration: once in the forward
# pass and once, as MXNet's mirror copy, during backward.  MXNet's own
# BatchNorm kernels (CPU, and CUDA when ``cudnn_off`` is set) update the
# moving statistics in the *backward* kernel, from the batch statistics saved
# by the forward, so recomputing them changes nothing: the tests check
# parameters and moving statistics bit for bit against a plain Module on the
# CPU.  cuDNN's BatchNorm updates them in its forward call, so a recomputed
# copy would update them twice per iteration (MXNet only guards against this
# under MXNET_BACKWARD_DO_MIRROR).  Recomputed BatchNorm nodes therefore get
# ``cudnn_off=True``: on a GPU they use MXNet's kernel (slower than cuDNN's,
# but correct), on the CPU the attribute changes nothing.  Keeping BatchNorm
# outputs instead would lose most of the savings (resnet50_v1b, batch 32:
# 2901 -> 2778 MB instead of 937 MB).  BatchNorm variants without this
# guarantee are never recomputed (``core.graph.NEVER_MIRRORED_OPS``).


class MirrorTemplate:
    """A symbol parsed once, from which mirrored variants are built quickly.

    Parameters
    ----------
    symbol : mx.sym.Symbol
        The user's symbol; it is never modified.
    document : dict, optional
        ``json.loads(symbol.tojson())``, when the caller has it (read only).
    """

    def __init__(self, symbol: "mx.sym.Symbol", document: Optional[Dict[str, Any]] = None) -> None:
        self.symbol = symbol
        self._document = document if document is not None else json.loads(symbol.tojson())
        # Decisions name nodes by key; a key is a position in the JSON (NOTE [ nodes are
        # identified by key, not by name ] in core/graph.py).  The names stay the user's.
        self._keys = json_node_keys(self._document["nodes"])
        self._names = {key for key, node in zip(self._keys, self._document["nodes"])
                       if node["op"] != "null"}
        self._has_marks = any(MIRROR_ATTR in (node.get("attrs") or {})
                              for node in self._document["nodes"])
        self._arguments = symbol.list_arguments()
        self._outputs = symbol.list_outputs()
        self._auxiliary = symbol.list_auxiliary_states()

    def _check(self, mirrored: AbstractSet[str]) -> None:
        unknown = set(mirrored) - self._names
        if unknown:
            raise ValueError(f"the plan names nodes the symbol does not have: {sorted(unknown)[:5]}")

    def build_json(self, mirrored: AbstractSet[str]) -> str:
        """The JSON text of :meth:`build`'s symbol, without parsing it into MXNet."""
        self._check(mirrored)
        nodes = []
        for key, node in zip(self._keys, self._document["nodes"]):
            if node["op"] == "null":
                nodes.append(node)
                continue
            attrs = dict(node.get("attrs") or {})
            attrs.pop(MIRROR_ATTR, None)
            if key in mirrored:
                attrs[MIRROR_ATTR] = "True"
                if node["op"] == "BatchNorm":
                    attrs["cudnn_off"] = "True"  # NOTE [ BatchNorm recomputed ]
            copy = dict(node)
            if attrs:
                copy["attrs"] = attrs
            else:
                copy.pop("attrs", None)
            nodes.append(copy)
        document = dict(self._document)
        document["nodes"] = nodes
        return json.dumps(document)

    def build(self, mirrored: AbstractSet[str]) -> "mx.sym.Symbol":
        """A copy of the symbol whose operators in ``mirrored`` (keys, as the Graph's node names)
        carry ``force_mirroring``.

        Operators not in ``mirrored`` lose any ``force_mirroring`` they had, so
        the result is exactly the decision.  The empty decision on a symbol
        without marks returns the user's symbol itself.

        Raises
        ------
        ValueError
            If ``mirrored`` names a node the symbol does not have.
        """
        self._check(mirrored)
        if not mirrored and not self._has_marks:
            return self.symbol
        result = mx.sym.load_json(self.build_json(mirrored))
        if (result.list_arguments() != self._arguments or result.list_outputs() != self._outputs
                or result.list_auxiliary_states() != self._auxiliary):
            raise RuntimeError("applying a mirror plan changed the symbol's arguments, outputs or "
                               "auxiliary states; please report this symbol")
        return result
