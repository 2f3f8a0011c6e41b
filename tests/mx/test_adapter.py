"""The MXNet adapter: symbol -> graph, decision -> symbol, measuring a bind."""
from __future__ import annotations

import json

import mxnet as mx
import pytest

from mxnet_mirror_hook.core.graph import NodeKind
from mxnet_mirror_hook.errors import MeasurementError, ShapeError
from mxnet_mirror_hook.testing.models import small_resnet
from mxnet_mirror_hook.mx.apply import MirrorTemplate
from mxnet_mirror_hook.mx.convert import (MIRROR_ATTR, normalize_inputs, structure_hash,
                                          symbol_to_graph)
from mxnet_mirror_hook.mx.bind import parse_planned_mb, planned_mb_in_process, resident_bytes
from mxnet_mirror_hook.mx.measure import planned_mb
from mxnet_mirror_hook.mx.worker import MeasureWorker



def _odd_names_symbol():
    """Parameters whose names end in no known suffix, and an aux state."""
    data = mx.sym.var("data")
    kernel = mx.sym.var("filters_v2")
    conv = mx.sym.Convolution(data, weight=kernel, num_filter=4, kernel=(3, 3), no_bias=True,
                              name="c1")
    bn = mx.sym.BatchNorm(conv, name="norm")
    fc = mx.sym.FullyConnected(mx.sym.Flatten(bn), num_hidden=3, name="head")
    return mx.sym.SoftmaxOutput(fc, name="softmax")


def test_variables_are_classified_from_the_symbol_lists_not_names():
    graph = symbol_to_graph(_odd_names_symbol(), normalize_inputs([("data", (2, 3, 8, 8))]))
    kinds = {n.name: n.kind for n in graph.nodes if n.is_variable}
    assert kinds["filters_v2"] is NodeKind.PARAM
    assert kinds["norm_moving_mean"] is NodeKind.AUX
    assert kinds["data"] is NodeKind.INPUT
    assert kinds["softmax_label"] is NodeKind.INPUT  # the loss's label, found by structure
    assert graph.node("c1").output_shapes == [(2, 4, 6, 6)]


def test_float16_inputs_give_two_byte_activations():
    data = mx.sym.var("data")
    out = mx.sym.MakeLoss(mx.sym.sum(mx.sym.FullyConnected(data, num_hidden=8, name="fc")))
    graph = symbol_to_graph(out, normalize_inputs([mx.io.DataDesc("data", (4, 16), "float16")]))
    assert graph.node("fc").itemsize == 2


def test_wrong_rank_raises_a_shape_error_naming_the_layout():
    with pytest.raises(ShapeError, match="NCHW"):
        symbol_to_graph(small_resnet(), normalize_inputs([("data", (8, 32, 32))]))


def test_unknown_input_name_lists_the_symbol_arguments():
    with pytest.raises(ShapeError, match="not arguments of the symbol"):
        symbol_to_graph(small_resnet(), normalize_inputs([("image", (8, 3, 32, 32))]))


@pytest.mark.parametrize("bad", [[("data", (8, 0, 3))], [("data", "big")], [("data", (2.5, 3))],
                                 "data", [("data",)]])
def test_malformed_shapes_raise_shape_errors(bad):
    with pytest.raises(ShapeError):
        normalize_inputs(bad)


def test_applying_a_decision_marks_exactly_those_nodes_and_keeps_the_interface():
    symbol = small_resnet()
    template = MirrorTemplate(symbol)
    marked = template.build({"block0_a_relu", "block1_out"})
    assert marked.list_arguments() == symbol.list_arguments()
    assert marked.list_outputs() == symbol.list_outputs()
    assert marked.list_auxiliary_states() == symbol.list_auxiliary_states()
    attrs = marked.attr_dict()
    flagged = sorted(name for name, a in attrs.items() if a.get(MIRROR_ATTR) == "True")
    assert flagged == ["block0_a_relu", "block1_out"]
    assert MIRROR_ATTR not in json.dumps(symbol.attr_dict())  # the user's symbol is untouched
    # A later decision replaces earlier marks instead of adding to them.
    again = MirrorTemplate(marked).build({"stem_relu"})
    flagged = sorted(n for n, a in again.attr_dict().items() if a.get(MIRROR_ATTR) == "True")
    assert flagged == ["stem_relu"]
    assert structure_hash(again) == structure_hash(symbol)
    with pytest.raises(ValueError, match="does not have"):
        template.build({"no_such_node"})


def test_parse_planned_mb_finds_the_total_anywhere():
    text = "Op:relu\n...\nTotal 2901 MB allocated\nTotal 11 TempSpace resource requested\n"
    assert parse_planned_mb(text) == 2901.0
    with pytest.raises(MeasurementError, match="Total N MB allocated"):
        parse_planned_mb("no memory report here")


def _wide_mlp():
    """An MLP with 64 MB of weights: MXNet 1.9.1 keeps 50-80 MB per in-process bind of it."""
    x = mx.sym.var("data")
    for i in range(4):
        x = mx.sym.Activation(mx.sym.FullyConnected(x, num_hidden=2048, name=f"fc{i}"),
                              act_type="relu", name=f"relu{i}")
    return mx.sym.SoftmaxOutput(mx.sym.FullyConnected(x, num_hidden=10, name="out"), name="softmax")


def test_measuring_many_binds_keeps_both_processes_bounded():
    """MXNet keeps native memory per in-process bind (bench/RESULTS.md measures how much; the
    amount varies with the machine's state, so it is benchmarked, not asserted here)."""
    symbol, shapes = _wide_mlp(), {"data": (32, 2048)}
    worker = MeasureWorker()
    request = {"symbol": symbol.tojson(), "shapes": shapes, "types": {}, "grad_req": "write",
               "ctx": ["cpu", 0]}
    try:
        first = worker.measure(request)
        # A limit the child is already above after its first bind: it is recycled whatever the
        # leak's size (since binds wait for their engine work, twelve binds may not grow 20 MB).
        limit = worker.max_resident_mb = worker.last_resident_mb - 1
        before = resident_bytes()
        results = [worker.measure(request) for _ in range(12)]
    finally:
        worker.close()
    assert results == [first] * 12
    growth_mb = (resident_bytes() - before) / 2 ** 20
    # In-process, these 12 binds would keep ~500 MB (see the test above).
    assert growth_mb < 100, f"planning process grew {growth_mb:.0f} MB over 12 binds"
    assert worker.restarts >= 1                      # the child was recycled...
    assert worker.last_resident_mb < limit + 150     # ...before it grew far past its limit


def test_worker_and_in_process_measurements_agree():
    symbol = small_resnet(2, 16)
    shapes = {"data": (8, 3, 64, 64), "softmax_label": (8,)}
    assert planned_mb(symbol, mx.cpu(), shapes) == planned_mb_in_process(symbol, mx.cpu(), shapes)


def test_a_refused_bind_becomes_a_measurement_error():
    with pytest.raises(MeasurementError, match="could not bind"):
        planned_mb(small_resnet(), mx.cpu(), {"data": (8, 3, 32, 32), "softmax_label": (9, 9, 9)})
