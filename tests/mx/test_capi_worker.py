"""The measuring worker binds through MXNet's C API without the mxnet package, with MXNet's
own figures (NOTE [ binding without the mxnet package ] in mx/capi.py)."""
from __future__ import annotations

import mxnet as mx
import pytest

from mxnet_mirror_hook.core.allocator import AllocatorModel, ExecutedGraph
from mxnet_mirror_hook.errors import MeasurementError
from mxnet_mirror_hook.mx.bind import planned_mb_in_process
from mxnet_mirror_hook.mx.measure import worker_request
from mxnet_mirror_hook.mx.worker import MeasureWorker
from mxnet_mirror_hook.testing.models import lstm_language_model, small_resnet


def _mlp() -> mx.sym.Symbol:
    net = mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=256, name="fc1")
    net = mx.sym.Activation(net, act_type="relu", name="relu1")
    net = mx.sym.FullyConnected(net, num_hidden=10, name="fc2")
    return mx.sym.SoftmaxOutput(net, name="softmax")


@pytest.fixture(scope="module")
def workers():
    measuring, capturing = MeasureWorker(), MeasureWorker(verbose=True)
    yield measuring, capturing
    measuring.close()
    capturing.close()


CASES = [
    ("resnet", small_resnet(4, 16), {"data": (8, 3, 32, 32)}, None, "write"),
    ("language-model lstm", lstm_language_model(6, vocab=50, num_embed=16, num_hidden=32),
     {"data": (8, 6), "softmax_label": (8, 6)}, None, "write"),
    ("mlp float64", _mlp(), {"data": (64, 512)}, {"data": "float64"}, "write"),
    ("mlp frozen first layer", _mlp(), {"data": (64, 512)}, None,
     {"data": "null", "fc1_weight": "null", "fc1_bias": "null", "fc2_weight": "write",
      "fc2_bias": "write", "softmax_label": "null"}),
]


@pytest.mark.parametrize("name, symbol, shapes, types, grad_req", CASES, ids=[c[0] for c in CASES])
def test_the_worker_binds_through_the_c_api_with_the_figure_of_an_in_process_bind(
        workers, name, symbol, shapes, types, grad_req):
    measuring, _ = workers
    reply = measuring.exchange(worker_request(symbol.tojson(), mx.cpu(), shapes, types, grad_req))
    assert reply["via"] == "capi"
    assert reply["mb"] == planned_mb_in_process(symbol, mx.cpu(), shapes, types, grad_req)


def test_a_capture_through_the_c_api_gives_an_executed_graph_that_replays_mxnets_figure(workers):
    _, capturing = workers
    symbol, shapes = small_resnet(4, 16), {"data": (8, 3, 32, 32)}
    reply = capturing.exchange(worker_request(symbol.tojson(), mx.cpu(), shapes, None, "write",
                                              capture=True))
    assert reply["via"] == "capi"
    graph = ExecutedGraph.from_dict(reply["executed"])
    assert graph.measured_mb == planned_mb_in_process(symbol, mx.cpu(), shapes)
    model = AllocatorModel(graph)
    assert model.replays_capture() and model.planned_mb() == graph.measured_mb
    # The same capture through the package (a request without a device id) is the same graph.
    request = worker_request(symbol.tojson(), mx.cpu(), shapes, None, "write", capture=True)
    del request["device"]
    through_package = capturing.exchange(request)
    assert through_package["via"] == "package" and through_package["executed"] == reply["executed"]


def test_a_bind_mxnet_refuses_is_redone_with_the_package_and_reports_its_error(workers):
    measuring, _ = workers
    symbol, shapes = _mlp(), {"data": (64, 512), "fc1_weight": (3, 3)}  # a wrong weight shape
    with pytest.raises(MeasurementError) as in_process:
        planned_mb_in_process(symbol, mx.cpu(), shapes)
    with pytest.raises(MeasurementError) as in_worker:
        measuring.measure(worker_request(symbol.tojson(), mx.cpu(), shapes, None, "write"))
    assert str(in_worker.value) == str(in_process.value)
    # and the worker goes on answering through the C API
    good = {"data": (4096, 512)}
    reply = measuring.exchange(worker_request(symbol.tojson(), mx.cpu(), good, None, "write"))
    assert reply["via"] == "capi" and reply["mb"] == planned_mb_in_process(symbol, mx.cpu(), good) > 0
