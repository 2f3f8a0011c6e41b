"""Training helpers shared by the equivalence tests."""
from __future__ import annotations

import json
from typing import Dict, Tuple

import mxnet as mx
import numpy as np


def dropout_mlp(layers: int, hidden: int = 1024, classes: int = 10) -> "mx.sym.Symbol":
    """Dense, ReLU and Dropout layers (``fc<i>``, ``relu<i>``, ``drop<i>``), then a classifier."""
    x = mx.sym.var("data")
    for i in range(layers):
        x = mx.sym.FullyConnected(x, num_hidden=hidden, name=f"fc{i}")
        x = mx.sym.Activation(x, act_type="relu", name=f"relu{i}")
        x = mx.sym.Dropout(x, p=0.3, name=f"drop{i}")
    x = mx.sym.FullyConnected(x, num_hidden=classes, name="out")
    return mx.sym.SoftmaxOutput(x, name="softmax")


def batches(count: int, data_shape: Tuple[int, ...], classes: int, seed: int = 1):
    """Deterministic synthetic batches."""
    rng = np.random.RandomState(seed)
    return [mx.io.DataBatch([mx.nd.array(rng.uniform(-1, 1, data_shape))],
                            [mx.nd.array(rng.randint(0, classes, data_shape[0]))])
            for _ in range(count)]


def train(module: mx.mod.Module, data_shape: Tuple[int, ...], classes: int, steps: int = 3,
          seed: int = 0, optimizer_params: Dict = None) -> Tuple[dict, dict]:
    """Bind, initialise deterministically, train ``steps`` SGD steps; return (args, auxs)."""
    mx.random.seed(seed)
    np.random.seed(seed)
    module.bind([("data", data_shape)], [("softmax_label", (data_shape[0],))])
    module.init_params(mx.init.Xavier(magnitude=2.0))
    module.init_optimizer(optimizer="sgd", optimizer_params=optimizer_params or {
        "learning_rate": 0.1, "momentum": 0.9, "wd": 1e-4})
    for batch in batches(steps, data_shape, classes):
        module.forward_backward(batch)
        module.update()
    mx.nd.waitall()
    args, auxs = module.get_params()
    return ({k: v.asnumpy() for k, v in args.items()}, {k: v.asnumpy() for k, v in auxs.items()})


def max_difference(left: Dict[str, np.ndarray], right: Dict[str, np.ndarray]) -> float:
    """Largest absolute difference over arrays with the same names (names must match)."""
    assert sorted(left) == sorted(right)
    return max(float(np.abs(left[k] - right[k]).max()) for k in left)


class SyncedModule(mx.mod.Module):
    """The plain reference, with MXNet 1.9.1's stale BatchNorm read fixed as MirroredModule does.

    ``Module.fit`` copies parameters off the devices and back at each epoch end;
    with MKLDNN BatchNorm that copy can read moving statistics the engine has
    not yet written, so two identical plain runs in one process disagree
    (see NOTE [ reading BatchNorm statistics ] in module.py).
    """

    def _sync_params_from_devices(self):
        mx.nd.waitall()
        super()._sync_params_from_devices()


def attached_input_gradients(models, data: "mx.nd.NDArray", label: "mx.nd.NDArray") -> list:
    """Per model, the gradient of an attached input ``data`` through the model's loss and a second
    path to the input outside the model (``sum(x * x)``)."""
    from mxnet import autograd, gluon

    grads = []
    for model in models:
        x = data.copy()
        x.attach_grad()
        with autograd.record():
            loss = gluon.loss.SoftmaxCrossEntropyLoss()(model(x), label)
            extra = (x * x).sum()  # a second path to x outside the mirrored block
        autograd.backward([loss, extra])
        grads.append(x.grad.asnumpy())
    return grads


class _Double(mx.operator.CustomOp):
    def forward(self, is_train, req, in_data, out_data, aux):
        self.assign(out_data[0], req[0], in_data[0] * 2)

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        self.assign(in_grad[0], req[0], out_grad[0] * 2)


#: ``op_type`` of a Custom operator (registered in the test process only) that doubles its input.
DOUBLE_OP = "mirror_hook_test_scale"


@mx.operator.register(DOUBLE_OP)
class _DoubleProp(mx.operator.CustomOpProp):
    def __init__(self):
        super().__init__(need_top_grad=True)

    def infer_shape(self, in_shape):
        return in_shape, [in_shape[0]], []

    def create_operator(self, ctx, shapes, dtypes):
        return _Double()


def reordered_symbol(document: dict) -> "mx.sym.Symbol":
    """The symbol of a JSON ``document`` whose nodes are put in topological order again (variables
    appended after their readers moved before them)."""
    nodes = document["nodes"]
    order, seen = [], set()

    def visit(index):
        if index in seen:
            return
        seen.add(index)
        for entry in nodes[index]["inputs"]:
            visit(entry[0])
        order.append(index)

    for head in document["heads"]:
        visit(head[0])
    new = {old: position for position, old in enumerate(order)}
    out = [{**nodes[i], "inputs": [[new[e[0]], e[1], e[2]] for e in nodes[i]["inputs"]]} for i in order]
    heads = [[new[e[0]], e[1], e[2]] for e in document["heads"]]
    arguments = [i for i, n in enumerate(out) if n["op"] == "null"]
    return mx.sym.load_json(json.dumps({"nodes": out, "arg_nodes": arguments, "heads": heads,
                                        "attrs": document.get("attrs", {})}))
