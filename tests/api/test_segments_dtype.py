"""The static figure of a float16 or float64 segment chain counts what the chain allocates
(NOTE [ the chain's own arrays ] in core/segments/layout.py): each boundary, gradient, output
copy and chunked-head array at its own element size, not 4 bytes.  MXNet's pool is left out
(``_pool_mb`` patched to 0): MXNet reports it at 4 bytes per element whatever the type."""
from __future__ import annotations

from typing import Dict, Tuple

import mxnet as mx
import numpy as np
import pytest

import mxnet_mirror_hook.mx.segments.measure as segment_measure
from mxnet_mirror_hook.core.graph import Graph
from mxnet_mirror_hook.core.segments import SegmentPlan, loss_head, plan_segments, plan_segments_with_head
from mxnet_mirror_hook.mx.convert import normalize_inputs, symbol_to_graph
from mxnet_mirror_hook.mx.segments import SegmentChain, segment_planned_mb

SHAPES = {"data": (32, 48), "softmax_label": (32,)}


def _mlp(dtype: str, cast: bool) -> "mx.sym.Symbol":
    """Four hidden layers and a softmax head in ``dtype``; with ``cast`` the float32 data is cast
    to it (``mx.sym.Cast``), else the data comes in typed."""
    data = mx.sym.Variable("data")
    x = mx.sym.Cast(data, dtype=dtype, name="cast") if cast else data
    for layer in range(4):
        x = mx.sym.FullyConnected(x, num_hidden=64, name=f"fc{layer}")
        x = mx.sym.Activation(x, act_type="relu", name=f"relu{layer}")
    x = mx.sym.FullyConnected(x, num_hidden=10, name="out")
    return mx.sym.SoftmaxOutput(x, mx.sym.Variable("softmax_label"), name="softmax")


def _typed(dtype: str, cast: bool) -> Tuple["mx.sym.Symbol", Dict[str, np.dtype], Graph]:
    symbol = _mlp(dtype, cast)
    types = {"data": np.dtype("float32" if cast else dtype), "softmax_label": np.dtype(dtype)}
    inputs = (normalize_inputs([("data", SHAPES["data"], types["data"].name)])
              + normalize_inputs([("softmax_label", SHAPES["softmax_label"], dtype)], "label"))
    return symbol, types, symbol_to_graph(symbol, inputs)


def _requests(symbol: "mx.sym.Symbol") -> Dict[str, str]:
    return {n: "null" if n in SHAPES else "write" for n in symbol.list_arguments()}


def _figure_and_chain(symbol, plan: SegmentPlan, types) -> Tuple[float, SegmentChain]:
    chain = SegmentChain(symbol, plan, mx.cpu(), SHAPES, type_dict=types, grad_req=_requests(symbol))
    figure, _ = segment_planned_mb(symbol, plan, mx.cpu(), SHAPES, types, _requests(symbol))
    return figure, chain


@pytest.mark.parametrize("dtype,cast", [("float16", True), ("float64", False)])
def test_the_figure_counts_the_arrays_a_typed_chain_allocates(monkeypatch, dtype, cast):
    monkeypatch.setattr(segment_measure, "_pool_mb", lambda *args: 0.0)
    symbol, types, graph = _typed(dtype, cast)
    plan = plan_segments(graph, 3)
    assert plan.count == 3
    itemsize = np.dtype(dtype).itemsize
    # The planner's own count of the boundaries uses the graph's element size too.
    assert plan.boundary_bytes == sum(itemsize * int(np.prod(s)) for s in plan.boundary_shapes.values())
    figure, chain = _figure_and_chain(symbol, plan, types)
    arrays = list(chain.boundary.values()) + list(chain.boundary_grad.values()) + list(chain.outputs)
    assert {np.dtype(a.dtype).name for a in arrays} == {dtype}
    assert figure * 2 ** 20 == chain.allocated_bytes()
    symbol32, types32, _ = _typed("float32", cast)   # the same network in float32
    float32_figure, _ = _figure_and_chain(symbol32, plan, types32)
    assert figure == pytest.approx(float32_figure * itemsize / 4)


@pytest.mark.parametrize("dtype,cast", [("float16", True), ("float64", False)])
def test_the_figure_counts_a_typed_chunked_head_at_its_element_size(monkeypatch, dtype, cast):
    monkeypatch.setattr(segment_measure, "_pool_mb", lambda *args: 0.0)
    symbol, types, graph = _typed(dtype, cast)
    head, why = loss_head(graph)
    assert head is not None, why
    plan = plan_segments_with_head(graph, 3, head).with_head_chunks(2)
    figure, chain = _figure_and_chain(symbol, plan, types)
    assert chain.head is not None and np.dtype(chain.head.output.dtype).name == dtype
    assert figure * 2 ** 20 == chain.allocated_bytes()
    assert chain.head.allocated_bytes() == chain.layout.head_bytes()


def test_a_float64_chunked_head_trains_as_the_plain_executor():
    """The head's tiles build the one-hot labels in the head's own type (float64 here)."""
    symbol, types, graph = _typed("float64", False)
    head, why = loss_head(graph)
    assert head is not None, why
    plan = plan_segments_with_head(graph, 3, head).with_head_chunks(2)
    requests = _requests(symbol)
    chain = SegmentChain(symbol, plan, mx.cpu(), SHAPES, type_dict=types, grad_req=requests)
    plain = symbol.simple_bind(mx.cpu(), grad_req=requests, type_dict=types, **SHAPES)
    rng = np.random.RandomState(3)
    for name, array in plain.arg_dict.items():
        value = (rng.randint(0, 10, array.shape) if name == "softmax_label"
                 else rng.uniform(-0.5, 0.5, array.shape))
        array[:] = value
        chain.arg_dict[name][:] = value
    for executor in (plain, chain):
        executor.forward(is_train=True)
        executor.backward()
    np.testing.assert_allclose(chain.outputs[0].asnumpy(), plain.outputs[0].asnumpy(), rtol=1e-12)
    for name, grad in plain.grad_dict.items():
        if grad is not None:
            np.testing.assert_allclose(chain.grad_dict[name].asnumpy(), grad.asnumpy(), rtol=1e-9,
                                       atol=1e-12, err_msg=name)
