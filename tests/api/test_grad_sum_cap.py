"""A network MXNet cannot bind under the segments' gradient-sum cap gets segments measured and bound
without it (NOTE [ a network the cap cannot bind ] in planning/candidates.py), and MXNet's errors
are reported by the line that says what failed."""
from __future__ import annotations

import warnings

import mxnet as mx
import pytest

from mxnet_mirror_hook import plan_mirror
from mxnet_mirror_hook.core.segments import SegmentPlan
from mxnet_mirror_hook.mx.bind import mxnet_error_line

BIND_ERROR = """simple_bind error. Arguments:
data: (2, 3, 32, 32)
Traceback (most recent call last):
  File "../3rdparty/tvm/nnvm/src/core/graph.cc", line 109
MXNetError: Check failed: it != node2index_.end(): control dep not found in graph"""


def test_the_error_line_is_the_failed_check_not_the_bind_header():
    line = mxnet_error_line(RuntimeError(BIND_ERROR))
    assert line.startswith("MXNetError: Check failed") and "control dep" in line
    out_of_memory = RuntimeError("MXNetError: out of memory\n  at foo")
    assert mxnet_error_line(out_of_memory) == "MXNetError: out of memory"
    assert mxnet_error_line(RuntimeError("just words")) == "just words"


def test_a_plan_keeps_its_gradient_sum_cap_through_the_cache_form():
    plan = SegmentPlan((), 0, 0, 0.0)
    assert plan.grad_sum_cap == 2
    for cap in (None, 2, 8):
        again = SegmentPlan.from_dict(SegmentPlan((), 0, 0, 0.0, grad_sum_cap=cap).to_dict())
        assert again.grad_sum_cap == cap


@pytest.mark.slow
def test_a_residual_attention_network_gets_segments_bound_without_the_cap():
    # gluoncv's residual-attention network: MXNet 1.9.1 cannot bind it (not even plainly) with
    # MXNET_EXEC_INPLACE_GRAD_SUM_CAP below 8 ("control dep not found in graph").
    from gluoncv.model_zoo import get_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = get_model("cifar_residualattentionnet56", pretrained=False, classes=10)
        net.initialize()
        symbol = mx.sym.SoftmaxOutput(net(mx.sym.var("data")), name="softmax")
    plan = plan_mirror(symbol, [("data", (4, 3, 32, 32))], [("softmax_label", (4,))], backend="segments",
                       cache_dir=False)
    assert plan.backend == "segments" and plan.fallback is None
    assert plan.segment_plan.grad_sum_cap is None and plan.segment_count > 1
    assert plan.planned_mb < plan.baseline_mb
