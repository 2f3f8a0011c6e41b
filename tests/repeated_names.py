"""Symbols whose operators repeat names, as MXNet allows (gluoncv's video networks, xception)."""
from __future__ import annotations

import json

import mxnet as mx


def with_repeated_names(symbol: "mx.sym.Symbol") -> "mx.sym.Symbol":
    """``symbol`` with every operator except the outputs renamed after its type
    (``convolution``, ``batchnorm``...: each name many times); variables keep their names."""
    document = json.loads(symbol.tojson())
    heads = {head[0] for head in document["heads"]}
    for position, node in enumerate(document["nodes"]):
        if node["op"] != "null" and position not in heads:
            node["name"] = node["op"].lower()
    return mx.sym.load_json(json.dumps(document))


def repeated_mlp(layers: int = 4, hidden: int = 256, classes: int = 10) -> "mx.sym.Symbol":
    """Dense + ReLU layers all named ``fc`` and ``relu`` (weights ``fc<i>_weight``), then a
    classifier and ``softmax``."""
    x = mx.sym.var("data")
    for i in range(layers):
        x = mx.sym.FullyConnected(x, weight=mx.sym.var(f"fc{i}_weight"), bias=mx.sym.var(f"fc{i}_bias"),
                                  num_hidden=hidden, name="fc")
        x = mx.sym.Activation(x, act_type="relu", name="relu")
    x = mx.sym.FullyConnected(x, num_hidden=classes, name="out")
    return mx.sym.SoftmaxOutput(x, name="softmax")


def operator_names(symbol: "mx.sym.Symbol") -> list:
    """The operators' names in the symbol's JSON order."""
    return [node["name"] for node in json.loads(symbol.tojson())["nodes"] if node["op"] != "null"]
